"""Which slice of the work is ours: job-array environment -> (task_index, num_tasks) -> rows.

Every stage that fans out runs as task i of n and owns a contiguous, deterministic range of
rows of the frozen input order (DESIGN.md, "Job arrays and resumability"). A wrong i or n does
not crash: it silently skips or duplicates rows. So every value read here is checked, and
anything inconsistent raises `KDError` naming the variable and what to do. Sources, all
normalised to a 0-based index and a count:

- explicit ``task_index`` / ``num_tasks`` (the CLI's ``--task-index`` / ``--num-tasks``);
- SLURM ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_MIN/MAX/STEP`` (index = (ID-MIN)/STEP,
  so ``--array=1-8`` and ``--array=0-14:2`` work; uneven lists like ``1,5,9`` are refused), or
  with only ``SLURM_ARRAY_TASK_COUNT`` (then ID is the 0-based index);
- PBS Pro ``PBS_ARRAY_INDEX`` / Torque ``PBS_ARRAYID``: used as the index, so submit with
  ``-J 0-(n-1)`` / ``-t 0-(n-1)``. PBS exports no count: pass --num-tasks or set KD_NUM_TASKS;
- LSF ``LSB_JOBINDEX`` (1-based; 0 = not an array) with ``LSB_JOBINDEX_END/STEP``. LSF exports
  no start, so arrays must start at 1 (``-J "name[1-n]"``); without END the count must be given;
- SGE ``SGE_TASK_ID`` (1-based; "undefined" outside arrays) with ``SGE_TASK_FIRST/LAST/STEPSIZE``;
- generic ``KD_TASK_INDEX`` (0-based) / ``KD_NUM_TASKS``, for any other launcher.

Empty variables count as unset. Nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

from pipeline.errors import KDError

_FIX = "resubmit the array or pass --task-index/--num-tasks"


class _Reading(NamedTuple):  # one source: 0-based index, count (None = unknown), variables
    scheduler: str
    index: int | None
    count: int | None
    index_var: str
    count_var: str


def _int(env: Mapping[str, str], name: str, undefined: tuple[str, ...] = ()) -> int | None:
    """Parse one variable as an integer; unset, empty or a scheduler's 'no value' -> None."""
    raw = env.get(name, "").strip()
    if raw == "" or raw in undefined:
        return None
    try:
        return int(raw, 10)
    except ValueError:
        raise KDError(f"{name}={raw!r} is not an integer; unset it or {_FIX}") from None


def _grid(var: str, value: int, first: int, last: int | None, step: int | None,
          names: str) -> tuple[int, int | None]:
    """Position of `value` on the range first..last by step -> (0-based index, count or None).

    Schedulers hand out array values, not positions; rows are assigned by position, so a value
    off the grid means the variables do not describe this array and we must not guess.
    """
    step = 1 if step is None else step
    if step < 1:
        raise KDError(f"{names}: step {step} is not positive; {_FIX}")
    if value < first or (last is not None and value > last) or (value - first) % step:
        raise KDError(f"{var}={value} is not on the array range {first}..{last}:{step} "
                      f"({names}); {_FIX}")
    count = None if last is None else (last - first) // step + 1
    return (value - first) // step, count


