"""The denser top-k layout: exact ids, bounded values, the KL bound, edge cases, every reader."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import layout
from pipeline.errors import KDError


def _topk(logits: np.ndarray, k: int):
    """(ids, z/T, lse) as stage 1 stores them: top-k in descending order, float32, full-vocab lse."""
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(logits, ids, 1).astype(np.float32)
    m = logits.max(1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(1))).astype(np.float32)
    return ids.astype(np.int32), vals, lse


def _lm_like(p=300, v=4096, seed=0):
    """Zipf-like logits over a shuffled vocabulary, a different sharpness per position."""
    rng = np.random.default_rng(seed)
    rank = np.log1p(np.arange(v))[None, :] * rng.uniform(0.8, 2.5, (p, 1))
    z = -rank + rng.normal(0, 0.5, (p, v)) + 20.0
    return np.take_along_axis(z, np.argsort(rng.random((p, v)), 1), 1)


def _peaked(p=200, v=4096, seed=1):
    """Gemma-like: one logit up to 54, a few runners-up, the rest near 0 (tails of 1e-20 to 1e-2)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, (p, v))
    top = rng.integers(0, v, p)
    z[np.arange(p), top] = rng.uniform(10, 54, p)
    z[np.arange(p), (top + 1) % v] = z[np.arange(p), top] - rng.uniform(0.5, 8, p)
    return z


def _kl(ref_vals, ref_lse, vals, lse) -> np.ndarray:
    """(k+1)-bucket KL(float32 reference || decoded), the conventions of pipeline/softtargets.py."""
    def buckets(lp):
        mass = np.exp(lp).sum(1)
        over = mass >= 1.0
        lp = lp.copy()
        lp[over] -= np.log(mass[over])[:, None]
        return lp, np.where(over, 0.0, 1.0 - mass)
    lp, pt = buckets(ref_vals.astype(np.float64) - ref_lse[:, None])
    lq, qt = buckets(vals.astype(np.float64) - lse.astype(np.float64)[:, None])
    with np.errstate(divide="ignore"):
        tail = np.where(pt > 0, pt * (np.log(np.where(pt > 0, pt, 1)) - np.maximum(np.log(qt), -708.0)), 0.0)
    return (np.exp(lp) * (lp - lq)).sum(1) + tail


def _roundtrip(ids, vals, lse, **kw):
    cols, meta = layout.encode(ids, vals, lse, **kw)
    return layout.decode(cols, meta), cols, meta


@pytest.mark.parametrize("k", [1, 8, 32, 128])
def test_ids_exact_values_bounded_kl_small(k):
    ids, vals, lse = _topk(_lm_like(), k)
    (di, dv, dl), cols, meta = _roundtrip(ids, vals, lse, vocab_size=4096)
    assert di.dtype == np.int32 and dv.dtype == np.float32 and np.array_equal(di, ids) and np.array_equal(dl, lse)
    # the stated bound: |sqrt q - sqrt p| <= D/2 in the sqrt range, |log q - log p| <= CAP/2 below it (before the shift o)
    step = float(meta["layout_step"])
    table, n = layout.code_table(step)
    raw = dv.astype(np.float64) - lse[:, None] - cols["topk_shift"].astype(np.float64)[:, None]
    logp = vals.astype(np.float64) - lse[:, None]
    sq = np.exp(logp / 2) >= 1 - n * step
    assert np.all(np.abs(np.exp(raw / 2) - np.exp(logp / 2))[sq] <= step / 2 + 1e-6)
    assert np.all(np.abs(raw - logp)[~sq] <= layout.CAP / 2 + 1e-4)
    kl = _kl(vals, lse, dv, dl)
    assert kl.mean() <= 1e-5 and kl.max() < 5e-5
    assert np.all(np.diff(dv, axis=1) <= 0)  # rank order: a reader truncates by slicing


@pytest.mark.parametrize("k", [1, 8, 32, 128])
def test_peaked_teacher_with_large_logits(k):
    ids, vals, lse = _topk(_peaked(), k)
    assert vals.max() > 50
    (di, dv, dl), cols, meta = _roundtrip(ids, vals, lse, vocab_size=4096)
    assert np.array_equal(di, ids)
    _, logq, _ = layout.decode(cols, meta, log_probs=True)
    assert _kl(vals, lse, logq, np.zeros_like(lse)).mean() <= 1e-5  # the stored information
    # float32 z/T near 54 rounds by 4e-6, more than these tails (1e-7): the reference itself, re-rounded
    # once (0 or +-1 ulp), is the floor any float32 z/T output has; the decoded z/T stay within it
    ulp = np.spacing(np.abs(vals)).astype(np.float64)
    rerounded = (vals + np.random.default_rng(0).uniform(-1, 1, vals.shape) * ulp).astype(np.float32)
    assert _kl(vals, lse, dv, dl).mean() <= 1e-5 + _kl(vals, lse, rerounded, lse).mean()
    mass = np.exp(dv.astype(np.float64) - dl[:, None]).sum(1)
    assert mass.max() <= 1 + 1e-5  # never above 1 by more than float32 rounding of z/T near 54
    top = np.exp(vals[:, 0].astype(np.float64) - lse)  # the head stays precise: |q - p| <~ D sqrt(p) (float16 z/T: 1.5%)
    assert np.allclose(np.exp(dv[:, 0].astype(np.float64) - dl), top, rtol=0, atol=1.2 * float(meta["layout_step"]))


