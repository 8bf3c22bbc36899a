"""How many images a second does ltsearch's stage-1 training step reach, against the compute limit (no data
pipeline at all) and against the torchvision pipeline of the original weight-balancing code?

Method. ResNet-32 with 100 classes on 3x32x32 images (CIFAR-100-LT IF 100 shapes: 10,827 synthetic uint8
images with the long-tailed class counts), batch 64 and 128, the same model, SGD and loss step as
`ltsearch/train.py` (per-step cosine LR, weight decay on all parameters, `loss.detach()` accumulated):

  ltsearch          `ltsearch.data.TensorLoader` (uint8 tensor, batched crop+flip, normalise), channels_last
  compute_cl        (a) no data pipeline: a few pre-made normalised float batches, cycled; channels_last
  compute_fp32      (a') the same, fp32 contiguous (the model's plain memory format)
  torchvision_w0    (b) the original weight-balancing code's pipeline: a Dataset of uint8 HWC arrays turned
                    into PIL images, RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize
                    per image, torch DataLoader(shuffle=True, num_workers=0); channels_last model, so only
                    the data pipeline differs from `ltsearch`
  torchvision_w2    (b) the same with num_workers=2
  original_w0       (b') torchvision_w0 with the fp32 contiguous model: the original code as written
  *_data            the data pipeline alone (no model): its ms per batch bounds what it can cost a step

Every measurement runs in a fresh process (so peak RSS is per configuration): warm-up steps, then `--steps`
timed steps. Repetitions are interleaved (A, B, C, ... A, B, C, ...); the table gives medians, and
`ltsearch / config` as the median of the per-repetition ratios.
Targets: ltsearch >= 0.95x compute_cl (within 5% of the compute limit);
         ltsearch >= 1.3x torchvision_w0 and torchvision_w2 (and original_w0).

Command (docs/benchmarks.md, section 1):

    .venv/bin/python benchmarks/trainer_throughput.py                 # ~25 min on the 2-core machine
    .venv/bin/python benchmarks/trainer_throughput.py --steps 30 --reps 1 --batch-sizes 64   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from itertools import product

from common import (
    cpu_seconds,
    endless,
    in_fresh_process,
    interleaved,
    per_rep_ratios,
    spread,
    synthetic_cifar100_lt,
    table,
)

CONFIGS = ("ltsearch", "compute_cl", "compute_fp32", "torchvision_w0", "torchvision_w2", "original_w0",
           "ltsearch_data", "torchvision_w0_data")


def batches(name: str, x, y, batch: int):
    """An endless iterator of (images, labels) for configuration `name`."""
    import torch

    from ltsearch.data import MEAN, STD, TensorLoader

    mean, std = MEAN["cifar100"], STD["cifar100"]
    if name == "ltsearch":
        yield from endless(TensorLoader(x, y, batch, mean, std, train=True, seed=0, channels_last=True))
    elif name.startswith("compute"):
        fmt = torch.channels_last if name == "compute_cl" else torch.contiguous_format
        loader = TensorLoader(x, y, batch, mean, std, train=True, seed=0)
        premade = [(xb.contiguous(memory_format=fmt), yb) for _, (xb, yb) in zip(range(8), loader)]
        while True:
            yield from premade
    else:  # torchvision_w0 / torchvision_w2 / original_w0: per-image PIL transforms through a DataLoader
        import numpy as np
        import torchvision.transforms as T
        from PIL import Image

        class PILDataset(torch.utils.data.Dataset):  # like torchvision.datasets.CIFAR10
            def __init__(self, images_hwc: np.ndarray, labels: list[int], transform):
                self.data, self.targets, self.transform = images_hwc, labels, transform

            def __len__(self):
                return len(self.targets)

            def __getitem__(self, i):
                return self.transform(Image.fromarray(self.data[i])), self.targets[i]

        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(mean, std)])
        dataset = PILDataset(x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                             num_workers=int(name[-1]))
        while True:
            yield from loader


def _peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM (peak resident set size) of a live process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(name: str, batch: int, steps: int, warmup: int, threads: int, model_name: str,
            precision: str = "fp32") -> dict:
    """Images/s (wall and per CPU-second) of `steps` training steps (after `warmup`) of configuration
    `name`, or of its data pipeline alone (`*_data`); peak RSS of the process and of its loader workers.
    `precision` bf16 runs the forward pass and loss under CPU bf16 autocast, as `trainer.precision: bf16`."""

    import psutil
    import torch

    from ltsearch.losses import build_loss
    from ltsearch.models import build_model
    from ltsearch.optim import sgd_step
    from ltsearch.regularizers import weight_decay_groups
    from ltsearch.schedules import cosine_lr

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_imports = _peak_rss_mb()
    images = synthetic_cifar100_lt()
    x, y, counts = images.train_x, images.train_y, images.class_counts
    data_only = name.endswith("_data")
    data = batches(name.removesuffix("_data"), x, y, batch)
    fmt = torch.contiguous_format if name in ("compute_fp32", "original_w0") else torch.channels_last
    model = build_model(model_name, 100).to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(weight_decay_groups(model, 5e-3), lr=0.01, momentum=0.9)
    loss_fn = build_loss("ce", counts)
    total = warmup + steps
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i in range(total):
        if i == warmup:
            started, cpu0 = time.perf_counter(), cpu_seconds()
        xb, yb = next(data)
        if name.startswith("torchvision"):  # the model's memory format, as TensorLoader yields it
            xb = xb.contiguous(memory_format=torch.channels_last)
        if data_only:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = loss_fn(model(xb).float(), yb)
        sgd_step(optimizer, loss, cosine_lr(i, total, 0, 0.01))
        loss_sum += loss.detach().double()
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    workers = psutil.Process().children()  # DataLoader workers (none for the tensor paths)
    worker_rss = max((_peak_rss_mb(c.pid) for c in workers), default=0.0)
    assert torch.isfinite(loss_sum)
    return {"config": name, "precision": precision, "batch": batch, "img_s": steps * batch / elapsed, "img_per_cpu_s": steps * batch / cpu,
            "rss_after_imports_mb": rss_imports, "peak_rss_mb": _peak_rss_mb(), "worker_peak_rss_mb": worker_rss,
            "workers": len(workers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="resnet32", help="e.g. resnet8 to see a cheaper model")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {args.model}, 100 classes, "
          f"{args.steps} timed steps after {args.warmup}, {args.reps} interleaved reps", flush=True)
    runs: list[dict] = []
    for rep, (batch, name) in interleaved(args.reps, product(args.batch_sizes, args.configs)):
        out = in_fresh_process(measure, name=name, batch=batch, steps=args.steps, warmup=args.warmup,
                               threads=args.threads, model_name=args.model, precision=args.precision)
        runs.append({**out, "rep": rep, "model": args.model})
        print(f"  rep {rep} batch {batch:4d} {name:15s} {out['img_s']:7.1f} img/s  "
              f"peak RSS {out['peak_rss_mb']:.0f} MB (workers {out['worker_peak_rss_mb']:.0f} MB)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)

    targets = {"compute_cl": 0.95, "torchvision_w0": 1.30, "torchvision_w2": 1.30, "original_w0": 1.30}
    rows = []
    for batch in args.batch_sizes:
        ours = [r for r in runs if r["batch"] == batch and r["config"] == "ltsearch"]
        for name in args.configs:
            mine = [r for r in runs if r["batch"] == batch and r["config"] == name]
            med = statistics.median(r["img_s"] for r in mine)
            ratios = per_rep_ratios(ours, mine, "img_s")
            ratio = f"{statistics.median(ratios):.3f}" if ratios and name != "ltsearch" else ""
            target = targets.get(name)
            verdict = "" if target is None or not ratio else f">= {target} {'met' if float(ratio) >= target else 'MISSED'}"
            rows.append([batch, name, spread(r["img_s"] for r in mine), f"{1000 * batch / med:.1f}",
                         f"{statistics.median(r['img_per_cpu_s'] for r in mine):.1f}",
                         (f"{max(r['peak_rss_mb'] for r in mine):.0f} "
                          f"({max(r['rss_after_imports_mb'] for r in mine):.0f}) / "
                          f"{max(r['worker_peak_rss_mb'] for r in mine):.0f}"), ratio, verdict])
    print("\n" + table(["batch", "config", "img/s median (min..max)", "ms/batch", "img per CPU-s",
                         "peak RSS MB main (after imports) / workers",
                         "ltsearch / config, median of per-rep ratios", "target"], rows))


if __name__ == "__main__":
    main()
