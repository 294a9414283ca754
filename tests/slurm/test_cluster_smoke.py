"""The local cluster runs real job arrays, throttling and afterok dependencies, and a real
SLURM array environment resolves to the task index/count `pipeline.jobarray` promises."""

import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
# Job scripts run as root with a bare PATH: name the interpreter and the code by absolute path.
RESOLVE = (f'PYTHONPATH={REPO} {sys.executable} -c '
           f'"from pipeline.jobarray import resolve_task; print(*resolve_task())"')


def array_script(out: Path, sleep: float = 0.0, fail_task: int | None = None) -> str:
    fail = f'[ "$SLURM_ARRAY_TASK_ID" = {fail_task} ] && exit 3\n' if fail_task is not None else ""
    return f"""#!/bin/bash
set -e
start=$(date +%s.%N)
sleep {sleep}
{fail}resolved=$({RESOLVE})
echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT $resolved $start $(date +%s.%N)" \\
    > {out}/task_$SLURM_ARRAY_TASK_ID.tmp
mv {out}/task_$SLURM_ARRAY_TASK_ID.tmp {out}/task_$SLURM_ARRAY_TASK_ID
"""


def after_script(out: Path) -> str:
    return f"#!/bin/bash\ntouch {out}/after\n"


def test_array_throttle_and_afterok(slurm_cluster, tmp_path):
    array = slurm_cluster.submit(array_script(tmp_path, sleep=0.5), "--array=0-3%2")
    after = slurm_cluster.submit(after_script(tmp_path), f"--dependency=afterok:{array}")
    states = slurm_cluster.wait([array, after], timeout=90)
    assert states == {**{f"{array}_{i}": "COMPLETED" for i in range(4)}, after: "COMPLETED"}
    spans = []
    for i in range(4):
        task_id, count, index, num_tasks, start, end = (tmp_path / f"task_{i}").read_text().split()
        assert (task_id, count, index, num_tasks) == (str(i), "4", str(i), "4")
        spans.append((float(start), float(end)))
    assert (tmp_path / "after").exists()
    # %2: no moment has more than two tasks running.
    for t, _ in spans:
        assert sum(s <= t < e for s, e in spans) <= 2, spans


def test_stepped_array_resolves_to_positions(slurm_cluster, tmp_path):
    array = slurm_cluster.submit(array_script(tmp_path), "--array=1-7:2")
    assert set(slurm_cluster.wait(array, timeout=90).values()) == {"COMPLETED"}
    for position, task_id in enumerate((1, 3, 5, 7)):
        fields = (tmp_path / f"task_{task_id}").read_text().split()
        assert fields[:4] == [str(task_id), "4", str(position), "4"]


def test_failed_task_blocks_afterok_forever(slurm_cluster, tmp_path):
    array = slurm_cluster.submit(array_script(tmp_path, fail_task=1), "--array=0-1")
    after = slurm_cluster.submit(after_script(tmp_path), f"--dependency=afterok:{array}")
    assert slurm_cluster.wait(array, timeout=90) == {f"{array}_0": "COMPLETED",
                                                      f"{array}_1": "FAILED"}
    # The reason changes one scheduler pass after the array ends: poll for it.
    deadline = time.monotonic() + 60
    while (state := slurm_cluster.states(after)[after]) != ("PENDING", "DependencyNeverSatisfied"):
        assert state[0] == "PENDING" and time.monotonic() < deadline, state
        time.sleep(0.2)
    assert not (tmp_path / "after").exists()
    slurm_cluster.cancel(after)
    assert slurm_cluster.wait(after, timeout=30) == {after: "CANCELLED"}
    assert not (tmp_path / "after").exists()
