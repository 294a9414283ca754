"""Turning teacher outputs into soft targets: top-k ids, z/T and the full-vocabulary logsumexp.

The vocabulary of a modern LM reaches 262k; a batch of 8k positions would need 8 GB of
float32 logits. So for language-model tasks the body runs once, the hidden states of the
target positions are gathered, and the LM head is applied a bounded slab of positions at a
time, each slab converted to float32 only to take its top-k and logsumexp. The split into
body and head is checked once against the model's own forward; a model whose head cannot be
split that way falls back to the full forward, still reduced slab by slab.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import KDError
from pipeline.models import split_head

FP16_MAX = 65504.0


class Extractor:
    """Computes (topk_ids, topk z/T, logsumexp z/T) for the target positions of a batch."""

    def __init__(self, model, task_type: str, top_k: int, temperature: float,
                 slab_bytes: int = 256 << 20):
        self.model, self.task_type, self.temperature = model, task_type, float(temperature)
        self.top_k = top_k
        self.slab_bytes = slab_bytes
        self.split = split_head(model, task_type)
        self._checked = self.split is None

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: list[list[int]]):
        b_idx = torch.tensor([b for b, ps in enumerate(positions) for _ in ps], dtype=torch.long)
        p_idx = torch.tensor([p for ps in positions for p in ps], dtype=torch.long)
        if not self._checked:
            self._check_split(input_ids[:1], attention_mask[:1])
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
        return self._reduce(feats, slab_fn)

    def _reduce(self, feats, slab_fn):
        n = feats.shape[0]
        vocab = None
        ids_out, val_out, lse_out = [], [], []
        start = 0
        while start < n:
            if vocab is None:  # size the slab once the vocabulary is known
                probe = slab_fn(feats[:1]) if slab_fn is not None else feats[:1]
                vocab = probe.shape[-1]
                if self.top_k > vocab:
                    raise KDError(f"--top-k {self.top_k} is larger than the teacher's {vocab} outputs; use --top-k {vocab} or less")
                step = max(1, self.slab_bytes // (4 * vocab))
            chunk = feats[start:start + step]
            # z is a private temporary (the head's output or a gathered copy), so it is reduced in
            # place: one pass less than logsumexp's own max, no copy for /T at T = 1.
            z = (slab_fn(chunk) if slab_fn is not None else chunk).float()
            if self.temperature != 1.0:
                z.div_(self.temperature)
            vals, ids = torch.topk(z, self.top_k, dim=-1, sorted=True)
            top = vals[:, :1]
            # NaN or +inf anywhere in a row makes its lse non-finite; the caller checks that on the
            # host, after the copy, so that no check here waits for the GPU.
            lse_out.append(top.squeeze(-1) + z.sub_(top).exp_().sum(-1).log())
            ids_out.append(ids.to(torch.int32))
            val_out.append(vals)
            start += step
        if n == 0:
            k = self.top_k
            dev = feats.device
            return (torch.empty(0, k, dtype=torch.int32, device=dev), torch.empty(0, k, device=dev),
                    torch.empty(0, device=dev))
        return torch.cat(ids_out), torch.cat(val_out), torch.cat(lse_out)

    def _check_split(self, input_ids, attention_mask):
        """Compare the body+head path with the model's own forward on one row, once."""
        self._checked = True
        body, head = self.split
        length = int(attention_mask[0].sum())
        ids, mask = input_ids[:, :length], attention_mask[:, :length]
        full = self.model(input_ids=ids, attention_mask=mask).logits[0].float()
        mine = head(body(input_ids=ids, attention_mask=mask)[0][0]).float()
        tol = 1e-3 if full.dtype == torch.float32 and ids.device.type == "cpu" else 5e-2
        if full.shape != mine.shape or not torch.allclose(full, mine, atol=tol * max(1.0, float(full.abs().max())), rtol=0):
            self.split = None  # unknown head composition: use the full forward


def check_finite(lse: np.ndarray, values: np.ndarray, where) -> None:
    """Refuse NaN / +inf teacher outputs, naming the first bad (row, position) via `where(i)`."""
    bad = ~np.isfinite(lse) | ~np.isfinite(values).all(-1) if values.size else ~np.isfinite(lse)
    if bad.any():
        row, pos = where(int(np.flatnonzero(bad)[0]))
        raise KDError(f"teacher produced NaN/inf logits at row {row} position {pos}; check the weights or run with --dtype float32")


def to_value_dtype(values: np.ndarray, value_dtype: str) -> np.ndarray:
    if value_dtype == "float16":
        if values.size and float(np.abs(values).max()) > FP16_MAX:
            raise KDError("teacher logits / T exceed the float16 range; use --value-dtype float32 or a higher --temperature")
        return values.astype(np.float16)
    return values.astype(np.float32)
