"""How sure an evaluation is: paired comparisons of models scored on the same rows.

Two models evaluated on the same rows are compared pairwise, not each on its own: their
errors are correlated (the hard rows are hard for both), and a paired test sees a difference
that two independent intervals would hide. Two statistics:

* A paired bootstrap 95% interval of the metric difference a - b: resample *rows* (examples)
  with replacement, recompute both metrics on the same resample, keep the difference; the
  interval is its 2.5th and 97.5th percentiles. Rows, not positions, are the unit, so that a
  token-level task (tags, language modelling) keeps the correlation between the positions of
  one example. Each model contributes per-row sums (`num`, `den`): correct positions and
  labelled positions for accuracy, summed NLL and target tokens for mean NLL per token, so the
  metric of a resample is sum(num) / sum(den) -- the same ratio as on the whole split.
* McNemar's exact test for classification with one label per row (sequence classification):
  under "equally accurate", the b rows only a got right and the c rows only b got right are
  b + c fair coin flips, so p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))). Where a row
  holds several positions (token classification) the pairs are not independent, so no p-value
  is given there and the row-level interval decides.

Pure numpy (and math.comb for exact binomial tails): no scipy in the install, and the
arithmetic is small enough to check by hand (tests/pipeline/test_uncertainty.py does).
The resampling is seeded, so a rerun of the same evaluation reports the same interval.
"""

from __future__ import annotations

import math

import numpy as np

SEED = 0
LEVEL = 0.95
CHUNK_ELEMENTS = 1 << 22  # resample indices held at once (rows x resamples)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only a right) and c (only b right)."""
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def paired_bootstrap(num_a, num_b, den_a, den_b, resamples: int = 1000, seed: int = SEED,
                     level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """(diff, low, high): ratio metric of a minus that of b on the same rows, and its paired
    bootstrap interval (None with `resamples` 0 or no rows). Every resample draws row indices
    once and uses them for both models."""
    num_a, num_b, den_a, den_b = (np.asarray(x, dtype=np.float64) for x in (num_a, num_b, den_a, den_b))
    n = len(num_a)
    diff = _ratio(num_a.sum(), den_a.sum()) - _ratio(num_b.sum(), den_b.sum())
    if resamples <= 0 or n == 0:
        return diff, None, None
    rng = np.random.default_rng(seed)
    step = max(1, CHUNK_ELEMENTS // n)
    diffs = []
    for start in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - start), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            diffs.append(num_a[idx].sum(1) / den_a[idx].sum(1) - num_b[idx].sum(1) / den_b[idx].sum(1))
    diffs = np.concatenate(diffs)
    diffs = diffs[np.isfinite(diffs)]  # a resample of only unlabelled rows has no metric
    if not len(diffs):
        return diff, None, None
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return diff, float(low), float(high)


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else math.nan


def compare(models: list[dict], resamples: int, paired_test: bool, seed: int = SEED) -> list[dict]:
    """One record per ordered pair (a, b), a a student and b any other model, each `models`
    entry {"name", "role", "per_row"} with per_row {"metric", "rows", "num", "den"} (or None where
    the model's per-row scores are not exact: it is left out). Rows are matched by their id and
    taken in id order, so an interval does not depend on the order a model read them in (batches sorted by length)."""
    scored = [m for m in models if m.get("per_row") is not None]
    out = []
    for a in scored:
        if a["role"] != "student":
            continue
        for b in scored:
            if b is a or a["per_row"]["metric"] != b["per_row"]["metric"]:
                continue
            out.append(_pair(a, b, resamples, paired_test, seed))
    return out


def _pair(a: dict, b: dict, resamples: int, paired_test: bool, seed: int) -> dict:
    pa, pb = a["per_row"], b["per_row"]
    _, ia, ib = np.intersect1d(np.asarray(pa["rows"]), np.asarray(pb["rows"]), assume_unique=True, return_indices=True)
    na, nb, da, db = (np.asarray(x, dtype=np.float64)[i] for x, i in
                      ((pa["num"], ia), (pb["num"], ib), (pa["den"], ia), (pb["den"], ib)))
    diff, low, high = paired_bootstrap(na, nb, da, db, resamples, seed)
    p = None
    if paired_test:  # one labelled position per row: num is 0/1 correctness
        labelled = (da > 0) & (db > 0)
        right_a, right_b = na[labelled] > 0, nb[labelled] > 0
        p = mcnemar_exact(int((right_a & ~right_b).sum()), int((~right_a & right_b).sum()))
    return {"a": a["name"], "b": b["name"], "metric": pa["metric"], "diff": diff, "ci_low": low, "ci_high": high,
            "p_value": p, "n_rows": int(len(ia))}


def verdict(c: dict) -> str:
    """Whether a difference stands out from noise: the interval excludes 0 and, where there is
    one, McNemar's p < 0.05; 'not distinguishable' when neither says so."""
    says = []
    if c.get("ci_low") is not None:
        says.append(c["ci_low"] > 0 or c["ci_high"] < 0)
    if c.get("p_value") is not None:
        says.append(c["p_value"] < 1.0 - LEVEL)
    if not says:
        return "unknown (no interval: --bootstrap 0)"
    if all(says):
        return "distinguishable from noise"
    if not any(says):
        return "not distinguishable from noise"
    return "borderline (the interval and McNemar's test disagree)"
