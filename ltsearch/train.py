"""The two-stage weight-balancing / NBN trainer, in plain PyTorch (no Ray).

    summary = train(load_config("configs/x.yaml"), out_dir="runs/x", progress=True)

Stage 1 trains backbone + classifier with a plain loss and weight decay. Post-hoc tau-normalisation of the
classifier is evaluated at every epoch from the same features, so it costs no training. Stage 2 freezes the
backbone, starts from the stage-1 epoch that was best on VALIDATION, and retrains the classifier with a
class-balanced loss, weight decay and MaxNorm. The test set is evaluated and reported, never used to select.

When the test set is evaluated (`trainer.test_every`; val: every epoch). Other epochs report no `test_*` keys
(absent, never 0); every epoch's `has_test` says which kind it is. What each saves: docs/benchmarks.md.
- `best` (`auto`, the default, outside a search): at epochs that improve the stage's best validation accuracy
  (the epoch a stage selects always has test figures, even in a trial ASHA stopped), at each stage's last
  epoch, and every epoch without a val set.
- `rungs` (`auto` in a search, which passes ASHA's rungs, or none, as `trainer.test_epochs`): at the global
  epochs of `test_epochs` (where ASHA can stop a trial) and at each stage's last epoch. There, if the stage's
  best epoch had none, its kept model (`best[stage]["model"]`) is evaluated on test (the numbers that epoch
  would have given: same weights, BN statistics, precision, batches); the figures join the stage's best
  metrics (`recomputed_test: true`) and that last epoch reports them as `best_test_*` next to `best_epoch`
  (`ltsearch.search.results.trial_row` fills the best epoch's row from them). A trial stopped before a
  stage's end lacks them unless the best epoch was a rung: a search recomputes them from the kept
  checkpoint (`test_best_epochs`) for the trials it selects (`ltsearch.search.lazy_test`).
- `epoch`: every epoch.
In stage 2 with the backbone's BN statistics frozen (`stage2.update_bn_stats: false`, the default) the backbone
cannot change, so the val and test features are computed once (taken over from the stage-1 epoch stage 2
starts from when this process evaluated it) and every stage-2 evaluation only runs the classifier on them:
the same numbers, without a pass of the backbone over the test set each epoch. Staged mode's stage 2
(`ltsearch.features.fit_classifier`) works on cached features throughout and evaluates test every epoch.
Each stage is a `StageSetup` (`_stage1_setup`, `_stage2_setup`: what is trained, optimiser, loss, learning-rate
schedule, MaxNorm, train/eval modes, logits of a batch) run by the one epoch loop `optim.train_epoch`.

Under an initialised `torch.distributed` process group (one process per rank, as Ray Train runs it) the model
is wrapped in DistributedDataParallel, each rank takes its shard of every batch order, and evaluation counts
are summed across ranks before any metric is computed. Every rank calls `report` the same number of times;
only rank 0 writes checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .build import load_data, loss_from_config, model_from_config, split_loader
from .config import ExperimentConfig, with_overrides
from .data import LongTailData
from .devices import all_sum, autocast, rank_world, resolve_device, resolve_precision
from .files import CHECKPOINT_FILE, PREDICTIONS_FILE, atomic_save, atomic_save_array
from .metrics import class_groups, classifier_metrics
from .models import LTClassifier, nbn_parameters
from .optim import StageSetup, classifier_setup, train_epoch
from .regularizers import weight_decay_groups
from .schedules import lr_schedule
from .selection import pack_correct

__all__ = [
    "TrainingDiverged",
    "resolve_device",
    "resolve_precision",
    "test_best_epochs",
    "train",
]

Report = Callable[[dict, "str | None"], None]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite at global epoch `epoch`."""

    def __init__(self, message: str, epoch: int):
        super().__init__(message)
        self.epoch = epoch


