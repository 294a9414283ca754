"""Plans, task records and manifests: the on-disk lifecycle of a stage's output directory."""

import hashlib
import json

import pytest

from pipeline import manifest
from pipeline.errors import KDError


def plan(key="k" * 64, num_tasks=2, kind="targets", **config):
    return {"kind": kind, "key": key, "format_version": 1, "num_tasks": num_tasks,
            "config": {"top_k": 4, "temperature": 2.0, **config},
            "fingerprints": {"teacher": "abc"}, "upstream": [{"path": "/up", "key": "u"}],
            "stats": {"top_k": 4}}


def write_file(out, rel, data: bytes) -> dict:
    """A task's output file and its entry as a task record lists it."""
    p = out / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": 1}


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --- the lifecycle ---------------------------------------------------------------------------

def test_plan_records_finalize(tmp_path):
    out = tmp_path / "cache"
    p = plan(num_tasks=2)
    assert manifest.write_plan(out, p) == p
    assert json.loads((out / "plan.json").read_text()) == p
    assert manifest.done_tasks(out) == {}
    assert manifest.status(out) == {"kind": "targets", "key": p["key"], "num_tasks": 2, "done": [],
                                    "missing": [0, 1], "complete": False}

    f1 = write_file(out, "shards/part-00001.parquet", b"second task")
    manifest.write_task_record(out, 1, {"files": [f1], "stats": {"rows": 3, "positions": 20, "bytes": 90,
                                                                 "truncated_rows": 1, "teacher_seconds": 1.5,
                                                                 "task_type": "causal-lm"}})
    assert (out / "tasks" / "00001.json").is_file()
    done = manifest.done_tasks(out)
    assert list(done) == [1]
    assert done[1]["task_index"] == 1 and "finished_at" in done[1] and "host" in done[1] and "pid" in done[1]
    st = manifest.status(out)
    assert st["done"] == [1] and st["missing"] == [0] and st["complete"] is False

    f0 = write_file(out, "shards/part-00000.parquet", b"first")
    manifest.write_task_record(out, 0, {"files": [f0], "stats": {"rows": 2, "positions": 10, "bytes": 11,
                                                                 "teacher_seconds": 0.25, "task_type": "causal-lm"}})
    m = manifest.finalize(out)
    assert (out / "manifest.json").is_file()
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "targets" and m["key"] == p["key"] and m["format_version"] == 1
    assert m["config"] == p["config"] and m["fingerprints"] == p["fingerprints"] and m["upstream"] == p["upstream"]
    assert m["num_tasks"] == 2
    assert [f["path"] for f in m["files"]] == ["shards/part-00000.parquet", "shards/part-00001.parquet"]
    s = m["stats"]
    assert (s["rows"], s["positions"], s["bytes"], s["truncated_rows"]) == (5, 30, 101, 1)
    assert s["teacher_seconds"] == pytest.approx(1.75)
    assert s["bytes_per_position"] == 3.37  # 101 / 30 = 3.3667, rounded to 2 decimals
    assert s["top_k"] == 4  # the plan's statistics are kept
    assert s["task_type"] == "causal-lm"  # a statistic that is not summed is kept as the tasks report it
    assert m["package"]["name"] == "kd-pipeline"

    st = manifest.status(out)
    assert st["complete"] is True and st["done"] == [0, 1] and st["missing"] == []
    assert manifest.read_manifest(out, kind="targets") == m
    assert manifest.verify_files(out, m) == []


def test_finalize_without_positions_has_no_bytes_per_position(tmp_path):
    manifest.write_plan(tmp_path, plan(num_tasks=1))
    manifest.write_task_record(tmp_path, 0, {"files": [], "stats": {"rows": 4}})
    m = manifest.finalize(tmp_path)
    assert m["stats"]["rows"] == 4 and m["stats"].get("positions", 0) == 0
    assert "bytes_per_position" not in m["stats"]


def test_finalize_refuses_missing_tasks_naming_them(tmp_path):
    manifest.write_plan(tmp_path, plan(num_tasks=4))
    manifest.write_task_record(tmp_path, 1, {"files": []})
    with pytest.raises(KDError) as info:
        manifest.finalize(tmp_path)
    msg = one_line(info)
    assert "3 of 4 tasks" in msg and "missing: 0, 2, 3" in msg
    assert not (tmp_path / "manifest.json").exists()


def test_finalize_refuses_many_missing_tasks_shortened(tmp_path):
    manifest.write_plan(tmp_path, plan(num_tasks=25))
    with pytest.raises(KDError) as info:
        manifest.finalize(tmp_path)
    msg = one_line(info)
    assert "25 of 25" in msg and ", 19 …" in msg and "20" not in msg.split("missing:")[1]


