"""Turning teacher outputs into soft targets: top-k ids, z/T and the full-vocabulary logsumexp.

The vocabulary of a modern LM reaches 262k; a batch of 8k positions would need 8 GB of
float32 logits. So for language-model tasks the body runs once, the hidden states of the
target positions are gathered, and the LM head is applied a bounded slab of positions at a
time, each slab converted to float32 only to take its top-k and logsumexp. The split into
body and head is checked once against the model's own forward; a model whose head cannot be
split that way falls back to the full forward, still reduced slab by slab.

The math of a cache entry -- the one home of these formulas; `pipeline.losses` (torch, for
training) and `pipeline.metrics` (numpy float64, for evaluation and `kd inspect`) implement them
and cite this. For a position with teacher logits z over V ids, temperature T, stored values
v_i = z_i / T at the top-k ids i and lse = logsumexp(z / T) over all V ids:

    log p_T(i) = v_i - lse                                   exact, for every stored id
    tail mass  = 1 - sum_i exp(v_i - lse)                    the mass of the V - k ids not stored,
               = -expm1(logsumexp(v - lse))                  computed so that a tail of 1e-12 survives
    KL_{k+1}(p || q) = sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

where q is the student's softmax at the same T and q_tail its mass outside the stored ids. The
(k+1)-bucket KL is a true KL between two distributions (a coarsening of the full-vocabulary KL,
so it never exceeds it), unlike the top-k-renormalised one. Edge cases, the same on both sides:
k == V has no tail bucket (the KL is the dense one); float16 rounding can make the stored mass
exceed 1 by an ulp, and such a tail is taken as 0 (never negative, never NaN); at a temperature
T' other than the cache's, v * T / T' gives exact ratios among the stored ids but the tail is
unknown, so both sides are renormalised over the k ids.

A temperature grid (`kd teacher --temperatures T0,T1,...`) removes that limit for the grid's
temperatures. The top-k ids are the same at every T (z/T is a monotone map of z) and the values
rescale exactly, z/T' = (z/T0) * T0/T'; only the full-vocabulary logsumexp depends on T. So a grid
cache stores v = z/T0 once and lse_j = logsumexp(z/T_j) for every grid T_j (the `lse_grid` column,
lse_grid[p][0] == lse[p]), and at T' = T_j

    log p_T'(i) = v_i * T0 / T' - lse_j                    exact, tail included,

computed in the same slab pass as lse (one more exp pass over the slab per extra T, no forward).
Off the grid the renormalised approximation above still applies. `pipeline.losses.choose_lse`
says which lse a reader takes for a T'.

Sampled targets (`kd teacher --target-mode sampled --samples M`; Sparse Logit Sampling, arXiv
2503.16870) replace the top-k by M ids drawn with replacement from p_T itself. A position stores the
distinct drawn ids i, their counts c_i (sum M) and v_i = z_i / T, with lse as above, so

    log p_T(i) = v_i - lse                                   still exact, for every stored id
    CE(p_T, q) = E_{i ~ p_T}[-log q_i]  ~  sum_i (c_i / M) (-log q_i)
    KL(p_T || q) ~ sum_i (c_i / M) (log p_T(i) - log q_i)    unbiased, value and gradient:
    d/ds of the estimate = q - c / M,  E[c / M] = p_T        (s: the student's logits / T)

over the full vocabulary, with no tail bucket and no renormalisation: the bias of top-k is gone, at
the price of variance that falls as 1/M. Only losses that are expectations under p_T have such a form
(`kl`; not the reverse KL or the JSD, which weigh ids by the student's own probabilities). The draws
are inverse-CDF lookups of counter-based uniforms keyed by (cache key, row, position, draw), so a
rerun, any batching and any job-array split draw the same ids; `uniforms` is that generator.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.data import pad_batch, pad_id, token_budget_batches
from pipeline.errors import KDError
from pipeline.models import split_head

FP16_MAX = 65504.0
SPLIT_CHECK_TOKENS = 32


class Extractor:
    """Computes (topk_ids, topk z/T, logsumexp z/T) for the target positions of a batch.

    With a `grid` of several temperatures (its first entry == `temperature`), the logsumexp comes
    back as [n, G], column j at grid[j] (column 0 is the plain lse)."""

    def __init__(self, model, task_type: str, top_k: int | None, temperature: float,
                 slab_bytes: int = 256 << 20, vocab_limit: int | None = None, profile: bool = False,
                 grid: list[float] | None = None, samples: int | None = None, seed: int = 0):
        self.model, self.task_type, self.temperature = model, task_type, float(temperature)
        if grid is not None and len(grid) > 1 and float(grid[0]) != self.temperature:
            raise KDError(f"the grid {grid} must start at the stored temperature {temperature}")
        # z/T_j = (z/T0) * T0/T_j: the extra logsumexps reuse the slab already divided by T0
        self.ratios = [self.temperature / float(t) for t in grid[1:]] if grid is not None else []
        self.top_k, self.vocab_limit = top_k, vocab_limit  # vocab_limit: padding ids are left out (pipeline.fit)
        # sampled mode: M draws per position instead of the top-k, keyed by `seed` (from the cache key)
        self.samples, self.seed = samples, seed
        if samples is not None and self.ratios:
            raise KDError("sampled targets are drawn at one temperature; drop the grid")
        self.slab_bytes = slab_bytes
        self.split = split_head(model, task_type)
        # profile: synchronised timers around the body and around head + top-k + logsumexp. They
        # serialise a GPU, so they are for benchmarks (bench_teacher), never on by default.
        self.profile = {"body_seconds": 0.0, "reduce_seconds": 0.0} if profile else None
        self._checked = self.split is None

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: list[list[int]],
                 rows: list[int] | None = None):
        b_idx = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], dtype=torch.long)
        p_idx = torch.tensor([p for ps in positions for p in ps], dtype=torch.long)
        keys = None
        if self.samples is not None:  # (row, position) of every target: what the draws are keyed by
            if rows is None:
                raise KDError("sampled targets need the rows of the batch")
            keys = (np.asarray(rows, np.int64)[b_idx.numpy()], p_idx.numpy())
        if not self._checked:
            self._check_split(input_ids[:1], attention_mask[:1])
        t0 = self._tick(input_ids.device)
        if self.split is not None:
            body, head = self.split
            hidden = body(input_ids=input_ids, attention_mask=attention_mask)[0]
            feats = hidden[b_idx.to(hidden.device), p_idx.to(hidden.device)]
            slab_fn = head
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            if logits.dim() == 2:  # sequence classification: one output per example
                feats = logits[b_idx.to(logits.device)]
            else:
                feats = logits[b_idx.to(logits.device), p_idx.to(logits.device)]
            slab_fn = None
        t1 = self._tick(input_ids.device)
        out = self._reduce(feats, slab_fn, keys)
        if self.profile is not None:
            self.profile["body_seconds"] += t1 - t0
            self.profile["reduce_seconds"] += self._tick(input_ids.device) - t1
        return out

    def _tick(self, device) -> float:
        if self.profile is None:
            return 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _reduce(self, feats, slab_fn, keys=None):
        n = feats.shape[0]
        vocab = None
        ids_out, val_out, lse_out = [], [], []
        start = 0
        while start < n:
            if vocab is None:  # size the slab once the vocabulary is known
                probe = slab_fn(feats[:1]) if slab_fn is not None else feats[:1]
                vocab = min(probe.shape[-1], self.vocab_limit or probe.shape[-1])
                if self.samples is None and self.top_k > vocab:
                    raise KDError(f"--top-k {self.top_k} is larger than the teacher's {vocab} outputs; use --top-k {vocab} or less")
                # a grid's extra logsumexps hold one more slab-sized temporary, sampling a float64 CDF:
                # fewer rows keep the bound
                step = max(1, self.slab_bytes // (4 * vocab * (2 if self.ratios else 3 if self.samples else 1)))
            chunk = feats[start:start + step]
            # z is a private temporary (the head's output or a gathered copy), so it is reduced in
            # place: one pass less than logsumexp's own max, no copy for /T at T = 1.
            z = (slab_fn(chunk) if slab_fn is not None else chunk)[:, :vocab].float()
            if self.temperature != 1.0:
                z.div_(self.temperature)
            if self.samples is not None:
                ids, vals, lse = self._sample(z, *(k[start:start + z.shape[0]] for k in keys))
                ids_out.append(ids)
                val_out.append(vals)
                lse_out.append(lse)
                start += step
                continue
            vals, ids = torch.topk(z, self.top_k, dim=-1, sorted=True)
            top = vals[:, :1]
            # NaN or +inf anywhere in a row makes its lse non-finite; the caller checks that on the
            # host, after the copy, so that no check here waits for the GPU.
            z.sub_(top)  # <= 0, and its max scales with T: at T_j it is top * T0/T_j
            extra = [top.squeeze(-1) * r + (z * r).exp_().sum(-1).log() for r in self.ratios]
            lse = top.squeeze(-1) + z.exp_().sum(-1).log()
            lse_out.append(torch.stack([lse, *extra], dim=-1) if extra else lse)
            ids_out.append(ids.to(torch.int32))
            val_out.append(vals)
            start += step
        if n == 0:
            k = self.top_k if self.samples is None else self.samples
            dev = feats.device
            return (torch.empty(0, k, dtype=torch.int32, device=dev), torch.empty(0, k, device=dev),
                    torch.empty(0, 1 + len(self.ratios), device=dev) if self.ratios else torch.empty(0, device=dev))
        return torch.cat(ids_out), torch.cat(val_out), torch.cat(lse_out)

    def _sample(self, z: torch.Tensor, rows: np.ndarray, positions: np.ndarray):
        """(draws [n, M] int32, z/T at them, lse [n]) for a slab z = z/T (reduced in place) of these
        (row, position) targets: the inverse CDF of p_T at keyed uniforms, the CDF summed in float64 so that no id's share of it
        is lost to rounding (pipeline.softtargets, "Sampled targets")."""
        top = z.max(dim=-1, keepdim=True).values
        z.sub_(top).exp_()  # p_T times exp(top - lse), <= 1
        lse = top.squeeze(-1) + z.sum(-1).log()
        cdf = torch.cumsum(z, dim=-1, dtype=torch.float64)
        u = uniforms(self.seed, rows, positions, self.samples)
        draws = torch.searchsorted(cdf, torch.from_numpy(u).to(cdf.device) * cdf[:, -1:], right=True)
        del cdf
        draws.clamp_(max=z.shape[1] - 1)
        return draws.to(torch.int32), z.gather(1, draws).log_().add_(top), lse

    def _check_split(self, input_ids, attention_mask):
        """Compare the body+head path with the model's own forward on one row, once: on its first
        SPLIT_CHECK_TOKENS tokens, because the full forward materialises several float32
        [length, vocabulary] copies (3.4 GB for 256 tokens of a 262k vocabulary) and stage 1's
        peak memory must not grow with --max-length; a prefix shows the composition as well."""
        self._checked = True
        body, head = self.split
        length = min(int(attention_mask[0].sum()), SPLIT_CHECK_TOKENS)
        ids, mask = input_ids[:, :length], attention_mask[:, :length]
        full = self.model(input_ids=ids, attention_mask=mask).logits[0].float()
        mine = head(body(input_ids=ids, attention_mask=mask)[0][0]).float()
        tol = 1e-3 if full.dtype == torch.float32 and ids.device.type == "cpu" else 5e-2
        if full.shape != mine.shape or not torch.allclose(full, mine, atol=tol * max(1.0, float(full.abs().max())), rtol=0):
            self.split = None  # unknown head composition: use the full forward


def launch(extractor: Extractor, examples, tokenizer, batch_tokens: int, device):
    """Launch the teacher on every batch of a shard, length-bucketed under the token budget.

    Results come back as device-to-host copies still in flight plus an event: nothing here
    waits for the GPU, so the writer thread (which synchronises on the event, in `collect`)
    overlaps the copies and the Parquet writing with the next shard's forward passes."""
    pad = pad_id(tokenizer)
    launched = []
    for batch in token_budget_batches([len(e.input_ids) for e in examples], batch_tokens):
        ids, att = pad_batch([examples[i].input_ids for i in batch], pad)
        res = extractor(ids.to(device, non_blocking=True), att.to(device, non_blocking=True),
                        [examples[i].positions for i in batch], [examples[i].row for i in batch])
        launched.append((batch, *(t.to("cpu", non_blocking=True) for t in res)))
    event = None
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return launched, event


