"""Does ltsearch use a CUDA GPU as it should: how fast does the trainer's path train and evaluate there in
fp32, bf16 and fp16, what do several trials packed on one GPU buy, and does a search with fractional GPUs
run its trials at once, each on the GPU? The Python steps of benchmarks/gpu_check.sh (run that script;
these subcommands are its parts).

Method. `throughput` times the trainer's own path: uint8 images held on the device in a `TensorLoader`
(batched crop and flip, normalise), a channels_last model, the trainer's loss and SGD step
(`optim.sgd_step`, a GradScaler for fp16), under the trainer's autocast for bf16 / fp16; CIFAR-100-LT
IF 100 shapes (10,827 synthetic images, 100 classes). `--concurrent K` then runs K such processes at once
on the same device and reports their summed images/s: what packing K trials on one GPU
(`gpus_per_worker: 1/K`) buys. `search` starts a local Ray (declaring `--fake-gpus` GPUs when given: the
CPU dry run schedules fractional GPUs that way, and its trials fall back to the CPU), runs the quick-start
search through `ltsearch.search` and checks from history.csv that the trials ran at once (peak
concurrency) on the expected device.

    python benchmarks/gpu_check.py data DIR [--tiny]          # a CIFAR-10 root for the search; prints it
    python benchmarks/gpu_check.py throughput --device cuda   # trainer step and eval images/s per precision
    python benchmarks/gpu_check.py search --root ROOT --storage DIR [--fake-gpus 1] [--set k=v ...]

Commands (docs/benchmarks.md, "GPU check"; the dry run's output is the one quoted there):

    bash benchmarks/gpu_check.sh              # on a CUDA machine, venv active; under 8 minutes
    bash benchmarks/gpu_check.sh --dry-run    # the same steps, tiny, on the CPU (GPU_CHECK_DRY_RUN=1 too)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tests.conftest's synthetic CIFAR writer and ltsearch from this tree; common.py also when this file is
# imported, not run (tests/test_gpu.py)
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from common import endless, returned, spawn, synthetic_cifar100_lt, table, trial_spans

# ---------------------------------------------------------------------------- data


def data(args: argparse.Namespace) -> None:
    """Real CIFAR-10 when $LTSEARCH_DATA holds it or ../shared/data can decode it, else synthetic CIFAR-10
    in the official layout (full size, or `--tiny`: 60 train / 20 test images per class)."""
    out = Path(args.dir)
    env = os.environ.get("LTSEARCH_DATA")
    if not args.tiny and env and (Path(env) / "cifar-10-batches-py").is_dir():
        print("real CIFAR-10 from $LTSEARCH_DATA", file=sys.stderr)
        print(env)
        return
    maker = REPO.parent / "shared" / "data" / "make_cifar10.py"
    if not args.tiny and maker.is_file():
        subprocess.run([sys.executable, str(maker), str(out)], check=True, capture_output=True)
        print(f"real CIFAR-10 decoded from {maker.parent}", file=sys.stderr)
        print(out)
        return
    from tests.conftest import write_cifar

    per_class = (60, 20) if args.tiny else (5000, 1000)
    write_cifar("cifar10", out, train_per_class=per_class[0], test_per_class=per_class[1])
    print(f"synthetic CIFAR-10 ({per_class[0]} train / {per_class[1]} test images per class; no real copy "
          "found): timings are real, accuracies meaningless", file=sys.stderr)
    print(out)


# ---------------------------------------------------------------------------- throughput


def _autocast(device, precision: str):
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device_name: str, model_name: str, precision: str, batch: int, steps: int, warmup: int,
            eval_images: int, threads: int, barrier: str | None = None) -> dict:
    """Training and evaluation images/s of the trainer's path for one (precision, batch). `barrier`: a
    folder where packed processes (`packed`) say they are ready and wait for "go" before timing."""
    import torch

    from ltsearch.data import TensorLoader, normalization
    from ltsearch.losses import build_loss
    from ltsearch.models import build_model
    from ltsearch.optim import sgd_step
    from ltsearch.regularizers import weight_decay_groups

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    images = synthetic_cifar100_lt()
    x, y, counts = images.train_x, images.train_y, images.class_counts
    norm = {**normalization("cifar100"), "device": device, "channels_last": True}
    loader = TensorLoader(x, y, batch, train=True, seed=0, **norm)
    model = build_model(model_name, 100).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(weight_decay_groups(model, 5e-3), lr=0.01, momentum=0.9)
    loss_fn = build_loss("ce", counts).to(device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    stream = endless(loader)
    for i in range(warmup + steps):
        if i == warmup:
            if barrier is not None:  # packed runs: start timing together
                (Path(barrier) / f"ready-{os.getpid()}").touch()
                while not (Path(barrier) / "go").exists():
                    time.sleep(0.01)
            _sync(device)
            started = time.perf_counter()
        xb, yb = next(stream)
        with _autocast(device, precision):
            logits = model(xb)
        sgd_step(optimizer, loss_fn(logits.float(), yb), 0.01, scaler)
    _sync(device)
    train_s = time.perf_counter() - started
    result = {"device": str(device), "model": model_name, "precision": precision, "batch": batch,
              "train_img_s": steps * batch / train_s}
    if eval_images:
        model.eval()
        test = TensorLoader(x[:eval_images], y[:eval_images], 512, train=False, **norm)
        with torch.no_grad():
            for xb, _ in test:  # warm-up pass
                with _autocast(device, precision):
                    model(xb)
            _sync(device)
            started = time.perf_counter()
            for xb, _ in test:
                with _autocast(device, precision):
                    model(xb)
            _sync(device)
        result["eval_img_s"] = len(test.labels) / (time.perf_counter() - started)
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def throughput(args: argparse.Namespace) -> None:
    import torch

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__} on {name}: {args.model}, 100 classes, channels_last, "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for batch in args.batch_sizes:
        for precision in args.precisions:
            rows.append(measure(args.device, args.model, precision, batch, args.steps, args.warmup,
                                args.eval_images, args.threads))
    print("\n" + table(["batch", "precision", "train img/s", "eval img/s", "peak GPU memory MB"],
                       ([r["batch"], r["precision"], f"{r['train_img_s']:,.0f}", f"{r.get('eval_img_s', 0):,.0f}",
                         f"{r.get('peak_mem_mb', float('nan')):.0f}"] for r in rows)))
    if args.concurrent > 1:
        packed(args)


def packed(args: argparse.Namespace) -> None:
    """`--concurrent` processes training at once on the device (fp32, the first batch size): summed img/s
    against one process alone."""
    spec = {"device_name": args.device, "model_name": args.model, "precision": "fp32",
            "batch": args.batch_sizes[0], "steps": args.steps, "warmup": args.warmup, "eval_images": 0,
            "threads": args.threads}
    results = {}
    for k in (1, args.concurrent):
        with tempfile.TemporaryDirectory(prefix="gpu-check-barrier-") as barrier:
            procs = [spawn(measure, **spec, barrier=barrier) for _ in range(k)]
            while len(list(Path(barrier).glob("ready-*"))) < k:
                for failed in (p for p in procs if p.poll() not in (None, 0)):
                    returned(failed)  # raises, with its error
                time.sleep(0.05)
            (Path(barrier) / "go").touch()
            results[k] = [returned(p)["train_img_s"] for p in procs]
    one, many = results[1][0], results[args.concurrent]
    print(f"\npacked: {args.concurrent} processes training {args.model} (fp32, batch {spec['batch']}) at once on "
          f"{args.device}: {sum(many):,.0f} img/s in all ({', '.join(f'{r:,.0f}' for r in many)}), against "
          f"{one:,.0f} img/s for one process alone: {sum(many) / one:.2f}x the throughput")


# ---------------------------------------------------------------------------- search


def peak_concurrency(history) -> int:
    """Most trials running at one time, from each trial's first start and last report."""
    spans = trial_spans(history)
    events = sorted([(s, 1) for s in spans["start"]] + [(e, -1) for e in spans["end"]])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def search(args: argparse.Namespace) -> None:
    import ray

    from ltsearch.search import run_search
    from ltsearch.search.resources import trial_resources
    from ltsearch.space import load_search_space

    overrides = [f"data.root={args.root}", "data.download=false",
                 f"search.resources.gpus_per_worker={args.gpus_per_trial}", *args.set]
    spec = load_search_space(REPO / args.space, overrides, args.trials)
    ray.init(num_cpus=args.cpus, num_gpus=args.fake_gpus, include_dashboard=True, dashboard_host="127.0.0.1",
             logging_level="WARNING")
    gpus = ray.cluster_resources().get("GPU", 0)
    _, fits = trial_resources(spec.search, ray.cluster_resources())  # what the search will run at once
    print(f"local Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs"
          f"{' (declared: no real GPU, trials run on the CPU)' if args.fake_gpus else ''}; "
          f"{args.trials} trials x {args.gpus_per_trial:g} GPU", flush=True)
    started = time.perf_counter()
    result = run_search(spec, storage=args.storage, name="gpu-check", source=args.space)
    wall = time.perf_counter() - started
    ray.shutdown()

    import pandas as pd

    history = pd.read_csv(result.path / "history.csv", dtype={"trial_id": str})
    peak = peak_concurrency(history)
    devices = sorted(history["device"].dropna().unique()) if "device" in history else []
    table = result.results
    per_epoch = history.groupby("trial_id")["epoch_time_s"].median()
    print(f"\n{len(table)} trials in {wall:.0f} s ({result.path}); at most {peak} running at once; devices "
          f"{devices}; median epoch {statistics.median(per_epoch):.1f} s "
          f"(per trial: {', '.join(f'{v:.1f}' for v in per_epoch)}); statuses "
          f"{table['status'].value_counts().to_dict()}")
    expected = min(args.trials, fits)
    problems = []
    if (table["status"] == "ERROR").any():
        problems.append(f"trials failed: {table.loc[table['status'] == 'ERROR', 'stop_reason'].tolist()}")
    if peak < expected:
        problems.append(f"only {peak} trials ran at once, expected {expected}")
    if args.expect_device and not all(str(d).startswith(args.expect_device) for d in devices):
        problems.append(f"trials ran on {devices}, expected {args.expect_device}")
    if problems:
        raise SystemExit("search check FAILED: " + "; ".join(problems))
    print(f"search check passed: {peak} trials shared {gpus:g} GPU(s) at once ({expected} expected), each on "
          f"{devices}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("data", help="a CIFAR-10 root for the search (printed on stdout)")
    p.add_argument("dir")
    p.add_argument("--tiny", action="store_true", help="small synthetic folder (the CPU dry run)")
    p.set_defaults(func=data)
    p = commands.add_parser("throughput", help="trainer images/s per precision and batch size")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 512])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-images", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a trial gets its CPUs' worth)")
    p.add_argument("--concurrent", type=int, default=4, help="processes at once for the packed measurement")
    p.set_defaults(func=throughput)
    p = commands.add_parser("search", help="the quick-start search with fractional GPUs, checked")
    p.add_argument("--root", required=True, help="CIFAR-10 root (from the data step)")
    p.add_argument("--storage", required=True)
    p.add_argument("--space", default="benchmarks/gpu_check_space.yaml")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--gpus-per-trial", type=float, default=0.25)
    p.add_argument("--fake-gpus", type=float, help="declare this many GPUs to Ray (CPU dry run)")
    p.add_argument("--cpus", type=float, help="CPUs Ray may use (default: all)")
    p.add_argument("--expect-device", help="every trial must report a device starting with this (cuda, cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=search)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
