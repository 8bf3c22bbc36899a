"""What has the standard recipe measured (docs/STANDARD.md, "What has been measured")? Prints that table's
rows from the result files committed under docs/standard/.

Method. Each subfolder is one run, recognised by what it holds:
- `metrics.json` (+ `config.yaml`): a `python -m ltsearch train --out DIR` run. Rows: the epoch chosen on
  validation, the final epoch, and the chosen epoch after post-hoc tau (`posthoc.tau` of its config).
- `reference.json`: `benchmarks/reference_cifar_lt.py`. Rows: the final epoch, and the best test accuracy over
  evaluated epochs (selected ON THE TEST SET, as the published code does; context only).
- `results.csv` + `space.yaml`: a staged search on a finished run (`search.staged.stage1_run`). Row: the best
  stage-2 trial by the search's metric (validation), with its test accuracy (tau-normalised when the metric
  is a `tau_*` one).
Accuracies in percent; head / middle / tail are thirds of the classes by training-set size.

Command (docs/STANDARD.md):

    python benchmarks/standard_table.py docs/standard
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml
from common import table

from ltsearch.data import tercile_groups
from ltsearch.metrics import is_missing
from ltsearch.search.results import best_row
from ltsearch.space import load_search_space

GROUPS = ("head", "middle", "tail")


def _row(name: str, rule: str, values: dict) -> list[str]:
    def pct(v):
        return "" if is_missing(v) else f"{float(v):.2f}"
    return [name, rule, *(pct(values.get(g)) for g in ("", *GROUPS))]


def _groups(metrics: dict, prefix: str) -> dict:
    return {"": metrics.get(prefix), **{g: metrics.get(f"{prefix}_{g}") for g in GROUPS}}


def ltsearch_rows(folder: Path) -> list[list[str]]:
    summary = json.loads((folder / "metrics.json").read_text())["stage1"]
    tau = yaml.safe_load((folder / "config.yaml").read_text())["posthoc"]["tau"]
    return [_row(folder.name, f"val-selected (epoch {summary['best_epoch']})", _groups(summary["best"], "test_acc")),
            _row(folder.name, "final", _groups(summary["final"], "test_acc")),
            _row(folder.name, f"val-selected, post-hoc tau {tau:g}", _groups(summary["best"], "tau_test_acc"))]


def reference_rows(folder: Path) -> list[list[str]]:
    result = json.loads((folder / "reference.json").read_text())
    per_class = result["final_per_class_test_acc"]
    final = {"": result["final_test_acc"],
             **{g: sum(per_class[c] for c in cs) / len(cs)
                for g, cs in tercile_groups(result["class_counts"]).items()}}
    return [_row(folder.name, "final", final),
            _row(folder.name, f"TEST-selected (epoch {result['best_epoch_test_selected']})",
                 {"": result["best_test_acc_test_selected"]})]


def staged_rows(folder: Path) -> list[list[str]]:
    settings = load_search_space(folder / "space.yaml").search
    best = best_row(pd.read_csv(folder / "results.csv"), settings)
    prefix = "final_tau_test_acc" if settings.metrics[0].startswith("tau_") else "final_test_acc"
    return [_row(folder.name, f"best of {settings.staged.num_samples} by {settings.metrics[0]}",
                 _groups(best.to_dict(), prefix))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="docs/standard")
    args = parser.parse_args()
    rows = []
    for folder in sorted(p for p in args.folder.iterdir() if p.is_dir()):
        if (folder / "metrics.json").exists():
            rows += ltsearch_rows(folder)
        elif (folder / "reference.json").exists():
            rows += reference_rows(folder)
        elif (folder / "results.csv").exists():
            rows += staged_rows(folder)
    print(table(["run", "rule", "test", *GROUPS], rows))


if __name__ == "__main__":
    main()
