"""Running scores of one model (or of the teacher's cache) over streamed evaluation rows.

Kept apart from the stage-3 recipe so that the recipe reads as the order of work, and so
that the arithmetic -- gold labels per task type, teacher probabilities from a cache -- can
be tested on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import format as fmt
from pipeline import manifest
from pipeline import metrics as M
from pipeline import tasks
from pipeline.errors import KDError
from pipeline.losses import cache_grid, choose_lse

class Tally:
    """Running sums for one model over streamed rows. Classification keeps one prediction, label
    and probability row per position (F1 and ECE need them all, and C is small); language models
    keep sums only, so a split of any size streams in bounded memory."""

    def __init__(self, task_type: str, id2label: dict[int, str], from_cache: bool = False):
        self.task_type, self.id2label, self.from_cache = task_type, id2label, from_cache
        self.task = tasks.get(task_type)
        self.classify = self.task.classification
        self.entities = "entity_f1" in self.task.metrics  # tags per word, scored as BIO entities
        self.preds, self.gold, self.probs, self.true_tags, self.pred_tags = [], [], [], [], []
        self.calibrated, self.exact_nll = True, True
        self.nll, self.tokens, self.outside = 0.0, 0, 0
        self.agree, self.kl, self.compared, self.rows, self.positions = 0, 0.0, 0, 0, 0
        self.row_ids, self.row_num, self.row_den = [], [], []  # per-row sums: pipeline.uncertainty's input

    def add_model(self, rows: list[dict], logits: torch.Tensor, temperature: float | None) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        gold = self._count(rows)
        if self.classify:
            self._classified(rows, gold, logp.argmax(-1).numpy(), logp.double().exp().numpy())
        else:
            keep = gold != M.IGNORE_INDEX
            at = torch.from_numpy(np.where(keep, gold, 0))[:, None]
            nll = -logp.gather(1, at)[:, 0].double().numpy()
            self.nll += float(nll[keep].sum())
            self.tokens += int(keep.sum())
            self._per_row(rows, nll, keep)
        if rows and rows[0].get("teacher") is not None and len(gold):
            ids, vals, lse = (np.concatenate([r["teacher"][i] for r in rows]) for i in range(3))
            lp = logp.numpy()
            self.agree += int((lp.argmax(-1) == M.teacher_predictions(ids)).sum())
            lse1 = _lse_at_1(rows)  # a grid cache's lse at T = 1: the KL's tail is then exact
            kl = M.kl_per_position(lp, ids, vals, lse, temperature) if lse1 is None else \
                M.kl_per_position(lp, ids, vals, lse1, temperature, lse_temperature=1.0)
            self.kl += float(kl.sum())
            self.compared += len(ids)

    def add_cached_teacher(self, rows: list[dict], temperature: float) -> None:
        """The teacher's own scores from its stored top-k (report.teacher_notes says what is exact)."""
        gold = self._count(rows)
        ids, vals, lse = (np.concatenate([r["teacher"][i] for r in rows]).astype(t)
                          for i, t in enumerate((np.int64, np.float64, np.float64)))
        lse1 = _lse_at_1(rows)
        if lse1 is not None and temperature != 1.0:  # a grid holding T = 1: read the cache as a T = 1 one
            vals, lse, temperature = vals * temperature, lse1.astype(np.float64), 1.0
        if self.classify:
            self._classified(rows, gold, M.teacher_predictions(ids), _cached_probs(ids, vals, lse, temperature, len(self.id2label)))
            return
        keep = gold != M.IGNORE_INDEX
        self.tokens += int(keep.sum())
        if temperature != 1.0:
            self.exact_nll = False  # lse is over z/T: the T = 1 probability of a token is not recoverable
            return
        logp = vals - lse[:, None]
        hit = ids == gold[:, None]
        inside = hit.any(-1)
        p_k, tail = np.exp(logp[:, -1]), M.teacher_tail_mass(vals, lse)  # a token outside the top-k has p <= both
        bound = np.where(tail > 0, np.minimum(tail, p_k), p_k)
        lp = np.where(inside, np.where(hit, logp, 0.0).sum(-1), np.log(bound))
        self.nll -= float(lp[keep].sum())
        self.outside += int((keep & ~inside).sum())
        self._per_row(rows, -lp, keep)

    def _count(self, rows: list[dict]) -> np.ndarray:
        gold = tasks.gold_labels(self.task, rows)
        self.rows += len(rows)
        self.positions += len(gold)
        return gold

    def _per_row(self, rows: list[dict], values: np.ndarray, keep: np.ndarray) -> None:
        """Sum `values` and count `keep` per row (positions are in row order)."""
        owner = np.repeat(np.arange(len(rows)), [len(r["positions"]) for r in rows])
        self.row_ids.append(np.asarray([r["row"] for r in rows], dtype=np.int64))
        self.row_num.append(np.bincount(owner, weights=np.where(keep, values, 0.0), minlength=len(rows)))
        self.row_den.append(np.bincount(owner, weights=keep.astype(np.float64), minlength=len(rows)))

    def per_row(self) -> dict | None:
        """Per-row sums for paired comparisons (pipeline.uncertainty): correct and labelled positions
        (classification: accuracy), or NLL and target tokens (language models: mean NLL per token).
        None where the metric is not exact: a cached teacher's NLL at T != 1 or with labels outside its top-k."""
        if not self.row_ids or not self.exact_nll or self.outside:
            return None
        return {"metric": "accuracy" if self.classify else "nll_per_token", "rows": np.concatenate(self.row_ids),
                "num": np.concatenate(self.row_num), "den": np.concatenate(self.row_den)}

    def _classified(self, rows, gold, preds, probs) -> None:
        self.preds.append(np.asarray(preds))
        labelled = gold != M.IGNORE_INDEX
        self._per_row(rows, (np.asarray(preds) == gold).astype(np.float64), labelled)
        self.gold.append(gold)
        if probs is None:
            self.calibrated = False
        else:
            self.probs.append(probs / probs.sum(-1, keepdims=True) if len(probs) else probs)
        if self.entities:
            start = 0
            for r in rows:
                g, p = gold[start:start + len(r["positions"])], preds[start:start + len(r["positions"])]
                start += len(r["positions"])
                self.true_tags.append([self.id2label[int(x)] for x in g[g != M.IGNORE_INDEX]])
                self.pred_tags.append([self.id2label[int(x)] for x in p[g != M.IGNORE_INDEX]])

    def result(self) -> dict:
        r: dict = {"rows": self.rows, "positions": self.positions}
        gold = np.concatenate(self.gold) if self.gold else np.zeros(0, np.int64)
        if self.classify and (gold != M.IGNORE_INDEX).any():
            preds = np.concatenate(self.preds)
            r["accuracy"] = M.accuracy(preds, gold)
            if self.entities:
                e = M.entity_prf(self.true_tags, self.pred_tags)
                r.update(entity_precision=e["precision"], entity_recall=e["recall"], entity_f1=e["f1"])
            else:
                r["macro_f1"] = M.macro_f1(preds, gold, num_classes=len(self.id2label) or None)
            if self.calibrated:
                r["ece"] = M.expected_calibration_error(np.concatenate(self.probs), gold)
        if not self.classify and self.tokens and self.exact_nll:
            r["perplexity"] = M.perplexity(self.nll, self.tokens)
            if self.from_cache:
                r["teacher_labels_outside_topk"] = self.outside / self.tokens
        if self.compared:
            r.update(agreement=self.agree / self.compared, kl=self.kl / self.compared)
        return r


