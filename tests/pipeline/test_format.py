"""The shard format: schema per task type, the encodings actually written, metadata, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import format as fmt
from pipeline.errors import KDError


def _table(value_dtype="float16", rows=50, k=4, lse_grid=False):
    rng = np.random.default_rng(0)
    schema = fmt.schema("causal-lm", value_dtype, lse_grid=lse_grid)
    lens = rng.integers(2, 9, size=rows)
    data = {
        "row": list(range(rows)), "id": [str(i) for i in range(rows)], "text": ["x"] * rows,
        "input_ids": [rng.integers(0, 1000, n).tolist() for n in lens], "labels": [None] * rows,
        "truncated": [False] * rows, "positions": [list(range(n - 1)) for n in lens],
        "topk_ids": [rng.integers(0, 1000, (n - 1, k)).tolist() for n in lens],
        "topk_logits": [np.sort(rng.normal(size=(n - 1, k)), -1)[:, ::-1].astype(np.float32).tolist() for n in lens],
        "lse": [rng.normal(size=n - 1).astype(np.float32).tolist() for n in lens],
    }
    data["lse_grid"] = [[[v, v + 1.0, v - 1.0] for v in row] for row in data["lse"]]
    return pa.Table.from_pydict({f.name: pa.array(data[f.name]).cast(f.type) for f in schema}, schema=schema)


def test_payload_columns_use_byte_stream_split_and_zstd(tmp_path):
    path = tmp_path / "s.parquet"
    rec = fmt.write_shard(path, _table(lse_grid=True), {"cache_key": "abc", "top_k": 4})
    md = pq.ParquetFile(path).metadata
    cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i) for i in range(md.num_columns)}
    for name in (c for c in fmt.PAYLOAD_COLUMNS if c in _table(lse_grid=True).column_names):  # v1 here; v2: test_teacher
        leaf = next(c for p, c in cols.items() if p.split(".")[0] == name)
        assert "BYTE_STREAM_SPLIT" in leaf.encodings, (name, leaf.encodings)
        assert leaf.compression == "ZSTD"
    assert rec["rows"] == 50 and rec["positions"] == sum(len(p) for p in _table()["positions"].to_pylist())
    assert fmt.file_metadata(path)["format_version"] == "1" and fmt.file_metadata(path)["cache_key"] == "abc"


def test_check_shard_refuses_wrong_schema_version_and_key(tmp_path):
    path = tmp_path / "s.parquet"
    fmt.write_shard(path, _table(), {"cache_key": "abc"})
    fmt.check_shard(path, "causal-lm", "float16", False, "abc")
    with pytest.raises(KDError, match="float"):
        fmt.check_shard(path, "causal-lm", "float32", False)
    with pytest.raises(KDError, match="belongs to cache"):
        fmt.check_shard(path, "causal-lm", "float16", False, "other")
    bad = tmp_path / "v2.parquet"
    pq.write_table(_table().replace_schema_metadata({b"kd.format_version": b"2"}), bad)
    with pytest.raises(KDError, match="format version '2'"):
        fmt.check_shard(bad, "causal-lm", "float16", False)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(KDError, match="not a readable Parquet file"):
        fmt.check_shard(junk, "causal-lm", "float16", False)


def test_unknown_task_type_and_value_dtype():
    with pytest.raises(KDError, match="unknown task type"):
        fmt.schema("regression")
    with pytest.raises(KDError, match="unknown value dtype"):
        fmt.schema("causal-lm", "int8")


def test_lse_grid_is_optional_and_checked_where_present(tmp_path):
    """A grid cache's extra column: an old reader (not asking for it) accepts both kinds of shard,
    a reader that needs it refuses a shard without it, and its type is checked whenever present."""
    plain, grid = tmp_path / "plain.parquet", tmp_path / "grid.parquet"
    fmt.write_shard(plain, _table(), {"cache_key": "abc"})
    fmt.write_shard(grid, _table(lse_grid=True), {"cache_key": "abc"})
    assert "lse_grid" not in pq.read_schema(plain).names
    for path in (plain, grid):
        fmt.check_shard(path, "causal-lm", "float16", False, "abc")
    fmt.check_shard(grid, "causal-lm", "float16", False, "abc", lse_grid=True)
    with pytest.raises(KDError, match="column 'lse_grid' is missing"):
        fmt.check_shard(plain, "causal-lm", "float16", False, "abc", lse_grid=True)
    t = _table()
    wrong = t.append_column("lse_grid", pa.array([[[v] for v in row] for row in t["lse"].to_pylist()], pa.list_(pa.list_(pa.float64()))))
    bad = tmp_path / "bad.parquet"
    fmt.write_shard(bad, wrong, {"cache_key": "abc"})
    with pytest.raises(KDError, match="column 'lse_grid' is list"):
        fmt.check_shard(bad, "causal-lm", "float16", False, "abc")
    read = pq.read_table(grid)
    assert read["lse_grid"].to_pylist()[0][0][1] == pytest.approx(read["lse"].to_pylist()[0][0] + 1.0)


def test_format_1_and_2_caches_stream_the_same_targets_and_both_train(tmp_path, models, datasets_dir):
    """One teacher, its top-k stored as format 1 (float32 z/T) and as format 2 (the default code): the
    training loader hands the same ids in the same order and values within the code's bound; a format 1
    float16 cache still trains; kd inspect reports what storing cost."""
    import json

    from click.testing import CliRunner

    from pipeline import manifest
    from pipeline.cli import cli
    from pipeline.layout import value_error
    from pipeline.loader import Collate, ParquetSource, StreamingDataset
    from stages import teacher, train
    from stages.teacher import TeacherConfig

    def cache(dtype):
        c = TeacherConfig(model=str(models["causal-lm"]), data=str(datasets_dir["causal-lm"]), task_type="causal-lm", top_k=8,
                          max_length=32, out=str(tmp_path / dtype), value_dtype=dtype, progress=False)
        return Path(teacher.run(c)["out"])

    def batches(out, dtype):
        m = manifest.read_manifest(out)
        src = ParquetSource([out / f["path"] for f in m["files"]], "causal-lm", dtype, False, m["key"])
        return list(StreamingDataset(src, Collate("causal-lm", 0, True, value_dtype=dtype), 8, shuffle=False))

    exact, coded = cache("float32"), cache("auto")
    assert manifest.read_manifest(coded)["stats"]["value_dtype"] == "code"
    for a, b in zip(batches(exact, "float32"), batches(coded, "code"), strict=True):
        assert torch.equal(a["topk_ids"], b["topk_ids"]) and torch.equal(a["lse"], b["lse"])
        lp = (a["topk_logits"] - a["lse"][:, None]).double().numpy()
        err = np.abs(a["topk_logits"].double().numpy() - b["topk_logits"].double().numpy())
        assert (err <= value_error(lp, 8)).all()
    s = json.loads(CliRunner().invoke(cli, ["inspect", str(coded), "--json"]).output)
    assert 0 < s["stored_kl_mean"] < 1e-5 and s["stored_kl_max"] < 1e-4
    old = cache("float16")
    r = train.run(train.TrainConfig(targets=[str(old)], student_from_teacher=str(models["causal-lm"]), student_layers="0",
                                    out=str(tmp_path / "s"), max_steps=3, batch_size=8, progress=False,
                                    eval_targets=str(coded)))  # held out in the other format
    assert r["complete"] and np.isfinite(r["final"]["loss"]) and np.isfinite(r["eval"]["kd"])
