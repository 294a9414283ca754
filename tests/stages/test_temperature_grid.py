"""A temperature grid in one cache (`kd teacher --temperatures`): per grid T the (k+1)-bucket KL from
the cache equals a float64 dense reference, the key follows the grid (and one T keeps its old key),
job arrays keep the grid, `kd train` at a grid T has the exact tail without a warning, `kd eval`
reads the grid's T = 1 lse, and bad grids are one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline import format as fmt
from pipeline import io, manifest, scoring
from pipeline.cli import cli
from pipeline.errors import KDError
from pipeline.fingerprint import cache_key
from pipeline.losses import cache_grid, choose_lse, kd_loss_sum
from stages import teacher
from stages.teacher import TeacherConfig, resolve_inputs
from stages.train import TrainConfig
from stages.train import run as run_train

CLM = "causal-lm"
GRID = [2.0, 1.0, 4.0]  # stored at 2; T = 1 (for kd eval) and 4 beside it


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tcfg(models, data, out, task=CLM, **kw) -> TeacherConfig:
    base = dict(model=str(models[task]), data=str(data[task]), task_type=task, out=str(out), top_k=8, max_length=32,
                value_dtype="float32", progress=False)
    return TeacherConfig(**{**base, **kw})


def flat(col) -> np.ndarray:
    arr = col.combine_chunks()
    while pa.types.is_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def table(out: Path) -> pa.Table:
    m = manifest.read_manifest(out, kind="targets")
    return pa.concat_tables([pq.read_table(out / f["path"]) for f in m["files"]]).sort_by("row")


@pytest.fixture(scope="module")
def grid_caches(tmp_path_factory, models, datasets_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grid")
    return {t: Path(teacher.run(tcfg(models, datasets_dir, root / t, task=t, temperatures=GRID))["out"])
            for t in ("sequence-classification", "masked-lm", CLM)}


def dense_logits(model_dir: Path, task: str, rows: list[dict]) -> list[torch.Tensor]:
    """float64 logits of every target position, row by row, from the model's own full forward."""
    from pipeline.models import auto_class

    model = auto_class(task).from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for r in rows:
            z = model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double()
            out.append(z[None] if task == "sequence-classification" else z[r["positions"]])
    return out


def bucket_kl(zt: torch.Tensor, zs: torch.Tensor, ids: torch.Tensor, t: float) -> torch.Tensor:
    """The (k+1)-bucket KL(p || q) per position from dense float64 logits, written independently."""
    p, q = torch.softmax(zt / t, -1), torch.softmax(zs / t, -1)
    pk, qk = p.gather(1, ids), q.gather(1, ids)
    pt, qt = (1 - pk.sum(-1)).clamp(min=0), (1 - qk.sum(-1)).clamp(min=1e-300)
    tail = torch.where(pt > 0, pt * (pt.clamp(min=1e-300).log() - qt.log()), torch.zeros_like(pt))
    return (pk * (pk.log() - qk.log())).sum(-1) + tail


