"""How much cheaper is a search epoch with lazy test evaluation (`trainer.test_every`) than with test every epoch?

Method. One trial of a search space's base config (searched values at their defaults), as the search's
trials run it: `--space` (default `benchmarks/gpu_check_space.yaml`, the joint quick start of old:
CIFAR-10-LT IF 100, 12,386 train, 200 val, 10,000 test images, ResNet-8, 4 + 2 epochs; a staged space such as
`search_spaces/quickstart.yaml` gives its stage-1 phase's trial, stage 2 off), one torch thread
(`cpus_per_worker: 1`), `--stage1-epochs` / `--stage2-epochs` to change the schedule. Each run is
`python -m ltsearch train` in a fresh process, from a clean export (`git archive`) of a committed revision,
so uncommitted work in the tree does not enter the timing:

  before  --before (default: the commit before `trainer.test_every` existed): val and test every epoch
  epoch   --after (default HEAD) with `trainer.test_every: epoch`: test every epoch (stage 2 already
          evaluates on features computed once)
  best    --after with `trainer.test_every: best`: test at new best-validation epochs and stage ends
  rungs   --after with `trainer.test_every: rungs` at the rungs a search passes (ASHA's, from the space's
          `search.scheduler` and the trial's epochs; none without ASHA): test at the rungs and stage ends,
          and a stage's best epoch evaluated from its kept model at the stage's end when it had none

Runs are interleaved (before, epoch, best, rungs, before, ...), `--reps` times. A run's search-epoch time is its mean
`epoch_time_s` (metrics.json history: training plus evaluation, the stage-end evaluation of the best epoch
included; excludes process start and data loading, which a reused Tune trial process pays once). Under ASHA
most trials stop at the first rungs, so the table also gives the ASHA-weighted mean: epoch e weighted by
reduction_factor ** -(rungs before e), the share of trials synchronous ASHA still runs at e (a stopped trial's
epochs cost what the full run's first epochs cost: where test runs does not depend on later epochs). Medians
over repetitions, ratios as medians of the per-repetition ratios. On a shared machine wall times swing with
the other processes; the run's CPU seconds (user + system, from getrusage) hardly do, so their ratio is
reported too (it includes each run's start-up, ~the same in every arm, so it understates the per-epoch ratio a
little). Every arm is checked against `epoch` for what a search selects on and reports: the same validation
accuracy at every epoch (so ASHA and Optuna decide alike), the same best epoch per stage, and the same test
figures at it (the summary's best metrics).

Commands (docs/benchmarks.md, "Lazy test evaluation"):

    LTSEARCH_DATA=/tmp/c10data .venv/bin/python benchmarks/lazy_test_eval.py --space search_spaces/quickstart.yaml \
        --arms epoch best rungs --reps 2                                   # the quick start's stage 1, ~8 min
    LTSEARCH_DATA=/tmp/c10data .venv/bin/python benchmarks/lazy_test_eval.py --stage1-epochs 12 --stage2-epochs 4 \
        --arms epoch best rungs --reps 2                                   # a 12 + 4 joint search's trial, ~14 min
    LTSEARCH_DATA=/tmp/c10data .venv/bin/python benchmarks/lazy_test_eval.py --reps 1 --stage1-epochs 1 \
        --stage2-epochs 1                                                  # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml
from common import interleaved, per_rep_ratios, read_metrics, run_command, spread, table, train_command

REPO = Path(__file__).resolve().parents[1]
ARMS = ("before", "epoch", "best", "rungs")


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


def trial_config(path: Path, args: argparse.Namespace) -> tuple[Path, list[int], float]:
    """The trial config a search of `args.space` runs (written to `path`), the rungs it passes its trials
    (`ltsearch.search.lazy_test.asha_rungs` on the trial's epochs) and ASHA's reduction factor (1: no ASHA)."""
    sys.path.insert(0, str(REPO))
    from ltsearch.search.lazy_test import asha_rungs
    from ltsearch.space import Scheduler

    space = yaml.safe_load(Path(args.space).read_text())
    base, search = space["base"], space.get("search", {})
    stage1 = args.stage1_epochs or base["stage1"].get("epochs", 200)
    stage2 = 0 if search.get("mode") == "staged" else (
        args.stage2_epochs if args.stage2_epochs is not None else
        base.get("stage2", {}).get("epochs", 10) if base.get("stage2", {}).get("enabled", True) else 0)
    base["stage1"]["epochs"] = stage1
    base.setdefault("stage2", {}).update(epochs=max(stage2, 1), enabled=stage2 > 0)
    base["data"]["download"] = False
    base.setdefault("trainer", {})["num_threads"] = args.threads
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    scheduler = Scheduler.model_validate(search.get("scheduler", {}))
    return path, asha_rungs(scheduler, stage1 + stage2), scheduler.reduction_factor if scheduler.enabled else 1.0


def asha_weights(epochs: int, rungs: list[int], factor: float) -> list[float]:
    """Per epoch 1..epochs, the share of trials synchronous ASHA still runs there: factor ** -(rungs before it)."""
    return [factor ** -sum(r < e for r in rungs) for e in range(1, epochs + 1)]


def test_figures(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("test_", "tau_test_"))}


def run(arm: str, tree: Path, config: Path, out: Path, rungs: list[int], factor: float) -> dict:
    """One arm's `python -m ltsearch train` in the exported `tree`: its epoch times, wall and CPU seconds, and
    what a search reads of it (validation per epoch, each stage's best epoch and its test figures)."""
    sets = {"before": [], "rungs": ["trainer.test_every=rungs", f"trainer.test_epochs={rungs}"]}.get(
        arm, [f"trainer.test_every={arm}"])
    finished = run_command(train_command(config, out, *sets), env={**os.environ, "PYTHONPATH": str(tree)},
                           cwd=tree)
    summary = read_metrics(out)
    history = summary["history"]
    times = [h["epoch_time_s"] for h in history]
    by_stage = {s: [h["epoch_time_s"] for h in history if h["stage"] == s] for s in (1, 2)}
    weights = asha_weights(len(times), rungs, factor)
    return {"arm": arm, "epoch_s": statistics.mean(times), "stage1_s": statistics.mean(by_stage[1]),
            "stage2_s": statistics.mean(by_stage[2]) if by_stage[2] else float("nan"),
            "asha_s": sum(w * t for w, t in zip(weights, times)) / sum(weights),
            "wall_s": finished.wall_s, "cpu_s": finished.cpu_s,
            "test_epochs": sum(h.get("has_test", True) for h in history), "epochs": len(history),
            "recomputed": sum("best_test_acc" in h for h in history),
            "val_acc": [round(h["val_acc"], 1) for h in history], "exact_val": [h["val_acc"] for h in history],
            "best": {s: (summary[f"stage{s}"]["best_epoch"], test_figures(summary[f"stage{s}"]["best"]))
                     for s in (1, 2) if f"stage{s}" in summary},
            "test_acc": history[-1]["test_acc"]}


def same_choices(run: dict, reference: dict) -> bool:
    """Whether `run` gives a search what `reference` gives it: validation at every epoch, each stage's best
    epoch and its test figures."""
    return run["exact_val"] == reference["exact_val"] and run["best"] == reference["best"]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the arms")
    parser.add_argument("--before", help="revision without lazy evaluation (default: see above)")
    parser.add_argument("--after", default="HEAD", help="revision with trainer.test_every (default HEAD)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--space", default=str(REPO / "benchmarks" / "gpu_check_space.yaml"),
                        help="search space whose base config a trial runs (a staged one: its stage-1 phase)")
    parser.add_argument("--stage1-epochs", type=int, help="default: the space's")
    parser.add_argument("--stage2-epochs", type=int, help="default: the space's; 0: stage 2 off")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a quick-start trial: 1)")
    parser.add_argument("--json", help="also write every run to this file")
    args = parser.parse_args()
    before = (args.before or default_before()) if "before" in args.arms else args.after
    revs = {"before": _git("rev-parse", "--short", before), "after": _git("rev-parse", "--short", args.after)}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lazy-test-eval-") as tmp:
        tmp = Path(tmp)
        config, rungs, factor = trial_config(tmp / "trial.yaml", args)
        schedule = yaml.safe_load(config.read_text())
        epochs = (schedule["stage1"]["epochs"], schedule["stage2"]["epochs"] if schedule["stage2"]["enabled"] else 0)
        print(f"before = {revs['before']}, after = {revs['after']}; {args.space}: {epochs[0]} + {epochs[1]} epochs, "
              f"rungs {rungs} (reduction factor {factor:g}), {args.threads} thread(s), {args.reps} interleaved reps; "
              f"load average {load_average()}", flush=True)
        trees = {"before": export(before, tmp / "before")} if "before" in args.arms else {}
        if {"epoch", "best", "rungs"} & set(args.arms):
            trees["after"] = export(args.after, tmp / "after")
        for rep, arm in interleaved(args.reps, args.arms):
            tree = trees["before" if arm == "before" else "after"]
            result = {**run(arm, tree, config, tmp / f"{arm}-{rep}", rungs, factor), "rep": rep,
                      "load": load_average()}
            runs.append(result)
            print(f"  rep {rep} {arm:6s} epoch {result['epoch_s']:6.2f} s (stage 1 {result['stage1_s']:6.2f}, "
                  f"stage 2 {result['stage2_s']:6.2f}, ASHA-weighted {result['asha_s']:6.2f}), wall "
                  f"{result['wall_s']:6.1f} s, CPU {result['cpu_s']:6.1f} s, test evaluated at "
                  f"{result['test_epochs']}/{result['epochs']} epochs (+{result['recomputed']} best epochs at "
                  f"stage ends), val {result['val_acc']}, best epochs and their test acc "
                  f"{ {s: (e, round(t.get('test_acc', float('nan')), 2)) for s, (e, t) in result['best'].items()} }, "
                  f"final test {result['test_acc']:.2f}; load {result['load']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))

    rows = []
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]

        def ratio(ref: str, key: str = "epoch_s", arm=arm, mine=mine) -> str:
            paired = per_rep_ratios([r for r in runs if r["arm"] == ref], mine, key)
            return f"{statistics.median(paired):.2f}x" if paired and ref != arm else ""

        references = {r["rep"]: r for r in runs if r["arm"] == "epoch"}
        passes = (f"{'/'.join(sorted({str(r['test_epochs']) for r in mine}))} of {mine[0]['epochs']} + "
                  f"{'/'.join(sorted({str(r['recomputed']) for r in mine}))}")
        same = [same_choices(r, references[r["rep"]]) for r in mine if r["rep"] in references]
        rows.append([arm, spread((r["epoch_s"] for r in mine), ".2f"), spread((r["asha_s"] for r in mine), ".2f"),
                     f"{statistics.median(r['stage1_s'] for r in mine):.2f}",
                     f"{statistics.median(r['stage2_s'] for r in mine):.2f}",
                     f"{statistics.median(r['cpu_s'] for r in mine):.1f}",
                     passes, ratio("epoch"), ratio("epoch", "asha_s"), ratio("epoch", "cpu_s"), ratio("before"),
                     ("yes" if all(same) else "NO") if same and arm not in ("epoch", "before") else ""])
    print("\n" + table(["arm", "search epoch s, median (min..max)", "ASHA-weighted epoch s", "stage-1 epoch s",
                         "stage-2 epoch s", "run CPU s", "test passes (epochs + stage-end best epochs)",
                         "epoch speed-up vs epoch", "ASHA-weighted vs epoch", "run CPU vs epoch", "vs before",
                         "same val, best epochs, their test figures as epoch"], rows))
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
