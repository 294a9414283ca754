"""Stage 2 end to end: teacher cache -> student for every task type, stage-0 fine-tuning, resume
after SIGKILL, two-process torchrun, sweeps, and the refusals (mismatched students, incomplete
or damaged caches)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import KDError
from stages.teacher import TeacherConfig
from stages.teacher import run as run_teacher
from stages.train import TrainConfig, run
from tests.conftest import TASK_TYPES, build_model, make_data, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
KD = [sys.executable, "-m", "pipeline.cli"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, models, datasets_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    for t in TASK_TYPES:
        run_teacher(TeacherConfig(model=str(models[t]), data=str(datasets_dir[t]), task_type=t, out=str(root / t),
                                  max_length=32, top_k=8, temperature=2.0, progress=False))
    return {t: root / t for t in TASK_TYPES}


def train(out: Path, **kw) -> dict:
    base = dict(out=str(out), epochs=3, batch_size=8, lr=3e-3, num_workers=0, progress=False, save_every=0)
    return run(TrainConfig(**{**base, **kw}))


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_cache_to_student(tmp_path, caches, models, task_type):
    from pipeline.models import auto_class

    out = tmp_path / "student"
    result = train(out, targets=str(caches[task_type]), student_from_teacher=str(models[task_type]),
                   student_layers="1", alpha=1.0, eval_targets=str(caches[task_type]))
    m = read_manifest(out)
    cache = json.loads((caches[task_type] / "manifest.json").read_text())
    assert result["complete"] and m["kind"] == "student" and m["key"] == result["key"]
    assert m["upstream"] == [{"kind": "targets", "path": str(caches[task_type].resolve()), "key": cache["key"]}]
    assert m["init"]["kind"] == "teacher-layers" and m["init"]["layers"] == [1]
    assert m["config"]["temperature"] == 2.0 and m["config"]["alpha"] == 1.0 and m["config"]["task_type"] == task_type
    s = m["stats"]
    assert s["final"]["kd"] < s["initial"]["kd"]  # the KD loss falls
    assert s["wall_seconds"] > 0 and s["positions_per_second"] > 0 and s["eval_final"]["positions"] > 0
    epochs = [r for r in metrics(out) if r.get("event") == "epoch"]
    assert [r["rows"] for r in epochs] == [40, 40, 40]
    steps = [r for r in metrics(out) if "event" not in r]
    assert len(steps) == s["steps"] == 15 and all(r["kd"] is not None for r in steps)
    assert not (out / "checkpoints").exists()
    student = auto_class(task_type).from_pretrained(out)
    assert student.config.num_hidden_layers == 1
    assert {f["path"] for f in m["files"]} >= {"config.json", "model.safetensors", "metrics.jsonl", "tokenizer.json"}


def test_fitted_cache_alpha_1_student_agrees_with_teacher_better_than_untrained(tmp_path, tokenizer_dir):
    """Stage 0 fits a teacher, stage 1 caches it, stage 2 distils a random student with alpha = 1:
    its agreement with the teacher beats the same student's before training."""
    t = "sequence-classification"
    data = make_data(tmp_path / "data.jsonl", t, n=160)
    base = build_model(tmp_path / "base", t, tokenizer_dir, seed=3)
    train(tmp_path / "teacher", data=str(data), task_type=t, student=str(base), epochs=10, batch_size=16, lr=1e-2,
          max_length=32)
    # integer labels carry no names: the head keeps its own
    assert json.loads((tmp_path / "teacher" / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    run_teacher(TeacherConfig(model=str(tmp_path / "teacher"), data=str(data), task_type=t, out=str(tmp_path / "cache"),
                              max_length=32, progress=False))
    fresh = build_model(tmp_path / "fresh", t, tokenizer_dir, seed=7, layers=1)
    train(tmp_path / "student", targets=str(tmp_path / "cache"), student=str(fresh), alpha=1.0, epochs=10,
          batch_size=16, lr=1e-2, eval_targets=str(tmp_path / "cache"))
    s = read_manifest(tmp_path / "student")["stats"]
    assert s["eval_final"]["agreement"] > s["eval_initial"]["agreement"] + 0.1
    assert s["final"]["kd"] < 0.5 * s["initial"]["kd"]


@pytest.mark.parametrize("task_type", ["token-classification", "masked-lm", "causal-lm"])
def test_alpha_1_raises_agreement_of_an_untrained_student(tmp_path, caches, tokenizer_dir, task_type):
    fresh = build_model(tmp_path / "fresh", task_type, tokenizer_dir, seed=7, layers=1)
    train(tmp_path / "s", targets=str(caches[task_type]), student=str(fresh), alpha=1.0, epochs=20, lr=1e-2,
          eval_targets=str(caches[task_type]))
    s = read_manifest(tmp_path / "s")["stats"]
    assert s["eval_final"]["agreement"] > s["eval_initial"]["agreement"] + 0.1


def test_token_classification_fine_tuning_without_targets(tmp_path, models, datasets_dir):
    out = tmp_path / "ft"
    train(out, data=str(datasets_dir["token-classification"]), task_type="token-classification",
          student=str(models["token-classification"]), epochs=4, max_length=32)
    s = read_manifest(out)["stats"]
    assert s["final"]["ce"] < s["initial"]["ce"] and s["final"]["kd"] is None
    assert read_manifest(out)["upstream"] == []


def test_student_with_its_own_tokenizer_retokenizes_sequence_classification(tmp_path, caches):
    tok = tmp_path / "tok"
    train_tokenizer(tok, vocab_size=200, extra_words=("zebra quagga okapi",))
    student = build_model(tmp_path / "own", "sequence-classification", tok, seed=5, layers=1)
    train(tmp_path / "s", targets=str(caches["sequence-classification"]), student=str(student), epochs=1)
    m = read_manifest(tmp_path / "s")
    assert m["mode"] == "retokenize" and m["fingerprints"]["tokenizer"]["vocab_size"] != 160


def test_other_temperature_warns_that_the_tail_is_approximate(tmp_path, caches, models, capsys):
    train(tmp_path / "s", targets=str(caches["masked-lm"]), student_from_teacher=str(models["masked-lm"]),
          student_layers="0", temperature=1.0, epochs=1)
    assert "approximate" in capsys.readouterr().err
    assert read_manifest(tmp_path / "s")["config"]["temperature"] == 1.0


def test_rerun_of_a_finished_student_does_nothing_and_other_config_is_refused(tmp_path, caches, models):
    kw = dict(targets=str(caches["causal-lm"]), student_from_teacher=str(models["causal-lm"]), student_layers="0", epochs=1)
    first = train(tmp_path / "s", **kw)
    again = train(tmp_path / "s", **kw)
    assert again["reused"] and again["key"] == first["key"]
    with pytest.raises(KDError, match="different student"):
        train(tmp_path / "s", **{**kw, "lr": 1e-4})


def test_sweep_entry_from_the_job_array(tmp_path, caches, models, monkeypatch):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {name: wide, student_layers: '0,1', alpha: 1.0}\n- {name: thin, student_layers: '1', lr: 0.01}\n")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    result = train(tmp_path / "sweep", targets=str(caches["sequence-classification"]),
                   student_from_teacher=str(models["sequence-classification"]), sweep=str(sweep), epochs=1)
    assert result["out"] == str(tmp_path / "sweep" / "thin")
    cfg = read_manifest(tmp_path / "sweep" / "thin")["config"]
    assert cfg["lr"] == 0.01 and cfg["student_layers"] == "1" and cfg["alpha"] == 0.5
    sweep.write_text("- {name: x, learning_rate: 0.1}\n")
    with pytest.raises(KDError, match="learning_rate"):
        train(tmp_path / "sweep2", targets=str(caches["sequence-classification"]), sweep=str(sweep))


def test_student_with_another_vocabulary_is_refused(tmp_path, caches):
    tok = tmp_path / "tok"
    train_tokenizer(tok, vocab_size=200, extra_words=("zebra quagga okapi",))
    student = build_model(tmp_path / "other", "masked-lm", tok)
    with pytest.raises(KDError, match="vocabulary mismatch.*teacher's tokenizer"):
        train(tmp_path / "s", targets=str(caches["masked-lm"]), student=str(student))
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_student_with_another_label_count_is_refused(tmp_path, caches, tokenizer_dir):
    student = build_model(tmp_path / "three", "sequence-classification", tokenizer_dir, num_labels=3)
    with pytest.raises(KDError, match=r"predicts \[L0, L1, L2\] \(3\) but the labels of the targets are \[negative, positive\] \(2\)"):
        train(tmp_path / "s", targets=str(caches["sequence-classification"]), student=str(student))


def test_cache_without_manifest_is_refused(tmp_path, caches, models):
    broken = tmp_path / "cache"
    shutil.copytree(caches["causal-lm"], broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(KDError, match="incomplete"):
        train(tmp_path / "s", targets=str(broken), student=str(models["causal-lm"]))


def test_corrupted_shard_is_refused_with_one_line(tmp_path, caches, models):
    from click.testing import CliRunner

    from pipeline.cli import cli

    broken = tmp_path / "cache"
    shutil.copytree(caches["causal-lm"], broken)
    shard = next((broken / "shards").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["train", "--targets", str(broken), "--student", str(models["causal-lm"]),
                                   "--out", str(tmp_path / "s"), "--num-workers", "0"])
    assert res.exit_code != 0
    assert "is damaged" in res.output and "sha256" in res.output and shard.name in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error:")]) == 1


def test_config_file_and_cli_print_one_json_line(tmp_path, caches, models):
    from click.testing import CliRunner

    from pipeline.cli import cli

    conf = tmp_path / "train.yaml"
    conf.write_text(f"targets: {caches['token-classification']}\nstudent-from-teacher: {models['token-classification']}\n"
                    f"student-layers: [0]\nepochs: 1\nnum-workers: 0\nlr: 0.002\n")
    res = CliRunner().invoke(cli, ["train", "--config", str(conf), "--out", str(tmp_path / "s"), "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(line) == 1 and json.loads(line[0])["complete"]
    cfg = read_manifest(tmp_path / "s")["config"]
    assert cfg["lr"] == 0.002 and cfg["batch_size"] == 16


class Crash(Exception):
    pass


def test_resume_at_an_epoch_boundary_matches_an_uninterrupted_run(tmp_path, caches, models, monkeypatch):
    """A run that dies right after the checkpoint that closes epoch 0 resumes into epoch 1 and
    ends with the uninterrupted run's weights and a log with every step and epoch once."""
    from safetensors.torch import load_file

    from pipeline import checkpoint

    kw = dict(targets=str(caches["sequence-classification"]), student_from_teacher=str(models["sequence-classification"]),
              student_layers="0", epochs=3, batch_size=8, save_every=5)  # 40 rows: 5 steps per epoch
    train(tmp_path / "straight", **kw)
    real_save = checkpoint.save

    def save_then_die(out, step, *a, **k):
        real_save(out, step, *a, **k)
        raise Crash(step)

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Crash):
        train(tmp_path / "resumed", **kw)
    monkeypatch.setattr(checkpoint, "save", real_save)
    train(tmp_path / "resumed", **kw)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = metrics(tmp_path / "resumed")
    assert [r["step"] for r in log if "event" not in r] == list(range(1, 16))
    assert [(r["epoch"], r["rows"]) for r in log if r.get("event") == "epoch"] == [(0, 40), (1, 40), (2, 40)]
    assert read_manifest(tmp_path / "resumed")["stats"]["resumed_from_step"] == 5


RESUME = dict(student_layers="1", max_steps=60, batch_size=4, save_every=10, lr=1e-3, num_workers=1)


def _train_cmd(out: Path, cache: Path, teacher: Path) -> list[str]:
    flags = [x for k, v in RESUME.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return KD + ["train", "--targets", str(cache), "--student-from-teacher", str(teacher), "--out", str(out), *flags]


def test_sigkill_after_a_checkpoint_then_rerun_gives_the_same_weights(tmp_path, caches, models):
    from safetensors.torch import load_file

    cache, teacher = caches["masked-lm"], models["masked-lm"]
    train(tmp_path / "straight", targets=str(cache), student_from_teacher=str(teacher), **RESUME)  # one thread, too
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(out, cache, teacher), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed too late: the run had already finished"
    again = subprocess.run(_train_cmd(out, cache, teacher), env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from step-" in again.stderr
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics(out) if "event" not in r]
    assert steps == list(range(1, 61))  # the log has each step once, despite the replay


def test_torchrun_two_processes_cover_every_row_once_per_epoch(tmp_path, models):
    """41 rows in batches of 2: one rank has 11 micro-batches, the other 10 and pads with a no-op."""
    t, out, rows = "token-classification", tmp_path / "ddp", tmp_path / "rows"
    run_teacher(TeacherConfig(model=str(models[t]), data=str(make_data(tmp_path / "d.jsonl", t, n=41)), task_type=t,
                              out=str(tmp_path / "cache"), max_length=32, top_k=8, progress=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pipeline.cli",
           "train", "--targets", str(tmp_path / "cache"), "--student-from-teacher", str(models[t]),
           "--student-layers", "1", "--out", str(out), "--epochs", "2", "--batch-size", "2", "--grad-accum", "2",
           "--save-every", "4", "--num-workers", "1"]
    res = subprocess.run(cmd, env=env(KD_DEBUG_ROWS=str(rows)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 reports
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in (0, 1):
        for line in (rows / f"rows-rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault((rec["epoch"], rank), []).extend(rec["rows"])
    for epoch in (0, 1):
        r0, r1 = seen[(epoch, 0)], seen[(epoch, 1)]
        assert r0 and r1 and not set(r0) & set(r1)  # each rank reads its own part
        assert sorted(r0 + r1) == list(range(41))  # together: every row exactly once
    m = read_manifest(out)
    assert m["stats"]["world_size"] == 2 and m["stats"]["steps"] == 12  # ceil(11 / 2) per epoch
    assert [r["rows"] for r in metrics(out) if r.get("event") == "epoch"] == [41, 41]


def assert_same_training(a: dict, b: dict, lr: float, steps: int, skip: str | None = None) -> None:
    """Two runs of the same math in different summation orders end with the same weights, up to
    what Adam does to rounding: it divides each gradient by its own running size, so an element
    whose true gradient is ~0 moves by up to lr per step in the direction of its rounding noise,
    which differs between the two orders. So: every element within float tolerance except at most
    one in a thousand, and those apart by no more than Adam's bound of 2 lr per step. A real
    difference (e.g. a gradient missing its all-reduce) moves most elements of a tensor.
    `skip`: parameters whose gradient is exactly zero in exact arithmetic (softmax ignores the
    key bias), so all of their elements are such noise."""
    total = off = 0
    for k in a:
        if skip and k.endswith(skip):
            continue
        close = torch.isclose(a[k], b[k], atol=2e-5, rtol=1e-4)
        total, off = total + close.numel(), off + int((~close).sum())
        assert float((a[k] - b[k]).abs().max()) <= 2 * lr * steps, k
    assert off <= total / 1000, f"{off} of {total} weights differ"


@pytest.mark.parametrize("task_type,tied", [("causal-lm", False), ("masked-lm", True)])
@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_fused_head_trains_to_the_same_weights_as_the_full_logits(tmp_path, caches, models, task_type, tied, alpha):
    """20 steps with the fused head + loss and 20 with full [N, V] logits end with the same weights
    (float32, so within float tolerance); tied embeddings stay tied."""
    from pipeline.models import auto_class

    kw = dict(targets=str(caches[task_type]), student_from_teacher=str(models[task_type]), student_layers="0",
              max_steps=20, epochs=50, alpha=alpha, loss="kl", grad_accum=2, batch_size=4)
    train(tmp_path / "fused", **kw)
    train(tmp_path / "full", **kw, fused_head=False)
    a = auto_class(task_type).from_pretrained(tmp_path / "fused", dtype=torch.float32).state_dict()
    b = auto_class(task_type).from_pretrained(tmp_path / "full", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    assert_same_training(a, b, lr=5e-5, steps=20, skip="attention.self.key.bias")
    fused, full = (read_manifest(tmp_path / n)["stats"]["final"]["loss"] for n in ("fused", "full"))
    assert fused == pytest.approx(full, rel=1e-4)
    if tied:
        from transformers import AutoModelForMaskedLM

        m = AutoModelForMaskedLM.from_pretrained(tmp_path / "fused")
        assert m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()


def test_fine_tuning_an_lm_without_targets_uses_the_fused_head_too(tmp_path, models, datasets_dir):
    kw = dict(data=str(datasets_dir["causal-lm"]), task_type="causal-lm", student=str(models["causal-lm"]), max_steps=6)
    fused, full = train(tmp_path / "fused", **kw), train(tmp_path / "full", **kw, fused_head=False)
    assert fused["final"]["ce"] == pytest.approx(full["final"]["ce"], rel=1e-4)


def test_fused_head_under_torchrun_matches_the_full_logits(tmp_path, caches, models):
    """DDP synchronises the gradients that the fused loss writes straight into the head's weight."""
    from pipeline.models import auto_class

    t = "causal-lm"
    outs = {}
    for fused in ("--fused-head", "--no-fused-head"):
        out = tmp_path / fused.strip("-")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pipeline.cli",
               "train", "--targets", str(caches[t]), "--student-from-teacher", str(models[t]), "--student-layers", "1",
               "--out", str(out), "--max-steps", "6", "--batch-size", "2", "--num-workers", "0", "--lr", "3e-3", fused]
        res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[fused] = auto_class(t).from_pretrained(out, dtype=torch.float32).state_dict()
    a, b = outs.values()
    assert_same_training(a, b, lr=3e-3, steps=6)
    fused, full = (read_manifest(tmp_path / n)["stats"]["final"]["loss"] for n in ("fused-head", "no-fused-head"))
    assert fused == pytest.approx(full, rel=1e-4)
