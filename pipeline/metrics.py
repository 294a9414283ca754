"""Evaluation metrics: pure functions over numpy arrays or torch tensors.

Stage 3 (`kd eval`) reports task metrics for every student and compares students with the
teacher.  The teacher is usually known only through its targets cache (see the soft-target
contract in DESIGN.md: `topk_ids`, `topk_logits` = z/T, `lse` = logsumexp(z/T)), so the
teacher-side metrics here read that cache format directly instead of needing teacher logits.

Everything is computed in numpy (float64 where it matters) so the numbers do not depend on the
device or dtype a student ran in.  Tensors are accepted and copied to the CPU; torch itself is
not imported.  Labels equal to -100 (the transformers convention for "no target here") are
ignored wherever labels are taken.  A metric with nothing to measure raises ValueError rather
than returning a silent NaN, except entity P/R/F1, where conlleval's 0/0 = 0 is the convention.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE_INDEX = -100
_LOG_TINY = float(np.log(np.finfo(np.float64).tiny))  # about -708: floor for student log-probs


def _np(x, dtype=None) -> np.ndarray:
    """Any array-like (numpy, torch incl. bfloat16 / CUDA, list) as a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:  # bfloat16 and friends have no numpy dtype
            x = x.float().numpy()
    return np.asarray(x, dtype=dtype)


