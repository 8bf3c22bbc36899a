"""How much faster is a search epoch with lazy test evaluation (`trainer.test_every`) than before it?

Method. One trial of the joint quick start this was measured on (now `benchmarks/gpu_check_space.yaml`; the
quick start became a staged search): CIFAR-10-LT IF 100 (12,386 train, 200 val, 10,000 test images),
ResNet-8, 4 stage-1 + 2 stage-2 epochs, batch 128, that file's base config (searched values at their
defaults), one torch thread (`cpus_per_worker: 1`). Each run is `python -m ltsearch train` in a fresh
process, from a clean export (`git archive`) of a committed revision, so uncommitted work in the tree does
not enter the timing:

  before  --before (default: the commit before `trainer.test_every` existed): val and test every epoch
  epoch   --after (default HEAD) with `trainer.test_every: epoch`: test every epoch (stage 2 already
          evaluates on features computed once)
  best    --after with `trainer.test_every: best` (the default): test at new best-validation epochs and
          stage ends

Runs are interleaved (before, epoch, best, before, ...), `--reps` times. The search-epoch time is a run's
mean `epoch_time_s` over its 6 epochs (metrics.json history: training plus evaluation, what an epoch of a
trial costs; excludes process start and data loading, which a reused Tune trial process pays once);
medians over repetitions, ratios as medians of the per-repetition ratios. On a shared machine wall times
swing with the other processes; the run's CPU seconds (user + system, from getrusage) hardly do, so their
ratio is reported too (it includes each run's start-up, ~the same in every arm, so it understates the
per-epoch ratio a little).

Command (docs/benchmarks.md, "Lazy test evaluation"; its second table adds --reps 1 --stage1-epochs 12
--stage2-epochs 4):

    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/lazy_test_eval.py --reps 3   # ~15 min idle
    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/lazy_test_eval.py --reps 1 --stage1-epochs 1 \\
        --stage2-epochs 1                                                               # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

import yaml
from common import interleaved, per_rep_ratios, read_metrics, run_command, spread, table, train_command

REPO = Path(__file__).resolve().parents[1]
ARMS = ("before", "epoch", "best")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def default_before() -> str:
    """The parent of the first commit whose config.py has `test_every`."""
    first = _git("log", "--reverse", "--format=%H", "-S", "test_every", "--", "ltsearch/config.py").splitlines()
    if not first:
        raise SystemExit("no commit adds trainer.test_every: pass --before")
    return _git("rev-parse", f"{first[0]}~1")


def export(rev: str, where: Path) -> Path:
    """A clean copy of `rev`'s tree (no .git, no working-tree changes)."""
    where.mkdir(parents=True)
    archive = where / "src.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    archive.unlink()
    return where


def quickstart_config(path: Path, args: argparse.Namespace) -> Path:
    base = yaml.safe_load((REPO / "benchmarks" / "gpu_check_space.yaml").read_text())["base"]
    base["stage1"]["epochs"], base["stage2"]["epochs"] = args.stage1_epochs, max(args.stage2_epochs, 1)
    base["stage2"]["enabled"] = args.stage2_epochs > 0
    base["data"]["download"] = False
    base.setdefault("trainer", {})["num_threads"] = args.threads
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def run(arm: str, tree: Path, config: Path, out: Path) -> dict:
    """One arm's `python -m ltsearch train` in the exported `tree`: its epoch times, wall and CPU seconds."""
    sets = [] if arm == "before" else [f"trainer.test_every={arm}"]
    finished = run_command(train_command(config, out, *sets), env={**os.environ, "PYTHONPATH": str(tree)},
                           cwd=tree)
    history = read_metrics(out)["history"]
    times = [h["epoch_time_s"] for h in history]
    by_stage = {s: [h["epoch_time_s"] for h in history if h["stage"] == s] for s in (1, 2)}
    return {"arm": arm, "epoch_s": statistics.mean(times), "stage1_s": statistics.mean(by_stage[1]),
            "stage2_s": statistics.mean(by_stage[2]) if by_stage[2] else float("nan"), "wall_s": finished.wall_s,
            "cpu_s": finished.cpu_s,
            "test_epochs": sum(h.get("has_test", True) for h in history), "epochs": len(history),
            "val_acc": [round(h["val_acc"], 1) for h in history],
            "test_acc": history[-1]["test_acc"]}


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the three arms")
    parser.add_argument("--before", help="revision without lazy evaluation (default: see above)")
    parser.add_argument("--after", default="HEAD", help="revision with trainer.test_every (default HEAD)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--stage1-epochs", type=int, default=4)
    parser.add_argument("--stage2-epochs", type=int, default=2, help="0: stage 2 off")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a quick-start trial: 1)")
    parser.add_argument("--json", help="also write every run to this file")
    args = parser.parse_args()
    before = args.before or default_before()
    revs = {"before": _git("rev-parse", "--short", before), "after": _git("rev-parse", "--short", args.after)}
    print(f"before = {revs['before']}, after = {revs['after']}; {args.stage1_epochs} + {args.stage2_epochs} "
          f"epochs, {args.threads} thread(s), {args.reps} interleaved reps; load average {load_average()}",
          flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lazy-test-eval-") as tmp:
        tmp = Path(tmp)
        trees = {"before": export(before, tmp / "before")} if "before" in args.arms else {}
        if {"epoch", "best"} & set(args.arms):
            trees["after"] = export(args.after, tmp / "after")
        config = quickstart_config(tmp / "quickstart_trial.yaml", args)
        for rep, arm in interleaved(args.reps, args.arms):
            tree = trees["before" if arm == "before" else "after"]
            result = {**run(arm, tree, config, tmp / f"{arm}-{rep}"), "rep": rep, "load": load_average()}
            runs.append(result)
            print(f"  rep {rep} {arm:6s} epoch {result['epoch_s']:6.2f} s (stage 1 {result['stage1_s']:6.2f}, "
                  f"stage 2 {result['stage2_s']:6.2f}), wall {result['wall_s']:6.1f} s, CPU {result['cpu_s']:6.1f} s, "
                  f"test evaluated at {result['test_epochs']}/{result['epochs']} epochs, val {result['val_acc']}, "
                  f"final test {result['test_acc']:.2f}; load {result['load']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))

    rows = []
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]

        def ratio(ref: str, key: str = "epoch_s", arm=arm, mine=mine) -> str:
            paired = per_rep_ratios([r for r in runs if r["arm"] == ref], mine, key)
            return f"{statistics.median(paired):.2f}x" if paired and ref != arm else ""

        rows.append([arm, spread((r["epoch_s"] for r in mine), ".2f"),
                     f"{statistics.median(r['stage1_s'] for r in mine):.2f}",
                     f"{statistics.median(r['stage2_s'] for r in mine):.2f}",
                     f"{statistics.median(r['wall_s'] for r in mine):.1f}",
                     f"{statistics.median(r['cpu_s'] for r in mine):.1f}",
                     f"{'/'.join(sorted({str(r['test_epochs']) for r in mine}))} of {mine[0]['epochs']}",
                     ratio("before"), ratio("epoch"), ratio("before", "cpu_s")])
    print("\n" + table(["arm", "search epoch s, median (min..max)", "stage-1 epoch s", "stage-2 epoch s", "run wall s",
                         "run CPU s", "test evaluated (epochs)", "epoch speed-up vs before", "vs epoch",
                         "run CPU vs before"], rows))
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
