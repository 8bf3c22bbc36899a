"""bf16 against fp32 on the CPU: training throughput and accuracy parity (`trainer.precision`).

    throughput  images/s of the trainer's step path (`trainer_throughput.py`'s `ltsearch` configuration:
                TensorLoader, channels_last model, CE, SGD) for ResNet-8/20/32 in fp32 and under bf16
                autocast, each measurement a fresh process, repetitions interleaved
                (rep 0: r8 fp32, r8 bf16, r20 fp32, ... rep 1: ...), medians of per-rep bf16/fp32 ratios.
    parity      `python -m ltsearch train` on real CIFAR-10-LT (IF 100) with one short schedule, seeds 0-3,
                fp32 and bf16: test accuracy at the epoch chosen on validation and at the last epoch.

Decision rule (issue "Faster searches"): bf16 becomes the CPU default if it is >= 1.3x faster and its accuracy
lies within the fp32 seed spread.

    .venv/bin/python benchmarks/precision.py throughput --threads 1            # ~6 min here
    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/precision.py parity --out runs/precision   # ~45 min on one core
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("resnet8", "resnet20", "resnet32")
PRECISIONS = ("fp32", "bf16")


def throughput(args: argparse.Namespace) -> None:
    import torch

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}, {args.reps} interleaved reps", flush=True)
    runs = []
    for rep in range(args.reps):
        for model in args.models:
            for precision in PRECISIONS:
                cmd = [sys.executable, str(HERE / "trainer_throughput.py"), "--child", "ltsearch", "--batch",
                       str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
                       str(args.threads), "--model", model, "--precision", precision]
                out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                runs.append({**out, "rep": rep, "model": model})
                print(f"  rep {rep} {model:9s} {precision} {out['img_s']:7.1f} img/s", flush=True)
    print("\n| model | fp32 img/s (median) | bf16 img/s (median) | bf16 / fp32, median of per-rep ratios (min..max) |")
    print("| --- | --- | --- | --- |")
    for model in args.models:
        rate = {p: {r["rep"]: r["img_s"] for r in runs if r["model"] == model and r["precision"] == p}
                for p in PRECISIONS}
        ratios = [rate["bf16"][rep] / rate["fp32"][rep] for rep in rate["fp32"]]
        print(f"| {model} | {statistics.median(rate['fp32'].values()):.0f} | "
              f"{statistics.median(rate['bf16'].values()):.0f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f}) |")


def parity(args: argparse.Namespace) -> None:
    if not os.environ.get("LTSEARCH_DATA"):
        sys.exit("parity: set LTSEARCH_DATA to the folder holding cifar-10-batches-py/")
    rows = []
    for seed in args.seeds:
        for precision in PRECISIONS:
            out = args.out / f"{precision}_seed{seed}"
            if not (out / "metrics.json").exists():
                cmd = [sys.executable, "-m", "ltsearch", "train", str(args.config), "--out", str(out),
                       "--set", f"data.root={os.environ['LTSEARCH_DATA']}", "--set", f"trainer.seed={seed}",
                       "--set", f"trainer.precision={precision}", "--set", f"trainer.num_threads={args.threads}"]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            summary = json.loads((out / "metrics.json").read_text())
            metrics = summary["stage1"]
            epoch_s = statistics.median(h["epoch_time_s"] for h in summary["history"])
            rows.append((seed, precision, metrics["best_epoch"], metrics["best"]["test_acc"],
                         metrics["final"]["test_acc"], epoch_s))
    print(f"\n{args.config}, {args.threads} thread(s)")
    print("| seed | precision | epoch chosen on val | test acc at it | test acc, last epoch | median epoch s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, precision, epoch, best, last, epoch_s in rows:
        print(f"| {seed} | {precision} | {epoch} | {best:.2f} | {last:.2f} | {epoch_s:.1f} |")
    for precision in PRECISIONS:
        last = [r[4] for r in rows if r[1] == precision]
        print(f"{precision}: last-epoch test acc {min(last):.2f}..{max(last):.2f} over seeds {args.seeds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("throughput")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.set_defaults(func=throughput)
    p = commands.add_parser("parity")
    p.add_argument("--config", type=Path, default=HERE / "precision_parity.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="one run folder per seed and precision (kept: rerun resumes)")
    p.set_defaults(func=parity)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