def test_k_equal_to_vocab_has_no_tail():
    ids, vals, lse = _topk(_lm_like(p=20, v=64), 64)
    (di, dv, dl), _, _ = _roundtrip(ids, vals, lse, vocab_size=64)
    assert np.array_equal(di, ids)
    assert np.allclose(np.exp(dv.astype(np.float64) - dl[:, None]).sum(1), 1.0, atol=1e-5)


def test_empty_repeated_and_unsorted_inputs():
    (di, dv, dl), cols, _ = _roundtrip(np.zeros((0, 8), np.int32), np.zeros((0, 8), np.float32), np.zeros(0, np.float32))
    assert di.shape == dv.shape == (0, 8) and dl.shape == (0,) and all(len(c) == 0 for c in cols.values())
    ids = np.array([[5, 3, 9, 1]], np.int32)
    vals = np.array([[2.0, 2.0, 2.0, 2.0]], np.float32)  # ties: kept in input order
    (di, dv, dl), _, _ = _roundtrip(ids, vals, np.array([4.0], np.float32), vocab_size=10)
    assert np.array_equal(di, ids) and np.all(dv == dv[0, 0])
    vals = np.array([[0.5, 3.0, -1.0, 2.0]], np.float32)  # not in rank order: put in rank order, ids follow
    (di, dv, _), _, _ = _roundtrip(ids, vals, np.array([4.0], np.float32), vocab_size=10)
    assert di.tolist() == [[3, 1, 5, 9]] and np.all(np.diff(dv) < 0)


def test_bad_inputs_and_damaged_columns_raise():
    ids, vals, lse = _topk(_lm_like(p=10, v=100), 4)
    with pytest.raises(KDError):
        layout.encode(ids, vals[:, :3], lse)
    with pytest.raises(KDError):
        layout.encode(ids, np.where(vals > vals.min(), vals, np.nan), lse)
    with pytest.raises(KDError):
        layout.encode(ids, vals, lse, vocab_size=int(ids.max()))
    cols, meta = layout.encode(ids, vals, lse, vocab_size=100)
    with pytest.raises(KDError):
        layout.decode({**cols, "topk_rids": cols["topk_rids"][:-1]}, meta)
    bad = cols["topk_rids"].copy()
    bad[3] = 100
    with pytest.raises(KDError):
        layout.decode({**cols, "topk_rids": bad}, meta)
    with pytest.raises(KDError):
        layout.decode(cols, {**meta, "layout": "something/else"})


def test_hot_remap_is_a_bijection():
    rng = np.random.default_rng(3)
    ids = rng.zipf(1.3, (500, 16)) % 3000
    hot, fwd = layout.hot_remap(ids, 3000, hot_size=64)
    assert len(hot) == 64 and np.array_equal(np.sort(fwd), np.arange(3000))
    assert np.array_equal(fwd[hot], np.arange(64))
    inv = layout._inverse(",".join(map(str, hot)), 3000)
    assert np.array_equal(inv[fwd], np.arange(3000))


def _write(tmp_path, k=16):
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 9, 12)
    ids, vals, lse = _topk(_lm_like(p=int(counts.sum()), v=2048), k)
    cols, meta = layout.encode(ids, vals, lse, vocab_size=2048)
    arrs = layout.to_arrow(cols, counts, k)
    table = pa.table({"row": pa.array(np.arange(len(counts)), pa.int64()), **arrs})
    path = tmp_path / "shard.parquet"
    layout.write_table(path, table, {**meta, "format_version": "2"}, row_group_size=5)
    return path, (ids, vals, lse), layout.decode(cols, meta)


def test_file_round_trip_encodings_and_metadata(tmp_path):
    path, (ids, _, _), (di, dv, dl) = _write(tmp_path)
    pf = pq.ParquetFile(path)
    meta = layout.read_metadata(pf)
    assert meta["format_version"] == "2" and meta["layout"] == layout.NAME
    assert "kd.layout_hot_ids" not in {k.decode() for k in (pq.read_schema(path).metadata or {})}  # footer only, not twice
    rg = pf.metadata.row_group(0)
    enc = {rg.column(i).path_in_schema.split(".")[0]: rg.column(i).encodings for i in range(rg.num_columns)}
    assert "BYTE_STREAM_SPLIT" in enc["topk_rids"] and "BYTE_STREAM_SPLIT" in enc["topk_code_deltas"]
    assert "PLAIN" in enc["topk_shift"] and "BYTE_STREAM_SPLIT" in enc["lse"]
    assert pf.metadata.num_row_groups == 3
    got = layout.decode(layout.from_arrow(pq.read_table(path)), meta)
    assert np.array_equal(got[0], ids) and np.array_equal(got[1], dv) and np.array_equal(got[2], dl)


def test_plain_readers(tmp_path):
    path, (ids, _, lse), (di, dv, dl) = _write(tmp_path)
    t = pq.read_table(path)
    first_rid = t.column("topk_rids")[0][0].as_py()
    import polars as pl

    df = pl.read_parquet(path)
    assert df["topk_rids"][0][0] == first_rid and df["topk_shift"].dtype.inner in (pl.Float16, pl.Float32)
    import datasets

    ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf"))
    assert ds[0]["topk_rids"][0] == first_rid and len(ds) == t.num_rows
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    con.execute("SET threads = 1")
    rows = con.execute(layout.duckdb_sql(str(path))).fetchnumpy()
    k = ids.shape[1]
    assert np.array_equal(rows["id"].reshape(-1, k), ids)
    assert np.abs(rows["logq"].reshape(-1, k) - (dv.astype(np.float64) - dl[:, None])).max() < 1e-4
