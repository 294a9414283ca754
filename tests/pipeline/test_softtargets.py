"""Sampled targets' draws (pipeline.softtargets): a pure function of (seed, row, position), so any
batching draws the same ids; distributed as p_T (a chi-square test against the dense softmax of a
real tiny LM); deduplicated into ascending ids with counts summing to M."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import load_model
from pipeline.softtargets import Extractor, distinct_draws, sample_seed, uniforms

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_uniforms_are_keyed_not_sequential():
    rows, pos = np.array([5, 5, 9]), np.array([0, 1, 0])
    u = uniforms(7, rows, pos, 4)
    assert u.shape == (3, 4) and ((u >= 0) & (u < 1)).all()
    # the same (row, position) alone, or in another order, draws the same numbers
    np.testing.assert_array_equal(uniforms(7, rows[2:], pos[2:], 4), u[2:])
    np.testing.assert_array_equal(uniforms(7, rows[::-1], pos[::-1], 4), u[::-1])
    # the first draws do not depend on M; another seed, row or position draws others
    np.testing.assert_array_equal(uniforms(7, rows, pos, 2), u[:, :2])
    assert not np.isin(uniforms(8, rows, pos, 4), u).any()
    assert len(np.unique(u)) == u.size
    big = uniforms(3, np.arange(2000), np.zeros(2000, np.int64), 50)
    assert abs(big.mean() - 0.5) < 0.005 and abs(big.var() - 1 / 12) < 0.002  # 100k draws: ~6 sigma bounds


def test_sample_seed_comes_from_the_key():
    assert sample_seed("ab" * 32) == int("ab" * 8, 16) and sample_seed("cd" * 32) != sample_seed("ab" * 32)


def test_distinct_draws_dedupes_each_position():
    draws = np.array([[4, 1, 4, 4], [2, 2, 2, 2], [0, 3, 1, 2]])
    values = draws.astype(np.float64) / 10
    width, ids, counts, vals = distinct_draws(draws, values)
    assert width.tolist() == [2, 1, 4]
    assert ids.tolist() == [1, 4, 2, 0, 1, 2, 3]
    assert counts.tolist() == [1, 3, 4, 1, 1, 1, 1] and counts.dtype == np.uint16
    np.testing.assert_allclose(vals, ids / 10)


@pytest.fixture(scope="module")
def clm(models):
    return load_model(str(models["causal-lm"]), "causal-lm", dtype=torch.float32, device=torch.device("cpu"))


def _dense(model, ids: torch.Tensor, t: float) -> np.ndarray:
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double() / t
    return torch.softmax(z, -1).numpy()


def test_draws_follow_the_teacher_distribution(clm):
    """60,000 draws at one position: Pearson's chi-square against the float64 dense softmax of the same
    model, over the ids expected at least 5 times (the rest pooled), within a 5-sigma bound (seeded, so
    not flaky); and the stored values and lse are the model's z/T and logsumexp."""
    t, m = 2.0, 60000
    ids = torch.tensor([[5, 17, 33, 60, 91, 120]])
    ex = Extractor(clm, "causal-lm", None, t, samples=m, seed=sample_seed("0f" * 32))
    draws, vals, lse = ex(ids, torch.ones_like(ids), [[3]], [0])
    p = _dense(clm, ids, t)[3]
    observed = np.bincount(draws[0].numpy(), minlength=len(p))
    expected = p * m
    big = expected >= 5
    obs, exp = observed[big], expected[big]
    if (~big).any():
        obs, exp = np.append(obs, observed[~big].sum()), np.append(exp, expected[~big].sum())
    chi2, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
    with torch.no_grad():
        z = clm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 3].double() / t
    np.testing.assert_allclose(vals[0].numpy(), z[draws[0].long()].numpy(), atol=1e-5)
    assert abs(float(lse[0]) - float(torch.logsumexp(z, 0))) < 1e-5


def test_draws_do_not_depend_on_batching(clm):
    """Two rows in one batch or each alone (other padding, other slab) draw the same ids."""
    a, b = [5, 17, 33, 60, 91], [7, 8, 9]
    ex = Extractor(clm, "causal-lm", None, 1.0, samples=16, seed=123, slab_bytes=4096)
    ids = torch.tensor([a, b + [0, 0]])
    mask = torch.tensor([[1] * 5, [1] * 3 + [0, 0]])
    together = ex(ids, mask, [[0, 2, 3], [1, 2]], [10, 11])[0]
    alone_a = ex(torch.tensor([a]), torch.ones(1, 5, dtype=torch.long), [[0, 2, 3]], [10])[0]
    alone_b = ex(torch.tensor([b]), torch.ones(1, 3, dtype=torch.long), [[1, 2]], [11])[0]
    np.testing.assert_array_equal(together.numpy(), np.concatenate([alone_a.numpy(), alone_b.numpy()]))
    other_row = ex(torch.tensor([b]), torch.ones(1, 3, dtype=torch.long), [[1, 2]], [12])[0]
    assert not torch.equal(other_row, alone_b)
