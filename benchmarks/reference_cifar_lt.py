"""What does plain cross-entropy on a ResNet-32 reach on our CIFAR-10-LT copy when trained the way the
published LDAM-DRW code trains it? (A reference-style run, to calibrate ltsearch's numbers against.)

Method. Reproduces the "ERM / CE" row of Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss" (NeurIPS 2019), CIFAR-10-LT, exponential profile, imbalance ratio 100 (published: 70.36 % top-1,
the best test accuracy over epochs). Standalone: it does not import ltsearch. Written after the public
repository kaidic/LDAM-DRW (MIT licence), master at 2536330; the three files below are unchanged since
6feb304 "Upload code" (later commits touch only utils.py and the focal loss):
  cifar_train.py          defaults and schedule: 200 epochs, batch 128, SGD lr 0.1, momentum 0.9,
                          weight decay 2e-4 on all parameters, `adjust_learning_rate` (5-epoch linear warm-up
                          per epoch, lr x0.01 from epoch 160, x0.0001 from epoch 180, 0-based), CE loss,
                          per-image transforms RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
                          Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)); test batch 100;
                          the test set is evaluated every epoch and the best epoch is kept ("best_acc1")
  imbalance_cifar.py      IMBALANCECIFAR10: n_i = int(5000 * 0.01 ** (i / 9)); `np.random.seed(rand_number)`
                          (default 0), then for each class in label order its indices are shuffled with
                          `np.random.shuffle` and the first n_i kept. So NOT the first n_i in file order;
                          `--subset file-order` takes those instead (ltsearch's rule) for comparison
  models/resnet_cifar.py  ResNet_s / resnet32: 3x3 stem, 3 stages of 5 BasicBlocks (widths 16/32/64),
                          option-A shortcuts (stride-2 subsample, zero channel padding), global average
                          pooling, nn.Linear head (NormedLinear only for the LDAM loss), `_weights_init`:
                          kaiming_normal_ (fan_in) on every Conv2d and Linear weight; 464,154 parameters
What differs on purpose: no DataParallel/cudnn flags, CPU unless CUDA is there, `--seed` (the reference's
default is no seed) also seeds the DataLoader's shuffle; the subset seed is `--rand-number`, as in the
reference. The reference's torchvision CIFAR10 would refuse a re-encoded copy (md5 check, str keys); the
pickles are read directly here, with str or bytes keys.

The output JSON holds the per-epoch test accuracy, the FINAL-epoch test accuracy (`final_test_acc`), the best
test accuracy over evaluated epochs (`best_test_acc_test_selected`: selected ON THE TEST SET, as the
reference does; not a fair model-selection number), per-class and many/medium/few accuracy at the end, and
the wall time. Accuracies are in percent.

Command (docs/STANDARD.md, the reference run: `docs/standard/reference_seed0/reference.json`):

    .venv/bin/python benchmarks/reference_cifar_lt.py --data "$LTSEARCH_DATA" --eval-every 5 --threads 1 \\
        --precision bf16 --resume --out runs/standard/reference_seed0.json

    # full run, fp32: 200 epochs, the test set every 5 epochs and in each of the last 10
    .venv/bin/python benchmarks/reference_cifar_lt.py --data /tmp/ltdata --eval-every 5 --threads 1 \\
        --out benchmarks/results/reference_cifar10_lt_seed0.json

Time on the 2-core machine while shared (load average ~4): one training epoch (97 steps) took 87 s with
`--threads 1`, i.e. ~5 h for 200 epochs, but 395 s with 2 threads, whose OpenMP workers stall when the
cores are oversubscribed. `--threads 2` pays only on an idle machine (not measured here).
    # smoke test: 1 epoch on a few batches (seconds); without --limit-train-batches a full epoch (97 steps)
    .venv/bin/python benchmarks/reference_cifar_lt.py --data /tmp/ltdata --epochs 1 --limit-test 500 \\
        --limit-train-batches 10 --out /tmp/ref_smoke.json
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn

# ---------------------------------------------------------------- recipe (cifar_train.py defaults)
NUM_CLASSES = 10
IMB_FACTOR = 0.01  # n_min / n_max ("imbalance ratio 100")
BATCH_SIZE = 128  # images per step
TEST_BATCH_SIZE = 100
LR = 0.1  # peak learning rate, per step of batch 128
MOMENTUM = 0.9
WEIGHT_DECAY = 2e-4  # L2 on every parameter, BN and biases included
WARMUP_EPOCHS = 5
# The reference's CIFAR-10 constants: the mean is the per-channel pixel mean, the "std" (0.2023, 0.1994,
# 0.2010) is a widely copied value, not the pixel std (0.2470, 0.2435, 0.2616).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


def learning_rate(epoch: int) -> float:
    """LR for 0-based `epoch`, set once at the start of the epoch as `adjust_learning_rate` does:
    (epoch + 1) / 5 of the peak during warm-up, x0.01 for epochs 160..179, x0.0001 from 180."""
    if epoch + 1 <= WARMUP_EPOCHS:
        return LR * (epoch + 1) / WARMUP_EPOCHS
    if epoch >= 180:
        return LR * 1e-4
    if epoch >= 160:
        return LR * 1e-2
    return LR


# ---------------------------------------------------------------- data
def read_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 HWC images and int64 labels of the official python pickles, in file order (data_batch_1..5)."""
    folder = root / "cifar-10-batches-py"

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            # The official pickles have str keys under latin1; a copy re-pickled by Python 3 has bytes keys.
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
            xs.append(batch["data"].reshape(-1, 3, 32, 32))
            ys.extend(batch["labels"])
        return np.vstack(xs).transpose(0, 2, 3, 1), np.asarray(ys, dtype=np.int64)

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return train_x, train_y, test_x, test_y


