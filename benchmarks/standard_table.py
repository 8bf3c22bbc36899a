"""What has the standard recipe measured (docs/STANDARD.md)? Prints every row of the result files committed
under docs/standard/ as the mean and sample standard deviation over its seeds, next to the published figure,
then the effects docs/STANDARD.md states (weight balancing; the long-tailed losses over CE), paired by seed.

Method. Each subfolder is one run of one seed: ROW/ is seed 0, ROW_seed{s}/ seed s (the seed its config was
trained with, checked). A run is recognised by what it holds:
- `metrics.json` (+ `config.yaml`): a `python -m ltsearch train --out DIR` run. Rules: the epoch chosen on
  validation, the final epoch, and the chosen epoch after post-hoc tau (`posthoc.tau` of its config).
- `reference.json`: `benchmarks/reference_cifar_lt.py`. Rules: the final epoch, and the best test accuracy over
  evaluated epochs (selected ON THE TEST SET, as the published code does; context only).
- `results.csv` + `space.yaml`: a staged search on a finished run (`search.staged.stage1_run`). Rule: the best
  stage-2 trial by the search's metric (validation), with its test accuracy (tau-normalised when the metric
  is a `tau_*` one).
Test accuracies in percent; head / middle / tail are thirds of the classes by training-set size (means over
seeds). An effect is A - B per seed over the seeds both rows have, with Student's t interval of the mean
difference (`ltsearch.selection.seed_effect`); it survives when that interval excludes 0.

Commands (docs/STANDARD.md):

    python benchmarks/standard_table.py docs/standard
    python benchmarks/standard_table.py docs/standard --csv     # row, n_seeds, mean, std, published
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import yaml
from common import table

from ltsearch.data import tercile_groups
from ltsearch.metrics import is_missing
from ltsearch.search.results import best_row
from ltsearch.selection import seed_effect
from ltsearch.space import load_search_space

GROUPS = ("head", "middle", "tail")
VAL, FINAL, TAU, TEST_SELECTED = "val-selected", "final", "val-selected + post-hoc tau 1", "TEST-selected"
STAGE2 = "best of 30 by val_acc"

# (row, rule) -> the published figure it is read against, as context: other data copies and selection rules,
# and for weight balancing another dataset (CIFAR-100-LT IF 100; the paper has no CIFAR-10-LT figure).
PUBLISHED = {
    ("ce_step_a", VAL): 70.36,  # Cao et al. 2019 (LDAM), Table 2, ERM, test-selected
    ("reference", TEST_SELECTED): 70.36,  # the same figure, which the reference's own rule reproduces
    ("ldam_drw", VAL): 77.03,  # Cao et al. 2019, Table 2: error 22.97, test-selected
    ("logit_adjusted", VAL): 77.67,  # Menon et al. 2021, arXiv v2 Table 3: balanced error 22.33, mean of 5
    ("wb_wd0", VAL): 38.38,  # Alshammari et al. 2022, CIFAR-100-LT: naive
    ("wb_wd5e-3", VAL): 46.08,  # the same: weight decay
    ("wb_wd5e-3", TAU): 51.31,  # the same: weight decay + tau (tau 1.9)
    ("wb_stage2_c10lt", STAGE2): 53.35,  # the same: weight decay + stage 2 (MaxNorm)
}

# name -> (A, B): the effects docs/STANDARD.md states, A - B paired by seed
EFFECTS = {
    "weight decay 5e-3 over 0 (stage 1, val-selected)": (("wb_wd5e-3", VAL), ("wb_wd0", VAL)),
    "weight decay 5e-3 over 0 (stage 1, final)": (("wb_wd5e-3", FINAL), ("wb_wd0", FINAL)),
    "stage 2 over its stage 1 (weight decay 5e-3)": (("wb_stage2_c10lt", STAGE2), ("wb_wd5e-3", VAL)),
    "stage 2 over its stage 1 + post-hoc tau 1": (("wb_stage2_c10lt", STAGE2), ("wb_wd5e-3", TAU)),
    "post-hoc tau 1 on stage 1 (weight decay 5e-3)": (("wb_wd5e-3", TAU), ("wb_wd5e-3", VAL)),
    "LDAM-DRW over CE (final)": (("ldam_drw", FINAL), ("ce_step_a", FINAL)),
    "LDAM-DRW over CE (val-selected)": (("ldam_drw", VAL), ("ce_step_a", VAL)),
    "logit-adjusted over CE (final)": (("logit_adjusted", FINAL), ("ce_step_a", FINAL)),
    "logit-adjusted over CE (val-selected)": (("logit_adjusted", VAL), ("ce_step_a", VAL)),
}

_SEED = re.compile(r"(.+)_seed(\d+)")


def row_and_seed(folder: Path) -> tuple[str, int]:
    """ROW_seed{s} -> (ROW, s); any other name is seed 0 of itself."""
    match = _SEED.fullmatch(folder.name)
    return (match.group(1), int(match.group(2))) if match else (folder.name, 0)


def _groups(values: dict, prefix: str) -> dict:
    return {"test": values.get(prefix), **{g: values.get(f"{prefix}_{g}") for g in GROUPS}}


def _trained_seed(folder: Path, seed: int, config: dict) -> None:
    if config["trainer"]["seed"] != seed:
        sys.exit(f"{folder}: trained with trainer.seed={config['trainer']['seed']}, but its name says seed {seed}")


def ltsearch_rules(folder: Path, seed: int) -> dict[str, dict]:
    summary = json.loads((folder / "metrics.json").read_text())["stage1"]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    _trained_seed(folder, seed, config)
    return {VAL: _groups(summary["best"], "test_acc"), FINAL: _groups(summary["final"], "test_acc"),
            f"val-selected + post-hoc tau {config['posthoc']['tau']:g}": _groups(summary["best"], "tau_test_acc")}


def reference_rules(folder: Path, seed: int) -> dict[str, dict]:
    result = json.loads((folder / "reference.json").read_text())
    per_class = result["final_per_class_test_acc"]
    final = {"test": result["final_test_acc"],
             **{g: sum(per_class[c] for c in cs) / len(cs) for g, cs in tercile_groups(result["class_counts"]).items()}}
    return {FINAL: final, TEST_SELECTED: {"test": result["best_test_acc_test_selected"]}}


def staged_rules(folder: Path, seed: int) -> dict[str, dict]:
    spec = load_search_space(folder / "space.yaml")
    _trained_seed(folder, seed, spec.base.model_dump())
    settings = spec.search
    best = best_row(pd.read_csv(folder / "results.csv"), settings)
    prefix = "final_tau_test_acc" if settings.metrics[0].startswith("tau_") else "final_test_acc"
    return {f"best of {settings.staged.num_samples} by {settings.metrics[0]}": _groups(best.to_dict(), prefix)}


def measurements(root: Path) -> pd.DataFrame:
    """One row per (row, rule, seed): test, head, middle, tail."""
    records = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        row, seed = row_and_seed(folder)
        if (folder / "metrics.json").exists():
            rules = ltsearch_rules(folder, seed)
        elif (folder / "reference.json").exists():
            rules = reference_rules(folder, seed)
        elif (folder / "results.csv").exists():
            rules = staged_rules(folder, seed)
        else:
            continue
        for rule, values in rules.items():
            records.append({"row": row, "rule": rule, "seed": seed,
                            **{k: math.nan if is_missing(v) else float(v) for k, v in values.items()}})
    return pd.DataFrame(records)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (row, rule), in the order first seen: n_seeds, seeds, mean and sample std of test, group means."""
    rows = []
    for (row, rule), runs in frame.groupby(["row", "rule"], sort=False):
        test = runs["test"].dropna()
        rows.append({"row": row, "rule": rule, "n_seeds": len(runs), "seeds": " ".join(map(str, sorted(runs["seed"]))),
                     "mean": test.mean(), "std": test.std(ddof=1) if len(test) > 1 else math.nan,
                     **{g: runs[g].mean() for g in GROUPS if g in runs},
                     "published": PUBLISHED.get((row, rule), math.nan)})
    return pd.DataFrame(rows)


