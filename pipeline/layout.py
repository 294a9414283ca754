"""A denser top-k layout: rank order kept, ids renumbered by a per-shard hot list, values stored as
rank-order deltas of a bounded-error code of sqrt(p), plus one log-mass correction per position.

Why, in numbers (bench/bench_layout.py on SmolLM2-135M, vocab 49,152, 23,886 positions; RESULTS.md):
whole shards 27.6 / 74.1 / 258.4 B per position at k = 8 / 32 / 128 against 29.2 / 93.5 / 355.8 for
v1 (float16 z/T). v1's float16 z/T near 44 round the head by up to 1.5%, so the top-k mass
overshoots 1 and the exact tail is lost: mean KL 2e-2 to 3e-2 nats against the float32 values; here
~5e-6 at every k. Float16 log-probs would fix precision but cost more bytes (184 B at k = 128, PLAIN
for DuckDB). What pays:

* **Values: a code uniform in sqrt(p).** A token of probability p whose log-prob is off by d costs
  ~p d^2 / 2 of KL; a step D in sqrt(p) makes that D^2 / 6 per token whatever p is, the split of a
  KL budget that minimises bits (D = sqrt(6 kl_target / k)). Below p = (2D / CAP)^2 the step is
  CAP nats instead (such tokens carry almost no KL). In rank order the code never decreases, so the
  stored deltas are small: 49 B at k = 128 against 130 for float16 z/T.
* **Exact mass.** Quantisation errors of the head (~D sqrt(p) each) would land in the tail bucket,
  often 1e-4: mean KL 7e-4 to 3e-3 measured without the correction. One float16 per position,
  o = log(sum p) - log(sum q), is added back on decode, so the decoded top-k mass is the stored one
  (never above 1 by more than rounding) and the tail is exact again, down to tails of ~|o| 2^-12
  (o is ~1e-4 to 1e-3; below that, float32 z/T themselves cannot resolve the tail, see `decode`).
* **Ids: rank order, hot ids first.** Sorting ids and storing gaps (8.5 bits/id at k = 128) moves the
  permutation into the values (id-order codes cost ~8 bits each): 270 B against 267 in rank order.
  What does pay is renumbering: the shard's most frequent ids get the smallest numbers, so the high
  bytes of the BYTE_STREAM_SPLIT streams are nearly constant: 218 -> 199 B at k = 128, for ~5 B of
  footer per hot id (0.9 B/position in the 23,886-position bench shard; ~0 in full-size shards).

Reading the four columns costs what reading v1's three does (0.96-1.17x, one core); the numpy decode
(a cumsum and two gathers, ~3 ns per item) brings read + decode to 0.62-0.83x of v1's plain read. A
loader that must not slow down ships rids and codes as read and decodes on the device, as it already
casts float16 there. k = 128 stays above 250 B: rank-order ids cost 12 bits each at order-0 entropy.

Columns (zstd level 1, no dictionary, non-nullable). The k entries of all of a row's positions go
in one flat list per row (position j's are items j*k .. j*k+k-1): one list level less to rebuild
reads ~15% faster than list<list<>> (measured here and in notes/parquet-layout.md).

    topk_rids         list<int32>    per row, P_row * k: ids in rank order, renumbered   BYTE_STREAM_SPLIT
    topk_code_deltas  list<int32>    per row, P_row * k: c_0, c_1 - c_0, ... per position BYTE_STREAM_SPLIT
    topk_shift        list<float16>  per position: o above                               PLAIN
    lse               list<float32>  per position: logsumexp(z/T) over the vocabulary    BYTE_STREAM_SPLIT

(DuckDB reads BYTE_STREAM_SPLIT only on 4/8-byte physical types, so the float16 column stays PLAIN;
int32 rather than uint16 deltas: the same bytes, read without a narrowing pass.) With c = running
sum of a position's deltas and n = floor((1 - 2D / CAP) / D), a token's log-prob is

    log q = 2 ln(1 - c D) + o                     for c <= n,
    log q = 2 ln(1 - n D) - (c - n) CAP + o       for c > n,       and z/T = lse + log q.

Hot remap: the h <= hot_size ids most frequent in the shard's lists (count descending, ties by id)
become 0..h-1; the ids below h that are not hot take the numbers the hot ids >= h left (both lists
ascending); every other id keeps its number. Metadata, in the Parquet footer's key/values as
kd.<key> (`write_table`; not in the Arrow schema's, whose base64 copy would hold the hot list twice):
layout, layout_k, layout_step (D), layout_cap, layout_vocab_size, layout_hot_ids (decimal, comma
separated: DuckDB's parquet_kv_metadata + string_split read it).

Order: `decode` returns ids and values in rank order (ties in the code keep their input order), so a
reader wanting k' < k slices the first k' columns; the (k'+1)-bucket tail is then 1 - sum of those
q. The loss functions treat the k ids as a set and need no order at all. `duckdb_sql` is the same
decode in SQL, for readers without kd.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import pyarrow as pa

from pipeline.errors import KDError

NAME = "kd-topk-rank-sqrt/1"
KL_TARGET = 5e-6  # per position at the full k: half the 1e-5 goal, the rest is margin
CAP = 0.5  # nats: the largest step of the value code
HOT_SIZE = 4096
CODES = 1 << 16  # uint16
COLUMNS = {  # name -> (item type, k items per position?, Parquet encoding)
    "topk_rids": (pa.int32(), True, "BYTE_STREAM_SPLIT"),
    "topk_code_deltas": (pa.int32(), True, "BYTE_STREAM_SPLIT"),
    "topk_shift": (pa.float16(), False, "PLAIN"),
    "lse": (pa.float32(), False, "BYTE_STREAM_SPLIT"),
}
META_PREFIX = "kd."
WRITE_OPTIONS = {"compression": "zstd", "compression_level": 1, "use_dictionary": False}


def step_for(k: int, kl_target: float = KL_TARGET) -> float:
    """D for k ids: k D^2 / 6 = kl_target, rounded to 6 digits (the metadata holds it exactly)."""
    return float(f"{min(2.0 ** -5, max(2.0 ** -15, (6.0 * kl_target / k) ** 0.5)):.6g}")


@functools.lru_cache(maxsize=16)
def code_table(step: float, cap: float = CAP) -> tuple[np.ndarray, int]:
    """(-log q before the shift for every code, float64 [65536]; n, the last sqrt-domain code)."""
    n = int((1.0 - 2.0 * step / cap) / step)
    x = -2.0 * np.log1p(-step * np.arange(n + 1))
    x = np.concatenate([x, x[-1] + cap * np.arange(1, CODES - n)])
    x.setflags(write=False)
    return x, n


@functools.lru_cache(maxsize=16)
def _lut32(step: float, cap: float) -> np.ndarray:
    return (-code_table(step, cap)[0]).astype(np.float32)


def _codes(x: np.ndarray, step: float, cap: float) -> np.ndarray:
    """Nearest code of x = -log p >= 0: nearest in sqrt(p) up to n, nearest in x above."""
    table, n = code_table(step, cap)
    c = np.rint(-np.expm1(-0.5 * x) / step)
    tail = np.maximum(n + np.rint((x - table[n]) / cap), n)
    return np.minimum(np.where(c <= n, c, tail), CODES - 1).astype(np.int32)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - m).sum(1)) + m[:, 0]


def hot_remap(ids: np.ndarray, vocab_size: int, hot_size: int = HOT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(hot ids, most frequent first; forward table id -> stored number, int32 [vocab_size])."""
    counts = np.bincount(ids.ravel(), minlength=vocab_size)
    hot = np.argsort(-counts, kind="stable")[:hot_size]
    hot = hot[counts[hot] > 0]
    fwd = np.arange(vocab_size, dtype=np.int32)
    fwd[hot] = np.arange(len(hot), dtype=np.int32)
    fwd[np.setdiff1d(np.arange(len(hot)), hot)] = np.sort(hot[hot >= len(hot)])
    return hot, fwd


