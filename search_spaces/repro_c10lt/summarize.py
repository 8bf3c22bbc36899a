"""The reproduction study's table (docs/RESULTS.md) from the folder `run_study.sh` wrote.

Every number is a TEST accuracy of a model or value selected on VALIDATION only:
- single runs (naive, WD 5e-3, NBN): the stage-1 epoch with the best validation accuracy (`metrics.json`);
- searched WD: the stage-1 trial of `two_stage-s{seed}` (the searched WD, retrained with that seed), its
  best-by-validation epoch, read from the trial's checkpoint;
- + tau: the `tau-s{seed}` trial with the best validation accuracy after tau-normalisation;
- full two-stage: the `two_stage-s{seed}` stage-2 trial with the best validation accuracy.
Head / middle / tail are class terciles by training-set size (CIFAR-10-LT IF 100 has no class under 20
images, so the many / medium / few split is degenerate: every class is "many" or "medium").

    python search_spaces/repro_c10lt/summarize.py runs/repro_c10lt   # table.csv, per_class.csv, per_class.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna
import pandas as pd
import plotly.express as px
import torch

GROUPS = ("head", "middle", "tail")


def _row(method: str, seed: int, metrics: dict, prefix: str, selected: str) -> dict:
    """`prefix` is `test` or `tau_test`: which classifier's test metrics the row reports."""
    val = prefix.replace("test", "val")
    return {"method": method, "seed": seed, "selected": selected, "val_acc": metrics[f"{val}_acc"],
            "test_acc": metrics[f"{prefix}_acc"], **{g: metrics[f"{prefix}_acc_{g}"] for g in GROUPS},
            "per_class": metrics[f"{prefix}_per_class_acc"]}


def single_run(folder: Path, method: str, seed: int) -> dict:
    summary = json.loads((folder / "metrics.json").read_text())
    best = summary["stage1"]["best"]
    return _row(method, seed, best, "test", f"epoch {best['epoch']}")


def _best_stage2(exp: Path, metric: str) -> tuple[pd.Series, dict]:
    """The stage-2 row of results.csv with the best final `metric`, and its Optuna per-class attributes."""
    table = pd.read_csv(exp / "results.csv", dtype={"trial_id": str, "stage1_trial": str})
    stage2 = table[(table["phase"] == "stage2") & (table["status"] != "ERROR")]
    best = stage2.loc[stage2[f"final_{metric}"].idxmax()]
    study = optuna.load_study(study_name="stage2", storage=f"sqlite:///{exp / 'optuna.db'}")
    number = int(best["trial_id"].rsplit("_", 1)[1])
    return best, study.trials[number].user_attrs["per_class"]


def _final(best: pd.Series, per_class: dict, prefix: str) -> dict:
    val = prefix.replace("test", "val")
    return {f"{val}_acc": best[f"final_{val}_acc"], f"{prefix}_acc": best[f"final_{prefix}_acc"],
            **{f"{prefix}_acc_{g}": best[f"final_{prefix}_acc_{g}"] for g in GROUPS},
            f"{prefix}_per_class_acc": per_class[f"{prefix}_per_class_acc"]}


def searched_wd(exp: Path, seed: int) -> dict:
    table = pd.read_csv(exp / "results.csv", dtype={"trial_id": str, "stage1_trial": str})
    stage1 = table[table["phase"] == "stage1"].iloc[0]
    state = torch.load(Path(stage1["checkpoint"]) / "state.pt", map_location="cpu", weights_only=False)
    best = state["best"][1]["metrics"]
    wd = state["config"]["stage1"]["weight_decay"]
    return _row("stage 1, searched WD", seed, best, "test", f"epoch {best['epoch']}, WD {wd:.3g}")


def tau_row(exp: Path, seed: int) -> dict:
    best, per_class = _best_stage2(exp, "tau_val_acc")
    return _row("+ tau-norm (tau searched)", seed, _final(best, per_class, "tau_test"), "tau_test",
                f"tau {best['posthoc.tau']:.2f}")


def two_stage_row(exp: Path, seed: int) -> dict:
    best, per_class = _best_stage2(exp, "val_acc")
    return _row("two-stage (CB loss + WD + MaxNorm searched)", seed, _final(best, per_class, "test"), "test",
                f"WD {best['stage2.weight_decay']:.3g}, MaxNorm {best['stage2.maxnorm_thresh']:.2f}, "
                f"beta {best['stage2.beta']:g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the folder run_study.sh wrote (runs/repro_c10lt)")
    study = Path(parser.parse_args().study)
    rows = []
    for seed in (0, 1):
        sources = [(study / f"naive-s{seed}", lambda p, s: single_run(p, "naive: CE, WD 0", s)),
                   (study / f"wd5e-3-s{seed}", lambda p, s: single_run(p, "stage 1, the paper's WD 5e-3", s)),
                   (study / f"two_stage-s{seed}", searched_wd),
                   (study / f"tau-s{seed}", tau_row),
                   (study / f"two_stage-s{seed}", two_stage_row),
                   (study / f"nbn-s{seed}", lambda p, s: single_run(p, "NBN, searched WD", s))]
        for path, build in sources:
            done = (path / "metrics.json").exists() or (path / "summary.json").exists()
            if done:
                rows.append(build(path, seed))
            else:
                print(f"skipped (not finished): {path}", file=sys.stderr)
    frame = pd.DataFrame(rows)
    names = json.loads((study / "naive-s0" / "metrics.json").read_text())["class_names"]
    counts = json.loads((study / "naive-s0" / "metrics.json").read_text())["class_counts"]
    per_class = pd.DataFrame(frame["per_class"].tolist(), columns=[f"{n} ({c})" for n, c in zip(names, counts)])
    per_class.insert(0, "seed", frame["seed"])
    per_class.insert(0, "method", frame["method"])
    frame = frame.drop(columns="per_class")
    frame.to_csv(study / "table.csv", index=False)
    per_class.to_csv(study / "per_class.csv", index=False)
    order = list(dict.fromkeys(frame["method"]))
    numbers = ["val_acc", "test_acc", *GROUPS]
    mean = frame.groupby("method", sort=False)[numbers].agg(["mean", "std", "count"])
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 2):
        print(frame.to_string(index=False))
        print(mean.loc[order])
        print(per_class.groupby("method", sort=False).mean(numeric_only=True).drop(columns="seed").loc[order].T)
    means = per_class.drop(columns="seed").groupby("method", sort=False).mean().loc[order]
    tidy = means.reset_index().melt(id_vars="method", var_name="class (train images)", value_name="test acc")
    fig = px.bar(tidy, x="class (train images)", y="test acc", color="method", barmode="group",
                 title="Per-class test accuracy, CIFAR-10-LT IF 100, ResNet-8 (mean over seeds; selected on val)")
    fig.update_layout(width=1200, height=500, legend={"orientation": "h", "y": -0.25})
    fig.write_image(study / "per_class.png")  # kaleido needs a Chromium (see README, Analysis)
    print(f"wrote {study / 'table.csv'}, {study / 'per_class.csv'} and {study / 'per_class.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
