"""What two or more benchmarks do alike: time a call, interleave repetitions, run a function or a command in
a fresh process, give a search a private local Ray, read a run's results, make synthetic CIFAR-100-LT
tensors, print a markdown table.

The benchmarks are scripts (`python benchmarks/NAME.py`); Python puts their folder first on sys.path, so
`from common import ...` finds this file. Only the standard library is imported here at the top: torch,
psutil and pandas are imported where they are used, so a fresh measuring process pays only for what it
measures.

    python benchmarks/common.py FILE FUNCTION KWARGS_JSON   # how `spawn` runs FUNCTION(**KWARGS) of FILE
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- timing


def timed(function: Callable, /, *args, **kwargs) -> tuple[Any, float]:
    """`function(*args, **kwargs)`'s result and the wall seconds it took."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def seconds(function: Callable, /, *args, **kwargs) -> float:
    """Wall seconds of `function(*args, **kwargs)`."""
    return timed(function, *args, **kwargs)[1]


def median_seconds(repeats: int, function: Callable, /, *args, **kwargs) -> float:
    """Median wall seconds of `repeats` calls of `function(*args, **kwargs)`."""
    return statistics.median(seconds(function, *args, **kwargs) for _ in range(repeats))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its live children (DataLoader workers)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    return time.process_time() + sum(c.cpu_times().user + c.cpu_times().system for c in children)


# ---------------------------------------------------------------------------- repetitions


def alternating(rep: int, arms: Sequence) -> list:
    """`arms` in order in even repetitions, reversed in odd ones (A, B, B, A, ...): none always runs first."""
    return list(arms) if rep % 2 == 0 else list(arms)[::-1]


def interleaved(reps: int, arms: Iterable, *, alternate: bool = False) -> Iterator[tuple[int, Any]]:
    """(repetition, arm): every arm once before any arm twice (A, B, C, A, B, C, ...), so a slow minute of a
    shared machine falls on all arms alike; `alternate`: reversed in odd repetitions (`alternating`)."""
    arms = list(arms)
    for rep in range(reps):
        for arm in alternating(rep, arms) if alternate else arms:
            yield rep, arm


def per_rep_ratios(top: Iterable[dict], bottom: Iterable[dict], key: str) -> list[float]:
    """top[key] / bottom[key] of the runs of the same repetition ("rep"), which ran under the same load."""
    below = {run["rep"]: run[key] for run in bottom}
    return [run[key] / below[run["rep"]] for run in top if run["rep"] in below]


def spread(values: Iterable[float], fmt: str = ".1f") -> str:
    """'median (min..max)' of `values`."""
    values = list(values)
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A markdown table: the header, its rule, then one line per row (each cell as str())."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


# ---------------------------------------------------------------------------- fresh processes


class Finished(NamedTuple):
    wall_s: float
    cpu_s: float  # user + system seconds of the command and of the children it waited for
    stdout: str


def run_command(cmd: Sequence, *, env: dict | None = None, cwd: Path = REPO) -> Finished:
    """Run `cmd` (from the repository root unless `cwd`) to its end, output captured; raises RuntimeError
    with the tail of its output if it fails."""
    cmd = [str(part) for part in cmd]
    usage, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return Finished(wall, after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime, proc.stdout)


def spawn(function: Callable, /, **kwargs) -> subprocess.Popen:
    """Start `function(**kwargs)` in a fresh interpreter: its own imports, memory (peak RSS) and threads,
    nothing of this process's state. `function` is a module-level function of a file; the keyword arguments
    and the return value travel as JSON (`returned` waits for the value)."""
    import inspect

    cmd = [sys.executable, __file__, inspect.getsourcefile(function), function.__name__, json.dumps(kwargs)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def returned(proc: subprocess.Popen) -> Any:
    """What the function of a `spawn`ed process returned; raises RuntimeError with its stderr if it failed."""
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{Path(proc.args[2]).name}: {proc.args[3]}({proc.args[4]}) failed in its own "
                           f"process (exit {proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def in_fresh_process(function: Callable, /, **kwargs) -> Any:
    """`function(**kwargs)` run in a fresh interpreter (`spawn`), its return value."""
    return returned(spawn(function, **kwargs))


def _call_from_argv() -> None:
    """The fresh process's side of `spawn`: import FILE (as a module, so its main() does not run), call
    FUNCTION(**KWARGS), print its return value as JSON."""
    if len(sys.argv) != 4:
        sys.exit("usage: python benchmarks/common.py FILE FUNCTION KWARGS_JSON (what `spawn` runs)")
    file, name, kwargs = sys.argv[1:]
    module_name = Path(file).stem
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(getattr(module, name)(**json.loads(kwargs))))


# ---------------------------------------------------------------------------- runs and searches


def private_ray_env() -> dict[str, str]:
    """This environment for a child that starts a local Ray of its own, never another user's cluster: a new
    RAY_TMPDIR, no RAY_ADDRESS; LTSEARCH_DATA defaults to /tmp/ltdata."""
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="ltb-ray-"))
    env.setdefault("LTSEARCH_DATA", "/tmp/ltdata")
    env.pop("RAY_ADDRESS", None)
    return env


def train_command(config: Path, out: Path, *sets: str) -> list[str]:
    """`python -m ltsearch train CONFIG --out OUT [--set KEY=VALUE ...]`."""
    return [sys.executable, "-m", "ltsearch", "train", str(config), "--out", str(out),
            *(part for key_value in sets for part in ("--set", key_value))]


def search_command(space: Path, storage: Path, name: str) -> list[str]:
    """`python run_search.py SPACE --storage STORAGE --name NAME` (run from the repository root)."""
    return [sys.executable, "run_search.py", str(space), "--storage", str(storage), "--name", name]


def read_metrics(run: Path) -> dict:
    """The metrics.json of a `python -m ltsearch train --out RUN` run ("history": one row per epoch)."""
    return json.loads((Path(run) / "metrics.json").read_text())


def trial_spans(history):
    """Per trial of a search's history.csv (a pandas frame): `start`, its first result's time less the time
    that result took (Ray's time_total_s), and `end`, its last result's time; seconds since the epoch."""
    starts = history["timestamp"] - history["time_total_s"]
    return history.assign(start=starts).groupby("trial_id").agg(start=("start", "min"), end=("timestamp", "max"))


# ---------------------------------------------------------------------------- data


def endless(loader) -> Iterator:
    """A loader's batches, epoch after epoch (`set_epoch` before each: a new shuffle and augmentation)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def synthetic_cifar100_lt(val_per_class: int = 0, test_per_class: int = 0):
    """CIFAR-100-LT IF 100 shapes as random uint8 images (seed 0; timings need the shapes, not the pixels):
    10,827 training images with the long-tailed class counts (validation's 20 taken from the head classes),
    and `val_per_class` / `test_per_class` images of each class for validation and test."""
    import torch

    from ltsearch.data import LongTailData, lt_class_counts

    counts = [min(n, 480) for n in lt_class_counts(500, 100, 100.0)]
    g = torch.Generator().manual_seed(0)
    y = torch.repeat_interleave(torch.arange(100), torch.tensor(counts))
    y_val = torch.arange(100).repeat_interleave(val_per_class)
    y_test = torch.arange(100).repeat_interleave(test_per_class)

    def images(n: int):
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)

    return LongTailData(images(len(y)), y, images(len(y_val)), y_val, images(len(y_test)), y_test, counts,
                        [str(c) for c in range(100)], 100)


if __name__ == "__main__":
    _call_from_argv()