def _lse_at_1(rows: list[dict]) -> np.ndarray | None:
    """The teacher's logsumexp at T = 1 of these rows when their cache's grid holds it (`cache_rows`)."""
    if not rows or len(rows[0]["teacher"]) < 4 or rows[0]["teacher"][3] is None:
        return None
    return np.concatenate([r["teacher"][3] for r in rows])


def _cached_probs(ids, vals, lse, temperature: float, n_classes: int) -> np.ndarray | None:
    """[P, C] teacher probabilities at T = 1 from the cache, or None where they are unknown.

    k = C: exact (softmax of z). k < C at T = 1: the tail mass is spread evenly over the classes
    not stored, which keeps the argmax and the confidence (all ECE uses) exact. k < C at T != 1:
    the T = 1 normaliser is unknown, so no calibration."""
    n, k = ids.shape
    if n == 0:
        return np.zeros((0, n_classes))
    full = np.zeros((n, n_classes))
    at = np.arange(n)[:, None]
    if k == n_classes:
        z = vals * temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        full[at, ids] = p / p.sum(-1, keepdims=True)
    elif temperature == 1.0:
        p = np.exp(vals - lse[:, None])
        full[:] = (np.clip(1.0 - p.sum(-1), 0.0, 1.0) / (n_classes - k))[:, None]
        full[at, ids] = p
    else:
        return None
    return full


