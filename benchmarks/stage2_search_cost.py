"""How many stage-2 trials a minute does a search run on cached features (staged mode), against rerunning the
backbone, and through Ray against a plain loop?

Method. A stage-1 checkpoint of CIFAR-10-LT IF 100 (ResNet-20, 1 epoch, `python -m ltsearch train`) is made
first, then its features are cached (`ltsearch.features.cache_features`, 4 views). Stage 2 as in
`search_spaces/wd_maxnorm.yaml` (10 epochs, batch 64, CB softmax-BCE, weight decay, MaxNorm per step), with
weight decay / MaxNorm threshold / beta drawn at random per trial:
  (i)   `ltsearch.features.fit_classifier` on the cache, in this process (2 threads; also 1 thread)
  (ii)  `ltsearch.train.train` resuming from the checkpoint: the same stage-2 epochs, but every step runs the
        frozen backbone and every epoch evaluates val + test through it (2 threads; data already loaded)
  (iii) a real `search.mode: staged` search through Ray (`run_search.py`; ResNet-8 stage 1 of 1 epoch, top_k 1,
        30 stage-2 trials, 1 CPU each, 2 concurrent): trials per minute of its stage-2 phase (an Optuna
        ask/tell loop over Ray tasks), from the first stage-2 trial's start to the last one's final result
        (`history.csv`).
  (iv)  the same 30-trial TPE search as a plain Optuna ask/tell loop (SQLite study) around (i) in one
        process, without Ray: what (iii) would be with no scheduling cost at all.
(i) and (ii) are interleaved (5 x (i), (ii), 5 x (i), (ii), ...). Stage-2 cost depends on the feature width (64
for every CIFAR ResNet here) and the training-set size, not on the backbone depth.
Target: at least 50 stage-2 trials per minute on this 2-core machine.

Command (docs/benchmarks.md, section 3; its idle rerun of (iii) adds --skip-local):

    LTSEARCH_DATA=/tmp/ltdata .venv/bin/python benchmarks/stage2_search_cost.py    # ~17 min on the 2-core machine
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from pathlib import Path

import yaml
from common import (
    private_ray_env,
    run_command,
    search_command,
    seconds,
    table,
    timed,
    train_command,
    trial_spans,
)

STAGE2 = {"epochs": 10, "batch_size": 64, "lr": 0.01, "loss": "cb_softmax_bce", "beta": 0.9999,
          "weight_decay": 0.1, "maxnorm_thresh": 0.1}
BASE = {"data": {"dataset": "cifar10", "imbalance_factor": 100}, "model": {"name": "resnet20"},
        "stage1": {"epochs": 1, "batch_size": 128, "lr": 0.1, "weight_decay": 5.0e-4},
        "stage2": dict(STAGE2, enabled=False)}


def sampled(rng: random.Random) -> dict:
    return {"stage2.weight_decay": 10 ** rng.uniform(-3, 0), "stage2.maxnorm_thresh": rng.uniform(0, 1),
            "stage2.beta": rng.choice([0.9, 0.99, 0.999, 0.9999])}


def stage2_phase_rate(exp: Path) -> dict:
    """Stage-2 trials of a staged experiment: count, span (first trial's start -> last result), trials/min."""
    import pandas as pd

    history = pd.read_csv(exp / "history.csv")
    history = history[history["phase"] == "stage2"]
    n = history["trial_id"].nunique()
    spans = trial_spans(history)
    span = spans["end"].max() - spans["start"].min()
    per_trial = history.groupby("trial_id")["time_total_s"].max()
    return {"trials": n, "span_s": float(span), "trials_per_min": 60 * n / span,
            "median_trial_time_total_s": float(per_trial.median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="(ii) runs; each preceded by --fit-per-rep (i) runs")
    parser.add_argument("--fit-per-rep", type=int, default=5)
    parser.add_argument("--stage2-trials", type=int, default=30, help="stage-2 trials of the Ray search (iii)")
    parser.add_argument("--skip-ray", action="store_true", help="only (i) and (ii)")
    parser.add_argument("--skip-local", action="store_true", help="only (iii)")
    args = parser.parse_args()

    os.environ.setdefault("LTSEARCH_DATA", "/tmp/ltdata")
    import torch

    work = Path(tempfile.mkdtemp(prefix="ltbench-s2-"))
    print(f"work dir {work}; torch {torch.__version__}", flush=True)
    if not args.skip_local:
        local_paths(args, work)
    if not args.skip_ray:
        ray_search(args, work)


def local_paths(args, work: Path) -> None:
    """(i) and (ii), interleaved, in this process."""
    import torch

    from ltsearch.build import load_data
    from ltsearch.config import ExperimentConfig, with_overrides
    from ltsearch.features import cache_features, fit_classifier
    from ltsearch.train import train

    config_path = work / "stage1.yaml"
    config_path.write_text(yaml.safe_dump(BASE))
    stage1 = run_command(train_command(config_path, work / "stage1"))
    print(f"stage-1 checkpoint (ResNet-20, 1 epoch): {stage1.wall_s:.1f} s", flush=True)

    torch.set_num_threads(2)
    config = ExperimentConfig.model_validate(BASE)
    checkpoint = str(work / "stage1" / "checkpoint")
    cache, cache_s = timed(cache_features, config, checkpoint, views=4)
    print(f"cache_features (4 views + val + test, 2 threads): {cache_s:.1f} s", flush=True)
    data = load_data(config)
    rng = random.Random(0)

    def trial_config():
        return with_overrides(config, {"stage2.enabled": True, **sampled(rng)})

    fit_s, fit1_s, resume_s = [], [], []
    for rep in range(args.reps):
        for _ in range(args.fit_per_rep):
            fit_s.append(seconds(fit_classifier, cache, trial_config()))
        print(f"  rep {rep} (i) fit_classifier: {', '.join(f'{t:.2f}' for t in fit_s[-args.fit_per_rep:])} s",
              flush=True)
        resume_s.append(seconds(train, trial_config(), resume_from=checkpoint, data=data))
        print(f"  rep {rep} (ii) train() resuming into stage 2: {resume_s[-1]:.1f} s", flush=True)
    torch.set_num_threads(1)
    for _ in range(args.fit_per_rep):
        fit1_s.append(seconds(fit_classifier, cache, trial_config()))
    print(f"  (i) fit_classifier, 1 thread: {', '.join(f'{t:.2f}' for t in fit1_s)} s", flush=True)

    # (iv) what a staged search's second phase could be: an Optuna loop (TPE, SQLite study, the same space)
    # calling fit_classifier in one process, with no Ray trial per configuration.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(2)
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{work / 'loop.db'}",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10, multivariate=True,
                                                                   group=True))

    def search_loop() -> None:
        for _ in range(args.stage2_trials):
            trial = study.ask()
            values = {"stage2.weight_decay": trial.suggest_float("stage2.weight_decay", 1e-3, 1.0, log=True),
                      "stage2.maxnorm_thresh": trial.suggest_float("stage2.maxnorm_thresh", 0.0, 1.0),
                      "stage2.beta": trial.suggest_categorical("stage2.beta", [0.9, 0.99, 0.999, 0.9999])}
            metrics = fit_classifier(cache, with_overrides(config, {"stage2.enabled": True, **values}),
                                     report=lambda m, t=trial: t.report(m["val_acc"], m["epoch"]))
            study.tell(trial, metrics["val_acc"])

    loop = seconds(search_loop) / args.stage2_trials
    print(f"  (iv) Optuna loop + fit_classifier in one process: {loop:.2f} s per trial", flush=True)

    fit, fit1, resume = statistics.median(fit_s), statistics.median(fit1_s), statistics.median(resume_s)
    print("\n" + table(["path", "s per trial (median)", "trials / min"], [
        ["(i) fit_classifier on cached features, 2 threads", f"{fit:.2f}", f"{60 / fit:.1f}"],
        [f"(i) fit_classifier, 1 thread (x2 concurrent = {2 * 60 / fit1:.1f} / min)", f"{fit1:.2f}", f"{60 / fit1:.1f}"],
        ["(ii) train() resumed into stage 2 (backbone rerun), 2 threads", f"{resume:.1f}", f"{60 / resume:.2f}"],
        ["(iv) Optuna ask/tell loop around (i), one process, 2 threads", f"{loop:.2f}", f"{60 / loop:.1f}"]]))
    print(f"(i) / (ii) speed-up: {resume / fit:.0f}x (2 threads each)", flush=True)


