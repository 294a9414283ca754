"""`kd slurm`: the generated sbatch scripts (array spec, throttle, flags, quoting), resubmission
of missing tasks only, submission through a stand-in `sbatch`, and `kd finalize` idempotence.
The same scripts run on a real cluster in tests/slurm/."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import jobarray, manifest
from pipeline.cli import cli
from pipeline.errors import KDError
from pipeline.slurm import array_spec, compress, default_kd
from stages import teacher
from stages.teacher import TeacherConfig
from tests.conftest import build_model, make_data

SC = "sequence-classification"
FLAGS = ["--cpus-per-task", "4", "--mem", "16G", "--time", "1:00:00", "--partition", "gpu",
         "--account", "proj", "--gpus", "a100:1", "--extra-sbatch", "--qos=high --exclusive",
         "--extra-sbatch", "--constraint=ib"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("slurm-unit")
    return {"model": build_model(root / "model", SC, tokenizer_dir), "data": make_data(root / "d.jsonl", SC, n=12)}


def stage_args(tiny, out, *extra) -> list[str]:
    return ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--task-type", SC,
            "--max-length", "16", "--out", str(out), *extra]


def kd(*args, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(cli, list(args))
    finally:
        os.chdir(old)


def heredoc(driver: str, tag: str) -> str:
    m = re.search(rf"<<'{tag}'\n(.*?){tag}\n", driver, re.S)
    assert m, driver
    return m.group(1)


def sbatch_flags(script: str) -> list[str]:
    return [shlex.split(line[len("#SBATCH "):])[0] for line in script.splitlines() if line.startswith("#SBATCH ")]


def exec_argv(script: str) -> list[str]:
    """The `exec` command of a job script as the shell will see it."""
    body = script.replace("\\\n", " ")
    line = next(x for x in body.splitlines() if x.startswith("exec "))
    return shlex.split(line)[1:]


def cfg(tiny, out, **kw) -> TeacherConfig:
    return TeacherConfig(model=str(tiny["model"]), data=str(tiny["data"]), task_type=SC,
                         out=None if out is None else str(out), max_length=16, progress=False, **kw)


# --- array syntax -----------------------------------------------------------------------------


def test_compress_and_array_spec():
    assert compress(range(4)) == "0-3"
    assert compress([8, 0, 1, 2, 5, 7, 2]) == "0-2,5,7-8"
    assert compress([3]) == "3"
    assert array_spec(range(4), 2) == "0-3%2"
    assert array_spec([1, 3], None) == "1,3"
    with pytest.raises(KDError, match="at least 1"):
        array_spec([0], 0)


# --- the generated scripts --------------------------------------------------------------------


def test_teacher_script_flags_quoting_and_finalize(tmp_path, tiny):
    out = tmp_path / "o u'x"  # a space and a quote survive both shell and #SBATCH parsing
    r = kd("slurm", "teacher", "--num-tasks", "4", "-M", "2", *FLAGS, "--logs", str(tmp_path / "my logs"),
           "--kd", "/opt/kd env/bin/kd", "--", *stage_args(tiny, out, "--shard-rows", "3"), cwd=tmp_path)
    assert r.exit_code == 0, r.output
    driver = r.output
    assert driver.startswith("#!/bin/bash\n") and "mkdir -p " + shlex.quote(str(tmp_path / "my logs")) in driver
    array, after = heredoc(driver, "KD_ARRAY"), heredoc(driver, "KD_AFTER")
    flags = sbatch_flags(array)
    assert flags == ["--job-name=kd-teacher-o_u_x", "--array=0-3%2", f"--output={tmp_path}/my logs/%x-%A_%a.out",
                     f"--chdir={tmp_path}", "--partition=gpu", "--account=proj", "--gres=gpu:a100:1",
                     "--cpus-per-task=4", "--mem=16G", "--time=1:00:00", "--qos=high", "--exclusive",
                     "--constraint=ib"]
    assert f'#SBATCH "--output={tmp_path}/my logs/%x-%A_%a.out"' in array  # sbatch knows double quotes only
    assert exec_argv(array) == ["/opt/kd env/bin/kd", "teacher", *stage_args(tiny, out, "--shard-rows", "3"),
                                "--num-tasks", "4", "--task-index", "$task"]
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in array
    assert "sbatch --parsable --dependency=afterok:$array --kill-on-invalid-dep=yes <<'KD_AFTER'" in driver
    assert exec_argv(after) == ["/opt/kd env/bin/kd", "finalize", str(out)]
    aflags = sbatch_flags(after)
    assert "--partition=gpu" in aflags and "--account=proj" in aflags
    assert not any(f.startswith(("--gres", "--mem", "--array", "--qos")) for f in aflags)
    assert not out.exists(), "printing a script must not create the output"


def test_array_script_runs_the_stage_with_an_explicit_index(tmp_path, tiny):
    """Run the job script with bash as SLURM would for task 2 of a resubmitted subset 1,2: the
    stage gets --task-index 2 --num-tasks 4 and none of the subset's MIN/MAX/COUNT."""
    fake = tmp_path / "fake kd"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/argv"\n'
                    'env | grep ^SLURM_ARRAY | sort > "$(dirname "$0")/env"\n')
    fake.chmod(0o755)
    out = tmp_path / "c a$che"
    r = kd("slurm", "teacher", "--num-tasks", "4", "--kd", str(fake), "--", *stage_args(tiny, out), cwd=tmp_path)
    script = heredoc(r.output, "KD_ARRAY")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2",
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_STEP": "1", "SLURM_JOB_ID": "7"}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["teacher", *stage_args(tiny, out), "--num-tasks", "4", "--task-index", "2"]
    assert (tmp_path / "env").read_text().split() == ["SLURM_ARRAY_TASK_ID=2"]
    # Why the script unsets them: the subset's variables contradict the explicit count.
    with pytest.raises(KDError):
        jobarray.resolve_task(2, 4, {k: v for k, v in env.items() if k.startswith("SLURM_ARRAY")})
    assert jobarray.resolve_task(2, 4, {"SLURM_ARRAY_TASK_ID": "2"}) == (2, 4)
    # Outside an array the script refuses to guess an index.
    bare = {k: v for k, v in env.items() if not k.startswith("SLURM_ARRAY")}
    proc = subprocess.run(["bash", "-c", script], env=bare, capture_output=True, text=True)
    assert proc.returncode != 0 and "job array task" in proc.stderr