def _slurm(env: Mapping[str, str]) -> _Reading | None:
    tid = _int(env, "SLURM_ARRAY_TASK_ID")
    if tid is None:
        return None
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    lo, hi = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
    if lo is None or hi is None:
        return _Reading("slurm", tid, count, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    index, grid = _grid("SLURM_ARRAY_TASK_ID", tid, lo, hi, _int(env, "SLURM_ARRAY_TASK_STEP"),
                        "SLURM_ARRAY_TASK_MIN/MAX/STEP")
    if count is not None and count != grid:
        # e.g. --array=1,5,9: MIN/MAX/STEP no longer describe the tasks, so positions are unknowable.
        raise KDError(f"SLURM_ARRAY_TASK_COUNT={count} but SLURM_ARRAY_TASK_MIN/MAX/STEP describe "
                      f"{grid} tasks; submit an evenly stepped range such as --array=0-{count - 1}")
    return _Reading("slurm", index, grid, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN/MAX/STEP")


def _lsf(env: Mapping[str, str]) -> _Reading | None:
    value = _int(env, "LSB_JOBINDEX")
    if not value:  # LSF sets LSB_JOBINDEX=0 for jobs that are not arrays
        return None
    index, count = _grid("LSB_JOBINDEX", value, 1, _int(env, "LSB_JOBINDEX_END"),
                         _int(env, "LSB_JOBINDEX_STEP"), "LSF arrays must start at 1")
    return _Reading("lsf", index, count, "LSB_JOBINDEX", "LSB_JOBINDEX_END")


def _sge(env: Mapping[str, str]) -> _Reading | None:
    und = ("undefined",)  # SGE's value for these variables in jobs that are not arrays
    value = _int(env, "SGE_TASK_ID", und)
    if value is None:
        return None
    first = _int(env, "SGE_TASK_FIRST", und)
    index, count = _grid("SGE_TASK_ID", value, 1 if first is None else first,
                         _int(env, "SGE_TASK_LAST", und), _int(env, "SGE_TASK_STEPSIZE", und),
                         "SGE_TASK_FIRST/LAST/STEPSIZE")
    return _Reading("sge", index, count, "SGE_TASK_ID", "SGE_TASK_FIRST/LAST/STEPSIZE")


def _kd(env: Mapping[str, str]) -> _Reading | None:
    index, count = _int(env, "KD_TASK_INDEX"), _int(env, "KD_NUM_TASKS")
    if index is None and count is None:
        return None
    return _Reading("kd", index, count, "KD_TASK_INDEX", "KD_NUM_TASKS")


def _readings(env: Mapping[str, str]) -> list[_Reading]:
    pbs = [_Reading("pbs", v, None, var, "") for var in ("PBS_ARRAY_INDEX", "PBS_ARRAYID")
           if (v := _int(env, var)) is not None]
    found = [_slurm(env), *pbs, _lsf(env), _sge(env), _kd(env)]
    return [r for r in found if r is not None]


def _agree(readings: list[_Reading], field: str, var_field: str) -> tuple[int | None, str]:
    """The one value all sources give for `field`; two different values are an error."""
    known = [(getattr(r, field), getattr(r, var_field)) for r in readings
             if getattr(r, field) is not None]
    for value, var in known[1:]:
        if value != known[0][0]:
            # Two launchers (or a stale export) disagree: either choice may lose rows.
            raise KDError(f"{known[0][1]} gives task {field} {known[0][0]} but {var} gives "
                          f"{value}; unset the stale variable or {_FIX}")
    return known[0] if known else (None, "")


def in_array(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a job-array task (some scheduler gives it an index): `kd tune`
    then trains one grid point, and outside an array all of them."""
    return any(r.index is not None for r in _readings(os.environ if env is None else env))


def resolve_task(task_index: int | None = None, num_tasks: int | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's (task_index, num_tasks), 0-based, from explicit arguments and `env`.

    An explicit task_index wins (re-running one task by hand is harmless: outputs are renamed
    into place). An explicit num_tasks must equal the array's count when the environment
    knows one, because a different count re-partitions rows and the tasks would overlap.
    A missing index defaults to 0; a missing count is an error when an index is known, and
    (0, 1) -- "all rows" -- when nothing at all is given.
    """
    env = os.environ if env is None else env
    for name, value in (("--task-index", task_index), ("--num-tasks", num_tasks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise KDError(f"{name}={value!r} is not an integer; pass a whole number")
    readings = _readings(env)
    env_index, index_var = _agree(readings, "index", "index_var")
    env_count, count_var = _agree(readings, "count", "count_var")
    if num_tasks is not None and env_count is not None and num_tasks != env_count:
        raise KDError(f"--num-tasks={num_tasks} but the job array has {env_count} tasks "
                      f"({count_var}); drop --num-tasks or resubmit with {num_tasks} tasks")
    index = task_index if task_index is not None else env_index
    count = num_tasks if num_tasks is not None else env_count
    if count is None:
        if task_index is not None:
            raise KDError(f"--task-index={task_index} given without a task count; "
                          f"pass --num-tasks or set KD_NUM_TASKS")
        if index is not None:
            raise KDError(f"{index_var} gives the task index but no task count is set (PBS "
                          f"exports none); pass --num-tasks or set KD_NUM_TASKS")
        return 0, 1
    index = 0 if index is None else index
    where = "--task-index" if task_index is not None else (index_var or "--task-index")
    if count < 1:
        what = "--num-tasks" if num_tasks is not None else count_var
        raise KDError(f"{what}={count}: the task count must be at least 1; {_FIX}")
    if not 0 <= index < count:
        raise KDError(f"task index {index} ({where}) is outside 0..{count - 1}; {_FIX}")
    return index, count


def row_range(task_index: int, num_tasks: int, total_rows: int) -> tuple[int, int]:
    """Half-open row range [i*N//n, (i+1)*N//n) owned by task i of n.

    Integer arithmetic only, so every task computes the same partition independently: the
    ranges are contiguous, disjoint, cover all rows, and differ in size by at most one.
    """
    if num_tasks < 1 or not 0 <= task_index < num_tasks or total_rows < 0:
        raise KDError(f"no row range for task {task_index} of {num_tasks} over {total_rows} "
                      f"rows; the index must be in 0..num_tasks-1 and rows >= 0")
    return task_index * total_rows // num_tasks, (task_index + 1) * total_rows // num_tasks
