"""`kd tune`'s helpers (pipeline.tuning): the grid and its refusals, the point configs, the key,
the choice of the best point in either direction and without labels, and the three outputs."""

from __future__ import annotations

import math

import polars as pl
import pytest

from pipeline import config as C
from pipeline import jobarray, tuning
from pipeline.errors import KDError


def test_grid_order_names_and_values():
    points = tuning.grid("1,2", [0.5, 1], "kl, reverse-kl")
    assert [p.name for p in points] == ["T1-a0.5-kl", "T1-a1-kl", "T2-a0.5-kl", "T2-a1-kl",
                                        "T1-a0.5-reverse-kl", "T1-a1-reverse-kl", "T2-a0.5-reverse-kl", "T2-a1-reverse-kl"]
    assert points[3] == tuning.Point(2.0, 1.0, "kl")
    assert [p.name for p in tuning.grid(2.5, "0.9", ["jsd"])] == ["T2.5-a0.9-jsd"]
    assert tuning.grid("4,1", "1,0", "kl")[0].name == "T4-a1-kl"  # the order given: point i is array task i


@pytest.mark.parametrize("temperatures, alphas, losses, message", [
    ("", "0.5", "kl", "--temperatures is empty"),
    (" , ", "0.5", "kl", "--temperatures is empty"),
    ([], "0.5", "kl", "--temperatures is empty"),
    ("1", "", "kl", "--alphas is empty"),
    ("1", "0.5", "", "--losses is empty"),
    ("0", "0.5", "kl", "positive finite numbers, got 0"),
    ("1,-2", "0.5", "kl", "positive finite numbers, got -2"),
    ("inf", "0.5", "kl", "positive finite numbers, got inf"),
    ("1", "1.5", "kl", r"--alphas must each be in \[0, 1\], got 1.5"),
    ("1", "-0.1", "kl", r"in \[0, 1\], got -0.1"),
    ("1", "0.5", "kl,kld", "unknown loss 'kld' in --losses"),
    ("1,1.0", "0.5", "kl", "--temperatures lists 1 twice"),
    ("1", "0.5,0.50", "kl", "--alphas lists 0.5 twice"),
    ("1", "0.5", "kl,kl", "--losses lists kl twice"),
    ("one,two", "0.5", "kl", "--temperatures must be values separated by commas"),
    ([True], "0.5", "kl", "--temperatures must be values separated by commas"),
])
def test_bad_grids_are_refused_in_one_line(temperatures, alphas, losses, message):
    with pytest.raises(KDError, match=message) as exc:
        tuning.grid(temperatures, alphas, losses)
    assert "\n" not in str(exc.value)


def tune_cfg(**kw):
    return C.build(C.TuneConfig, {"targets": "c/train", "eval_targets": "c/val", "out": "tune", **kw}, "test")


def test_tune_config_has_every_train_flag_but_the_per_point_ones():
    tune_flags = {f.name for f in C.flags(C.TuneConfig)}
    train_flags = {f.name for f in C.flags(C.TrainConfig)}
    assert train_flags - tune_flags == set(C.TUNE_SETS + C.TUNE_DROPS) - {"eval_targets", "out", "task_index"}
    assert {"temperatures", "alphas", "losses", "eval_targets", "out", "task_index"} <= tune_flags
    with pytest.raises(KDError, match="missing --eval-targets, --out, --targets"):
        C.build(C.TuneConfig, {}, "kd tune")
    with pytest.raises(KDError, match="unknown key 'alpha'"):
        tune_cfg(alpha=0.5)  # set per point: the grid's, not a flag


def test_point_config_is_the_shared_settings_plus_the_point():
    cfg = tune_cfg(lr=1e-3, max_steps=7, student_from_teacher="t", student_layers="0,2", save_every=3)
    point = tuning.Point(4.0, 0.9, "reverse-kl")
    train = tuning.point_config(cfg, point)
    assert isinstance(train, C.TrainConfig)
    assert (train.temperature, train.alpha, train.loss) == (4.0, 0.9, "reverse-kl")
    assert train.out == "tune/points/T4-a0.9-reverse-kl" and tuning.eval_dir("tune", point).as_posix() == "tune/evals/T4-a0.9-reverse-kl"
    assert (train.lr, train.max_steps, train.student_from_teacher, train.student_layers, train.save_every) == (1e-3, 7, "t", "0,2", 3)
    assert train.targets == ["c/train"] and train.sweep is None and train.eval_targets is None


def test_key_follows_the_grid_and_the_settings_not_the_spelling_or_the_place():
    caches, validation = [{"key": "a" * 64}], {"key": "b" * 64}

    def key(**kw):
        cfg = tune_cfg(**kw)
        return tuning.tune_key(cfg, tuning.grid(cfg.temperatures, cfg.alphas, cfg.losses), caches, validation)

    base = key(temperatures="1,2")
    assert key(temperatures=[1, 2.0]) == base
    assert key(temperatures="1,2", out="elsewhere", save_every=7, task_index=1, eval_targets="moved") == base
    assert key(temperatures="1,2,4") != base and key(temperatures="1,2", lr=1e-3) != base
    cfg = tune_cfg(temperatures="1,2")
    points = tuning.grid(cfg.temperatures, cfg.alphas, cfg.losses)
    assert tuning.tune_key(cfg, points, caches, {"key": "c" * 64}) != base
    assert tuning.tune_key(cfg, points, [{"key": "d" * 64}], validation) != base


