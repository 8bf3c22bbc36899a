"""Does ASHA + Optuna (run_search.py) find a stage-1 weight decay as good as an exhaustive grid's in fewer
epochs?

Method. CIFAR-10-LT IF 100, ResNet-8, 6 stage-1 epochs (batch 128, lr 0.1), stage 2 disabled.
  grid    8 log-spaced weight decays in [1e-4, 2e-2], each trained fully with `python -m ltsearch train`
          (one after another, 2 threads): 48 epochs in all
  search  `run_search.py`: stage1.weight_decay loguniform [1e-4, 2e-2], TPE (seed 0, 4 random start-up
          trials), ASHA (grace 1, reduction 3, on the epoch), `--trials` trials, 1 CPU each, 2 concurrent
Result: the fraction of the grid's 48 epochs that the search had used, counting the epochs of `history.csv`
trial by trial in trial start order, when one of its epochs first reached a validation accuracy within 1
point of the grid's best (best epoch of the best grid run). Target: at most 40 %.
Validation is 100 images per class (1,000 in all, disjoint from train; the head class keeps 4,900): 1 point
is 10 images. Runs already in --work are reused, not rerun.

Command (docs/benchmarks.md, section 5):

    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/search_efficiency.py --work /tmp/b5   # ~60 min here
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import private_ray_env, read_metrics, run_command, search_command, train_command, trial_spans

BASE = {"data": {"dataset": "cifar10", "imbalance_factor": 100, "val_per_class": 100}, "model": {"name": "resnet8"},
        "stage1": {"epochs": 6, "batch_size": 128, "lr": 0.1}, "stage2": {"enabled": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--low", type=float, default=1e-4)
    parser.add_argument("--high", type=float, default=2e-2)
    parser.add_argument("--grid", type=int, default=8, help="grid points (log-spaced)")
    parser.add_argument("--trials", type=int, default=12, help="search trials")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points of validation accuracy")
    parser.add_argument("--work", help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    env = private_ray_env()
    work = Path(args.work or tempfile.mkdtemp(prefix="ltbench-eff-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    config = work / "base.yaml"
    config.write_text(yaml.safe_dump(BASE))

    grid = []
    started = time.perf_counter()
    for wd in np.geomspace(args.low, args.high, args.grid):
        out = work / f"grid-{wd:.2e}"
        if not (out / "metrics.json").exists():
            run_command(train_command(config, out, f"stage1.weight_decay={wd:.6g}"), env=env)
        history = read_metrics(out)["history"]
        grid.append({"wd": wd, "best_val_acc": max(h["val_acc"] for h in history), "epochs": len(history)})
        print(f"  grid wd {wd:.2e}: best val_acc {grid[-1]['best_val_acc']:.1f}", flush=True)
    grid_wall = time.perf_counter() - started
    grid_epochs = sum(g["epochs"] for g in grid)
    grid_best = max(g["best_val_acc"] for g in grid)

    spec = {"base": BASE, "space": {"stage1.weight_decay": {"loguniform": [args.low, args.high]}},
            "search": {"num_samples": args.trials, "metric": "val_acc", "direction": "max",
                       "scheduler": {"grace_period": 1, "reduction_factor": 3},
                       "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 4},
                       "resources": {"num_workers": 1, "cpus_per_worker": 1}}}
    space = work / "search.yaml"
    space.write_text(yaml.safe_dump(spec))
    started = time.perf_counter()
    if not (work / "search" / "history.csv").exists():
        run_command(search_command(space, work, "search"), env=env)
    search_wall = time.perf_counter() - started

    history = pd.read_csv(work / "search" / "history.csv")
    history["start"] = history["trial_id"].map(trial_spans(history)["start"])
    history = history.sort_values(["start", "trial_id", "epoch"]).reset_index(drop=True)
    history["cumulative_epochs"] = np.arange(1, len(history) + 1)
    reached = history[history["val_acc"] >= grid_best - args.tolerance]
    search_best = history["val_acc"].max()
    print(f"\ngrid: {args.grid} runs, {grid_epochs} epochs, best val_acc {grid_best:.1f}, {grid_wall:.0f} s")
    print(f"search: {history['trial_id'].nunique()} trials, {len(history)} epochs, best val_acc {search_best:.1f}, "
          f"{search_wall:.0f} s")
    if len(reached):
        needed = int(reached["cumulative_epochs"].iloc[0])
        print(f"search reached {reached['val_acc'].iloc[0]:.1f} (within {args.tolerance} of {grid_best:.1f}) after "
              f"{needed} epochs = {needed / grid_epochs:.0%} of the grid's {grid_epochs} (target <= 40 %)")
    else:
        print(f"search never came within {args.tolerance} point of the grid's best ({len(history)} epochs used = "
              f"{len(history) / grid_epochs:.0%} of the grid's)")
    print(f"all search epochs: {len(history)} = {len(history) / grid_epochs:.0%} of the grid's; wall "
          f"{search_wall / grid_wall:.2f}x the grid's")


if __name__ == "__main__":
    main()
