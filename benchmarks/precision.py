"""Does bf16 autocast train faster than fp32 on this CPU, and at the same accuracy (`trainer.precision`)?

Method.
    throughput  images/s of the trainer's step path (`trainer_throughput.py`'s `ltsearch` configuration and
                its `measure`: TensorLoader, channels_last model, CE, SGD) for ResNet-8/20/32 in fp32 and
                under bf16 autocast, each measurement a fresh process, repetitions interleaved
                (rep 0: r8 fp32, r8 bf16, r20 fp32, ... rep 1: ...), medians of per-rep bf16/fp32 ratios.
    parity      `python -m ltsearch train` on real CIFAR-10-LT (IF 100) with one short schedule, seeds 0-3,
                fp32 and bf16: test accuracy at the epoch chosen on validation and at the last epoch.

Decision rule (issue "Faster searches"): bf16 becomes the CPU default if it is >= 1.3x faster and its accuracy
lies within the fp32 seed spread.

Commands (docs/benchmarks.md, "bf16 on the CPU"):

    .venv/bin/python benchmarks/precision.py throughput --threads 1            # ~6 min here
    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/precision.py parity --out runs/precision --seeds 0 1 2 3
                                                                               # ~45 min on one core
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from itertools import product
from pathlib import Path

from common import in_fresh_process, interleaved, per_rep_ratios, read_metrics, spread, table, train_command
from trainer_throughput import measure

HERE = Path(__file__).resolve().parent
MODELS = ("resnet8", "resnet20", "resnet32")
PRECISIONS = ("fp32", "bf16")


def throughput(args: argparse.Namespace) -> None:
    import torch

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup}, {args.reps} interleaved reps", flush=True)
    runs = []
    for rep, (model, precision) in interleaved(args.reps, product(args.models, PRECISIONS)):
        out = in_fresh_process(measure, name="ltsearch", batch=args.batch, steps=args.steps, warmup=args.warmup,
                               threads=args.threads, model_name=model, precision=precision)
        runs.append({**out, "rep": rep, "model": model})
        print(f"  rep {rep} {model:9s} {precision} {out['img_s']:7.1f} img/s", flush=True)
    rows = []
    for model in args.models:
        fp32, bf16 = ([r for r in runs if r["model"] == model and r["precision"] == p] for p in PRECISIONS)
        rows.append([model, f"{statistics.median(r['img_s'] for r in fp32):.0f}",
                     f"{statistics.median(r['img_s'] for r in bf16):.0f}",
                     spread(per_rep_ratios(bf16, fp32, "img_s"), ".2f")])
    print("\n" + table(["model", "fp32 img/s (median)", "bf16 img/s (median)",
                         "bf16 / fp32, median of per-rep ratios (min..max)"], rows))


def parity(args: argparse.Namespace) -> None:
    if not os.environ.get("LTSEARCH_DATA"):
        sys.exit("parity: set LTSEARCH_DATA to the folder holding cifar-10-batches-py/")
    rows = []
    for seed in args.seeds:
        for precision in PRECISIONS:
            out = args.out / f"{precision}_seed{seed}"
            if not (out / "metrics.json").exists():
                cmd = train_command(args.config, out, f"data.root={os.environ['LTSEARCH_DATA']}",
                                    f"trainer.seed={seed}", f"trainer.precision={precision}",
                                    f"trainer.num_threads={args.threads}")
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            summary = read_metrics(out)
            metrics = summary["stage1"]
            epoch_s = statistics.median(h["epoch_time_s"] for h in summary["history"])
            rows.append((seed, precision, metrics["best_epoch"], metrics["best"]["test_acc"],
                         metrics["final"]["test_acc"], epoch_s))
    print(f"\n{args.config}, {args.threads} thread(s)")
    print(table(["seed", "precision", "epoch chosen on val", "test acc at it", "test acc, last epoch",
                 "median epoch s"],
                ([seed, precision, epoch, f"{best:.2f}", f"{last:.2f}", f"{epoch_s:.1f}"]
                 for seed, precision, epoch, best, last, epoch_s in rows)))
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
