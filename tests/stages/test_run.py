"""`kd run`: one YAML, every stage in order; a second run does no work; a bad YAML fails
before any stage runs, naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import KDError
from stages import run as run_stage

SEQ = "sequence-classification"


def pipeline_yaml(tmp_path: Path, models, datasets_dir, **changes) -> Path:
    doc = {
        "name": "tiny",
        "workdir": str(tmp_path / "work"),
        "task_type": SEQ,
        "data": {"train": str(datasets_dir[SEQ]), "test": str(datasets_dir[SEQ]), "limit": {"train": 24, "test": 16}},
        "teacher": {"model": str(models[SEQ]),
                    "finetune": {"max_steps": 2, "batch_size": 8, "max_length": 32, "save_every": 100}},
        "targets": {"top_k": 2, "temperature": 2.0, "max_length": 32},
        "students": [{"name": "small", "student_from_teacher": True, "student_layers": [0], "alpha": 0.8,
                      "max_steps": 2, "batch_size": 8, "save_every": 100}],
        "eval": {"split": "test", "timing_examples": 2},
    }
    for k, v in changes.items():
        doc[k] = v
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_twice_second_does_no_work(tmp_path, models, datasets_dir, capsys):
    path = pipeline_yaml(tmp_path, models, datasets_dir)
    first = run_stage.run(str(path), progress=False)
    assert len(first["ran"]) == 5 and not first["reused"]  # finetune, 2 caches, 1 student, eval
    report = Path(first["report"])
    assert report.exists() and "small" in report.read_text()
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*") if p.is_file()}
    capsys.readouterr()
    second = run_stage.run(str(path), progress=False)
    assert second["ran"] == [] and len(second["reused"]) == 5
    assert "nothing to do" in capsys.readouterr().err
    assert files == {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*") if p.is_file()}


@pytest.mark.parametrize("change, message", [
    ({"targets": {"top_k": 2, "tempreature": 2.0}}, "unknown key 'tempreature' in targets"),
    ({"colour": "blue"}, "unknown key 'colour' in the top level"),
    ({"students": [{"name": "s", "student_from_teacher": True, "student_layers": [0], "alpah": 1}]}, "unknown key 'alpah'"),
    ({"data": {"train": "./missing.jsonl"}}, "data.train './missing.jsonl' does not exist"),
    ({"teacher": {"model": "./no-such-model"}}, "teacher.model './no-such-model' does not exist"),
    ({"students": [{"student_layers": [0]}]}, "students[0] needs a name"),
])
def test_bad_yaml_fails_before_any_stage(tmp_path, models, datasets_dir, change, message, monkeypatch):
    from stages import teacher, train

    def forbidden(*a, **k):
        raise AssertionError("a stage ran although the YAML is bad")

    monkeypatch.setattr(teacher, "run", forbidden)
    monkeypatch.setattr(train, "run", forbidden)
    path = pipeline_yaml(tmp_path, models, datasets_dir, **change)
    with pytest.raises(KDError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        run_stage.run(str(path), progress=False)
    assert not (tmp_path / "work").exists()
    r = CliRunner().invoke(cli, ["run", str(path)])
    assert r.exit_code != 0 and message in r.output


def test_dry_run_lists_steps(tmp_path, models, datasets_dir):
    path = pipeline_yaml(tmp_path, models, datasets_dir)
    r = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "stage 1: teacher targets for train" in r.output and "stage 3: evaluation" in r.output
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("flag", ["--out", "--workdir"])
def test_out_or_workdir_moves_every_output(tmp_path, models, datasets_dir, flag):
    path = pipeline_yaml(tmp_path, models, datasets_dir)
    r = CliRunner().invoke(cli, ["run", str(path), "--dry-run", flag, str(tmp_path / "elsewhere")])
    assert r.exit_code == 0, r.output
    assert f"-> {tmp_path / 'elsewhere' / 'targets' / 'train'}" in r.output
    assert not (tmp_path / "work").exists() and not (tmp_path / "elsewhere").exists()