# --- the rows of a cache ----------------------------------------------------------------------

def cache_rows(cache_dir: Path, m: dict, limit: int | None, chunk_rows: int = 512):
    """The rows of a (verified) cache in order, with the teacher's per-position arrays as numpy: what
    `Tally` scores ("teacher": ids, values, lse and, when the cache's temperature grid holds T = 1
    beyond its first entry, the lse at T = 1, else None). A shard that hashes right but does not
    decode is a one-line error."""
    try:
        yield from _read_cache_rows(cache_dir, m, limit, chunk_rows)
    except (OSError, ValueError) as exc:  # pyarrow's errors for a shard that hashes right but does not decode
        raise KDError(f"cache {cache_dir}: a shard cannot be read ({str(exc).splitlines()[0][:160]}); rebuild the cache") from None


def _read_cache_rows(cache_dir: Path, m: dict, limit: int | None, chunk_rows: int):
    grid = cache_grid(m["stats"])
    at_1 = choose_lse(grid, 1.0)
    for f in sorted(m["files"], key=lambda f: f["path"]):
        pf = pq.ParquetFile(manifest.path_of(cache_dir, f["path"]))
        coded = fmt.layout_metadata(pf)
        for rb in pf.iter_batches(batch_size=chunk_rows):
            cols = {c: rb.column(c).to_pylist() for c in ("row", "text", "input_ids", "labels", "positions")}
            pairs = rb.column("text_pair").to_pylist() if "text_pair" in rb.schema.names else [None] * rb.num_rows
            ids, vals, lse = fmt.read_topk(pa.Table.from_batches([rb]), coded)
            lse1 = _grid_column(rb, at_1.index, (len(lse), len(grid))) if at_1.column == "lse_grid" else None
            ends = np.cumsum(pc.list_value_length(rb.column("positions")).to_numpy(zero_copy_only=False))
            for i in range(rb.num_rows):
                if limit is not None and cols["row"][i] >= limit:
                    return
                a, b = (ends[i - 1] if i else 0), ends[i]
                yield {"row": cols["row"][i], "text": cols["text"][i], "text_pair": pairs[i],
                       "input_ids": cols["input_ids"][i], "labels": cols["labels"][i],
                       "positions": cols["positions"][i],
                       "teacher": (ids[a:b], vals[a:b], lse[a:b], lse1[a:b] if lse1 is not None else None)}


def _grid_column(rb, j: int, shape: tuple[int, int]) -> np.ndarray:
    """Column j of a record batch's lse_grid, [positions, grid temperatures]: one value per position."""
    flat = rb.column("lse_grid").flatten().flatten().to_numpy(zero_copy_only=False) if "lse_grid" in rb.schema.names else None
    if flat is None or flat.size != shape[0] * shape[1]:
        raise KDError("a shard's lse_grid does not hold one value per position and grid temperature of the manifest; rebuild the cache")
    return flat.reshape(shape)[:, j]
