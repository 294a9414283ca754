"""Streaming a targets cache into training batches without ever holding the cache in memory.

The unit of reading is a Parquet row group (~64K positions, see format.py): a random row
group reads as fast as a sequential scan, so shuffling the *order of row groups* is free.
Each epoch's order is a pure function of (seed, epoch):

1. the row groups are permuted with a generator seeded by (seed, epoch) and dealt round-robin
   to the consumers -- every (rank, DataLoader worker) pair -- so the consumers read
   disjoint parts and together cover every row exactly once. When there are fewer row groups
   than consumers (tiny caches), each row group is split into strided row subsets first;
2. each consumer loads its row groups one at a time into a bounded shuffle buffer (the
   leftover of the previous row groups plus the new one), shuffles it, and emits full
   batches until only `buffer_rows` rows remain; the rest come out at the end of the epoch.

So memory is bounded by one row group plus the buffer, whatever the size of the cache, and
the number of batches each consumer yields is ceil(rows / batch_size), known from Parquet
metadata alone. That is what lets every DDP rank know how many micro-batches the slowest
rank has (ranks pad with no-op micro-batches) and lets a resumed run skip exactly the
batches it had consumed: torch's DataLoader returns the batches of its workers round-robin
(worker 0 first each epoch, exhausted workers dropped), so which worker produced the k-th
batch of an epoch is computable. Each worker replaces its share of the first k batches by a
tiny placeholder (read, not collated), which keeps the round-robin in its original order;
`unskipped` drops the placeholders.

Arrow data stays in its stored dtypes (int32 ids, float16 logits): casting on the CPU costs
12-80% of the loader's throughput (notes/parquet-layout.md); the trainer casts on the device.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import format as fmt
from pipeline import tasks
from pipeline.errors import KDError

TARGET_COLUMNS = ("topk_ids", "topk_logits", "lse")  # what a batch holds; a sampled cache adds "sample_counts"


@dataclasses.dataclass(frozen=True)
class Unit:
    """Rows `offset, offset + stride, ...` of row group `group` of source file `file`."""

    file: int
    group: int
    num_rows: int
    offset: int = 0
    stride: int = 1

    @property
    def rows(self) -> int:
        return len(range(self.offset, self.num_rows, self.stride))


class ParquetSource:
    """The row groups of a cache's shards, in frozen order; files are opened lazily per process.
    Several caches streamed as one set are one source: `cache_key` is then one key per path."""

    def __init__(self, paths: Sequence[str | Path], task_type: str, value_dtype: str, text_pair: bool,
                 cache_key: str | Sequence[str] | None = None, lse_grid: bool = False, target_mode: str = "topk"):
        self.paths = [str(p) for p in paths]
        self.target_mode = target_mode
        self.lse_grid = lse_grid  # the collate reads a grid cache's lse_grid column: every shard must have it
        self.task_type, self.value_dtype, self.text_pair = task_type, value_dtype, text_pair
        self.keys = [cache_key] * len(self.paths) if cache_key is None or isinstance(cache_key, str) else list(cache_key)
        self.groups: list[tuple[int, int, int]] = []  # (file, group, rows)
        self.layouts: list[dict | None] = []  # a version 2 shard's code parameters (pipeline.layout)
        for i, p in enumerate(self.paths):
            pf = fmt.check_shard(p, task_type, value_dtype, text_pair, self.keys[i], lse_grid, target_mode)
            self.layouts.append(fmt.layout_metadata(pf))
            md = pf.metadata
            self.groups += [(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        self._open: dict[int, pq.ParquetFile] = {}

    @property
    def num_rows(self) -> int:
        return sum(g[2] for g in self.groups)

    def read(self, unit: Unit, columns: Sequence[str]) -> pa.Table:
        pf = self._open.get(unit.file)
        if pf is None:
            pf = self._open[unit.file] = fmt.check_shard(self.paths[unit.file], self.task_type, self.value_dtype,
                                                         self.text_pair, self.keys[unit.file], self.lse_grid,
                                                         self.target_mode)
        return fmt.attach_layout(_subset(pf.read_row_group(unit.group, columns=list(columns)), unit), self.layouts[unit.file])

    def __getstate__(self):  # open file handles do not cross process boundaries
        return {**self.__dict__, "_open": {}}


class TableSource:
    """An in-memory table cut into fixed-size chunks: the no-targets (fine-tuning) case, where
    the data is a tokenised dataset rather than a cache."""

    def __init__(self, table: pa.Table, chunk_rows: int = 4096):
        self.table = table
        n = table.num_rows
        self.groups = [(0, g, min(chunk_rows, n - s)) for g, s in enumerate(range(0, n, chunk_rows))]
        self.chunk_rows = chunk_rows

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def read(self, unit: Unit, columns: Sequence[str]) -> pa.Table:
        t = self.table.slice(unit.group * self.chunk_rows, unit.num_rows).select(list(columns))
        return _subset(t, unit)


def _subset(table: pa.Table, unit: Unit) -> pa.Table:
    if unit.stride == 1:
        return table
    return table.take(pa.array(np.arange(unit.offset, unit.num_rows, unit.stride)))


def units(groups: Sequence[tuple[int, int, int]], consumers: int) -> list[Unit]:
    """Whole row groups, or strided subsets of them when there are fewer groups than consumers
    (otherwise some rank would get nothing to read)."""
    stride = max(1, math.ceil(consumers / max(1, len(groups))))
    return [Unit(f, g, n, o, stride) for f, g, n in groups for o in range(stride)]


def assign(all_units: Sequence[Unit], consumers: int, seed: int, epoch: int, shuffle: bool) -> list[list[Unit]]:
    """Units of each consumer for one epoch: a seeded permutation dealt round-robin."""
    order = np.arange(len(all_units))
    if shuffle:
        order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,))).permutation(len(all_units))
    return [[all_units[i] for i in order[c::consumers]] for c in range(consumers)]


def merged_order(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(worker, batch) in the order torch's DataLoader returns an IterableDataset's batches:
    pass j takes batch j of every worker that still has one, workers in id order."""
    return [(w, j) for j in range(max(counts, default=0)) for w, n in enumerate(counts) if j < n]


