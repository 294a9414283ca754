"""Sweep files: loading (YAML / JSON, list or `students:` mapping) and picking a task's entry."""

import json
import os
import re
from pathlib import Path

import pytest

from pipeline import sweep
from pipeline.errors import KDError
from stages.train import TrainConfig


@pytest.fixture(autouse=True)
def _no_job_array(monkeypatch):
    """select() asks the job-array environment for the task index: start from none at all."""
    for name in list(os.environ):
        if re.match(r"(SLURM_|PBS_|LSB_|SGE_|KD_)", name):
            monkeypatch.delenv(name)


def names_entry_and_key(info, entry: int, key: str) -> None:
    """The refusal names the entry and the offending key (before any list of allowed keys)."""
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(rf"\bentry {entry}\b", msg), msg
    assert key in msg.split("(allowed")[0], msg


def write(tmp_path, name, text) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


ENTRIES_YAML = """\
- lr: 0.0001
  student-layers: [0, 2]
- name: warm
  temperature: 4.0
  alpha: 0.9
- out: {out}
  loss: jsd
"""


# --- load -------------------------------------------------------------------------------------

def test_load_yaml_list_normalises_dashes(tmp_path):
    p = write(tmp_path, "s.yaml", ENTRIES_YAML.format(out="/x/elsewhere"))
    assert sweep.load(p) == [{"lr": 0.0001, "student_layers": [0, 2]},
                             {"name": "warm", "temperature": 4.0, "alpha": 0.9},
                             {"out": "/x/elsewhere", "loss": "jsd"}]


def test_load_yaml_mapping_with_students(tmp_path):
    p = write(tmp_path, "s.yml", "students:\n  - {name: a, max-steps: 10}\n  - {name: b, grad-accum: 2}\n")
    assert sweep.load(str(p)) == [{"name": "a", "max_steps": 10}, {"name": "b", "grad_accum": 2}]


def test_load_json_list_and_mapping(tmp_path):
    entries = [{"lr": 1e-4, "batch-size": 8}, {"name": "b", "alpha": 0.0}]
    expected = [{"lr": 1e-4, "batch_size": 8}, {"name": "b", "alpha": 0.0}]
    assert sweep.load(write(tmp_path, "s.json", json.dumps(entries))) == expected
    assert sweep.load(write(tmp_path, "m.json", json.dumps({"students": entries}))) == expected


def test_load_unreadable(tmp_path):
    with pytest.raises(KDError, match=r"cannot read --sweep .*nope\.yaml"):
        sweep.load(tmp_path / "nope.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(KDError, match=r"cannot read --sweep"):
        sweep.load(tmp_path / "dir.yaml")


def test_load_invalid(tmp_path):
    with pytest.raises(KDError, match=r"is not valid YAML") as info:
        sweep.load(write(tmp_path, "bad.yaml", "- {lr: 1\n- alpha: [\n"))
    assert "\n" not in str(info.value)
    with pytest.raises(KDError, match=r"is not valid JSON") as info:
        sweep.load(write(tmp_path, "bad.json", "- lr: 0.1\n"))  # YAML is not JSON
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,text", [
    ("empty.yaml", ""),
    ("empty-list.yaml", "[]\n"),
    ("mapping.yaml", "lr: 0.1\nalpha: 0.5\n"),
    ("scalars.yaml", "- 0.1\n- 0.2\n"),
    ("mixed.json", '[{"lr": 0.1}, 3]'),
    ("students-empty.json", '{"students": []}'),
    ("string.json", '"lr"'),
])
def test_load_refuses_what_is_not_a_list_of_mappings(tmp_path, name, text):
    with pytest.raises(KDError, match=r"must hold a non-empty list of mappings"):
        sweep.load(write(tmp_path, name, text))


# --- select -----------------------------------------------------------------------------------

def cfg_for(tmp_path, sweep_file, **kw):
    return TrainConfig(**{"out": str(tmp_path / "runs"), "targets": "/caches/train", "lr": 5e-5,
                          "sweep": str(sweep_file), "task_index": 1, **kw})


