"""`kd tune` — choose the temperature, alpha and loss by measurement, not folklore.

Read top to bottom: expand the (T, alpha, loss) grid and open the caches, refusing a bad grid or
a validation cache of another teacher before anything trains. An array task (--task-index i)
then trains and scores point i only and stops. Otherwise a complete tune of the same key is
reused (nothing trains); else the output is claimed and every point is trained by stage 2
(`train.run` into OUT/points/<name>: a finished point of the same settings is reused, an
interrupted one resumes from its checkpoint) and scored by stage 3 (`evaluate.run` on the
validation cache into OUT/evals/<name>: the teacher is scored from its cache and never runs).
The points are ranked by the task's validation metric, and tune.parquet, heatmap.png and
report.md are written, manifest.json last.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from pipeline import io, jobarray, manifest, report, tuning
from pipeline.config import EvalConfig, TuneConfig, recorded
from pipeline.errors import KDError
from pipeline.outputs import StageOutput
from pipeline.progress import say
from pipeline.tuning import Point

__all__ = ["TuneConfig", "run"]


def run(cfg: TuneConfig) -> dict:
    from stages import train

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise KDError("kd tune trains its points one process each; to spread them over GPUs run it as `kd slurm tune` "
                      "(one array task per point), not under torchrun")

    # 1. The grid, the caches and the point configs: all checked before any student trains.
    points = tuning.grid(cfg.temperatures, cfg.alphas, cfg.losses)
    caches, validation = tuning.open_caches(cfg)
    configs = [tuning.point_config(cfg, p) for p in points]
    out = Path(cfg.out)
    key = tuning.tune_key(cfg, points, caches, validation)
    output = StageOutput(out, "tune", key, replace=True)  # a grid extended later reuses the points it shares
    output.refuse_other_kind()

    # 2. An array task of `kd slurm tune`: its own point, trained and scored; the outputs are the after-job's.
    index = _task_index(cfg, len(points))
    if index is not None:
        point = points[index]
        say(f"grid point {index} of {len(points)}: {point.name}")
        trained, scored = train.run(configs[index]), _evaluate(cfg, point)
        return {"out": str(out), "task_index": index, "point": point.name, "student": str(tuning.student_dir(out, point)),
                "trained": not trained.get("reused"), "reused": bool(trained.get("reused") and scored.get("reused"))}

    # 3. The same tune, complete: nothing to train.
    if output.existing() is not None:
        best = pl.read_parquet(out / "tune.parquet").row(0, named=True)
        say(f"{out} already holds this tune (key {key[:12]}); nothing to do. Best point: {best['name']}")
        return _result(out, key, best, len(points), [], reused=True)

    # 4. Every point: trained (or reused), then scored on the validation cache.
    rows, trained, teacher = [], [], None
    for i, (point, point_cfg) in enumerate(zip(points, configs)):
        say(f"[{i + 1}/{len(points)}] grid point {point.name}")
        if not train.run(point_cfg).get("reused"):
            trained.append(point.name)
        _evaluate(cfg, point)
        row, teacher = _score(out, point)
        rows.append(row)

    # 5. The best point, by the validation metric; the outputs, manifest.json last.
    task_type = caches[0]["stats"]["task_type"]
    metric, higher, note = tuning.choose_metric(task_type, rows)
    rows = tuning.rank(rows, metric, higher)
    best = rows[0]
    notes = ([note] if note else []) + _notes(cfg, points, caches, rows)
    upstream = _upstream(cfg, caches, validation, points)
    with output.claimed({"config": recorded(cfg), "points": [p.name for p in points], "upstream": upstream}):
        tuning.write_table(out / "tune.parquet", rows)
        tuning.heatmap(out / "heatmap.png", rows, metric, higher)
        io.write_text(out / "report.md", tuning.markdown(rows, task_type, higher, _header(cfg, points, validation, teacher, metric),
                                                        notes))
        files = [{**f, "rows": len(rows) if f["path"] == "tune.parquet" else None} for f in output.file_records(tuning.OUTPUTS)]
        output.complete(files, {"task_type": task_type, "points": len(rows), "metric": metric, "higher_is_better": higher,
                                "best": {k: best[k] for k in ("name", "temperature", "alpha", "loss", "value", "student")},
                                "trained": trained,
                                "summary": [{k: r[k] for k in ("name", "value", "agreement", "kl")} for r in rows]})
    say(f"best point {best['name']} (validation {report.LABELS.get(metric, metric)} {best['value']}); "
        f"wrote {out / 'report.md'}, {out / 'tune.parquet'}, {out / 'heatmap.png'} and {out / manifest.MANIFEST}")
    return _result(out, key, best, len(points), trained, reused=False)


def _evaluate(cfg: TuneConfig, point: Point) -> dict:
    """Stage 3 on the validation cache: one student, quality only (no timing, no teacher load, no bootstrap)."""
    from stages import evaluate

    return evaluate.run(EvalConfig(model=[str(tuning.student_dir(cfg.out, point))], out=str(tuning.eval_dir(cfg.out, point)),
                                   targets=cfg.eval_targets, time_teacher=False, timing_examples=0, bootstrap=0,
                                   batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, progress=cfg.progress))


def _score(out: Path, point: Point) -> tuple[dict, dict | None]:
    """A point's row (its student's validation scores and training cost) and the teacher's row, from
    the outputs of stages 2 and 3, so that a reused point reads exactly as a fresh one."""
    metrics = pl.read_parquet(tuning.eval_dir(out, point) / "metrics.parquet").to_dicts()
    student = next(r for r in metrics if r["role"] == "student")
    teacher = next((r for r in metrics if r["role"] == "teacher"), None)
    stats = manifest.read_manifest(tuning.student_dir(out, point), kind="student")["stats"]
    return ({"name": point.name, "temperature": point.temperature, "alpha": point.alpha, "loss": point.loss,
             **{k: v for k, v in student.items() if k in report.LABELS}, "rows": student.get("rows"),
             "wall_seconds": stats.get("wall_seconds"), "steps": stats.get("steps"),
             "final_loss": (stats.get("final") or {}).get("loss"),
             "student": str(tuning.student_dir(out, point)), "evaluation": str(tuning.eval_dir(out, point))}, teacher)


def _task_index(cfg: TuneConfig, n: int) -> int | None:
    """The point this process trains: --task-index, or the array variables inside a job array; None: all."""
    if cfg.task_index is None and not jobarray.in_array():
        return None
    try:
        return jobarray.resolve_task(cfg.task_index, n)[0]
    except KDError as exc:
        raise KDError(f"the grid has {n} points (array tasks 0..{n - 1}): {exc}") from None


def _header(cfg: TuneConfig, points: list[Point], validation: dict, teacher: dict | None, metric: str) -> list[str]:
    axes = [sorted({getattr(p, a) for p in points}, key=lambda v: (isinstance(v, str), v)) for a in ("temperature", "alpha")]
    losses = list(dict.fromkeys(p.loss for p in points))
    shared = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in (("student", cfg.student or cfg.student_from_teacher),
                                                                 ("student-layers", cfg.student_layers), ("epochs", cfg.epochs),
                                                                 ("max-steps", cfg.max_steps), ("lr", cfg.lr),
                                                                 ("batch-size", cfg.batch_size), ("seed", cfg.seed))
                       if v is not None)
    lines = [f"{len(points)} grid points: T ∈ {{{', '.join(f'{t:g}' for t in axes[0])}}} × α ∈ "
             f"{{{', '.join(f'{a:g}' for a in axes[1])}}} × loss ∈ {{{', '.join(losses)}}}. Each point is a student trained "
             f"from {', '.join(f'`{t}`' for t in cfg.targets)} with the same settings ({shared}) and "
             f"scored on the validation cache `{cfg.eval_targets}` (key `{validation['key'][:12]}`, "
             f"{validation['stats']['total_rows']} rows); the teacher never ran again."]
    if teacher is not None and tuning.finite(teacher.get(metric)):
        lines.append(f"The teacher on the same rows (from its cache): {report.LABELS.get(metric, metric)} {teacher[metric]:.4f}.")
    return lines


def _notes(cfg: TuneConfig, points: list[Point], caches: list[dict], rows: list[dict]) -> list[str]:
    stats = caches[0]["stats"]
    exact = [float(t) for t in (stats.get("temperatures") or [stats["temperature"]])]
    off = sorted({p.temperature for p in points if not any(abs(p.temperature - t) <= 1e-9 * t for t in exact)})
    if int(stats["top_k"]) >= int(stats["outputs"]):  # every output stored: the teacher is exact at any T
        off = []
    notes = []
    if off:
        notes.append(f"The cache holds the teacher's full-vocabulary normaliser at T = {', '.join(f'{t:g}' for t in exact)} only: "
                     f"points at T = {', '.join(f'{t:g}' for t in off)} train on its renormalised top-{stats['top_k']}, so "
                     f"their KD term is approximate (exact when the tail is small).")
    notes.append(f"Each point is scored once on the same {rows[0].get('rows') or 'validation'} rows: compare close points "
                 f"with `kd eval --model A --model B --targets {cfg.eval_targets}` for paired 95% intervals before "
                 f"reading a small difference as real.")
    return notes


def _upstream(cfg: TuneConfig, caches: list[dict], validation: dict, points: list[Point]) -> list[dict]:
    """What the tune consumed: the training caches, the validation cache, and every point's
    student and evaluation (path and key)."""
    paths, out = cfg.targets, Path(cfg.out)
    found = [{"kind": "targets", "path": str(Path(p).resolve()), "key": m["key"]} for p, m in zip(paths, caches)]
    found.append({"kind": "targets", "role": "validation", "path": str(Path(cfg.eval_targets).resolve()), "key": validation["key"]})
    for p in points:
        for kind, d in (("student", tuning.student_dir(out, p)), ("evaluation", tuning.eval_dir(out, p))):
            found.append({"kind": kind, "point": p.name, "path": str(d.resolve()), "key": manifest.read_manifest(d)["key"]})
    return found


def _result(out: Path, key: str, best: dict, n: int, trained: list[str], reused: bool) -> dict:
    return {"out": str(out), "key": key, "reused": reused, "complete": True, "points": n, "trained": trained,
            "best": best["name"], "student": best["student"], "metric": best["metric"], "value": best["value"],
            "temperature": best["temperature"], "alpha": best["alpha"], "loss": best["loss"],
            "report": str(out / "report.md"), "table": str(out / "tune.parquet"), "heatmap": str(out / "heatmap.png")}
