"""How many seconds does an epoch take, training and evaluation apart, by dataset size and model, and what
does that make of `search_spaces/wd_maxnorm.yaml` on a GPU cluster?

Method. Datasets: CIFAR-10-LT IF 100 (real, 12,386 train images), CIFAR-10-LT IF 10 (real, ~20.4k), and a
CIFAR-100-LT IF 100-sized set of synthetic uint8 tensors (10,827 train, 2,000 val, 10,000 test, 100
classes). Models: ResNet-8/20/32. Each measurement times `--steps` training steps (the trainer's step:
channels_last, SGD, per-step cosine LR, after `--warmup` steps) and the evaluation of `--eval-images` test
images (the trainer's evaluate: features + per-class counts for the model and its tau-normalised
classifier, batch 512), then extrapolates to a full epoch: train = steps per epoch x s/step, eval = (val +
test images) x s/image. Repetitions are interleaved across all (dataset, model) pairs; medians reported.
The per-epoch numbers feed the GPU-cluster estimate for `search_spaces/wd_maxnorm.yaml` in docs/benchmarks.md.

Command (docs/benchmarks.md, section 4):

    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/scaling.py           # ~6 min on the 2-core machine
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from itertools import product

import torch
from common import interleaved, synthetic_cifar100_lt, table

from ltsearch.data import MEAN, STD, LongTailData, TensorLoader, load_longtail
from ltsearch.losses import build_loss
from ltsearch.metrics import feature_counts
from ltsearch.models import build_model
from ltsearch.optim import sgd_step
from ltsearch.regularizers import tau_normalize, weight_decay_groups
from ltsearch.schedules import cosine_lr

MODELS = ("resnet8", "resnet20", "resnet32")


def measure(data: LongTailData, dataset: str, model_name: str, batch: int, steps: int, warmup: int,
            eval_images: int) -> tuple[float, float]:
    """(train seconds per epoch, eval seconds per epoch), extrapolated from a short run."""
    torch.manual_seed(0)
    model = build_model(model_name, data.num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(weight_decay_groups(model, 5e-3), lr=0.01, momentum=0.9)
    loss_fn = build_loss("ce", data.class_counts)
    norm = {"mean": MEAN[dataset], "std": STD[dataset], "channels_last": True}
    loader = TensorLoader(data.train_x, data.train_y, batch, train=True, seed=0, **norm)
    model.train()
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        x, y = next(batches)
        sgd_step(optimizer, loss_fn(model(x).float(), y), cosine_lr(i, len(loader), 0, 0.01))
    train_epoch = (time.perf_counter() - started) / steps * len(loader)

    model.eval()
    tau_weight = tau_normalize(model.classifier.weight, 1.0)
    n = min(eval_images, len(data.test_y))
    evaluate = TensorLoader(data.test_x[:n], data.test_y[:n], 512, train=False, **norm)
    with torch.no_grad():
        next(iter(evaluate))  # warm-up batch, not timed
        started = time.perf_counter()
        for x, y in evaluate:
            feature_counts(model, model.features(x).float(), y, tau_weight)
        per_image = (time.perf_counter() - started) / n
    return train_epoch, per_image * (len(data.val_y) + len(data.test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="stage-1 batch (wd_maxnorm.yaml: 64)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-images", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("LTSEARCH_DATA", "/tmp/ltdata")
    torch.set_num_threads(args.threads)
    sets = {"CIFAR-10-LT IF100": ("cifar10", load_longtail("cifar10", imbalance_factor=100)),
            "CIFAR-10-LT IF10": ("cifar10", load_longtail("cifar10", imbalance_factor=10)),
            "CIFAR-100-LT IF100 (synthetic)": ("cifar100", synthetic_cifar100_lt(val_per_class=20, test_per_class=100))}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.steps} steps + "
          f"{args.eval_images} eval images per measurement, {args.reps} interleaved reps", flush=True)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rep, ((name, (dataset, data)), model) in interleaved(args.reps, product(sets.items(), MODELS)):
        t = measure(data, dataset, model, args.batch, args.steps, args.warmup, args.eval_images)
        results.setdefault((name, model), []).append(t)
        print(f"  rep {rep} {name:32s} {model:9s} train {t[0]:6.1f} s/epoch  eval {t[1]:5.1f} s/epoch", flush=True)
    rows = []
    for (name, (_, data)), model in product(sets.items(), MODELS):
        train_s = statistics.median(t[0] for t in results[(name, model)])
        eval_s = statistics.median(t[1] for t in results[(name, model)])
        rows.append([name, len(data.train_y), len(data.val_y) + len(data.test_y), model, f"{train_s:.1f}",
                     f"{eval_s:.1f}", f"{len(data.train_y) / train_s:.0f}", f"{eval_s / (train_s + eval_s):.0%}"])
    print("\n" + table(["dataset", "train images", "val + test images", "model", "train s/epoch", "eval s/epoch",
                         "train img/s", "eval share of epoch"], rows))


if __name__ == "__main__":
    main()