def test_default_kd_is_this_kd_by_absolute_path(tmp_path, tiny):
    found = default_kd()
    assert os.path.isabs(found) and os.access(found, os.X_OK) and Path(found).name == "kd"
    if Path(sys.executable).with_name("kd").is_file():  # a venv: its own kd, not whatever is on PATH
        assert found == str(Path(sys.executable).with_name("kd"))
    r = kd("slurm", "teacher", "--num-tasks", "2", "--", *stage_args(tiny, tmp_path / "o"))
    assert exec_argv(heredoc(r.output, "KD_ARRAY"))[0] == found


def test_stage_arguments_are_checked_before_anything_is_submitted(tmp_path, tiny):
    def err(*args):
        r = kd("slurm", "teacher", *args)
        assert r.exit_code != 0
        return r.output

    assert "--num-tasks" in err("--", *stage_args(tiny, tmp_path / "o"))
    assert "drop --task-index" in err("--num-tasks", "2", "--", *stage_args(tiny, tmp_path / "o", "--task-index", "1"))
    assert "say --num-tasks 3" in err("--num-tasks", "2", "--", *stage_args(tiny, tmp_path / "o", "--num-tasks", "3"))
    assert "--task-type" in err("--num-tasks", "2", "--", "--model", "m", "--data", "d", "--task-type", "nope", "--out", "o")
    assert "--out DIR or --cache-root" in err("--num-tasks", "2", "--", "--model", "m", "--data", "d", "--task-type", SC)
    # --num-tasks inside the stage arguments is enough
    r = kd("slurm", "teacher", "--", *stage_args(tiny, tmp_path / "o", "--num-tasks", "3"))
    assert r.exit_code == 0 and "--array=0-2\n" in r.output


# --- resubmission -----------------------------------------------------------------------------


