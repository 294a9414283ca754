"""Stage 1 end to end on tiny random models: values against a float64 reference, job arrays,
a real SIGKILL, the cache key, readers, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline import io, manifest
from pipeline.cli import cli
from stages import teacher
from pipeline.softtargets import bucket_kl
from stages.teacher import TeacherConfig, resolve_inputs
from tests.conftest import TASK_TYPES, build_model, make_data, read_targets, write_jsonl

KD = str(Path(sys.executable).with_name("kd"))


def cfg(models, data, task, out, **kw) -> TeacherConfig:
    base = dict(model=str(models[task]), data=str(data[task]), task_type=task, out=str(out), top_k=8,
                max_length=32, temperature=2.0, progress=False)
    return TeacherConfig(**{**base, **kw})


def read_cache(out: Path) -> pa.Table:
    return read_targets(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, models, datasets_dir):
    root = tmp_path_factory.mktemp("caches")
    return {t: Path(teacher.run(cfg(models, datasets_dir, t, root / t))["out"]) for t in TASK_TYPES}


@pytest.mark.parametrize("task", TASK_TYPES)
def test_values_equal_float64_dense_reference(task, caches, models):
    """Stored ids / z/T / lse against a float64 forward of the full model, written independently."""
    from transformers import AutoTokenizer

    import transformers

    cls = {"sequence-classification": transformers.AutoModelForSequenceClassification,
           "token-classification": transformers.AutoModelForTokenClassification,
           "masked-lm": transformers.AutoModelForMaskedLM, "causal-lm": transformers.AutoModelForCausalLM}[task]
    model = cls.from_pretrained(models[task], dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(models[task])
    table = read_cache(caches[task])
    T = 2.0
    rng = np.random.default_rng(0)
    checked = 0
    for i in rng.choice(table.num_rows, size=8, replace=False):
        r = {c: table[c][int(i)].as_py() for c in table.column_names}
        if task == "token-classification":
            enc = tok(r["text"], is_split_into_words=True, truncation=True, max_length=32)
            assert r["input_ids"] == enc["input_ids"]
            first = [p for p, w in enumerate(enc.word_ids()) if w is not None and (p == 0 or enc.word_ids()[p - 1] != w)]
            assert r["positions"] == first
        elif task == "masked-lm":
            enc = tok(r["text"], truncation=True, max_length=32)["input_ids"]
            assert len(r["input_ids"]) == len(enc) and r["positions"]
            assert all(r["labels"][p] == enc[p] for p in r["positions"])  # labels: the original tokens
            untouched = [p for p in range(len(enc)) if p not in r["positions"]]
            assert all(r["input_ids"][p] == enc[p] for p in untouched)
        else:
            assert r["input_ids"] == tok(r["text"], truncation=True, max_length=32)["input_ids"]
        if task == "causal-lm":
            assert r["positions"] == list(range(len(r["input_ids"]) - 1))
        with torch.no_grad():
            z = model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double()
        z = z[None] if task == "sequence-classification" else z[r["positions"]]
        z = z / T
        lse = torch.logsumexp(z, -1).numpy()
        ref_vals, ref_ids = torch.sort(z, -1, descending=True)
        k = len(r["topk_ids"][0])
        assert k == min(8, z.shape[-1])
        np.testing.assert_allclose(r["lse"], lse, rtol=1e-5, atol=1e-5)
        got_vals = np.asarray(r["topk_logits"], dtype=np.float64)
        # the default code (format 2): a bounded error where it matters, KL(exact || stored) per position
        kl = bucket_kl(ref_vals[:, :k].numpy() - lse[:, None], got_vals - np.asarray(r["lse"])[:, None],
                       exact_tail=k < z.shape[-1])
        assert kl.max() < 2e-5, kl.max()
        got_ids = np.asarray(r["topk_ids"])
        ref = ref_vals.numpy()
        for p in range(len(got_ids)):
            for j in range(k):  # equal ids unless the reference itself ties at this rank
                neighbours = [abs(ref[p, j] - ref[p, j + d]) for d in (-1, 1) if 0 <= j + d < ref.shape[1]]
                if min(neighbours) > 1e-4:
                    assert got_ids[p, j] == ref_ids[p, j]
        checked += 1
    assert checked == 8


def test_job_array_in_any_order_equals_single_task(tmp_path, models, datasets_dir):
    # One row per batch (--batch-tokens 1): a row's padded batch shape then does not depend on the
    # split, so the caches must be equal bit for bit. (With bigger batches, rows that share a batch
    # in one split and not in the other differ in the last float32 digit: BLAS blocks by shape.)
    task = "causal-lm"
    single = Path(teacher.run(cfg(models, datasets_dir, task, tmp_path / "single", shard_rows=7, batch_tokens=1))["out"])
    arr = tmp_path / "array"
    for i in (2, 0, 2, 1):  # shuffled, task 2 twice
        r = teacher.run(cfg(models, datasets_dir, task, arr, shard_rows=5, task_index=i, num_tasks=3, batch_tokens=1))
    assert r["complete"]
    a, b = read_cache(single), read_cache(arr)
    assert a.column("row").to_pylist() == list(range(40))
    assert a.equals(b)
    m = manifest.read_manifest(arr)
    assert m["num_tasks"] == 3 and m["stats"]["rows"] == 40
    assert manifest.verify_files(arr, m) == []
    for f in m["files"]:
        assert io.sha256_file(arr / f["path"]) == f["sha256"]
        assert pq.ParquetFile(arr / f["path"]).metadata.num_rows == f["rows"]


def test_sigkill_mid_task_then_rerun_completes(tmp_path, tokenizer_dir):
    model = build_model(tmp_path / "model", "sequence-classification", tokenizer_dir)
    data = make_data(tmp_path / "data.jsonl", "sequence-classification", n=3000)
    out = tmp_path / "out"
    args = [KD, "teacher", "--model", str(model), "--data", str(data), "--task-type", "sequence-classification",
            "--max-length", "32", "--shard-rows", "25", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("*.parquet"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / manifest.MANIFEST).exists(), "killed too late: the run had already finished"
    written = len(list((out / "shards").glob("*.parquet")))
    assert 0 < written < 120
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_cache(out).column("row").to_pylist()
    assert rows == list(range(3000))  # no row missing or doubled
    assert not list(out.rglob(f"{io.TMP_MARK}*"))
    fresh = subprocess.run(args[:-1] + [str(tmp_path / "fresh")], env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert read_cache(out).equals(read_cache(tmp_path / "fresh"))


def test_cache_key_changes_exactly_with_content(tmp_path, models, datasets_dir, tokenizer_dir):
    task = "masked-lm"
    base = cfg(models, datasets_dir, task, tmp_path / "o")
    key = resolve_inputs(base).key
    same = [dict(batch_tokens=64), dict(num_tasks=3, task_index=1), dict(out=str(tmp_path / "elsewhere")),
            dict(shard_rows=3), dict(dtype="float32"), dict(progress=True)]
    for change in same:
        assert resolve_inputs(TeacherConfig(**{**base.__dict__, **change})).key == key, change
    assert resolve_inputs(TeacherConfig(**{**base.__dict__, "model": str(shutil.copytree(models[task], tmp_path / "copy"))})).key == key
    differ = [dict(top_k=9), dict(temperature=1.0), dict(max_length=16), dict(mask_seed=1), dict(value_dtype="float32"),
              dict(limit=20)]
    keys = {key}
    for change in differ:
        keys.add(resolve_inputs(TeacherConfig(**{**base.__dict__, **change})).key)
    assert len(keys) == len(differ) + 1
    # model weights
    w = tmp_path / "weights"
    shutil.copytree(models[task], w)
    from transformers import AutoModelForMaskedLM

    m = AutoModelForMaskedLM.from_pretrained(w)
    with torch.no_grad():
        m.bert.embeddings.word_embeddings.weight[5, 0] += 1.0
    m.save_pretrained(w)
    assert resolve_inputs(TeacherConfig(**{**base.__dict__, "model": str(w)})).key not in keys
    # tokenizer: one added token, same weights
    t = tmp_path / "tok"
    shutil.copytree(models[task], t)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(t)
    tok.add_tokens(["blockbuster"])
    tok.save_pretrained(t)
    assert resolve_inputs(TeacherConfig(**{**base.__dict__, "model": str(t)})).key not in keys
    # data: one row edited
    rows = [json.loads(line) for line in Path(datasets_dir[task]).read_text().splitlines()]
    rows[3]["text"] += " again"
    d = write_jsonl(tmp_path / "d.jsonl", rows)
    assert resolve_inputs(TeacherConfig(**{**base.__dict__, "data": str(d)})).key not in keys


def test_cache_hit_runs_no_teacher(tmp_path, models, datasets_dir, monkeypatch, capsys):
    c = cfg(models, datasets_dir, "sequence-classification", tmp_path / "o")
    first = teacher.run(c)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("*") if p.is_file()}

    def forbidden(*a, **k):
        raise AssertionError("the teacher was loaded on a cache hit")

    monkeypatch.setattr(teacher, "load_model", forbidden)
    monkeypatch.setattr(teacher, "launch", forbidden)
    again = teacher.run(c)
    assert again["reused"] and again["key"] == first["key"]
    assert "cache hit" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "o").rglob("*") if p.is_file()}


def test_cache_root_keys_the_directory(tmp_path, models, datasets_dir):
    c = cfg(models, datasets_dir, "sequence-classification", tmp_path / "link", cache_root=str(tmp_path / "root"))
    r = teacher.run(c)
    assert Path(r["out"]) == tmp_path / "root" / r["key"]
    assert (tmp_path / "link").resolve() == Path(r["out"]).resolve()
    assert teacher.run(c)["reused"]


def test_parquet_reads_with_pyarrow_polars_and_datasets(caches):
    import datasets
    import polars as pl

    for out in caches.values():
        files = sorted(str(p) for p in (out / "shards").glob("*.parquet"))
        t = pq.read_table(files)
        df = pl.read_parquet(files)
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
        assert t.num_rows == df.height == len(ds) == 40
        coded = "topk_rids" in t.column_names  # language models: format 2 by default; classifiers: exact float32
        assert coded == (manifest.read_manifest(out)["stats"]["task_type"] in ("masked-lm", "causal-lm"))
        ids = "topk_rids" if coded else "topk_ids"
        assert ds[0][ids] == t[ids][0].as_py() and ds[0]["lse"] == t["lse"][0].as_py()
        assert df["row"].to_list() == t["row"].to_pylist()
        md = pq.read_schema(files[0]).metadata
        assert md[b"kd.format_version"] == (b"2" if coded else b"1")
        duckdb = pytest.importorskip("duckdb")  # DuckDB reads every column of the default layout
        got = duckdb.sql(f"SELECT count(*), sum(list_sum(lse)), max(list_max({ids})) FROM read_parquet({files})")
        assert got.fetchall()[0][0] == 40
        assert md[b"kd.cache_key"].decode() == manifest.read_manifest(out)["key"]


def test_inspect_and_verify(caches):
    runner = CliRunner()
    out = caches["causal-lm"]
    r = runner.invoke(cli, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    t = read_cache(out)
    assert s["rows"] == 40 and s["positions"] == sum(len(p) for p in t["positions"].to_pylist())
    assert 0 < s["mean_tail_mass"] < 1 and s["mean_entropy_nats"] > 0
    # with k = C the stored distribution is the whole one: tail ~0, entropy exact
    exact = json.loads(runner.invoke(cli, ["inspect", str(caches["sequence-classification"]), "--json"]).output)
    t = read_cache(caches["sequence-classification"])
    logp = np.asarray(t["topk_logits"].to_pylist(), dtype=np.float64)[:, 0] - np.asarray(t["lse"].to_pylist())[:, 0:1]
    assert exact["mean_tail_mass"] < 1e-3
    assert abs(exact["mean_entropy_nats"] - float((-(np.exp(logp) * logp).sum(-1)).mean())) < 1e-3
    r = runner.invoke(cli, ["verify", str(out), "--recompute", "3"])
    assert r.exit_code == 0 and "recomputed 3 rows" in r.output, r.output


def test_verify_detects_corruption(tmp_path, caches):
    out = shutil.copytree(caches["sequence-classification"], tmp_path / "c")
    shard = next((out / "shards").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code != 0 and "sha256" in r.output


def test_status_and_finalize_cli(tmp_path, models, datasets_dir):
    out = tmp_path / "o"
    teacher.run(cfg(models, datasets_dir, "token-classification", out, task_index=1, num_tasks=2))
    runner = CliRunner()
    r = runner.invoke(cli, ["status", str(out), "--check"])
    assert r.exit_code == 1 and "missing tasks: 0" in r.output
    r = runner.invoke(cli, ["finalize", str(out)])
    assert r.exit_code != 0 and "missing: 0" in r.output
    assert not (out / "manifest.json").exists()
    teacher.run(cfg(models, datasets_dir, "token-classification", out, task_index=0, num_tasks=2))
    assert runner.invoke(cli, ["status", str(out), "--check"]).exit_code == 0


def test_config_file_and_flags_win(tmp_path, models, datasets_dir):
    conf = tmp_path / "t.yaml"
    conf.write_text(f"model: {models['sequence-classification']}\ndata: {datasets_dir['sequence-classification']}\n"
                    f"task-type: sequence-classification\ntop_k: 1\nout: {tmp_path / 'o'}\n")
    r = CliRunner().invoke(cli, ["teacher", "--config", str(conf), "--top-k", "2", "--max-length", "16"])
    assert r.exit_code == 0, r.output
    assert manifest.read_manifest(tmp_path / "o")["stats"]["top_k"] == 2
    conf.write_text("model: x\nbogus_key: 1\n")
    r = CliRunner().invoke(cli, ["teacher", "--config", str(conf)])
    assert r.exit_code != 0 and "bogus_key" in r.output


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("Error:")]  # progress lines may precede it
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def test_bad_input_is_one_clear_line(tmp_path, models, datasets_dir, tokenizer_dir):
    runner = CliRunner()
    sc = "sequence-classification"

    def run(*extra, task=sc, model=None, data=None, out=None):
        return runner.invoke(cli, ["teacher", "--model", str(model or models[task]), "--data", str(data or datasets_dir[task]),
                                   "--task-type", task, "--max-length", "32", "--out", str(out or tmp_path / "o"), *extra])

    assert "'nope' is not a column" in _one_line_error(run("--text-column", "nope"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no rows" in _one_line_error(run(data=empty)) or "cannot load" in _one_line_error(run(data=empty))
    assert "task-type" in _one_line_error(runner.invoke(cli, ["teacher", "--model", "m", "--data", "d", "--task-type", "regression"]))
    from transformers import BertModel, BertConfig

    bare = tmp_path / "bare"
    BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bare)
    for f in (Path(tokenizer_dir)).iterdir():
        shutil.copy(f, bare / f.name)
    assert "no trained sequence-classification head" in _one_line_error(run(model=bare))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a film", "label": 1}, {"text": "the plot", "label": 7}])
    assert "row 1: label 7 is outside" in _one_line_error(run(data=bad))
    assert "--top-k 5000 is larger" in _one_line_error(run("--top-k", "5000", task="causal-lm"))
    nan = shutil.copytree(models["masked-lm"], tmp_path / "nan")
    from transformers import AutoModelForMaskedLM

    m = AutoModelForMaskedLM.from_pretrained(nan)
    with torch.no_grad():
        m.cls.predictions.decoder.weight[7, :] = float("nan")
    m.save_pretrained(nan)
    import re

    assert re.search(r"NaN/inf logits at row \d+ position \d+", _one_line_error(run(task="masked-lm", model=nan, out=tmp_path / "nan-out")))
    # an --out holding a different complete cache: refused, and nothing in it changes
    good = tmp_path / "good"
    assert run(out=good).exit_code == 0
    snapshot = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert "holds a different" in _one_line_error(run("--top-k", "1", out=good))
    assert snapshot == {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
