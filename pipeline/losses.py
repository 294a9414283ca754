"""Distillation losses on cached top-k soft targets (the formulas: pipeline.softtargets).

The teacher cache (DESIGN.md, "The soft-target contract") keeps, per target position, the ids
of the k largest teacher logits z, ``topk_logits = z / T_cache`` at those ids, and
``lse = logsumexp(z / T_cache)`` over the *full* vocabulary. Because ``lse`` is exact, the
teacher's log-probabilities at the stored ids are exact too, and so is the mass of everything
else (the "tail"). The default loss therefore compares teacher and student over k + 1
buckets -- the k stored ids plus one tail bucket -- which is a true KL between two
distributions (a coarsening of the full-vocabulary KL), not the biased top-k-renormalised one.

A grid cache (pipeline.softtargets) also holds ``lse`` at other temperatures; a loss at a grid
temperature T' takes that lse (``lse_temperature = T'``) with the values rescaled by
``T_cache / T'`` and keeps the exact tail. `choose_lse` makes that decision for every reader.

Numerics: every log-probability is clamped below at ``log(finfo.tiny)`` of the compute dtype,
so no bucket is ever -inf; a bucket whose probability underflows then contributes
``0 * finite == 0`` instead of ``0 * inf == NaN``. When k == V the tail is empty by
construction and is dropped rather than estimated, so the result equals the dense KL.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import LOSSES
from pipeline.errors import KDError

__all__ = ["LOSSES", "LseChoice", "cache_grid", "check_sampled", "choose_lse", "distillation_loss", "kd_loss_sum",
           "sample_terms", "sampled_kd_sum", "teacher_log_probs"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32,
    because softmax over a large vocabulary in half precision loses the tail entirely."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _floor(dtype: torch.dtype) -> float:
    """Smallest log-probability we represent: finite, and exp() of it is still > 0."""
    return math.log(torch.finfo(dtype).tiny)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): expm1 when the
    result is a small remainder near x = 0, log1p when exp(x) is small."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _same_temperature(cache_temperature: float, temperature: float) -> bool:
    # A tolerance, so that 2.0 read back from a config as 2.0000000001 keeps the exact tail.
    return math.isclose(cache_temperature, temperature, rel_tol=1e-9, abs_tol=0.0)


class LseChoice(NamedTuple):
    """Which logsumexp a reader of a cache takes for a training (or evaluation) temperature T'."""

    column: str          # "lse", or "lse_grid" for a grid temperature other than the stored one
    index: int           # the grid column of lse_grid (0 for "lse")
    temperature: float   # the T that lse was taken at: T' on the grid, else the stored T
    exact: bool          # T' is on the grid: the teacher's tail is known exactly


def cache_grid(stats: dict) -> list[float]:
    """The temperatures a cache holds an lse for, the stored one first: the manifest's
    `temperatures` (a grid cache), else [`temperature`] (every one-T cache, old ones included)."""
    t = float(stats["temperature"])
    grid = stats.get("temperatures")
    if grid is None:
        return [t]
    ok = isinstance(grid, list) and len(grid) > 1 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          and math.isfinite(x) and x > 0 for x in grid)
    if not ok or float(grid[0]) != t:
        raise KDError(f"the cache manifest's temperatures {str(grid)[:80]} do not form a grid starting at its temperature {t:g}; "
                      f"the manifest is damaged: rebuild the cache")
    return [float(x) for x in grid]


def choose_lse(grid: Sequence[float], temperature: float) -> LseChoice:
    """The lse to use at `temperature` from a cache with this grid (`cache_grid`), and whether the
    tail is then exact: on the grid, the lse taken at that very T (the values are rescaled by
    T_cache / T, pipeline.softtargets); off it, the stored lse, and the loss renormalises."""
    for j, t in enumerate(grid):
        if _same_temperature(t, temperature):
            return LseChoice("lse" if j == 0 else "lse_grid", j, float(t), True)
    return LseChoice("lse", 0, float(grid[0]), False)


