"""Tests for pipeline/fused_loss.py: the fused head + loss must be `distillation_loss` on the full logits.

Every comparison is against autograd through the unfused computation (``hidden @ W.T + b``, the
head's scale and softcap, then `distillation_loss` / `F.cross_entropy`), in float64, to 1e-10: the
loss value, the reported KD and CE, and the gradients w.r.t. hidden, weight and bias.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import KDError
from pipeline.fused_loss import fused_cross_entropy, fused_distillation_loss
from pipeline.losses import LOSSES, TAIL_EXACT_BELOW, distillation_loss

TOL = {"atol": 1e-10, "rtol": 1e-10}
N, V, H, K = 9, 13, 6, 4
PEAK_ID = 5  # row 0 puts almost all of its mass here, so its stored mass is ~1 (exact-tail branch)
HEADS = {  # name: (bias, logit_scale, softcap)
    "plain": (False, None, None),
    "bias": (True, None, None),
    "scale+softcap": (False, 0.8, 30.0),
    "bias+scale+softcap": (True, 0.8, 30.0),
}


def head_logits(hidden, weight, bias, scale, cap):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if scale is not None:
        z = z * scale
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def make_problem(n=N, v=V, h=H, k=K, bias=True, scale=None, cap=None, cache_t=2.0, seed=0, dtype=torch.float64):
    """A student head, and a teacher cache (per the contract) from logits close to the student's,
    so that row 0 -- whose student logits are extremely peaked on PEAK_ID -- stores PEAK_ID."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) / math.sqrt(h)
    weight[:, -1] = 0.0
    weight[PEAK_ID, -1] = 1.0
    hidden[0, -1] = 60.0
    b = 0.3 * torch.randn(v, generator=g, dtype=dtype) if bias else None
    with torch.no_grad():
        z = head_logits(hidden, weight, b, scale, cap) + torch.randn(n, v, generator=g, dtype=dtype)
    ids = torch.argsort(z, dim=-1, descending=True)[:, :k]
    scaled = z / cache_t
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = labels[4] = -100
    params = [p.requires_grad_() for p in (hidden, weight, b) if p is not None]
    return hidden, weight, b, ids, scaled.gather(1, ids), torch.logsumexp(scaled, dim=-1), labels, params


def reference(hidden, weight, bias, ids, values, lse, labels, params, *, scale=None, cap=None, **kw):
    out = distillation_loss(head_logits(hidden, weight, bias, scale, cap), ids, values, lse, labels, **kw)
    return out, torch.autograd.grad(out["loss"], params)


def fused(hidden, weight, bias, ids, values, lse, labels, params, *, scale=None, cap=None, **kw):
    out = fused_distillation_loss(hidden, weight, bias, ids, values, lse, labels, logit_scale=scale, softcap=cap, **kw)
    return out, torch.autograd.grad(out["loss"], params)


def assert_same(a, b, tol=TOL):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(out_a[key], out_b[key], **tol)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [None, 1.0], ids=["cache-T", "other-T"])
@pytest.mark.parametrize("k", [K, V], ids=["tail", "k=V"])
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_distillation_loss_on_full_logits(loss, k, temperature, alpha, head):
    bias, scale, cap = HEADS[head]
    *problem, params = make_problem(k=k, bias=bias, scale=scale, cap=cap)
    kw = {"alpha": alpha, "loss": loss, "cache_temperature": 2.0, "temperature": temperature, "scale": scale, "cap": cap}
    want = reference(*problem, params, **kw)
    got = fused(*problem, params, chunk_bytes=2 * V * 8, **kw)  # 2 rows a chunk: 5 chunks
    assert_same(got, want)
    assert not got[0]["kd"].requires_grad and not got[0]["ce"].requires_grad
    assert all(torch.isfinite(g).all() for g in got[1])


@pytest.mark.parametrize("temperature", [None, 1.0])
def test_peaked_row_takes_the_exact_tail_branch(temperature):
    """The setup really exercises _student_tail's exact route: row 0's stored student mass is within
    TAIL_EXACT_BELOW of 1 (at both temperatures), and the fused loss still matches."""
    hidden, weight, bias, ids, values, lse, labels, params = make_problem(scale=0.8, cap=30.0)
    s = head_logits(hidden, weight, bias, 0.8, 30.0).detach() / (temperature or 2.0)
    stored = torch.logsumexp(s.gather(1, ids) - torch.logsumexp(s, -1, keepdim=True), -1)
    assert stored[0] > math.log1p(-TAIL_EXACT_BELOW)
    assert (stored[1:] < math.log1p(-TAIL_EXACT_BELOW)).all()
    kw = {"alpha": 0.5, "loss": "kl", "cache_temperature": 2.0, "temperature": 2.0, "scale": 0.8, "cap": 30.0}
    assert_same(fused(hidden, weight, bias, ids, values, lse, labels, params, chunk_bytes=1, **kw),
                reference(hidden, weight, bias, ids, values, lse, labels, params, **kw))


