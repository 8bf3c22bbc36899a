"""How much a validation accuracy can be trusted, and choosing among configurations by it (no Ray).

A search ranks trials by a validation accuracy measured on a small, balanced validation set (CIFAR-10-LT
with 20 images per class: 200 images, so one image is half a point). This module gives each such accuracy
its sampling noise and says which trials the validation set cannot tell apart:

    accuracy_interval(30.5, 200)              # (24.5, 37.2): 95 % Wilson interval, in percent
    tied(30.5, 28.5, 200, 200)                # True: 4 images apart, well within the noise
    needed_validation_size(30.5, 2.0)         # ~4,100 images to resolve 2 points at 30.5 %

Choices, and why:
- The interval is Wilson's score interval on the POOLED counts (accuracy x images, out of images). The
  validation set is balanced and drawn per class, so the class-stratified variance (the mean of the
  per-class binomial variances, which needs per-class accuracies) is never larger than the pooled
  binomial one (law of total variance): the pooled interval is slightly conservative, and it applies to
  any accuracy a results row holds (overall, a shot group, tau-normalised) from its count of images alone.
  Wilson, not the normal approximation: it stays inside [0, 100] and is sound at 0 % or 100 %.
- "Tied with the best" is Newcombe's hybrid score interval for a difference of two proportions, built
  from the two Wilson intervals (Newcombe 1998, method 10): tied when that interval of (best - other)
  contains 0. Trials are scored on the same images, so a paired test (McNemar) would be sharper, but it
  needs per-image predictions, which no result keeps; the unpaired test ignores the (positive) correlation
  between two models' errors, so it calls ties generously rather than separating trials on noise.
- The validation size needed to resolve a difference D at accuracy p is the normal-approximation size of
  that same unpaired test: n = 2 z^2 p (1 - p) / D^2, per configuration.

These intervals are the noise of the validation SET only; the noise of training (seed, data order) is
what `search.confirm` measures by re-training the top configurations with fresh seeds, choosing by the mean
over seeds (`confirmation_summary`). Test accuracies are never used here.
"""
from __future__ import annotations

import math
import re
from statistics import NormalDist

import numpy as np
import pandas as pd

__all__ = [
    "CONFIDENCE",
    "accuracy_interval",
    "confirmation_summary",
    "is_missing",
    "metric_group",
    "needed_validation_size",
    "resolution_note",
    "tied",
    "tied_with_best",
    "wilson_interval",
]

CONFIDENCE = 0.95
_Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)  # 1.95996


def is_missing(value) -> bool:
    """A metric or table value that is absent: None or NaN (an absent group is missing, never 0)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def wilson_interval(correct: float, n: int, z: float = _Z) -> tuple[float, float]:
    """Wilson score interval (fractions) of a proportion with `correct` successes out of `n`."""
    if n <= 0:
        return (math.nan, math.nan)
    p = min(max(correct / n, 0.0), 1.0)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (0.0 if p == 0 else max(centre - half, 0.0), 1.0 if p == 1 else min(centre + half, 1.0))


def accuracy_interval(accuracy: float, n: int, z: float = _Z) -> tuple[float, float]:
    """95 % interval (percent) of an accuracy (percent) measured on `n` images; (nan, nan) when either is
    missing."""
    if accuracy is None or n is None or not (math.isfinite(accuracy) and n and n > 0):
        return (math.nan, math.nan)
    low, high = wilson_interval(accuracy / 100 * n, int(n), z)
    return (100 * low, 100 * high)


def tied(best: float, other: float, n_best: int, n_other: int, z: float = _Z) -> bool:
    """Whether two accuracies (percent) on `n_best` and `n_other` images cannot be told apart: Newcombe's
    interval of the difference (from the two Wilson intervals) contains 0."""
    lo_b, hi_b = accuracy_interval(best, n_best, z)
    lo_o, hi_o = accuracy_interval(other, n_other, z)
    if math.isnan(lo_b) or math.isnan(lo_o):
        return False
    if best >= other:  # lower end of best - other, with the best's lower and the other's upper distance
        return best - other <= math.hypot(best - lo_b, hi_o - other)
    return other - best <= math.hypot(hi_b - best, other - lo_o)


def tied_with_best(values: pd.Series, sizes: pd.Series, direction: str = "max") -> pd.Series:
    """Per row: tied with the row of the best value (which is tied with itself). NA where a row has no
    value or no validation size."""
    values, sizes = pd.to_numeric(values, errors="coerce"), pd.to_numeric(sizes, errors="coerce")
    out = pd.Series(pd.NA, index=values.index, dtype="boolean")
    known = values.notna() & sizes.notna() & (sizes > 0)
    if not known.any():
        return out
    best = values[known].idxmax() if direction == "max" else values[known].idxmin()
    for index in values[known].index:
        out[index] = tied(values[best], values[index], int(sizes[best]), int(sizes[index]))
    return out


def needed_validation_size(accuracy: float, difference: float, z: float = _Z) -> int:
    """Validation images needed for a `difference` (points) at `accuracy` (percent) to be resolved by
    `tied`'s test: 2 z^2 p (1 - p) / D^2 (normal approximation), rounded up."""
    p, d = accuracy / 100, difference / 100
    p = min(max(p, 0.5 / 100), 1 - 0.5 / 100)  # at 0 % or 100 % the approximation says 0: use half a point
    return math.ceil(2 * z * z * p * (1 - p) / (d * d))


