"""The two-stage weight-balancing / NBN trainer, in plain PyTorch (no Ray).

    summary = train(load_config("configs/x.yaml"), out_dir="runs/x", progress=True)

Stage 1 trains backbone + classifier with a plain loss and weight decay. Post-hoc tau-normalisation of the
classifier is evaluated at every epoch from the same features, so it costs no training. Stage 2 freezes the
backbone, starts from the stage-1 epoch that was best on VALIDATION, and retrains the classifier with a
class-balanced loss, weight decay and MaxNorm. The test set is evaluated and reported, never used to select.

Under an initialised `torch.distributed` process group (one process per rank, as Ray Train runs it) the model
is wrapped in DistributedDataParallel, each rank takes its shard of every batch order, and evaluation counts
are summed across ranks before any metric is computed. Every rank calls `report` the same number of times;
only rank 0 writes checkpoints.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import ExperimentConfig
from .data import MEAN, STD, LongTailData, TensorLoader, load_data
from .files import CHECKPOINT_FILE, atomic_save
from .losses import build_loss
from .metrics import class_groups, feature_counts, metrics_from_counts
from .models import LTClassifier, build_model, nbn_parameters
from .regularizers import maxnorm_, relative_max_norm, row_norms, tau_normalize, weight_decay_groups

__all__ = [
    "TrainingDiverged",
    "resolve_device",
    "train",
]

Report = Callable[[dict, "str | None"], None]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite at global epoch `epoch`."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but no CUDA device is available")
    if name == "cuda":  # the device the launcher (e.g. Ray Train) selected for this rank
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if _rank_world()[1] > 1:
        dist.all_reduce(t)
    return t


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 0, evaluated per optimisation step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Run:
    """Everything one training run shares across its stages: config, data, model, loaders, history."""

    def __init__(self, config: ExperimentConfig, data: LongTailData, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self.rank, self.world = _rank_world()
        t = config.trainer
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.groups = class_groups(data.class_counts)
        torch.manual_seed(t.seed)
        self.model: LTClassifier = build_model(
            config.model.name, data.num_classes, nbn=config.model.nbn, nbn_all_bn=config.model.nbn_all_bn,
            classifier_bn=config.model.classifier_bn).to(device, memory_format=self.memory_format)
        norm = {"mean": MEAN[config.data.dataset], "std": STD[config.data.dataset], "device": device,
                    "channels_last": t.channels_last, "rank": self.rank, "world_size": self.world}
        self.eval_loaders = {
            split: TensorLoader(x, y, t.eval_batch_size, train=False, **norm)
            for split, x, y in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y))
            if len(y) > 0}
        self.train_loader = lambda batch_size: TensorLoader(
            data.train_x, data.train_y, batch_size, train=True, seed=t.seed, **norm)
        self.history: list[dict] = []
        self.best: dict[int, dict] = {}  # stage -> {"metrics": ..., "model": state_dict}
        self.last: dict[int, dict] = {}  # stage -> metrics of its latest epoch

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, stage: int, tau: float) -> dict:
        """Val and test metrics of the current model, plus those of its tau-normalised classifier."""
        model = self.model
        model.eval()
        tau_weight = tau_normalize(model.classifier.weight, tau)
        out = {}
        for split, loader in self.eval_loaders.items():
            counts = torch.zeros(4, self.data.num_classes, dtype=torch.float64, device=self.device)
            for x, y in loader:
                with _autocast(self.device, self.config.trainer.precision):
                    feats = model.features(x)
                counts += feature_counts(model, feats.float(), y, tau_weight)
            out.update(metrics_from_counts(_all_sum(counts), self.groups, split))
        out["classifier_norms"] = row_norms(model.classifier.weight).tolist()
        return out

    # ---------------------------------------------------------------- checkpoints
    def state(self, stage: int, stage_epoch: int, optimizer: torch.optim.Optimizer) -> dict:
        return {"config": self.config.model_dump(), "class_counts": self.data.class_counts,
                "class_names": list(self.data.class_names), "stage": stage, "stage_epoch": stage_epoch,
                "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                "best": self.best, "last": self.last, "history": self.history}

    def save_and_report(self, state: dict, metrics: dict, out_dir: Path | None, report: Report | None):
        """Rank 0 writes the checkpoint (atomically); every rank calls `report` once per epoch."""
        if report is None:
            if out_dir is not None and self.rank == 0:
                atomic_save(state, out_dir / "checkpoint" / CHECKPOINT_FILE)
            return
        if self.rank != 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="ltsearch-ckpt-") as tmp:
            torch.save(state, Path(tmp) / CHECKPOINT_FILE)
            report(metrics, tmp)

    # ---------------------------------------------------------------- one stage
    def run_stage(self, stage: int, start_epoch: int, optimizer_state: dict | None,
                  out_dir: Path | None, report: Report | None, progress: bool) -> None:
        cfg = self.config.stage1 if stage == 1 else self.config.stage2
        model, device = self.model, self.device
        if stage == 1:
            params = weight_decay_groups(
                model, cfg.weight_decay, cfg.exempt_norm_bias_from_wd,
                exempt=[] if self.config.model.nbn_scale_weight_decay else nbn_parameters(model))
            loss_fn = build_loss(cfg.loss, self.data.class_counts).to(device)
            trained = model
        else:
            for p in model.features.parameters():
                p.requires_grad_(False)
            trained = nn.Sequential(model.classifier, model.logit_bn)
            params = weight_decay_groups(trained, cfg.weight_decay)
            loss_fn = build_loss(cfg.loss, self.data.class_counts, beta=cfg.beta, gamma=cfg.focal_gamma).to(device)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        ddp = DistributedDataParallel(trained) if self.world > 1 else trained
        max_norm = None
        if stage == 2 and cfg.maxnorm_thresh is not None:  # radius from the stage-1 classifier stage 2 starts from
            max_norm = relative_max_norm(self.best[1]["model"]["classifier.weight"], cfg.maxnorm_thresh)

        loader = self.train_loader(cfg.batch_size)
        steps_per_epoch = len(loader)
        total_steps = cfg.epochs * steps_per_epoch
        warmup = getattr(cfg, "warmup_epochs", 0) * steps_per_epoch
        epoch_offset = 0 if stage == 1 else self.config.stage1.epochs
        scaler = torch.amp.GradScaler("cuda") if self.config.trainer.precision == "fp16" else None
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            loader.set_epoch(epoch_offset + epoch)
            if stage == 1:
                model.train()
            else:
                model.eval()
                model.features.train(self.config.stage2.update_bn_stats)
                model.logit_bn.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            batches = _progress(loader, progress and self.rank == 0, f"stage {stage} epoch {epoch + 1}/{cfg.epochs}")
            for i, (x, y) in enumerate(batches):
                lr = cosine_lr(epoch * steps_per_epoch + i, total_steps, warmup, cfg.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with _autocast(device, self.config.trainer.precision):
                    if stage == 1:
                        logits = ddp(x)
                    else:
                        with torch.no_grad():
                            feats = model.features(x)
                        logits = ddp(feats.float())
                    loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if max_norm is not None and cfg.maxnorm_every == "step":
                    maxnorm_(model.classifier.weight, max_norm)
                loss_sum += loss.detach().double()
            if max_norm is not None and cfg.maxnorm_every == "epoch":
                maxnorm_(model.classifier.weight, max_norm)
            train_loss = _all_sum(loss_sum).item() / (steps_per_epoch * self.world)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"stage {stage} epoch {epoch + 1}: training loss is {train_loss}",
                                       epoch_offset + epoch + 1)

            metrics = {"stage": stage, "epoch": epoch_offset + epoch + 1, "stage_epoch": epoch + 1,
                       "lr": lr, "train_loss": train_loss, "world_size": self.world,
                       **self.evaluate(stage, self.config.posthoc.tau)}
            metrics["epoch_time_s"] = time.perf_counter() - started
            self._track_best(stage, metrics)
            self.last[stage] = metrics
            metrics["best_val_acc"] = self.best[stage]["metrics"].get("val_acc")
            self.history.append(_scalars(metrics))
            self.save_and_report(self.state(stage, epoch + 1, optimizer), metrics, out_dir, report)

    def _track_best(self, stage: int, metrics: dict) -> None:
        """Keep the epoch with the best validation accuracy (the last epoch when there is no val set)."""
        best = self.best.get(stage)
        score = metrics.get("val_acc", metrics["epoch"])
        if best is None or score > best["metrics"].get("val_acc", best["metrics"]["epoch"]):
            self.best[stage] = {"metrics": metrics, "model": copy.deepcopy(self.model.state_dict())}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def train(config: ExperimentConfig, *, out_dir: str | Path | None = None, report: Report | None = None,
          resume_from: str | Path | None = None, progress: bool = False,
          data: LongTailData | None = None) -> dict:
    """Train one configuration; return the summary (final and best-by-val metrics of each stage).

    `report(metrics, checkpoint_dir)` is called after every epoch (checkpoint_dir is None on ranks > 0).
    Without `report`, rank 0 keeps `out_dir/checkpoint/state.pt` up to date. `resume_from` is a checkpoint
    directory or file written by either path; training continues after its last completed epoch.
    """
    t = config.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = resolve_device(t.device)
    run = _Run(config, data if data is not None else load_data(config), device)
    out_dir = Path(out_dir) if out_dir is not None else None

    stage, start_epoch, optimizer_state = 1, 0, None
    if resume_from is not None:
        path = Path(resume_from)
        state = torch.load(path / CHECKPOINT_FILE if path.is_dir() else path, map_location=device,
                           weights_only=False)
        run.model.load_state_dict(state["model"])
        run.best, run.last, run.history = state["best"], state["last"], state["history"]
        stage, start_epoch, optimizer_state = state["stage"], state["stage_epoch"], state["optimizer"]
        if stage == 1 and start_epoch == config.stage1.epochs:
            stage, start_epoch, optimizer_state = 2, 0, None

    if stage == 1:
        run.run_stage(1, start_epoch, optimizer_state, out_dir, report, progress)
    if config.stage2.enabled and (stage == 1 or start_epoch < config.stage2.epochs):
        if stage == 1 or start_epoch == 0:
            run.model.load_state_dict(run.best[1]["model"])
            start_epoch, optimizer_state = 0, None
        run.run_stage(2, start_epoch, optimizer_state, out_dir, report, progress)
    return summarize(run)


def summarize(run: _Run) -> dict:
    """Final and best-by-validation metrics per stage (the `tau_*` entries of stage 1's best epoch are the
    post-hoc tau-normalisation result), the class counts and the per-epoch history (scalars only)."""
    out = {"class_counts": run.data.class_counts, "num_train": len(run.data.train_y),
           "class_names": list(run.data.class_names), "history": run.history}
    for stage, best in sorted(run.best.items()):
        out[f"stage{stage}"] = {"best_epoch": best["metrics"]["epoch"], "best": best["metrics"],
                                "final": run.last[stage]}
    return out