def test_resubmission_covers_only_missing_tasks(tmp_path, tiny):
    out = tmp_path / "cache"
    for i in (1, 3):
        teacher.run(cfg(tiny, out, task_index=i, num_tasks=4))
    args = ("slurm", "teacher", "--num-tasks", "4", "-M", "2", "--", *stage_args(tiny, out))
    r = kd(*args)
    assert r.exit_code == 0, r.output
    assert sbatch_flags(heredoc(r.output, "KD_ARRAY"))[1] == "--array=0,2%2"
    assert "2 of 4 task(s)" in r.output
    st = kd("status", str(out))
    assert "missing tasks: 0,2" in st.output
    # a different count or different inputs are refused rather than mixed into this cache
    assert "started as 4 tasks" in kd("slurm", "teacher", "--num-tasks", "2", "--", *stage_args(tiny, out)).output
    other = kd("slurm", "teacher", "--num-tasks", "4", "--", *stage_args(tiny, out, "--top-k", "1"))
    assert other.exit_code != 0 and "different, partly built" in other.output
    # every task done but no manifest (say the last task died while finalizing): only finalize
    teacher.run(cfg(tiny, out, task_index=0, num_tasks=4))
    teacher.run(cfg(tiny, out, task_index=2, num_tasks=4))
    (out / manifest.MANIFEST).unlink()
    r = kd(*args)
    assert r.exit_code == 0 and "KD_ARRAY" not in r.output and "--dependency" not in r.output
    assert exec_argv(heredoc(r.output, "KD_AFTER"))[1:] == ["finalize", str(out)]
    # complete: nothing to submit, nothing on stdout
    assert kd("finalize", str(out)).exit_code == 0
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0 and r.stdout == "" and "already complete: nothing to submit" in r.stderr


def test_cache_root_resolves_the_keyed_directory(tmp_path, tiny):
    root = tmp_path / "root"
    args = ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--task-type", SC, "--max-length", "16",
            "--cache-root", str(root)]
    key = teacher.resolve_inputs(cfg(tiny, None, cache_root=str(root))).key
    r = kd("slurm", "teacher", "--num-tasks", "2", "--", *args)
    assert r.exit_code == 0, r.output
    assert exec_argv(heredoc(r.output, "KD_AFTER"))[1:] == ["finalize", str(root / key)]
    assert f"--job-name=kd-teacher-{key[:12]}" in r.output
    teacher.run(cfg(tiny, None, cache_root=str(root), task_index=0, num_tasks=2))
    r = kd("slurm", "teacher", "--num-tasks", "2", "--", *args)
    assert "--array=1\n" in r.output
    (tmp_path / "real").mkdir()
    r = kd("slurm", "teacher", "--num-tasks", "2", "--", *args, "--out", str(tmp_path / "real"))
    assert r.exit_code != 0 and "is not a symlink" in r.output


