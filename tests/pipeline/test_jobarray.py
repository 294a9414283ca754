"""Job-array environment -> (task_index, num_tasks) -> rows: every scheduler, every error."""

import contextlib
import os
import re
import subprocess
import sys

import pytest

from pipeline.errors import KDError
from pipeline.jobarray import resolve_task, row_range


def slurm(tid, lo=0, hi=3, step=1, count=None):
    env = {"SLURM_ARRAY_TASK_ID": str(tid), "SLURM_ARRAY_TASK_MIN": str(lo),
           "SLURM_ARRAY_TASK_MAX": str(hi), "SLURM_ARRAY_TASK_STEP": str(step)}
    env["SLURM_ARRAY_TASK_COUNT"] = str((hi - lo) // step + 1 if count is None else count)
    return env


@contextlib.contextmanager
def raises(pattern):
    """KDError whose message matches `pattern` and is one line (the CLI prints it as-is)."""
    with pytest.raises(KDError, match=pattern) as info:
        yield info
    assert "\n" not in str(info.value)


# --- no array -------------------------------------------------------------------------------

def test_nothing_set_means_one_task():
    assert resolve_task(env={}) == (0, 1)


def test_reads_os_environ_by_default(monkeypatch):
    for name in list(os.environ):
        if re.match(r"(SLURM_|PBS_|LSB_|SGE_|KD_)", name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KD_TASK_INDEX", "2")
    monkeypatch.setenv("KD_NUM_TASKS", "5")
    assert resolve_task() == (2, 5)


def test_empty_variables_count_as_unset():
    assert resolve_task(env={"SLURM_ARRAY_TASK_ID": "", "KD_NUM_TASKS": " "}) == (0, 1)


# --- SLURM ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tid,expected", [(0, 0), (2, 2), (3, 3)])
def test_slurm_zero_based(tid, expected):
    env = slurm(tid)
    assert resolve_task(env=env) == (expected, 4)


def test_slurm_one_based_and_stepped():
    assert resolve_task(env=slurm(1, lo=1, hi=8)) == (0, 8)
    assert resolve_task(env=slurm(8, lo=1, hi=8)) == (7, 8)
    assert resolve_task(env=slurm(6, lo=0, hi=14, step=2)) == (3, 8)
    assert resolve_task(env=slurm(13, lo=5, hi=13, step=4)) == (2, 3)


def test_slurm_count_only():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "5"}
    assert resolve_task(env=env) == (3, 5)


def test_slurm_id_off_grid():
    with raises(r"SLURM_ARRAY_TASK_ID=3 is not on the array range 0\.\.8:2"):
        resolve_task(env=slurm(3, lo=0, hi=8, step=2))
    with raises(r"SLURM_ARRAY_TASK_ID=9 is not on the array range"):
        resolve_task(env=slurm(9, lo=0, hi=8))
    with raises(r"SLURM_ARRAY_TASK_ID=0 is not on the array range"):
        resolve_task(env=slurm(0, lo=1, hi=8))


def test_slurm_uneven_list_refused():
    # --array=1,5,9,10: MIN=1 MAX=10 STEP=1 but only 4 tasks
    with raises(r"SLURM_ARRAY_TASK_COUNT=4 but .* describe 10 tasks"):
        resolve_task(env=slurm(5, lo=1, hi=10, count=4))


def test_slurm_bad_step():
    with raises(r"step 0 is not positive"):
        resolve_task(env=slurm(0, step=0, count=4))


def test_slurm_index_beyond_count():
    with raises(r"task index 4 \(SLURM_ARRAY_TASK_ID\) is outside 0\.\.3"):
        resolve_task(env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_slurm_without_count_needs_num_tasks():
    env = {"SLURM_ARRAY_TASK_ID": "2"}
    with raises(r"SLURM_ARRAY_TASK_ID gives the task index but no task count.*--num-tasks"):
        resolve_task(env=env)
    assert resolve_task(num_tasks=3, env=env) == (2, 3)


# --- PBS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["PBS_ARRAY_INDEX", "PBS_ARRAYID"])
def test_pbs_needs_a_count(var):
    env = {var: "2"}
    with raises(rf"{var} gives the task index but no task count.*KD_NUM_TASKS"):
        resolve_task(env=env)
    assert resolve_task(num_tasks=4, env=env) == (2, 4)
    assert resolve_task(env={**env, "KD_NUM_TASKS": "4"}) == (2, 4)


def test_pbs_index_beyond_count():
    with raises(r"task index 4 \(PBS_ARRAY_INDEX\) is outside 0\.\.3"):
        resolve_task(num_tasks=4, env={"PBS_ARRAY_INDEX": "4"})


def test_pbs_pro_and_torque_disagree():
    with raises(r"PBS_ARRAY_INDEX gives task index 1 but PBS_ARRAYID gives 2"):
        resolve_task(num_tasks=4, env={"PBS_ARRAY_INDEX": "1", "PBS_ARRAYID": "2"})


# --- LSF ------------------------------------------------------------------------------------

def test_lsf_one_based_with_end():
    env = {"LSB_JOBINDEX": "1", "LSB_JOBINDEX_END": "4"}
    assert resolve_task(env=env) == (0, 4)
    assert resolve_task(env={**env, "LSB_JOBINDEX": "4"}) == (3, 4)


def test_lsf_stepped():
    env = {"LSB_JOBINDEX": "7", "LSB_JOBINDEX_END": "10", "LSB_JOBINDEX_STEP": "3"}
    assert resolve_task(env=env) == (2, 4)  # 1, 4, 7, 10
    with raises(r"LSB_JOBINDEX=6 is not on the array range 1\.\.10:3 \(LSF arrays must start"):
        resolve_task(env={**env, "LSB_JOBINDEX": "6"})


def test_lsf_zero_means_not_an_array():
    env = {"LSB_JOBINDEX": "0"}
    assert resolve_task(env=env) == (0, 1)


def test_lsf_without_end_needs_num_tasks():
    env = {"LSB_JOBINDEX": "3"}
    with raises(r"LSB_JOBINDEX gives the task index but no task count"):
        resolve_task(env=env)
    assert resolve_task(num_tasks=5, env=env) == (2, 5)


# --- SGE ------------------------------------------------------------------------------------

def test_sge_one_based_and_stepped():
    env = {"SGE_TASK_ID": "1", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "4",
           "SGE_TASK_STEPSIZE": "1"}
    assert resolve_task(env=env) == (0, 4)
    stepped = {"SGE_TASK_ID": "25", "SGE_TASK_FIRST": "5", "SGE_TASK_LAST": "45",
               "SGE_TASK_STEPSIZE": "10"}
    assert resolve_task(env=stepped) == (2, 5)


def test_sge_undefined_means_not_an_array():
    env = {"SGE_TASK_ID": "undefined", "SGE_TASK_FIRST": "undefined",
           "SGE_TASK_LAST": "undefined", "SGE_TASK_STEPSIZE": "undefined"}
    assert resolve_task(env=env) == (0, 1)


def test_sge_off_grid():
    with raises(r"SGE_TASK_ID=3 is not on the array range 1\.\.9:4"):
        resolve_task(env={"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9",
                          "SGE_TASK_STEPSIZE": "4"})


# --- generic KD_* ---------------------------------------------------------------------------

def test_kd_variables():
    assert resolve_task(env={"KD_TASK_INDEX": "1", "KD_NUM_TASKS": "3"}) == (1, 3)
    assert resolve_task(env={"KD_NUM_TASKS": "3"}) == (0, 3)
    with raises(r"KD_TASK_INDEX gives the task index but no task count"):
        resolve_task(env={"KD_TASK_INDEX": "1"})


def test_kd_agrees_with_scheduler():
    assert resolve_task(env={**slurm(2), "KD_TASK_INDEX": "2", "KD_NUM_TASKS": "4"}) == (2, 4)


def test_kd_disagrees_with_scheduler():
    with raises(r"SLURM_ARRAY_TASK_ID gives task index 2 but KD_TASK_INDEX gives 1"):
        resolve_task(env={**slurm(2), "KD_TASK_INDEX": "1"})
    with raises(r"gives task count 4 but KD_NUM_TASKS gives 5"):
        resolve_task(env={**slurm(2), "KD_NUM_TASKS": "5"})


# --- two schedulers -------------------------------------------------------------------------

def test_two_schedulers_agreeing():
    env = {**slurm(1), "SGE_TASK_ID": "2", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "4"}
    assert resolve_task(env=env) == (1, 4)


def test_two_schedulers_disagreeing():
    with raises(r"SLURM_ARRAY_TASK_ID gives task index 1 but LSB_JOBINDEX gives 2"):
        resolve_task(env={**slurm(1), "LSB_JOBINDEX": "3", "LSB_JOBINDEX_END": "4"})
    with raises(r"task count 4 but SGE_TASK_FIRST/LAST/STEPSIZE gives 8"):
        resolve_task(env={**slurm(1), "SGE_TASK_ID": "2", "SGE_TASK_LAST": "8"})


# --- explicit arguments ---------------------------------------------------------------------

def test_explicit_both_without_env():
    assert resolve_task(3, 5, env={}) == (3, 5)


def test_explicit_index_wins_over_env():
    assert resolve_task(task_index=0, env=slurm(3)) == (0, 4)
    assert resolve_task(1, 4, env=slurm(3)) == (1, 4)


def test_explicit_count_alone_takes_index_from_env_or_zero():
    assert resolve_task(num_tasks=4, env=slurm(2)) == (2, 4)
    assert resolve_task(num_tasks=4, env={}) == (0, 4)


def test_explicit_index_alone_takes_count_from_env():
    assert resolve_task(task_index=1, env={"KD_NUM_TASKS": "6"}) == (1, 6)


def test_explicit_index_without_any_count_is_an_error():
    with raises(r"--task-index=2 given without a task count; pass --num-tasks"):
        resolve_task(task_index=2, env={})
    with raises(r"--task-index=0 given without a task count"):
        resolve_task(task_index=0, env={})


def test_explicit_count_differing_from_array():
    with raises(r"--num-tasks=3 but the job array has 4 tasks \(SLURM_ARRAY_TASK_MIN/MAX/STEP\)"):
        resolve_task(num_tasks=3, env=slurm(1))
    with raises(r"--num-tasks=3 but the job array has 4 tasks \(KD_NUM_TASKS\)"):
        resolve_task(num_tasks=3, env={"KD_NUM_TASKS": "4"})


@pytest.mark.parametrize("args,pattern", [
    ((-1, 4), r"task index -1 \(--task-index\) is outside 0\.\.3"),
    ((4, 4), r"task index 4 \(--task-index\) is outside 0\.\.3"),
    ((0, 0), r"--num-tasks=0: the task count must be at least 1"),
    ((0, -2), r"--num-tasks=-2: the task count must be at least 1"),
    (("1", 4), r"--task-index='1' is not an integer"),
    ((1, 2.0), r"--num-tasks=2\.0 is not an integer"),
    ((True, 2), r"--task-index=True is not an integer"),
])
def test_explicit_invalid(args, pattern):
    with raises(pattern):
        resolve_task(*args, env={})


# --- malformed environment ------------------------------------------------------------------

@pytest.mark.parametrize("env,pattern", [
    ({"SLURM_ARRAY_TASK_ID": "two"}, r"SLURM_ARRAY_TASK_ID='two' is not an integer"),
    ({**slurm(1), "SLURM_ARRAY_TASK_MAX": "3.0"}, r"SLURM_ARRAY_TASK_MAX='3\.0' is not an integer"),
    ({"PBS_ARRAY_INDEX": "1x"}, r"PBS_ARRAY_INDEX='1x' is not an integer"),
    ({"LSB_JOBINDEX": "a"}, r"LSB_JOBINDEX='a' is not an integer"),
    ({"SGE_TASK_ID": "1", "SGE_TASK_LAST": "n"}, r"SGE_TASK_LAST='n' is not an integer"),
    ({"KD_NUM_TASKS": "4 tasks"}, r"KD_NUM_TASKS='4 tasks' is not an integer"),
    ({"KD_TASK_INDEX": "-1", "KD_NUM_TASKS": "4"}, r"task index -1 \(KD_TASK_INDEX\) is outside"),
    ({"KD_TASK_INDEX": "4", "KD_NUM_TASKS": "4"}, r"task index 4 \(KD_TASK_INDEX\) is outside"),
    ({"KD_NUM_TASKS": "0"}, r"KD_NUM_TASKS=0: the task count must be at least 1"),
    ({"SLURM_ARRAY_TASK_ID": "-1", "SLURM_ARRAY_TASK_COUNT": "4"}, r"task index -1"),
])
def test_malformed_env(env, pattern):
    with raises(pattern):
        resolve_task(env=env)


def test_malformed_env_raises_even_with_explicit_args():
    # The environment is always validated: a broken array export is worth knowing about.
    with raises(r"SLURM_ARRAY_TASK_ID='x' is not an integer"):
        resolve_task(0, 1, env={"SLURM_ARRAY_TASK_ID": "x"})


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 13])
@pytest.mark.parametrize("total", [0, 1, 5, 10, 12, 101])
def test_row_ranges_partition_all_rows(n, total):
    ranges = [row_range(i, n, total) for i in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end == start
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_row_range_formula():
    assert row_range(0, 3, 10) == (0, 3)
    assert row_range(1, 3, 10) == (3, 6)
    assert row_range(2, 3, 10) == (6, 10)
    assert row_range(5, 8, 3) == (1, 2)


@pytest.mark.parametrize("args", [(3, 3, 10), (-1, 3, 10), (0, 0, 10), (0, 1, -1)])
def test_row_range_invalid(args):
    with raises(r"no row range for task"):
        row_range(*args)


def test_import_reads_no_environment():
    # A malformed variable must not break `import pipeline.jobarray`, only resolve_task().
    code = "import pipeline.jobarray"
    env = {**os.environ, "KD_TASK_INDEX": "x", "SLURM_ARRAY_TASK_ID": "y"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
