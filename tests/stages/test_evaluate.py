"""Stage 3 end to end on tiny random models: the four outputs, metrics recomputed here from
float64 forwards of the models themselves (not from the stage's code path), the teacher scored
from its cache, and the refusals of caches or models that do not fit."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoTokenizer

from pipeline import io, metrics
from pipeline.cli import cli
from pipeline.errors import KDError
from stages import teacher
from stages.evaluate import EvalConfig, run
from stages.teacher import TeacherConfig
from tests.conftest import NER_LABELS, build_model, make_data, train_tokenizer

SEQ, TOK, MLM, CLM = "sequence-classification", "token-classification", "masked-lm", "causal-lm"
AUTO = {SEQ: transformers.AutoModelForSequenceClassification, TOK: transformers.AutoModelForTokenClassification,
        MLM: transformers.AutoModelForMaskedLM, CLM: transformers.AutoModelForCausalLM}
MAX_LEN = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory, models, datasets_dir, tokenizer_dir):
    """Caches of the 'test' split (seq-cls at T = 2; token-cls with k < C; causal-lm with
    k = V so the teacher's perplexity is exact; masked-lm with a small k) and students."""
    root = tmp_path_factory.mktemp("eval")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    settings = {SEQ: dict(top_k=8, temperature=2.0), TOK: dict(top_k=3, temperature=1.0),
                CLM: dict(top_k=vocab, temperature=1.0), MLM: dict(top_k=8, temperature=1.0)}
    caches = {}
    for task, kw in settings.items():
        caches[task] = root / "caches" / task
        teacher.run(TeacherConfig(model=str(models[task]), data=str(datasets_dir[task]), task_type=task, split="test",
                                  out=str(caches[task]), max_length=MAX_LEN, progress=False, **kw))
    students = {task: build_model(root / "students" / task / "s1", task, tokenizer_dir, seed=1, layers=1)
                for task in settings}
    students["s2"] = build_model(root / "students" / SEQ / "s2", SEQ, tokenizer_dir, seed=2, layers=1)
    return {"root": root, "caches": caches, "students": students, "models": models, "data": datasets_dir, "runs": {}}


def evaluate(env, task, out, models=None, **kw) -> dict:
    base = dict(model=[str(m) for m in (models or [env["students"][task]])], targets=str(env["caches"][task]),
                data=str(env["data"][task]), split="test", out=str(out), progress=False, timing_examples=4)
    return run(EvalConfig(**{**base, **kw}))


def shared_run(env, task) -> Path:
    """The plain cached evaluation of a task, run once per module and shared by the tests that read it."""
    if task not in env["runs"]:
        out = env["root"] / "runs" / task
        models = [env["students"][SEQ], env["students"]["s2"]] if task == SEQ else None
        env["runs"][task] = (out, evaluate(env, task, out, models=models))
    return env["runs"][task][0]


@functools.lru_cache(maxsize=None)
def dense(task, path, data_path):
    """Float64 logits of a model at every target position of the data, computed here."""
    model = AUTO[task].from_pretrained(path, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in Path(data_path).read_text().splitlines()]
    logits, gold = [], []
    with torch.no_grad():
        for r in rows:
            if task == TOK:
                enc = tok(r["tokens"], is_split_into_words=True, truncation=True, max_length=MAX_LEN)
                wid = enc.word_ids()
                pos = [p for p, w in enumerate(wid) if w is not None and (p == 0 or wid[p - 1] != w)]
                out = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
                logits.append(out[pos])
                gold.append([r["ner_tags"][wid[p]] for p in pos])
            else:
                ids = tok(r["text"], truncation=True, max_length=MAX_LEN)["input_ids"]
                out = model(input_ids=torch.tensor([ids])).logits[0]
                if task == SEQ:
                    logits.append(out[None])
                    gold.append([r["label"]])
                else:  # causal: position t predicts token t+1
                    logits.append(out[:-1])
                    gold.append(ids[1:])
    return logits, gold


def ece(probs, gold, bins=15):
    conf, correct = probs.max(-1), (probs.argmax(-1) == gold)
    total = 0.0
    for b in range(bins):
        m = (conf > b / bins) & (conf <= (b + 1) / bins)
        if m.any():
            total += m.sum() / len(gold) * abs(correct[m].mean() - conf[m].mean())
    return total


def test_four_outputs_and_values_recomputed_for_a_student(env, tmp_path):
    out = shared_run(env, SEQ)
    result = env["runs"][SEQ][1]
    for name in ("metrics.parquet", "comparisons.parquet", "report.md", "plot.png", "manifest.json"):
        assert (out / name).is_file()
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df = pl.read_parquet(out / "metrics.parquet")
    assert df["role"].to_list() == ["teacher", "student", "student"]
    assert df["name"].to_list() == ["sequence-classification", "s1", "s2"]
    assert df["rows"].to_list() == [40, 40, 40] and df["metric"].unique().to_list() == ["accuracy"]

    # The student, recomputed from its own float64 forward and the teacher's.
    t_logits, gold = dense(SEQ, env["models"][SEQ], env["data"][SEQ])
    s_logits, _ = dense(SEQ, env["students"][SEQ], env["data"][SEQ])
    t = torch.cat(t_logits).numpy()
    s = torch.cat(s_logits).numpy()
    y = np.concatenate(gold)
    sp = np.exp(s - s.max(-1, keepdims=True))
    sp /= sp.sum(-1, keepdims=True)
    tp = np.exp(t - t.max(-1, keepdims=True))
    tp /= tp.sum(-1, keepdims=True)
    pred = s.argmax(-1)
    f1s = [2 * ((pred == c) & (y == c)).sum() / ((pred == c).sum() + (y == c).sum())
           for c in range(2) if (pred == c).any() or (y == c).any()]
    row = df.row(1, named=True)
    assert row["accuracy"] == pytest.approx((pred == y).mean())
    assert row["macro_f1"] == pytest.approx(np.mean(f1s))
    assert row["ece"] == pytest.approx(ece(sp, y), abs=1e-6)
    assert row["agreement"] == pytest.approx((pred == t.argmax(-1)).mean())
    assert row["kl"] == pytest.approx((tp * (np.log(tp) - np.log(sp))).sum(-1).mean(), rel=2e-2, abs=1e-4)
    student = AUTO[SEQ].from_pretrained(env["students"][SEQ])
    assert row["params"] == sum(p.numel() for p in student.parameters())
    assert row["disk_bytes"] == (Path(env["students"][SEQ]) / "model.safetensors").stat().st_size
    assert row["examples_per_s"] > 0 and row["latency_p50_ms"] > 0

    # The teacher, from the cache alone: k = C, so its metrics are exact.
    trow = df.row(0, named=True)
    assert trow["scored_from"] == "cache" and trow["agreement"] is None
    assert trow["accuracy"] == pytest.approx((t.argmax(-1) == y).mean())
    assert trow["ece"] == pytest.approx(ece(tp, y), abs=2e-3)
    assert row["pct_of_teacher"] == pytest.approx(100 * row["accuracy"] / trow["accuracy"])
    assert row["speedup"] == pytest.approx(row["examples_per_s"] / trow["examples_per_s"])

    text = (out / "report.md").read_text()
    assert "| `sequence-classification` | teacher |" in text and "| `s1` | student |" in text and "| `s2` | student |" in text
    assert result["table"] in text and "![" in text
    m = io.read_json(out / "manifest.json")
    assert m["kind"] == "evaluation"
    cache_key = io.read_json(env["caches"][SEQ] / "manifest.json")["key"]
    assert {"kind": "targets", "path": str(env["caches"][SEQ]), "key": cache_key} in m["upstream"]
    assert {f["path"]: f["sha256"] for f in m["files"]} == {
        n: io.sha256_file(out / n) for n in ("metrics.parquet", "comparisons.parquet", "report.md", "plot.png")}


def test_token_classification_entities_and_teacher_from_top_k(env):
    df = pl.read_parquet(shared_run(env, TOK) / "metrics.parquet")
    for i, path in ((0, env["models"][TOK]), (1, env["students"][TOK])):
        logits, gold = dense(TOK, path, env["data"][TOK])
        true = [[NER_LABELS[g] for g in gs] for gs in gold]
        pred = [[NER_LABELS[p] for p in lg.argmax(-1).tolist()] for lg in logits]
        want = metrics.entity_prf(true, pred)
        row = df.row(i, named=True)
        assert (row["entity_precision"], row["entity_recall"], row["entity_f1"]) == pytest.approx(
            (want["precision"], want["recall"], want["f1"]))
        probs = torch.softmax(torch.cat(logits), -1).numpy()
        # the teacher's stored top-3 of 7 at T = 1 still give its exact confidence
        assert row["ece"] == pytest.approx(ece(probs, np.concatenate(gold)), abs=2e-3)


def test_causal_lm_perplexity_exact_with_full_k(env, tmp_path):
    evaluate(env, CLM, tmp_path / "eval")
    df = pl.read_parquet(tmp_path / "eval" / "metrics.parquet")
    for i, path in ((0, env["models"][CLM]), (1, env["students"][CLM])):
        logits, gold = dense(CLM, path, env["data"][CLM])
        nll = -torch.cat([torch.log_softmax(lg, -1)[torch.arange(len(g)), torch.tensor(g)] for lg, g in zip(logits, gold)])
        assert df["perplexity"][i] == pytest.approx(math.exp(float(nll.mean())), rel=2e-3)
    assert df["teacher_labels_outside_topk"][0] == 0.0
    t = torch.log_softmax(torch.cat(dense(CLM, env["models"][CLM], env["data"][CLM])[0]), -1)
    s = torch.log_softmax(torch.cat(dense(CLM, env["students"][CLM], env["data"][CLM])[0]), -1)
    assert df["kl"][1] == pytest.approx(float((t.exp() * (t - s)).sum(-1).mean()), rel=2e-2)


def test_masked_lm_teacher_perplexity_is_a_marked_lower_bound(env, tmp_path):
    evaluate(env, MLM, tmp_path / "eval")
    row = pl.read_parquet(tmp_path / "eval" / "metrics.parquet").row(0, named=True)
    assert row["teacher_labels_outside_topk"] > 0 and row["perplexity"] > 1
    text = (tmp_path / "eval" / "report.md").read_text()
    assert f"| ≥{row['perplexity']:.2f} |" in text and "lower bound" in text


def test_teacher_runs_here_without_a_cache(env, tmp_path):
    out = tmp_path / "eval"
    evaluate(env, SEQ, out, targets=None, teacher=str(env["models"][SEQ]))
    a, b = pl.read_parquet(out / "metrics.parquet"), pl.read_parquet(shared_run(env, SEQ) / "metrics.parquet").head(2)
    assert a["role"].to_list() == ["teacher", "student"]
    assert a["accuracy"].to_list() == b["accuracy"].to_list()  # classification targets are exact at any T
    assert a["agreement"].to_list() == b["agreement"].to_list()
    built = io.read_json(out / "targets" / "manifest.json")
    assert built["stats"]["temperature"] == 1.0
    assert {"kind": "targets", "path": str(out / "targets"), "key": built["key"]} in io.read_json(out / "manifest.json")["upstream"]


def test_students_alone_on_the_split(env, tmp_path):
    """No cache, no teacher: the task type comes from the student's manifest; no reference row."""
    student = tmp_path / "trained"
    shutil.copytree(env["students"][TOK], student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "architectures": None}))
    io.write_json(student / "manifest.json", {"kind": "student", "key": "k" * 64, "config": {"task_type": TOK}})
    out = tmp_path / "eval"
    evaluate(env, TOK, out, targets=None, models=[student])
    assert {"kind": "student", "path": str(student), "key": "k" * 64} in io.read_json(out / "manifest.json")["upstream"]
    df = pl.read_parquet(out / "metrics.parquet")
    assert df["role"].to_list() == ["student"] and df["agreement"][0] is None and df["pct_of_teacher"][0] is None
    assert df["entity_f1"][0] == pytest.approx(pl.read_parquet(shared_run(env, TOK) / "metrics.parquet")["entity_f1"][1])


