"""The shard format (versions 1 and 2): one Parquet row per example, per-position lists.

Version 2 (`--value-dtype code`, what `auto` picks for a language model's top-k) stores the top-k in the denser layout
of pipeline.layout (topk_rids / topk_code_deltas / topk_shift: a bounded-error code, about 5e-6 nats
of KL per position, ~0.7x the bytes of float16 z/T); version 1 (`--value-dtype float16|float32`)
stores topk_ids / topk_logits as plain lists. Both are read, by one door: `read_topk`.

Why these encodings (measured in shared/notes/parquet-layout.md on these machines): zstd level
1, BYTE_STREAM_SPLIT for ids and float payloads, no dictionary on payloads, non-nullable
fields and ~64K positions per row group halve the bytes of pyarrow's defaults and decode a
quarter faster. Values stay in rank order so a reader can truncate to a smaller k for free.
The schema is checked on every read: a cache written by another version or tool is refused
with a message instead of being silently misread.

One optional column, `lse_grid` (list<list<float32>>: per position, logsumexp(z/T) at every
temperature of a `kd teacher --temperatures` grid, in grid order, so lse_grid[p][0] == lse[p]),
is present only in grid caches. It is an addition, not a new version (in either version), and a
reader that does not know it ignores the extra column (every column it needs is unchanged).

A sampled cache (`kd teacher --target-mode sampled`, the math in pipeline.softtargets) stores, in
place of topk_ids / topk_logits, the distinct ids drawn at each position in ascending id order
(`sample_ids`, list<list<int32>>, between 1 and M per position), how often each was drawn
(`sample_counts`, list<list<uint16>>, summing to M) and their z/T (`sample_logits`); `lse` is as
in every cache. A reader that expects top-k columns refuses it (the columns are missing), so no
older kd misreads one. The float16 `sample_logits` are written PLAIN, not BYTE_STREAM_SPLIT:
DuckDB reads that split for 4- and 8-byte types only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io, layout, tasks
from pipeline.errors import KDError

FORMAT_VERSION = 1  # plain z/T lists (float16 / float32), and every sampled cache
CODE_VERSION = 2    # top-k in pipeline.layout's code
TARGET_COLUMNS = {"topk": ("topk_ids", "topk_logits"), "sampled": ("sample_ids", "sample_counts", "sample_logits"),
                  "code": tuple(c for c in layout.COLUMNS if c != "lse")}
MAX_SAMPLES = 65535  # counts are uint16
VALUE_DTYPES = {"float16": pa.float16(), "float32": pa.float32(), "code": pa.float16()}  # code: sample_logits stay float16
POSITIONS_PER_ROW_GROUP = 65536
META_PREFIX = "kd."


def target_mode(stats: dict) -> str:
    """A cache's target mode from its manifest stats; caches written before sampled targets are top-k."""
    mode = stats.get("target_mode", "topk")
    if mode not in ("topk", "sampled"):
        raise KDError(f"the cache's target mode {str(mode)[:40]!r} is unknown to this kd (topk, sampled); upgrade kd "
                      f"or rebuild the cache")
    return mode


def version_of(value_dtype: str, target_mode: str = "topk") -> int:
    """The format version a cache of this value dtype and mode is written in (and keyed by)."""
    return CODE_VERSION if value_dtype == "code" and target_mode == "topk" else FORMAT_VERSION


def columns_of(value_dtype: str, target_mode: str = "topk") -> tuple[str, ...]:
    """The target columns of a shard (lse aside) for its value dtype and mode."""
    return TARGET_COLUMNS["code" if version_of(value_dtype, target_mode) == CODE_VERSION else target_mode]


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", t, nullable=False))


def schema(task_type: str, value_dtype: str = "float16", text_pair: bool = False, lse_grid: bool = False,
           target_mode: str = "topk") -> pa.Schema:
    """The Arrow schema of a shard for a task type; text fields are kept so that a student
    with its own tokenizer can re-tokenise classification inputs. `lse_grid`: a grid cache's
    extra column; `target_mode` "sampled": sample columns instead of top-k (see the module doc)."""
    task = tasks.get(task_type)
    if value_dtype not in VALUE_DTYPES:
        raise KDError(f"unknown value dtype {value_dtype!r}: use code, float16 or float32")
    fields = [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", task.text_type(), nullable=False),
    ]
    if text_pair:
        fields.append(pa.field("text_pair", pa.string(), nullable=False))
    fields += [
        pa.field("input_ids", _list(pa.int32()), nullable=False),
        pa.field("labels", task.label_type(), nullable=True),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("positions", _list(pa.int32()), nullable=False),
    ]
    if target_mode == "sampled":
        fields += [
            pa.field("sample_ids", _list(_list(pa.int32())), nullable=False),
            pa.field("sample_counts", _list(_list(pa.uint16())), nullable=False),
            pa.field("sample_logits", _list(_list(VALUE_DTYPES[value_dtype])), nullable=False),
        ]
    elif target_mode == "topk" and value_dtype == "code":
        fields += [pa.field(name, _list(t), nullable=False) for name, (t, _, _) in layout.COLUMNS.items() if name != "lse"]
    elif target_mode == "topk":
        fields += [
            pa.field("topk_ids", _list(_list(pa.int32())), nullable=False),
            pa.field("topk_logits", _list(_list(VALUE_DTYPES[value_dtype])), nullable=False),
        ]
    else:
        raise KDError(f"unknown target mode {target_mode!r}: use topk or sampled")
    fields.append(pa.field("lse", _list(pa.float32()), nullable=False))
    if lse_grid:
        fields.append(pa.field("lse_grid", _list(_list(pa.float32())), nullable=False))
    return pa.schema(fields)


