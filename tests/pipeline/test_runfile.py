"""The `kd run` pipeline YAML -> stage configs (runfile.load runs nothing; it only checks and wires)."""

from pathlib import Path

import pytest

from pipeline import runfile
from pipeline.errors import KDError

SPLITS = ("train", "validation", "test")


@pytest.fixture
def where(tmp_path, monkeypatch):
    """A folder holding the YAML, its data files and a teacher folder; the process runs elsewhere,
    so that a path resolved against the working directory instead of the YAML's shows."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    for s in SPLITS:
        (cfg / f"{s}.jsonl").write_text("")
    (cfg / "teacher").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return cfg


def load(cfg: Path, text: str, name="p.yaml", **kw):
    path = cfg / name
    path.write_text(text, encoding="utf-8")
    return runfile.load(path, **kw)


def refused(cfg: Path, text: str, pattern: str):
    with pytest.raises(KDError, match=pattern) as info:
        load(cfg, text)
    assert "\n" not in str(info.value)
    return str(info.value)


BASE = """\
task_type: sequence-classification
data: {train: train.jsonl, validation: validation.jsonl, test: test.jsonl}
teacher: {model: teacher}
"""


def test_minimal_pipeline_is_wired(where, tmp_path):
    work = tmp_path / "work"
    plan = load(where, f"""\
name: demo
workdir: {work}
task-type: sequence-classification
data:
  train: train.jsonl
  validation: validation.jsonl
  test: test.jsonl
  text-column: sentence
  label_column: label
  limit: 100
teacher:
  model: teacher
targets:
  top-k: 2
  temperature: 2.0
students:
  - name: small
    student: teacher
    alpha: 0.9
  - name: tiny
    student: teacher
    student-layers: [0]
eval:
  split: test
  batch_size: 8
""")
    assert plan.name == "demo" and Path(plan.workdir) == work and plan.finetune is None

    assert sorted(plan.targets) == sorted(SPLITS)
    for split, t in plan.targets.items():
        assert t.model == str(where / "teacher")
        assert t.data == str(where / f"{split}.jsonl") and t.split == split
        assert t.task_type == "sequence-classification" and t.limit == 100
        assert (t.text_column, t.label_column) == ("sentence", "label")
        assert (t.top_k, t.temperature) == (2, 2.0)
        assert t.cache_root == str(work / "caches")
        assert t.out == str(work / "targets" / split)

    assert [n for n, _ in plan.students] == ["small", "tiny"]
    small, tiny = (c for _, c in plan.students)
    assert small.out == str(work / "students" / "small") and tiny.out == str(work / "students" / "tiny")
    for c in (small, tiny):
        assert c.targets == [str(work / "targets" / "train")]
        assert c.eval_targets == str(work / "targets" / "validation")
        assert c.student == str(where / "teacher")
    assert small.alpha == 0.9 and tiny.student_layers == [0]

    ev = plan.evaluation
    assert ev.model == [str(work / "students" / "small"), str(work / "students" / "tiny")]
    assert ev.data == str(where / "test.jsonl") and ev.split == "test"
    assert ev.targets == str(work / "targets" / "test")
    assert ev.task_type == "sequence-classification"
    assert (ev.text_column, ev.label_column, ev.batch_size) == ("sentence", "label", 8)
    assert ev.out == str(work / "eval")


def test_defaults_without_optional_sections(where):
    plan = load(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: teacher}\n", name="lm.yaml")
    assert plan.name == "lm"
    assert Path(plan.workdir).parts[-2:] == ("runs", "lm")
    assert list(plan.targets) == ["train"]
    assert plan.targets["train"].limit is None and plan.targets["train"].top_k == 32
    assert plan.students == [] and plan.evaluation is None and plan.finetune is None


def test_workdir_argument_wins(where, tmp_path):
    plan = load(where, BASE + "workdir: ignored\nstudents: [{name: s}]\n", workdir=str(tmp_path / "w"))
    assert Path(plan.workdir) == tmp_path / "w"
    assert plan.students[0][1].out == str(tmp_path / "w" / "students" / "s")


def test_limit_per_split_and_no_validation(where, tmp_path):
    plan = load(where, f"""\