def collect(examples, launched, event):
    """Per example, in input order: (topk_ids [p,k] int32, z/T [p,k] float32, lse [p] float32), lse
    [p, G] with a grid (column j at grid temperature j)."""
    if event is not None:
        event.synchronize()
    results = [None] * len(examples)
    for batch, top_ids, top_vals, lse in launched:
        top_ids, top_vals, lse = top_ids.numpy(), top_vals.float().numpy(), lse.float().numpy()
        owners = [(i, p) for i in batch for p in examples[i].positions]
        check_finite(lse, top_vals, lambda j, owners=owners: (examples[owners[j][0]].row, owners[j][1]))
        offset = 0
        for i in batch:
            p = len(examples[i].positions)
            results[i] = (top_ids[offset:offset + p], top_vals[offset:offset + p], lse[offset:offset + p])
            offset += p
    return results


def check_finite(lse: np.ndarray, values: np.ndarray, where) -> None:
    """Refuse NaN / +inf teacher outputs, naming the first bad (row, position) via `where(i)`."""
    lse = lse.reshape(len(lse), -1)  # [n] or, with a grid, [n, G]
    bad = ~np.isfinite(lse).all(-1) | ~np.isfinite(values).all(-1) if values.size else ~np.isfinite(lse).all(-1)
    if bad.any():
        row, pos = where(int(np.flatnonzero(bad)[0]))
        raise KDError(f"teacher produced NaN/inf logits at row {row} position {pos}; check the weights or run with --dtype float32")


