"""The evaluation's outputs without any model: ratios to the teacher, the metrics.parquet schema,
the markdown table and the plot, including rows with missing numbers."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from pipeline import costs, report


def rows_for(metric="accuracy", task="sequence-classification"):
    base = dict(task_type=task, metric=metric, scored_from="model", rows=10, positions=10)
    teacher = {**base, "name": "big", "model": "/m/big", "role": "teacher", "scored_from": "cache", metric: 0.8,
               "value": 0.8, "params": 1_000_000, "disk_bytes": 4_000_000, "examples_per_s": 100.0, "latency_p50_ms": 10.0}
    small = {**base, "name": "small", "model": "/m/small", "role": "student", metric: 0.6, "value": 0.6,
             "agreement": 0.9, "kl": 0.05, "params": 250_000, "disk_bytes": 1_000_000, "examples_per_s": 400.0,
             "latency_p50_ms": 2.5}
    return [small, teacher]  # the teacher need not come first


def test_relative_to_the_teacher():
    small, teacher = report.relative(rows_for())
    assert small["pct_of_teacher"] == pytest.approx(75.0)
    assert small["param_ratio"] == pytest.approx(0.25) and small["speedup"] == pytest.approx(4.0)
    assert teacher["pct_of_teacher"] == pytest.approx(100.0) and teacher["speedup"] == pytest.approx(1.0)


def test_perplexity_percent_is_teacher_over_student():
    rows = rows_for("perplexity", "causal-lm")
    rows[0].update(perplexity=20.0, value=20.0)
    rows[1].update(perplexity=10.0, value=10.0)
    assert report.relative(rows)[0]["pct_of_teacher"] == pytest.approx(50.0)


def test_ratios_stay_empty_without_a_teacher_number():
    small, teacher = rows_for()
    teacher.update(value=None, examples_per_s=None, params=0)
    out = report.relative([small, teacher])[0]
    assert out["pct_of_teacher"] is None and out["speedup"] is None and out["param_ratio"] is None
    alone = report.relative([small])[0]
    assert alone["pct_of_teacher"] is None and alone["speedup"] is None
    inf = report.relative([{**small, "value": math.inf}, rows_for()[1]])[0]
    assert inf["pct_of_teacher"] is None


def test_metrics_parquet_has_one_fixed_schema(tmp_path):
    path = tmp_path / "metrics.parquet"
    report.write_metrics(path, report.relative(rows_for()))
    df = pl.read_parquet(path)
    assert df.columns == list(report.COLUMNS) and df.height == 2
    assert df.schema["entity_f1"] == pl.Float64 and df["entity_f1"].null_count() == 2  # all-null still typed
    assert df.schema["params"] == pl.Int64 and df["name"].to_list() == ["small", "big"]


def test_table_puts_the_teacher_first_and_marks_missing_values():
    rows = report.relative(rows_for())
    rows[0]["ece"] = None
    text = report.table(rows, "sequence-classification")
    lines = text.splitlines()
    assert lines[0].startswith("| model | role | accuracy | % of teacher | macro-F1 | ECE |")
    assert lines[2].startswith("| `big` | teacher | 0.8000 | 100.0% |")
    assert lines[3].startswith("| `small` | student | 0.6000 | 75.0% |")
    assert "250.0k (25%)" in lines[3] and "4.00×" in lines[3] and "| — |" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_teacher_perplexity_bound_is_marked():
    rows = rows_for("perplexity", "masked-lm")
    rows[1].update(perplexity=12.345, value=12.345, teacher_labels_outside_topk=0.2)
    rows[0].update(perplexity=20.0, value=20.0)
    text = report.markdown(report.relative(rows), "masked-lm", ["header line"],
                           report.teacher_notes({"temperature": 1.0, "top_k": 8, "task_type": "masked-lm", "outputs": 100},
                                                rows[1]), "plot.png")
    assert "| ≥12.35 |" in text and "20.0% of target tokens fell outside the stored top-8" in text
    assert "% of teacher = student ÷ teacher" in text and "](plot.png)" in text and "header line" in text


def test_teacher_notes_say_what_is_not_recoverable():
    notes = report.teacher_notes({"temperature": 2.0, "top_k": 8, "task_type": "causal-lm", "outputs": 100}, {})
    assert "renormalised" in notes[0] and "Teacher perplexity is empty" in notes[1]
    notes = report.teacher_notes({"temperature": 2.0, "top_k": 3, "task_type": "token-classification", "outputs": 7}, {})
    assert "Teacher ECE is empty" in notes[1]


def test_kl_note_is_exact_when_every_class_is_stored():
    """Sequence classification keeps k = C: the KL is exact at any T, not a proxy with an unknown tail."""
    for T in (1.0, 2.0):
        note = report.teacher_notes({"temperature": T, "top_k": 2, "task_type": "sequence-classification", "outputs": 2},
                                    {"ece": 0.1})[0]
        assert "exact" in note and "unknown" not in note and "proxy" not in note and "tail" not in note


def test_comparison_lines_say_whether_a_difference_is_noise():
    rows = [{"a": "s", "b": "t", "metric": "accuracy", "diff": -0.2, "ci_low": -0.3, "ci_high": -0.1, "p_value": 0.01,
             "n_rows": 50},
            {"a": "s", "b": "u", "metric": "accuracy", "diff": 0.02, "ci_low": -0.05, "ci_high": 0.08, "p_value": 0.6,
             "n_rows": 50}]
    text = "\n".join(report.comparison_lines(rows))
    assert "`s` vs `t`: 20.00 percentage points worse (-20.00; 95% CI [-30.00, -10.00], p = 0.01): distinguishable" in text
    assert "`s` vs `u`: 2.00 percentage points better (+2.00; 95% CI [-5.00, +8.00], p = 0.6): not distinguishable" in text


@pytest.mark.parametrize("teacher_cost", [True, False])
def test_plot_writes_a_png_with_or_without_teacher_costs(tmp_path, teacher_cost):
    rows = report.relative(rows_for())
    if not teacher_cost:
        rows[1].update(params=None, examples_per_s=None)
    rows.append({**rows[0], "name": "broken", "accuracy": None, "params": None})
    report.plot(tmp_path / "plot.png", rows, "sequence-classification")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_costs_count_tied_parameters_once_and_only_weight_files(tmp_path):
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert costs.param_count(torch.nn.Sequential(emb, head)) == 40
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 1000)
    assert costs.disk_bytes(tmp_path) == 100


def test_speed_of_a_toy_model():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, attention_mask):
            return self.emb(input_ids) * attention_mask[..., None]

    speed = costs.measure_speed(Toy(), [[1, 2, 3], [4, 5], [6]], 0, 2, torch.device("cpu"))
    assert speed["examples_per_s"] > 0 and speed["latency_p50_ms"] > 0 and speed["timing_examples"] == 3
    assert costs.measure_speed(Toy(), [], 0, 2, torch.device("cpu"))["examples_per_s"] is None


def test_comparison_lines_say_each_pair_once_later_row_against_earlier():
    def pair(a, b, d):
        return {"a": a, "b": b, "metric": "accuracy", "diff": d, "ci_low": d - 0.01, "ci_high": d + 0.01, "p_value": 0.5,
                "n_rows": 10}

    rows = [pair("s1", "t", 0.1), pair("s1", "s2", 0.2), pair("s2", "t", -0.1), pair("s2", "s1", -0.2)]
    text = "\n".join(report.comparison_lines(rows, ["t", "s1", "s2"]))
    assert "`s1` vs `t`" in text and "`s2` vs `t`" in text and "`s2` vs `s1`: 20.00 percentage points worse" in text
    assert "`s1` vs `s2`" not in text
