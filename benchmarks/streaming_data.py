"""How many images a second does the streaming pipeline (JPEG files decoded as they are needed) deliver,
against the in-memory path, on the same CIFAR-10-LT images, and where does the difference go?

Method. The real CIFAR-10 copy in its two forms: the python pickles (`../shared/data/make_cifar10.py`,
ltsearch's CIFAR path) and the same images as JPEG files with long-tailed list files
(`make_cifar10_lists.py --only-lt`, made here in a temporary folder unless --lists is given). A training
epoch, batch 128, 32 px, no model:

  memory_cifar    `TensorLoader` over CIFAR-10-LT from the pickles (batched pad-4 crop + flip, normalise)
  memory_lists    the same `TensorLoader` over the JPEG lists decoded once (`data.pipeline: memory`); the
                  one-off decode of the three lists, in this process, is timed separately (decode_once)
  stream_wN       `StreamLoader` over the JPEG lists (`data.pipeline: stream`: random-resized crop, flip,
                  colour jitter 0.4, normalise), N DataLoader worker processes decoding (0: in this process)

Each loader's wall-clock images/s (median and best over repetitions) and its CPU time per image, this
process's plus its DataLoader workers' (less sensitive than wall time to other jobs on the machine). Where
the difference goes: the streaming path's steps timed in CPU time one image at a time in this thread (read
the file, JPEG decode to RGB, the per-image seeded generator, random-resized crop, flip, colour jitter, to a
uint8 tensor), and per batch (stack + normalise).

Repetitions are interleaved (A, B, C, ... A, B, C, ...); files are read once before timing (page cache warm,
as from the second epoch on). The result is printed (and written with --out) as JSON.

Command (docs/benchmarks.md, "Streaming data"):

    python benchmarks/streaming_data.py --cifar /tmp/ltdata --out /tmp/streaming.json   # ~3 min on the shared 2-core machine
    python benchmarks/streaming_data.py --cifar /tmp/ltdata --images 1024 --reps 1      # smoke test
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_seconds, interleaved

REPO = Path(__file__).resolve().parents[1]
MAKE_LISTS = REPO.parent / "shared" / "data" / "make_cifar10_lists.py"
BATCH = 128


def list_config(lists: Path, **data):
    from ltsearch.config import ExperimentConfig

    return ExperimentConfig.model_validate({
        "data": {"dataset": "image_list", "root": str(lists / "images"), "train_list": "../CIFAR10_LT_train.txt",
                 "val_list": "../CIFAR10_LT_val.txt", "test_list": "../CIFAR10_LT_test.txt", "image_size": 32,
                 **data},
        "trainer": {"num_threads": 1, "channels_last": True}})


def rate(loader, images: int, epoch: int) -> tuple[float, float]:
    """(images per second, CPU microseconds per image) over the first `images` images of an epoch (0: all
    of it; a partial epoch leaves prefetched batches to workers, whose CPU time the next loader would see)."""
    loader.set_epoch(epoch)
    seen, started, cpu = 0, time.perf_counter(), cpu_seconds()
    for x, _ in loader:
        seen += len(x)
        if seen >= images > 0:
            break
    return seen / (time.perf_counter() - started), 1e6 * (cpu_seconds() - cpu) / seen


def breakdown(files, count: int) -> dict[str, float]:
    """CPU microseconds per image of each step of the streaming path, one image at a time in this thread."""
    from PIL import Image
    from torchvision.transforms import v2

    from ltsearch.data import MEAN, STD, normalize

    steps = {"crop": v2.RandomResizedCrop(32), "flip": v2.RandomHorizontalFlip(),
             "jitter": v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), "to_tensor": v2.PILToTensor()}
    clock = time.thread_time  # CPU time: a step preempted by other jobs is not charged their time
    spent = dict.fromkeys(["read", "decode", "seed", *steps], 0.0)
    tensors = []
    for i, path in enumerate(files.paths[:count].tolist()):
        t = clock()
        raw = Path(path).read_bytes()
        spent["read"] += clock() - t
        t = clock()
        with Image.open(io.BytesIO(raw)) as im:
            image = im.convert("RGB")
        spent["decode"] += clock() - t
        t = clock()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(i)
            spent["seed"] += clock() - t
            for name, step in steps.items():
                t = clock()
                image = step(image)
                spent[name] += clock() - t
        tensors.append(image)
    mean = torch.tensor(MEAN["cifar10"]).view(1, 3, 1, 1)
    std = torch.tensor(STD["cifar10"]).view(1, 3, 1, 1)
    t = clock()
    for start in range(0, len(tensors), BATCH):
        normalize(torch.stack(tensors[start:start + BATCH]), mean, std, channels_last=True)
    spent["collate_normalise"] = clock() - t
    return {name: 1e6 * s / count for name, s in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=os.environ.get("LTSEARCH_DATA"), help="root of cifar-10-batches-py")
    parser.add_argument("--lists", help="output of make_cifar10_lists.py (default: made in a temporary folder)")
    parser.add_argument("--images", type=int, default=0, help="images timed per measurement (0: an epoch)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from ltsearch.build import load_data, split_loader
    from ltsearch.config import ExperimentConfig

    with tempfile.TemporaryDirectory() as tmp:
        lists = Path(args.lists or tmp)
        if args.lists is None:
            subprocess.run([sys.executable, str(MAKE_LISTS), str(lists), "--only-lt"], check=True)
        cifar_config = ExperimentConfig.model_validate({
            "data": {"dataset": "cifar10", "root": args.cifar, "imbalance_factor": 100},
            "trainer": {"num_threads": 1, "channels_last": True}})
        cifar = load_data(cifar_config)
        stream_config = list_config(lists, pipeline="stream", workers=0)
        stream = load_data(stream_config)
        for path in stream.train_x.paths.tolist() + stream.test_x.paths.tolist():
            Path(path).read_bytes()  # page cache warm
        memory_config = list_config(lists, pipeline="memory", workers=0)
        started, cpu = time.perf_counter(), time.process_time()
        memory = load_data(memory_config)
        decode_once, decode_cpu = time.perf_counter() - started, time.process_time() - cpu
        decoded = len(memory.train_y) + len(memory.val_y) + len(memory.test_y)

        loaders = {
            "memory_cifar": split_loader(cifar_config, cifar, "train", BATCH, train=True),
            "memory_lists": split_loader(memory_config, memory, "train", BATCH, train=True),
        }
        for workers in args.workers:
            config = list_config(lists, pipeline="stream", workers=workers)
            loaders[f"stream_w{workers}"] = split_loader(config, stream, "train", BATCH, train=True)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cpu: dict[str, list[float]] = {name: [] for name in loaders}
        for rep, (name, loader) in interleaved(args.reps, loaders.items()):
            images_per_s, us = rate(loader, args.images, rep)
            rates[name].append(images_per_s)
            cpu[name].append(us)
            print(f"rep {rep} {name}: {images_per_s:,.0f} images/s, {us:,.0f} CPU us/image", flush=True)
        steps = breakdown(stream.train_x, min(args.images or 4096, len(stream.train_y)))

    result = {
        "images_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "images_per_s_best": {name: max(r) for name, r in rates.items()},
        "cpu_us_per_image": {name: statistics.median(c) for name, c in cpu.items()},
        "decode_once": {"images": decoded, "seconds": decode_once, "images_per_s": decoded / decode_once,
                        "cpu_us_per_image": 1e6 * decode_cpu / decoded, "workers": 0},
        "stream_us_per_image": steps, "stream_us_per_image_total": sum(steps.values()),
        "train_images": {"cifar_pickles": len(cifar.train_y), "jpeg_lists": len(stream.train_y)},
        "args": vars(args), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(), "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