@functools.lru_cache(maxsize=16)
def _inverse(hot_text: str, vocab_size: int) -> np.ndarray:
    hot = np.array([int(t) for t in hot_text.split(",")] if hot_text else [], dtype=np.int64)
    h = len(hot)
    if h > vocab_size or (h and (hot.min() < 0 or hot.max() >= vocab_size or len(np.unique(hot)) != h)):
        raise KDError("layout_hot_ids is not a list of distinct ids below layout_vocab_size; the shard is damaged")
    inv = np.arange(vocab_size, dtype=np.int32)
    inv[np.sort(hot[hot >= h])] = np.setdiff1d(np.arange(h), hot)
    inv[:h] = hot
    inv.setflags(write=False)
    return inv


def encode(ids, values, lse, *, vocab_size: int | None = None, kl_target: float = KL_TARGET,
           hot_size: int = HOT_SIZE) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """ids [P, k] (any int), values [P, k] z/T (float32; any order, put in rank order here), lse [P]
    -> (flat numpy columns of COLUMNS, metadata). k == vocab_size means no tail: the mass is 1."""
    ids, values = np.asarray(ids), np.asarray(values, dtype=np.float32)
    lse = np.asarray(lse, dtype=np.float32).reshape(-1)
    if ids.ndim != 2 or ids.shape != values.shape or ids.shape[1] < 1 or lse.shape[0] != ids.shape[0]:
        raise KDError(f"encode needs ids and values [P, k >= 1] and lse [P]; got {ids.shape}, {values.shape}, {lse.shape}")
    p, k = ids.shape
    if np.isnan(values).any() or np.isposinf(values).any() or not np.isfinite(lse).all():
        raise KDError("top-k values must not be NaN or +inf, and lse must be finite")
    vocab = int(vocab_size) if vocab_size is not None else int(ids.max(initial=k - 1)) + 1
    if ids.size and (ids.min() < 0 or ids.max() >= vocab) or k > vocab:
        raise KDError(f"top-k ids must lie in [0, {vocab}) with k = {k} <= the vocabulary")
    step = step_for(k, kl_target)
    logp = values.astype(np.float64) - lse[:, None]
    codes = _codes(np.maximum(-logp, 0.0), step, CAP)
    if (np.diff(codes, axis=1) < 0).any():  # not in rank order: sort by value, keeping ties' order
        order = np.argsort(codes, axis=1, kind="stable")
        codes, ids = np.take_along_axis(codes, order, 1), np.take_along_axis(ids, order, 1)
    no_tail = vocab_size is not None and k == vocab  # an inferred vocabulary never says the tail is empty
    mass = np.zeros(p) if no_tail else np.minimum(_logsumexp(logp), 0.0)  # log of the top-k mass, <= 0
    shift = (mass - _logsumexp(-code_table(step, CAP)[0][codes])).astype(np.float16)
    hot, fwd = hot_remap(ids.astype(np.int64), vocab, hot_size)
    columns = {
        "topk_rids": np.take(fwd, ids).reshape(-1),
        "topk_code_deltas": np.diff(codes, axis=1, prepend=0).astype(np.int32).reshape(-1),
        "topk_shift": shift,
        "lse": lse,
    }
    meta = {"layout": NAME, "layout_k": str(k), "layout_step": repr(step), "layout_cap": repr(CAP),
            "layout_vocab_size": str(vocab), "layout_hot_ids": ",".join(map(str, hot.tolist()))}
    return columns, meta


