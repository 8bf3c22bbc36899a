"""Training throughput (images/s) of ltsearch's stage-1 step path against two alternatives.

Compared, for ResNet-32 with 100 classes on 3x32x32 images (CIFAR-100-LT IF 100 shapes: 10,827 synthetic
uint8 images with the long-tailed class counts), batch 64 and 128, the same model, SGD and loss step as
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

Every measurement runs in a fresh subprocess (so peak RSS is per configuration): warm-up steps, then
`--steps` timed steps. Repetitions are interleaved (A, B, C, ... A, B, C, ...) and medians reported.
Targets: ltsearch >= 0.95x compute_cl (within 5% of the compute limit);
         ltsearch >= 1.3x torchvision_w0 and torchvision_w2 (and original_w0).

    .venv/bin/python benchmarks/trainer_throughput.py                 # ~25 min on the 2-core machine
    .venv/bin/python benchmarks/trainer_throughput.py --steps 30 --reps 1 --batch-sizes 64   # smoke test
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

CONFIGS = ("ltsearch", "compute_cl", "compute_fp32", "torchvision_w0", "torchvision_w2", "original_w0",
           "ltsearch_data", "torchvision_w0_data")


def synthetic_cifar100_lt(seed: int = 0):
    """uint8 images (N, 3, 32, 32) and labels with CIFAR-100-LT IF 100 train counts (val's 20 removed)."""
    import torch

    from ltsearch.data import lt_class_counts

    counts = [min(n, 480) for n in lt_class_counts(500, 100, 100.0)]
    y = torch.repeat_interleave(torch.arange(100), torch.tensor(counts))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (len(y), 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, y, counts


def batches(name: str, x, y, batch: int):
    """An endless iterator of (images, labels) for configuration `name`."""
    import torch

    from ltsearch.data import MEAN, STD, TensorLoader

    mean, std = MEAN["cifar100"], STD["cifar100"]
    if name == "ltsearch":
        loader = TensorLoader(x, y, batch, mean, std, train=True, seed=0, channels_last=True)
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1
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
    x, y, counts = synthetic_cifar100_lt()
    data_only = name.endswith("_data")
    data = batches(name.removesuffix("_data"), x, y, batch)
    fmt = torch.contiguous_format if name in ("compute_fp32", "original_w0") else torch.channels_last
    model = build_model(model_name, 100).to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(weight_decay_groups(model, 5e-3), lr=0.01, momentum=0.9)
    loss_fn = build_loss("ce", counts)
    total = warmup + steps
    loss_sum = torch.zeros((), dtype=torch.float64)
    me = psutil.Process()
    for i in range(total):
        if i == warmup:
            started, cpu0 = time.perf_counter(), me.cpu_times()
            child_cpu0 = sum(c.cpu_times().user + c.cpu_times().system for c in me.children())
        xb, yb = next(data)
        if name.startswith("torchvision"):  # the model's memory format, as TensorLoader yields it
            xb = xb.contiguous(memory_format=torch.channels_last)
        if data_only:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = loss_fn(model(xb).float(), yb)
        sgd_step(optimizer, loss, cosine_lr(i, total, 0, 0.01))
        loss_sum += loss.detach().double()
    elapsed, cpu1 = time.perf_counter() - started, me.cpu_times()
    workers = me.children()  # DataLoader workers (none for the tensor paths)
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system
           + sum(c.cpu_times().user + c.cpu_times().system for c in workers) - child_cpu0)
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.steps, args.warmup, args.threads, args.model,
                                 args.precision)))
        return

    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {args.model}, 100 classes, "
          f"{args.steps} timed steps after {args.warmup}, {args.reps} interleaved reps", flush=True)
    runs: list[dict] = []
    for rep in range(args.reps):
        for batch in args.batch_sizes:
            for name in args.configs:
                cmd = [sys.executable, __file__, "--child", name, "--batch", str(batch), "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--model", args.model]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                out["rep"] = rep
                out["model"] = args.model
                runs.append(out)
                print(f"  rep {rep} batch {batch:4d} {name:15s} {out['img_s']:7.1f} img/s  "
                      f"peak RSS {out['peak_rss_mb']:.0f} MB (workers {out['worker_peak_rss_mb']:.0f} MB)",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)

    targets = {"compute_cl": 0.95, "torchvision_w0": 1.30, "torchvision_w2": 1.30, "original_w0": 1.30}
    print("\n| batch | config | img/s median (min..max) | ms/batch | img per CPU-s | peak RSS MB main (after imports) "
          "/ workers | ltsearch / config, median of per-rep ratios | target |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        for name in args.configs:
            mine = [r for r in runs if r["batch"] == batch and r["config"] == name]
            rates = [r["img_s"] for r in mine]
            med = statistics.median(rates)
            paired = [a["img_s"] / b["img_s"] for a in runs for b in mine
                      if a["batch"] == batch and a["rep"] == b["rep"] and a["config"] == "ltsearch"]
            ratio = f"{statistics.median(paired):.3f}" if paired and name != "ltsearch" else ""
            target = targets.get(name)
            verdict = "" if target is None or not ratio else f">= {target} {'met' if float(ratio) >= target else 'MISSED'}"
            print(f"| {batch} | {name} | {med:.1f} ({min(rates):.1f}..{max(rates):.1f}) | {1000 * batch / med:.1f} | "
                  f"{statistics.median(r['img_per_cpu_s'] for r in mine):.1f} | "
                  f"{max(r['peak_rss_mb'] for r in mine):.0f} ({max(r['rss_after_imports_mb'] for r in mine):.0f}) / "
                  f"{max(r['worker_peak_rss_mb'] for r in mine):.0f} | {ratio} | {verdict} |")


if __name__ == "__main__":
    main()