PAYLOAD_COLUMNS = ("input_ids", "positions", "topk_ids", "topk_logits", "lse", "lse_grid", "sample_ids", "sample_counts",
                   "sample_logits", "topk_rids", "topk_code_deltas", "topk_shift")


def _encodings(schema: pa.Schema) -> dict[str, str]:
    """Per payload leaf: BYTE_STREAM_SPLIT, except PLAIN for 2-byte floats outside version 1's top-k
    columns (DuckDB reads the split for 4- and 8-byte types only; v1's topk_logits keep their layout)."""
    out = {}
    for c in PAYLOAD_COLUMNS:
        if c in schema.names:
            t = schema.field(c).type
            while pa.types.is_list(t):
                t = t.value_type
            plain = t == pa.float16() and c != "topk_logits"
            out[_leaf_path(schema, c)] = "PLAIN" if plain else "BYTE_STREAM_SPLIT"
    return out


def _leaf_path(schema: pa.Schema, name: str) -> str:
    """Parquet's path to the values of a (nested) column: pyarrow applies per-column encodings
    to leaf paths only, and silently ignores a top-level name of a list column."""
    path, t = name, schema.field(name).type
    while pa.types.is_list(t):
        path, t = path + ".list.element", t.value_type
    return path


def write_shard(path: str | os.PathLike, table: pa.Table, metadata: dict[str, str], layout_meta: dict | None = None) -> dict:
    """Write one shard atomically; returns its file record (path name, rows, positions, bytes, sha256).
    `layout_meta`: a version 2 shard's code parameters and hot ids (pipeline.layout), written to the
    Parquet footer only (the Arrow schema's copy would hold the hot list twice)."""
    meta = {f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in metadata.items()}
    version = CODE_VERSION if "topk_rids" in table.schema.names else FORMAT_VERSION
    meta[f"{META_PREFIX}format_version".encode()] = str(version).encode()
    table = table.replace_schema_metadata(meta)
    positions = int(pa.compute.sum(pa.compute.list_value_length(table["positions"])).as_py() or 0)
    per_row = max(1.0, positions / max(1, table.num_rows))
    row_group_rows = max(1, int(POSITIONS_PER_ROW_GROUP / per_row))
    path = Path(path)
    with io.atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd", compression_level=1, use_dictionary=False,
                              column_encoding=_encodings(table.schema), write_statistics=["row"], store_schema=True) as w:
            w.write_table(table, row_group_size=row_group_rows)
            if layout_meta:
                w.add_key_value_metadata({f"{META_PREFIX}{k}": str(v) for k, v in layout_meta.items()})
    return {
        "path": path.name,
        "rows": table.num_rows,
        "positions": positions,
        "bytes": path.stat().st_size,
        "sha256": io.sha256_file(path),
    }


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The kd.* key/values of a shard's schema metadata (format version, cache key, ...)."""
    md = pq.read_schema(path).metadata or {}
    return {k.decode()[len(META_PREFIX):]: v.decode() for k, v in md.items() if k.startswith(META_PREFIX.encode())}