def test_finalize_refuses_a_recorded_file_that_is_gone(tmp_path):
    manifest.write_plan(tmp_path, plan(num_tasks=1))
    f = write_file(tmp_path, "shards/part-00000.parquet", b"data")
    manifest.write_task_record(tmp_path, 0, {"files": [f]})
    (tmp_path / f["path"]).unlink()
    with pytest.raises(KDError) as info:
        manifest.finalize(tmp_path)
    msg = one_line(info)
    assert "task 0" in msg and "shards/part-00000.parquet" in msg and "00000.json" in msg
    assert not (tmp_path / "manifest.json").exists()


def test_done_tasks_ignores_temporaries(tmp_path):
    manifest.write_task_record(tmp_path, 3, {"files": []})
    (tmp_path / "tasks" / ".tmp-abc-00004.json").write_text("{")
    assert list(manifest.done_tasks(tmp_path)) == [3]


# --- write_plan refusals ---------------------------------------------------------------------

def test_write_plan_same_plan_twice_is_benign(tmp_path):
    p = plan()
    manifest.write_plan(tmp_path, p)
    manifest.write_task_record(tmp_path, 0, {"files": []})
    assert manifest.write_plan(tmp_path, dict(p)) == p


def test_write_plan_refuses_another_key_once_started_naming_fields(tmp_path):
    manifest.write_plan(tmp_path, plan(key="a" * 64, top_k=4))
    manifest.write_task_record(tmp_path, 0, {"files": []})
    other = plan(key="b" * 64)
    other["config"].update(top_k=8, temperature=1.0, max_length=64)
    with pytest.raises(KDError) as info:
        manifest.write_plan(tmp_path, other)
    msg = one_line(info)
    assert "config differs in: max_length, temperature, top_k" in msg
    assert "a" * 12 in msg and "targets" in msg
    assert json.loads((tmp_path / "plan.json").read_text())["key"] == "a" * 64  # left alone


def test_write_plan_refuses_another_key_with_shards_but_no_records(tmp_path):
    manifest.write_plan(tmp_path, plan(key="a" * 64))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(KDError, match=r"inputs differ"):
        manifest.write_plan(tmp_path, plan(key="b" * 64))  # same config: only the inputs differ


def test_write_plan_restarts_afresh_when_nothing_was_written(tmp_path):
    manifest.write_plan(tmp_path, plan(key="a" * 64, num_tasks=3))
    new = plan(key="b" * 64, num_tasks=5, top_k=8)
    assert manifest.write_plan(tmp_path, new) == new
    assert json.loads((tmp_path / "plan.json").read_text()) == new


def test_write_plan_refuses_another_num_tasks(tmp_path):
    manifest.write_plan(tmp_path, plan(num_tasks=3))
    with pytest.raises(KDError) as info:
        manifest.write_plan(tmp_path, plan(num_tasks=4))
    msg = one_line(info)
    assert "started as 3 tasks, not 4" in msg and "--num-tasks 3" in msg


# --- read_manifest refusals ------------------------------------------------------------------

def test_read_manifest_not_a_directory(tmp_path):
    with pytest.raises(KDError, match="does not exist or is not a directory"):
        manifest.read_manifest(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(KDError, match="does not exist or is not a directory"):
        manifest.read_manifest(tmp_path / "file")


def test_read_manifest_incomplete(tmp_path):
    manifest.write_plan(tmp_path, plan())
    with pytest.raises(KDError) as info:
        manifest.read_manifest(tmp_path)
    msg = one_line(info)
    assert "incomplete" in msg and "kd status" in msg and "kd finalize" in msg


def test_read_manifest_not_a_kd_dir(tmp_path):
    with pytest.raises(KDError, match="not a complete kd output directory"):
        manifest.read_manifest(tmp_path)
    with pytest.raises(KDError, match="not the output of a kd stage"):
        manifest.status(tmp_path)


def test_read_manifest_wrong_kind(tmp_path):
    manifest.write_plan(tmp_path, plan(num_tasks=1, kind="student"))
    manifest.write_task_record(tmp_path, 0, {"files": []})
    manifest.finalize(tmp_path)
    assert manifest.read_manifest(tmp_path)["kind"] == "student"
    assert manifest.read_manifest(tmp_path, "student")["kind"] == "student"
    with pytest.raises(KDError, match=r"holds a 'student' output, not 'targets'"):
        manifest.read_manifest(tmp_path, "targets")


# --- verify_files ----------------------------------------------------------------------------

def test_verify_files_reports_each_problem(tmp_path):
    entries = [write_file(tmp_path, n, b"abcd") for n in ("ok.bin", "gone.bin", "short.bin", "flipped.bin")]
    m = {"files": entries}
    assert manifest.verify_files(tmp_path, m) == []
    (tmp_path / "gone.bin").unlink()
    (tmp_path / "short.bin").write_bytes(b"abc")
    (tmp_path / "flipped.bin").write_bytes(b"abce")  # same size, other content
    assert manifest.verify_files(tmp_path, m) == [
        "gone.bin: missing",
        "short.bin: 3 bytes, manifest says 4",
        "flipped.bin: sha256 does not match the manifest",
    ]