def _one_line_refusal(match, fn):
    with pytest.raises(KDError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


def test_refuses_a_label_set_that_does_not_fit(env, tmp_path, tokenizer_dir):
    three = build_model(tmp_path / "three", SEQ, tokenizer_dir, num_labels=3)
    _one_line_refusal(r"label set mismatch: .*three predicts \[L0, L1, L2\] \(3\) "
                      r"but the labels of the cache .* are \[negative, positive\] \(2\)",
                      lambda: evaluate(env, SEQ, tmp_path / "e", models=[three]))


@pytest.mark.parametrize("task", [MLM, TOK])
def test_refuses_a_vocabulary_that_does_not_fit(env, tmp_path, task):
    other_tok = tmp_path / "tok"
    train_tokenizer(other_tok, vocab_size=120)
    student = build_model(tmp_path / "other", task, other_tok)
    _one_line_refusal(r"vocabulary mismatch: .*other has a \d+-token vocabulary .* the cache .* needs the teacher's tokenizer",
                      lambda: evaluate(env, task, tmp_path / "e", models=[student]))


def test_seq_cls_student_with_its_own_tokenizer_retokenises(env, tmp_path):
    other_tok = tmp_path / "tok"
    train_tokenizer(other_tok, vocab_size=120)
    student = build_model(tmp_path / "own-tok", SEQ, other_tok)
    evaluate(env, SEQ, tmp_path / "e", models=[student])
    row = pl.read_parquet(tmp_path / "e" / "metrics.parquet").row(1, named=True)
    logits, gold = dense(SEQ, student, env["data"][SEQ])
    assert row["accuracy"] == pytest.approx((torch.cat(logits).argmax(-1).numpy() == np.concatenate(gold)).mean())
    assert "re-tokenised" in (tmp_path / "e" / "report.md").read_text()


def test_refuses_incomplete_damaged_or_other_caches(env, tmp_path):
    cache = env["caches"][SEQ]
    incomplete = tmp_path / "incomplete"
    shutil.copytree(cache, incomplete)
    (incomplete / "manifest.json").unlink()
    _one_line_refusal(r"incomplete \(no manifest.json\)", lambda: evaluate(env, SEQ, tmp_path / "e", targets=str(incomplete)))
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    next((damaged / "shards").glob("*.parquet")).unlink()
    _one_line_refusal(r"damaged .* is missing", lambda: evaluate(env, SEQ, tmp_path / "e", targets=str(damaged)))
    other = make_data(tmp_path / "other.jsonl", SEQ, seed=5)
    _one_line_refusal(r"--data .*other.jsonl is not the data the cache", lambda: evaluate(env, SEQ, tmp_path / "e", data=str(other)))
    _one_line_refusal(r"holds sequence-classification targets", lambda: evaluate(env, SEQ, tmp_path / "e", task_type=TOK))
    _one_line_refusal(r"holds the output of another kd stage", lambda: evaluate(env, SEQ, cache))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(env["students"][SEQ], unfinished)
    io.write_json(unfinished / "plan.json", {"kind": "student", "key": "k", "num_tasks": 1})
    _one_line_refusal(r"unfinished is incomplete", lambda: evaluate(env, SEQ, tmp_path / "e", models=[unfinished]))
    _one_line_refusal(r"--model .* holds a 'targets' output, not a model", lambda: evaluate(env, SEQ, tmp_path / "e", models=[cache]))
    _one_line_refusal(r"is a token-classification model but this evaluation is sequence-classification",
                      lambda: evaluate(env, SEQ, tmp_path / "e", models=[env["students"][TOK]]))


def test_cli_with_config_file(env, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: [{env['students'][SEQ]}, {env['students']['s2']}]\ntargets: {env['caches'][SEQ]}\n"
                      f"split: test\nout: {tmp_path / 'out'}\ntiming-examples: 2\n")
    res = CliRunner().invoke(cli, ["eval", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "out" / "report.md") in res.output and "| `s2` | student |" in res.output
    assert pl.read_parquet(tmp_path / "out" / "metrics.parquet").height == 3
    bad = CliRunner().invoke(cli, ["eval", "--model", str(env["students"][SEQ]), "--targets", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and bad.output.strip().count("\n") == 0 and "does not exist" in bad.output


def test_rerun_with_same_inputs_is_reused_and_writes_nothing(env, tmp_path, capsys):
    out = tmp_path / "again"
    first = evaluate(env, TOK, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = evaluate(env, TOK, out)
    assert second.get("reused") and second["table"] == first["table"]
    assert "already holds this evaluation" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    third = evaluate(env, TOK, out, batch_size=7)  # other settings: evaluated afresh
    assert not third.get("reused")


def test_comparisons_paired_interval_and_mcnemar(env):
    """Each student against the other and the teacher on the same rows: the parquet holds the
    difference recomputed here, a seeded interval around it, McNemar's p from the discordant rows."""
    from pipeline import uncertainty

    out = shared_run(env, SEQ)
    df = pl.read_parquet(out / "comparisons.parquet")
    assert df.columns == ["a", "b", "metric", "diff", "ci_low", "ci_high", "p_value", "n_rows"]
    assert [(r["a"], r["b"]) for r in df.iter_rows(named=True)] == [
        ("s1", "sequence-classification"), ("s1", "s2"), ("s2", "sequence-classification"), ("s2", "s1")]
    t_logits, gold = dense(SEQ, env["models"][SEQ], env["data"][SEQ])
    s_logits, _ = dense(SEQ, env["students"][SEQ], env["data"][SEQ])
    y = np.concatenate(gold)
    right_t, right_s = torch.cat(t_logits).numpy().argmax(-1) == y, torch.cat(s_logits).numpy().argmax(-1) == y
    row = df.row(0, named=True)
    assert row["metric"] == "accuracy" and row["n_rows"] == 40
    assert row["diff"] == pytest.approx(right_s.mean() - right_t.mean())
    assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    assert row["p_value"] == pytest.approx(uncertainty.mcnemar_exact(int((right_s & ~right_t).sum()),
                                                                     int((~right_s & right_t).sum())))
    want = uncertainty.paired_bootstrap(right_s.astype(float), right_t.astype(float), np.ones(40), np.ones(40), 1000)
    assert (row["diff"], row["ci_low"], row["ci_high"]) == pytest.approx(want)
    text = (out / "report.md").read_text()
    assert "Differences (accuracy" in text and "95% CI [" in text and f"p = {row['p_value']:.3g}" in text
    assert "`s1` vs `sequence-classification`: " in text and uncertainty.verdict(row) in text
    m = io.read_json(out / "manifest.json")
    assert {"path": "comparisons.parquet", "rows": 4}.items() <= next(f for f in m["files"] if f["path"] == "comparisons.parquet").items()


def test_language_model_comparisons_are_nll_per_token_without_mcnemar(env):
    df = pl.read_parquet(shared_run(env, CLM) / "comparisons.parquet")  # k = V: the teacher's NLL is exact
    assert df.height == 1 and df["metric"].to_list() == ["nll_per_token"] and df["p_value"].to_list() == [None]
    metrics_df = pl.read_parquet(shared_run(env, CLM) / "metrics.parquet")
    t, s = metrics_df["perplexity"].to_list()
    assert df["diff"][0] == pytest.approx(math.log(s) - math.log(t))
    assert df["ci_low"][0] <= df["diff"][0] <= df["ci_high"][0]
    # masked-lm: labels fall outside the teacher's top-8, its NLL is only a bound: no comparison with it
    assert pl.read_parquet(shared_run(env, MLM) / "comparisons.parquet").height == 0


def test_targets_without_data_take_the_caches_split(env, tmp_path):
    """A cache of a local file built with kd teacher's default split (train) is evaluated with the
    default --split test: the split is the cache's; a named split of a DatasetDict is still checked."""
    train = tmp_path / "train-cache"
    shutil.copytree(env["caches"][SEQ], train)
    m = io.read_json(train / "manifest.json")
    m["config"]["split"] = m["fingerprints"]["dataset"]["split"] = "train"
    io.write_json(train / "manifest.json", m)
    res = run(EvalConfig(model=[str(env["students"][SEQ])], targets=str(train), out=str(tmp_path / "e"), progress=False,
                         timing_examples=2, bootstrap=10))
    assert "rows of split `train`" in Path(res["report"]).read_text()
    saved = tmp_path / "saved"  # a save_to_disk directory of several splits: there the name picks the rows
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    m["config"]["data"], m["fingerprints"]["dataset"]["source"] = str(saved), {"directory": True}
    io.write_json(train / "manifest.json", m)
    _one_line_refusal(r"--split test but the cache .* holds split 'train'",
                      lambda: run(EvalConfig(model=[str(env["students"][SEQ])], targets=str(train), data=str(saved),
                                             out=str(tmp_path / "e2"), progress=False)))