task_type: sequence-classification
workdir: {tmp_path / "w"}
data: {{train: train.jsonl, test: test.jsonl, limit: {{train: 50}}}}
teacher: {{model: teacher}}
students: [{{name: s}}]
eval: {{}}
""")
    assert plan.targets["train"].limit == 50 and plan.targets["test"].limit is None
    assert plan.students[0][1].eval_targets is None  # no validation split, no validation cache
    assert plan.evaluation.split == "test"  # the default


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,pattern", [
    ("studnets: []\n", r"unknown key 'studnets' in the top level"),
    ("targets: {topk: 2}\n", r"unknown key 'topk' in targets"),
    ("eval: {bach_size: 2}\n", r"unknown key 'bach_size' in eval"),
    ("students: [{name: s, alpah: 0.1}]\n", r"unknown key 'alpah' in students\[0\] \(s\)"),
])
def test_unknown_keys_are_named(where, extra, pattern):
    refused(where, BASE + extra, pattern)


def test_unknown_key_in_data_and_teacher(where):
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl, trian: x}\nteacher: {model: teacher}\n",
            r"unknown key 'trian' in data \(allowed: .*train")
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: teacher, modle: x}\n",
            r"unknown key 'modle' in teacher")


def test_required_keys(where):
    refused(where, "data: {train: train.jsonl}\nteacher: {model: teacher}\n", r"task_type is required")
    refused(where, "task_type: causal-lm\ndata: {test: test.jsonl}\nteacher: {model: teacher}\n",
            r"data\.train is required")
    refused(where, "task_type: causal-lm\nteacher: {model: teacher}\n", r"data\.train is required")
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\n", r"teacher\.model is required")
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {finetune: {}}\n",
            r"teacher\.model is required")


def test_student_without_a_name(where):
    refused(where, BASE + "students: [{name: a}, {alpha: 0.5}]\n", r"students\[1\] needs a name")


def test_duplicate_student_names(where):
    refused(where, BASE + "students: [{name: a}, {name: b}, {name: a, alpha: 0.1}]\n", r"two students share a name")


def test_eval_split_must_be_a_data_split(where):
    refused(where, BASE + "eval: {split: dev}\n", r"eval\.split 'dev' is not one of the data splits \(train, validation, test\)")
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: teacher}\neval: {}\n",
            r"eval\.split 'test' is not one of the data splits \(train\)")


def test_not_a_file_not_yaml_not_a_mapping(where):
    with pytest.raises(KDError, match=r"cannot read pipeline file"):
        runfile.load(where / "absent.yaml")
    refused(where, "task_type: [causal-lm\n", r"is not valid YAML")
    refused(where, "- task_type: causal-lm\n", r"must be a mapping")
    refused(where, BASE + "students: [lr]\n", r"students\[0\] must be a mapping")


# --- the teacher and student_from_teacher ----------------------------------------------------------

def test_student_from_teacher_true_is_the_teacher(where, tmp_path):
    plan = load(where, BASE + f"workdir: {tmp_path / 'w'}\nstudents: [{{name: s, student_from_teacher: true}}]\n")
    assert plan.students[0][1].student_from_teacher == str(where / "teacher")


def test_student_from_teacher_true_is_the_finetuned_teacher(where, tmp_path):
    work = tmp_path / "w"
    plan = load(where, f"""\
task_type: sequence-classification
workdir: {work}
data: {{train: train.jsonl, test: test.jsonl, label-column: y, limit: 7}}
teacher:
  model: teacher
  finetune: {{labels: [neg, pos], epochs: 2, lr: 0.001}}
students:
  - {{name: cut, student-from-teacher: true, student_layers: [0, 2]}}
""")
    ft = plan.finetune
    assert ft.out == str(work / "teacher")
    assert ft.student == str(where / "teacher") and ft.targets is None
    assert (ft.data, ft.split, ft.task_type) == (str(where / "train.jsonl"), "train", "sequence-classification")
    assert (ft.labels, ft.epochs, ft.lr, ft.label_column, ft.limit) == (["neg", "pos"], 2, 0.001, "y", 7)
    assert all(t.model == str(work / "teacher") for t in plan.targets.values())
    cut = plan.students[0][1]
    assert cut.student_from_teacher == str(work / "teacher") and cut.student_layers == [0, 2]


def test_unknown_key_in_finetune(where):
    refused(where, BASE.replace("{model: teacher}", "{model: teacher, finetune: {epoch: 2}}"),
            r"unknown key 'epoch' in teacher\.finetune")


# --- paths ---------------------------------------------------------------------------------------------

def test_relative_paths_are_relative_to_the_yaml(where, tmp_path):
    (where / "data").mkdir()
    (where / "data" / "train.jsonl").write_text("")
    (tmp_path / "models" / "big").mkdir(parents=True)
    (tmp_path / "models" / "small").mkdir(parents=True)
    plan = load(where, f"""\