def _labelled(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    """Flattened (preds, labels) at the positions whose label is not -100."""
    p, y = _np(preds).reshape(-1), _np(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in size: {p.size} vs {y.size}")
    keep = y != IGNORE_INDEX
    if not keep.any():
        raise ValueError("no labelled positions (all labels are -100 or the input is empty)")
    return p[keep].astype(np.int64), y[keep].astype(np.int64)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable logsumexp; a row that is all -inf gives -inf (an empty set has log-mass -inf)."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def accuracy(preds, labels) -> float:
    """Fraction of labelled positions (label != -100) where the prediction equals the label."""
    p, y = _labelled(preds, labels)
    return float(np.mean(p == y))


def macro_f1(preds, labels, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions.

    This is sklearn's `f1_score(average="macro", labels=union)`: a class that never occurs and is
    never predicted (TP + FP + FN = 0) has no defined F1 and is left out, so the score does not
    depend on how many unused classes the label set declares; a class that occurs but is never
    predicted correctly counts with F1 = 0.  `num_classes`, when given, only checks that every id
    lies in [0, num_classes), catching a student/label-set mismatch early.
    """
    p, y = _labelled(preds, labels)
    if min(p.min(), y.min()) < 0:
        raise ValueError("class ids must be >= 0 (only -100 is allowed, as 'ignore')")
    k = int(max(p.max(), y.max())) + 1
    if num_classes is not None:
        if k > num_classes:
            raise ValueError(f"class id {k - 1} is out of range for num_classes={num_classes}")
        k = num_classes
    tp = np.bincount(y[p == y], minlength=k).astype(np.float64)
    fp = np.bincount(p, minlength=k) - tp
    fn = np.bincount(y, minlength=k) - tp
    present = (tp + fp + fn) > 0
    f1 = 2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])  # = 2PR/(P+R), 0 if TP=0
    return float(np.mean(f1))


def _split_tag(tag: str) -> tuple[str, str | None]:
    """(prefix, type) of a BIO tag: ("O", None), ("B", "PER"), ("I", "PER").

    A tag without a prefix ("PER") is read as "I-PER", i.e. the IO scheme: a run of equal bare
    tags is one entity.  (conlleval would give it an empty type and never start a chunk on it,
    silently dropping such entities, which is never what a user means.)  IOBES/BILOU markers
    (E-, S-, L-, U-) are refused rather than misread: this module scores plain BIO / IOB1 / IOB2.
    """
    if tag == "O":
        return "O", None
    if not tag:
        raise ValueError("empty tag: use 'O' for tokens outside any entity")
    head, sep, rest = tag.partition("-")
    if sep and head in ("B", "I") and rest:
        return head, rest
    if sep and len(head) == 1 and head.isalpha():
        raise ValueError(f"unsupported tag {tag!r}: only BIO tags (B-X, I-X, O) are scored")
    return "I", tag


def bio_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities of one BIO-tagged sequence as (type, start, end), `end` exclusive (tags[start:end]).

    conlleval semantics, so that numbers match the CoNLL literature: an entity starts at B-X, or
    at I-X that follows O or a tag of another type (a lenient start: an I- without its B- still
    counts, which also makes IOB1 work); it continues through I-X and ends before O, any B-, an
    I-Y with Y != X, or the end of the sequence.
    """
    out: set[tuple[str, int, int]] = set()
    cur_type: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        prefix, typ = _split_tag(tag)
        if cur_type is not None and (prefix != "I" or typ != cur_type):
            out.add((cur_type, start, i))
            cur_type = None
        if prefix != "O" and cur_type is None:
            cur_type, start = typ, i
    if cur_type is not None:
        out.add((cur_type, start, len(tags)))
    return out


def entity_prf(true_seqs: list[list[str]], pred_seqs: list[list[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision, recall and F1 (conlleval / seqeval default).

    An entity counts as correct only with the exact span and type.  Counts are pooled over all
    sequences; a ratio with a zero denominator is 0 (no predicted entities: precision 0; no gold
    entities: recall 0), as conlleval reports it.  Values are fractions in [0, 1], not percent.
    """
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"{len(true_seqs)} gold sequences but {len(pred_seqs)} predicted")
    n_true = n_pred = n_ok = 0
    for i, (t, p) in enumerate(zip(true_seqs, pred_seqs)):
        if len(t) != len(p):
            raise ValueError(f"sequence {i}: {len(t)} gold tags but {len(p)} predicted tags")
        te, pe = bio_entities(t), bio_entities(p)
        n_true, n_pred, n_ok = n_true + len(te), n_pred + len(pe), n_ok + len(te & pe)
    precision = n_ok / n_pred if n_pred else 0.0
    recall = n_ok / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of (n_b/N)|acc_b - conf_b|.

    Confidence is the top probability; bin b covers (b/n_bins, (b+1)/n_bins].  Distillation
    changes calibration as much as accuracy, which is why the report carries it.  `probs` must be
    probabilities (rows summing to 1); logits are refused rather than silently mis-binned.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    pr = _np(probs, np.float64)
    pr = pr.reshape(-1, pr.shape[-1])
    y = _np(labels).reshape(-1)
    if y.shape[0] != pr.shape[0]:
        raise ValueError(f"probs has {pr.shape[0]} rows but labels has {y.shape[0]}")
    keep = y != IGNORE_INDEX
    pr, y = pr[keep], y[keep]
    if y.size == 0:
        raise ValueError("no labelled positions to calibrate over")
    if not np.allclose(pr.sum(-1), 1.0, atol=1e-3) or (pr < 0).any():
        raise ValueError("probs rows must be probabilities summing to 1 (apply softmax to logits)")
    conf, correct = pr.max(-1), (pr.argmax(-1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, correct, n_bins) - np.bincount(b, conf, n_bins))  # per-bin sums
    return float(gap.sum() / count.sum())  # = sum_b (n_b/N) |acc_b - conf_b|


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean NLL) from a summed NLL and a token count (sums are what a streaming eval keeps)."""
    if count <= 0:
        raise ValueError(f"perplexity needs at least one token, got count={count}")
    try:
        return math.exp(nll_sum / count)
    except OverflowError:
        return math.inf


def teacher_predictions(topk_ids) -> np.ndarray:
    """The teacher's argmax at each position: ids are stored in descending order of logit."""
    return _np(topk_ids)[..., 0]


def teacher_tail_mass(topk_logits, lse) -> np.ndarray:
    """Teacher probability (at the cache temperature) outside the stored top-k, per position
    (the tail mass of pipeline.softtargets' formulas).

    1 - sum(exp(topk_logits - lse)), clipped at 0 because float16 logits can overshoot by an ulp.
    A large tail means k is too small for this teacher/temperature.
    """
    t = _np(topk_logits, np.float64)
    mass = np.exp(t - _np(lse, np.float64)[..., None]).sum(-1)
    return np.clip(1.0 - mass, 0.0, 1.0)


def kl_per_position(student_logits, topk_ids, topk_logits, lse, cache_temperature: float,
                    chunk_elements: int = 1 << 24, lse_temperature: float | None = None) -> np.ndarray:
    """KL(teacher || student) at T = 1 per position, over the k stored ids plus one tail bucket
    (the formulas: pipeline.softtargets; the training loss is pipeline.losses.kd_loss_sum).

    Inputs may carry any leading shape ([N, ...]); they are flattened to positions.  The cache
    holds z/T_cache, so the teacher's T = 1 logits at the stored ids are topk_logits * T_cache:

    * T_cache == 1: log p(i) = topk_logits_i - lse exactly and the teacher's tail bucket holds the
      true remaining mass 1 - sum p(i) (if float16 rounding makes sum p(i) exceed 1, the top-k is
      renormalised and the tail is 0).
    * T_cache != 1: lse is logsumexp(z/T_cache), which says nothing about the T = 1 tail, so the
      teacher is renormalised over its top-k and its tail bucket is 0.  The KL is then that of
      the teacher restricted to its top-k: a good proxy when the tail is small, not exact.
    * unless `lse_temperature` is 1: a grid cache's lse at T = 1 (pipeline.losses.choose_lse) is
      passed as `lse`, and the tail is exact as in the first case, whatever T_cache is.

    The student's buckets are its T = 1 probabilities at the same ids and its exact remaining
    mass.  With k = V the tail is empty, both tail buckets are 0 and the result is the dense KL.
    Float64, in row chunks (a [N, 50k] input does not double in memory); 0 log 0 = 0 and student
    log-probs are floored at log(float64 tiny) ~ -708, so the result is never NaN: a student that
    rules out a token the teacher allows gets a large finite KL rather than inf.
    """
    s_all = _np(student_logits)
    v = s_all.shape[-1]
    s_all = s_all.reshape(-1, v)
    ids_all = _np(topk_ids).astype(np.int64)
    k = ids_all.shape[-1]
    ids_all = ids_all.reshape(-1, k)
    tl_all = _np(topk_logits).reshape(-1, k)
    lse_all = _np(lse).reshape(-1)
    n = s_all.shape[0]
    if not (ids_all.shape[0] == tl_all.shape[0] == lse_all.shape[0] == n):
        raise ValueError(f"position counts differ: student {n}, topk_ids {ids_all.shape[0]}, "
                         f"topk_logits {tl_all.shape[0]}, lse {lse_all.shape[0]}")
    if n == 0:
        raise ValueError("no positions to compare")
    if k > v or ids_all.min() < 0 or ids_all.max() >= v:
        raise ValueError(f"topk_ids do not fit a student vocabulary of {v}")
    if cache_temperature <= 0:
        raise ValueError(f"cache_temperature must be > 0, got {cache_temperature}")
    lse_t = cache_temperature if lse_temperature is None else lse_temperature
    exact_tail = abs(lse_t - 1.0) < 1e-12 and k < v
    out = np.empty(n, dtype=np.float64)
    step = max(1, chunk_elements // v)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for a in range(0, n, step):
            s = s_all[a:a + step].astype(np.float64)
            ids = ids_all[a:a + step]
            rows = np.arange(s.shape[0])[:, None]
            log_z = _logsumexp(s)[:, None]
            logq = s[rows, ids] - log_z
            masked = s.copy()
            masked[rows, ids] = -np.inf
            logq_tail = _logsumexp(masked) - log_z[:, 0]  # -inf when k = V (empty tail)
            logq, logq_tail = np.maximum(logq, _LOG_TINY), np.maximum(logq_tail, _LOG_TINY)

            tl = tl_all[a:a + step].astype(np.float64) * cache_temperature
            if exact_tail:
                logp = tl - lse_all[a:a + step].astype(np.float64)[:, None]
                p_top = np.exp(logp).sum(-1)
                over = p_top >= 1.0  # rounding overshoot: renormalise those rows
                logp[over] -= np.log(p_top[over])[:, None]
                p_tail = np.where(over, 0.0, 1.0 - p_top)
            else:
                logp = tl - _logsumexp(tl)[:, None]
                p_tail = np.zeros(s.shape[0])
            p = np.exp(logp)
            top = np.where(p > 0, p * (logp - logq), 0.0).sum(-1)
            tail = np.where(p_tail > 0, p_tail * (np.log(p_tail) - logq_tail), 0.0)
            out[a:a + step] = np.maximum(top + tail, 0.0)  # KL >= 0; clip rounding noise
    return out