class Block:
    """Rows decoded into flat numpy arrays: per-row arrays plus ragged groups (lengths + values).

    Gathering rows of nested Arrow lists (`Table.take`) costs about as much as decoding them,
    and ten times that on a chunked table; a ragged numpy gather is a few fancy-indexing
    copies. Group "tok" holds what is aligned with input_ids (ids, token labels), group "pos"
    what is aligned with the target positions (positions, top-k ids/values, lse)."""

    def __init__(self, rows: dict[str, np.ndarray], groups: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]):
        self.rows, self.groups = rows, groups

    def __len__(self) -> int:
        return len(self.rows["row"])

    def take(self, idx: np.ndarray) -> "Block":
        groups = {}
        for name, (lengths, values) in self.groups.items():
            starts = np.cumsum(lengths) - lengths
            sel = lengths[idx]
            if len(idx) and sel.sum() >= 16 * len(idx):  # long segments: copy slices (memcpy speed)
                spans = [slice(a, a + n) for a, n in zip(starts[idx].tolist(), sel.tolist())]
                groups[name] = (sel, {k: np.concatenate([v[sp] for sp in spans]) for k, v in values.items()})
            else:  # short segments (e.g. one position per row): one fancy-index gather
                flat = np.repeat(starts[idx] - (np.cumsum(sel) - sel), sel) + np.arange(int(sel.sum()))
                groups[name] = (sel, {k: v[flat] for k, v in values.items()})
        return Block({k: v[idx] for k, v in self.rows.items()}, groups)

    @staticmethod
    def concat(a: "Block", b: "Block") -> "Block":
        if len(a) == 0:
            return b
        rows = {k: np.concatenate([a.rows[k], b.rows[k]]) for k in a.rows}
        groups = {n: (np.concatenate([a.groups[n][0], b.groups[n][0]]),
                      {k: np.concatenate([a.groups[n][1][k], b.groups[n][1][k]]) for k in a.groups[n][1]})
                  for n in a.groups}
        return Block(rows, groups)


