"""Train the standard rows' extra seeds and commit each finished run the moment it finishes.

A row is a committed seed-0 run, docs/standard/ROW/config.yaml. Seed s trains that same config with
`trainer.seed=s` (model initialisation, batch order, augmentation; the long-tailed subset and the validation
images stay those of seed 0) into RUNS/ROW_seed{s}, and its `metrics.json` and `config.yaml` are committed to
docs/standard/ROW_seed{s}/ as soon as it ends. After `wb_wd5e-3` seed s, the weight-balancing stage 2 is searched
on it (`search_spaces/standard/wb_stage2_c10lt.yaml` with trainer and sampler seed s) and committed to
docs/standard/wb_stage2_c10lt_seed{s}/.

Nothing is lost when this stops: a committed run is skipped, a run folder holding a checkpoint continues from it
(`--resume`; batches are seeded by (seed, epoch), so it sees what an uninterrupted run sees), and an interrupted
stage-2 search resumes. A stage 2 whose stage-1 checkpoint is gone (RUNS is not kept between machines) is
reported, not run: its stage 1 has to be trained again.

    python benchmarks/standard_seeds.py --seeds 1 2 --parallel 2     # 143 min per pair of runs here
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANDARD = REPO / "docs" / "standard"
ROWS = ("wb_wd5e-3", "wb_wd0", "ce_step_a", "ldam_drw", "logit_adjusted")  # the order they are trained in
STAGE2_OF = {"wb_wd5e-3": "wb_stage2_c10lt"}  # the stage-2 search row run on a finished stage-1 row
STAGE2_FILES = ("results.csv", "best_config.yaml", "summary.json", "space.yaml")


@dataclass
class Job:
    name: str  # ROW_seed{s}: the run folder under RUNS and the committed folder under docs/standard
    command: list[str]
    out: Path
    files: tuple[str, ...]


def train_job(row: str, seed: int, runs: Path) -> Job:
    out = runs / f"{row}_seed{seed}"
    command = [sys.executable, "-m", "ltsearch", "train", str(STANDARD / row / "config.yaml"),
               "--set", f"trainer.seed={seed}", "--out", str(out)]
    if (out / "checkpoint").exists():
        command.append("--resume")
    return Job(out.name, command, out, ("metrics.json", "config.yaml"))


def stage2_job(row: str, seed: int, runs: Path) -> Job | None:
    stage1 = runs / f"{row}_seed{seed}"
    name = f"{STAGE2_OF[row]}_seed{seed}"
    if not (stage1 / "checkpoint").exists():
        print(f"{name}: not run: its stage 1 ({stage1}) is committed but its checkpoint is gone; train "
              f"{row} seed {seed} again (remove docs/standard/{stage1.name}) to search its stage 2", flush=True)
        return None
    command = [sys.executable, str(REPO / "run_search.py"), str(REPO / "search_spaces/standard/wb_stage2_c10lt.yaml"),
               "--storage", str(runs), "--name", name, "--set", f"search.staged.stage1_run={stage1}",
               "--set", f"trainer.seed={seed}", "--set", f"search.sampler.seed={seed}"]
    if (runs / name).exists():
        command.append("--resume")
    return Job(name, command, runs / name, STAGE2_FILES)


def committed(name: str, files: tuple[str, ...]) -> bool:
    return all((STANDARD / name / f).is_file() for f in files)


def commit(job: Job, minutes: float) -> None:
    dest = STANDARD / job.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in job.files:
        shutil.copy2(job.out / f, dest / f)
    resumed = ", resumed: the time of this part only" if "--resume" in job.command else ""
    message = f"docs/standard: {job.name} finished ({minutes:.0f} min here{resumed})"
    if "metrics.json" in job.files:
        stage1 = json.loads((dest / "metrics.json").read_text())["stage1"]
        message += (f": test {stage1['best']['test_acc']:.2f} at its val-selected epoch {stage1['best_epoch']}, "
                    f"{stage1['final']['test_acc']:.2f} final")
    subprocess.run(["git", "add", "--", str(dest)], cwd=REPO, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", str(dest)], cwd=REPO, check=True)
    print(message, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--parallel", type=int, default=2, help="runs side by side (one thread each)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "standard")
    args = parser.parse_args()
    args.runs = args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)

    queue: list[Job] = []
    for seed in args.seeds:
        for row in args.rows:
            job = train_job(row, seed, args.runs)
            if not committed(job.name, job.files):
                queue.append(job)
            elif row in STAGE2_OF and not committed(f"{STAGE2_OF[row]}_seed{seed}", STAGE2_FILES):
                queue += [j for j in [stage2_job(row, seed, args.runs)] if j]
    print(f"{len(queue)} runs to do: {', '.join(j.name for j in queue) or 'none'}", flush=True)

    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    failed = []
    while queue or running:
        while queue and len(running) < args.parallel:
            job = queue.pop(0)
            log = args.runs / f"{job.name}.log"
            print(f"start {job.name}{' (resumed)' if '--resume' in job.command else ''}: log {log}", flush=True)
            with open(log, "a") as out:  # the child keeps its own handle
                process = subprocess.Popen(job.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            running[job.name] = (job, process, time.monotonic())
        time.sleep(20)
        for name, (job, process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                failed.append(name)
                print(f"{name} FAILED (exit {process.returncode}); see {args.runs / f'{name}.log'}", flush=True)
                continue
            commit(job, (time.monotonic() - started) / 60)
            row, seed = name.rsplit("_seed", 1)
            if row in STAGE2_OF:
                queue[:0] = [j for j in [stage2_job(row, int(seed), args.runs)] if j]  # before the checkpoint is lost
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