def value_error(log_p: np.ndarray, k: int, kl_target: float = KL_TARGET) -> np.ndarray:
    """A bound on |decoded - exact| log-prob per value of a top-k code (k ids, default target): half a
    step in sqrt(p) is D / sqrt(p) in log p (CAP / 2 where the step is CAP), and the position's shift,
    a mass-weighted mean of such errors, can add as much again; plus 2 D for float32. For `kd verify
    --recompute`, which compares a fresh teacher run with the stored values."""
    d = step_for(k, kl_target)
    return np.minimum(CAP, 2 * d / np.sqrt(np.exp(np.minimum(log_p, 0.0)))) + 2 * d


def _empty(shape: tuple[int, int], dtype) -> np.ndarray:
    """A writable array in Arrow's memory pool, which keeps freed pages: glibc hands multi-MB blocks
    back to the OS, and page faults on fresh numpy outputs tripled the decode time (3 -> 9 ns/item)."""
    n = shape[0] * shape[1]
    if n == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(pa.allocate_buffer(n * np.dtype(dtype).itemsize), dtype=dtype, count=n).reshape(shape)


def decode(columns: Mapping[str, np.ndarray], meta: Mapping[str, str],
           log_probs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat columns + metadata -> (ids [P, k] int32, z/T [P, k] float32, lse [P] float32), rank order.

    log_probs=True returns log q = z/T - lse instead of z/T: float32 z/T near |54| rounds by 4e-6,
    which alone moves the top-k mass by more than a 1e-6 tail (the v1 contract has the same floor);
    log q near 0 keeps the mass to ~1e-7."""
    if meta.get("layout") != NAME:
        raise KDError(f"layout {meta.get('layout')!r}, this kd reads {NAME}")
    k, step, cap = int(meta["layout_k"]), float(meta["layout_step"]), float(meta["layout_cap"])
    vocab = int(meta["layout_vocab_size"])
    lse = np.asarray(columns["lse"], dtype=np.float32)
    p = len(lse)
    rids = np.asarray(columns["topk_rids"], dtype=np.int32)
    deltas = np.asarray(columns["topk_code_deltas"], dtype=np.int32)
    if rids.size != p * k or deltas.size != p * k or len(columns["topk_shift"]) != p:
        raise KDError(f"{p} positions need {p * k} ids and codes and {p} shifts; the shard is damaged")
    ids, values = _empty((p, k), np.int32), _empty((p, k), np.float32)
    codes, deltas = ids, deltas.reshape(p, k)  # ids' buffer holds the codes first
    if k <= 16:  # numpy's row-wise cumsum pays per row: a column loop is 4x faster at k = 8
        codes[:, 0] = deltas[:, 0]
        for j in range(1, k):
            np.add(codes[:, j - 1], deltas[:, j], out=codes[:, j])
    else:
        np.cumsum(deltas, axis=1, dtype=np.int32, out=codes)
    # negative int32 read as uint32 are huge: one max per column checks both ends
    if p and (deltas.view(np.uint32).max() >= CODES or codes[:, -1].max() >= CODES or rids.view(np.uint32).max() >= vocab):
        raise KDError("a top-k code or id is out of range; the shard is damaged")
    np.take(_lut32(step, cap), codes, out=values, mode="clip")  # in range (checked): "clip" skips numpy's copy
    np.take(_inverse(meta["layout_hot_ids"], vocab), rids.reshape(p, k), out=ids, mode="clip")
    shift = np.asarray(columns["topk_shift"], dtype=np.float32)
    values += (shift if log_probs else lse + shift)[:, None]
    return ids, values, lse


def column_encodings() -> dict[str, str]:
    """pq.write_table's column_encoding for these columns (Parquet applies encodings to leaf paths only)."""
    return {f"{name}.list.element": enc for name, (_, _, enc) in COLUMNS.items()}


def to_arrow(columns: Mapping[str, np.ndarray], row_counts, k: int) -> dict[str, pa.Array]:
    """Each column as one list per row (row_counts positions each; k items per position where it has k)."""
    offsets = np.concatenate([[0], np.cumsum(row_counts, dtype=np.int64)])
    out = {}
    for name, (t, per_k, _) in COLUMNS.items():
        off = pa.array((offsets * (k if per_k else 1)).astype(np.int32))
        out[name] = pa.ListArray.from_arrays(off, pa.array(np.asarray(columns[name]), type=t),
                                             type=pa.list_(pa.field("item", t, nullable=False)))
    return out


def from_arrow(table: pa.Table) -> dict[str, np.ndarray]:
    """The flat numpy columns of a table read back (a row group or a whole shard), zero-copy where it can."""
    return {name: table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False) for name in COLUMNS}