@pytest.mark.parametrize("rows", [1, 2, 4, N, 100])
def test_chunking_does_not_change_the_result(rows):
    *problem, params = make_problem(scale=0.8, cap=30.0)
    kw = {"alpha": 0.5, "loss": "jsd", "cache_temperature": 2.0, "scale": 0.8, "cap": 30.0}
    one = fused(*problem, params, chunk_bytes=1 << 30, **kw)
    assert_same(fused(*problem, params, chunk_bytes=rows * V * 8, **kw), one, tol={"atol": 1e-12, "rtol": 1e-12})


def test_gradient_accumulation_with_step_wide_counts_equals_one_batch():
    hidden, weight, bias, ids, values, lse, labels, params = make_problem()
    kw = {"alpha": 0.3, "loss": "kl", "cache_temperature": 2.0}
    whole = fused(hidden, weight, bias, ids, values, lse, labels, params, **kw)
    counts = {"num_positions": N, "num_labelled": int((labels != -100).sum())}
    parts = [fused(hidden[rows], weight, bias, ids[rows], values[rows], lse[rows], labels[rows], params, **counts, **kw)
             for rows in (slice(0, 4), slice(4, N))]
    torch.testing.assert_close(parts[0][0]["loss"] + parts[1][0]["loss"], whole[0]["loss"], **TOL)
    for i, g in enumerate(whole[1]):
        torch.testing.assert_close(parts[0][1][i] + parts[1][1][i], g, **TOL)


def test_tied_embedding_gets_both_gradients():
    """A weight shared with the input embedding receives the head's and the body's gradient."""
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64))
    mix = torch.nn.Parameter(torch.randn(H, H, generator=g, dtype=torch.float64) / math.sqrt(H))
    tokens = torch.randint(0, V, (N,), generator=g)
    *_, ids, values, lse, labels, _ = make_problem()
    kw = {"alpha": 0.5, "loss": "reverse-kl", "cache_temperature": 2.0}

    def grads(use_fused):
        hidden = torch.tanh(F.embedding(tokens, emb) @ mix)
        if use_fused:
            out = fused_distillation_loss(hidden, emb, None, ids, values, lse, labels, chunk_bytes=3 * V * 8, **kw)
        else:
            out = distillation_loss(hidden @ emb.T, ids, values, lse, labels, **kw)
        return torch.autograd.grad(out["loss"], (emb, mix))

    want, got = grads(False), grads(True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("head", list(HEADS))
def test_fused_cross_entropy_matches_f_cross_entropy(head):
    bias, scale, cap = HEADS[head]
    hidden, weight, b, *_, labels, params = make_problem(bias=bias, scale=scale, cap=cap)
    count = int((labels != -100).sum())
    for num_labelled in (None, 20):
        want = F.cross_entropy(head_logits(hidden, weight, b, scale, cap), labels, ignore_index=-100, reduction="sum")
        want = want / (num_labelled or count)
        got = fused_cross_entropy(hidden, weight, b, labels, num_labelled=num_labelled, logit_scale=scale, softcap=cap,
                                  chunk_bytes=2 * V * 8)
        torch.testing.assert_close(got, want, **TOL)
        for a, c in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(a, c, **TOL)


def test_nothing_of_size_n_by_v_is_saved():
    """Every tensor autograd saves, in the fused call's own chunk graphs as well as for its backward,
    is at most a chunk of logits or an [N, H] / [V, H] gradient; the unfused loss saves [N, V] ones
    (which shows the hook sees them)."""
    n, v, h, rows = 64, 50, 4, 2
    hidden, weight, bias, ids, values, lse, labels, _ = make_problem(n=n, v=v, h=h, k=5, scale=0.8, cap=30.0)
    kw = {"alpha": 0.5, "loss": "kl", "cache_temperature": 2.0}

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = fn()
        return max(sizes), out

    biggest, out = largest_saved(lambda: fused_distillation_loss(
        hidden, weight, bias, ids, values, lse, labels, logit_scale=0.8, softcap=30.0, chunk_bytes=rows * v * 8, **kw))
    assert biggest <= max(rows * v, v * h, n * h) < n * v
    assert {tuple(t.shape) for t in out["loss"].grad_fn.saved_tensors} == {(n, h), (v, h), (v,)}
    unfused, _ = largest_saved(lambda: distillation_loss(head_logits(hidden, weight, bias, 0.8, 30.0),
                                                         ids, values, lse, labels, **kw))
    assert unfused >= n * v


def test_alpha_zero_takes_no_gradient_from_the_teacher():
    """At alpha 0 the KD term is reporting only: a NaN teacher value shows in "kd" but not in the
    gradients, which are exactly cross-entropy's."""
    hidden, weight, bias, ids, values, lse, labels, params = make_problem()
    values = values.clone()
    values[3, 0] = float("nan")
    out, grads = fused(hidden, weight, bias, ids, values, lse, labels, params, alpha=0.0, cache_temperature=2.0)
    assert torch.isnan(out["kd"])
    ce = F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=-100)
    for a, c in zip(grads, torch.autograd.grad(ce, params)):
        torch.testing.assert_close(a, c, **TOL)