# --- submission -------------------------------------------------------------------------------


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` on PATH that records its arguments and script, and answers job ids 101, 102, …"""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f"""#!/bin/bash
dir={tmp_path}/calls
mkdir -p "$dir"; n=$(ls "$dir" | wc -l); n=$((n / 2 + 1))
printf '%s\\n' "$@" > "$dir/$n.args"; cat > "$dir/$n.script"
[ -n "$FAIL_SBATCH" ] && [ "$n" -ge "$FAIL_SBATCH" ] && {{ echo "sbatch: error: Invalid account" >&2; exit 1; }}
echo "$((100 + n));cluster"
""")
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "calls"


def test_submit_prints_job_ids_and_chains_finalize(tmp_path, tiny, fake_sbatch):
    out = tmp_path / "c"
    r = CliRunner().invoke(cli, ["slurm", "teacher", "--num-tasks", "3", "-M", "1", "--logs",
                                                 str(tmp_path / "logs"), "--submit", "--", *stage_args(tiny, out)])
    assert r.exit_code == 0, r.output + r.stderr
    assert r.stdout == "101\n102\n"
    assert "job array 101" in r.stderr and (tmp_path / "logs").is_dir()
    calls = sorted(fake_sbatch.glob("*.args"))
    assert [p.read_text().split() for p in calls] == [
        ["--parsable"], ["--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes"]]
    script = (fake_sbatch / "1.script").read_text()
    assert "#SBATCH --array=0-2%1" in script and exec_argv(script)[-4:] == ["--num-tasks", "3", "--task-index", "$task"]
    assert exec_argv((fake_sbatch / "2.script").read_text())[1:] == ["finalize", str(out)]


def test_submit_failure_is_one_line_naming_what_was_submitted(tmp_path, tiny, fake_sbatch, monkeypatch):
    monkeypatch.setenv("FAIL_SBATCH", "2")
    monkeypatch.chdir(tmp_path)  # the default ./slurm-logs is created here
    r = CliRunner().invoke(cli, ["slurm", "teacher", "--num-tasks", "2", "--submit", "--",
                                                 *stage_args(tiny, tmp_path / "c")])
    assert r.exit_code != 0
    assert "Invalid account" in r.stderr and "job array 101 was submitted" in r.stderr
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    r = CliRunner().invoke(cli, ["slurm", "teacher", "--num-tasks", "2", "--kd", "/x/kd", "--submit",
                                                 "--", *stage_args(tiny, tmp_path / "d")])
    assert r.exit_code != 0 and "sbatch not found" in r.stderr


# --- finalize and the sweep ---------------------------------------------------------------------


def test_finalize_on_a_complete_output_is_a_no_op(tmp_path, tiny):
    out = tmp_path / "c"
    teacher.run(cfg(tiny, out))
    before = (out / manifest.MANIFEST).read_bytes()
    r = kd("finalize", str(out))
    assert r.exit_code == 0 and "already complete" in r.output
    assert (out / manifest.MANIFEST).read_bytes() == before


def test_train_sweep_script_and_resubmission(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {name: small, student_layers: '0'}\n- {name: big, lr: 0.001}\n- {lr: 0.01}\n")
    args = ["--targets", str(tmp_path / "cache"), "--student-from-teacher", "t", "--student-layers", "0,1",
            "--sweep", str(sweep), "--out", str(tmp_path / "students"), "--max-steps", "5"]
    r = kd("slurm", "train", "-M", "2", "--gpus", "1", "--", *args, cwd=tmp_path)
    assert r.exit_code == 0, r.output
    array, after = heredoc(r.output, "KD_ARRAY"), heredoc(r.output, "KD_AFTER")
    assert "--array=0-2%2" in sbatch_flags(array) and "--gres=gpu:1" in sbatch_flags(array)
    assert exec_argv(array) == [default_kd(), "train", *args, "--task-index", "$task"]  # the count is the file's
    dirs = [str(tmp_path / "students" / n) for n in ("small", "big", "002")]
    assert exec_argv(after) == [default_kd(), "slurm", "summary", *dirs]
    assert "--dependency=afterany:$array" in r.output
    # entry 1 done: only 0 and 2 go out again
    Path(dirs[1]).mkdir(parents=True)
    Path(dirs[1], "manifest.json").write_text(json.dumps({"kind": "student", "key": "k" * 64, "upstream": [
        {"kind": "targets", "key": "c" * 64}], "stats": {"final": {"loss": 0.5}}}))
    r = kd("slurm", "train", "--", *args, cwd=tmp_path)
    assert "--array=0,2\n" in r.output
    summary = kd("slurm", "summary", *dirs)
    assert summary.exit_code == 1
    assert f"{dirs[1]}: complete student kkkkkkkkkkkk from cccccccccccc; loss=0.5" in summary.output
    assert f"{dirs[0]}: not started" in summary.output and "2 of 3 output(s) incomplete" in summary.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {lr: 0.1}\n- {nonsense: 1}\n")
    r = kd("slurm", "train", "--", *args[:6], "--sweep", str(bad), "--out", "s")
    assert r.exit_code != 0 and "entry 1" in r.output
    r = kd("slurm", "train", "--num-tasks", "5", "--", *args)
    assert r.exit_code != 0 and "has 3 entries" in r.output
    assert "--sweep FILE" in kd("slurm", "train", "--", "--targets", "c", "--out", "s").output