@pytest.mark.parametrize("task", ["sequence-classification", "masked-lm", CLM])
def test_each_grid_temperature_gives_the_dense_float64_kl(task, grid_caches, models, tmp_path, tokenizer_dir):
    """For every grid T: the cache's ids / values / lse_grid, through the library's loss with the lse
    `choose_lse` picks, give the (k+1)-bucket KL of a float64 dense forward of the teacher at T."""
    from tests.conftest import build_model

    student = build_model(tmp_path / "student", task, tokenizer_dir, seed=11, layers=1)
    t = table(grid_caches[task])
    stats = manifest.read_cache(grid_caches[task])["stats"]
    assert stats["temperature"] == 2.0 and stats["temperatures"] == GRID and cache_grid(stats) == GRID
    rows = t.slice(0, 12).to_pylist()
    zt_all, zs_all = torch.cat(dense_logits(models[task], task, rows)), torch.cat(dense_logits(student, task, rows))
    ids = torch.tensor([p for r in rows for p in r["topk_ids"]])
    vals = torch.tensor([p for r in rows for p in r["topk_logits"]], dtype=torch.float64)
    lse_grid = torch.tensor([p for r in rows for p in r["lse_grid"]], dtype=torch.float64)
    assert torch.equal(lse_grid[:, 0], torch.tensor([p for r in rows for p in r["lse"]], dtype=torch.float64))
    tails = []
    for T in GRID:
        pick = choose_lse(GRID, T)
        assert pick.exact and pick.temperature == T and pick.index == GRID.index(T)
        np.testing.assert_allclose(lse_grid[:, pick.index], torch.logsumexp(zt_all / T, -1), rtol=1e-5, atol=1e-5)
        got = kd_loss_sum(zs_all, ids, vals, lse_grid[:, pick.index], cache_temperature=2.0, temperature=T,
                          lse_temperature=pick.temperature)
        want = bucket_kl(zt_all, zs_all, ids, T).sum()
        assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-7), T
        tails.append(float((1 - torch.softmax(zt_all / T, -1).gather(1, ids).sum(-1)).mean()))
    if task != "sequence-classification":  # k < V: a tail, so the stored lse at T0 would be wrong at T = 4
        assert tails[2] > 1e-3
        wrong = kd_loss_sum(zs_all, ids, vals, lse_grid[:, 0], cache_temperature=2.0, temperature=4.0, lse_temperature=4.0)
        assert abs(float(wrong) - float(bucket_kl(zt_all, zs_all, ids, 4.0).sum())) > 1e-3


def test_key_follows_the_grid_and_one_temperature_keeps_its_key(tmp_path, models, datasets_dir):
    base = tcfg(models, datasets_dir, tmp_path / "o", temperature=2.0)
    inp = resolve_inputs(base)
    fps = inp.fingerprints
    # the body of a one-T key exactly as kd computed it before grids existed
    old = {"teacher": fps["teacher"]["sha256"], "tokenizer": fps["tokenizer"]["sha256"], "dataset": fps["dataset"]["sha256"],
           "task_type": CLM, "max_length": 32, "top_k": 8, "temperature": 2.0, "value_dtype": "float32", "mask": None,
           "format_version": 1}
    assert inp.key == io.sha256_bytes(io.canonical_json(old).encode())
    assert resolve_inputs(tcfg(models, datasets_dir, tmp_path / "o", temperatures="2")).key == inp.key  # a one-entry grid
    assert resolve_inputs(tcfg(models, datasets_dir, tmp_path / "o", temperatures=[2], temperature=2.0)).key == inp.key
    assert resolve_inputs(tcfg(models, datasets_dir, tmp_path / "o")).key == \
        resolve_inputs(tcfg(models, datasets_dir, tmp_path / "o", temperature=1.0)).key  # neither: T = 1, as before
    keys = {inp.key}
    for grid in ("2,1,4", "2,4,1", "1,2,4", "2,1"):
        keys.add(resolve_inputs(tcfg(models, datasets_dir, tmp_path / "o", temperatures=grid)).key)
    assert len(keys) == 5
    assert cache_key(teacher=fps["teacher"], tokenizer=fps["tokenizer"], dataset=fps["dataset"], task_type=CLM, max_length=32,
                     top_k=8, temperature=2.0, value_dtype="float32", mask=None, format_version=1, temperatures=[2.0]) == inp.key


def test_a_one_temperature_cache_is_written_as_before(tmp_path, models, datasets_dir):
    out = Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "one", temperatures="2"))["out"])
    m = manifest.read_cache(out)
    assert m["stats"]["temperature"] == 2.0 and "temperatures" not in m["stats"]
    assert m["config"]["temperature"] == 2.0 and m["config"]["temperatures"] is None
    shard = out / m["files"][0]["path"]
    assert pq.read_schema(shard).remove_metadata().equals(fmt.schema(CLM, "float32"))
    assert "temperatures" not in fmt.file_metadata(shard)


