"""bench/bench_sparse.py end to end in its quick mode, so the real bench (a 20-minute CPU run) never rots.

The quick mode runs every stage the real bench runs -- `kd teacher` top-k and sampled caches, `kd
train` from each and without a teacher, the online dense-KD loop, the one-process held-out evaluation
-- on a random tiny Llama, as subprocesses, and writes its block into a RESULTS.md given on the
command line (never the repository's). Checked: the block replaced between its markers and the text
around it kept, every run in the table with finite figures, one data order for every run, and the
two pure helpers (ECE binning, marker-bounded writing) against their references.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_sparse.py"
RUNS = ("teacher (reference)", "student before training", "plain CE", "dense KD, teacher in the loop", "top-k, k = 8",
        "sampled, M = 12", "top-k, k = 32", "sampled, M = 32")


def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_a_complete_table(tmp_path):
    b = bench()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Stage 1 — teacher\n\nkept before\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "work"), "--results", str(results)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    text = results.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\n## Stage 1 — teacher\n\nkept before\n")
    assert text.count(b.BEGIN) == 1 and text.count(b.END) == 1 and b.SECTION in text
    block = text[text.index(b.BEGIN):text.index(b.END) + len(b.END)]
    assert block.strip() in proc.stdout  # printed too

    table = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    for run in RUNS:
        row = next((line for line in table if line.startswith(f"| {run}")), None)
        assert row is not None, f"no row for {run!r}"
        ppl, kl, ece, acc, agree = (float(c) for c in row.strip("| ").split(" | ")[-5:])
        assert all(math.isfinite(x) for x in (ppl, kl, ece, acc, agree)), row
        assert ppl > 1 and kl >= 0 and 0 <= ece <= 1 and 0 <= acc <= 1 and 0 <= agree <= 1, row
    for run in RUNS[4:]:  # every cache has a size
        row = next(line for line in table if line.startswith(f"| {run}"))
        assert float(row.split(" | ")[3]) > 0 and float(row.split(" | ")[4]) > 0, row
    assert "Data order identical across the runs of a seed\n  (row ids per step, checked): yes" in block
    assert block.count("ΔKL") == 2

    r = json.loads((tmp_path / "work" / "results.json").read_text())
    assert set(r["eval"]["models"]) == {"teacher", "init", "ce-s0", "dense-online-s0", "topk-8-s0", "sampled-12-s0",
                                        "topk-32-s0", "sampled-32-s0"}
    assert r["caches"]["sampled-12"]["mode"] == "sampled" and r["caches"]["topk-8"]["mode"] == "topk"
    assert 1 <= r["caches"]["sampled-12"]["ids_per_position"] <= 12
    steps = {t["steps"] for run in r["trains"].values() for t in run["seeds"]}
    assert steps == {6}  # the same budget everywhere: 48 rows / 8 per step

    # re-rendering from the saved results replaces the block in place
    subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(tmp_path / "work" / "results.json"), "--results", str(results)],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert results.read_text(encoding="utf-8") == text


def test_write_block_replaces_only_between_markers(tmp_path):
    b = bench()
    path = tmp_path / "R.md"
    path.write_text("# B\n\n## A\n\ntext a\n", encoding="utf-8")
    b.write_block(path, f"{b.BEGIN}\none\n{b.END}\n")
    first = path.read_text(encoding="utf-8")
    assert first == f"# B\n\n## A\n\ntext a\n\n{b.SECTION}\n\n{b.BEGIN}\none\n{b.END}\n"
    path.write_text(first + "\nnotes written by hand\n", encoding="utf-8")
    b.write_block(path, f"{b.BEGIN}\ntwo\n{b.END}")
    assert path.read_text(encoding="utf-8") == (f"# B\n\n## A\n\ntext a\n\n{b.SECTION}\n\n{b.BEGIN}\ntwo\n{b.END}\n"
                                                "\nnotes written by hand\n")
    assert [p.name for p in tmp_path.iterdir()] == ["R.md"]  # no temporaries left


def test_ece_matches_the_pipeline_metric():
    np = pytest.importorskip("numpy")
    from pipeline.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, 7, 500)
    conf, correct = probs.max(-1), probs.argmax(-1) == labels
    assert bench().ece(conf, correct) == pytest.approx(expected_calibration_error(probs, labels, 15), abs=1e-12)


def test_paired_bootstrap_is_centred_on_the_difference():
    b = bench()
    diff, lo, hi = b.paired_bootstrap([2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0, 7.0], [2, 2, 2, 2])
    assert diff == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