def class_counts(n_max: int, imb_factor: float) -> list[int]:
    return [int(n_max * imb_factor ** (i / (NUM_CLASSES - 1.0))) for i in range(NUM_CLASSES)]


def longtail_indices(labels: np.ndarray, counts: list[int], rand_number: int, rule: str) -> np.ndarray:
    """Indices of the long-tailed subset, grouped by class (class 0 first), as IMBALANCECIFAR10 orders them.
    `reference`: the reference's rule, one global numpy stream seeded with `rand_number` that shuffles each
    class's indices in turn (a RandomState gives the same stream as `np.random.seed`). `file-order`: the first
    n_i images of each class."""
    rng = np.random.RandomState(rand_number)
    chosen = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        if rule == "reference":
            rng.shuffle(idx)
        chosen.append(idx[:n])
    return np.concatenate(chosen)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 HWC arrays -> PIL image -> `transform`, one image at a time (torchvision's CIFAR10 does this)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ---------------------------------------------------------------- model (ResNet_s of resnet_cifar.py)
class Block(nn.Module):
    """relu(bn1(conv1 x)) -> bn2(conv2 .) + shortcut(x) -> relu; option-A shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if (stride != 1 or in_planes != planes) else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        # Stride-2 subsample, then zero channels on both sides: no parameters.
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (blocks_per_stage - 1):
                blocks.append(Block(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)  # fan_in, ReLU gain: std sqrt(2 / fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.shape[3]).flatten(1)
        return self.linear(out)


# ---------------------------------------------------------------- train / evaluate
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, list[float]]:
    """Top-1 accuracy (%) and per-class accuracy (%) over `loader`."""
    model.eval()
    hits = torch.zeros(NUM_CLASSES)
    totals = torch.zeros(NUM_CLASSES)
    with torch.no_grad():
        for x, y in loader:
            pred = model(x.to(device)).argmax(1).cpu()
            totals += torch.bincount(y, minlength=NUM_CLASSES).float()
            hits += torch.bincount(y[pred == y], minlength=NUM_CLASSES).float()
    per_class = [round(a, 4) for a in (100 * hits.double() / totals.clamp(min=1)).tolist()]
    return round(float(100 * hits.sum() / totals.sum()), 4), per_class


def shot_group_acc(per_class: list[float], counts: list[int]) -> dict[str, float | None]:
    """Mean per-class accuracy of many (> 100 train images), medium (20..100) and few (< 20) classes;
    None for an empty group (CIFAR-10-LT IF 100 has no few-shot class)."""
    groups = {"many": [c for c, n in enumerate(counts) if n > 100],
              "medium": [c for c, n in enumerate(counts) if 20 <= n <= 100],
              "few": [c for c, n in enumerate(counts) if n < 20]}
    return {g: (float(np.mean([per_class[c] for c in cs])) if cs else None) for g, cs in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="torch/python seed (init, shuffle, augmentation)")
    parser.add_argument("--rand-number", type=int, default=0, help="numpy seed of the subset (reference: 0)")
    parser.add_argument("--subset", choices=("reference", "file-order"), default="reference")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="test every N epochs; the last 10 epochs are always tested")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast the forward pass and loss (the reference trains in fp32)")
    parser.add_argument("--limit-test", type=int, default=None, help="test on the first N test images only")
    parser.add_argument("--limit-train-batches", type=int, default=None,
                        help="stop each epoch after N batches (smoke tests only)")
    parser.add_argument("--out", type=Path, required=True,
                        help="JSON results file; OUT.checkpoint.pt beside it is rewritten after every epoch")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint.pt if it exists")
    args = parser.parse_args()

    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    train_x, train_y, test_x, test_y = read_cifar10(args.data)
    counts = class_counts(len(train_y) // NUM_CLASSES, IMB_FACTOR)
    subset = longtail_indices(train_y, counts, args.rand_number, args.subset)
    if args.limit_test:
        test_x, test_y = test_x[: args.limit_test], test_y[: args.limit_test]
    normalize = T.Normalize(MEAN, STD)
    train_set = ImageDataset(train_x[subset], train_y[subset],
                             T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                        normalize]))
    test_set = ImageDataset(test_x, test_y, T.Compose([T.ToTensor(), normalize]))
    shuffle_rng = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=args.workers,
        generator=shuffle_rng, persistent_workers=args.workers > 0)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=TEST_BATCH_SIZE, shuffle=False,
                                              num_workers=args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"train {len(train_set)} images, counts {counts}; test {len(test_set)}; device {device}", flush=True)

    model = ResNetCifar().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()

    history, best_acc, best_epoch, per_class = [], -1.0, None, None
    checkpoint_path = args.out.with_suffix(".checkpoint.pt")
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffle_rng.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        history, best_acc, best_epoch, per_class = (state[k] for k in ("history", "best_acc", "best_epoch",
                                                                         "per_class"))
        print(f"resumed after epoch {len(history) - 1} from {checkpoint_path}", flush=True)
    for epoch in range(len(history), args.epochs):
        lr = learning_rate(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.time()
        for step, (x, y) in enumerate(train_loader):
            if args.limit_train_batches is not None and step >= args.limit_train_batches:
                break
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = model(x)
                loss = criterion(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        row = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
               "train_seconds": time.time() - t0}
        if (epoch + 1) % args.eval_every == 0 or epoch >= args.epochs - 10:
            row["test_acc"], per_class = evaluate(model, test_loader, device)
            if row["test_acc"] > best_acc:
                best_acc, best_epoch = row["test_acc"], epoch
        history.append(row)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "shuffle_rng": shuffle_rng.get_state(), "torch_rng": torch.get_rng_state(),
                 "python_rng": random.getstate(), "history": history, "best_acc": best_acc,
                 "best_epoch": best_epoch, "per_class": per_class}
        torch.save(state, checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)  # an interrupted save keeps the old one
        print(f"epoch {epoch:3d} lr {lr:.5f} loss {row['train_loss']:.4f} train {row['train_acc']:.2f} "
              f"test {row.get('test_acc', float('nan')):.2f} ({row['train_seconds']:.1f} s)", flush=True)

    last = [r["test_acc"] for r in history[-10:] if "test_acc" in r]
    result = {
        "what": "CE on CIFAR-10-LT (exp, IF 100), ResNet-32 option A, kaidic/LDAM-DRW recipe",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "recipe": {"batch_size": BATCH_SIZE, "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                   "warmup_epochs": WARMUP_EPOCHS, "lr_steps": {"160": 0.01, "180": 0.0001},
                   "imb_factor": IMB_FACTOR, "mean": MEAN, "std": STD},
        "class_counts": counts,
        "num_train": len(train_set),
        "num_test": len(test_set),
        "num_params": sum(p.numel() for p in model.parameters()),
        "final_epoch": args.epochs - 1,
        "final_test_acc": history[-1].get("test_acc"),
        "best_test_acc_test_selected": best_acc,
        "best_epoch_test_selected": best_epoch,
        "last10_test_acc": {"mean": float(np.mean(last)), "min": min(last), "max": max(last)} if last else None,
        "final_per_class_test_acc": per_class,
        "final_shot_group_test_acc": shot_group_acc(per_class, counts),
        "history": history,
        "wall_seconds": time.time() - start,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "numpy": np.__version__},
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"final test {result['final_test_acc']:.2f} %, best over epochs (TEST-SELECTED) {best_acc:.2f} % "
          f"at epoch {best_epoch}; {result['wall_seconds']:.0f} s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
