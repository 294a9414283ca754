"""The shard format (format version 1): one Parquet row per example, per-position lists.

Why these encodings (measured in shared/notes/parquet-layout.md on these machines): zstd level
1, BYTE_STREAM_SPLIT for ids and float payloads, no dictionary on payloads, non-nullable
fields and ~64K positions per row group halve the bytes of pyarrow's defaults and decode a
quarter faster. Values stay in rank order so a reader can truncate to a smaller k for free.
The schema is checked on every read: a cache written by another version or tool is refused
with a message instead of being silently misread.

One optional column, `lse_grid` (list<list<float32>>: per position, logsumexp(z/T) at every
temperature of a `kd teacher --temperatures` grid, in grid order, so lse_grid[p][0] == lse[p]),
is present only in grid caches. It is an addition, not a new version: the format version stays 1
and a reader that does not know it ignores the extra column (every column it needs is unchanged).

A sampled cache (`kd teacher --target-mode sampled`, the math in pipeline.softtargets) stores, in
place of topk_ids / topk_logits, the distinct ids drawn at each position in ascending id order
(`sample_ids`, list<list<int32>>, between 1 and M per position), how often each was drawn
(`sample_counts`, list<list<uint16>>, summing to M) and their z/T (`sample_logits`); `lse` is as
in every cache. A reader that expects top-k columns refuses it (the columns are missing), so no
older kd misreads one. The float16 `sample_logits` are written PLAIN, not BYTE_STREAM_SPLIT:
DuckDB reads that split for 4- and 8-byte types only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import io, tasks
from pipeline.errors import KDError

FORMAT_VERSION = 1
TARGET_COLUMNS = {"topk": ("topk_ids", "topk_logits"), "sampled": ("sample_ids", "sample_counts", "sample_logits")}
MAX_SAMPLES = 65535  # counts are uint16
VALUE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
POSITIONS_PER_ROW_GROUP = 65536
META_PREFIX = "kd."


def target_mode(stats: dict) -> str:
    """A cache's target mode from its manifest stats; caches written before sampled targets are top-k."""
    mode = stats.get("target_mode", "topk")
    if mode not in TARGET_COLUMNS:
        raise KDError(f"the cache's target mode {str(mode)[:40]!r} is unknown to this kd ({', '.join(TARGET_COLUMNS)}); upgrade kd "
                      f"or rebuild the cache")
    return mode


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", t, nullable=False))


def schema(task_type: str, value_dtype: str = "float16", text_pair: bool = False, lse_grid: bool = False,
           target_mode: str = "topk") -> pa.Schema:
    """The Arrow schema of a shard for a task type; text fields are kept so that a student
    with its own tokenizer can re-tokenise classification inputs. `lse_grid`: a grid cache's
    extra column; `target_mode` "sampled": sample columns instead of top-k (see the module doc)."""
    task = tasks.get(task_type)
    if value_dtype not in VALUE_DTYPES:
        raise KDError(f"unknown value dtype {value_dtype!r}: use float16 or float32")
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
                   "sample_logits")


def _split_leaves(schema: pa.Schema) -> list[str]:
    """The payload leaves written BYTE_STREAM_SPLIT: all but 2-byte floats of the sample columns, which
    DuckDB could not read so (the top-k columns keep their measured layout)."""
    out = []
    for c in PAYLOAD_COLUMNS:
        if c in schema.names:
            t = schema.field(c).type
            while pa.types.is_list(t):
                t = t.value_type
            if not (c.startswith("sample_") and t == pa.float16()):
                out.append(_leaf_path(schema, c))
    return out


def _leaf_path(schema: pa.Schema, name: str) -> str:
    """Parquet's path to the values of a (nested) column: pyarrow applies per-column encodings
    to leaf paths only, and silently ignores a top-level name of a list column."""
    path, t = name, schema.field(name).type
    while pa.types.is_list(t):
        path, t = path + ".list.element", t.value_type
    return path


def write_shard(path: str | os.PathLike, table: pa.Table, metadata: dict[str, str]) -> dict:
    """Write one shard atomically; returns its file record (path name, rows, positions, bytes, sha256)."""
    meta = {f"{META_PREFIX}{k}".encode(): str(v).encode() for k, v in metadata.items()}
    meta[f"{META_PREFIX}format_version".encode()] = str(FORMAT_VERSION).encode()
    table = table.replace_schema_metadata(meta)
    positions = int(pa.compute.sum(pa.compute.list_value_length(table["positions"])).as_py() or 0)
    per_row = max(1.0, positions / max(1, table.num_rows))
    row_group_rows = max(1, int(POSITIONS_PER_ROW_GROUP / per_row))
    path = Path(path)
    with io.atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_rows,
            compression="zstd",
            compression_level=1,
            use_dictionary=False,
            use_byte_stream_split=_split_leaves(table.schema),
            write_statistics=["row"],
            store_schema=True,
        )
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
    """Open a shard and refuse it, naming the difference, unless it matches format version 1.
    `lse_grid`: the caller reads that optional column, so it must be there; it is type-checked
    whenever it is present, and otherwise never required. `target_mode`: the cache's (its manifest's)."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise KDError(f"{path}: not a readable Parquet file ({exc}); re-run the stage that wrote it") from None
    md = file_metadata(path)
    if md.get("format_version") != str(FORMAT_VERSION):
        raise KDError(f"{path}: format version {md.get('format_version')!r}, this kd reads {FORMAT_VERSION}; regenerate the cache")
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