def write_table(where, table: pa.Table, meta: Mapping[str, str], **options) -> None:
    """pq.write_table with this layout's options and `meta` in the footer only; `options` add to or
    override WRITE_OPTIONS (e.g. row_group_size, or column_encoding entries for other columns)."""
    import pyarrow.parquet as pq

    enc = {**column_encodings(), **options.pop("column_encoding", {})}
    opts = {**WRITE_OPTIONS, **options}
    row_group_size = opts.pop("row_group_size", None)
    with pq.ParquetWriter(where, table.schema, column_encoding=enc, **opts) as writer:
        writer.write_table(table, row_group_size=row_group_size)
        writer.add_key_value_metadata({META_PREFIX + a: str(b) for a, b in meta.items()})


def read_metadata(parquet_file) -> dict[str, str]:
    """The kd.* key/values of a pq.ParquetFile's footer, prefix removed (pq.read_schema would show the
    stored Arrow schema's metadata instead, which `write_table` leaves without the layout keys)."""
    md = parquet_file.metadata.metadata or {}
    n = len(META_PREFIX)
    return {a.decode()[n:]: b.decode() for a, b in md.items() if a.startswith(META_PREFIX.encode())}


_DUCKDB_SQL = """
WITH kv AS (SELECT decode(key) AS k, decode(value) AS v FROM parquet_kv_metadata('{p}')),
par AS (SELECT (SELECT v FROM kv WHERE k = 'kd.layout_step')::DOUBLE AS d, (SELECT v FROM kv WHERE k = 'kd.layout_cap')::DOUBLE AS cap,
               (SELECT v FROM kv WHERE k = 'kd.layout_k')::INTEGER AS kk,
               list_transform(list_filter(string_split((SELECT v FROM kv WHERE k = 'kd.layout_hot_ids'), ','),
                                          lambda s: s <> ''), lambda s: s::INTEGER) AS hot),
lay AS (SELECT d, cap, kk, hot, len(hot) AS h, floor((1 - 2 * d / cap) / d)::INTEGER AS n,
               list_sort(list_filter(hot, lambda x: x >= len(hot))) AS vacated,
               list_filter(range(len(hot)), lambda x: NOT list_contains(hot, x)) AS displaced FROM par),
tok AS (SELECT row, topk_shift, unnest(topk_rids) AS rid, unnest(topk_code_deltas) AS delta,
               generate_subscripts(topk_rids, 1) - 1 AS t FROM read_parquet('{p}')),
cod AS (SELECT row, t // kk AS j, t % kk AS r, rid, topk_shift[t // kk + 1] AS shift,
               sum(delta) OVER (PARTITION BY row, t // kk ORDER BY t) AS c FROM tok, lay)
SELECT row, j, r,
       CASE WHEN rid < h THEN hot[rid + 1] WHEN list_contains(vacated, rid) THEN displaced[list_position(vacated, rid)]
            ELSE rid END AS id,
       CASE WHEN c <= n THEN 2 * ln(1 - c * d) ELSE 2 * ln(1 - n * d) - (c - n) * cap END + shift AS logq
FROM cod, lay ORDER BY row, j, r
"""


def duckdb_sql(path: str) -> str:
    """The decode in plain SQL, for readers without kd: one row per (row, position j, rank r) with the
    id and log q (z/T - lse). Needs only DuckDB (>= 1.1: parquet_kv_metadata, lambda syntax)."""
    return _DUCKDB_SQL.format(p=str(path).replace("'", "''"))
