"""How much a validation accuracy can be trusted, and choosing among configurations by it (no Ray).

A search ranks trials by a validation accuracy measured on a small, balanced validation set (CIFAR-10-LT
with 20 images per class: 200 images, so one image is half a point). This module gives each such accuracy
its sampling noise and says which trials the validation set cannot tell apart:

    accuracy_interval(30.5, 200)              # (24.5, 37.2): 95 % Wilson interval, in percent
    tied(30.5, 28.5, 200, 200)                # True: 4 images apart, well within the noise
    mcnemar_p(16, 4)                          # 0.012: the same 200 images, 16 won against 4 lost
    needed_validation_size(30.5, 2.0)         # ~4,100 images to resolve 2 points at 30.5 %

Choices, and why:
- The interval is Wilson's score interval on the POOLED counts (accuracy x images, out of images). The
  validation set is balanced and drawn per class, so the class-stratified variance (the mean of the
  per-class binomial variances, which needs per-class accuracies) is never larger than the pooled
  binomial one (law of total variance): the pooled interval is slightly conservative, and it applies to
  any accuracy a results row holds (overall, a shot group, tau-normalised) from its count of images alone.
  Wilson, not the normal approximation: it stays inside [0, 100] and is sound at 0 % or 100 %.
- "Tied with the best" is, where both trials kept their validation predictions, McNemar's EXACT test
  (`mcnemar_p`): trials are scored on the same images in the same order, so only the images on which they
  disagree carry information about which is better. Of the b images only the best got right and the c
  only the other got right, under "equally accurate" each of the b + c is the best's with probability 1/2,
  so b ~ Binomial(b + c, 1/2) and the two-sided p is 2 P(X <= min(b, c)), capped at 1. Tied when
  p >= 1 - CONFIDENCE (0.05). Exact, not the chi-squared approximation: near the top of a search the
  trials differ on a handful of images (b + c of 10 or 20), where the approximation is poor, and the
  binomial needs no distributional assumption beyond the validation images being independent draws.
  Paired, because two trained models' errors are strongly correlated (most images are easy or hard for
  both): two models that agree on 90 % of 200 images and differ by 6 points (b = 16, c = 4) are
  separated (p = 0.012) where the unpaired interval, which treats them as scored on different images,
  calls them tied (`tests/test_selection.py` builds that pair).
- The fallback, for a trial without predictions (an older result, a searched `data.*` key so that trials
  saw different validation images), is Newcombe's hybrid score interval for a difference of two
  proportions, built from the two Wilson intervals (Newcombe 1998, method 10): tied when that interval of
  (best - other) contains 0. It ignores the (positive) correlation between two models' errors, so it calls
  ties generously rather than separating trials on noise.
- What is kept, per trial: per-image correctness at the epoch its row is ranked by (for the classifier and
  its tau-normalised copy), as packed bits (`pack_correct`): one bit an image, so ImageNet-LT's 20,000
  validation images take 2,500 bytes per classifier; the trainer's `val_predictions.npy` (last and
  best-by-validation epoch, both classifiers) 10 KB, a stage-2 task's record (base64 in its Optuna trial's
  user attributes) 6.7 kB. Predicted labels would take 40 KB per classifier (uint16) for nothing the test
  needs: which images a model gets right is all McNemar's counts use, and a group objective
  (`val_acc_few`) selects its images by the true labels, which the driver has.
- The validation size needed to resolve a difference D at accuracy p is the normal-approximation size of
  that same unpaired test: n = 2 z^2 p (1 - p) / D^2, per configuration.

These intervals are the noise of the validation SET only; the noise of training (seed, data order) is
what `search.confirm` measures by re-training the top configurations with fresh seeds, choosing by the mean
over seeds (`confirmation_summary`). Test accuracies are never used to choose here.

An effect measured over seeds (`seed_effect`: method A against method B, each trained with seeds 0..n-1) is
paired by seed: seed s of both runs shares what a seed fixes (initialisation, batch order, augmentation), so
the per-seed differences cancel the part of the run-to-run noise the two have in common. Its interval is
Student's t on those n differences (n - 1 degrees of freedom, `t_quantile`), the textbook paired interval for
a handful of values: no bootstrap, which with 3 seeds has only 10 distinct resamples.
"""
from __future__ import annotations

import base64
import math
import re
from statistics import NormalDist

import numpy as np
import pandas as pd