def test_a_job_array_keeps_the_grid(tmp_path, models, datasets_dir, grid_caches):
    arr = tmp_path / "array"
    for i in (1, 0):
        r = teacher.run(tcfg(models, datasets_dir, arr, temperatures=GRID, task_index=i, num_tasks=2, shard_rows=7))
    assert r["complete"]
    m = manifest.read_cache(arr)
    assert m["num_tasks"] == 2 and m["stats"]["temperatures"] == GRID and m["stats"]["temperature"] == 2.0
    assert m["key"] == manifest.read_cache(grid_caches[CLM])["key"]
    a, b = table(arr), table(grid_caches[CLM])
    floats = ["topk_logits", "lse", "lse_grid"]  # float32: equal up to the rounding of another batching
    assert a.drop(floats).equals(b.drop(floats))
    for c in floats:
        assert a[c].type == b[c].type
        np.testing.assert_allclose(flat(a[c]), flat(b[c]), rtol=1e-5, atol=1e-5)
    summary = json.loads(CliRunner().invoke(cli, ["inspect", str(arr), "--json"]).output)
    assert summary["temperatures"] == GRID
    r = CliRunner().invoke(cli, ["verify", str(arr), "--recompute", "2"])  # every grid lse against a fresh run
    assert r.exit_code == 0 and "recomputed 2 rows" in r.output, r.output


def _first_step_kd(tmp_path, cache: Path, student: Path, name: str, temperature: float, fused: bool = True) -> float:
    out = tmp_path / name
    run_train(TrainConfig(out=str(out), targets=str(cache), student=str(student), alpha=1.0, temperature=temperature,
                          max_steps=1, batch_size=64, lr=1e-9, num_workers=0, progress=False, save_every=0, fused_head=fused))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("step") == 1 and "event" not in r)["kd"]


def test_train_at_a_grid_temperature_uses_the_exact_tail(tmp_path, grid_caches, models, tokenizer_dir, capsys):
    """One step over all rows: its KD term is the mean (k+1)-bucket KL at T, equal to the float64 dense
    reference at every grid T (fused head and full logits alike), with no warning; off the grid it warns."""
    from tests.conftest import build_model

    student = build_model(tmp_path / "student", CLM, tokenizer_dir, seed=5, layers=1)
    rows = table(grid_caches[CLM]).to_pylist()
    zt, zs = torch.cat(dense_logits(models[CLM], CLM, rows)), torch.cat(dense_logits(student, CLM, rows))
    ids = torch.tensor([p for r in rows for p in r["topk_ids"]])
    for T, fused in ((4.0, True), (1.0, False), (2.0, True)):
        capsys.readouterr()
        kd = _first_step_kd(tmp_path, grid_caches[CLM], student, f"s{T}{fused}", T, fused)
        assert "warning" not in capsys.readouterr().err
        assert kd == pytest.approx(float(bucket_kl(zt, zs, ids, T).mean()), rel=2e-4), T
    kd = _first_step_kd(tmp_path, grid_caches[CLM], student, "off", 3.0)
    err = capsys.readouterr().err
    assert "warning: training at T=3.0" in err and "2,1,4" in err
    assert kd != pytest.approx(float(bucket_kl(zt, zs, ids, 3.0).mean()), rel=1e-2)  # renormalised, not exact


def test_an_old_one_temperature_cache_still_trains(tmp_path, models, datasets_dir, tokenizer_dir, capsys):
    from tests.conftest import build_model

    cache = Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "one", temperature=2.0))["out"])
    student = build_model(tmp_path / "student", CLM, tokenizer_dir, seed=5, layers=1)
    rows = table(cache).to_pylist()
    zt, zs = torch.cat(dense_logits(models[CLM], CLM, rows)), torch.cat(dense_logits(student, CLM, rows))
    ids = torch.tensor([p for r in rows for p in r["topk_ids"]])
    capsys.readouterr()
    assert _first_step_kd(tmp_path, cache, student, "same", 2.0) == pytest.approx(float(bucket_kl(zt, zs, ids, 2.0).mean()), rel=2e-4)
    assert "warning" not in capsys.readouterr().err
    _first_step_kd(tmp_path, cache, student, "other", 4.0)
    assert "warning: training at T=4.0 but the cache holds T=2.0" in capsys.readouterr().err


