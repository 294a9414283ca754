"""Crafted inputs against the library, no models needed: a planted checkpoint pickle, shell
injection through `kd slurm`, manifest paths outside their directory, planted symlinks, a YAML
bomb, damaged JSON records, unsafe names, and the output lock (with a real process killed by
SIGKILL holding it). Each test fails on the code before the hardening of issue 9."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import checkpoint, config, io, manifest, outputs, sweep
from pipeline.cli import cli
from pipeline.errors import KDError
from stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


class Evil:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg[:2000]
    return msg


# --- 1. a planted checkpoint pickle never runs ---------------------------------------------------

def _planted_checkpoint(out: Path, marker: Path) -> Path:
    path = out / "checkpoints" / "step-000000001"
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": 1, "world_size": 1, "epoch": 0, "batches": 1,
                                                 "rows_in_epoch": 8, "key": "k"}))
    torch.save({"optimizer": Evil(marker), "scheduler": Evil(marker)}, path / "optimizer.pt")
    torch.save(Evil(marker), path / "rng-0.pt")
    with open(path / "model.pt", "wb") as fh:
        pickle.dump(Evil(marker), fh)
    return path


def test_a_planted_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = _planted_checkpoint(tmp_path / "out", marker)
    assert checkpoint.latest(tmp_path / "out") == path
    with pytest.raises(KDError) as info:
        checkpoint.load(path, 0, 1)
    assert "pickle" in one_line(info) and "never loaded" in one_line(info)
    assert not marker.exists(), "the checkpoint's pickle ran code"


def test_pickle_bytes_under_the_new_names_are_refused_too(tmp_path):
    """An attacker who knows the format writes a pickle where the tensors go: safetensors' parser
    refuses it (a header length and JSON, never code)."""
    marker = tmp_path / "pwned"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = checkpoint.save(tmp_path, 3, {"epoch": 0}, model=model.state_dict(), optimizer=opt.state_dict(),
                           scheduler=sched.state_dict())
    for name in ("optimizer.safetensors", "rng-0.safetensors", "model.safetensors"):
        with open(path / name, "wb") as fh:
            pickle.dump(Evil(marker), fh)
    with pytest.raises(KDError, match=r"cannot be read"):
        checkpoint.load(path, 0, 1)
    assert not marker.exists()


def test_checkpoint_files_follow_the_umask(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    path = checkpoint.save(tmp_path, 1, {}, model=model.state_dict(), optimizer=opt.state_dict(),
                           scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict())
    want = 0o666 & ~io._umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == {p.name: want for p in path.iterdir()}


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, 4, {"key": "a" * 64, "settings": {"lr": 0.001, "loss": "kl", "alpha": 0.5}},
                    model=model.state_dict(), optimizer=opt.state_dict(),
                    scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict())
    checkpoint.check_config(tmp_path, "a" * 64, {"lr": 0.001, "loss": "kl", "alpha": 0.5})  # the same: resumes
    with pytest.raises(KDError) as info:
        checkpoint.check_config(tmp_path, "b" * 64, {"lr": 0.01, "loss": "jsd", "alpha": 0.5})
    msg = one_line(info)
    assert "differs in: loss, lr" in msg and "step-000000004" in msg


# --- 2. kd slurm: no value becomes a command --------------------------------------------------------

FAKE_SBATCH = """#!/bin/bash
# A stand-in for sbatch: keep the script, print a job id.
cat > "$(mktemp {dir}/script.XXXXXX)"
echo 4242
"""


def _run_driver(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "sbatch"
    fake.write_text(FAKE_SBATCH.format(dir=tmp_path))
    fake.chmod(0o755)
    driver = tmp_path / "driver.sh"
    driver.write_text(script)
    return subprocess.run(["bash", str(driver)], env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"},
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("where", ["out", "partition", "kd"])
def test_a_newline_in_any_value_never_becomes_a_shell_command(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    evil = f"x\ntouch {marker}\n#"
    stage = ["--model", "m", "--data", "d.jsonl", "--task-type", "causal-lm", "--out", evil if where == "out" else "c"]
    sched = ["--partition", evil] if where == "partition" else []
    sched += ["--kd", evil] if where == "kd" else ["--kd", "/bin/echo"]
    r = CliRunner().invoke(cli, ["slurm", "teacher", "--num-tasks", "2", *sched, "--", *stage])
    if r.exit_code == 0:  # the code before the fix wrote the script: run it as a user would
        _run_driver(r.output, tmp_path)
    assert not marker.exists(), "a value of the stage arguments ran as a command of the driver script"
    assert r.exit_code != 0 and "control character" in r.output and "\ntouch" not in r.output


def test_values_are_quoted_where_they_are_command_words(tmp_path, monkeypatch):
    """`$(…)` in a path stays a path: the driver submits, and the array script (run here as SLURM
    would, with kd replaced by echo) passes it through as one argument."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    out = f"c$(touch {marker})"
    r = CliRunner().invoke(cli, ["slurm", "teacher", "--num-tasks", "1", "--kd", "/bin/echo", "--logs", str(tmp_path / "logs"),
                                 "--", "--model", "m", "--data", "d.jsonl", "--task-type", "causal-lm", "--out", out])
    assert r.exit_code == 0, r.output
    done = _run_driver(r.output, tmp_path)
    assert done.returncode == 0, done.stderr
    scripts = sorted(tmp_path.glob("script.*"))
    assert len(scripts) == 2
    ran = subprocess.run(["bash", str(scripts[0])], env={**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "1"},
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert str(Path(out).absolute()) in ran.stdout or out in ran.stdout
    assert not marker.exists()


# --- 3. manifest paths stay inside their directory ----------------------------------------------------

def _entry(path: Path, rel: str) -> dict:
    data = path.read_bytes()
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": 1}


def _complete(out: Path, files: list[dict]) -> None:
    manifest.write_plan(out, {"kind": "targets", "key": "k" * 64, "num_tasks": 1, "config": {}, "stats": {}})
    io.write_json(out / manifest.MANIFEST, {"kind": "targets", "key": "k" * 64, "files": files, "stats": {},
                                            "config": {}, "fingerprints": {}})


@pytest.mark.parametrize("rel", ["../outside.bin", "/ABS", "shards/../../outside.bin", "./shards/a.bin", "shards//a.bin",
                                 "", "shards/link.bin"])
def test_verify_never_opens_a_file_outside_the_directory(tmp_path, rel):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")  # with its correct sha256, the old code reported `ok`
    cache = tmp_path / "cache"
    (cache / "shards").mkdir(parents=True)
    (cache / "shards" / "link.bin").symlink_to(outside)
    rel = str(outside) if rel == "/ABS" else rel
    _complete(cache, [_entry(outside, rel)])
    for args in (["verify", str(cache)], ["inspect", str(cache)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0, r.output
        assert "is not a relative path inside" in r.output and "internal error" not in r.output


def test_path_of_accepts_plain_relative_paths_only(tmp_path):
    (tmp_path / "shards").mkdir()
    assert manifest.path_of(tmp_path, "shards/00000-00000.parquet") == tmp_path / "shards" / "00000-00000.parquet"
    assert manifest.path_of(tmp_path, "metrics.parquet") == tmp_path / "metrics.parquet"
    for bad in (None, 3, ["a"], ".", "..", "a/./b", "a\0b", "/etc/passwd", "../x"):
        with pytest.raises(KDError, match="is not a relative path inside"):
            manifest.path_of(tmp_path, bad)


def test_a_task_record_naming_a_file_outside_is_refused_by_finalize_and_status(tmp_path):
    outside = tmp_path / "victim"
    outside.write_bytes(b"v")
    out = tmp_path / "out"
    manifest.write_plan(out, {"kind": "targets", "key": "k" * 64, "num_tasks": 1, "config": {}})
    io.write_json(manifest.task_path(out, 0), {"files": [_entry(outside, "../victim")], "stats": {}})
    for args in (["finalize", str(out)], ["status", str(out)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0 and "is not a relative path inside" in r.output, r.output
    assert not (out / manifest.MANIFEST).exists()


# --- damaged records: one clear line, never an internal error -----------------------------------------

@pytest.mark.parametrize("damage", ["cut", "not-json", "list", "files-not-list", "bytes-string"])
def test_a_damaged_manifest_or_task_record_is_a_clear_error_in_every_command(tmp_path, damage):
    out = tmp_path / "out"
    manifest.write_plan(out, {"kind": "targets", "key": "k" * 64, "num_tasks": 2, "config": {}})
    good = json.dumps({"files": [], "stats": {"rows": 1}})
    text = {"cut": good[:10], "not-json": "{'files': []}", "list": "[]", "files-not-list": '{"files": 3}',
            "bytes-string": '{"files": [{"path": "a", "bytes": "4", "sha256": "x"}]}'}[damage]
    (out / "tasks").mkdir()
    (out / "tasks" / "00000.json").write_text(text)
    for args in (["status", str(out)], ["finalize", str(out)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0 and "internal error" not in r.output, r.output
        assert "00000.json" in r.output and "delete" in r.output, r.output
    (out / "tasks" / "00000.json").unlink()
    (out / manifest.MANIFEST).write_text(text)
    for args in (["inspect", str(out)], ["verify", str(out)], ["status", str(out)]):
        r = CliRunner().invoke(cli, args)
        if args[0] == "status":  # status reads the plan only: a manifest present means complete
            continue
        assert r.exit_code != 0 and "internal error" not in r.output, r.output
        assert "manifest.json" in r.output and "damaged" in r.output, r.output


def test_a_damaged_plan_is_a_clear_error(tmp_path):
    (tmp_path / "plan.json").write_text('{"kind": "targets", "key"')
    r = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert r.exit_code != 0 and "not valid JSON" in r.output and "internal error" not in r.output


# --- 4. planted symlinks are never written through ---------------------------------------------------

def test_a_symlinked_directory_is_refused_before_a_file_is_written_into_it(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").symlink_to(victim)
    with pytest.raises(KDError, match="is a symlink"):
        io.write_text(out / "shards" / "00000-00000.parquet", "x")
    assert list(victim.iterdir()) == []


def test_a_claim_refuses_symlinks_at_and_inside_the_output(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    output = outputs.StageOutput(out, "student", "k" * 64)
    with pytest.raises(KDError, match=r"metrics\.jsonl is a symlink"):
        with output.claimed({"config": {}}):
            pass
    (out / "metrics.jsonl").unlink()
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(KDError, match="is a symlink"):
        with outputs.StageOutput(link, "student", "k" * 64).claimed({"config": {}}):
            pass
    assert victim.read_text() == "precious"
    with output.claimed({"config": {}}):  # a real directory is fine
        assert (out / outputs.lock_name(0)).exists()
    assert not (out / outputs.lock_name(0)).exists()


# --- 7. a YAML bomb is refused at once, and no error echoes a whole value ----------------------------

# Billion laughs, smaller: `*g` names 10^7 strings through 61 nodes. Every key is one the file
# may hold, so nothing but the expansion can stop it.
CHAIN = "[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
    f"&{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdef", "bcdefg")) + "]"


@pytest.mark.parametrize("kind", ["pipeline", "config", "sweep"])
def test_a_yaml_bomb_is_refused_quickly_with_a_short_message(tmp_path, kind):
    t0 = time.monotonic()
    if kind == "pipeline":
        f = tmp_path / "p.yaml"
        f.write_text(f"name: {CHAIN}\ntask_type: *g\ndata: {{train: d.jsonl}}\nteacher: {{model: m}}\n")
        r = CliRunner().invoke(cli, ["run", str(f), "--dry-run"])
    elif kind == "config":
        f = tmp_path / "c.yaml"
        f.write_text(f"text_column: {CHAIN}\nlabel_column: *g\n")
        r = CliRunner().invoke(cli, ["teacher", "--config", str(f), "--model", "m", "--data", "d", "--task-type", "causal-lm",
                                     "--out", str(tmp_path / "o")])
    else:
        f = tmp_path / "s.yaml"
        f.write_text(f"students: [{{name: a, labels: {CHAIN}}}, {{name: b, labels: *g}}]\n")
        r = CliRunner().invoke(cli, ["train", "--targets", str(tmp_path), "--sweep", str(f), "--out", str(tmp_path / "s"),
                                     "--student", "x"])
    assert r.exit_code != 0
    assert time.monotonic() - t0 < 10
    assert len(r.output) < 600 and "internal error" not in r.output, r.output[:600]
    assert "YAML bomb" in r.output, r.output


def test_a_recursive_alias_is_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("a: &a [1, *a]\n")
    with pytest.raises(KDError, match="recursive"):
        config.load_yaml(f, "pipeline file")


def test_short_never_walks_or_echoes_a_whole_value():
    from pipeline.errors import short

    shared = ["lol"] * 10
    for _ in range(8):
        shared = [shared] * 10  # 10^9 leaves, if walked
    assert short(shared) == "<list of 10 items>"
    assert len(short("x" * 100_000)) <= 60 and short("a\nb") == "'a\\nb'"


# --- 10. wrong types, unsafe names -------------------------------------------------------------------

def test_build_checks_types_against_the_annotations():
    with pytest.raises(KDError, match=r"where: top-k must be a whole number, not 'eight'"):
        config.build(config.TeacherConfig, {"model": "m", "data": "d", "task_type": "causal-lm", "top_k": "eight"}, "where")
    with pytest.raises(KDError, match=r"temperature must be a finite number, not inf"):
        config.build(config.TeacherConfig, {"model": "m", "data": "d", "task_type": "causal-lm", "temperature": "inf"}, "w")
    with pytest.raises(KDError, match=r"temperature must be a finite number, not nan"):
        config.build(config.TeacherConfig, {"model": "m", "data": "d", "task_type": "causal-lm", "temperature": float("nan")}, "w")
    with pytest.raises(KDError, match=r"model must be a string, not <list of 2 items>"):
        config.build(config.TeacherConfig, {"model": ["a", "b"], "data": "d", "task_type": "causal-lm"}, "w")
    with pytest.raises(KDError, match=r"loss must be one of kl, kl-renorm, reverse-kl, jsd, not 'mse'"):
        config.build(config.TrainConfig, {"loss": "mse"}, "w")
    cfg = config.build(config.TrainConfig, {"lr": "1e-4", "epochs": 2.0}, "w")  # YAML 1.1 reads 1e-4 as a string
    assert cfg.lr == 1e-4 and cfg.epochs == 2 and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("cli_args,match", [
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--max-length", "0"], "--max-length must be at least 2"),
    (["--max-length", "1"], "--max-length must be at least 2"),
])
def test_teacher_flags_out_of_range_are_refused_before_any_work(tmp_path, cli_args, match):
    r = CliRunner().invoke(cli, ["teacher", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                                 "--task-type", "causal-lm", "--out", str(tmp_path / "o"), *cli_args])
    assert r.exit_code != 0 and match in r.output and "internal error" not in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", ".", "x\ny", ""])
def test_a_sweep_entry_name_must_be_one_directory(tmp_path, name):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([{"name": name, "lr": 0.1}]))
    cfg = TrainConfig(out=str(tmp_path / "runs"), targets="/c", sweep=str(f), task_index=0)
    with pytest.raises(KDError, match="must be a plain directory name"):
        sweep.select(cfg, f, 0)


def test_wrong_types_in_a_sweep_entry_fail_before_any_task_runs(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("- {name: a, lr: 0.1}\n- {name: b, batch-size: many}\n")
    cfg = TrainConfig(out=str(tmp_path / "runs"), targets="/c", sweep=str(f))
    with pytest.raises(KDError, match=r"entry 1: batch-size must be a whole number, not 'many'"):
        sweep.select(cfg, f, 0)  # task 0 is fine, but entry 1 would fail an hour later


def test_wrong_types_in_a_pipeline_yaml_fail_before_any_stage(tmp_path):
    f = tmp_path / "p.yaml"
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    f.write_text("task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: m}\ntargets: {top_k: eight}\n")
    r = CliRunner().invoke(cli, ["run", str(f), "--dry-run"])
    assert r.exit_code != 0 and "top-k must be a whole number, not 'eight'" in r.output and "internal error" not in r.output
    f.write_text("task_type: causal-lm\ndata: {train: train.jsonl}\nteacher: {model: m}\n"
                 "students: [{name: ../../escaped, student: m}]\n")
    r = CliRunner().invoke(cli, ["run", str(f), "--dry-run"])
    assert r.exit_code != 0 and "must be a plain directory name" in r.output


# --- 11. the output lock ---------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from pipeline import outputs
out = Path(sys.argv[1])
outputs.acquire(out / outputs.lock_name(0), out, 0, 1)
print("held", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    proc = _holder(out)
    try:
        output = outputs.StageOutput(out, "student", "k" * 64)
        with pytest.raises(KDError) as info:
            output.claim({"config": {}})
        msg = one_line(info)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "being written by another kd process" in msg
        assert not (out / manifest.PLAN).exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with output.claimed({"config": {}}):  # its holder is gone: the lock is free again
        assert json.loads((out / outputs.lock_name(0)).read_text())["pid"] == os.getpid()
    assert f"from pid {proc.pid}" in capsys.readouterr().err  # says whose lock it took over
    assert not (out / outputs.lock_name(0)).exists()


FORKING_HOLDER = HOLDER.replace('print("held"', 'child = os.fork()\nif child == 0:\n    time.sleep(600)\nprint(child, "held"').replace(
    "import sys", "import os, sys")


def test_a_forked_child_of_a_killed_writer_does_not_keep_its_lock(tmp_path):
    """A DataLoader worker outlives its SIGKILLed parent for a while; the rerun must not wait."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    child, word = proc.stdout.readline().split()
    assert word == "held"
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(int(child), 0)  # the child is still alive
        with outputs.StageOutput(out, "student", "k" * 64).claimed({"config": {}}):
            assert json.loads((out / outputs.lock_name(0)).read_text())["pid"] == os.getpid()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGKILL)


def test_array_tasks_lock_separately_and_the_lock_is_reentrant(tmp_path):
    out = tmp_path / "out"
    a = outputs.StageOutput(out, "targets", "k" * 64, num_tasks=2)
    b = outputs.StageOutput(out, "targets", "k" * 64, num_tasks=2)
    with a.claimed({"config": {}}, task=0), b.claimed({"config": {}}, task=1):
        assert {p.name for p in out.glob(".kd-task-*.lock")} == {outputs.lock_name(0), outputs.lock_name(1)}
        again = outputs.StageOutput(out, "targets", "k" * 64, num_tasks=2)
        with again.claimed({"config": {}}, task=0):  # the same process again: no self-deadlock
            pass
        assert (out / outputs.lock_name(0)).exists()  # still held by the outer claim
    assert not list(out.glob(".kd-task-*.lock"))


def test_a_symlink_at_the_lock_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / outputs.lock_name(0)).symlink_to(victim)
    with pytest.raises(KDError, match="symlink"):
        outputs.acquire(out / outputs.lock_name(0), out, 0, 1)
    assert victim.read_text() == "precious"


# --- 12. leftovers of a killed manifest writer ----------------------------------------------------

def test_finalize_removes_a_killed_writers_manifest_temporary(tmp_path):
    out = tmp_path / "out"
    manifest.write_plan(out, {"kind": "targets", "key": "k" * 64, "num_tasks": 1, "config": {}})
    manifest.write_task_record(out, 0, {"files": [], "stats": {}})
    left = io.tmp_name(out / manifest.MANIFEST)
    left.write_text('{"kind": "tar')  # what SIGKILL during the write leaves
    manifest.finalize(out)
    assert not list(out.glob(".tmp-*")) and (out / manifest.MANIFEST).exists()


def test_a_yaml_config_with_a_textwrap_is_still_fine(tmp_path):
    """The bounded loader reads ordinary files as safe_load does."""
    f = tmp_path / "ok.yaml"
    f.write_text(textwrap.dedent("""\
        base: &base {lr: 0.1, alpha: 0.5}
        students:
          - {<<: *base, name: a}
          - {<<: *base, name: b, lr: 0.2}
        """))
    assert config.load_yaml(f, "x")["students"][1] == {"lr": 0.2, "alpha": 0.5, "name": "b"}