task_type: causal-lm
workdir: {tmp_path / "w"}
data: {{train: data/train.jsonl}}
teacher: {{model: ../models/big}}
students: [{{name: s, student: ../models/small}}, {{name: hub, student: org/some-model}}]
""")
    assert plan.targets["train"].data == str(where / "data" / "train.jsonl")
    assert Path(plan.targets["train"].model).resolve() == tmp_path / "models" / "big"
    assert Path(plan.students[0][1].student).resolve() == tmp_path / "models" / "small"
    assert plan.students[1][1].student == "org/some-model"  # not a file: a hub id, kept as written


def test_existing_relative_workdir_is_relative_to_the_yaml(where):
    (where / "out").mkdir()
    plan = load(where, BASE + "workdir: out\n")
    assert Path(plan.workdir) == where / "out"


def test_missing_explicit_path_is_refused(where):
    refused(where, "task_type: causal-lm\ndata: {train: ./trian.jsonl}\nteacher: {model: teacher}\n",
            r"data\.train '\./trian\.jsonl' does not exist")
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: ../no/teacher}\n",
            r"teacher\.model '\.\./no/teacher' does not exist")


def test_python_package_prefix(where):
    import pipeline

    plan = load(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: 'python-package:pipeline'}\n")
    assert Path(plan.targets["train"].model) == Path(pipeline.__file__).parent
    msg = refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\n"
                         "teacher: {model: 'python-package:no_such_kd_package/model'}\n",
                  r"teacher\.model names package 'no_such_kd_package', which is not installed")
    assert "pip install" in msg
    refused(where, "task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: 'python-package:pipeline/no-model'}\n",
            r"teacher\.model 'python-package:pipeline/no-model': .* does not exist")


def test_new_relative_workdir_is_relative_to_the_yaml(where):
    plan = load(where, BASE + "workdir: out\ntargets: {cache-root: caches}\n")
    assert Path(plan.workdir).is_absolute() and Path(plan.workdir) == where / "out"
    assert Path(plan.targets["train"].cache_root) == where / "caches"


def test_student_from_teacher_path_is_relative_to_the_yaml(where, tmp_path):
    plan = load(where, BASE + f"workdir: {tmp_path / 'w'}\nstudents: [{{name: s, student_from_teacher: teacher}}]\n")
    assert plan.students[0][1].student_from_teacher == str(where / "teacher")


TRANSFER = """\
task_type: sequence-classification
workdir: {work}
data: {{train: train.jsonl, transfer: transfer.jsonl, validation: validation.jsonl, test: test.jsonl,
       label_column: label}}
teacher: {{model: teacher}}
students:
  - {{name: both, student: teacher}}
  - {{name: labelled-only, student: teacher, transfer: false}}
tune: {{student: teacher, temperatures: [1, 2], alphas: [1.0]}}
"""


def test_a_transfer_split_is_cached_without_its_labels_and_streamed_by_default(where, tmp_path):
    (where / "transfer.jsonl").write_text("")
    work = tmp_path / "work"
    plan = load(where, TRANSFER.format(work=work))
    assert list(plan.targets) == ["train", "transfer", "validation", "test"]
    assert plan.targets["transfer"].out == str(work / "targets" / "transfer")
    assert plan.targets["transfer"].label_column is None  # unlabelled text need not have the column
    assert plan.targets["train"].label_column == "label"
    (_, both), (_, labelled) = plan.students
    assert both.targets == [str(work / "targets" / "train"), str(work / "targets" / "transfer")]
    assert labelled.targets == [str(work / "targets" / "train")]
    assert plan.tune.targets == both.targets


def test_transfer_must_be_true_or_false(where, tmp_path):
    (where / "transfer.jsonl").write_text("")
    text = TRANSFER.format(work=tmp_path / "w").replace("transfer: false", "transfer: maybe")
    refused(where, text, r"students\[1\]\.transfer must be true or false")


def test_without_a_transfer_split_students_stream_the_train_cache(where, tmp_path):
    plan = load(where, BASE + "students:\n  - {name: s, student: teacher, transfer: false}\n", workdir=str(tmp_path / "w"))
    assert plan.students[0][1].targets == [str(tmp_path / "w" / "targets" / "train")]


FROM_TUNE = BASE + """\
students:
  - {name: picked, student: teacher, from_tune: true}
  - {name: fixed, student: teacher, alpha: 0.9}
tune: {student: teacher, temperatures: [1, 2], alphas: [0.5, 1.0]}
"""


def test_a_from_tune_student_is_marked_and_keeps_no_settings_of_its_own(where, tmp_path):
    plan = load(where, FROM_TUNE, workdir=str(tmp_path / "w"))
    assert plan.from_tune == {"picked"}
    assert [n for n, _ in plan.students] == ["picked", "fixed"]


@pytest.mark.parametrize("change, message", [
    (("from_tune: true}", "from_tune: yes please}"), r"students\[0\]\.from_tune must be true or false"),
    (("from_tune: true}", "from_tune: true, temperature: 2}"), r"from_tune takes temperature from the tune's best point"),
    (("tune: {student: teacher, temperatures: [1, 2], alphas: [0.5, 1.0]}\n", ""), r"from_tune needs a tune: block"),
])
def test_from_tune_refusals(where, change, message):
    refused(where, FROM_TUNE.replace(*change), message)
