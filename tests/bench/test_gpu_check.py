"""The CPU half of bench/gpu_check.sh, run as CI runs it, so the one prepared GPU check never rots.

The GPU run happens rarely, on a short lease, with no second chance: a rename in stage 1, a changed
manifest stat or a broken shell preflight must show up here, not there. So the script runs end to
end on tiny shapes (`--smoke`) as a subprocess, and the block it prints is checked for every section,
a passing correctness check and numeric throughput ratios.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "#### 1. Stage 1 (`stages.teacher.run`)",
    "#### 2. Correctness:",
    "#### 3. Throughput:",
    "#### 4. Fused vs unfused loss",
    "**Summary**:",
)


def test_smoke_run_prints_a_complete_passing_block(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    block = proc.stdout
    assert block.strip().startswith("<!-- gpu_check:cpu:begin") and block.strip().endswith("<!-- gpu_check:cpu:end -->")
    for section in SECTIONS:
        assert section in block, f"missing section {section!r}"
    assert (tmp_path / "work" / "gpu_check.md").read_text().strip() == block.strip()

    # correctness: every compared run of both cases, each marked PASS, none FAIL
    assert "correctness PASS" in block and "**FAIL**" not in block
    rows = [line for line in block.splitlines() if line.startswith("| llama-tiny |") or line.startswith("| bert-tiny-cls |")]
    checked = [r for r in rows if "stage-1 cache" in r]
    assert len(checked) == 4 and all(r.endswith("| **PASS** |") for r in checked)
    padded = next(line for line in block.splitlines() if "padded vocabulary" in line)
    assert "1,000 output rows, tokenizer 960" in padded

    # throughput: a number per case for stage 1 ÷ bare, by compute and by loop time
    ratios = re.findall(r"\| \*\*(\d+\.\d+)\*\* \| (\d+\.\d+) \| (met|not met) \|", block)
    assert len(ratios) == 2 and all(float(c) > 0 and float(loop) > 0 for c, loop, _ in ratios)
    summary = next(line for line in block.splitlines() if line.startswith("**Summary**"))
    assert re.search(r"llama-tiny \d+\.\d{3}, bert-tiny-cls \d+\.\d{3}", summary)

    # the loss benchmark's own table came through
    assert "| V | N | path | peak MB |" in block and "FAILED" not in block
