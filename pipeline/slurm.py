"""`kd slurm`: a stage as a SLURM job array plus one dependent job, resubmitting only what is missing.

`kd slurm teacher|train|tune [SCHEDULER FLAGS] -- STAGE ARGS` prints a driver script (bash) that
holds two complete sbatch scripts and submits them; with `--submit` it submits them itself
and prints the job ids (array first), one per line. Both paths use the same script texts:

- the array: `--array=<indices>%M`, one log per task (`LOGS/%x-%A_%a.out`), the resource
  flags, `--chdir` = the directory you generated from (so relative paths mean the same), and
  `exec KD STAGE ARGS --num-tasks N --task-index $SLURM_ARRAY_TASK_ID`;
- the dependent job: for stage 1 `kd finalize OUT` with `--dependency=afterok:<array>` and
  `--kill-on-invalid-dep=yes` (a failed task cancels it rather than leaving it pending
  forever); for a sweep `kd slurm summary STUDENT_DIRS` with `afterany`, which lists every
  student and fails unless all are complete (so `afterok` on it gates what comes next); for a
  tune grid (task i = point i) the same `kd tune` without an index, `afterok`, which finds
  every point done and writes the tune's outputs (with the array's cpus, memory and time).

Every value that lands in a script (stage arguments, paths, scheduler flags, the working
directory) is shell-quoted where it is a command word and refused when it holds a newline, a
NUL or another control character (`check_script_values`): a newline in `--out` would end a
comment line or a heredoc and make the rest of the value a command of the driver script.

The index is passed explicitly because a resubmission covers a subset (`--array=1,3`), for
which SLURM's MIN/MAX/COUNT describe the subset, not the N-task partition; the script unsets
them so `pipeline.jobarray` sees only the explicit --task-index/--num-tasks.
Before generating, the stage's output is inspected: tasks whose completion records exist (a
student: its manifest) are left out; a complete output submits nothing. No import-time work.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click

from pipeline.errors import KDError, short

TASK_INDEX = '--task-index "$task"'


@dataclasses.dataclass
class Scheduler:
    """The flags that go to sbatch (not to the stage)."""

    array_parallel: int | None = None
    cpus_per_task: int | None = None
    gpus: str | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    logs: str | None = None
    kd: str | None = None
    extra_sbatch: tuple[str, ...] = ()


@dataclasses.dataclass
class Work:
    """What to submit: `indices` of `num_tasks` tasks of `stage` (empty: only the after-job)."""

    stage: str
    stage_args: list[str]
    num_tasks: int
    indices: list[int]
    out: Path
    after: list[str]          # the dependent job's kd arguments, e.g. ["finalize", OUT]
    name: str                 # default job name
    complete: bool = False
    dependency: str = "afterok"   # of the dependent job on the array
    count_flag: bool = True       # the stage takes --num-tasks (a sweep's count is its file's)
    after_like_array: bool = False  # the dependent job gets the array's cpus, memory and time, not 1 cpu for 10 min

    @property
    def after_label(self) -> str:
        return self.after[1] if self.after[0] == "slurm" else self.after[0]


# --- script text ----------------------------------------------------------------------------


def safe(value, what: str) -> str:
    """`value` as text for a generated script, refused when it holds a control character."""
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise KDError(f"{what} {short(text)} holds a newline or another control character, which cannot go into a job "
                      f"script; rename it")
    return text


def check_script_values(work: Work, s: Scheduler, kd: str, logs: str, cwd: str) -> None:
    """Refuse, before any script is written, every value that could break out of its line."""
    for a in work.stage_args:
        safe(a, "stage argument")
    for a in work.after:
        safe(a, "argument")
    safe(work.out, "output directory")
    safe(kd, "--kd")
    safe(logs, "--logs")
    safe(cwd, "the working directory")
    for f in dataclasses.fields(s):
        for v in (getattr(s, f.name) if f.name == "extra_sbatch" else [getattr(s, f.name)]):
            if v is not None:
                safe(v, f"--{f.name.replace('_', '-')}")


def compress(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (SLURM's --array syntax)."""
    idx = sorted(set(int(i) for i in indices))
    parts, start = [], idx[0]
    for prev, cur in zip(idx, idx[1:] + [None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def array_spec(indices, parallel: int | None) -> str:
    if parallel is not None and parallel < 1:
        raise KDError(f"--array-parallel {parallel}: give at least 1")
    return compress(indices) + (f"%{parallel}" if parallel else "")


def default_kd() -> str:
    """Absolute path of the running `kd`, so jobs work without the venv on their PATH."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "kd":
        found = argv0 if os.sep in argv0 else shutil.which(argv0)
        if found:
            return os.path.abspath(found)
    sibling = Path(sys.executable).with_name("kd")
    if sibling.is_file():
        return str(sibling)
    if found := shutil.which("kd"):
        return os.path.abspath(found)
    raise KDError("cannot find the kd executable to call from the jobs; pass --kd PATH")


def _command(argv: list[str], tail: str = "") -> str:
    """Shell-quoted command, one option per line."""
    words = [shlex.quote(a) for a in argv]
    lines, cur = [], [words[0]]
    for w, raw in zip(words[1:], argv[1:]):
        if raw.startswith("-") and len(cur) > 1:
            lines.append(" ".join(cur))
            cur = []
        cur.append(w)
    lines.append(" ".join(cur) + (f" {tail}" if tail else ""))
    return " \\\n    ".join(lines)


def _header(s: Scheduler, name: str, output: str, gpus: bool, cwd: str) -> list[str]:
    lines = [f"--job-name={name}", f"--output={output}", f"--chdir={cwd}"]
    lines += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account)) if v]
    return lines + ([f"--gres=gpu:{s.gpus}"] if gpus and s.gpus else [])


def _sbatch_lines(flags: list[str]) -> str:
    """#SBATCH lines; sbatch's own parser knows double quotes only (for paths with spaces)."""
    for f in flags:
        safe(f, "sbatch flag")
        if '"' in f:
            raise KDError(f"sbatch flag {short(f)}: double quotes cannot go into an #SBATCH line")
    return "".join(f'#SBATCH "{f}"\n' if any(c.isspace() for c in f) else f"#SBATCH {f}\n" for f in flags)


def array_script(work: Work, s: Scheduler, kd: str, logs: str, cwd: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", s.job_name or work.name)  # %x goes into log file names
    flags = _header(s, name, f"{logs}/%x-%A_%a.out", True, cwd)
    flags.insert(1, f"--array={array_spec(work.indices, s.array_parallel)}")
    flags += [f"--{flag}={value}" for flag, value in
              (("cpus-per-task", s.cpus_per_task), ("mem", s.mem), ("time", s.time)) if value]
    flags += [f for extra in s.extra_sbatch for f in shlex.split(extra)]
    argv = [kd, work.stage, *work.stage_args] + (["--num-tasks", str(work.num_tasks)] if work.count_flag else [])
    threads = "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}\n" if s.cpus_per_task else ""
    return (f"#!/bin/bash\n{_sbatch_lines(flags)}"
            f"# kd {work.stage}: task $SLURM_ARRAY_TASK_ID of {work.num_tasks} -> {shlex.quote(safe(work.out, 'output'))}\n"
            "set -euo pipefail\n"
            'task=${SLURM_ARRAY_TASK_ID:?"this script runs as a SLURM job array task"}\n'
            "# A resubmitted subset (--array=1,3) has MIN/MAX/COUNT of the subset, not of all\n"
            f"# {work.num_tasks} tasks: the index goes explicitly, and these must not contradict it.\n"
            "unset SLURM_ARRAY_TASK_COUNT SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_MAX SLURM_ARRAY_TASK_STEP\n"
            f"{threads}"
            f"echo \"kd {work.stage} task $task of {work.num_tasks} on $(hostname) (job $SLURM_JOB_ID)\" >&2\n"
            f"exec {_command(argv, TASK_INDEX)}\n")


def after_script(work: Work, s: Scheduler, kd: str, logs: str, cwd: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{s.job_name or work.name}-{work.after_label}")
    resources = ["--cpus-per-task=1", "--time=10:00"]
    if work.after_like_array:  # `kd tune` re-checks every point (hashing its cache) before it writes the outputs
        resources = [f"--{flag}={value}" for flag, value in
                     (("cpus-per-task", s.cpus_per_task), ("mem", s.mem), ("time", s.time)) if value]
    flags = _header(s, name, f"{logs}/%x-%j.out", False, cwd) + ["--ntasks=1", *resources]
    return (f"#!/bin/bash\n{_sbatch_lines(flags)}"
            f"# runs after the {work.stage} array ({work.dependency})\n"
            f"set -euo pipefail\nexec {_command([kd, *work.after])}\n")


def after_flags(work: Work, array_id: str) -> list[str]:
    return [f"--dependency={work.dependency}:{array_id}", "--kill-on-invalid-dep=yes"]


def driver_script(work: Work, array_text: str | None, after_text: str, logs: str) -> str:
    """A bash script that submits both jobs (what `--submit` does) and prints their ids."""
    head = (f"#!/bin/bash\n# Generated by `kd slurm {work.stage}`: "
            + (f"{len(work.indices)} of {work.num_tasks} task(s) of `kd {work.stage}`, then "
               f"`kd {' '.join(shlex.quote(safe(a, 'argument')) for a in work.after[:1 if work.after[0] == work.stage else 2])}`.\n"
               if array_text else f"no task is missing; only `kd {work.after_label}`.\n")
            + f"# Run it on a SLURM login node: bash THIS_FILE\nset -euo pipefail\nmkdir -p {shlex.quote(logs)}\n")
    if array_text is None:
        return head + f"sbatch --parsable <<'KD_AFTER'\n{after_text}KD_AFTER\n"
    return (head + f"array=$(sbatch --parsable <<'KD_ARRAY'\n{array_text}KD_ARRAY\n)\n"
            "array=${array%%;*}\necho \"$array\"\n"
            f"sbatch --parsable {' '.join(after_flags(work, '$array'))} <<'KD_AFTER'\n{after_text}KD_AFTER\n")


# --- what is missing ------------------------------------------------------------------------


def _teacher_key(p: dict) -> str:
    from pipeline.config import TeacherConfig
    from pipeline.inputs import resolve_inputs  # tokenizer + data + weight hashes, no forward

    return resolve_inputs(TeacherConfig(**p, progress=False)).key


def teacher_work(stage_args: list[str], p: dict, num_tasks: int | None) -> Work:
    """Stage 1: which of the N tasks still lack a completion record in the cache directory.
    `p` is `stage_args` parsed by `kd teacher`'s own parser (defaults, --config, validation)."""
    from pipeline import manifest

    if num_tasks is not None and p.get("num_tasks") is not None and num_tasks != p["num_tasks"]:
        raise KDError(f"--num-tasks {num_tasks} but the stage arguments say --num-tasks {p['num_tasks']}; give one")
    n = num_tasks if num_tasks is not None else p.get("num_tasks")
    if n is None or n < 1:
        raise KDError(f"say how many array tasks (at least 1): --num-tasks N, not {n}")
    if not p.get("out") and not p.get("cache_root"):
        raise KDError("say where the cache goes: --out DIR or --cache-root DIR (in the stage arguments)")
    key = None
    if p.get("cache_root"):  # the keyed directory is only known from the inputs' fingerprints
        if p.get("out") and os.path.exists(p["out"]) and not os.path.islink(p["out"]):
            raise KDError(f"--out {p['out']} exists and is not a symlink (with --cache-root it becomes one)")
        key = _teacher_key(p)
        out = Path(p["cache_root"]).absolute() / key
    else:
        out = Path(p["out"]).absolute()
    name = "kd-teacher-" + ((p.get("out") and Path(p["out"]).name) or key[:12])
    work = Work("teacher", list(stage_args), n, list(range(n)), out, ["finalize", str(out)], name)
    if not (out / manifest.PLAN).exists():
        return work
    if (out / manifest.MANIFEST).exists():
        work.indices, work.complete = [], True
        return work
    st = manifest.status(out)
    key = key or _teacher_key(p)
    if st["key"] != key:
        if st["done"]:
            raise KDError(f"{out} holds a different, partly built targets output ({st['key'][:12]}, these "
                          f"arguments give {key[:12]}); choose another --out or delete that directory")
        return work  # nothing kept from the other run: the tasks start it afresh
    if st["num_tasks"] != n:
        raise KDError(f"{out} was started as {st['num_tasks']} tasks, not {n}; "
                      f"resubmit with --num-tasks {st['num_tasks']} or use a fresh --out")
    work.indices = st["missing"]
    return work


def train_work(stage_args: list[str], p: dict, num_tasks: int | None) -> Work:
    """A sweep: entry i is task i; it is done when its student directory has a manifest."""
    from pipeline import manifest, sweep
    from pipeline.config import TrainConfig

    if not p.get("sweep"):
        raise KDError("kd slurm train runs a sweep: give --sweep FILE (one student per entry) in the stage arguments")
    n = len(sweep.load(p["sweep"]))
    if num_tasks is not None and num_tasks != n:
        raise KDError(f"--num-tasks {num_tasks} but --sweep {p['sweep']} has {n} entries; drop --num-tasks")
    cfg = TrainConfig(**p, progress=False)
    outs = [Path(sweep.select(cfg, p["sweep"], i)[0].out).absolute() for i in range(n)]  # checks every entry
    missing = [i for i, o in enumerate(outs) if not (o / manifest.MANIFEST).exists()]
    name = "kd-train-" + Path(p.get("out") or p["sweep"]).name
    common = Path(os.path.commonpath(outs)) if n > 1 else outs[0]
    return Work("train", list(stage_args), n, missing, common, ["slurm", "summary", *map(str, outs)], name,
                complete=not missing, dependency="afterany", count_flag=False)


def tune_work(stage_args: list[str], p: dict, num_tasks: int | None) -> Work:
    """A tune grid: point i is task i; it is done when its student and its evaluation have
    manifests. The dependent job is the same `kd tune` without an index (afterok), which finds
    every point done and writes the outputs; a tune already complete under this key submits nothing."""
    from pipeline import manifest, tuning
    from pipeline.config import TuneConfig, build

    cfg = build(TuneConfig, {**p, "progress": False}, "kd tune")
    points = tuning.grid(cfg.temperatures, cfg.alphas, cfg.losses)
    if num_tasks is not None and num_tasks != len(points):
        raise KDError(f"--num-tasks {num_tasks} but the grid has {len(points)} points; drop --num-tasks")
    caches, validation = tuning.open_caches(cfg)  # refused here, not in every array task
    for point in points:
        tuning.point_config(cfg, point)
    out = Path(cfg.out).absolute()
    missing = [i for i, point in enumerate(points) if not (tuning.student_dir(out, point) / manifest.MANIFEST).exists()
               or not (tuning.eval_dir(out, point) / manifest.MANIFEST).exists()]
    done = (out / manifest.MANIFEST).exists() and \
        manifest.read_manifest(out, kind="tune")["key"] == tuning.tune_key(cfg, points, caches, validation)
    return Work("tune", list(stage_args), len(points), missing, out, ["tune", *stage_args], "kd-tune-" + out.name,
                complete=done and not missing, count_flag=False, after_like_array=True)


# --- CLI ------------------------------------------------------------------------------------


def _sbatch(script: str, flags: list[str]) -> str:
    if (exe := shutil.which("sbatch")) is None:
        raise KDError("sbatch not found on PATH: run this on a SLURM login node, or drop --submit "
                      "and run the printed script there")
    proc = subprocess.run([exe, "--parsable", *flags], input=script, text=True, capture_output=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise KDError(f"sbatch refused the job: {why}")
    return proc.stdout.strip().split(";")[0]


def emit(work: Work, s: Scheduler, submit: bool) -> None:
    """Print the driver script, or submit the jobs and print their ids (array first)."""
    if work.complete:
        click.echo(f"{work.out} is already complete: nothing to submit", err=True)
        return
    kd = (os.path.abspath(s.kd) if os.sep in s.kd else shutil.which(s.kd) or s.kd) if s.kd else default_kd()
    logs = os.path.abspath(s.logs or "slurm-logs")
    cwd = os.getcwd()
    check_script_values(work, s, kd, logs, cwd)
    arr = array_script(work, s, kd, logs, cwd) if work.indices else None
    after = after_script(work, s, kd, logs, cwd)
    if not submit:
        click.echo(driver_script(work, arr, after, logs), nl=False)
        return
    os.makedirs(logs, exist_ok=True)  # sbatch does not create the directory of --output
    if arr is None:  # every task is done, only the manifest is not written: just the after-job
        click.echo(_sbatch(after, []))
        return
    array_id = _sbatch(arr, [])
    click.echo(array_id)
    try:
        after_id = _sbatch(after, after_flags(work, array_id))
    except KDError as exc:
        raise KDError(f"{exc} (job array {array_id} was submitted; run `kd {' '.join(work.after)}` "
                      f"after it ends)") from None
    click.echo(after_id)
    click.echo(f"submitted job array {array_id}: kd {work.stage} task(s) {compress(work.indices)} of "
               f"{work.num_tasks}; job {after_id}: kd {work.after_label} ({work.dependency}); logs in {logs}",
               err=True)
