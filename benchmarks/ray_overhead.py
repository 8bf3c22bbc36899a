"""What does Ray cost per trial: one trial through `run_search.py` against `python -m ltsearch train`, and
where does the time go?

Method. Compared (CIFAR-10-LT IF 100, ResNet-8, batch 128, stage 2 disabled, 2 threads in both paths), for
1 and 3 stage-1 epochs, interleaved (plain, search, search, plain, ...), median over `--reps`:
  plain   `python -m ltsearch train CONFIG --out DIR`                         (wall of the process)
  search  `python run_search.py SPACE` with num_samples 1 (one CPU-2 trial)   (wall of the process)
Overhead = search - plain (start-up of a local Ray, its dashboard, the trial actor, Tune's result and
checkpoint handling, writing results.csv). Ray's own `time_total_s` of the trial and the trainer's own epoch
times (`epoch_time_s`: train + val/test evaluation) split it into driver-side and in-trial parts.

Then, with the cluster up: a search of 4 trials (1 CPU each, 2 concurrent, ASHA off); per-trial overhead =
(2 * (last trial end - first trial launch) - sum of the trials' epoch times) / 4, i.e. slot time not spent
in epochs (`four`). Then trials of 2 minutes or more as a search here runs them (`long`: 4 trials of 9
epochs, 1 CPU each, 2 at a time, against the same runs of `python -m ltsearch train` two side by side).
Then where the time goes: the CPU seconds each process of a search uses (`cpu`); the same 3-epoch trial
plain / through run_search.py / through run_search.py with the local Ray started without its dashboard
(`variants`, interleaved); and the pieces: interpreter + imports (`python -X importtime`, and
with vs without torchvision), `ltsearch.build.load_data`, one checkpoint save, one val+test evaluation.
Targets: overhead < 10 s per trial, and < 10 % of a trial of 2 minutes or more.

Commands (docs/benchmarks.md, section 2: its first tables, then "The fix"):

    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/ray_overhead.py --parts single four cpu variants pieces  # ~20 min
    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/ray_overhead.py --parts four long --reps 2              # ~28 min
    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/ray_overhead.py    # all parts: about an hour on the 2-core machine
"""
from __future__ import annotations