def check_shard(path: str | os.PathLike, task_type: str, value_dtype: str, text_pair: bool,
                cache_key: str | None = None, lse_grid: bool = False, target_mode: str = "topk") -> pq.ParquetFile:
    """Open a shard and refuse it, naming the difference, unless it matches the format version of its
    value dtype and mode (`version_of`). `lse_grid`: the caller reads that optional column, so it must
    be there; it is type-checked whenever it is present, and otherwise never required. `target_mode`:
    the cache's (its manifest's)."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise KDError(f"{path}: not a readable Parquet file ({exc}); re-run the stage that wrote it") from None
    md = file_metadata(path)
    version = version_of(value_dtype, target_mode)
    if md.get("format_version") != str(version):
        known = md.get("format_version") in (str(FORMAT_VERSION), str(CODE_VERSION))
        raise KDError(f"{path}: format version {md.get('format_version')!r}, but its cache ({value_dtype} values) is version {version}; "
                      + ("the directory mixes caches: rebuild it" if known else "this kd reads versions 1 and 2: regenerate the cache"))
    if cache_key is not None and md.get("cache_key") != cache_key:
        raise KDError(f"{path}: belongs to cache {md.get('cache_key', '?')[:12]}, not {cache_key[:12]}; the directory mixes two caches")
    got = pf.schema_arrow
    want = schema(task_type, value_dtype, text_pair, lse_grid=lse_grid or "lse_grid" in got.names, target_mode=target_mode)
    for f in want:
        if f.name not in got.names:
            raise KDError(f"{path}: column {f.name!r} is missing; regenerate the cache")
        if not got.field(f.name).type.equals(f.type):
            raise KDError(f"{path}: column {f.name!r} is {got.field(f.name).type}, expected {f.type}")
    return pf


def layout_metadata(pf: pq.ParquetFile) -> dict[str, str] | None:
    """A version 2 shard's layout parameters (its footer's kd.layout* key/values), or None for version 1."""
    md = layout.read_metadata(pf)
    return {k: v for k, v in md.items() if k.startswith("layout")} if md.get("format_version") == str(CODE_VERSION) else None


_ATTACHED = b"kd.layout_attached"


def attach_layout(table: pa.Table, layout_meta: dict | None) -> pa.Table:
    """The rows of a version 2 shard carry its layout metadata with them (row groups read in one process
    are decoded in another, by `read_topk`); a version 1 table is returned as it is."""
    if not layout_meta:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), _ATTACHED: json.dumps(layout_meta).encode()})


def read_topk(table: pa.Table, layout_meta: dict | None = None):
    """(ids [P, k] int32, z/T [P, k] float16/32, lse [P] float32) of a top-k shard's rows, in rank order,
    whichever version wrote them: the one door through which every reader (training, evaluation,
    inspection) takes top-k targets. Version 2 needs the shard's `layout_metadata`."""
    if "topk_rids" in table.column_names:
        if layout_meta is None and _ATTACHED in (table.schema.metadata or {}):
            layout_meta = json.loads(table.schema.metadata[_ATTACHED])
        if layout_meta is None:
            raise KDError("a version 2 shard was read without its layout metadata")
        return layout.decode(layout.from_arrow(table), layout_meta)
    k_len, ids = ragged(table.column("topk_ids"), 2)
    vals, lse = ragged(table.column("topk_logits"), 2)[1], ragged(table.column("lse"))[1]
    k = int(k_len[0]) if len(k_len) else 1
    if (k_len != k).any() or len(k_len) != len(lse) or len(vals) != len(ids):
        raise KDError("top-k lists of different lengths; the cache is damaged, rebuild it")
    return ids.reshape(-1, k), vals.reshape(-1, k), lse


def ragged(col, levels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(lengths of the innermost lists, flat values) of a list column `levels` deep (2: per position of
    a list<list<>>); null lists count as empty."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    for _ in range(levels - 1):
        arr = arr.flatten()
    lengths = np.diff(arr.offsets.to_numpy()).astype(np.int64)
    if arr.null_count:
        lengths[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return lengths, arr.flatten().to_numpy(zero_copy_only=False)


def nested(flat: np.ndarray, row_counts, widths, arrow_type=None) -> pa.Array:
    """list<list<T>> of flat per-position values: `widths` items per position (an int k, or one count per
    position), `row_counts` positions per row. What kd teacher writes and `with_topk_lists` rebuilds."""
    if isinstance(widths, (int, np.integer)):
        inner = np.arange(0, flat.size + 1, max(1, int(widths)), dtype=np.int32)
    else:
        inner = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    rows = np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(rows), pa.ListArray.from_arrays(pa.array(inner), pa.array(flat.reshape(-1), type=arrow_type)))


def read_samples(table: pa.Table):
    """(distinct ids per position [P], ids, counts, z/T, all flat, lse [P]) of a sampled shard's rows: the
    sample columns' one reader (training pads them, kd inspect sums them)."""
    width, ids = ragged(table.column("sample_ids"), 2)
    counts, values = ragged(table.column("sample_counts"), 2)[1], ragged(table.column("sample_logits"), 2)[1]
    return width, ids, counts, values, ragged(table.column("lse"))[1]


def with_topk_lists(table: pa.Table, layout_meta: dict | None = None) -> pa.Table:
    """A top-k table with version 1's topk_ids / topk_logits list<list<>> columns, whatever its version
    (a version 2 table's code columns decoded and replaced): for readers that want rows, not arrays
    (`kd verify --recompute`, tests). Values come back as float32 z/T."""
    if "topk_rids" not in table.column_names:
        return table
    ids, vals, _ = read_topk(table, layout_meta)
    per_row = ragged(table.column("lse"))[0]
    table = table.drop_columns([c for c in TARGET_COLUMNS["code"] if c in table.column_names])
    for name, a in (("topk_ids", ids), ("topk_logits", vals.astype(np.float32))):
        table = table.append_column(name, nested(a, per_row, a.shape[1]))
    return table
