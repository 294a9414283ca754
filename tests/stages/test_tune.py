"""`kd tune` end to end on tiny models: every output written and consistent with the points'
own students and evaluations, the best point the one with the best validation metric, a rerun
that trains nothing, finished points reused, an array task that trains only its point, the
refusals (bad grids, a validation cache of another teacher or task), an unlabelled validation
cache ranked by KL, `kd slurm tune`'s scripts, and `kd run` with a `tune:` block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from pipeline import io, runfile, tuning
from pipeline.cli import cli
from pipeline.config import TuneConfig, build
from pipeline.errors import KDError
from pipeline.slurm import default_kd
from stages import evaluate, teacher, train
from stages import run as run_stage
from stages.teacher import TeacherConfig
from stages.tune import run
from tests.conftest import build_model, make_data, sentences, write_jsonl
from tests.pipeline.test_slurm import exec_argv, heredoc, sbatch_flags
from tests.stages.test_run import pipeline_yaml

SEQ, TOK = "sequence-classification", "token-classification"
GRID = ["T1-a0.5-kl", "T1-a1-kl", "T2-a0.5-kl", "T2-a1-kl"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory, models, tokenizer_dir):
    """Caches of one teacher: train (T = 2), validation, an unlabelled validation split; and
    validation caches of another teacher and of another task, which tune must refuse."""
    root = tmp_path_factory.mktemp("tune")
    unlabelled = write_jsonl(root / "unlabelled.jsonl", [{"id": f"u{i}", "text": " ".join(s)}
                                                         for i, s in enumerate(sentences(16, seed=5))])
    other = build_model(root / "other-teacher", SEQ, tokenizer_dir, seed=7)
    specs = {"train": (models[SEQ], make_data(root / "train.jsonl", SEQ, n=40, seed=0), SEQ, "train"),
             "val": (models[SEQ], make_data(root / "val.jsonl", SEQ, n=24, seed=3), SEQ, "validation"),
             "unlabelled": (models[SEQ], unlabelled, SEQ, "validation"),
             "other-teacher": (other, root / "val.jsonl", SEQ, "validation"),
             "other-task": (models[TOK], make_data(root / "tok.jsonl", TOK, n=8), TOK, "validation")}
    caches = {}
    for name, (model, data, task, split) in specs.items():
        caches[name] = root / "caches" / name
        teacher.run(TeacherConfig(model=str(model), data=str(data), task_type=task, split=split, out=str(caches[name]),
                                  max_length=32, top_k=8, temperature=2.0, progress=False))
    return {"root": root, "caches": caches, "teacher": models[SEQ]}


def settings(env, out, **kw) -> dict:
    return {"targets": [str(env["caches"]["train"])], "eval_targets": str(env["caches"]["val"]), "out": str(out),
            "temperatures": "1,2", "alphas": "0.5,1.0", "student_from_teacher": str(env["teacher"]), "student_layers": "0",
            "max_steps": 3, "batch_size": 8, "lr": 3e-3, "num_workers": 0, "save_every": 0, "progress": False, **kw}


def tune(env, out, **kw) -> dict:
    return run(build(TuneConfig, settings(env, out, **kw), "test"))


def cli_args(env, out, **kw) -> list[str]:
    args = []
    for k, v in settings(env, out, **kw).items():
        if k == "progress":
            continue
        for value in (v if isinstance(v, list) else [v]):
            args += ["--" + k.replace("_", "-"), str(value)]
    return args


@pytest.fixture(scope="module")
def done(env):
    """One 2 x 2 tune, run once and read by the tests below (which never change it)."""
    out = env["root"] / "tune"
    return out, tune(env, out)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def files_under(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def forbid_work(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a student was trained or evaluated")

    monkeypatch.setattr(train, "run", forbidden)
    monkeypatch.setattr(evaluate, "run", forbidden)


def test_tune_writes_every_output(env, done):
    out, result = done
    assert result["complete"] and not result["reused"] and result["points"] == 4 and result["trained"] == GRID
    df = pl.read_parquet(out / "tune.parquet")
    assert df.columns == list(tuning.COLUMNS) and sorted(df["name"].to_list()) == GRID
    assert df["rank"].to_list() == [1, 2, 3, 4] and df["best"].to_list() == [True, False, False, False]
    assert set(df["metric"].to_list()) == {"accuracy"}
    for row in df.iter_rows(named=True):  # each row is its point's own student and evaluation
        student, evaluation = out / "points" / row["name"], out / "evals" / row["name"]
        assert row["student"] == str(student) and row["evaluation"] == str(evaluation)
        m = read_json(student / "manifest.json")
        assert m["kind"] == "student" and m["stats"]["steps"] == row["steps"] == 3
        assert (m["config"]["temperature"], m["config"]["alpha"], m["config"]["loss"]) == (row["temperature"], row["alpha"], "kl")
        assert m["stats"]["wall_seconds"] == row["wall_seconds"]
        scored = pl.read_parquet(evaluation / "metrics.parquet").filter(pl.col("role") == "student").row(0, named=True)
        assert (scored["accuracy"], scored["agreement"], scored["kl"]) == (row["value"], row["agreement"], row["kl"])
        assert scored["model"] == str(student)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    best = df.row(0, named=True)
    assert f"**Best point: `{best['name']}`**" in text and f"Its student: `{out / 'points' / best['name']}`" in text
    assert "validation accuracy" in text and "(heatmap.png)" in text
    m = read_json(out / "manifest.json")
    assert m["kind"] == "tune" and m["key"] == result["key"] and m["stats"]["best"]["name"] == best["name"]
    assert [f["path"] for f in m["files"]] == sorted(tuning.OUTPUTS)
    assert all(f["sha256"] == io.sha256_file(out / f["path"]) for f in m["files"])
    cache_keys = {read_json(env["caches"][c] / "manifest.json")["key"] for c in ("train", "val")}
    assert {u["key"] for u in m["upstream"] if u["kind"] == "targets"} == cache_keys
    for kind, sub in (("student", "points"), ("evaluation", "evals")):
        assert sorted((u["point"], u["key"]) for u in m["upstream"] if u["kind"] == kind) == \
            [(n, read_json(out / sub / n / "manifest.json")["key"]) for n in GRID]
    leftovers = [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".kd-task-")) or p.name == "checkpoints"]
    assert not leftovers


def test_best_point_has_the_best_validation_metric(done):
    out, result = done
    rows = pl.read_parquet(out / "tune.parquet").to_dicts()
    # best accuracy; ties to the lower KL, then to the earlier grid point
    want = min(rows, key=lambda r: (-r["value"], r["kl"], GRID.index(r["name"])))
    assert want["value"] == max(r["value"] for r in rows)
    assert result["best"] == want["name"] and next(r for r in rows if r["best"])["name"] == want["name"]
    assert result["student"] == str(out / "points" / want["name"]) and result["value"] == want["value"]


def test_rerun_does_no_training(env, done, monkeypatch):
    out, result = done
    before = files_under(out)
    forbid_work(monkeypatch)
    r = CliRunner().invoke(cli, ["tune", *cli_args(env, out)])
    assert r.exit_code == 0, r.output
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["reused"] and line["trained"] == [] and line["best"] == result["best"] and line["key"] == result["key"]
    assert files_under(out) == before


def test_finished_points_are_reused_and_the_measured_best_wins(env, done, tmp_path):
    """Outputs gone, points kept: a rerun trains nothing. A point whose validation score is the
    best (here made so by rewriting its evaluation) becomes the best point, whatever the folklore."""
    out = tmp_path / "copy"
    shutil.copytree(done[0], out)
    for name in ("manifest.json", "tune.parquet", "report.md"):
        (out / name).unlink()
    first = tune(env, out)
    assert first["trained"] == [] and not first["reused"] and first["key"] == done[1]["key"]
    loser = pl.read_parquet(out / "tune.parquet")["name"].to_list()[-1]
    metrics = out / "evals" / loser / "metrics.parquet"
    df = pl.read_parquet(metrics)
    df = df.with_columns(pl.when(pl.col("role") == "student").then(0.999).otherwise(pl.col("accuracy")).alias("accuracy"))
    df.write_parquet(metrics)
    m = read_json(out / "evals" / loser / "manifest.json")
    for f in m["files"]:
        if f["path"] == "metrics.parquet":
            f.update(bytes=metrics.stat().st_size, sha256=io.sha256_file(metrics))
    io.write_json(out / "evals" / loser / "manifest.json", m)
    (out / "manifest.json").unlink()
    second = tune(env, out)
    assert second["trained"] == [] and second["best"] == loser and second["value"] == 0.999
    assert f"**Best point: `{loser}`**" in (out / "report.md").read_text()


def test_an_array_task_trains_only_its_point(env, tmp_path, monkeypatch):
    out = tmp_path / "t"
    r = tune(env, out, temperatures="2", task_index=1)
    assert r["point"] == "T2-a1-kl" and r["trained"] and not r["reused"]
    assert sorted(p.name for p in (out / "points").iterdir()) == ["T2-a1-kl"]
    assert (out / "points" / "T2-a1-kl" / "manifest.json").exists() and (out / "evals" / "T2-a1-kl" / "manifest.json").exists()
    assert not (out / "manifest.json").exists() and not (out / "tune.parquet").exists()
    # kd slurm tune now sends out only the other point
    s = CliRunner().invoke(cli, ["slurm", "tune", "--", *cli_args(env, out, temperatures="2")])
    assert s.exit_code == 0, s.output
    assert sbatch_flags(heredoc(s.output, "KD_ARRAY"))[1] == "--array=0"
    # inside a job array without --task-index the index comes from the array variables
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    again = tune(env, out, temperatures="2")
    assert again["point"] == "T2-a1-kl" and again["reused"]
    with pytest.raises(KDError, match=r"the grid has 2 points \(array tasks 0..1\)"):
        tune(env, out, temperatures="2", task_index=2)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    whole = tune(env, out, temperatures="2")
    assert whole["trained"] == ["T2-a0.5-kl"] and (out / "manifest.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"temperatures": "0,2"}, "--temperatures must be positive finite numbers, got 0"),
    ({"temperatures": ""}, "--temperatures is empty"),
    ({"alphas": "0.5,1.5"}, r"--alphas must each be in \[0, 1\], got 1.5"),
    ({"losses": "kl,nope"}, "unknown loss 'nope' in --losses"),
    ({"alphas": "1,1.0"}, "--alphas lists 1 twice"),
    ({"eval_targets": "other-teacher"}, "differs from --targets .* in its teacher"),
    ({"eval_targets": "other-task"}, "differs from --targets .* in its task type"),
    ({"eval_targets": "missing"}, "does not exist"),
    ({"lr": -1.0}, "--lr must be a positive finite number"),
])
def test_bad_input_is_refused_before_any_training(env, tmp_path, monkeypatch, change, message):
    out = tmp_path / "out"
    if "eval_targets" in change:
        change = {"eval_targets": str(env["caches"].get(change["eval_targets"], tmp_path / "missing"))}
    if "lr" not in change:
        forbid_work(monkeypatch)
    with pytest.raises(KDError, match=message):
        tune(env, out, **change)
    assert not out.exists() or not list((out / "points").glob("*/manifest.json"))
    r = CliRunner().invoke(cli, ["tune", *cli_args(env, out, **change)])
    assert r.exit_code != 0 and r.stderr.strip().splitlines()[-1].startswith("Error: ")  # one line, last
    assert len(r.stderr.strip().splitlines()) == (2 if "lr" in change else 1)  # lr: the first point's train refuses it


def test_an_output_of_another_stage_is_refused(env, done, monkeypatch):
    forbid_work(monkeypatch)
    with pytest.raises(KDError, match="holds the output of another kd stage"):
        tune(env, done[0] / "points" / "T1-a1-kl")


def test_unlabelled_validation_cache_is_ranked_by_kl(env, done, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(done[0], out)
    r = tune(env, out, eval_targets=str(env["caches"]["unlabelled"]))
    assert r["trained"] == [] and r["key"] != done[1]["key"] and r["metric"] == "kl"  # same students, new scores
    rows = pl.read_parquet(out / "tune.parquet").to_dicts()
    assert {x["metric"] for x in rows} == {"kl"} and r["value"] == min(x["kl"] for x in rows) == rows[0]["value"]
    assert "no labels" in (out / "report.md").read_text()


def test_slurm_tune_script(env, done, tmp_path):
    out = tmp_path / "grid"
    args = cli_args(env, out)
    r = CliRunner().invoke(cli, ["slurm", "tune", "-M", "2", "--gpus", "1", "--mem", "8G", "--time", "1:00:00", "--", *args])
    assert r.exit_code == 0, r.output
    array, after = heredoc(r.output, "KD_ARRAY"), heredoc(r.output, "KD_AFTER")
    assert "--array=0-3%2" in sbatch_flags(array) and "--gres=gpu:1" in sbatch_flags(array)
    assert exec_argv(array) == [default_kd(), "tune", *args, "--task-index", "$task"]  # the count is the grid's
    assert exec_argv(after) == [default_kd(), "tune", *args]
    assert "--dependency=afterok:$array" in r.output
    flags = sbatch_flags(after)
    assert "--time=1:00:00" in flags and "--mem=8G" in flags and not any(f.startswith("--gres") for f in flags)
    assert not out.exists(), "printing a script must not create the output"
    assert "grid has 4 points" in CliRunner().invoke(cli, ["slurm", "tune", "--num-tasks", "3", "--", *args]).output
    assert "drop --task-index" in CliRunner().invoke(cli, ["slurm", "tune", "--", *args, "--task-index", "1"]).output
    complete = CliRunner().invoke(cli, ["slurm", "tune", "--", *cli_args(env, done[0])])
    assert complete.exit_code == 0 and complete.stdout == "" and "already complete" in complete.stderr


def test_slurm_tune_scripts_run_as_the_cluster_would(env, tmp_path):
    """No sbatch here: run the array script with bash for each task, as SLURM would, then the
    dependent job's script; the grid ends complete, each point trained by its own task."""
    import os
    import subprocess

    out = tmp_path / "grid"
    r = CliRunner().invoke(cli, ["slurm", "tune", "--", *cli_args(env, out, temperatures="2")])
    array, after = heredoc(r.output, "KD_ARRAY"), heredoc(r.output, "KD_AFTER")
    base = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for task in (1, 0):
        proc = subprocess.run(["bash", "-c", array], env={**base, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_JOB_ID": "7",
                                                         "SLURM_ARRAY_TASK_COUNT": "2"}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        assert line["task_index"] == task and line["point"] == ["T2-a0.5-kl", "T2-a1-kl"][task] and line["trained"]
        assert not (out / "manifest.json").exists()
    proc = subprocess.run(["bash", "-c", after], env=base, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["complete"] and line["trained"] == [] and line["points"] == 2
    assert read_json(out / "manifest.json")["kind"] == "tune"


def tune_pipeline(tmp_path, models, datasets_dir, **tune_block) -> Path:
    path = pipeline_yaml(tmp_path, models, datasets_dir, tune={"temperatures": "1,2", "alphas": [0.5, 1.0],
                                                               "student_from_teacher": True, "student_layers": [0],
                                                               "max_steps": 2, **tune_block})
    doc = yaml.safe_load(path.read_text())
    doc["data"]["validation"] = doc["data"]["test"]
    path.write_text(yaml.safe_dump(doc))
    return path


def test_kd_run_with_a_tune_block(tmp_path, models, datasets_dir, monkeypatch):
    path = tune_pipeline(tmp_path, models, datasets_dir)
    plan = runfile.load(path)
    work = tmp_path / "work"
    assert plan.tune.out == str(work / "tune") and plan.tune.eval_targets == str(work / "targets" / "validation")
    assert plan.tune.targets == [str(work / "targets" / "train")]
    assert plan.tune.student_from_teacher == str(work / "teacher") and plan.tune.max_steps == 2
    r = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "stage 2: tune T, alpha and loss on the validation cache -> " + str(work / "tune") in r.output
    calls = []
    for mod, name in ((teacher, "teacher"), (train, "train"), (evaluate, "eval")):
        monkeypatch.setattr(mod, "run", lambda cfg, name=name: calls.append(name) or {})
    from stages import tune as tune_stage

    monkeypatch.setattr(tune_stage, "run", lambda cfg: calls.append(("tune", cfg.out)) or {})
    run_stage.run(str(path), progress=False)
    assert calls == ["train", "teacher", "teacher", "teacher", "train", ("tune", str(work / "tune")), "eval"]


@pytest.mark.parametrize("block, message", [
    ({"alpah": 1}, "unknown key 'alpah' in tune"),
    ({"task_index": 1}, "unknown key 'task_index' in tune"),
    ({"temperatures": "0"}, "tune: --temperatures must be positive finite numbers, got 0"),
    ({"losses": ["kl", "nope"]}, "tune: unknown loss 'nope'"),
])
def test_kd_run_tune_block_is_checked(tmp_path, models, datasets_dir, block, message):
    path = tune_pipeline(tmp_path, models, datasets_dir, **block)
    with pytest.raises(KDError, match=message):
        runfile.load(path)


def test_kd_run_tune_needs_a_validation_split(tmp_path, models, datasets_dir):
    path = pipeline_yaml(tmp_path, models, datasets_dir, tune={"temperatures": "1,2"})
    with pytest.raises(KDError, match="add data.validation"):
        runfile.load(path)


def test_kd_run_trains_a_from_tune_student_at_the_best_point_after_the_grid(tmp_path, models, datasets_dir):
    """End to end on tiny models: the grid runs first, its best (T, alpha, loss) becomes the
    from_tune student's settings, and the evaluation scores that student and the grid's best."""
    path = tune_pipeline(tmp_path, models, datasets_dir)
    doc = yaml.safe_load(path.read_text())
    doc["students"].append({"name": "picked", "student_from_teacher": True, "student_layers": [0], "from_tune": True,
                            "max_steps": 2, "batch_size": 8, "save_every": 100})
    path.write_text(yaml.safe_dump(doc))
    first = run_stage.run(str(path), progress=False)
    titles = first["ran"]
    assert titles.index("stage 2: student picked (T, alpha, loss of the tune's best point)") == \
        titles.index("stage 2: tune T, alpha and loss on the validation cache") + 1
    work = tmp_path / "work"
    best = read_json(work / "tune" / "manifest.json")["stats"]["best"]
    picked = read_json(work / "students" / "picked" / "manifest.json")["config"]
    assert (picked["temperature"], picked["alpha"], picked["loss"]) == (best["temperature"], best["alpha"], best["loss"])
    metrics = pl.read_parquet(work / "eval" / "metrics.parquet")
    assert metrics["name"].to_list() == ["teacher", "small", "picked", best["name"]]
    second = run_stage.run(str(path), progress=False)
    assert second["ran"] == [] and len(second["reused"]) == len(titles)