def test_eval_targets_must_be_read_as_the_training_cache_is(tmp_path, grid_caches, models, datasets_dir, tokenizer_dir):
    """--eval-targets is scored with the training objective: a held-out cache that holds the lse of the
    training T in the same place is accepted, one that would be misread is refused in one line."""
    from tests.conftest import build_model

    one = Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "t2", temperature=2.0))["out"])
    student = build_model(tmp_path / "student", CLM, tokenizer_dir, seed=5, layers=1)
    base = dict(targets=str(grid_caches[CLM]), student=str(student), alpha=1.0, max_steps=1, batch_size=64, num_workers=0,
                progress=False, save_every=0)
    run_train(TrainConfig(out=str(tmp_path / "ok"), eval_targets=str(one), temperature=2.0, **base))
    with pytest.raises(KDError, match=r"--eval-targets .* holds T=\[2.0\], the training cache T=\[2.0, 1.0, 4.0\]"):
        run_train(TrainConfig(out=str(tmp_path / "refused"), eval_targets=str(one), temperature=4.0, **base))


def test_eval_reads_the_grids_t1_lse_for_an_exact_kl(tmp_path, grid_caches, models, datasets_dir):
    """Scored from a grid cache stored at T = 2, the teacher's perplexity and a student's KL at T = 1
    equal those from a plain T = 1 cache of the same teacher (exact), not the renormalised proxy."""
    one = Path(teacher.run(tcfg(models, datasets_dir, tmp_path / "t1", temperature=1.0))["out"])
    results = {}
    for name, cache in (("grid", grid_caches[CLM]), ("t1", one)):
        m = manifest.read_cache(cache)
        rows = list(scoring.cache_rows(cache, m, None))
        student, teacher_tally = scoring.Tally(CLM, {}), scoring.Tally(CLM, {}, from_cache=True)
        logits = torch.cat(dense_logits(models[CLM], CLM, rows)).float() * 0.5  # a "student": the teacher, flattened
        student.add_model(rows, logits, float(m["stats"]["temperature"]))
        teacher_tally.add_cached_teacher(rows, float(m["stats"]["temperature"]))
        results[name] = (student.result()["kl"], teacher_tally.result()["perplexity"])
    assert results["grid"][0] == pytest.approx(results["t1"][0], rel=1e-4)
    assert results["grid"][1] == pytest.approx(results["t1"][1], rel=1e-4)
    rows = list(scoring.cache_rows(grid_caches[CLM], manifest.read_cache(grid_caches[CLM]), None))
    for r in rows:
        r["teacher"] = r["teacher"][:3]  # without the T = 1 lse: the proxy, which differs
    proxy = scoring.Tally(CLM, {})
    proxy.add_model(rows, torch.cat(dense_logits(models[CLM], CLM, rows)).float() * 0.5, 2.0)
    assert proxy.result()["kl"] != pytest.approx(results["t1"][0], rel=1e-3)


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--temperatures", "-1,2"], "positive finite"),
    (["--temperatures", "1,0"], "positive finite"),
    (["--temperatures", "1,nan"], "positive finite"),
    (["--temperatures", "1,2,1"], "lists 1 twice"),
    (["--temperatures", "1,x"], "numbers separated by commas"),
    (["--temperatures", ","], "is empty"),
    (["--temperature", "3", "--temperatures", "1,2"], "--temperature 3 is not the first of --temperatures 1,2"),
    (["--temperature", "-2"], "positive finite"),
])
def test_bad_grids_are_one_line_refusals(tmp_path, models, datasets_dir, flags, message):
    r = CliRunner().invoke(cli, ["teacher", "--model", str(models[CLM]), "--data", str(datasets_dir[CLM]), "--task-type", CLM,
                                 "--out", str(tmp_path / "o"), *flags])
    assert message in _one_line_error(r)
    assert not (tmp_path / "o").exists()


def test_grid_settings_and_readers_refuse_damage():
    assert TeacherConfig(model="m", data="d", task_type=CLM, temperatures=[2, 1.5]).resolved().temperatures == [2.0, 1.5]
    assert TeacherConfig(model="m", data="d", task_type=CLM, temperatures=" 2 ").resolved().temperatures is None
    assert TeacherConfig(model="m", data="d", task_type=CLM, temperatures="2,4", temperature=2).grid() == [2.0, 4.0]
    assert choose_lse([2.0], 3.0) == ("lse", 0, 2.0, False)
    assert choose_lse([2.0, 1.0], 1.0000000000001).exact
    for bad in ([2.0], [3.0, 1.0], [2.0, -1.0], "2,1", [2.0, math.inf]):
        with pytest.raises(KDError, match="manifest is damaged"):
            cache_grid({"temperature": 2.0, "temperatures": bad})