def test_mask_and_scaled_backward():
    hidden, weight, bias, ids, values, lse, labels, params = make_problem()
    mask = torch.tensor([True, False, True, True, False, True, True, False, True])
    kw = {"alpha": 0.5, "loss": "kl", "cache_temperature": 2.0, "mask": mask, "num_positions": 12}
    want = distillation_loss(hidden @ weight.T + bias, ids, values, lse, labels, **kw)
    got = fused_distillation_loss(hidden, weight, bias, ids, values, lse, labels, chunk_bytes=1, **kw)
    torch.testing.assert_close(got["loss"], want["loss"], **TOL)
    # a non-unit incoming gradient (e.g. a GradScaler's loss scale) scales the stored gradients
    for a, c in zip(torch.autograd.grad(3.0 * got["loss"], params), torch.autograd.grad(3.0 * want["loss"], params)):
        torch.testing.assert_close(a, c, **TOL)


def test_float32_bfloat16_and_autocast():
    """float32 matches the float64 reference to float32 accuracy; under CPU autocast the head still
    runs in float32 (same value as outside it); gradients come back in their inputs' dtypes."""
    hidden, weight, bias, ids, values, lse, labels, _ = make_problem(n=16, v=40, h=8)
    kw = {"alpha": 0.5, "loss": "kl", "cache_temperature": 2.0}
    want = distillation_loss(hidden @ weight.T + bias, ids, values, lse, labels, **kw)["loss"]
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (hidden, weight, bias))
    plain = fused_distillation_loss(h32, w32, b32, ids, values.float(), lse.float(), labels, chunk_bytes=5 * 40 * 4, **kw)
    assert plain["loss"].dtype == torch.float32
    torch.testing.assert_close(plain["loss"].double(), want, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fused_distillation_loss(h32, w32, b32, ids, values.float(), lse.float(), labels, **kw)
    assert auto["loss"].dtype == torch.float32
    torch.testing.assert_close(auto["loss"], plain["loss"], atol=1e-6, rtol=1e-6)
    h16, w16 = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    out = fused_distillation_loss(h16, w16, None, ids, values.half(), lse.float(), labels, **kw)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and h16.grad.dtype == w16.grad.dtype == torch.bfloat16


def test_no_grad_evaluation():
    *problem, params = make_problem()
    kw = {"alpha": 0.5, "loss": "jsd", "cache_temperature": 2.0}
    want = reference(*problem, params, **kw)[0]
    with torch.no_grad():
        got = fused_distillation_loss(*problem, **kw)
    assert not got["loss"].requires_grad
    torch.testing.assert_close(got["loss"], want["loss"], **TOL)


def test_errors():
    hidden, weight, bias, ids, values, lse, labels, _ = make_problem()
    with pytest.raises(KDError, match="no hard labels"):
        fused_distillation_loss(hidden, weight, bias, ids, values, lse, None, alpha=0.5)
    with pytest.raises(KDError, match="num_positions"):
        fused_distillation_loss(hidden, weight, bias, ids, values, lse, labels, alpha=0.5, num_positions=3)
    with pytest.raises(KDError, match="unknown distillation loss"):
        fused_distillation_loss(hidden, weight, bias, ids, values, lse, labels, alpha=0.5, loss="mse")
    with pytest.raises(KDError, match="weight"):
        fused_distillation_loss(hidden, weight.T, bias, ids, values, lse, labels, alpha=0.5)
    with pytest.raises(KDError, match="positions"):
        fused_distillation_loss(hidden[:3], weight, bias, ids, values, lse, labels[:3], alpha=0.5)
    # hard_labels=None is fine at alpha 1 (CE reported as 0)
    out = fused_distillation_loss(hidden, weight, bias, ids, values, lse, None, alpha=1.0, cache_temperature=2.0)
    assert out["ce"] == 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_default_kl_objective_takes_the_written_down_gradient(monkeypatch, alpha, temperature):
    """The default objective (kl, exact tail, cache T) never runs autograd through kd_loss_sum, and
    its value and gradients still equal distillation_loss on the full logits to 1e-10."""
    import pipeline.fused_loss as fl
    from pipeline.losses import distillation_loss

    g = torch.Generator().manual_seed(3)
    n, v, h_dim, k = 13, 40, 6, 5
    hidden = torch.randn(n, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    values, ids = (z / temperature).topk(k, dim=-1)
    lse = torch.logsumexp(z / temperature, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    ref = distillation_loss(hidden @ weight.T, ids, values, lse, labels, alpha=alpha, cache_temperature=temperature)
    ref_grads = torch.autograd.grad(ref["loss"], (hidden, weight), allow_unused=True)

    def forbidden(*a, **kw):
        raise AssertionError("the default objective went through autograd")

    monkeypatch.setattr(fl, "kd_loss_sum", forbidden)
    got = fl.fused_distillation_loss(hidden, weight, None, ids, values, lse, labels, alpha=alpha,
                                     cache_temperature=temperature, chunk_bytes=5 * 4 * v * 8)
    grads = torch.autograd.grad(got["loss"], (hidden, weight), allow_unused=True)
    for key in ("loss", "kd", "ce"):
        assert torch.allclose(got[key], ref[key], rtol=1e-10, atol=1e-12), key
    for a, b in zip(grads, ref_grads):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_grid_temperature_takes_the_written_down_gradient_too(monkeypatch, alpha, temperature):
    """Values stored at T0 = 2 and the grid's lse at T (lse_temperature=T): the fused loss takes its fast
    exact-tail path, and equals distillation_loss on the full logits and a cache built at T directly."""
    import pipeline.fused_loss as fl

    g = torch.Generator().manual_seed(4)
    n, v, h_dim, k = 13, 40, 6, 5
    hidden = torch.randn(n, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    values, ids = (z / 2.0).topk(k, dim=-1)
    lse_t = torch.logsumexp(z / temperature, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    kw = dict(alpha=alpha, cache_temperature=2.0, temperature=temperature, lse_temperature=temperature)
    ref = distillation_loss(hidden @ weight.T, ids, values, lse_t, labels, **kw)
    direct = distillation_loss(hidden @ weight.T, ids, z.gather(1, ids) / temperature, lse_t, labels, alpha=alpha,
                               cache_temperature=temperature)
    torch.testing.assert_close(ref["kd"], direct["kd"], rtol=1e-10, atol=1e-12)
    ref_grads = torch.autograd.grad(ref["loss"], (hidden, weight))

    def forbidden(*a, **k):
        raise AssertionError("the exact-tail objective at a grid temperature went through autograd")

    monkeypatch.setattr(fl, "kd_loss_sum", forbidden)
    got = fl.fused_distillation_loss(hidden, weight, None, ids, values, lse_t, labels, chunk_bytes=5 * 4 * v * 8, **kw)
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got["loss"], (hidden, weight)), ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_targets_fused_equal_unfused_without_autograd(monkeypatch, alpha, temperature):
    """A sampled cache's estimate (counts given; padding repeats id 0 with count 0) through the fused head
    equals distillation_loss on the full logits, value and gradients, via the written-down gradient."""
    import pipeline.fused_loss as fl

    g = torch.Generator().manual_seed(4)
    n, v, h_dim, m = 11, 30, 6, 5
    hidden = torch.randn(n, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h_dim, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 / temperature
    draws = torch.multinomial(torch.softmax(z, -1), m, replacement=True, generator=g)
    ids, counts = torch.zeros(n, m, dtype=torch.long), torch.zeros(n, m, dtype=torch.long)
    for r in range(n):
        u, c = draws[r].unique(return_counts=True)
        ids[r, :len(u)], counts[r, :len(u)] = u, c
    assert (counts == 0).any()  # some padding
    values, lse = z.gather(1, ids), torch.logsumexp(z, -1)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    kw = dict(alpha=alpha, cache_temperature=temperature, counts=counts)
    ref = distillation_loss(hidden @ weight.T, ids, values, lse, labels, **kw)
    ref_grads = torch.autograd.grad(ref["loss"], (hidden, weight))

    def forbidden(*a, **k):
        raise AssertionError("the sampled objective went through autograd")

    monkeypatch.setattr(fl, "kd_loss_sum", forbidden)
    got = fl.fused_distillation_loss(hidden, weight, None, ids, values, lse, labels, chunk_bytes=5 * 4 * v * 8, **kw)
    grads = torch.autograd.grad(got["loss"], (hidden, weight))
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[key], ref[key], **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)
