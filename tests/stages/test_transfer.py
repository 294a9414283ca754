"""Transfer sets: the teacher labels text nobody labelled, and a student streams a labelled cache
and an unlabelled one as one training set (issue 10 §1)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import KDError
from stages.teacher import TeacherConfig
from stages.teacher import run as run_teacher
from stages.train import TrainConfig, run
from tests.conftest import TASK_TYPES, make_data, write_jsonl

LABELLED_ROWS, UNLABELLED_ROWS = 24, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unlabelled_data(path: Path, task_type: str, nulls: bool) -> Path:
    """The same kind of text without labels: no label column at all, or one holding nulls."""
    rows = [json.loads(line) for line in make_data(path, task_type, n=UNLABELLED_ROWS, seed=7).read_text().splitlines()]
    label = {"sequence-classification": "label", "token-classification": "ner_tags"}.get(task_type)
    for r in rows:
        r.pop(label, None)
        if nulls and label:
            r[label] = None
    return write_jsonl(path, rows)


def teacher(model: Path, data: Path, task_type: str, out: Path, **kw) -> Path:
    kw = {"max_length": 32, "top_k": 8, "temperature": 2.0, **kw}
    run_teacher(TeacherConfig(model=str(model), data=str(data), task_type=task_type, out=str(out), progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def transfer(tmp_path_factory, models) -> dict[str, tuple[Path, Path]]:
    """Per task type: (labelled cache, unlabelled cache) of one teacher."""
    root = tmp_path_factory.mktemp("transfer")
    out = {}
    for i, t in enumerate(TASK_TYPES):
        labelled = make_data(root / f"{t}-labelled.jsonl", t, n=LABELLED_ROWS)
        bare = unlabelled_data(root / f"{t}-bare.jsonl", t, nulls=i % 2 == 1)
        out[t] = (teacher(models[t], labelled, t, root / t / "labelled"), teacher(models[t], bare, t, root / t / "bare"))
    return out


def train(out: Path, targets: list[Path], teacher_dir: Path, **kw) -> dict:
    base = dict(out=str(out), targets=[str(t) for t in targets], student_from_teacher=str(teacher_dir),
                student_layers="0", epochs=1, batch_size=8, lr=1e-3, num_workers=0, progress=False, save_every=0)
    return run(TrainConfig(**{**base, **kw}))


def shard_labels(cache: Path) -> list:
    import pyarrow.parquet as pq

    return [x for p in sorted((cache / "shards").glob("*.parquet")) for x in pq.read_table(p, columns=["labels"])["labels"].to_pylist()]


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_unlabelled_caches_of_every_task_type_train_beside_labelled_ones(tmp_path, transfer, models, task_type,
                                                                         monkeypatch):
    labelled, bare = transfer[task_type]
    if task_type in ("sequence-classification", "token-classification"):
        assert all(x is None for x in shard_labels(bare))  # no hard labels were made up
    monkeypatch.setenv("KD_DEBUG_ROWS", str(tmp_path / "rows"))
    res = train(tmp_path / "s", [labelled, bare], models[task_type], epochs=2)
    assert res["complete"] and not res["reused"]
    seen = [json.loads(line) for line in (tmp_path / "rows" / "rows-rank0.jsonl").read_text().splitlines()]
    for epoch in (0, 1):  # every row of each cache exactly once per epoch (row numbers restart per cache)
        rows = Counter(r for rec in seen if rec["epoch"] == epoch for r in rec["rows"])
        assert rows == Counter(range(LABELLED_ROWS)) + Counter(range(UNLABELLED_ROWS))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    keys = [json.loads((c / "manifest.json").read_text())["key"] for c in (labelled, bare)]
    assert [(u["path"], u["key"]) for u in m["upstream"] if u["kind"] == "targets"] == \
        [(str(labelled.resolve()), keys[0]), (str(bare.resolve()), keys[1])]
    assert m["config"]["targets"] == [str(labelled), str(bare)]


@pytest.mark.parametrize("task_type", ["sequence-classification", "token-classification"])
def test_rows_without_labels_add_only_to_the_kd_term(tmp_path, transfer, models, task_type):
    """One step over every row: the CE is the mean over the labelled rows alone (the unlabelled ones
    neither add to it nor dilute it), while the KD term sees all rows."""
    labelled, bare = transfer[task_type]
    student = tmp_path / "no-dropout"  # the teacher without dropout: both runs see the same function of the rows
    shutil.copytree(models[task_type], student)
    conf = json.loads((student / "config.json").read_text())
    conf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (student / "config.json").write_text(json.dumps(conf))
    kw = dict(max_steps=1, batch_size=64, alpha=0.5)
    both = train(tmp_path / "both", [labelled, bare], student, **kw)
    alone = train(tmp_path / "alone", [labelled], student, **kw)
    first = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("both", "alone")]
    assert first[0]["ce"] == pytest.approx(first[1]["ce"], rel=1e-5)
    assert first[0]["positions"] > first[1]["positions"]  # the KD term's rows: all of them
    assert both["key"] != alone["key"]


def test_one_cache_keeps_the_key_it_had_before(tmp_path, transfer, models):
    """A single --targets is recorded as the one path it always was: existing students are reused."""
    labelled, _ = transfer["sequence-classification"]
    a = train(tmp_path / "s", [labelled], models["sequence-classification"], max_steps=1)
    b = run(TrainConfig(out=str(tmp_path / "s"), targets=str(labelled), student_from_teacher=str(models["sequence-classification"]),
                        student_layers="0", epochs=1, batch_size=8, lr=1e-3, num_workers=0, progress=False, save_every=0,
                        max_steps=1))
    assert b["reused"] and a["key"] == b["key"]
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["config"]["targets"] == str(labelled)


def test_caches_of_another_temperature_or_task_are_refused_naming_the_field(tmp_path, transfer, models, datasets_dir):
    labelled, bare = transfer["sequence-classification"]
    hot = teacher(models["sequence-classification"], datasets_dir["sequence-classification"], "sequence-classification",
                  tmp_path / "hot", temperature=4.0)
    with pytest.raises(KDError, match=r"differs from .* in its temperature \(4.0 vs 2.0\)"):
        train(tmp_path / "s", [labelled, hot], models["sequence-classification"])
    with pytest.raises(KDError, match=r"in its task type \(token-classification vs sequence-classification\)"):
        train(tmp_path / "t", [labelled, transfer["token-classification"][0]], models["sequence-classification"])
    other = tmp_path / "other-teacher"  # the same architecture and tokenizer, other weights
    shutil.copytree(models["sequence-classification"], other)
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    stranger = teacher(other, datasets_dir["sequence-classification"], "sequence-classification", tmp_path / "stranger")
    with pytest.raises(KDError, match=r"in its teacher \("):
        train(tmp_path / "s", [labelled, stranger], models["sequence-classification"])
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_the_cli_and_yaml_take_several_caches(tmp_path, transfer, models):
    labelled, bare = transfer["causal-lm"]
    flags = ["--student-from-teacher", str(models["causal-lm"]), "--student-layers", "0", "--max-steps", "2",
             "--batch-size", "4", "--num-workers", "0"]
    r = CliRunner().invoke(cli, ["train", "--targets", str(labelled), "--targets", str(bare), "--out", str(tmp_path / "a"), *flags])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "a" / "manifest.json").read_text())["upstream"]) == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"targets: [{labelled}, {bare}]\n")
    r = CliRunner().invoke(cli, ["train", "--config", str(cfg), "--out", str(tmp_path / "a"), *flags])
    assert r.exit_code == 0 and '"reused": true' in r.output, r.output
