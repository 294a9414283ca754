"""`kd tune`'s library half: the grid of (T, alpha, loss) points, where each point's student and
evaluation live, the checks on the caches, the key, the choice of the best point, and its outputs
(tune.parquet, heatmap.png, report.md). The recipe that trains and scores the points is
stages/tune.py; `kd slurm tune` uses the same grid and directories to know what is missing.

Points are ordered loss, then T, then alpha, as given: point i is array task i, so the order must
be a pure function of the flags. Their names (`T2-a0.9-kl`) are directory names, so two values
that print alike (1 and 1.0) are one value given twice, and refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

from pipeline import config, io, manifest, report, tasks
from pipeline.errors import KDError, short
from pipeline.fit import first_difference

POINTS, EVALS = "points", "evals"
OUTPUTS = ("tune.parquet", "heatmap.png", "report.md")


@dataclasses.dataclass(frozen=True)
class Point:
    temperature: float
    alpha: float
    loss: str

    @property
    def name(self) -> str:
        return f"T{self.temperature:g}-a{self.alpha:g}-{self.loss}"


_EXAMPLES = {"--temperatures": "1,2,4", "--alphas": "0.5,0.9,1.0", "--losses": "kl,reverse-kl"}


def grid(temperatures: Any, alphas: Any, losses: Any) -> list[Point]:
    """Every (T, alpha, loss) point, refused before anything trains when a value is out of range,
    unknown, or given twice."""
    ts, alphas_, losses_ = (config.comma_values(temperatures, "--temperatures", float, _EXAMPLES["--temperatures"]),
                            config.comma_values(alphas, "--alphas", float, _EXAMPLES["--alphas"]),
                            config.comma_values(losses, "--losses", str, _EXAMPLES["--losses"]))
    for t in ts:
        if not (math.isfinite(t) and t > 0):
            raise KDError(f"--temperatures must be positive finite numbers, got {t:g}")
    for a in alphas_:
        if not 0.0 <= a <= 1.0:
            raise KDError(f"--alphas must each be in [0, 1], got {a:g}")
    for loss in losses_:
        if loss not in config.LOSSES:
            raise KDError(f"unknown loss {short(loss)} in --losses: use {', '.join(config.LOSSES)}")
    for flag, values, show in (("--temperatures", ts, "{:g}"), ("--alphas", alphas_, "{:g}"), ("--losses", losses_, "{}")):
        shown = [show.format(v) for v in values]
        twice = next((s for i, s in enumerate(shown) if s in shown[:i]), None)
        if twice is not None:
            raise KDError(f"{flag} lists {twice} twice; give each value once")
    return [Point(t, a, loss) for loss, t, a in itertools.product(losses_, ts, alphas_)]


def student_dir(out: str | Path, point: Point) -> Path:
    return Path(out) / POINTS / point.name


def eval_dir(out: str | Path, point: Point) -> Path:
    return Path(out) / EVALS / point.name


def point_config(cfg, point: Point):
    """The `kd train` config of one point: every shared flag of `cfg`, plus the point's T, alpha,
    loss and directory."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(config.TrainConfig)
              if f.name not in config.TUNE_SETS + config.TUNE_DROPS and hasattr(cfg, f.name)}
    values = {**shared, "out": str(student_dir(cfg.out, point)), "temperature": point.temperature,
              "alpha": point.alpha, "loss": point.loss}
    return config.build(config.TrainConfig, values, f"grid point {point.name}")


# --- the caches ---------------------------------------------------------------------------------

# What the validation cache must share with the training caches for its scores to mean anything:
# its labels and token ids index what the students predict, and agreement and KL compare them with
# the teacher they learnt from. Its data, max length, k and T may differ.
MUST_AGREE = ("task type", "teacher", "tokenizer", "labels")


def open_caches(cfg) -> tuple[list[dict], dict]:
    """The manifests of the training caches and of the validation cache, each complete, and the
    validation cache refused (naming the field) unless it is of the training caches' teacher."""
    paths = cfg.targets or []
    if not paths:
        raise KDError("kd tune distils from a cache: give --targets DIR")
    caches = [manifest.read_cache(Path(p)) for p in paths]
    validation = manifest.read_cache(Path(cfg.eval_targets))
    differs = first_difference(caches[0], validation, MUST_AGREE)
    if differs:
        raise KDError(f"--eval-targets {cfg.eval_targets} differs from --targets {paths[0]} in its {differs}; score the "
                      f"points on a cache of the same teacher (kd teacher with the model and tokenizer of --targets, on "
                      f"the validation split)")
    return caches, validation


def tune_key(cfg, points: list[Point], caches: list[dict], validation: dict) -> str:
    """sha256 over what decides the outputs: the shared settings, the grid, the caches' keys."""
    settings = {k: v for k, v in config.result_settings(cfg).items()
                if k not in ("temperatures", "alphas", "losses", "eval_targets")}
    return io.sha256_bytes(io.canonical_json({
        "settings": settings, "points": [dataclasses.asdict(p) for p in points],
        "targets": [m["key"] for m in caches], "validation": validation["key"]}).encode())


# --- the best point -----------------------------------------------------------------------------

def choose_metric(task_type: str, rows: list[dict]) -> tuple[str, bool, str | None]:
    """(metric, higher is better, note): the task's primary metric on the validation rows, or, where
    the validation cache has no labels to compute it from, KL(T‖S) to the teacher, saying so."""
    metric = tasks.get(task_type).primary_metric
    if any(finite(r.get(metric)) for r in rows):
        return metric, metric not in report.LOWER_IS_BETTER, None
    return "kl", False, (f"The validation cache has no labels to compute {report.LABELS[metric]} from: the points are "
                         f"ranked by KL(T‖S) to the teacher on its rows (lower is better), not by a task metric.")


