"""ltsearch: Ray-distributed hyperparameter search for long-tailed image recognition.

Plain-PyTorch core: `config` (validated YAML), `data` (long-tailed CIFAR as tensors), `models` (CIFAR ResNets,
NBN), `losses`, `regularizers` (MaxNorm, tau-norm, weight-decay groups), `metrics`, `train` (two stages).
Ray lives only in `search`.
"""
__version__ = "0.1.0"
