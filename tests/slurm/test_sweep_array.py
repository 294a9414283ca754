"""A sweep of two students as a real SLURM job array over the cache that stage 1 built as an
array (tests/slurm/test_stage1_array.py, same --cache-root): the printed driver script (run with
bash, as a user would) trains both students from that one cache without touching it, their
manifests name its key, and `kd slurm summary` runs after them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline import io, manifest
from tests.slurm.test_stage1_array import KD, SCHED, WAIT, kd_slurm, shared_cache

pytestmark = pytest.mark.slurm


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in directory.rglob("*") if p.is_file()}


def test_sweep_of_two_students_trains_from_the_one_cache(slurm_cluster, tmp_path_factory, tokenizer_dir, tmp_path):
    inp, cache = shared_cache(slurm_cluster, tmp_path_factory, tokenizer_dir, tmp_path)
    key = manifest.read_manifest(cache)["key"]
    before = snapshot(cache)

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {name: wide, lr: 0.001}\n- {name: narrow, student_layers: '0'}\n")
    train = ["--targets", str(cache), "--student-from-teacher", str(inp["model"]), "--student-layers", "0,1",
             "--sweep", str(sweep), "--out", "students", "--max-steps", "2", "--batch-size", "8",
             "--num-workers", "0", "--save-every", "0"]
    driver = tmp_path / "submit.sh"
    driver.write_text(kd_slurm(slurm_cluster, tmp_path, "train", "-M", "2", *SCHED, "--logs", str(tmp_path / "logs"),
                               "--kd", KD, "--", *train).stdout)
    run = subprocess.run(["bash", str(driver)], env=slurm_cluster.env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    array, summary = (line.split(";")[0] for line in run.stdout.split())
    assert slurm_cluster.wait(array, timeout=WAIT) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}
    assert slurm_cluster.wait(summary, timeout=WAIT) == {summary: "COMPLETED"}

    students = [tmp_path / "students" / name for name in ("wide", "narrow")]
    for student in students:
        m = manifest.read_manifest(student, kind="student")
        assert [(u["kind"], u["key"]) for u in m["upstream"]] == [("targets", key)]
        assert Path(m["upstream"][0]["path"]).resolve() == cache.resolve()
        assert (student / "config.json").exists()
    configs = [io.read_json(s / "config.json") for s in students]
    assert [c["num_hidden_layers"] for c in configs] == [2, 1]  # each task trained its own entry
    assert snapshot(cache) == before  # nothing in the cache was rewritten
    log = (tmp_path / "logs" / f"kd-train-students-summary-{summary}.out").read_text()
    for student in students:
        assert f"{student}: complete student" in log and f"from {key[:12]}" in log
