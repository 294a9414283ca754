"""Faults and bad input against the stages, on tiny models: untrusted caches (paths outside the
directory, flipped bits, tampered ids), planted symlinks and checkpoints, runs killed with
SIGKILL at random and at chosen points, two writers at once, and the inputs that used to end in
`internal error`. Real subprocesses wherever a kill or a second process is involved; the kill -9
loops run KD_FAULT_TRIALS trials each (default 2; the issue's soak used 20+)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline import format as fmt
from pipeline import io, manifest, outputs
from pipeline.cli import cli
from pipeline.errors import KDError
from stages.evaluate import EvalConfig
from stages.evaluate import run as run_eval
from stages.teacher import TeacherConfig, resolve_inputs
from stages.teacher import run as run_teacher
from stages.train import TrainConfig
from stages.train import run as run_train
from tests.conftest import build_model, make_data, train_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
KD = [sys.executable, "-m", "pipeline.cli"]
SEQ, CLM = "sequence-classification", "causal-lm"
TRIALS = int(os.environ.get("KD_FAULT_TRIALS", "2"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), **extra}


def kd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(KD + [str(a) for a in args], env=env(), capture_output=True, text=True, timeout=300, **kw)


def kd_cli(*args) -> str:
    """In-process `kd ARGS`, expected to fail with one clear line (never an internal error)."""
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "internal error" not in r.output, r.output[-2000:]
    return lines[0]


def teacher_cfg(models, data, task, out, **kw) -> TeacherConfig:
    return TeacherConfig(**{**dict(model=str(models[task]), data=str(data[task]), task_type=task, out=str(out), top_k=8,
                                   max_length=32, temperature=2.0, progress=False), **kw})


def train(out: Path, **kw) -> dict:
    base = dict(out=str(out), epochs=1, batch_size=8, lr=3e-3, num_workers=0, progress=False, save_every=0)
    return run_train(TrainConfig(**{**base, **kw}))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, models, datasets_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fault-caches")
    return {t: Path(run_teacher(teacher_cfg(models, datasets_dir, t, root / t))["out"]) for t in (SEQ, CLM)}


@pytest.fixture(scope="module")
def student(tmp_path_factory, caches, models) -> Path:
    out = tmp_path_factory.mktemp("fault-student") / "s"
    train(out, targets=str(caches[SEQ]), student_from_teacher=str(models[SEQ]), student_layers="0", max_steps=2)
    return out


def copy_cache(cache: Path, dest: Path) -> Path:
    shutil.copytree(cache, dest)
    return dest


def leftovers(out: Path) -> list[str]:
    """Everything a finished output must not hold: temporaries, locks, checkpoints."""
    bad = [p for p in out.rglob("*") if p.name.startswith((io.TMP_MARK, ".kd-task-")) or p.name == "checkpoints"]
    return sorted(str(p.relative_to(out)) for p in bad)


# --- 3. readers never open a file outside the cache --------------------------------------------------

def _refusal(fn) -> str:
    with pytest.raises(KDError) as info:
        fn()
    return str(info.value)


def _readers(cache: Path, student: Path, tmp: Path):
    yield "train", lambda: _refusal(lambda: train(tmp / "t", targets=str(cache), student=str(student), max_steps=1))
    yield "eval", lambda: _refusal(lambda: run_eval(EvalConfig(model=[str(student)], targets=str(cache), out=str(tmp / "e"),
                                                               progress=False, timing_examples=2, time_teacher=False)))
    yield "inspect", lambda: kd_cli("inspect", cache)
    yield "verify", lambda: kd_cli("verify", cache)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_every_reader_refuses_a_shard_outside_the_cache(tmp_path, caches, student, how):
    """A valid shard of the right cache, with its correct sha256, but outside the directory."""
    cache = copy_cache(caches[SEQ], tmp_path / "cache")
    m = json.loads((cache / "manifest.json").read_text())
    first = m["files"][0]["path"]
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "x.parquet"
    shutil.move(cache / first, outside)
    if how == "symlink":
        (cache / first).symlink_to(outside)
    else:
        m["files"][0]["path"] = "../elsewhere/x.parquet" if how == "dotdot" else str(outside)
        io.write_json(cache / "manifest.json", m)
    for name, read in _readers(cache, student, tmp_path):
        assert "is not a relative path inside" in read(), name


# --- 6. every reader checks what it reads -----------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_eval_and_inspect_refuse_a_damaged_shard(tmp_path, caches, student, damage):
    cache = copy_cache(caches[SEQ], tmp_path / "cache")
    shard = cache / json.loads((cache / "manifest.json").read_text())["files"][0]["path"]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0x10  # inside the zstd pages
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    msg = kd_cli("inspect", cache)
    assert "fail verification" in msg or "missing" in msg
    with pytest.raises(KDError, match=r"is damaged"):
        run_eval(EvalConfig(model=[str(student)], targets=str(cache), out=str(tmp_path / "e"), progress=False,
                            timing_examples=2, time_teacher=False))
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_eval_refuses_a_student_whose_weights_differ_from_its_manifest(tmp_path, caches, student):
    damaged = copy_cache(student, tmp_path / "s")
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(KDError, match=r"--model .* is damaged \(model\.safetensors: sha256 does not match"):
        run_eval(EvalConfig(model=[str(damaged)], targets=str(caches[SEQ]), split="train", out=str(tmp_path / "e"),
                            progress=False, timing_examples=2, time_teacher=False))


@pytest.mark.parametrize("record", ["manifest.json", "plan.json"])
def test_a_damaged_record_is_one_clear_line_in_every_stage(tmp_path, caches, student, models, datasets_dir, record):
    cache = copy_cache(caches[SEQ], tmp_path / "cache")
    if record == "plan.json":  # an unfinished cache: its plan is what a rerun reads
        (cache / "manifest.json").unlink()
    (cache / record).write_text('{"kind": "targets", "files": [')
    train_args = ["train", "--targets", cache, "--student", student, "--max-steps", "1", "--out", tmp_path / "t"]
    eval_args = ["eval", "--model", student, "--targets", cache, "--split", "train", "--out", tmp_path / "e"]
    teacher_args = ["teacher", "--model", models[SEQ], "--data", datasets_dir[SEQ], "--task-type", SEQ, "--max-length", "32",
                    "--top-k", "8", "--temperature", "2", "--out", cache]
    for args in ([train_args, eval_args] if record == "manifest.json" else []) + [teacher_args]:
        msg = kd_cli(*args)
        assert record in msg and ("not valid JSON" in msg or "damaged" in msg), msg


# --- 14. kd verify --recompute compares ids --------------------------------------------------------

def _rewrite_shard(cache: Path, change) -> None:
    """Apply `change` to the first shard's table and update its sha256 and size everywhere, as a
    careful tamperer would."""
    m = json.loads((cache / "manifest.json").read_text())
    entry = m["files"][0]
    path = cache / entry["path"]
    table = change(pq.read_table(path))
    md, coded = fmt.file_metadata(path), fmt.layout_metadata(pq.ParquetFile(path))
    rec = fmt.write_shard(path, table.replace_schema_metadata(None), {k: v for k, v in md.items() if k != "format_version"}, coded)
    for holder in [m] + [json.loads(p.read_text()) for p in (cache / "tasks").glob("*.json")]:
        for f in holder["files"]:
            if f["path"] == entry["path"]:
                f.update(bytes=rec["bytes"], sha256=rec["sha256"])
    io.write_json(cache / "manifest.json", m)


def test_verify_recompute_catches_a_tampered_top1_id(tmp_path, caches):
    cache = copy_cache(caches[CLM], tmp_path / "cache")
    ok = CliRunner().invoke(cli, ["verify", str(cache), "--recompute", "8"])
    assert ok.exit_code == 0 and "recomputed" in ok.output, ok.output

    vocab = json.loads((cache / "manifest.json").read_text())["stats"]["outputs"]

    def tamper(t: pa.Table) -> pa.Table:  # format 2: ids are renumbered, the first k of a row are position 0's
        k = json.loads((cache / "manifest.json").read_text())["stats"]["top_k"]
        ids = t.column("topk_rids").to_pylist()
        ids[0][0] = next(i for i in range(vocab) if i not in ids[0][:k])  # an id the teacher did not rank there
        return t.set_column(t.schema.get_field_index("topk_rids"), t.schema.field("topk_rids"),
                            pa.array(ids, t.schema.field("topk_rids").type))

    _rewrite_shard(cache, tamper)
    assert CliRunner().invoke(cli, ["verify", str(cache)]).exit_code == 0  # the checksums were updated too
    r = CliRunner().invoke(cli, ["verify", str(cache), "--recompute", "64"])
    assert r.exit_code != 0 and "stored id" in r.output and "does not match" in r.output, r.output


# --- 15. the one-time split check runs on a short prefix ------------------------------------------

def test_split_check_compares_a_prefix_whatever_the_max_length(tmp_path, models, tokenizer_dir):
    from pipeline import softtargets
    from pipeline.models import load_model

    model = load_model(str(models[CLM]), CLM)
    seen = []
    real = model.forward

    def forward(*a, **k):
        seen.append(int(k["input_ids"].shape[1]))
        return real(*a, **k)

    model.forward = forward
    ex = softtargets.Extractor(model, CLM, 8, 1.0)
    ids = torch.randint(5, model.config.vocab_size, (2, 120))
    ex(ids, torch.ones_like(ids), [list(range(119))] * 2)
    assert seen and max(seen) <= softtargets.SPLIT_CHECK_TOKENS, seen  # the full forward ran on a prefix only
    assert ex.split is not None  # and the split was still confirmed


# --- 4. planted symlinks -----------------------------------------------------------------------------

def test_a_symlink_planted_at_the_cache_roots_key_is_refused(tmp_path, models, datasets_dir):
    cfg = dataclasses.replace(teacher_cfg(models, datasets_dir, SEQ, tmp_path), out=None, cache_root=str(tmp_path / "root"))
    key = resolve_inputs(cfg).key
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("precious")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / key).symlink_to(victim)
    with pytest.raises(KDError, match="is a symlink"):
        run_teacher(cfg)
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]


def test_a_symlinked_shards_directory_is_refused(tmp_path, models, datasets_dir):
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").symlink_to(victim)
    with pytest.raises(KDError, match="is a symlink"):
        run_teacher(teacher_cfg(models, datasets_dir, SEQ, out))
    assert list(victim.iterdir()) == []


def test_a_symlinked_metrics_log_is_never_written_through(tmp_path, caches, models):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "s"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(KDError, match="symlink"):
        train(out, targets=str(caches[SEQ]), student_from_teacher=str(models[SEQ]), student_layers="0", max_steps=2)
    assert victim.read_text() == "precious\n"


# --- 1 + 5. checkpoints: never unpickled, never resumed under other settings ---------------------------

def test_a_planted_pickle_in_a_students_checkpoints_never_runs(tmp_path, caches, models):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    out = tmp_path / "s"
    kw = dict(targets=str(caches[SEQ]), student_from_teacher=str(models[SEQ]), student_layers="0", max_steps=4)
    train(out, **kw)
    plan = json.loads((out / "plan.json").read_text())
    for name in ("manifest.json", "tasks"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    ck = out / "checkpoints" / "step-000000002"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 2, "world_size": 1, "epoch": 0, "batches": 2, "rows_in_epoch": 16,
                                               "key": plan["key"], "settings": plan["settings"]}))
    for name in ("model.pt", "optimizer.pt", "rng-0.pt"):
        torch.save({"optimizer": Evil(), "scheduler": Evil()} if name == "optimizer.pt" else Evil(), ck / name)
    with pytest.raises(KDError, match="pickle"):
        train(out, **kw)
    assert not (tmp_path / "pwned").exists()


def _kill_after_first_checkpoint(cmd: list[str], out: Path) -> None:
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not list((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed too late"


def test_a_killed_run_is_not_resumed_under_other_settings(tmp_path, caches, models):
    out = tmp_path / "s"
    flags = dict(student_layers="0", max_steps=200, batch_size=4, save_every=2, lr=1e-3, num_workers=0, epochs=100)
    cmd = KD + ["train", "--targets", str(caches[SEQ]), "--student-from-teacher", str(models[SEQ]), "--out", str(out),
                *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    _kill_after_first_checkpoint(cmd, out)
    kw = dict(targets=str(caches[SEQ]), student_from_teacher=str(models[SEQ]), **flags)
    with pytest.raises(KDError, match=r"differs in: lr\b") as info:
        train(out, **{**kw, "lr": 5e-3})
    assert "\n" not in str(info.value)
    with pytest.raises(KDError, match=r"differs in: alpha, loss"):
        train(out, **{**kw, "loss": "jsd", "alpha": 0.9})
    assert not (out / "manifest.json").exists()
    result = train(out, **kw)  # the same settings resume and finish
    assert result["steps"] == 200 and json.loads((out / "manifest.json").read_text())["config"]["lr"] == 1e-3
    assert leftovers(out) == []


# --- 11. two writers of one output ------------------------------------------------------------------

def test_a_second_kd_train_into_a_held_output_is_refused_naming_the_holder(tmp_path, caches, models):
    out = tmp_path / "s"
    out.mkdir()
    held = outputs.acquire(out / outputs.lock_name(0), out, 0, 1)  # this process is "the other writer"
    try:
        r = kd("train", "--targets", caches[SEQ], "--student-from-teacher", models[SEQ], "--student-layers", "0",
               "--max-steps", "2", "--out", out)
    finally:
        outputs.release(held)
    assert r.returncode != 0
    assert f"being written by another kd process (pid {os.getpid()} on host {socket.gethostname()}" in r.stderr, r.stderr
    assert not (out / "metrics.jsonl").exists()


def test_two_concurrent_trains_never_double_the_metrics(tmp_path, caches, models):
    out = tmp_path / "s"
    cmd = KD + ["train", "--targets", str(caches[SEQ]), "--student-from-teacher", str(models[SEQ]), "--student-layers", "0",
                "--max-steps", "150", "--epochs", "100", "--batch-size", "4", "--num-workers", "0", "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    refused = [err for rc, _, err in results if rc != 0]
    assert codes[0] == 0, results
    for err in refused:  # the loser was refused at its claim (or found the winner's finished student)
        assert "being written by another kd process" in err, err[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "event" not in json.loads(line)]
    assert steps == list(range(1, 151))
    assert leftovers(out) == []


# --- 12. leftovers of kills at chosen points ---------------------------------------------------------

KILL_AT = """
import os, pathlib, signal, sys
point, args = sys.argv[1], sys.argv[2:]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "manifest":
    real = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("manifest.json"):
            die()
        return real(src, dst, *a, **k)
    os.replace = replace
