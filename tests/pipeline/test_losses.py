"""Tests for pipeline/losses.py against plain, independent float64 references.

The references never use the cache: they start from the dense teacher logits z, take full
softmaxes, and sum buckets by hand, so a mistake in the cache arithmetic (lse, tail, masks)
shows up as a mismatch.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import KDError
from pipeline.losses import (LOSSES, LseChoice, cache_grid, choose_lse, distillation_loss, kd_loss_sum, sampled_kd_sum,
                             teacher_log_probs)


def make_cache(z, k, cache_t, dtype=torch.float32):
    """Build the cached soft targets of the contract from dense teacher logits z [N, V].
    lse is float32 as in the contract, except for float64 caches used for exactness checks."""
    ids = torch.argsort(z, dim=-1, descending=True)[:, :k]
    scaled = z.double() / cache_t
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return ids, scaled.gather(1, ids).to(dtype), torch.logsumexp(scaled, dim=-1).to(lse_dtype)


def buckets(full_probs, ids_row):
    """Probabilities of the k ids, then (if any ids are left) the summed rest."""
    rest = torch.ones(full_probs.numel(), dtype=torch.bool)
    rest[ids_row] = False
    parts = [full_probs[ids_row]]
    if rest.any():
        parts.append(full_probs[rest].sum().reshape(1))
    return torch.cat(parts)


def divergence(loss, p, q):
    """Plain per-row divergence, term by term; terms with zero weight are skipped."""
    def kl(a, b):
        total = torch.zeros((), dtype=torch.float64)
        for ai, bi in zip(a, b):
            if ai > 0:
                total = total + ai * (torch.log(ai) - torch.log(bi))
        return total
    if loss in ("kl", "kl-renorm"):
        return kl(p, q)
    if loss == "reverse-kl":
        return kl(q, p)
    m = (p + q) / 2
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def reference(s, z, ids, loss, t, cache_t=None):
    """Float64 sum over rows. Renormalises over the ids for kl-renorm or when t != cache_t."""
    renorm = loss == "kl-renorm" or (cache_t is not None and cache_t != t)
    total = torch.zeros((), dtype=torch.float64)
    for r in range(s.shape[0]):
        if renorm:
            p = torch.softmax(z[r, ids[r]].double() / t, -1)
            q = torch.softmax(s[r, ids[r]].double() / t, -1)
        else:
            p = buckets(torch.softmax(z[r].double() / t, -1), ids[r])
            q = buckets(torch.softmax(s[r].double() / t, -1), ids[r])
        total = total + divergence(loss, p, q)
    return total


def rand(*shape, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# 1. k == V: exactly the dense KL.
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_kl_full_vocab_equals_dense_kl(t):
    n, v = 6, 17
    z, s = rand(n, v, seed=1), rand(n, v, seed=2)
    ids, logits, lse = make_cache(z, v, t, dtype=torch.float64)
    got = kd_loss_sum(s, ids, logits, lse, loss="kl", cache_temperature=t)
    want = F.kl_div(torch.log_softmax(s / t, -1), torch.softmax(z / t, -1), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # float32 student and cache, as in training: same value to float32 accuracy.
    ids, logits, lse = make_cache(z, v, t)
    got32 = kd_loss_sum(s.float(), ids, logits, lse, loss="kl", cache_temperature=t)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-5)


# 2. k < V: the (k + 1)-bucket KL.
@pytest.mark.parametrize("k", [1, 3, 8, 19])
@pytest.mark.parametrize("t", [1.0, 3.0])
def test_kl_topk_matches_bucket_reference(k, t):
    n, v = 5, 20
    z, s = rand(n, v, seed=10 + k), rand(n, v, seed=20 + k)
    ids, logits, lse = make_cache(z, k, t, dtype=torch.float64)
    got = kd_loss_sum(s, ids, logits, lse, loss="kl", cache_temperature=t)
    torch.testing.assert_close(got, reference(s, z, ids, "kl", t), rtol=1e-6, atol=1e-9)
    # It is not the renormalised loss (so this test would catch a silent fallback).
    if k <= v // 2:
        assert not torch.isclose(got, reference(s, z, ids, "kl-renorm", t), rtol=1e-3)


# 3. gradients: autograd of the loss == autograd of the float64 reference, and gradcheck.
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_matches_reference(loss):
    n, v, k, t = 4, 12, 5, 2.0
    z = rand(n, v, seed=30)
    ids, logits, lse = make_cache(z, k, t, dtype=torch.float64)
    s1 = rand(n, v, seed=31).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    kd_loss_sum(s1, ids, logits, lse, loss=loss, cache_temperature=t).backward()
    reference(s2, z, ids, loss, t).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-10)
    fn = lambda x: kd_loss_sum(x, ids, logits, lse, loss=loss, cache_temperature=t)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (rand(n, v, seed=32).requires_grad_(),))


# 4. alpha = 0 is plain CE; alpha = 1 is T^2 * mean KD; mixtures are linear.
def test_alpha_zero_is_plain_cross_entropy_and_ignores_teacher():
    n, v = 7, 11
    s = rand(n, v, seed=40, dtype=torch.float32).requires_grad_()
    labels = torch.tensor([3, -100, 0, 10, 5, -100, 1])
    ids, logits, lse = make_cache(rand(n, v, seed=41), 4, 2.0)
    logits[2, 1] = float("nan")  # a broken teacher must not reach the loss or its gradient
    out = distillation_loss(s, ids, logits, lse, labels, alpha=0.0, cache_temperature=2.0)
    s_ref = s.detach().clone().requires_grad_()
    want = F.cross_entropy(s_ref, labels)
    torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["ce"], want.detach(), rtol=1e-6, atol=0)
    out["loss"].backward()
    want.backward()
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_temperature_squared_scaling_and_mixture(t):
    n, v = 6, 9
    z, s = rand(n, v, seed=50), rand(n, v, seed=51)
    labels = torch.tensor([1, 2, -100, 4, 5, 0])
    ids, logits, lse = make_cache(z, 4, t, dtype=torch.float64)
    kd_mean = kd_loss_sum(s, ids, logits, lse, cache_temperature=t) / n
    pure = distillation_loss(s, ids, logits, lse, labels, alpha=1.0, cache_temperature=t)
    torch.testing.assert_close(pure["kd"], kd_mean)
    torch.testing.assert_close(pure["loss"], t * t * kd_mean)
    mixed = distillation_loss(s, ids, logits, lse, labels, alpha=0.3, cache_temperature=t)
    ce = F.cross_entropy(s, labels)
    torch.testing.assert_close(mixed["loss"], 0.3 * t * t * kd_mean + 0.7 * ce)
    torch.testing.assert_close(mixed["ce"], ce)


# 5. excluded rows contribute nothing.
def test_masked_junk_rows_change_nothing():
    n, v, k, t = 5, 10, 3, 2.0
    z = rand(n, v, seed=60)
    ids, logits, lse = make_cache(z, k, t)
    labels = torch.tensor([1, -100, 3, 4, 9])
    s = rand(n, v, seed=61, dtype=torch.float32).requires_grad_()
    base = distillation_loss(s, ids, logits, lse, labels, alpha=0.5, cache_temperature=t)
    base["loss"].backward()

    j = 3  # junk rows: wild logits, NaN teacher data, real-looking labels -- all masked out
    junk_s = torch.cat([s.detach(), rand(j, v, seed=62, scale=50.0, dtype=torch.float32)]).requires_grad_()
    junk_logits = torch.cat([logits, torch.full((j, k), float("nan"))])
    junk_ids = torch.cat([ids, torch.zeros(j, k, dtype=ids.dtype)])
    junk_lse = torch.cat([lse, torch.full((j,), float("nan"))])
    junk_labels = torch.cat([labels, torch.tensor([0, 1, 2])])
    mask = torch.tensor([True] * n + [False] * j)
    out = distillation_loss(junk_s, junk_ids, junk_logits, junk_lse, junk_labels, alpha=0.5,
                            cache_temperature=t, mask=mask)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"], base["loss"])
    torch.testing.assert_close(junk_s.grad[:n], s.grad)
    assert torch.equal(junk_s.grad[n:], torch.zeros(j, v))

    # Unlabelled (-100) rows do not change the cross-entropy.
    extra = torch.cat([s.detach(), rand(j, v, seed=63, scale=50.0, dtype=torch.float32)])
    ce_only = distillation_loss(extra, junk_ids, junk_logits, junk_lse,
                                torch.cat([labels, torch.full((j,), -100)]), alpha=0.0)
    torch.testing.assert_close(ce_only["loss"], F.cross_entropy(s.detach(), labels))


# 6. gradient accumulation: three micro-batches with step-wide counts == one batch.
@pytest.mark.parametrize("loss", ["kl", "jsd"])
def test_gradient_accumulation_invariance(loss):
    n, d, v, k, t, alpha = 13, 4, 15, 5, 2.0, 0.6
    x = rand(n, d, seed=70, dtype=torch.float32)
    ids, logits, lse = make_cache(rand(n, v, seed=71), k, t, dtype=torch.float16)
    labels = torch.tensor([1, -100, 3, 4, -100, 6, 7, 8, -100, 10, 11, 12, 13])
    w = rand(d, v, seed=72, scale=1.0, dtype=torch.float32).requires_grad_()
    kw = dict(alpha=alpha, loss=loss, cache_temperature=t)

    full = distillation_loss(x @ w, ids, logits, lse, labels, **kw)["loss"]
    (g_full,) = torch.autograd.grad(full, w)

    n_lab = int((labels != -100).sum())
    total, g_acc = 0.0, torch.zeros_like(w)
    for sl in (slice(0, 2), slice(2, 9), slice(9, n)):  # unequal sizes on purpose
        part = distillation_loss(x[sl] @ w, ids[sl], logits[sl], lse[sl], labels[sl],
                                 num_positions=n, num_labelled=n_lab, **kw)["loss"]
        (g,) = torch.autograd.grad(part, w)
        g_acc += g
        total += part.item()
    torch.testing.assert_close(g_acc, g_full, rtol=0, atol=1e-6)
    assert math.isclose(total, full.item(), rel_tol=1e-6)


# 7. other divergences: reference values, non-negativity, zero at equality.
@pytest.mark.parametrize("loss", ["kl-renorm", "reverse-kl", "jsd"])
@pytest.mark.parametrize("k", [4, 16])
def test_other_losses_match_reference(loss, k):
    n, v, t = 5, 16, 1.5
    z, s = rand(n, v, seed=80), rand(n, v, seed=81)
    ids, logits, lse = make_cache(z, k, t, dtype=torch.float64)
    got = kd_loss_sum(s, ids, logits, lse, loss=loss, cache_temperature=t)
    torch.testing.assert_close(got, reference(s, z, ids, loss, t), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
def test_nonnegative_and_zero_at_equality(loss):
    n, v, t = 8, 13, 2.0
    z = rand(n, v, seed=90)
    for k in (v, 5):
        ids, logits, lse = make_cache(z, k, t, dtype=torch.float64)
        same = kd_loss_sum(z.clone(), ids, logits, lse, loss=loss, cache_temperature=t)
        assert abs(same.item()) < 1e-12
        for seed in range(3):  # each position separately: a sum could hide a negative term
            for i in range(n):
                s = rand(1, v, seed=seed * 100 + i)
                sl = slice(i, i + 1)
                assert kd_loss_sum(s, ids[sl], logits[sl], lse[sl], loss=loss, cache_temperature=t) > 0
    if loss == "jsd":  # bounded by log 2 per position
        ids, logits, lse = make_cache(z, v, t, dtype=torch.float64)
        assert kd_loss_sum(-50 * z, ids, logits, lse, loss=loss, cache_temperature=t) <= n * math.log(2)


# 8. a student temperature different from the cache's: renormalised top-k at the new T.
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("cache_t,t", [(1.0, 2.0), (4.0, 1.0)])
def test_other_temperature_renormalises_topk(loss, cache_t, t):
    n, v, k = 5, 14, 6
    z, s = rand(n, v, seed=100), rand(n, v, seed=101)
    ids, logits, lse = make_cache(z, k, cache_t, dtype=torch.float64)
    log_p, tail = teacher_log_probs(logits, lse, cache_t, t)
    assert tail is None
    torch.testing.assert_close(log_p, torch.log_softmax(z.gather(1, ids) / t, -1))
    got = kd_loss_sum(s, ids, logits, lse, loss=loss, cache_temperature=cache_t, temperature=t)
    want_loss = "kl-renorm" if loss == "kl" else loss
    torch.testing.assert_close(got, reference(s, z, ids, want_loss, t, cache_t=cache_t), rtol=1e-6, atol=1e-9)


# 8b. a temperature grid: the stored values at T0 and the lse at a grid T' give the exact tail at T'.
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("cache_t,t", [(2.0, 1.0), (2.0, 4.0), (0.5, 3.0)])
def test_grid_lse_gives_the_exact_loss_at_its_temperature(loss, cache_t, t):
    n, v, k = 5, 14, 6
    z, s = rand(n, v, seed=110), rand(n, v, seed=111)
    ids, logits, _ = make_cache(z, k, cache_t, dtype=torch.float64)
    lse_t = torch.logsumexp(z / t, -1)  # what kd teacher --temperatures stores for t
    got = kd_loss_sum(s, ids, logits, lse_t, loss=loss, cache_temperature=cache_t, temperature=t, lse_temperature=t)
    torch.testing.assert_close(got, reference(s, z, ids, loss, t), rtol=1e-6, atol=1e-9)
    log_p, tail = teacher_log_probs(logits, lse_t, cache_t, t, lse_temperature=t)
    torch.testing.assert_close(log_p, torch.log_softmax(z / t, -1).gather(1, ids))
    assert tail is not None
    # the same lse, said to be at the cache's T, is not used as exact at t: renormalised
    assert teacher_log_probs(logits, lse_t, cache_t, t)[1] is None
    assert teacher_log_probs(logits, lse_t, cache_t, t, lse_temperature=cache_t)[1] is None


def test_choose_lse_and_cache_grid():
    assert choose_lse([2.0, 1.0, 4.0], 4.0) == LseChoice("lse_grid", 2, 4.0, True)
    assert choose_lse([2.0, 1.0, 4.0], 2.0) == LseChoice("lse", 0, 2.0, True)
    assert choose_lse([2.0, 1.0, 4.0], 3.0) == LseChoice("lse", 0, 2.0, False)
    assert cache_grid({"temperature": 2.0}) == [2.0]  # every one-T cache, old ones included
    assert cache_grid({"temperature": 2, "temperatures": [2, 1, 4]}) == [2.0, 1.0, 4.0]
    with pytest.raises(KDError, match="damaged"):
        cache_grid({"temperature": 1.0, "temperatures": [2.0, 1.0]})


# Teacher tail and numerical robustness.
def test_teacher_tail_is_exact_and_never_nan():
    z = torch.tensor([[30.0, 0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.5, 0.0, -1.0]], dtype=torch.float64)
    ids, logits, lse = make_cache(z, 2, 1.0, dtype=torch.float64)
    log_p, log_tail = teacher_log_probs(logits, lse.double(), 1.0, 1.0)
    want = torch.logsumexp(z[:, 2:], -1) - torch.logsumexp(z, -1)
    torch.testing.assert_close(log_tail, want, rtol=1e-3, atol=0)  # tail of row 0 is ~3e-13
    # Rounding can make the stored mass exceed 1: the tail is then a finite floor.
    _, bad = teacher_log_probs(logits[:1], lse[:1] - 1e-3, 1.0, 1.0)
    assert torch.isfinite(bad).all() and (bad < -700).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_float16_cache_full_vocab_is_nan_free(loss):
    n, v, t = 6, 32, 1.0
    z = rand(n, v, seed=110, scale=8.0)
    for k in (v, v - 1):
        ids, logits, lse = make_cache(z, k, t, dtype=torch.float16)
        for s in (rand(n, v, seed=111, dtype=torch.bfloat16), z.float()):
            s = s.clone().requires_grad_()
            out = kd_loss_sum(s, ids, logits, lse, loss=loss, cache_temperature=t)
            out.backward()
            assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    s = z.float().clone()
    s[:, 1:] = float("-inf")  # a student that puts all mass on one id
    out = kd_loss_sum(s.requires_grad_(), ids, logits, lse, loss=loss, cache_temperature=t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_errors_are_kderror():
    s = torch.zeros(2, 5)
    ids, logits, lse = make_cache(torch.randn(2, 5), 2, 1.0)
    with pytest.raises(KDError, match="unknown distillation loss"):
        kd_loss_sum(s, ids, logits, lse, loss="mse")
    with pytest.raises(KDError):
        kd_loss_sum(s[:1], ids, logits, lse)
    with pytest.raises(KDError, match="num_positions"):
        distillation_loss(s, ids, logits, lse, torch.tensor([0, 1]), alpha=0.5, num_positions=1)
    with pytest.raises(KDError, match="alpha"):
        distillation_loss(s, ids, logits, lse, torch.tensor([0, 1]), alpha=1.5)


def test_cheap_and_exact_student_tail_agree(monkeypatch):
    """The tail from log(1 - sum q) and from a logsumexp over the other logits agree where the
    cheap route is used, and rows with a tiny tail take the exact one."""
    import pipeline.losses as L

    torch.manual_seed(0)
    n, v, k = 12, 50, 5
    s = torch.randn(n, v, dtype=torch.float64) * 3
    s[:4, :k] += 40.0  # rows whose student mass sits almost entirely on the stored ids
    z = torch.randn(n, v, dtype=torch.float64) * 2
    ids = torch.argsort(z, dim=-1, descending=True)[:, :k]
    ids[:4] = torch.arange(k)
    vals = z.gather(1, ids)
    lse = torch.logsumexp(z, -1)
    results = {}
    for name, threshold in (("exact", 1 - 1e-12), ("default", L.TAIL_EXACT_BELOW)):
        monkeypatch.setattr(L, "TAIL_EXACT_BELOW", threshold)
        x = s.clone().requires_grad_(True)
        out = L.kd_loss_sum(x, ids, vals, lse, loss="kl")
        out.backward()
        results[name] = (out.detach(), x.grad)
    torch.testing.assert_close(results["default"][0], results["exact"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results["default"][1], results["exact"][1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k", [3, 7, 12])
def test_training_loss_and_evaluation_metric_share_one_formula(k):
    """pipeline.losses (torch) and pipeline.metrics (numpy float64) implement the (k+1)-bucket KL
    of pipeline.softtargets: at T = 1 they agree to float64 precision, tail and k == V alike."""
    import numpy as np

    from pipeline.metrics import kl_per_position

    g = torch.Generator().manual_seed(k)
    z, s = torch.randn(9, 12, generator=g, dtype=torch.float64) * 3, torch.randn(9, 12, generator=g, dtype=torch.float64) * 3
    vals, ids = z.topk(k, dim=-1)
    lse = torch.logsumexp(z, -1)
    torch_kl = kd_loss_sum(s, ids, vals, lse, loss="kl", cache_temperature=1.0).item() / 9
    numpy_kl = float(np.mean(kl_per_position(s.numpy(), ids.numpy(), vals.numpy(), lse.numpy(), 1.0)))
    assert torch_kl == pytest.approx(numpy_kl, rel=1e-10, abs=1e-12)


# --- sampled targets (pipeline.softtargets, "Sampled targets") ------------------------------------


def _sampled_problem(n: int, v: int, m: int, seed: int = 0, t: float = 1.0):
    """n positions sharing one teacher p_T and one student: each with M draws from p_T, stored as a
    sampled cache stores them (distinct ids, counts, z/T, lse), padded with count 0 to width M."""
    rng = np.random.default_rng(seed)
    z_t = torch.tensor(rng.normal(size=v) * 2.0, dtype=torch.float64) / t
    lse = torch.logsumexp(z_t, 0)
    p = torch.softmax(z_t, 0).numpy()
    draws = rng.choice(v, size=(n, m), p=p)
    ids = np.zeros((n, m), np.int64)
    counts = np.zeros((n, m), np.int64)
    for r, d in enumerate(draws):
        u, c = np.unique(d, return_counts=True)
        ids[r, :len(u)], counts[r, :len(u)] = u, c
    ids = torch.from_numpy(ids)
    student = torch.tensor(rng.normal(size=v), dtype=torch.float64).expand(n, v).clone().requires_grad_()
    return student, ids, z_t[ids], lse.expand(n), torch.from_numpy(counts), torch.from_numpy(p)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_sampled_estimate_is_unbiased_for_the_dense_kl_and_its_gradient(t):
    """Mean over 20,000 positions (independent draws of M = 4) of the sampled KL estimate and of its
    gradient equals the dense KL(p_T || q) and q - p_T, within 5 standard errors."""
    n, v, m = 20000, 7, 4
    student, ids, values, lse, counts, p = _sampled_problem(n, v, m, t=t)
    per_pos = torch.stack([sampled_kd_sum(student[i:i + 1], ids[i:i + 1], values[i:i + 1], lse[i:i + 1], counts[i:i + 1],
                                          cache_temperature=t) for i in range(200)])
    total = kd_loss_sum(student, ids, values, lse, loss="kl", cache_temperature=t, counts=counts)
    (grad,) = torch.autograd.grad(total, student)
    q = torch.softmax(student[0].detach() / t, 0)
    dense = float((p * (p.log() - q.log())).sum())
    se = float(per_pos.detach().std()) / math.sqrt(n)
    total = float(total.detach())
    assert abs(total / n - dense) < 5 * se, (total / n, dense, se)
    mean_grad = grad.sum(0) * t  # d/ds = t * d/dz; the expected gradient is q - p
    se_grad = float((grad * t).std(0).max()) / math.sqrt(n)
    torch.testing.assert_close(mean_grad / n, q - p, atol=5 * se_grad, rtol=0)


def test_sampled_loss_of_the_teacher_itself_is_zero_and_padding_counts_nothing():
    n, v, m = 50, 11, 6
    student, ids, values, lse, counts, p = _sampled_problem(n, v, m, seed=2)
    teacher_logits = (values.new_zeros(n, v) + torch.log(p)).requires_grad_()
    assert abs(float(sampled_kd_sum(teacher_logits, ids, values, lse, counts).detach())) < 1e-12
    # widening with more padding (count 0, id 0 repeated) changes nothing
    pad = lambda x: torch.cat([x, torch.zeros_like(x)], 1)  # noqa: E731
    a = sampled_kd_sum(student, ids, values, lse, counts)
    b = sampled_kd_sum(student, pad(ids), pad(values), lse, pad(counts))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", ["kl-renorm", "reverse-kl", "jsd"])
def test_sampled_targets_refuse_losses_without_an_unbiased_form(loss):
    student, ids, values, lse, counts, _ = _sampled_problem(4, 9, 3)
    with pytest.raises(KDError, match=f"--loss {loss} has no unbiased estimate from sampled targets"):
        distillation_loss(student, ids, values, lse, None, alpha=1.0, loss=loss, counts=counts)
    with pytest.raises(KDError, match="drawn at T=1, so they are no sample at T=2"):
        kd_loss_sum(student, ids, values, lse, cache_temperature=1.0, temperature=2.0, counts=counts)