import argparse
import json
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import (
    alternating,
    interleaved,
    median_seconds,
    private_ray_env,
    read_metrics,
    run_command,
    search_command,
    seconds,
    table,
    train_command,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = {"data": {"dataset": "cifar10", "imbalance_factor": 100},
        "model": {"name": "resnet8"},
        "stage1": {"epochs": 1, "batch_size": 128, "lr": 0.1, "weight_decay": 5.0e-4},
        "stage2": {"enabled": False}}


def cpu_by_process(cmd: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """Run `cmd`; return its wall seconds and the CPU seconds used by each kind of process in its tree
    (sampled every 0.5 s: a process's last sample counts, so up to 0.5 s of each is missed)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last: dict[int, tuple[str, float]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                cmdline = " ".join(p.cmdline())
                t = p.cpu_times()
                last[p.pid] = (cmdline, t.user + t.system)
            except psutil.Error:
                pass
        time.sleep(0.5)
    wall = time.perf_counter() - started
    kinds = {"ltsearch train (plain)": "-m ltsearch train", "run_search.py (driver)": "run_search.py", "trial (ray::ImplicitFunc)": "ray::ImplicitFunc",
             "raylet": "raylet", "gcs_server": "gcs_server", "dashboard + agents": "dashboard",
             "other ray:: processes (idle workers, agents)": "ray::", "log_monitor / monitor": "monitor"}
    out: dict[str, float] = {}
    for cmdline, cpu in last.values():
        kind = next((k for k, marker in kinds.items() if marker in cmdline.lower() or marker in cmdline), "other")
        out[kind] = out.get(kind, 0.0) + cpu
    return wall, dict(sorted(out.items(), key=lambda kv: -kv[1]))


def write_space(path: Path, epochs: int, num_samples: int, cpus: int, space: dict) -> Path:
    base = json.loads(json.dumps(BASE))
    base["stage1"]["epochs"] = epochs
    spec = {"base": base, "space": space,
            "search": {"num_samples": num_samples, "metric": "val_acc", "scheduler": {"enabled": False},
                       "sampler": {"type": "random", "seed": 0},
                       "resources": {"num_workers": 1, "cpus_per_worker": cpus}}}
    path.write_text(yaml.safe_dump(spec))
    return path


def write_base(space: Path, path: Path) -> Path:
    """The plain run's config: the search space's base."""
    path.write_text(yaml.safe_dump(yaml.safe_load(space.read_text())["base"]))
    return path


def epochs_s(run: Path) -> float:
    """Sum of the epoch times of a `python -m ltsearch train --out RUN` run."""
    return sum(h["epoch_time_s"] for h in read_metrics(run)["history"])


def trial_times(exp: Path) -> list[dict]:
    """Per trial: launch (its folder's time stamp), end (last result), Ray's time_total_s, sum of epoch_time_s."""
    import pandas as pd

    history = pd.read_csv(exp / "history.csv")
    launched = {}
    for folder in (exp / "search").glob("_trial_*"):
        trial_id = folder.name.split("_")[2]
        stamp = re.search(r"(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)$", folder.name).group(1)
        launched[trial_id] = time.mktime(time.strptime(stamp, "%Y-%m-%d_%H-%M-%S"))
    out = []
    for trial_id, rows in history.groupby("trial_id"):
        out.append({"trial_id": trial_id, "launched": launched[trial_id], "end": rows["timestamp"].max(),
                    "time_total_s": rows["time_total_s"].max(), "epochs_s": rows["epoch_time_s"].sum()})
    return out


def pieces(env: dict) -> dict:
    """Start-up pieces, each timed in this process or a fresh interpreter (median of 3)."""
    py = sys.executable

    def python_c(code: str) -> float:
        return run_command([py, "-c", code], env=env).wall_s

    out = {"python_import_torch_s": statistics.median(python_c("import torch") for _ in range(3)),
           "python_import_ltsearch_search_s": statistics.median(python_c("import ltsearch.search") for _ in range(3))}
    without, with_tv = [], []  # what torchvision (imported by ltsearch.models) adds to every trial process
    for _ in range(5):
        without.append(python_c("import torch, ray.tune, optuna, pandas"))
        with_tv.append(python_c("import torch, ray.tune, optuna, pandas, torchvision.models"))
    out["python_import_deps_without_torchvision_s"] = statistics.median(without)
    out["python_import_deps_with_torchvision_s"] = statistics.median(with_tv)
    proc = subprocess.run([py, "-X", "importtime", "-c", "import ltsearch.search"], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True)
    cumulative = {}
    for line in proc.stderr.splitlines():  # "import time: self [us] | cumulative | imported package"
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)", line)
        if m and m.group(2) in ("torch", "torchvision", "ray", "ray.tune", "optuna", "pandas", "ltsearch.search"):
            cumulative[m.group(2)] = max(cumulative.get(m.group(2), 0.0), int(m.group(1)) / 1e6)
    out["importtime_cumulative_s"] = cumulative

    import torch

    from ltsearch.build import load_data
    from ltsearch.config import ExperimentConfig
    from ltsearch.data import MEAN, STD, TensorLoader
    from ltsearch.models import build_model

    config = ExperimentConfig.model_validate(BASE)
    out["load_data_s"] = median_seconds(3, load_data, config)
    data = load_data(config)
    torch.set_num_threads(2)
    for name in ("resnet8", "resnet32"):
        model = build_model(name, 10).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(8, 3, 32, 32)).sum().backward()
        opt.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "best": {1: {"model": model.state_dict()}}, "history": []}
        with tempfile.TemporaryDirectory() as tmp:
            out[f"checkpoint_save_{name}_s"] = median_seconds(3, torch.save, state, Path(tmp) / "state.pt")
            out[f"checkpoint_{name}_mb"] = (Path(tmp) / "state.pt").stat().st_size / 2**20
        model.eval()

        @torch.no_grad()
        def evaluate(model=model) -> None:
            for x_u8, y in ((data.val_x, data.val_y), (data.test_x, data.test_y)):
                for x, _ in TensorLoader(x_u8, y, 512, MEAN["cifar10"], STD["cifar10"], train=False,
                                         channels_last=True):
                    model(x)

        out[f"eval_val_test_{name}_s"] = min(seconds(evaluate) for _ in range(2))
    return out


def single_trials(args, env: dict, work: Path) -> list[dict]:
    """Interleaved plain / search runs of one trial, for each epoch count; prints the comparison."""
    rows = []
    for rep, epochs in interleaved(args.reps, args.epochs):
        row = {"rep": rep, "epochs": epochs}
        space = write_space(work / f"space-{rep}-{epochs}.yaml", epochs, 1, 2,
                            {"stage1.weight_decay": {"choice": [5.0e-4]}})
        config = write_base(space, work / f"config-{epochs}.yaml")
        plain = train_command(config, work / f"plain-{rep}-{epochs}")
        search = search_command(space, work, f"search-{rep}-{epochs}")
        for name, cmd in alternating(rep, [("plain", plain), ("search", search)]):
            row[f"{name}_s"] = run_command(cmd, env=env).wall_s
        row["plain_epochs_s"] = epochs_s(work / f"plain-{rep}-{epochs}")
        trial = trial_times(work / f"search-{rep}-{epochs}")[0]
        row["search_time_total_s"], row["search_epochs_s"] = trial["time_total_s"], trial["epochs_s"]
        row["overhead_s"] = row["search_s"] - row["plain_s"]
        rows.append(row)
        print(f"  rep {rep} epochs {epochs}: plain {row['plain_s']:.1f} s (epochs {row['plain_epochs_s']:.1f} s)"
              f"  search {row['search_s']:.1f} s (Ray time_total_s {row['search_time_total_s']:.1f} s, epochs "
              f"{row['search_epochs_s']:.1f} s)  overhead {row['overhead_s']:.1f} s", flush=True)

    med, lines = {}, []
    for epochs in args.epochs:
        mine = [r for r in rows if r["epochs"] == epochs]
        m = med[epochs] = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("rep", "epochs")}
        lines.append([epochs, f"{m['plain_s']:.1f}", f"{m['search_s']:.1f}", f"{m['overhead_s']:.1f}",
                      f"{statistics.median(r['search_s'] / r['plain_s'] for r in mine):.2f}",
                      f"{statistics.median(r['search_s'] - r['search_time_total_s'] for r in mine):.1f}",
                      f"{statistics.median(r['search_time_total_s'] - r['search_epochs_s'] for r in mine):.1f}",
                      f"{statistics.median(r['plain_s'] - r['plain_epochs_s'] for r in mine):.1f}",
                      f"{statistics.median(r['search_epochs_s'] / r['plain_epochs_s'] for r in mine):.2f}"])
    print("\n" + table(["epochs", "plain s", "search s", "overhead s", "search / plain",
                         "search: driver-side s (wall - time_total_s)",
                         "search: in-trial s (time_total_s - epochs)", "plain: outside epochs s",
                         "epochs s, search / plain"], lines))
    lo, hi = min(args.epochs), max(args.epochs)
    if hi > lo:  # overhead(E) = fixed + per_epoch * E; when does a trial last 2 minutes?
        per_epoch = (med[hi]["overhead_s"] - med[lo]["overhead_s"]) / (hi - lo)
        fixed = med[lo]["overhead_s"] - per_epoch * lo
        epoch_s = (med[hi]["plain_s"] - med[lo]["plain_s"]) / (hi - lo)
        e2 = max(1, round(120 / epoch_s))
        print(f"\nfixed overhead {fixed:.1f} s + {per_epoch:.2f} s per epoch; plain epoch {epoch_s:.1f} s; a 2-minute "
              f"trial (~{e2} epochs) would pay {fixed + per_epoch * e2:.1f} s = "
              f"{100 * (fixed + per_epoch * e2) / (med[lo]['plain_s'] + epoch_s * (e2 - lo)):.1f} % (target < 10 %)")
    return rows


def four_trials(args, env: dict, work: Path) -> dict:
    """A 4-trial search, 1 CPU per trial, 2 at a time: slot time per trial not spent in epochs."""
    print("\n4 trials, 1 CPU each, 2 concurrent", flush=True)
    space4 = write_space(work / "space4.yaml", args.concurrent_epochs, 4, 1,
                         {"stage1.weight_decay": {"loguniform": [1.0e-4, 1.0e-2]}})
    started = time.time()
    wall4 = run_command(search_command(space4, work, "search4"), env=env).wall_s
    trials = trial_times(work / "search4")
    span = max(t["end"] for t in trials) - min(t["launched"] for t in trials)
    epochs4 = sum(t["epochs_s"] for t in trials)
    four = {"wall_s": wall4, "first_launch_after_s": min(t["launched"] for t in trials) - started,
            "span_s": span, "sum_epochs_s": epochs4, "sum_time_total_s": sum(t["time_total_s"] for t in trials),
            "per_trial_overhead_s": (2 * span - epochs4) / len(trials),
            "per_trial_in_trial_overhead_s": statistics.mean(t["time_total_s"] - t["epochs_s"] for t in trials),
            "trials": trials}
    print(json.dumps({k: v for k, v in four.items() if k != "trials"}, indent=1), flush=True)
    print(f"cluster up: {four['per_trial_overhead_s']:.1f} s per trial outside epochs (target < 10 s), of which "
          f"{four['per_trial_in_trial_overhead_s']:.1f} s inside the trial (Ray time_total_s - epochs)", flush=True)
    return four


def long_trials(args, env: dict, work: Path) -> list[dict]:
    """Trials of 2 minutes or more, as a search on this machine runs them (1 CPU and 1 thread each, 2 at a
    time): 4 trials of `--long-epochs` epochs through `run_search.py` against the same 4 runs of
    `python -m ltsearch train`, two side by side; interleaved, `--reps` times. The search's wall includes its
    once-per-search cost (driver imports, starting and stopping the local Ray); per-trial overhead is the
    slot time of its trials (2 slots x (last result - first launch)) beyond the plain runs' (2 slots x their
    wall), per trial."""
    epochs, rows = args.long_epochs, []
    print(f"\n4 trials of {epochs} epochs, 1 CPU each, 2 concurrent: search vs plain pairs", flush=True)
    space = write_space(work / "space-long.yaml", epochs, 4, 1, {"stage1.weight_decay": {"choice": [5.0e-4]}})
    config = write_base(space, work / "config-long.yaml")
    for rep in range(args.reps):
        row = {"rep": rep}
        for variant in alternating(rep, ("plain", "search")):
            if variant == "search":
                name = f"long-search-{rep}"
                started = time.time()
                row["search_s"] = run_command(search_command(space, work, name), env=env).wall_s
                trials = trial_times(work / name)
                row["search_span_s"] = max(t["end"] for t in trials) - min(t["launched"] for t in trials)
                row["search_first_launch_s"] = min(t["launched"] for t in trials) - started
                row["search_epochs_s"] = sum(t["epochs_s"] for t in trials)
                continue
            started, epoch_s = time.perf_counter(), 0.0
            for pair in ((0, 1), (2, 3)):
                outs = [work / f"long-plain-{rep}-{i}" for i in pair]
                procs = [subprocess.Popen(train_command(config, out, "trainer.num_threads=1"), cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for out in outs]
                if any(proc.wait() for proc in procs):
                    raise RuntimeError(f"a plain run failed: {outs}")
                epoch_s += sum(epochs_s(out) for out in outs)
            row["plain_s"], row["plain_epochs_s"] = time.perf_counter() - started, epoch_s
        row["per_trial_overhead_s"] = 2 * (row["search_span_s"] - row["plain_s"]) / 4  # 2 slots, 4 trials
        row["trial_s"] = row["plain_s"] / 2
        rows.append(row)
        print(f"  rep {rep}: plain {row['plain_s']:.1f} s (a trial {row['trial_s']:.1f} s), search "
              f"{row['search_s']:.1f} s (trials' span {row['search_span_s']:.1f} s, first launch after "
              f"{row['search_first_launch_s']:.1f} s); per-trial overhead {row['per_trial_overhead_s']:.1f} s "
              f"= {100 * row['per_trial_overhead_s'] / row['trial_s']:.1f} %; epochs search / plain "
              f"{row['search_epochs_s'] / row['plain_epochs_s']:.3f}", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "rep"}
    print(f"\nmedian: a trial {med['trial_s']:.1f} s; per-trial overhead {med['per_trial_overhead_s']:.1f} s = "
          f"{100 * med['per_trial_overhead_s'] / med['trial_s']:.1f} % (target < 10 %); whole search / plain "
          f"{med['search_s'] / med['plain_s']:.3f}; epochs search / plain "
          f"{med['search_epochs_s'] / med['plain_epochs_s']:.3f}", flush=True)
    return rows


def cpu_breakdown(args, env: dict, work: Path) -> dict:
    """CPU seconds by process of one plain run and one single-trial search of max(--epochs) epochs."""
    epochs = max(args.epochs)
    space = write_space(work / "space-cpu.yaml", epochs, 1, 2, {"stage1.weight_decay": {"choice": [5.0e-4]}})
    config = write_base(space, work / "config-cpu.yaml")
    out = {"plain": cpu_by_process(train_command(config, work / "plain-cpu"), env),
           "search": cpu_by_process(search_command(space, work, "search-cpu"), env)}
    for name, (wall, cpu) in out.items():
        print(f"\nCPU seconds by process, {name} ({epochs} epochs, wall {wall:.1f} s, CPU {sum(cpu.values()):.1f} s):")
        for kind, cpu_s in cpu.items():
            print(f"  {kind:45s} {cpu_s:6.1f}")
    return out


def child_search(space: str, storage: str, name: str, variant: str) -> None:
    """run_search.py in this process; `variant` "nodash" starts the local Ray without its dashboard."""
    if variant == "nodash":
        import ray

        init = ray.init

        def init_without_dashboard(*args, **kwargs):
            return init(*args, **{**kwargs, "include_dashboard": False})

        ray.init = init_without_dashboard
    sys.argv = ["run_search.py", space, "--storage", storage, "--name", name]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(str(ROOT / "run_search.py"), run_name="__main__")


def variants(args, env: dict, work: Path) -> list[dict]:
    """Single trial of max(--epochs) epochs: plain vs search as shipped vs without the dashboard, interleaved."""
    epochs, rows = max(args.epochs), []
    space = write_space(work / "space-var.yaml", epochs, 1, 2, {"stage1.weight_decay": {"choice": [5.0e-4]}})
    config = write_base(space, work / "config-var.yaml")
    names = ["plain", "shipped", "nodash"]
    for rep, variant in interleaved(args.reps, names, alternate=True):
        name = f"var-{variant}-{rep}"
        if variant == "plain":
            wall = run_command(train_command(config, work / name), env=env).wall_s
            rows.append({"variant": variant, "wall_s": wall, "epochs_s": epochs_s(work / name)})
        else:
            wall = run_command([sys.executable, __file__, "--child-search", space, work, name, variant], env=env).wall_s
            rows.append({"variant": variant, "wall_s": wall, "epochs_s": trial_times(work / name)[0]["epochs_s"]})
        print(f"  rep {rep} {variant:14s} wall {rows[-1]['wall_s']:.1f} s, epochs {rows[-1]['epochs_s']:.1f} s",
              flush=True)
    med = {v: {k: statistics.median(r[k] for r in rows if r["variant"] == v) for k in ("wall_s", "epochs_s")}
           for v in names}
    print("\n" + table([f"variant ({epochs} epochs)", "wall s", "overhead vs plain s", "sum of epoch times s",
                         "epochs vs plain"],
                        ([v, f"{med[v]['wall_s']:.1f}", f"{med[v]['wall_s'] - med['plain']['wall_s']:.1f}",
                          f"{med[v]['epochs_s']:.1f}", f"{med[v]['epochs_s'] / med['plain']['epochs_s']:.3f}"]
                         for v in names)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrent-epochs", type=int, default=1, help="epochs of each of the 4 trials")
    parser.add_argument("--long-epochs", type=int, default=9, help="epochs of each trial of `long` (>= 2 min)")
    parts = ["single", "four", "long", "cpu", "variants", "pieces"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts, help="what to measure (default: all)")
    parser.add_argument("--child-search", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write all measurements to this file")
    args = parser.parse_args()
    if args.child_search:
        child_search(*args.child_search)
        return
    env = private_ray_env()
    work = Path(tempfile.mkdtemp(prefix="ltbench-ray-"))
    print(f"work dir {work}", flush=True)
    results = {}
    if "single" in args.parts:
        results["single"] = single_trials(args, env, work)
    if "four" in args.parts:
        results["four"] = four_trials(args, env, work)
    if "long" in args.parts:
        results["long"] = long_trials(args, env, work)
    if "cpu" in args.parts:
        results["cpu"] = cpu_breakdown(args, env, work)
    if "variants" in args.parts:
        results["variants"] = variants(args, env, work)
    if "pieces" in args.parts:
        print("\npieces", flush=True)
        results["pieces"] = pieces(env)
        print(json.dumps(results["pieces"], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