def teacher_log_probs(
    topk_logits: Tensor, lse: Tensor, cache_temperature: float, temperature: float,
    lse_temperature: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Teacher log-probabilities at the stored ids, and of the tail when it is known.

    Returns ``(log p [N, k], log p_tail [N])`` at the cache temperature, exactly as the
    contract defines them; the tail is ``log(1 - sum p)`` computed as log1mexp of a
    logsumexp so that a tail of 1e-12 survives. Rounding (e.g. float16 logits) can push the
    stored mass to >= 1; such tails are clamped to the finite floor rather than NaN.

    ``lse_temperature`` is the T that ``lse`` was taken at (default: the cache's). When it is ``T``
    -- the cache's own, or a grid temperature whose lse the caller picked (`choose_lse`) -- the
    result is exact at T, with the stored values rescaled by ``cache_T / T``. Otherwise only
    ratios between stored logits are known (``lse`` at the new temperature would need all V
    logits), so the stored ids are rescaled by ``cache_T / T``, renormalised among themselves, and
    the tail is returned as ``None``. Computed in float64 if ``topk_logits`` is float64, else float32.
    """
    if cache_temperature <= 0 or temperature <= 0:
        raise KDError(f"temperatures must be > 0, got cache {cache_temperature}, student {temperature}")
    dtype = _compute_dtype(topk_logits)
    logits = topk_logits.to(dtype)
    floor = _floor(dtype)
    lse_t = cache_temperature if lse_temperature is None else lse_temperature
    if not _same_temperature(lse_t, temperature):
        return torch.log_softmax(logits * (cache_temperature / temperature), dim=-1).clamp(min=floor), None
    if not _same_temperature(cache_temperature, temperature):  # a grid temperature: v * T_cache / T
        logits = logits * (cache_temperature / temperature)
    log_p = logits - lse.to(device=logits.device, dtype=dtype).unsqueeze(-1)
    log_mass = torch.logsumexp(log_p, dim=-1).clamp(max=-torch.finfo(dtype).tiny)
    return log_p.clamp(min=floor), _log1mexp(log_mass).clamp(min=floor)


def _divergence(loss: str, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-position divergence [N] between bucket distributions given as log-probs [N, B].
    Inputs are finite (floored), so p * (log p - log q) is 0, never NaN, where p underflows."""
    p, q = log_p.exp(), log_q.exp()
    if loss in ("kl", "kl-renorm"):
        return (p * (log_p - log_q)).sum(-1)
    if loss == "reverse-kl":
        return (q * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # m = (p + q) / 2, in log space
    return 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)


TAIL_EXACT_BELOW = 1e-3


def _student_tail(s: Tensor, s_k: Tensor, ids: Tensor, log_z: Tensor, dtype: torch.dtype) -> Tensor:
    """log of the student's mass outside the stored ids, [N].

    log(1 - sum q) from the k gathered values costs nothing extra, and is accurate while the tail
    is not tiny; where it is below TAIL_EXACT_BELOW (1 - sum q would cancel), those rows alone take
    the exact route: a logsumexp over the non-stored logits. A second full-vocabulary pass
    for every row made this loss several times slower than cross-entropy."""
    log_mass = torch.logsumexp(s_k - log_z, dim=-1)
    tail = _log1mexp(log_mass.clamp(max=math.log1p(-TAIL_EXACT_BELOW)))
    hard = log_mass > math.log1p(-TAIL_EXACT_BELOW)
    if bool(hard.any()):
        rows = hard.nonzero().squeeze(-1)
        # finfo.min rather than -inf: a row whose remaining logits are all masked then has a
        # finite logsumexp and a zero (not NaN) gradient.
        rest = s[rows].scatter(1, ids[rows], torch.finfo(dtype).min)
        exact = torch.logsumexp(rest, dim=-1) - log_z[rows].squeeze(-1)
        tail = tail.index_put((rows,), exact)
    return tail


def kd_loss_sum(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logits: Tensor,
    lse: Tensor,
    *,
    loss: str = "kl",
    cache_temperature: float = 1.0,
    temperature: float | None = None,
    lse_temperature: float | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """Sum over the N positions of divergence(teacher, student) at temperature T.

    A *sum*, not a mean, so that the caller can normalise by the number of positions in the
    whole optimizer step (see `distillation_loss`) and gradient accumulation stays exact.

    student_logits [N, V] (any float dtype; computed in float32, or float64 if given float64),
    topk_ids [N, k], topk_logits [N, k], lse [N]. The student side is
    ``log_softmax(student_logits / T)`` over the full vocabulary, T defaulting to the cache
    temperature. Losses (see `LOSSES`):

    - ``kl``: KL(p || q) over the k ids plus one tail bucket for the rest of the mass. The
      student tail is a logsumexp over the non-stored entries (masked by scatter), not
      ``1 - sum q``, which would cancel catastrophically when the tail is small.
    - ``kl-renorm``: KL(p || q) with both renormalised over the k ids (the common, biased
      approximation; kept for comparison with other work).
    - ``reverse-kl``: KL(q || p) over the k + 1 buckets (mode-seeking).
    - ``jsd``: Jensen-Shannon divergence over the k + 1 buckets (bounded by log 2).

    If T differs from ``lse_temperature`` (the T of ``lse``: the cache's, or a grid temperature,
    see `choose_lse`) the teacher tail is unknown, so every loss falls back to the k renormalised
    ids on both sides.

    With ``counts`` (a sampled cache: topk_ids/topk_logits are the drawn ids, counts how often each
    was drawn) it is `sampled_kd_sum`, the unbiased estimate, and only ``kl`` at the cache's T exists.
    """
    if counts is not None:
        return sampled_kd_sum(student_logits, topk_ids, topk_logits, lse, counts, loss=loss,
                              cache_temperature=cache_temperature, temperature=temperature)
    if loss not in LOSSES:
        raise KDError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if student_logits.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape != topk_logits.shape:
        raise KDError(
            f"expected student_logits [N, V] and topk_ids/topk_logits [N, k], got "
            f"{tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_logits.shape)}"
        )
    n, vocab = student_logits.shape
    if topk_ids.shape[0] != n or lse.shape != (n,):
        raise KDError(
            f"teacher targets cover {topk_ids.shape[0]} positions (lse {tuple(lse.shape)}), student has {n}"
        )
    if topk_ids.shape[1] > vocab:
        raise KDError(f"cache stores k={topk_ids.shape[1]} ids but the student vocabulary has only {vocab}")
    t = cache_temperature if temperature is None else temperature
    dtype = _compute_dtype(student_logits)
    floor = _floor(dtype)
    device = student_logits.device
    ids = topk_ids.to(device=device, dtype=torch.long)
    teacher = topk_logits.to(device=device, dtype=dtype)
    log_p, log_p_tail = teacher_log_probs(teacher, lse, cache_temperature, t, lse_temperature)

    s = student_logits.to(dtype)
    if t != 1.0:
        s = s / t
    s_k = s.gather(1, ids)
    if loss == "kl-renorm" or log_p_tail is None:
        if log_p_tail is not None:  # same temperature: drop the tail and renormalise the teacher
            log_p = torch.log_softmax(log_p, dim=-1).clamp(min=floor)
        log_q = torch.log_softmax(s_k, dim=-1).clamp(min=floor)
        return _divergence("kl" if loss == "kl-renorm" else loss, log_p, log_q).sum()

    log_z = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q = (s_k - log_z).clamp(min=floor)
    if ids.shape[1] < vocab:
        log_q_tail = _student_tail(s, s_k, ids, log_z, dtype).clamp(min=floor).unsqueeze(-1)
        log_p = torch.cat([log_p, log_p_tail.unsqueeze(-1)], dim=-1)
        log_q = torch.cat([log_q, log_q_tail], dim=-1)
    # else k == V: the tail is empty for both, so there is no tail bucket at all.
    return _divergence(loss, log_p, log_q).sum()


def check_sampled(loss: str, cache_temperature: float, temperature: float) -> None:
    """Refuse what has no unbiased estimator from sampled targets (pipeline.softtargets, "Sampled
    targets"), instead of silently approximating it."""
    if loss != "kl":
        raise KDError(f"--loss {loss} has no unbiased estimate from sampled targets (only kl is an expectation under the "
                      f"teacher's distribution); use --loss kl, or a --target-mode topk cache for {loss}")
    if not _same_temperature(cache_temperature, temperature):
        raise KDError(f"sampled targets were drawn at T={cache_temperature:g}, so they are no sample at T={temperature:g}; "
                      f"train at --temperature {cache_temperature:g} or draw a cache at {temperature:g}")


def sampled_kd_sum(student_logits: Tensor, ids: Tensor, values: Tensor, lse: Tensor, counts: Tensor, *,
                   loss: str = "kl", cache_temperature: float = 1.0, temperature: float | None = None) -> Tensor:
    """Sum over positions of the unbiased KL estimate sum_i (c_i / M) (log p_T(i) - log q(i)) from a
    sampled cache: ids/values [N, W] the distinct drawn ids and their z/T, counts [N, W] how often
    each was drawn (0 = padding), lse [N]. q is the student's full-vocabulary softmax at T, which must
    be the cache's T. Its gradient is q - c / M, whose expectation is the dense q - p_T."""
    t = cache_temperature if temperature is None else temperature
    check_sampled(loss, cache_temperature, t)
    if ids.shape != values.shape or ids.shape != counts.shape or ids.shape[0] != student_logits.shape[0]:
        raise KDError(f"sampled targets {tuple(ids.shape)}/{tuple(values.shape)}/{tuple(counts.shape)} do not match "
                      f"{student_logits.shape[0]} student positions")
    dtype = _compute_dtype(student_logits)
    floor, device = _floor(dtype), student_logits.device
    w, log_p = sample_terms(values, lse, counts, dtype, device)
    s = student_logits.to(dtype)
    if t != 1.0:
        s = s / t
    log_q = (s.gather(1, ids.to(device=device, dtype=torch.long)) - torch.logsumexp(s, dim=-1, keepdim=True)).clamp(min=floor)
    return torch.where(w > 0, w * (log_p - log_q), 0.0).sum()


def sample_terms(values: Tensor, lse: Tensor, counts: Tensor, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """(weights c / M, 0 for padding; teacher log p_T = z/T - lse, floored) of sampled targets [N, W]."""
    w = counts.to(device=device, dtype=dtype)
    w = w / w.sum(-1, keepdim=True).clamp(min=1.0)
    log_p = values.to(device=device, dtype=dtype) - lse.to(device=device, dtype=dtype).unsqueeze(-1)
    return w, log_p.clamp(min=_floor(dtype))


def objective_rows(student: Tensor, topk_ids: Tensor, topk_logits: Tensor, lse: Tensor, hard_labels: Tensor | None, *,
                   alpha: float, mask: Tensor | None, num_positions: int | None, counts: Tensor | None = None):
    """The checks and the row selection that both forms of the objective share (`distillation_loss`
    on logits, `fused_loss.fused_distillation_loss` on hidden states): `student` is whichever of the
    two has one row per position. Returns the selected rows (counts last: None for a top-k cache)
    and the step-wide position count."""
    if not 0.0 <= alpha <= 1.0:
        raise KDError(f"alpha must be in [0, 1], got {alpha}")
    if hard_labels is None and alpha < 1.0:
        raise KDError(f"alpha={alpha} mixes in cross-entropy but no hard labels were given; use alpha=1")
    if mask is not None:
        rows = mask.to(device=student.device, dtype=torch.bool).nonzero().squeeze(-1)
        student, topk_ids, topk_logits, lse = (x.index_select(0, rows.to(x.device)) for x in (student, topk_ids, topk_logits, lse))
        if counts is not None:
            counts = counts.index_select(0, rows.to(counts.device))
        if hard_labels is not None:
            hard_labels = hard_labels.index_select(0, rows.to(hard_labels.device))
    n = student.shape[0]
    if num_positions is None:
        num_positions = n
    if num_positions < n:
        raise KDError(f"num_positions={num_positions} is smaller than the {n} positions in this call")
    return student, topk_ids, topk_logits, lse, hard_labels, num_positions, counts


def distillation_loss(
    student_logits: Tensor,
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
    lse_temperature: float | None = None,
    counts: Tensor | None = None,
) -> dict[str, Tensor]:
    """The training objective ``alpha * T^2 * KD + (1 - alpha) * CE``.

    T^2 keeps the soft-target gradients on the same scale as the hard-label ones when T
    changes (Hinton et al. 2015), so alpha means the same thing at every temperature.

    Normalisation: KD is summed over positions and divided by ``num_positions``; CE is summed
    over positions whose ``hard_labels`` is not -100 and divided by ``num_labelled``. Both
    counts are for the *whole optimizer step* (all gradient-accumulation micro-batches), given
    by the caller; they default to this call's counts. With the step-wide counts, summing the
    gradients of the micro-batches gives exactly the gradient of one big batch, which
    per-micro-batch means would not (micro-batches hold different numbers of positions).

    ``lse_temperature``: the T that ``lse`` was taken at (`kd_loss_sum`; default the cache's).
    ``counts``: a sampled cache's draw counts (`kd_loss_sum`); KD is then the unbiased estimate.

    ``mask`` [N] bool optionally selects the rows that take part (e.g. to drop padding); rows
    outside it contribute nothing, not even NaN, and get zero gradient. ``hard_labels`` may be
    None only when alpha == 1. alpha == 0 is plain cross-entropy: the KD term is then only
    evaluated without autograd, for reporting, so the teacher data cannot affect gradients.

    Returns {"loss": objective, "kd": mean divergence (unscaled, detached), "ce": CE (detached)}.
    """
    student_logits, topk_ids, topk_logits, lse, hard_labels, num_positions, counts = objective_rows(
        student_logits, topk_ids, topk_logits, lse, hard_labels, alpha=alpha, mask=mask, num_positions=num_positions,
        counts=counts)
    t = cache_temperature if temperature is None else temperature
    dtype = _compute_dtype(student_logits)

    def kd_mean() -> Tensor:
        kd_sum = kd_loss_sum(
            student_logits, topk_ids, topk_logits, lse,
            loss=loss, cache_temperature=cache_temperature, temperature=t, lse_temperature=lse_temperature, counts=counts,
        )
        return kd_sum / max(num_positions, 1)

    def ce_mean() -> Tensor:
        if hard_labels is None:
            return student_logits.new_zeros((), dtype=dtype)
        labels = hard_labels.to(device=student_logits.device, dtype=torch.long)
        count = num_labelled if num_labelled is not None else int((labels != -100).sum())
        ce_sum = F.cross_entropy(student_logits.to(dtype), labels, ignore_index=-100, reduction="sum")
        return ce_sum / max(count, 1)

    if alpha == 0.0:
        ce = ce_mean()
        with torch.no_grad():
            kd = kd_mean()
        total = ce
    elif alpha == 1.0:
        kd = kd_mean()
        with torch.no_grad():
            ce = ce_mean()
        total = (t * t) * kd
    else:
        kd, ce = kd_mean(), ce_mean()
        total = alpha * (t * t) * kd + (1.0 - alpha) * ce
    return {"loss": total, "kd": kd.detach(), "ce": ce.detach()}
