"""The statistics of pipeline.uncertainty against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import uncertainty as U


@pytest.mark.parametrize("b, c, p", [
    (1, 6, 2 * (1 + 7) / 128),            # n = 7: P(X <= 1) = (C(7,0) + C(7,1)) / 2^7
    (6, 1, 2 * (1 + 7) / 128),            # symmetric
    (0, 5, 2 * 1 / 32),                   # n = 5: P(X = 0) = 1/32
    (2, 8, 2 * (1 + 10 + 45) / 1024),     # n = 10: C(10,0) + C(10,1) + C(10,2)
    (3, 3, 1.0),                          # balanced: 2 * P(X <= 3) > 1, capped
    (0, 0, 1.0),                          # no discordant pairs: no evidence
])
def test_mcnemar_exact_by_hand(b, c, p):
    assert U.mcnemar_exact(b, c) == pytest.approx(p)


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    num, den = rng.integers(0, 5, 30).astype(float), np.full(30, 5.0)
    assert U.paired_bootstrap(num, num, den, den, 500) == (0.0, 0.0, 0.0)


def test_bootstrap_is_seeded_and_brackets_the_difference():
    rng = np.random.default_rng(2)
    a, b, ones = rng.random(60) < 0.8, rng.random(60) < 0.6, np.ones(60)
    first = U.paired_bootstrap(a, b, ones, ones, 1000)
    assert first == U.paired_bootstrap(a, b, ones, ones, 1000)   # the same seed: the same interval
    assert first != U.paired_bootstrap(a, b, ones, ones, 1000, seed=1)
    diff, low, high = first
    assert diff == pytest.approx(a.mean() - b.mean()) and low < diff < high
    assert U.paired_bootstrap(a, b, ones, ones, 0) == (pytest.approx(diff), None, None)


def test_bootstrap_resamples_rows_with_their_ratio():
    """A row of 10 tokens weighs 10 times a row of 1 (mean per token), and the rows are the unit:
    every resample of one row and its own tokens gives the same per-token value."""
    diff, low, high = U.paired_bootstrap([2.0, 20.0], [1.0, 10.0], [1.0, 10.0], [1.0, 10.0], 200)
    assert diff == pytest.approx(22 / 11 - 11 / 11) and low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_interval_coverage_is_near_95_percent():
    """Two classifiers of true accuracy 0.75 and 0.65 (correlated through shared hard rows): the
    interval should hold the true difference 0.10 in about 95% of repeated experiments."""
    rng = np.random.default_rng(3)
    hits, trials, n = 0, 300, 200
    for t in range(trials):
        hard = rng.random(n) < 0.3
        a = rng.random(n) < np.where(hard, 0.5, (0.75 - 0.3 * 0.5) / 0.7)
        b = rng.random(n) < np.where(hard, 0.3, (0.65 - 0.3 * 0.3) / 0.7)
        _, low, high = U.paired_bootstrap(a, b, np.ones(n), np.ones(n), 400, seed=t)
        hits += low <= 0.10 <= high
    assert 0.89 <= hits / trials <= 0.99


def test_compare_ordered_pairs_and_verdicts():
    rows = np.arange(40)
    right = np.r_[np.ones(30), np.zeros(10)]
    models = [{"name": "t", "role": "teacher", "per_row": {"metric": "accuracy", "rows": rows, "num": right, "den": np.ones(40)}},
              {"name": "s", "role": "student", "per_row": {"metric": "accuracy", "rows": rows[::-1],
                                                           "num": np.zeros(40), "den": np.ones(40)}},
              {"name": "u", "role": "student", "per_row": None}]
    (c,) = U.compare(models, 300, paired_test=True)
    assert (c["a"], c["b"], c["n_rows"], c["diff"]) == ("s", "t", 40, -0.75)
    assert c["p_value"] == pytest.approx(U.mcnemar_exact(0, 30)) and c["ci_high"] < 0
    assert U.verdict(c) == "distinguishable from noise"
    assert U.verdict({**c, "ci_low": -0.1, "ci_high": 0.1, "p_value": 0.5}) == "not distinguishable from noise"
    assert U.verdict({**c, "ci_low": -0.1, "ci_high": 0.1}).startswith("borderline")
