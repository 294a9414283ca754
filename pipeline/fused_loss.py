"""The LM head and the distillation loss fused, chunk by chunk, so that [N, V] logits never exist.

For a language-model student the logits are ``hidden [N, H] @ weight[V, H].T (+ bias)``, optionally
scaled by ``logit_scale`` and soft-capped (``tanh(z / cap) * cap``, see `pipeline.models.split_head`).
Materialising them in float32, plus their gradient and the softmax intermediates, costs several
N x V x 4 bytes (4.3 GB each at N = 4,096, V = 262,144) and made causal-LM distillation slow.

Because the objective is a scalar, its gradient can be computed during the forward (the approach of
Liger-Kernel's fused linear cross-entropy): for each chunk of positions, the chunk's logits are
formed on a detached leaf, the *existing* per-chunk math of `pipeline.losses` (`kd_loss_sum` and a
cross-entropy sum) is differentiated with `torch.autograd.grad`, and the resulting d(objective)/d(raw
logits) ``g [chunk, V]`` is pushed through the matmul by hand: ``grad_hidden[chunk] = g @ W``,
``grad_W += g.T @ h``, ``grad_b += g.sum(0)``. Only those [N, H] / [V, H] / [V] gradients are kept for
backward, which merely scales them by the incoming gradient. Peak memory is a few chunk x V tensors,
independent of N; the arithmetic is the same as `distillation_loss` on the full logits, because every
term of that loss is per position and the objective is linear in the per-position sums.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import KDError
from pipeline.models import finish_logits
from pipeline.losses import (LOSSES, TAIL_EXACT_BELOW, _divergence, _floor, _log1mexp, kd_loss_sum, objective_rows,
                             sample_terms, teacher_log_probs)

# chunk_bytes bounds a chunk's whole working set, which is about WORKING_SET chunk-sized tensors
# (the logits plus autograd's softmax/logsumexp intermediates; measured in bench/loss_memory_cpu.md),
# so the loss's peak is about chunk_bytes plus the [V, H] weight gradient, whatever N and V are.
WORKING_SET = 5
DEFAULT_CHUNK_BYTES = 512 << 20


@dataclass(frozen=True)
class _Head:
    """What comes after ``h @ W.T + b`` in the student's head, exactly as `split_head` applies it."""

    logit_scale: float | None = None
    softcap: float | None = None

    def __call__(self, z: Tensor) -> Tensor:
        return finish_logits(z, self.logit_scale, self.softcap)


@dataclass(frozen=True)
class _Objective:
    """The step-wide constants of ``alpha * T^2 * KD + (1 - alpha) * CE`` (see `distillation_loss`).

    ``combine`` mirrors distillation_loss's three branches term for term, so that alpha == 0 takes no
    gradient from KD (not even 0 * NaN) and alpha == 1 none from CE. ``loss is None`` means CE only."""

    alpha: float
    loss: str | None
    cache_temperature: float
    temperature: float
    num_positions: int
    num_labelled: int
    lse_temperature: float | None = None  # the T of the given lse: the cache's (None), or a grid temperature

    @property
    def exact_tail(self) -> bool:
        """The teacher's tail is known at the training T: lse was taken at it (pipeline.losses.choose_lse)."""
        lse_t = self.cache_temperature if self.lse_temperature is None else self.lse_temperature
        return math.isclose(lse_t, self.temperature, rel_tol=1e-9)

    def combine(self, kd: Tensor, ce: Tensor) -> Tensor:
        t = self.temperature
        if self.alpha == 0.0:
            return ce
        if self.alpha == 1.0:
            return (t * t) * kd
        return self.alpha * (t * t) * kd + (1.0 - self.alpha) * ce

    def means(self, kd_sum: Tensor, ce_sum: Tensor) -> tuple[Tensor, Tensor]:
        return kd_sum / max(self.num_positions, 1), ce_sum / max(self.num_labelled, 1)


