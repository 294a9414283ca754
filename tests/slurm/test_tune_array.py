"""A `kd tune` grid as a real SLURM job array through `kd slurm tune --submit`: one array task per
grid point (each trains and scores its student from the cache that stage 1 built, without
touching the cache), then the dependent `kd tune` ranks the points and writes the outputs; the
same command afterwards finds the tune complete and submits nothing."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline import manifest
from tests.slurm.test_stage1_array import KD, SCHED, WAIT, kd_slurm, shared_cache
from tests.slurm.test_sweep_array import snapshot

pytestmark = pytest.mark.slurm


def test_tune_grid_runs_as_an_array_then_writes_its_outputs(slurm_cluster, tmp_path_factory, tokenizer_dir, tmp_path):
    inp, cache = shared_cache(slurm_cluster, tmp_path_factory, tokenizer_dir, tmp_path)
    key = manifest.read_manifest(cache)["key"]
    before = snapshot(cache)

    # the cache stores T = 2: the grid's T = 2 points are exact (one validation cache = the same one here)
    tune = ["--targets", str(cache), "--eval-targets", str(cache), "--temperatures", "2", "--alphas", "0.5,1.0",
            "--student-from-teacher", str(inp["model"]), "--student-layers", "0", "--out", str(tmp_path / "tune"),
            "--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--save-every", "0"]
    proc = kd_slurm(slurm_cluster, tmp_path, "tune", *SCHED, "--kd", KD, "--logs", str(tmp_path / "logs"), "--submit",
                    "--", *tune)
    array, after = proc.stdout.split()
    assert slurm_cluster.wait(array, timeout=WAIT) == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}
    assert slurm_cluster.wait(after, timeout=WAIT) == {after: "COMPLETED"}

    out = tmp_path / "tune"
    m = manifest.read_manifest(out, kind="tune")
    df = pl.read_parquet(out / "tune.parquet")
    assert sorted(df["alpha"].to_list()) == [0.5, 1.0] and set(df["temperature"]) == {2.0}
    assert (out / "report.md").exists() and (out / "heatmap.png").exists()
    assert m["stats"]["best"]["name"] == df.row(0, named=True)["name"]
    for name in df["name"]:
        student = manifest.read_manifest(out / "points" / name, kind="student")
        assert [(u["kind"], u["key"]) for u in student["upstream"]] == [("targets", key)]
    assert snapshot(cache) == before  # nothing in the cache was rewritten

    again = kd_slurm(slurm_cluster, tmp_path, "tune", *SCHED, "--kd", KD, "--submit", "--", *tune)
    assert again.stdout == "" and "already complete: nothing to submit" in again.stderr
