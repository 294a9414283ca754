"""Stage 1 as a real SLURM job array through `kd slurm teacher --submit`: a throttled 4-task
array plus a dependent `kd finalize` builds the same cache as one process; a failed task
blocks finalize, `kd status` names it, and resubmitting the same command runs only it.

The jobs call the venv's `kd` by absolute path (they run with a bare PATH) with
HF_HUB_OFFLINE=1, on the tiny models of tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import manifest
from stages import teacher
from stages.teacher import TeacherConfig
from tests.conftest import build_model, make_data

pytestmark = pytest.mark.slurm

KD = str(Path(sys.executable).with_name("kd"))
SC = "sequence-classification"
SCHED = ["--cpus-per-task", "1", "--mem", "500M", "--time", "10", "--partition", "debug",
         "--extra-sbatch", "--export=ALL,HF_HUB_OFFLINE=1"]
WAIT = 180  # seconds: generous, the machine may be shared with other test runs


def shared_inputs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One teacher, one dataset and one --cache-root for every cluster test of the session
    (test_sweep_array.py trains on the cache these tests build)."""
    root = tmp_path_factory.getbasetemp() / "kd-slurm-shared"
    if not (root / "data.jsonl").exists():
        root.mkdir(exist_ok=True)
        build_model(root / "teacher", SC, tokenizer_dir)
        make_data(root / "data.jsonl", SC, n=40)
    return {"root": root, "model": root / "teacher", "data": root / "data.jsonl", "cache_root": root / "caches"}


def teacher_args(inp, *where: str) -> list[str]:
    return ["--model", str(inp["model"]), "--data", str(inp["data"]), "--task-type", SC, "--max-length", "32",
            "--top-k", "2", "--temperature", "2", "--shard-rows", "4", *where]