def _chunk_sums(z: Tensor, targets: tuple[Tensor, Tensor, Tensor] | None, labels: Tensor | None,
                obj: _Objective, grad: bool) -> tuple[Tensor, Tensor]:
    """(KD sum, CE sum) of one chunk of student logits ``z``, each with autograd only where the
    objective uses it -- the same no_grad placement as distillation_loss, reusing its math."""
    zero = z.new_zeros(())
    kd = zero
    if targets is not None:
        with torch.set_grad_enabled(grad and obj.alpha > 0.0):
            ids, values, lse, counts = targets
            kd = kd_loss_sum(z, ids, values, lse, loss=obj.loss, cache_temperature=obj.cache_temperature,
                             temperature=obj.temperature, lse_temperature=obj.lse_temperature, counts=counts)
    ce = zero
    if labels is not None:
        with torch.set_grad_enabled(grad and obj.alpha < 1.0):
            ce = F.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
    return kd, ce


def _kl_chunk(z: Tensor, targets, labels: Tensor | None, obj: _Objective, grad: bool):
    """(KD sum, CE sum, g) of one chunk for the default objective -- loss "kl" with the exact tail, at
    the cache temperature or a grid temperature of it -- with the gradient written down instead of taken by autograd, or None
    where that formula does not hold and the caller falls back to autograd.

    Why: autograd through `kd_loss_sum` keeps several [chunk, V] intermediates and passes over them
    again in backward, which made distillation ~1.8x the cost of cross-entropy. For student
    log-probs q = softmax(s), s = z / T, and the (k+1)-bucket KL of pipeline.softtargets,

        dKL/ds_j = q_j - p_j            for a stored id j,
        dKL/ds_j = q_j (1 - p_t / q_t)  for any other id (p_t, q_t: the tail masses),

    so one softmax pass and a scatter of k values give it; cross-entropy adds softmax(z) - onehot.
    The values are computed with exactly the operations of `kd_loss_sum` (same clamps), and the
    formula is the derivative of those operations wherever no clamp is active: a chunk where one is
    (a log-prob below the floor, a stored mass so close to 1 that the tail takes the exact route)
    returns None. A sampled cache (counts given) has dKL/ds = q - c / M (`_sampled_chunk`)."""
    ids, values, lse, counts = targets
    if counts is not None:
        return _sampled_chunk(z, targets, labels, obj, grad)
    if ids.shape[1] >= z.shape[1] or not obj.exact_tail:
        return None
    floor, t = _floor(z.dtype), obj.temperature
    q = torch.softmax(z / t if t != 1.0 else z, dim=-1)  # one fused pass; it becomes the gradient, in place
    q_k = q.gather(1, ids)
    log_q = torch.log(q_k)  # s_k - logsumexp(s), up to rounding; -inf where q underflows (then: fallback)
    log_mass = torch.logsumexp(log_q, dim=-1)
    if bool((log_q < floor).any()) or bool((log_mass > math.log1p(-TAIL_EXACT_BELOW)).any()):
        return None
    log_q_tail = _log1mexp(log_mass).clamp(min=floor)
    log_p, log_p_tail = teacher_log_probs(values.to(z.dtype), lse, obj.cache_temperature, t, obj.lse_temperature)
    log_pb = torch.cat([log_p, log_p_tail.unsqueeze(-1)], dim=-1)
    kd = _divergence("kl", log_pb, torch.cat([log_q, log_q_tail.unsqueeze(-1)], dim=-1)).sum()
    terms = _ce_terms(z, q, labels, obj, grad)
    if terms is None:
        return None
    ce, c_rows, sm = terms
    a = obj.alpha * t / max(obj.num_positions, 1) if grad and obj.alpha > 0.0 else 0.0  # alpha T^2 / N, times ds/dz = 1/T
    if not a and c_rows is None:
        return kd, ce, None
    # g = a (q - r) + c (softmax(z) - onehot), built in place: at alpha = 0 the teacher never enters it
    # (not even as 0 * NaN); at T = 1, softmax(z) is q itself, so one pass serves both terms.
    shared = c_rows is not None and t == 1.0
    row = a * (1.0 - torch.exp(log_pb[:, -1] - log_q_tail)) if a else torch.zeros_like(log_mass)
    at_k = a * (q_k - log_pb[:, :-1].exp()) if a else torch.zeros_like(q_k)
    if shared:
        row, at_k = row + c_rows, at_k + c_rows.unsqueeze(-1) * q_k
    g = q.mul_(row.unsqueeze(-1))
    g.scatter_(1, ids, at_k)
    return kd, ce, _add_ce(g, sm, labels, c_rows, shared)