elif point == "after-manifest":
    from pipeline import checkpoint
    checkpoint.remove_all = die
elif point == "staging":
    real_rmdir = pathlib.Path.rmdir
    def rmdir(self):
        if self.name.endswith("-final"):
            die()
        return real_rmdir(self)
    pathlib.Path.rmdir = rmdir
from pipeline.cli import main
sys.argv = ["kd", *args]
main()
"""


def _kill_at(point: str, *args) -> None:
    r = subprocess.run([sys.executable, "-c", KILL_AT, point, *map(str, args)], env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("point", ["staging", "manifest", "after-manifest"])
def test_a_student_killed_while_finishing_leaves_nothing_behind_after_a_rerun(tmp_path, caches, models, point):
    out = tmp_path / "s"
    flags = dict(student_layers="0", max_steps=4, save_every=2, batch_size=8, num_workers=0, lr=3e-3, epochs=1)
    _kill_at(point, "train", "--targets", caches[SEQ], "--student-from-teacher", models[SEQ], "--out", out,
             *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)])
    assert leftovers(out), "the kill left nothing to clean: it happened elsewhere"
    result = train(out, targets=str(caches[SEQ]), student_from_teacher=str(models[SEQ]), **flags)
    assert result["reused"] == (point == "after-manifest")
    assert leftovers(out) == [], leftovers(out)
    assert manifest.verify_files(out, manifest.read_manifest(out)) == []


def test_a_cache_killed_while_writing_its_manifest_is_finished_by_a_rerun(tmp_path, models, datasets_dir):
    out = tmp_path / "c"
    args = ["teacher", "--model", models[SEQ], "--data", datasets_dir[SEQ], "--task-type", SEQ, "--max-length", "32",
            "--top-k", "8", "--out", out]
    _kill_at("manifest", *args)
    assert list(out.glob(".tmp-*-manifest.json")) and not (out / "manifest.json").exists()
    assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0
    assert leftovers(out) == [] and (out / "manifest.json").exists()


# --- 13. every output follows the umask ---------------------------------------------------------------

def test_student_files_follow_the_umask(student):
    want = 0o666 & ~io._umask()
    modes = {p.name: p.stat().st_mode & 0o777 for p in student.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == want and set(modes.values()) == {want}, modes


# --- 8 + 9. a rerun into an interrupted output keeps only what its plan owns ----------------------------

def test_a_rerun_with_other_shard_rows_leaves_no_duplicate_rows(tmp_path, models, datasets_dir):
    out = tmp_path / "c"
    run_teacher(teacher_cfg(models, datasets_dir, SEQ, out, shard_rows=5))
    for p in (out / "manifest.json", *(out / "tasks").glob("*.json")):  # as a kill before the task record leaves it
        p.unlink()
    assert len(list((out / "shards").glob("*.parquet"))) == 8
    run_teacher(teacher_cfg(models, datasets_dir, SEQ, out, shard_rows=20))
    rows = pq.read_table(out / "shards").column("row").to_pylist()  # what the README promises plain pyarrow reads
    assert sorted(rows) == list(range(40))


def test_an_interrupted_output_reused_with_another_teacher_gets_that_teachers_tokenizer(tmp_path, models, datasets_dir):
    from pipeline.fingerprint import tokenizer_fingerprint
    from pipeline.models import load_tokenizer

    other_tok = tmp_path / "tok"
    train_tokenizer(other_tok, vocab_size=200, extra_words=("zebra quagga okapi",))
    other = build_model(tmp_path / "other", SEQ, other_tok)
    out = tmp_path / "c"
    run_teacher(teacher_cfg(models, datasets_dir, SEQ, out))
    for p in (out / "manifest.json", *(out / "tasks").glob("*.json"), *(out / "shards").glob("*")):
        p.unlink()  # killed after the claim, before its first shard: nothing of value was kept
    run_teacher(teacher_cfg(models, datasets_dir, SEQ, out, model=str(other)))
    stored = tokenizer_fingerprint(load_tokenizer(str(out / "tokenizer")))["sha256"]
    assert stored == tokenizer_fingerprint(load_tokenizer(str(other)))["sha256"]
    assert json.loads((out / "manifest.json").read_text())["fingerprints"]["tokenizer"]["sha256"] == stored


# --- 10. input validation -----------------------------------------------------------------------------

def test_a_float_label_is_refused_not_truncated(tmp_path, models):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a film", "label": 1}, {"text": "the plot", "label": 1.7}])
    with pytest.raises(KDError, match=r"row 1: label 1\.7 is not a class id"):
        run_teacher(TeacherConfig(model=str(models[SEQ]), data=str(data), task_type=SEQ, out=str(tmp_path / "c"),
                                  progress=False))


# --- every error a clear one ---------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["teacher", "train", "eval"])
def test_out_naming_a_file_or_an_unwritable_place_is_one_clear_line(tmp_path, caches, models, datasets_dir, student, stage):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = {"teacher": ["teacher", "--model", models[SEQ], "--data", datasets_dir[SEQ], "--task-type", SEQ],
            "train": ["train", "--targets", caches[SEQ], "--student", student, "--max-steps", "1"],
            "eval": ["eval", "--model", student, "--targets", caches[SEQ], "--split", "train", "--no-time-teacher"]}[stage]
    assert "is a file, not a directory" in kd_cli(*args, "--out", afile)
    unwritable = "/sys/kd-fault-test/out" if os.geteuid() == 0 else "/proc/kd-fault-test/out"
    msg = kd_cli(*args, "--out", unwritable)
    assert "cannot create" in msg or "cannot write" in msg


def test_an_unknown_model_type_is_one_clear_line(tmp_path, models, datasets_dir):
    bad = tmp_path / "bad"
    shutil.copytree(models[SEQ], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "frobnicator"}))
    msg = kd_cli("teacher", "--model", bad, "--data", datasets_dir[SEQ], "--task-type", SEQ, "--out", tmp_path / "c")
    assert "model_type 'frobnicator'" in msg and "transformers" in msg


def test_a_huge_text_against_a_128_position_model_is_capped_and_said(tmp_path, models, capfd):
    words = "the film was great and the plot was long ".split()
    text = " ".join(random.Random(0).choice(words) for _ in range(20_000))  # ~100k characters
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": text, "label": 1}, {"text": "a short one", "label": 0}])
    out = run_teacher(TeacherConfig(model=str(models[SEQ]), data=str(data), task_type=SEQ, out=str(tmp_path / "c"),
                                    progress=False))["out"]  # the default --max-length 512
    assert "using --max-length 128" in capfd.readouterr().err
    m = manifest.read_manifest(Path(out))
    assert m["config"]["max_length"] == 128 and m["stats"]["truncated_rows"] == 1
    fine_tuned = train(tmp_path / "ft", data=str(data), task_type=SEQ, student=str(models[SEQ]), max_steps=1)
    assert fine_tuned["steps"] == 1  # stage 0 caps at the student's positions too


def test_position_limit_is_the_models_own():
    from types import SimpleNamespace as NS

    from pipeline.models import position_limit

    assert position_limit(NS(max_position_embeddings=514), NS(model_max_length=512)) == 512  # RoBERTa's reserved two
    assert position_limit(NS(max_position_embeddings=512), NS(model_max_length=128)) == 512  # a tokenizer's choice only
    assert position_limit(NS(n_positions=1024), None) == 1024 and position_limit(NS(), None) is None


def test_a_latin1_csv_names_the_line_and_encoding_fixes_it(tmp_path, models):
    csv = tmp_path / "d.csv"
    csv.write_bytes("text,label\nthe film,1\ncaf\xe9 plot,0\n".encode("latin-1"))
    msg = kd_cli("teacher", "--model", models[SEQ], "--data", csv, "--task-type", SEQ, "--out", tmp_path / "c")
    assert "line 3 is not valid utf-8" in msg and "--encoding" in msg
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes('{"text": "caf\xe9", "label": 1}\n'.encode("latin-1"))
    assert "line 1 is not valid utf-8" in kd_cli("teacher", "--model", models[SEQ], "--data", jsonl, "--task-type", SEQ,
                                                 "--out", tmp_path / "j")
    out = run_teacher(TeacherConfig(model=str(models[SEQ]), data=str(csv), task_type=SEQ, out=str(tmp_path / "c"),
                                    encoding="latin-1", progress=False))["out"]
    assert pq.read_table(Path(out) / "shards").column("text").to_pylist() == ["the film", "café plot"]


# --- kill -9 at random points, then a rerun: the same output, nothing left behind ---------------------

def _kill_randomly(cmd: list[str], rng: random.Random, started: Path, window: float) -> None:
    """Start `cmd`, wait until it has begun writing (`started` exists), then SIGKILL it at a random
    moment of the next `window` seconds."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not started.exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, window))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_teacher_killed_at_random_points_then_rerun_gives_the_same_cache(tmp_path, tokenizer_dir):
    model = build_model(tmp_path / "model", SEQ, tokenizer_dir)
    data = make_data(tmp_path / "data.jsonl", SEQ, n=1200)
    args = ["teacher", "--model", str(model), "--data", str(data), "--task-type", SEQ, "--max-length", "32", "--shard-rows",
            "20", "--num-tasks", "2"]
    clean = tmp_path / "clean"
    for i in range(2):
        assert CliRunner().invoke(cli, [*args, "--task-index", str(i), "--out", str(clean)]).exit_code == 0
    want = pa.concat_tables(pq.read_table(clean / f["path"]) for f in manifest.read_manifest(clean)["files"])
    rng = random.Random(1)
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}"
        for i in range(2):
            _kill_randomly(KD + [*args, "--task-index", str(i), "--out", str(out)], rng, out / "plan.json", 2.0)
        for i in range(2):
            r = CliRunner().invoke(cli, [*args, "--task-index", str(i), "--out", str(out)])
            assert r.exit_code == 0, r.output
        got = pa.concat_tables(pq.read_table(out / f["path"]) for f in manifest.read_manifest(out)["files"])
        assert got.equals(want) and leftovers(out) == []
        assert sorted(pq.read_table(out / "shards").column("row").to_pylist()) == list(range(1200))


def test_train_killed_at_random_points_then_rerun_gives_the_same_weights(tmp_path, caches, models):
    from safetensors.torch import load_file

    flags = dict(student_layers="0", max_steps=120, batch_size=4, save_every=10, lr=1e-3, num_workers=0, epochs=100)
    kw = dict(targets=str(caches[SEQ]), student_from_teacher=str(models[SEQ]), **flags)
    train(tmp_path / "clean", **kw)
    want = load_file(tmp_path / "clean" / "model.safetensors")
    rng = random.Random(2)
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}"
        cmd = KD + ["train", "--targets", str(caches[SEQ]), "--student-from-teacher", str(models[SEQ]), "--out", str(out),
                    *[x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
        _kill_randomly(cmd, rng, out / "plan.json", 1.5)
        train(out, **kw)
        got = load_file(out / "model.safetensors")
        assert all(torch.equal(want[k], got[k]) for k in want) and leftovers(out) == []
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "event" not in x]
        assert steps == list(range(1, 121))
        assert np.all(np.diff(steps) == 1)