def rank(rows: list[dict], metric: str, higher: bool) -> list[dict]:
    """The rows best first, with `metric`, `value`, `rank` and `best` filled in. Ties go to the lower
    KL to the teacher, then to the earlier grid point; a missing or non-finite value ranks last."""
    def order(i_row):
        i, r = i_row
        v, kl = r.get(metric), r.get("kl")
        return (not finite(v), -v if finite(v) and higher else v if finite(v) else 0.0,
                kl if finite(kl) else math.inf, i)

    ranked = [r for _, r in sorted(enumerate(rows), key=order)]
    return [{**r, "metric": metric, "value": r.get(metric), "rank": i + 1, "best": i == 0} for i, r in enumerate(ranked)]


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- outputs ------------------------------------------------------------------------------------

COLUMNS = {"rank": "i64", "name": "str", "temperature": "f64", "alpha": "f64", "loss": "str", "metric": "str",
           "value": "f64", "agreement": "f64", "kl": "f64", "wall_seconds": "f64", "steps": "i64",
           "final_loss": "f64", "best": "bool", "student": "str", "evaluation": "str"}


def write_table(path: Path, rows: list[dict]) -> None:
    """tune.parquet: one row per point, best first (a fixed schema: empty values stay null)."""
    import polars as pl

    types = {"str": pl.Utf8, "f64": pl.Float64, "i64": pl.Int64, "bool": pl.Boolean}
    df = pl.DataFrame({c: [r.get(c) for r in rows] for c in COLUMNS}, schema={c: types[t] for c, t in COLUMNS.items()})
    with io.atomic_path(path) as tmp:
        df.write_parquet(tmp)


def heatmap(path: Path, rows: list[dict], metric: str, higher: bool) -> None:
    """One panel per loss: alpha down, T across, each cell the validation value; the best point is
    boxed. The colour map runs so that better is always brighter."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    losses = sorted({r["loss"] for r in rows}, key=config.LOSSES.index)
    ts, alphas = sorted({r["temperature"] for r in rows}), sorted({r["alpha"] for r in rows})
    fig, axes = plt.subplots(1, len(losses), figsize=(1.4 + 1.1 * len(ts) * len(losses) + 1.5, 1.4 + 0.6 * len(alphas)),
                             squeeze=False, constrained_layout=True)
    values = [r["value"] for r in rows if finite(r.get("value"))]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:  # every point alike: a visible scale around the one value
        lo, hi = lo - max(abs(lo) * 0.01, 1e-3), hi + max(abs(hi) * 0.01, 1e-3)
    cmap = "viridis" if higher else "viridis_r"
    label = report.LABELS.get(metric, metric)
    for ax, loss in zip(axes[0], losses):
        cells = np.full((len(alphas), len(ts)), np.nan)
        for r in rows:
            if r["loss"] == loss and finite(r.get("value")):
                cells[alphas.index(r["alpha"]), ts.index(r["temperature"])] = r["value"]
        image = ax.imshow(cells, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(cells):
            r, g, b, _ = image.cmap(image.norm(v)) if not np.isnan(v) else (1, 1, 1, 1)
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.4g}", ha="center", va="center", fontsize=8,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")  # legible on any cell
        best = next(r for r in rows if r["best"])
        if best["loss"] == loss:
            j, i = ts.index(best["temperature"]), alphas.index(best["alpha"])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="tab:red", linewidth=2.5))
        ax.set_xticks(range(len(ts)), [f"{t:g}" for t in ts])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("T")
        ax.set_ylabel("α")
        ax.set_title(f"loss {loss}", fontsize=9)
    bar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9, label=f"{label} ({'higher' if higher else 'lower'} is better)")
    bar.formatter.set_useOffset(False)
    fig.suptitle(f"validation {label}; best point boxed")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def markdown(rows: list[dict], task_type: str, higher: bool, header: list[str], notes: list[str]) -> str:
    """report.md: the best point and its student first, then every point, ranked."""
    best, metric = rows[0], rows[0]["metric"]
    label = report.LABELS.get(metric, metric)
    lines = [f"# kd tune — {task_type}", "", *(x for h in header for x in (h, "")),
             f"**Best point: `{best['name']}`** (T = {best['temperature']:g}, α = {best['alpha']:g}, loss `{best['loss']}`): "
             f"validation {label} {_cell(best['value'])} ({'higher' if higher else 'lower'} is better).", "",
             f"Its student: `{best['student']}`", "",
             f"Ranked by validation {label}, ties to the lower KL(T‖S), then to the earlier grid point.", "",
             f"| rank | point | T | α | loss | {label} | agreement | KL(T‖S) | train s | steps |",
             "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | `{r['name']}` | {r['temperature']:g} | {r['alpha']:g} | {r['loss']} | "
                     f"{_cell(r['value'])} | {_cell(r.get('agreement'))} | {_cell(r.get('kl'))} | "
                     f"{_cell(r.get('wall_seconds'), 1)} | {r.get('steps') if r.get('steps') is not None else '—'} |")
    lines.append("")
    if notes:
        lines += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    lines += [f"![validation {label} over T and α]({OUTPUTS[1]})", ""]
    return "\n".join(lines)


def _cell(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if finite(v) else "—"