_ACCURACY = re.compile(r"(?:best_|final_)?(?:tau_)?val_acc(?:_(\w+))?")


def metric_group(metric: str) -> str | None:
    """The validation accuracy group a metric measures: `val_acc` / `tau_val_acc` -> "overall",
    `val_acc_few` -> "few"; None for a metric that is no validation accuracy (a loss, a training metric)."""
    match = _ACCURACY.fullmatch(metric)
    return None if match is None else (match.group(1) or "overall")


def resolution_note(values: pd.Series, sizes: pd.Series, direction: str = "max",
                    classes: int | None = None) -> str | None:
    """One line when the validation set cannot resolve the search's top two trials (the runner-up is tied
    with the best): how many images it has, the best's interval, how many trials are tied, and about how
    many images would resolve the gap. None when the top two are resolved (or there are fewer than two).
    `classes`: the classes behind the metric, to say the size per class."""
    frame = pd.DataFrame({"value": pd.to_numeric(values, errors="coerce"),
                          "n": pd.to_numeric(sizes, errors="coerce")}).dropna()
    if len(frame) < 2:
        return None
    frame = frame.sort_values("value", ascending=direction == "min")
    (best, n), (second, n2) = frame.iloc[0], frame.iloc[1]
    if not tied(best, second, int(n), int(n2)):
        return None
    n = int(n)
    ties = int(tied_with_best(frame["value"], frame["n"], direction).sum())
    gap = max(abs(best - second), 100 / n)  # equal values: one image is the smallest difference there is
    needed = needed_validation_size(best, gap)
    lo, hi = accuracy_interval(best, n)
    per_class = f" (data.val_per_class: {math.ceil(needed / classes):,})" if classes else ""
    return (f"validation has {n:,} images: the best trial's {best:.1f} % has a {CONFIDENCE:.0%} interval of "
            f"{lo:.1f}-{hi:.1f} %, and {ties} of {len(frame)} trials (the best included) are statistically tied "
            f"with it; resolving the {gap:.1f}-point gap to the runner-up needs about {needed:,} validation "
            f"images{per_class}, or confirm the top trials with fresh seeds (search.confirm)")


def confirmation_summary(runs: pd.DataFrame, direction: str = "max",
                         columns: tuple[str, ...] = ("objective", "final_val_acc", "final_test_acc",
                                                     "final_tau_val_acc", "final_tau_test_acc")) -> pd.DataFrame:
    """One row per confirmed configuration from its seed runs (one row each: `confirmed_trial`, `seed`,
    `status`, and `columns`): seeds run and succeeded, and mean and standard deviation over the successful
    seeds of each of `columns` (`mean_objective`, `std_objective`, `mean_val_acc`, ...), best first.

    The final choice is the first row: the best MEAN objective (validation) among configurations whose seed
    runs all succeeded (a run that failed or diverged is a property of the configuration, so such a
    configuration ranks after every complete one). Test columns are summarised, never ranked on."""
    present = [c for c in columns if c in runs]
    rows = []
    for trial_id, group in runs.groupby("confirmed_trial", sort=False):
        ok = group[(group["status"] != "ERROR") & group["objective"].notna()]
        row = {"confirmed_trial": trial_id, "seeds": " ".join(str(int(s)) for s in group["seed"]),
               "runs": len(group), "runs_ok": len(ok)}
        for column in present:
            name = column.removeprefix("final_")
            values = pd.to_numeric(ok[column], errors="coerce").dropna()
            row[f"mean_{name}"] = values.mean() if len(values) else math.nan
            row[f"std_{name}"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["complete"] = table["runs_ok"] == table["runs"]
    mean = table["mean_objective"] if direction == "max" else -table["mean_objective"]
    order = np.lexsort((-mean.fillna(-np.inf).to_numpy(), ~table["complete"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(1, "confirm_rank", np.arange(1, len(table) + 1))
    return table.drop(columns="complete")