_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs pass BigCrush as a counter-based stream."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def sample_seed(cache_key: str) -> int:
    """The draws' seed: the cache key (which holds --sample-seed, M and everything else the draws depend on)."""
    return int(cache_key[:16], 16)


def uniforms(seed: int, rows: np.ndarray, positions: np.ndarray, m: int) -> np.ndarray:
    """[n, m] float64 uniforms in [0, 1), a pure function of (seed, row, position, draw index):
    counter-based, so no state carries from one batch, shard or array task to the next."""
    with np.errstate(over="ignore"):
        base = _mix(_mix(_mix(np.full(len(rows), seed, np.uint64)) ^ rows.astype(np.uint64)) ^ positions.astype(np.uint64))
        x = _mix(base[:, None] ^ np.arange(m, dtype=np.uint64)[None, :])
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def distinct_draws(draws: np.ndarray, values: np.ndarray):
    """(distinct per position [n], ids, counts, values) of [n, M] draws: each position's distinct ids in
    ascending order with how often each was drawn, flat; what a sampled cache stores."""
    n, m = draws.shape
    order = np.argsort(draws, axis=1, kind="stable")
    ids, vals = np.take_along_axis(draws, order, 1), np.take_along_axis(values, order, 1)
    new = np.ones((n, m), dtype=bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ids, vals, new = ids.ravel(), vals.ravel(), new.ravel()
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, n * m))
    return new.reshape(n, m).sum(1), ids[new], counts.astype(np.uint16), vals[new]


def bucket_kl(log_p: np.ndarray, log_q: np.ndarray, exact_tail: bool = True) -> np.ndarray:
    """Per position, the (k+1)-bucket KL(p || q) of this module's doc between two [P, k] sets of
    log-probabilities of the same ids (float64): e.g. a teacher's float32 top-k and the same top-k as
    a cache stores it. A mass at or above 1 leaves an empty tail (clamped, as the losses do);
    `exact_tail` False (k == V): no tail bucket at all."""
    lp, lq = log_p.astype(np.float64), log_q.astype(np.float64)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    if exact_tail:
        tiny = np.finfo(np.float64).tiny
        tp, tq = (np.maximum(-np.expm1(np.logaddexp.reduce(x, axis=-1)), tiny) if x.size else np.ones(len(x))
                  for x in (lp, lq))
        kl = kl + tp * (np.log(tp) - np.log(tq))
    return kl


def to_value_dtype(values: np.ndarray, value_dtype: str) -> np.ndarray:
    if value_dtype == "float16":
        if values.size and float(np.abs(values).max()) > FP16_MAX:
            raise KDError("teacher logits / T exceed the float16 range; use --value-dtype float32 or a higher --temperature")
        return values.astype(np.float16)
    return values.astype(np.float32)