class Collate:
    """Arrow rows -> Block (`decode`) -> a dict of tensors in the stored dtypes (`__call__`),
    both run inside the loader workers.

    Hard labels per target position: sequence-classification `labels`; token-classification
    and masked-lm `labels[positions]`; causal-lm `input_ids[positions + 1]`; -100 = none.
    With `tokenizer` set (sequence-classification, a student with its own vocabulary), the
    stored text is re-tokenised and the one target position is the sequence output.
    With `lse_index` j > 0 (training at the j-th temperature of a grid cache, see
    pipeline.losses.choose_lse), batch["lse"] is that column of `lse_grid` instead of `lse`.
    With `samples` M (a sampled cache), each position's distinct drawn ids and their z/T come as
    [N, M] topk_ids / topk_logits, padded with count 0 where fewer than M ids were drawn, and
    batch["sample_counts"] [N, M] says how often each was drawn (pipeline.losses: weights c / M).
    Fixed-width rows keep blocks, shuffling and batches as they are for top-k caches.
    """

    def __init__(self, task_type: str, pad_id: int, targets: bool, tokenizer=None, max_length: int = 512,
                 lse_index: int = 0, samples: int | None = None, value_dtype: str = "float16"):
        self.task_type, self.pad_id, self.targets = task_type, int(pad_id), targets
        self.lse_index, self.samples, self.value_dtype = lse_index, samples, value_dtype
        self.hard_labels = tasks.get(task_type).hard_labels
        self.tokenizer, self.max_length = tokenizer, max_length

    def columns(self, text_pair: bool) -> list[str]:
        cols = ["row", "labels", "positions"]
        cols += (["text", "text_pair"] if text_pair else ["text"]) if self.tokenizer is not None else ["input_ids"]
        lse = ["lse", "lse_grid"] if self.lse_index else ["lse"]  # read_topk takes lse; the grid's column replaces it
        targets = list(fmt.columns_of(self.value_dtype, "sampled" if self.samples else "topk"))
        return cols + (targets + lse if self.targets else [])

    def decode(self, t: pa.Table) -> Block:
        rows = {"row": t.column("row").to_numpy()}
        pos_len, positions = fmt.ragged(t.column("positions"))
        pos = {"positions": positions}
        if self.targets and self.samples:
            pos.update(self._sampled(t, rows["row"]))
            pos["lse"] = fmt.ragged(t.column("lse"))[1]
            if not len(pos["lse"]) == len(positions) == len(pos["topk_ids"]):
                raise KDError(f"rows {rows['row'][:3].tolist()}…: {len(pos['lse'])} targets for {len(positions)} positions; the cache is "
                              f"damaged, rebuild it")
        elif self.targets:
            pos["topk_ids"], pos["topk_logits"], lse = fmt.read_topk(t)
            pos["lse"] = self._grid_lse(t) if self.lse_index else lse
            if not len(pos["lse"]) == len(positions) == len(pos["topk_ids"]):
                raise KDError(f"rows {rows['row'][:3].tolist()}…: {len(pos['lse'])} targets for {len(positions)} positions; the cache is "
                              f"damaged, rebuild it")
        groups = {"pos": (pos_len, pos)}
        labels = t.column("labels").combine_chunks()
        if self.hard_labels == "row":
            rows["labels"] = labels.fill_null(-100).to_numpy().astype(np.int64)
        if self.tokenizer is not None:
            rows["text"] = np.array(t.column("text").to_pylist() + [None], dtype=object)[:-1]
            if "text_pair" in t.column_names:
                rows["text_pair"] = np.array(t.column("text_pair").to_pylist() + [None], dtype=object)[:-1]
        else:
            tok_len, ids = fmt.ragged(t.column("input_ids"))
            tok = {"input_ids": ids}
            if self.hard_labels == "aligned":
                tok["labels"] = self._token_labels(labels, tok_len)
            groups["tok"] = (tok_len, tok)
        return Block(rows, groups)

    def _sampled(self, t: pa.Table, rows: np.ndarray) -> dict[str, np.ndarray]:
        """A sampled cache's ragged per-position lists, padded to [positions, M] (see the class doc)."""
        m = self.samples
        width, ids, counts, values, _ = fmt.read_samples(t)
        if (width < 1).any() or (width > m).any() or not len(ids) == len(counts) == len(values):
            raise KDError(f"rows {rows[:3].tolist()}…: sample lists do not hold 1..{m} ids per position; the cache is damaged, "
                          f"rebuild it")
        at = np.repeat(np.arange(len(width)), width), np.arange(len(ids)) - np.repeat(np.cumsum(width) - width, width)
        out = {"topk_ids": np.zeros((len(width), m), np.int32), "topk_logits": np.zeros((len(width), m), values.dtype),
               "sample_counts": np.zeros((len(width), m), np.uint16)}
        out["topk_ids"][at], out["topk_logits"][at], out["sample_counts"][at] = ids, values, counts
        return out

    def _grid_lse(self, t: pa.Table) -> np.ndarray:
        """Column `lse_index` of lse_grid, one value per position (the grid's lse at the training T)."""
        g_len, flat = fmt.ragged(t.column("lse_grid"), 2)
        g = int(g_len[0]) if len(g_len) else self.lse_index + 1
        if (g_len != g).any() or g <= self.lse_index:
            raise KDError(f"lse_grid holds {g} temperatures, fewer than the manifest's grid (or a varying number); the cache "
                          f"is damaged, rebuild it")
        return flat.reshape(-1, g)[:, self.lse_index]

    @staticmethod
    def _token_labels(labels: pa.Array, tok_len: np.ndarray) -> np.ndarray:
        """Labels aligned with input_ids; rows without labels (null) get -100 everywhere."""
        lab_len, values = fmt.ragged(labels)
        if (lab_len == tok_len).all():
            return values.astype(np.int32, copy=False)
        out = np.full(int(tok_len.sum()), -100, dtype=np.int32)
        valid = lab_len == tok_len
        starts = np.cumsum(tok_len) - tok_len
        v_starts = np.cumsum(lab_len) - lab_len
        sel = tok_len[valid]
        dst = np.repeat(starts[valid] - (np.cumsum(sel) - sel), sel) + np.arange(int(sel.sum()))
        src = np.repeat(v_starts[valid] - (np.cumsum(sel) - sel), sel) + np.arange(int(sel.sum()))
        out[dst] = values[src]
        return out

    def __call__(self, block: Block | pa.Table) -> dict[str, Any]:
        if isinstance(block, pa.Table):  # a copy: decoded Arrow buffers are read-only
            block = self.decode(block)
            block = block.take(np.arange(len(block)))
        b = len(block)
        pos_len, pos = block.groups["pos"]
        p_idx = pos["positions"]
        b_idx = np.repeat(np.arange(b, dtype=np.int64), pos_len)
        if self.tokenizer is not None:
            pair = block.rows.get("text_pair")
            enc = self.tokenizer(list(block.rows["text"]), list(pair) if pair is not None else None, truncation=True,
                                 max_length=self.max_length, padding=True, return_tensors="np")
            ids = enc["input_ids"].astype(np.int32, copy=False)
            mask = enc["attention_mask"].astype(np.int8, copy=False)
            lengths = mask.sum(1)
        else:
            lengths, tok = block.groups["tok"]
            mask = np.arange(max(1, int(lengths.max(initial=1))))[None, :] < lengths[:, None]
            ids = np.full(mask.shape, self.pad_id, dtype=np.int32)
            ids[mask] = tok["input_ids"]
            mask = mask.astype(np.int8)
        hard = np.full(len(p_idx), -100, dtype=np.int64)
        if self.hard_labels == "row":
            hard = block.rows["labels"][b_idx]
        elif self.hard_labels == "next-token":
            nxt = p_idx.astype(np.int64) + 1
            ok = nxt < lengths[b_idx]
            hard[ok] = ids[b_idx[ok], nxt[ok]]
        else:
            starts = np.cumsum(lengths) - lengths
            hard = block.groups["tok"][1]["labels"][starts[b_idx] + p_idx].astype(np.int64)
        out = {
            "rows": torch.from_numpy(block.rows["row"].astype(np.int64, copy=False)),
            "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "b_idx": torch.from_numpy(b_idx), "p_idx": torch.from_numpy(p_idx.astype(np.int32, copy=False)),
            "hard": torch.from_numpy(hard), "tokens": int(lengths.sum()),
        }
        if self.targets:
            keys = TARGET_COLUMNS + (("sample_counts",) if self.samples else ())
            out.update({k: torch.from_numpy(np.ascontiguousarray(pos[k]).astype(np.int32) if k == "sample_counts"
                                            else np.ascontiguousarray(pos[k])) for k in keys})
        return out