def rows(*specs):
    """Point rows as stages.tune builds them: (name, T, alpha, accuracy-or-perplexity value, kl)."""
    return [{"name": n, "temperature": t, "alpha": a, "loss": "kl", "accuracy": v, "perplexity": v, "kl": kl,
             "agreement": 0.5, "student": f"tune/points/{n}"} for n, t, a, v, kl in specs]


def test_best_point_higher_is_better_with_ties_to_lower_kl_then_grid_order():
    points = rows(("p0", 1, 0.5, 0.70, 0.1), ("p1", 1, 1, 0.80, 0.3), ("p2", 2, 0.5, 0.80, 0.2),
                  ("p3", 2, 1, 0.80, 0.2), ("p4", 4, 1, float("nan"), 0.0), ("p5", 4, 0.5, None, 0.0))
    metric, higher, note = tuning.choose_metric("sequence-classification", points)
    assert (metric, higher, note) == ("accuracy", True, None)
    ranked = tuning.rank(points, metric, higher)
    assert [r["name"] for r in ranked] == ["p2", "p3", "p1", "p0", "p4", "p5"]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5, 6] and [r["best"] for r in ranked] == [True] + [False] * 5
    assert ranked[0]["metric"] == "accuracy" and ranked[0]["value"] == 0.80


def test_best_point_lower_is_better_for_perplexity():
    points = rows(("p0", 1, 0.5, 12.0, 0.1), ("p1", 2, 0.5, 9.5, 0.3), ("p2", 4, 0.5, 30.0, 0.0))
    metric, higher, _ = tuning.choose_metric("causal-lm", points)
    assert (metric, higher) == ("perplexity", False)
    assert [r["name"] for r in tuning.rank(points, metric, higher)] == ["p1", "p0", "p2"]


def test_without_labels_the_points_are_ranked_by_kl_and_the_report_says_so():
    points = rows(("p0", 1, 0.5, None, 0.30), ("p1", 2, 0.5, None, 0.05), ("p2", 4, 0.5, None, 0.10))
    metric, higher, note = tuning.choose_metric("sequence-classification", points)
    assert (metric, higher) == ("kl", False) and "no labels" in note and "KL" in note
    ranked = tuning.rank(points, metric, higher)
    assert [r["name"] for r in ranked] == ["p1", "p2", "p0"] and ranked[0]["value"] == 0.05


def test_outputs_table_heatmap_and_report(tmp_path):
    points = [{"name": p.name, "temperature": p.temperature, "alpha": p.alpha, "loss": p.loss, "accuracy": v,
               "kl": 1 - v, "agreement": v, "wall_seconds": 1.5, "steps": 3, "final_loss": 0.1,
               "student": f"tune/points/{p.name}", "evaluation": f"tune/evals/{p.name}"}
              for p, v in zip(tuning.grid("1,2", "0.5,1", "kl,jsd"), [0.5, 0.6, 0.9, 0.7, 0.55, 0.65, 0.8, math.nan])]
    ranked = tuning.rank(points, "accuracy", True)
    tuning.write_table(tmp_path / "tune.parquet", ranked)
    df = pl.read_parquet(tmp_path / "tune.parquet")
    assert df.columns == list(tuning.COLUMNS) and df.height == 8
    assert df.row(0, named=True)["name"] == "T2-a0.5-kl" and df["best"].to_list() == [True] + [False] * 7
    assert df["value"].to_list()[-1] is None or math.isnan(df["value"].to_list()[-1])
    tuning.heatmap(tmp_path / "heatmap.png", ranked, "accuracy", True)
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tuning.markdown(ranked, "sequence-classification", True, ["A header."], ["A note."])
    assert "**Best point: `T2-a0.5-kl`**" in text and "Its student: `tune/points/T2-a0.5-kl`" in text
    assert "A header." in text and "- A note." in text and "(heatmap.png)" in text
    assert text.index("`T2-a0.5-kl`") < text.index("`T2-a0.5-jsd`") < text.index("`T2-a1-jsd`")
    assert not list(tmp_path.glob(".tmp-*"))


def test_in_array_sees_any_schedulers_index():
    assert not jobarray.in_array({})
    assert not jobarray.in_array({"KD_NUM_TASKS": "4"})
    assert jobarray.in_array({"SLURM_ARRAY_TASK_ID": "3"})
    assert jobarray.in_array({"SGE_TASK_ID": "2", "SGE_TASK_LAST": "4"})
    assert not jobarray.in_array({"SGE_TASK_ID": "undefined"})
