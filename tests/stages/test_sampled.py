"""Sampled targets end to end (`kd teacher --target-mode sampled --samples M`): what a cache stores and
how its key follows mode, M and seed; reruns, batchings and job arrays draw the same ids; `kd train`
trains on it (the unbiased estimate) and refuses what has no unbiased form; `kd inspect` and
`kd verify --recompute` understand it; plain readers (pyarrow, polars, datasets, DuckDB) read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import manifest
from pipeline.cli import cli
from pipeline.errors import KDError
from stages import teacher
from stages.teacher import TeacherConfig, resolve_inputs
from stages.train import TrainConfig
from stages.train import run as run_train

CLM, MLM = "causal-lm", "masked-lm"
M = 8

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tcfg(models, data, out, task=CLM, **kw) -> TeacherConfig:
    base = dict(model=str(models[task]), data=str(data[task]), task_type=task, out=str(out), target_mode="sampled",
                samples=M, max_length=32, value_dtype="float32", progress=False)
    return TeacherConfig(**{**base, **kw})


def table(out: Path) -> pa.Table:
    m = manifest.read_manifest(out, kind="targets")
    return pa.concat_tables([pq.read_table(out / f["path"]) for f in m["files"]]).sort_by("row")


def positions_of(t: pa.Table, column: str) -> list:
    return [p for row in t.column(column).to_pylist() for p in row]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, models, datasets_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sampled")
    return {t: Path(teacher.run(tcfg(models, datasets_dir, root / t, task=t))["out"]) for t in (CLM, MLM)}


@pytest.mark.parametrize("task", [CLM, MLM])
def test_a_sampled_cache_stores_distinct_ids_counts_values_and_lse(sampled, models, datasets_dir, tmp_path, task):
    t = table(sampled[task])
    assert {"sample_ids", "sample_counts", "sample_logits", "lse"} <= set(t.column_names)
    assert "topk_ids" not in t.column_names
    ids, counts, vals = (positions_of(t, c) for c in ("sample_ids", "sample_counts", "sample_logits"))
    assert len(ids) == len(positions_of(t, "positions")) > 0
    for i, c, v in zip(ids, counts, vals):
        assert sum(c) == M and len(i) == len(c) == len(v) and 1 <= len(i) <= M
        assert i == sorted(set(i)) and min(c) >= 1
    stats = manifest.read_manifest(sampled[task])["stats"]
    assert (stats["target_mode"], stats["samples"], stats["sample_seed"], stats["top_k"]) == ("sampled", M, 0, None)
    # the same teacher's top-k cache: the same lse, and the same z/T wherever a drawn id is in its top-k
    top = table(Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "top", task=task, target_mode="topk",
                                      top_k=32))["out"]))
    np.testing.assert_allclose(positions_of(t, "lse"), positions_of(top, "lse"), rtol=0, atol=1e-5)
    hits = 0
    for i, v, ti, tv in zip(ids, vals, positions_of(top, "topk_ids"), positions_of(top, "topk_logits")):
        stored = dict(zip(ti, tv))
        for a, b in zip(i, v):
            if a in stored:
                hits += 1
                assert abs(stored[a] - b) < 1e-4
    assert hits > len(ids)


def test_sampled_key_follows_mode_samples_and_seed(models, datasets_dir, tmp_path):
    base = tcfg(models, datasets_dir, tmp_path / "x")
    key = resolve_inputs(base).key
    assert resolve_inputs(TeacherConfig(**{**base.__dict__, "top_k": 3})).key == key  # --top-k means nothing here
    others = {resolve_inputs(TeacherConfig(**{**base.__dict__, **change})).key
              for change in ({"samples": M + 1}, {"sample_seed": 1}, {"target_mode": "topk"})}
    assert key not in others and len(others) == 3


def test_draws_reproduce_across_reruns_batchings_and_job_arrays(sampled, models, datasets_dir, tmp_path):
    want = table(sampled[CLM])
    cols = ["row", "sample_ids", "sample_counts"]
    again = table(Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "again", batch_tokens=40))["out"]))
    assert again.select(cols).equals(want.select(cols))
    arr = tmp_path / "array"
    for i in (2, 0, 1):
        r = teacher.run(tcfg(models, datasets_dir, arr, task_index=i, num_tasks=3, shard_rows=5))
    assert r["complete"]
    got = table(arr)
    assert got.select(cols).equals(want.select(cols))
    np.testing.assert_allclose(np.concatenate(positions_of(got, "sample_logits")),
                               np.concatenate(positions_of(want, "sample_logits")), atol=1e-5)
    seeded = table(Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "seed1", sample_seed=1))["out"]))
    assert seeded.column("sample_ids") != want.column("sample_ids")


@pytest.mark.parametrize("change, message", [
    ({"task_type": "sequence-classification"}, "already stores every class exactly with --top-k"),
    ({"temperatures": "1,2"}, "draws at one temperature"),
    ({"samples": 0}, "--samples must be between 1 and 65535"),
])
def test_sampled_refusals(models, datasets_dir, tmp_path, change, message):
    task = change.get("task_type", CLM)
    with pytest.raises(KDError, match=message):
        teacher.run(tcfg(models, datasets_dir, tmp_path / "x", task=task, **change))
    assert not (tmp_path / "x").exists()


def _train(cache, models, out, **kw):
    return run_train(TrainConfig(targets=[str(c) for c in (cache if isinstance(cache, list) else [cache])],
                                 student_from_teacher=str(models[CLM]), student_layers="0", out=str(out), max_steps=6,
                                 batch_size=8, progress=False, **kw))


@pytest.mark.parametrize("fused", [True, False])
def test_kd_train_on_a_sampled_cache(sampled, models, tmp_path, fused):
    r = _train(sampled[CLM], models, tmp_path / "s", alpha=0.5, fused_head=fused, eval_targets=str(sampled[CLM]))
    assert r["complete"] and np.isfinite(r["final"]["loss"]) and np.isfinite(r["final"]["kd"])
    assert 0.0 <= r["eval"]["agreement"] <= 1.0 and np.isfinite(r["eval"]["kd"])


def test_kd_train_refuses_what_a_sample_cannot_estimate(sampled, models, datasets_dir, tmp_path):
    for kw, message in (({"loss": "reverse-kl"}, "--loss reverse-kl has no unbiased estimate"),
                        ({"temperature": 2.0}, "drawn at T=1, so they are no sample at T=2")):
        with pytest.raises(KDError, match=message):
            _train(sampled[CLM], models, tmp_path / "x", **kw)
        assert not (tmp_path / "x").exists()  # refused before anything is written
    top = Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "top", target_mode="topk", top_k=8))["out"])
    with pytest.raises(KDError, match="target mode"):
        _train([sampled[CLM], top], models, tmp_path / "y")
    r = CliRunner().invoke(cli, ["train", "--targets", str(sampled[CLM]), "--student-from-teacher", str(models[CLM]),
                                 "--student-layers", "0", "--out", str(tmp_path / "z"), "--loss", "jsd"])
    assert r.exit_code != 0 and "--loss jsd has no unbiased estimate" in r.output and len(r.output.strip().splitlines()) == 1


def test_inspect_and_verify_a_sampled_cache(sampled, models, tokenizer_dir, tmp_path):
    s = json.loads(CliRunner().invoke(cli, ["inspect", str(sampled[CLM]), "--json"]).output)
    assert s["target_mode"] == "sampled" and s["samples"] == M and 1 <= s["mean_distinct_ids"] <= s["max_distinct_ids"] <= M
    assert s["bytes_per_position"] > 0 and 0 <= s["mean_tail_mass"] < 1 and s["mean_entropy_nats"] > 0
    r = CliRunner().invoke(cli, ["verify", str(sampled[CLM]), "--recompute", "3"])
    assert r.exit_code == 0 and "same ids and counts" in r.output, r.output
    from tests.conftest import build_model

    other = build_model(tmp_path / "other", CLM, tokenizer_dir, seed=5)
    r = CliRunner().invoke(cli, ["verify", str(sampled[CLM]), "--recompute", "3", "--model", str(other)])
    assert r.exit_code != 0 and "does not match" in r.output


def test_kd_eval_refuses_a_sampled_cache(sampled, tmp_path, models):
    r = CliRunner().invoke(cli, ["eval", "--targets", str(sampled[CLM]), "--model", str(models[CLM]),
                                 "--out", str(tmp_path / "e")])
    assert r.exit_code != 0 and "holds sampled targets" in r.output and "--teacher MODEL --data SPLIT" in r.output


def test_plain_readers_read_a_sampled_cache(sampled):
    shard = str(next((sampled[CLM] / "shards").glob("*.parquet")))
    want = sum(sum(c) for c in positions_of(pq.read_table(shard), "sample_counts"))
    import polars as pl

    assert pl.read_parquet(shard)["sample_counts"].explode().explode().sum() == want
    from datasets import Dataset

    assert sum(sum(c) for r in Dataset.from_parquet(shard)["sample_counts"] for c in r) == want
    duckdb = pytest.importorskip("duckdb")
    got = duckdb.sql(f"SELECT sum(list_sum(flatten(sample_counts))), sum(list_sum(flatten(sample_logits))), "
                     f"max(list_max(flatten(sample_ids))) FROM '{shard}'").fetchall()[0]
    assert got[0] == want and np.isfinite(got[1]) and got[2] >= 0