class StreamingDataset(IterableDataset):
    """One rank's stream of collated micro-batches for one epoch at a time (see module doc).

    `set_epoch(epoch, skip)` must be called before each `iter(loader)`; it writes to shared
    memory, so persistent DataLoader workers see it too.
    """

    def __init__(self, source, collate: Collate, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 buffer_rows: int | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 text_pair: bool = False):
        if batch_size < 1:
            raise KDError(f"--batch-size must be at least 1, got {batch_size}")
        self.source, self.collate, self.batch_size = source, collate, batch_size
        if buffer_rows is None:  # about one row group: mixes neighbouring row groups, costs one more in memory
            buffer_rows = round(source.num_rows / max(1, len(source.groups)))
        self.seed, self.shuffle, self.buffer_rows = seed, shuffle, max(0, buffer_rows)
        self.rank, self.world_size, self.num_workers = rank, world_size, max(0, num_workers)
        self.columns = collate.columns(text_pair)
        self.consumers = world_size * max(1, self.num_workers)
        self.units = units(source.groups, self.consumers)
        self._state = multiprocessing.get_context().RawArray("q", 2)  # epoch, batches to skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self._state[0], self._state[1] = epoch, skip

    def consumer_batches(self, epoch: int) -> list[int]:
        """Batches of every consumer (rank-major) in `epoch`, from metadata alone."""
        per = assign(self.units, self.consumers, self.seed, epoch, self.shuffle)
        return [math.ceil(sum(u.rows for u in us) / self.batch_size) for us in per]

    def expected_tags(self, epoch: int, cursor: int) -> list[tuple[int, int]]:
        """(consumer, batch) of every batch this rank gets from `cursor` on, in the order the
        DataLoader returns them: the trainer checks each batch against it."""
        w = max(1, self.num_workers)
        counts = self.consumer_batches(epoch)[self.rank * w:(self.rank + 1) * w]
        return [(self.rank * w + wk, j) for wk, j in merged_order(counts)[cursor:]]

    def rank_batches(self, epoch: int) -> list[int]:
        """Micro-batches each rank yields in `epoch` (the trainer pads every rank to the max)."""
        w = max(1, self.num_workers)
        c = self.consumer_batches(epoch)
        return [sum(c[r * w:(r + 1) * w]) for r in range(self.world_size)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, skip = int(self._state[0]), int(self._state[1])
        w = max(1, self.num_workers)
        consumer = self.rank * w + worker
        my_units = assign(self.units, self.consumers, self.seed, epoch, self.shuffle)[consumer]
        if skip:
            counts = self.consumer_batches(epoch)[self.rank * w:(self.rank + 1) * w]
            skip = sum(1 for wk, _ in merged_order(counts)[:skip] if wk == worker)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch, consumer + 1)))
        for i, block in enumerate(self._batches(my_units, rng)):
            if i < skip:  # consumed before the resume: keep its place in the order, skip the work
                yield {"skipped": True, "tag": (consumer, i)}
                continue
            batch = self.collate(block)
            batch["tag"] = (consumer, i)
            yield batch

    def _batches(self, my_units: list[Unit], rng: np.random.Generator) -> Iterator[Block]:
        """Blocks of `batch_size` rows (the last one shorter), through the bounded buffer: the
        leftover of earlier row groups plus the new one, in a random order."""
        bs = self.batch_size
        keep = self.buffer_rows if self.shuffle else 0
        pool: Block | None = None
        for unit in my_units:
            block = self.collate.decode(self.source.read(unit, self.columns))
            pool = block if pool is None else Block.concat(pool, block)
            order = rng.permutation(len(pool)) if self.shuffle else np.arange(len(pool))
            n_out = max(0, (len(pool) - keep) // bs) * bs
            for s in range(0, n_out, bs):
                yield pool.take(order[s:s + bs])
            pool = pool.take(order[n_out:])  # a copy: the row group it came from can go
        if pool is not None:
            order = rng.permutation(len(pool)) if self.shuffle else np.arange(len(pool))
            for s in range(0, len(pool), bs):
                yield pool.take(order[s:s + bs])


def unskipped(stream: Iterator[dict]) -> Iterator[dict]:
    """The batches of a loader after `set_epoch(epoch, skip)`, without the placeholders that
    keep the DataLoader's worker round-robin in its original order."""
    return (b for b in stream if not b.get("skipped"))


def verify_shards(directory: Path, files: list[dict], part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems with this rank's share of the shards (size, sha256), so a damaged cache is
    refused before training instead of being trained on."""
    from pipeline.manifest import verify_files

    rank, world = part
    return verify_files(directory, {"files": files[rank::world]})