def kd_slurm(cluster, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([KD, "slurm", *args], env={**cluster.env, "HF_HUB_OFFLINE": "1"}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def shared_cache(cluster, tmp_path_factory, tokenizer_dir, cwd: Path) -> tuple[dict[str, Path], Path]:
    """The shared inputs and the one cache under their --cache-root that stage 1 built as an array;
    a module that runs alone (no cache yet) builds it first, as a 2-task array."""
    inp = shared_inputs(tmp_path_factory, tokenizer_dir)
    if not list(inp["cache_root"].glob("*/manifest.json")):
        proc = kd_slurm(cluster, cwd, "teacher", "--num-tasks", "2", *SCHED, "--kd", KD, "--logs", str(cwd / "logs"),
                        "--submit", "--", *teacher_args(inp, "--cache-root", str(inp["cache_root"])))
        assert set(cluster.wait(proc.stdout.split(), timeout=WAIT).values()) == {"COMPLETED"}
    [cache] = [p.parent for p in inp["cache_root"].glob("*/manifest.json")]
    return inp, cache


def read_cache(out: Path) -> pa.Table:
    m = manifest.read_manifest(out, kind="targets")
    return pa.concat_tables([pq.read_table(Path(out) / f["path"]) for f in m["files"]]).sort_by("row")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer_dir):
    return shared_inputs(tmp_path_factory, tokenizer_dir)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The same stage 1 in one process, for comparison."""
    out = tmp_path_factory.mktemp("single") / "cache"
    args = dict(model=str(inputs["model"]), data=str(inputs["data"]), task_type=SC, max_length=32, top_k=2,
                temperature=2.0, out=str(out), progress=False)
    teacher.run(TeacherConfig(**args))
    return out


def assert_same_cache(out: Path, reference: Path) -> None:
    got, ref = manifest.read_manifest(out), manifest.read_manifest(reference)
    assert got["key"] == ref["key"]
    for stat in ("rows", "positions", "truncated_rows"):
        assert got["stats"][stat] == ref["stats"][stat], stat
    assert manifest.verify_files(out, got) == []
    a, b = read_cache(out), read_cache(reference)
    assert a.column("row").to_pylist() == list(range(40))
    assert a.drop_columns(["lse", "topk_logits"]).equals(b.drop_columns(["lse", "topk_logits"]))  # rows, ids, inputs, top-k ids
    # lse and the (float32, a classifier's default) values come from reductions whose rounding depends on batch
    # shapes and thread counts (single row vs padded batch, OMP_NUM_THREADS=1 in the jobs): equal to the last bit or two.
    for col in ("lse", "topk_logits"):
        flat = [np.concatenate([np.ravel(x) for x in t[col].to_pylist()]) for t in (a, b)]
        np.testing.assert_allclose(*flat, rtol=2e-6, atol=1e-7)


def test_array_throttled_then_finalize_by_dependency(slurm_cluster, inputs, reference, tmp_path):
    logs = tmp_path / "logs"
    link = tmp_path / "targets"
    proc = kd_slurm(slurm_cluster, tmp_path, "teacher", "--num-tasks", "4", "-M", "2", *SCHED,
                    "--logs", str(logs), "--kd", KD, "--submit", "--",
                    *teacher_args(inputs, "--cache-root", str(inputs["cache_root"]), "--out", str(link)))
    array, finalize = proc.stdout.split()
    shown = subprocess.run(["scontrol", "show", "job", array], env=slurm_cluster.env, capture_output=True,
                           text=True).stdout
    assert "ArrayTaskThrottle=2" in shown, shown
    states = slurm_cluster.wait(array, timeout=WAIT)
    assert states == {f"{array}_{i}": "COMPLETED" for i in range(4)}, states
    assert slurm_cluster.wait(finalize, timeout=WAIT) == {finalize: "COMPLETED"}
    out = link.resolve()
    assert out.parent == inputs["cache_root"]
    assert_same_cache(out, reference)
    assert manifest.read_manifest(out)["num_tasks"] == 4
    for i in range(4):  # one log per task, named by job name, array id and index
        text = (logs / f"kd-teacher-targets-{array}_{i}.out").read_text()
        assert f"kd teacher task {i} of 4" in text and f"task {i}/4" in text
    fin = (logs / f"kd-teacher-targets-finalize-{finalize}.out").read_text()
    assert str(out) in fin  # "already complete" (the last task wrote it) or "wrote …": either is success
    # (test_sweep_array.py reruns this command: it finds the cache complete and submits nothing)


def test_failed_task_blocks_finalize_and_resubmission_runs_only_it(slurm_cluster, inputs, reference, tmp_path):
    out = tmp_path / "cache"
    flaky = tmp_path / "flaky-kd"  # the real kd, except that array task 1 fails before doing anything
    flaky.write_text(f'#!/bin/bash\nif [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ]; then\n'
                     f'  echo "injected failure of task 1" >&2; exit 1\nfi\nexec {KD} "$@"\n')
    flaky.chmod(0o755)
    command = ["teacher", "--num-tasks", "3", "-M", "2", *SCHED, "--logs", str(tmp_path / "logs"), "--submit"]
    proc = kd_slurm(slurm_cluster, tmp_path, *command, "--kd", str(flaky), "--", *teacher_args(inputs, "--out", str(out)))
    array, finalize = proc.stdout.split()
    assert slurm_cluster.wait(array, timeout=WAIT) == {f"{array}_0": "COMPLETED", f"{array}_1": "FAILED",
                                                        f"{array}_2": "COMPLETED"}
    # --kill-on-invalid-dep=yes: finalize is cancelled, never run (not left pending forever).
    assert slurm_cluster.wait(finalize, timeout=WAIT) == {finalize: "CANCELLED"}
    assert slurm_cluster.states(finalize)[finalize][1] == "DependencyNeverSatisfied"
    assert not (tmp_path / "logs" / f"kd-teacher-cache-finalize-{finalize}.out").exists()
    assert not (out / manifest.MANIFEST).exists()
    status = subprocess.run([KD, "status", str(out), "--check"], capture_output=True, text=True)
    assert status.returncode == 1 and "missing tasks: 1\n" in status.stdout, status.stdout
    # The same command again, with the real kd: only task 1 goes out, then finalize.
    proc = kd_slurm(slurm_cluster, tmp_path, *command, "--kd", KD, "--", *teacher_args(inputs, "--out", str(out)))
    array2, finalize2 = proc.stdout.split()
    assert "task(s) 1 of 3" in proc.stderr
    assert slurm_cluster.wait(array2, timeout=WAIT) == {f"{array2}_1": "COMPLETED"}
    assert slurm_cluster.wait(finalize2, timeout=WAIT) == {finalize2: "COMPLETED"}
    assert_same_cache(out, reference)
    assert sorted(manifest.done_tasks(out)) == [0, 1, 2]
    assert os.path.exists(tmp_path / "logs" / f"kd-teacher-cache-{array2}_1.out")