def test_select_default_name_is_zero_padded_index(tmp_path):
    p = write(tmp_path, "s.yaml", ENTRIES_YAML.format(out="/x/elsewhere"))
    cfg = cfg_for(tmp_path, p)
    new, index, name = sweep.select(cfg, p, 0)
    assert (index, name) == (0, "000")
    assert new.out == str(tmp_path / "runs" / "000")
    assert new.lr == 0.0001 and new.student_layers == [0, 2]
    assert new.sweep is None and new.task_index is None
    assert new.targets == ["/caches/train"] and new.alpha == TrainConfig().alpha  # the rest untouched
    assert cfg.lr == 5e-5 and cfg.sweep == str(p)  # the original is not modified


def test_select_named_entry(tmp_path):
    p = write(tmp_path, "s.yaml", ENTRIES_YAML.format(out="/x/elsewhere"))
    new, index, name = sweep.select(cfg_for(tmp_path, p), p, 1)
    assert (index, name) == (1, "warm")
    assert new.out == str(tmp_path / "runs" / "warm")
    assert (new.temperature, new.alpha, new.lr) == (4.0, 0.9, 5e-5)


def test_select_entry_with_its_own_out(tmp_path):
    p = write(tmp_path, "s.yaml", ENTRIES_YAML.format(out="/x/elsewhere"))
    new, index, name = sweep.select(cfg_for(tmp_path, p, out=None), p, 2)  # needs no --out
    assert (index, name, new.out, new.loss) == (2, "002", "/x/elsewhere", "jsd")


def test_select_task_index_from_the_environment(tmp_path, monkeypatch):
    p = write(tmp_path, "s.json", json.dumps([{"lr": 1.0}, {"lr": 2.0}, {"lr": 3.0}]))
    monkeypatch.setenv("KD_TASK_INDEX", "2")
    new, index, name = sweep.select(cfg_for(tmp_path, p), p, None)
    assert (index, name, new.lr) == (2, "002", 3.0)


def test_select_refuses_unknown_key_naming_the_entry(tmp_path):
    p = write(tmp_path, "s.yaml", "- {lr: 0.1}\n- {alpha: 0.5}\n- {lrr: 0.1, alpha: 0.2}\n")
    with pytest.raises(KDError) as info:
        sweep.select(cfg_for(tmp_path, p), p, 0)  # every entry is checked, not just the one run
    names_entry_and_key(info, 2, "lrr")


@pytest.mark.parametrize("key", ["sweep", "task_index", "task-index", "config"])
def test_select_refuses_unsweepable_keys(tmp_path, key):
    p = write(tmp_path, "s.json", json.dumps([{"lr": 0.1}, {key: "x"}]))
    with pytest.raises(KDError) as info:
        sweep.select(cfg_for(tmp_path, p), p, 0)
    names_entry_and_key(info, 1, key.replace("-", "_"))


def test_select_refuses_out_of_range_task(tmp_path):
    p = write(tmp_path, "s.yaml", "- {lr: 0.1}\n- {lr: 0.2}\n")
    with pytest.raises(KDError, match=r"has 2 entries: task index 2 .*outside 0\.\.1"):
        sweep.select(cfg_for(tmp_path, p), p, 2)
    with pytest.raises(KDError, match=r"has 2 entries: task index -1"):
        sweep.select(cfg_for(tmp_path, p), p, -1)


def test_select_needs_out(tmp_path):
    p = write(tmp_path, "s.yaml", "- {lr: 0.1}\n")
    with pytest.raises(KDError, match=r"--sweep needs --out"):
        sweep.select(cfg_for(tmp_path, p, out=None), p, 0)


def test_select_refuses_entries_sharing_an_output(tmp_path):
    p = write(tmp_path, "s.yaml", "- {name: a, lr: 0.1}\n- {name: a, lr: 0.2}\n")
    with pytest.raises(KDError, match=r"entries 0 and 1 both train into 'a'"):
        sweep.select(cfg_for(tmp_path, p), p, 0)