class _Run:
    """Everything one training run shares across its stages: config, data, model, loaders, history."""

    def __init__(self, config: ExperimentConfig, data: LongTailData, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self.rank, self.world = rank_world()
        t = config.trainer
        self.precision = resolve_precision(t.precision, device)
        self.test_every = "best" if t.test_every == "auto" else t.test_every
        self.test_epochs = set(t.test_epochs or [])
        self.memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.groups = class_groups(data.class_counts)
        torch.manual_seed(t.seed)
        self.model: LTClassifier = model_from_config(config.model, data.num_classes).to(
            device, memory_format=self.memory_format)
        loader = functools.partial(split_loader, config, data, device=device, rank=self.rank,
                                   world_size=self.world)
        self.eval_loaders = {split: loader(split, t.eval_batch_size, train=False)
                             for split in ("val", "test") if len(getattr(data, f"{split}_y")) > 0}
        self.train_loader = lambda batch_size, sampler: loader("train", batch_size, train=True, sampler=sampler)
        self.history: list[dict] = []
        self.best: dict[int, dict] = {}  # stage -> {"metrics": ..., "model": state_dict, "val_correct": ...}
        # Per-image validation correctness of the latest evaluated epoch ((2, images) bool: the classifier and
        # its tau-normalised copy), kept with the best epoch and beside each checkpoint for the paired tie test
        self.epoch_correct: torch.Tensor | None = None
        self.last: dict[int, dict] = {}  # stage -> metrics of its latest epoch
        # Backbone features of the eval splits, kept only when a frozen-backbone stage 2 will reuse them:
        # those of the latest epoch, of the best stage-1 epoch, and those stage 2 evaluates on.
        self.keep_features = config.stage2.enabled and not config.stage2.update_bn_stats
        self.epoch_features: dict[str, list] = {}
        self.best_features: dict[str, list] = {}
        self.frozen_features: dict[str, list] = {}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, stage: int, splits: Iterable[str], tau: float) -> dict:
        """Metrics of the current model on `splits` ("val", "test"; one without images is skipped), plus those
        of its tau-normalised classifier and its classifier norms."""
        model = self.model
        model.eval()
        batches = {split: self._features(stage, split) for split in splits if split in self.eval_loaders}
        metrics = classifier_metrics(model, batches, tau, self.groups, reduce=all_sum, per_image=["val"])
        if "val_correct" in metrics:
            self.epoch_correct = self._gather_images(metrics.pop("val_correct"))
        return metrics

    def _gather_images(self, local: torch.Tensor) -> torch.Tensor:
        """Per-image values of this rank's validation shard (images rank, rank + world, ...) placed in the
        full validation order, summed across ranks."""
        if self.world == 1:
            return local
        full = torch.zeros(2, len(self.data.val_y), dtype=torch.int32, device=self.device)
        full[:, self.rank::self.world] = local.to(self.device, torch.int32)
        return all_sum(full).bool().cpu()

    def _features(self, stage: int, split: str) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (backbone features, labels) of `split`: computed, or, in a stage 2 whose backbone cannot
        change, computed once and reused."""
        if stage == 2 and self.keep_features and split in self.frozen_features:
            return self.frozen_features[split]
        batches = ((self._forward(self.model.features, x).float(), y) for x, y in self.eval_loaders[split])
        if not self.keep_features:
            return batches  # streamed: nothing will reuse them
        kept = self.epoch_features[split] = list(batches)
        if stage == 2:
            self.frozen_features[split] = kept
        return kept

    def _improves(self, stage: int, metrics: dict) -> bool:
        """Whether this epoch beats the stage's best validation accuracy (any later epoch does when there is
        no val set); ties keep the earlier epoch."""
        best = self.best.get(stage)
        score = metrics.get("val_acc", metrics["epoch"])
        return best is None or score > best["metrics"].get("val_acc", best["metrics"]["epoch"])

    def _tests_at(self, epoch: int, improves: bool, last: bool) -> bool:
        """Whether global epoch `epoch` evaluates test (see the module docstring). Every rank decides alike:
        `improves` comes from the summed val counts."""
        return last or self.test_every == "epoch" or (epoch in self.test_epochs if self.test_every == "rungs"
                                                      else improves)

    def _test_best(self, stage: int) -> dict:
        """At a stage's last epoch: when the stage's best epoch had no test figures (`rungs`), evaluate its kept
        model on test, attach them to its metrics and return them as `best_*` scalars for this epoch's result."""
        best = self.best[stage]
        if best["metrics"].get("has_test") or "test" not in self.eval_loaders:
            return {}
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(best["model"])
        test = _test_figures(self.evaluate(stage, ["test"], self.config.posthoc.tau))
        self.model.load_state_dict(current)
        if "test" in self.epoch_features:  # the best stage-1 model's: a frozen-backbone stage 2 reuses them
            self.best_features["test"] = self.epoch_features.pop("test")
        best["metrics"].update(test, has_test=True, recomputed_test=True)
        return {f"best_{k}": v for k, v in test.items() if not isinstance(v, list)}

    # ---------------------------------------------------------------- checkpoints
    def state(self, stage: int, stage_epoch: int, optimizer: torch.optim.Optimizer) -> dict:
        return {"config": self.config.model_dump(), "class_counts": self.data.class_counts,
                "class_names": list(self.data.class_names), "stage": stage, "stage_epoch": stage_epoch,
                "model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                "best": self.best, "last": self.last, "history": self.history, "val_correct": self.epoch_correct}

    def save_and_report(self, state: dict, metrics: dict, out_dir: Path | None, report: Report | None):
        """Rank 0 writes the checkpoint (atomically); every rank calls `report` once per epoch."""
        if report is None:
            if out_dir is not None and self.rank == 0:
                atomic_save(state, out_dir / "checkpoint" / CHECKPOINT_FILE)
                _save_predictions(state, out_dir / "checkpoint")
            return
        if self.rank != 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="ltsearch-ckpt-") as tmp:
            torch.save(state, Path(tmp) / CHECKPOINT_FILE)
            _save_predictions(state, Path(tmp))
            report(metrics, tmp)

    # ---------------------------------------------------------------- the two stages
    def _ddp(self, module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module) if self.world > 1 else module

    def _forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` under the configured mixed precision."""
        with autocast(self.device, self.precision):
            return module(x)

    def _stage1_setup(self, steps_per_epoch: int) -> StageSetup:
        """Backbone + classifier on images, with weight decay (NBN's scale decayed iff its own setting); with
        `stage1.drw_epoch` the loss switches to class-balanced weights at that epoch (`on_epoch`)."""
        cfg, model = self.config.stage1, self.model
        loss_fn = loss_from_config(cfg, self.data.class_counts).to(self.device)
        scale = nbn_parameters(model)
        decay_scale = self.config.model.nbn_scale_weight_decay
        params = weight_decay_groups(model, cfg.weight_decay, cfg.exempt_norm_bias_from_wd,
                                     exempt=[] if decay_scale else scale, decay=scale if decay_scale else [])
        ddp = self._ddp(model)
        return StageSetup(
            module=model,
            optimizer=torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum),
            loss_fn=loss_fn,
            lr=lr_schedule(cfg.lr_schedule, cfg.lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs,
                           cfg.lr_milestones, cfg.lr_gamma),
            logits=lambda x: self._forward(ddp, x),
            set_modes=model.train,
            on_epoch=getattr(loss_fn, "set_epoch", None),
        )

    def _stage2_setup(self, steps_per_epoch: int) -> StageSetup:
        """The classifier retrained (or, in `lws` mode, a per-class scale of it learned) on the frozen backbone's
        features (its BN statistics frozen too unless `stage2.update_bn_stats`); MaxNorm's radius comes from the
        stage-1 classifier stage 2 starts from."""
        cfg, model = self.config.stage2, self.model
        for p in model.features.parameters():
            p.requires_grad_(False)
        setup = classifier_setup(model, cfg, self.data.class_counts, self.best[1]["model"]["classifier.weight"],
                                 steps_per_epoch)
        setup.loss_fn.to(self.device)
        head = self._ddp(setup.module)

        def logits(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                feats = self._forward(model.features, x)
            return self._forward(head, feats.float())

        def set_modes() -> None:
            model.eval()
            model.features.train(cfg.update_bn_stats)
            model.logit_bn.train()

        return dataclasses.replace(setup, logits=logits, set_modes=set_modes)

    def run_stage(self, stage: int, start_epoch: int, optimizer_state: dict | None,
                  out_dir: Path | None, report: Report | None, progress: bool) -> None:
        if stage == 1:
            cfg, epoch_offset, make_setup = self.config.stage1, 0, self._stage1_setup
        else:  # on the global epoch axis, stage 2 follows stage 1's epochs
            cfg, epoch_offset, make_setup = self.config.stage2, self.config.stage1.epochs, self._stage2_setup
        loader = self.train_loader(cfg.batch_size, cfg.sampler)
        steps_per_epoch = len(loader)
        setup = make_setup(steps_per_epoch)
        if optimizer_state is not None:
            setup.optimizer.load_state_dict(optimizer_state)
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        if stage == 2:  # a fresh stage 2 starts from the best stage-1 epoch: its features, when kept here
            self.frozen_features = self.best_features if start_epoch == 0 else {}
            self.best_features = {}
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            loader.set_epoch(epoch_offset + epoch)
            if setup.on_epoch is not None:
                setup.on_epoch(epoch)
            batches = _progress(loader, progress and self.rank == 0, f"stage {stage} epoch {epoch + 1}/{cfg.epochs}")
            loss_sum, lr = train_epoch(setup, batches, epoch * steps_per_epoch, scaler, self.device)
            train_loss = all_sum(loss_sum).item() / (steps_per_epoch * self.world)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"stage {stage} epoch {epoch + 1}: training loss is {train_loss}",
                                       epoch_offset + epoch + 1)

            metrics = {"stage": stage, "epoch": epoch_offset + epoch + 1, "stage_epoch": epoch + 1,
                       "lr": lr, "train_loss": train_loss, "world_size": self.world, "device": str(self.device),
                       "precision": self.precision}
            metrics.update(self.evaluate(stage, ["val"], self.config.posthoc.tau))
            improves, last = self._improves(stage, metrics), epoch + 1 == cfg.epochs
            test = self._tests_at(epoch_offset + epoch + 1, improves, last)  # only where a result needs it
            if test:
                metrics.update(self.evaluate(stage, ["test"], self.config.posthoc.tau))
            metrics["has_test"] = test and "test" in self.eval_loaders
            self._track_best(stage, metrics, improves)
            if last:
                metrics.update(self._test_best(stage))
            metrics["epoch_time_s"] = time.perf_counter() - started
            self.last[stage] = metrics
            metrics["best_val_acc"] = self.best[stage]["metrics"].get("val_acc")
            metrics["best_epoch"] = self.best[stage]["metrics"]["epoch"]
            self.history.append(_scalars(metrics))
            self.save_and_report(self.state(stage, epoch + 1, setup.optimizer), metrics, out_dir, report)

    def _track_best(self, stage: int, metrics: dict, improves: bool) -> None:
        """Keep the epoch with the best validation accuracy (the last epoch when there is no val set), and
        its eval features for a frozen-backbone stage 2 that will start from it."""
        if improves:
            self.best[stage] = {"metrics": metrics, "model": copy.deepcopy(self.model.state_dict()),
                                "val_correct": self.epoch_correct}
            if stage == 1:
                self.best_features = dict(self.epoch_features)
        self.epoch_features = {}


def _save_predictions(state: dict, folder: Path) -> None:
    """`PREDICTIONS_FILE` of a checkpoint `state`: the per-image validation correctness of its epoch and of
    its stage's best-by-validation epoch, packed (ImageNet-LT's 20,000 images: 10 KB); no file without a
    validation set."""
    last, best = state["val_correct"], state["best"].get(state["stage"], {}).get("val_correct")
    if last is not None and best is not None:
        atomic_save_array(pack_correct(torch.stack([last, best]).numpy()), folder / PREDICTIONS_FILE)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, list)}


def _test_figures(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("test_", "tau_test_"))}


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
    return _summarize(run)


def _summarize(run: _Run) -> dict:
    """Final and best-by-validation metrics per stage (the `tau_*` entries of stage 1's best epoch are the
    post-hoc tau-normalisation result), the class counts and the per-epoch history (scalars only)."""
    out = {"class_counts": run.data.class_counts, "num_train": len(run.data.train_y),
           "class_names": list(run.data.class_names), "history": run.history}
    for stage, best in sorted(run.best.items()):
        out[f"stage{stage}"] = {"best_epoch": best["metrics"]["epoch"], "best": best["metrics"],
                                "final": run.last[stage]}
    return out


def test_best_epochs(config: ExperimentConfig, state: dict) -> dict[int, dict]:
    """The test figures of each stage's best-by-validation epoch kept in the checkpoint `state` (its `best`), by
    global epoch. Those evaluated without test (lazy test evaluation: a trial stopped before the stage's end)
    are computed from the kept model as the trainer evaluates it (the precision it ran under, the same eval
    batches: the figures `test_every: epoch` would have reported) and attached to `state`'s best metrics
    (`recomputed_test`)."""
    run, out = None, {}
    for kept in state["best"].values():
        metrics = kept["metrics"]
        if not metrics.get("has_test"):
            if run is None:
                precision = metrics.get("precision", config.trainer.precision)
                config = with_overrides(config, {"trainer.precision": precision})
                run = _Run(config, load_data(config), resolve_device(config.trainer.device))
            if "test" in run.eval_loaders:
                run.model.load_state_dict(kept["model"])
                test = _test_figures(run.evaluate(metrics["stage"], ["test"], config.posthoc.tau))
                metrics.update(test, has_test=True, recomputed_test=True)
        out[metrics["epoch"]] = _test_figures(metrics)
    return out