__all__ = [
    "CONFIDENCE",
    "accuracy_interval",
    "compare_with_best",
    "confirmation_summary",
    "decode_correct",
    "encode_correct",
    "is_missing",
    "mcnemar_counts",
    "mcnemar_p",
    "metric_group",
    "needed_validation_size",
    "pack_correct",
    "resolution_note",
    "seed_effect",
    "t_quantile",
    "tied",
    "tied_with_best",
    "unpack_correct",
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


def mcnemar_counts(best: np.ndarray, other: np.ndarray) -> tuple[int, int]:
    """(b, c): images only `best` got right, images only `other` got right (boolean per-image correctness of
    two models on the same images in the same order)."""
    best, other = np.asarray(best, dtype=bool), np.asarray(other, dtype=bool)
    if best.shape != other.shape:
        raise ValueError(f"paired predictions must cover the same images: {best.shape} and {other.shape}")
    return int((best & ~other).sum()), int((~best & other).sum())


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p of McNemar's exact test: 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1
    (1 when the models never disagree). Integer arithmetic, exact for any count."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)  # int / int: correctly rounded however large


def tied_with_best(values: pd.Series, sizes: pd.Series, direction: str = "max",
                   correct: pd.Series | None = None) -> pd.Series:
    """Per row: tied with the row of the best value (which is tied with itself); `compare_with_best`'s rule.
    NA where a row has no value or no validation size."""
    return compare_with_best(values, sizes, direction, correct)["tied_with_best"]


def compare_with_best(values: pd.Series, sizes: pd.Series, direction: str = "max",
                      correct: pd.Series | None = None) -> pd.DataFrame:
    """Per row, against the row of the best value: `tied_with_best` (McNemar's exact test where both rows have
    per-image correctness in `correct`, each a boolean array over the same images; Newcombe's unpaired
    interval otherwise), `tie_test` (which decided: "mcnemar" or "newcombe"), `tied_unpaired` (Newcombe's
    answer, for every row), and for paired rows `only_best_right` / `only_trial_right` (McNemar's b and c)
    and `mcnemar_p`."""
    values, sizes = pd.to_numeric(values, errors="coerce"), pd.to_numeric(sizes, errors="coerce")
    out = pd.DataFrame({"tied_with_best": pd.Series(pd.NA, index=values.index, dtype="boolean"),
                        "tie_test": pd.Series(pd.NA, index=values.index, dtype="object"),
                        "tied_unpaired": pd.Series(pd.NA, index=values.index, dtype="boolean"),
                        "only_best_right": pd.Series(pd.NA, index=values.index, dtype="Int64"),
                        "only_trial_right": pd.Series(pd.NA, index=values.index, dtype="Int64"),
                        "mcnemar_p": pd.Series(math.nan, index=values.index, dtype="float")})
    known = values.notna() & sizes.notna() & (sizes > 0)
    if not known.any():
        return out
    best = values[known].idxmax() if direction == "max" else values[known].idxmin()
    best_correct = None if correct is None else _per_image(correct.get(best))
    for index in values[known].index:
        unpaired = tied(values[best], values[index], int(sizes[best]), int(sizes[index]))
        out.loc[index, "tied_unpaired"] = unpaired
        other = None if correct is None else _per_image(correct.get(index))
        if best_correct is None or other is None or best_correct.shape != other.shape:
            out.loc[index, ["tied_with_best", "tie_test"]] = [unpaired, "newcombe"]
            continue
        b, c = mcnemar_counts(best_correct, other)
        p = mcnemar_p(b, c)
        out.loc[index, ["only_best_right", "only_trial_right", "mcnemar_p"]] = [b, c, p]
        out.loc[index, ["tied_with_best", "tie_test"]] = [p >= 1 - CONFIDENCE, "mcnemar"]
    return out


def _per_image(value) -> np.ndarray | None:
    """A row's per-image correctness as a 1-d bool array; None for a missing one (None, NaN)."""
    return np.asarray(value, dtype=bool) if value is not None and np.ndim(value) == 1 else None


def pack_correct(correct: np.ndarray) -> np.ndarray:
    """Per-image correctness (boolean, images on the last axis) as uint8 bits, 8 images a byte."""
    return np.packbits(np.asarray(correct, dtype=bool), axis=-1)


def unpack_correct(packed: np.ndarray, images: int) -> np.ndarray:
    """`pack_correct` undone, for a validation set of `images` images."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=images).astype(bool)


def encode_correct(correct: np.ndarray) -> dict:
    """Per-image correctness as JSON (an Optuna user attribute): its shape and its packed bits in base64."""
    correct = np.asarray(correct, dtype=bool)
    return {"shape": list(correct.shape), "bits": base64.b64encode(pack_correct(correct).tobytes()).decode()}


def decode_correct(record: dict) -> np.ndarray:
    """`encode_correct` undone."""
    shape = tuple(record["shape"])
    packed = np.frombuffer(base64.b64decode(record["bits"]), dtype=np.uint8)
    return unpack_correct(packed.reshape(*shape[:-1], -1), shape[-1])


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
                    classes: int | None = None, correct: pd.Series | None = None) -> str | None:
    """One line when the validation set cannot resolve the search's top two trials (the runner-up is tied
    with the best by `compare_with_best`'s rule, paired where `correct` has both trials' per-image
    correctness): how many images it has, the best's interval, how many trials are tied (by the paired test
    and by the unpaired interval), and about how many images would resolve the gap. None when the top two
    are resolved (or there are fewer than two). `classes`: the classes behind the metric, to say the size
    per class."""
    frame = pd.DataFrame({"value": pd.to_numeric(values, errors="coerce"),
                          "n": pd.to_numeric(sizes, errors="coerce")}).dropna()
    if len(frame) < 2:
        return None
    frame = frame.sort_values("value", ascending=direction == "min", kind="stable")
    compared = compare_with_best(frame["value"], frame["n"], direction, correct)
    (best, n), (second, _) = frame.iloc[0], frame.iloc[1]
    if not compared.at[frame.index[1], "tied_with_best"]:
        return None
    n = int(n)
    ties, unpaired = int(compared["tied_with_best"].sum()), int(compared["tied_unpaired"].sum())
    paired = int((compared["tie_test"] == "mcnemar").sum())
    how = "" if not paired else (
        f" by McNemar's paired test on their validation predictions ({unpaired} by the unpaired interval"
        + (f"; {len(frame) - paired} without predictions judged unpaired)" if paired < len(frame) else ")"))
    gap = max(abs(best - second), 100 / n)  # equal values: one image is the smallest difference there is
    needed = needed_validation_size(best, gap)
    lo, hi = accuracy_interval(best, n)
    per_class = f" (data.val_per_class: {math.ceil(needed / classes):,})" if classes else ""
    return (f"validation has {n:,} images: the best trial's {best:.1f} % has a {CONFIDENCE:.0%} interval of "
            f"{lo:.1f}-{hi:.1f} %, and {ties} of {len(frame)} trials (the best included) are statistically tied "
            f"with it{how}; resolving the {gap:.1f}-point gap to the runner-up needs about {needed:,} validation "
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


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided `confidence` quantile of Student's t with `df` degrees of freedom (12.71 for 95 % and
    1; 4.30 for 2), by bisection on its exact CDF for integer df (Abramowitz & Stegun 26.7.3-4: finite
    sums in theta = atan(t / sqrt(df))). numpy and the standard library have no t distribution."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")

    def two_sided(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:  # odd
            for k in range(1, (df - 1) // 2):
                term *= cos2 * 2 * k / (2 * k + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    lo, hi = 0.0, 1.0
    while two_sided(hi) < confidence:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if two_sided(mid) < confidence else (lo, mid)
    return (lo + hi) / 2


def seed_effect(a: dict[int, float], b: dict[int, float], confidence: float = CONFIDENCE) -> dict:
    """A - B paired by seed (`a`, `b`: seed -> value; only the seeds both have count): `n`, the per-seed
    differences' `mean` and sample `std`, and the `confidence` interval `lo`-`hi` of the mean difference
    (Student's t, n - 1 degrees of freedom; NaN for n < 2), `survives`: the interval excludes 0, and the
    per-seed `differences` (in the order of `seeds`)."""
    seeds = sorted(set(a) & set(b))
    differences = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n = len(differences)
    mean = float(differences.mean()) if n else math.nan
    std = float(differences.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    lo, hi = mean - half, mean + half
    return {"seeds": seeds, "differences": differences.tolist(), "n": n, "mean": mean, "std": std, "lo": lo, "hi": hi,
            "survives": bool(n > 1 and (lo > 0 or hi < 0))}