def _ce_terms(z: Tensor, q: Tensor, labels: Tensor | None, obj: _Objective, grad: bool):
    """(CE sum, per-row CE gradient weight or None, softmax(z) or None) of a chunk, given q = softmax(z / T);
    None when a label's probability underflows and its CE needs the logsumexp route (autograd)."""
    if labels is None:
        return z.new_zeros(()), None, None
    labelled = labels != -100
    sm = q if obj.temperature == 1.0 else torch.softmax(z, dim=-1)
    p_label = sm.gather(1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if bool((labelled & (p_label < torch.finfo(z.dtype).tiny)).any()):
        return None
    ce = torch.where(labelled, -torch.log(p_label), 0.0).sum()
    c_rows = labelled.to(z.dtype) * ((1.0 - obj.alpha) / max(obj.num_labelled, 1)) if grad and obj.alpha < 1.0 else None
    return ce, c_rows, sm


def _add_ce(g: Tensor, sm: Tensor | None, labels: Tensor | None, c_rows: Tensor | None, shared: bool) -> Tensor:
    """g plus c (softmax(z) - onehot(label)): the CE share of the gradient (its softmax part already in g when shared)."""
    if c_rows is not None:
        if not shared:
            g.add_(sm.mul_(c_rows.unsqueeze(-1)))
        g.scatter_add_(1, labels.clamp(min=0).unsqueeze(-1), -c_rows.unsqueeze(-1))
    return g


def _sampled_chunk(z: Tensor, targets, labels: Tensor | None, obj: _Objective, grad: bool):
    """`_kl_chunk` for a sampled cache: KD = sum w (log p - log q) at the drawn ids (w = c / M, 0 for
    padding), gradient a (q - w) scattered-added (padding may repeat an id), same CE terms and fallback."""
    ids, values, lse, counts = targets
    floor, t = _floor(z.dtype), obj.temperature
    q = torch.softmax(z / t if t != 1.0 else z, dim=-1)
    w, log_p = sample_terms(values, lse, counts, z.dtype, z.device)
    log_q = torch.log(q.gather(1, ids))
    if bool(((log_q < floor) & (w > 0)).any()):
        return None
    kd = torch.where(w > 0, w * (log_p - log_q), 0.0).sum()
    terms = _ce_terms(z, q, labels, obj, grad)
    if terms is None:
        return None
    ce, c_rows, sm = terms
    a = obj.alpha * t / max(obj.num_positions, 1) if grad and obj.alpha > 0.0 else 0.0
    if not a and c_rows is None:
        return kd, ce, None
    shared = c_rows is not None and t == 1.0
    row = torch.full_like(lse, a, dtype=z.dtype) + (c_rows if shared else 0.0)
    g = q.mul_(row.unsqueeze(-1))
    if a:
        g.scatter_add_(1, ids, -a * w)
    return kd, ce, _add_ce(g, sm, labels, c_rows, shared)


def _chunk(h: Tensor, w: Tensor, b: Tensor | None, targets, labels: Tensor | None, obj: _Objective,
           head: _Head, grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(KD sum, CE sum, g) for one chunk, g = d(this chunk's share of the objective)/d(h @ W.T + b).

    The raw logits are a leaf, so autograd only ever sees [chunk, V] tensors (scale, softcap, the
    loss) and the matmul's gradient is left to the caller; g is None when nothing needs a gradient."""
    raw = F.linear(h, w, b)  # the same op as nn.Linear in the student's head
    if obj.loss == "kl" and targets is not None and head == _Head():
        fast = _kl_chunk(raw, targets, labels, obj, grad)
        if fast is not None:
            return fast
    with torch.enable_grad() if grad else contextlib.nullcontext():
        leaf = raw.requires_grad_(grad)
        kd, ce = _chunk_sums(head(leaf), targets, labels, obj, grad)
        share = obj.combine(*obj.means(kd, ce)) if grad else None
        g = None
        if share is not None and share.requires_grad:
            (g,) = torch.autograd.grad(share, leaf)
    return kd.detach(), ce.detach(), g


def _forward_chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets, labels: Tensor | None,
                    obj: _Objective, head: _Head, chunk_bytes: int, needs: tuple[bool, bool, bool]):
    """Run every chunk; return (KD sum, CE sum, (grad_hidden, grad_weight, grad_bias)).

    Computes in float64 if hidden or weight is float64, else float32 (as `_compute_dtype` does for
    logits); gradients are accumulated in that dtype and returned in their inputs' dtypes."""
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    h_all, w = hidden.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    n, vocab = h_all.shape[0], w.shape[0]
    rows = max(1, chunk_bytes // (WORKING_SET * vocab * w.element_size()))
    grad = any(needs)
    grad_h = torch.zeros_like(h_all) if needs[0] else None
    grad_w = torch.zeros_like(w) if needs[1] else None
    grad_b = torch.zeros_like(b) if needs[2] and b is not None else None
    kd_sum, ce_sum = h_all.new_zeros(()), h_all.new_zeros(())
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        h = h_all[part]
        chunk_targets = tuple(x[part] if x is not None else None for x in targets) if targets is not None else None
        kd, ce, g = _chunk(h, w, b, chunk_targets, labels[part] if labels is not None else None, obj, head, grad)
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
        if g is None:
            continue
        if grad_h is not None:
            torch.matmul(g, w, out=grad_h[part])
        if grad_w is not None:
            grad_w.addmm_(g.t(), h)
        if grad_b is not None:
            grad_b.add_(g.sum(0))
        del g
    grads = (
        grad_h.to(hidden.dtype) if grad_h is not None else None,
        grad_w.to(weight.dtype) if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )
    return kd_sum, ce_sum, grads


def _evaluate(hidden, weight, bias, targets, labels, objective: _Objective, head: _Head, chunk_bytes: int,
              needs: tuple[bool, bool, bool]):
    """(loss, kd mean, ce mean, grads) with autocast off: the head is evaluated in float32/float64
    whatever the caller's autocast state, since bf16 logits over a large vocabulary lose the tail."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        kd_sum, ce_sum, grads = _forward_chunks(hidden, weight, bias, targets, labels, objective, head,
                                                chunk_bytes, needs)
        kd, ce = objective.means(kd_sum, ce_sum)
        return objective.combine(kd, ce), kd, ce, grads


class FusedHeadLoss(torch.autograd.Function):
    """Scalar objective of an LM head + distillation loss, with its gradient computed in forward.

    apply(hidden, weight, bias, topk_ids, topk_logits, lse, counts, labels, objective, head, chunk_bytes)
    -> (loss, kd mean, ce mean); topk_ids/topk_logits/lse are None for cross-entropy only, counts for a top-k cache. Only
    ``loss`` is differentiable; backward scales the gradients stored in forward by its incoming
    gradient (1.0 in the usual ``loss.backward()``, the loss scale under a GradScaler)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, topk_ids, topk_logits, lse, counts, labels, objective, head, chunk_bytes):
        targets = (topk_ids, topk_logits, lse, counts) if topk_ids is not None else None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
        loss, kd, ce, grads = _evaluate(hidden, weight, bias, targets, labels, objective, head, chunk_bytes, needs)
        if loss is ce:  # alpha == 0 returns ce itself, which must stay non-differentiable
            loss = ce.clone()
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        def scaled(g):
            if g is None:
                return None
            return g if bool(grad_loss == 1.0) else g * grad_loss.to(g.dtype)

        grad_h, grad_w, grad_b = ctx.saved_tensors
        return scaled(grad_h), scaled(grad_w), scaled(grad_b), None, None, None, None, None, None, None, None


def _run(hidden, weight, bias, targets, labels, objective: _Objective, head: _Head, chunk_bytes: int):
    """Through the autograd Function when a gradient can be asked for, else (no_grad, inference, frozen
    head) a plain evaluation: inside Function.forward grad mode is always off and needs_input_grad
    ignores the caller's no_grad, so the Function cannot tell by itself that no gradient is wanted."""
    params = (hidden, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        ids, values, lse, counts = targets if targets is not None else (None, None, None, None)
        return FusedHeadLoss.apply(hidden, weight, bias, ids, values, lse, counts, labels, objective, head, chunk_bytes)
    loss, kd, ce, _ = _evaluate(hidden, weight, bias, targets, labels, objective, head, chunk_bytes, (False,) * 3)
    return loss, kd, ce


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_bytes: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise KDError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise KDError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) to match the weight")
    if chunk_bytes < 1:
        raise KDError(f"chunk_bytes must be >= 1, got {chunk_bytes}")


def _label_count(labels: Tensor | None, num_labelled: int | None) -> int:
    if num_labelled is not None:
        return num_labelled
    return 0 if labels is None else int((labels != -100).sum())


def fused_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    topk_ids: Tensor,
    topk_logits: Tensor,
    lse: Tensor,
    hard_labels: Tensor | None,
    *,
    alpha: float,
    loss: str = "kl",
    cache_temperature: float = 1.0,
    temperature: float | None = None,
    num_positions: int | None = None,
    num_labelled: int | None = None,
    mask: Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    lse_temperature: float | None = None,
    counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """`distillation_loss` of the logits ``softcap(logit_scale * (hidden @ weight.T + bias))``, fused.

    Same arguments, semantics and return value as `pipeline.losses.distillation_loss` (read its
    docstring for alpha, T^2 and the step-wide ``num_positions`` / ``num_labelled``), except that the
    student is given as hidden states [N, H] and its head (weight [V, H], optional bias [V], optional
    constant ``logit_scale`` and ``softcap``), and no [N, V] tensor is ever built: positions are
    processed a chunk at a time, whose working set (logits and their softmax intermediates) is about
    ``chunk_bytes``. "loss" is differentiable w.r.t. hidden, weight and bias (a weight tied to the
    input embedding receives both contributions through autograd).
    """
    if loss not in LOSSES:
        raise KDError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    _check_head(hidden, weight, bias, chunk_bytes)
    n = hidden.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape != topk_logits.shape or topk_ids.shape[0] != n or lse.shape != (n,):
        raise KDError(f"teacher targets {tuple(topk_ids.shape)}/{tuple(topk_logits.shape)}/lse {tuple(lse.shape)} "
                      f"do not match {n} student positions")
    if hard_labels is not None and hard_labels.shape != (n,):
        raise KDError(f"hard_labels has shape {tuple(hard_labels.shape)}, expected ({n},)")
    hidden, topk_ids, topk_logits, lse, hard_labels, num_positions, counts = objective_rows(
        hidden, topk_ids, topk_logits, lse, hard_labels, alpha=alpha, mask=mask, num_positions=num_positions, counts=counts)
    device = hidden.device
    labels = hard_labels.to(device=device, dtype=torch.long) if hard_labels is not None else None
    t = cache_temperature if temperature is None else temperature
    objective = _Objective(alpha, loss, cache_temperature, t, num_positions, _label_count(labels, num_labelled),
                           lse_temperature)
    targets = (topk_ids.to(device=device, dtype=torch.long), topk_logits.to(device), lse.to(device),
               counts.to(device) if counts is not None else None)
    total, kd, ce = _run(hidden, weight, bias, targets, labels, objective, _Head(logit_scale, softcap), chunk_bytes)
    return {"loss": total, "kd": kd, "ce": ce}


def fused_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    num_labelled: int | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Tensor:
    """Cross-entropy sum over labelled positions (label != -100) / ``num_labelled``, fused like
    `fused_distillation_loss`: the CE-only path (plain fine-tuning, or alpha = 0 without a targets
    cache). ``num_labelled`` is the step-wide count, defaulting to this call's, so that gradient
    accumulation over micro-batches is exact."""
    _check_head(hidden, weight, bias, chunk_bytes)
    if labels.shape != (hidden.shape[0],):
        raise KDError(f"labels has shape {tuple(labels.shape)}, expected ({hidden.shape[0]},)")
    labels = labels.to(device=hidden.device, dtype=torch.long)
    objective = _Objective(0.0, None, 1.0, 1.0, hidden.shape[0], _label_count(labels, num_labelled))
    total, _, _ = _run(hidden, weight, bias, None, labels, objective, _Head(logit_scale, softcap), chunk_bytes)
    return total