def effects(frame: pd.DataFrame) -> list[dict]:
    def by_seed(row: str, rule: str) -> dict[int, float]:
        runs = frame[(frame["row"] == row) & (frame["rule"] == rule)].dropna(subset=["test"])
        return dict(zip(runs["seed"], runs["test"]))
    return [{"effect": name, **seed_effect(by_seed(*a), by_seed(*b))} for name, (a, b) in EFFECTS.items()]


def _num(value: float, fmt: str = ".2f") -> str:
    return "" if is_missing(value) or math.isnan(value) else f"{value:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="docs/standard")
    parser.add_argument("--csv", action="store_true", help="the rows as CSV: row, n_seeds, mean, std, published")
    args = parser.parse_args()
    frame = measurements(args.folder)
    rows = summary(frame)
    if args.csv:
        out = rows.assign(row=rows["row"] + " (" + rows["rule"] + ")")
        print(out[["row", "n_seeds", "mean", "std", "published"]].to_csv(index=False, float_format="%.2f"), end="")
        return
    print(table(["row", "rule", "n", "test, mean ± std", *GROUPS, "published (context)"],
                [[r["row"], r["rule"], r["n_seeds"],
                  _num(r["mean"]) + (f" ± {r['std']:.2f}" if not math.isnan(r["std"]) else ""),
                  *(_num(r[g], ".1f") for g in GROUPS), _num(r["published"])] for _, r in rows.iterrows()]))
    print()
    print(table(["effect (test points, A - B)", "seeds", "per seed", "mean ± std", "95% interval, paired by seed",
                 "survives"],
                [[e["effect"], " ".join(map(str, e["seeds"])),
                  ", ".join(f"{d:+.2f}" for d in e["differences"]),
                  _num(e["mean"], "+.2f") + (f" ± {e['std']:.2f}" if not math.isnan(e["std"]) else ""),
                  "" if math.isnan(e["lo"]) else f"{e['lo']:+.2f} to {e['hi']:+.2f}",
                  "yes" if e["survives"] else "no" if e["n"] > 1 else "n = 1: untested"]
                 for e in effects(frame)]))


if __name__ == "__main__":
    main()