def ray_search(args, work: Path) -> None:
    """(iii): a staged search through run_search.py, in a private local Ray."""
    space = {"base": {**BASE, "model": {"name": "resnet8"}, "stage2": dict(STAGE2, enabled=True)},
             "space": {"stage1.weight_decay": {"choice": [5.0e-4]},
                       "stage2.weight_decay": {"loguniform": [1.0e-3, 1.0]},
                       "stage2.maxnorm_thresh": {"uniform": [0.0, 1.0]},
                       "stage2.beta": {"choice": [0.9, 0.99, 0.999, 0.9999]}},
             "search": {"mode": "staged", "num_samples": 1, "metric": "val_acc",
                        "staged": {"top_k": 1, "num_samples": args.stage2_trials, "views": 4},
                        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 10},
                        "resources": {"num_workers": 1, "cpus_per_worker": 1}}}
    space_path = work / "staged.yaml"
    space_path.write_text(yaml.safe_dump(space))
    search = run_command(search_command(space_path, work, "staged"), env=private_ray_env())
    rate = stage2_phase_rate(work / "staged")
    print(f"(iii) staged search via Ray: {search.wall_s:.0f} s in all; stage 2: {rate}")
    print(f"\n(iii) stage-2 trials per minute through Ray: {rate['trials_per_min']:.1f} (target >= 50)")


if __name__ == "__main__":
    main()
