"""`kd run pipeline.yaml` — every stage of one distillation, in order, reusing what is done.

Read top to bottom: parse and check the whole YAML (nothing runs if any of it is wrong), then
stage 0 (fine-tune the teacher, if asked), stage 1 for each data split (one cache per split,
kept under the workdir's cache root by key), stage 2 for each student (all from the one train
cache: the teacher runs once), the tune grid (`kd tune`, if a `tune:` block asks), the students
that train at the grid's best point (`from_tune: true`), stage 3 (which also scores the grid's
best student).
Each stage finds its own complete output by key and does no work then; the first failure stops
the run with the stage named.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import runfile
from pipeline.errors import KDError
from pipeline.progress import say


def run(pipeline_file: str, workdir: str | None = None, dry_run: bool = False, progress: bool = True) -> dict:
    from stages import evaluate, teacher, train, tune

    plan = runfile.load(pipeline_file, workdir)
    steps = []
    if plan.finetune is not None:
        steps.append(("stage 0: fine-tune the teacher", train.run, plan.finetune))
    for split, cfg in plan.targets.items():
        steps.append((f"stage 1: teacher targets for {split}", teacher.run, cfg))
    for name, cfg in plan.students:
        if name not in plan.from_tune:
            steps.append((f"stage 2: student {name}", train.run, cfg))
    if plan.tune is not None:
        steps.append(("stage 2: tune T, alpha and loss on the validation cache", tune.run, plan.tune))
    for name, cfg in plan.students:  # these train at the grid's best point, so after it
        if name in plan.from_tune:
            steps.append((f"stage 2: student {name} (T, alpha, loss of the tune's best point)", train.run, cfg))
    if plan.evaluation is not None:
        steps.append(("stage 3: evaluation", evaluate.run, plan.evaluation))
    say(f"pipeline {plan.name}: {len(steps)} steps in {plan.workdir}")
    if dry_run:
        for i, (title, _, cfg) in enumerate(steps, 1):
            say(f"  [{i}/{len(steps)}] {title} -> {getattr(cfg, 'out', None)}")
        return {"workdir": str(plan.workdir), "steps": [t for t, _, _ in steps], "ran": [], "reused": []}

    ran, reused, results = [], [], {}
    for i, (title, fn, cfg) in enumerate(steps, 1):
        say(f"[{i}/{len(steps)}] {title}")
        if hasattr(cfg, "progress"):
            cfg.progress = progress
        t0 = time.monotonic()
        try:
            result = fn(cfg) or {}
        except KDError as exc:
            raise KDError(f"{title} failed: {exc}") from None
        was_reused = bool(result.get("reused"))
        (reused if was_reused else ran).append(title)
        results[title] = result
        if fn is tune.run:
            _after_tune(plan, result)
        say(f"[{i}/{len(steps)}] {title}: {'reused, no work' if was_reused else f'done in {time.monotonic() - t0:.1f}s'}")
    if not ran:
        say(f"nothing to do: all {len(steps)} steps were already complete and match")
    report = Path(plan.evaluation.out) / "report.md" if plan.evaluation is not None else None
    return {"workdir": str(plan.workdir), "ran": ran, "reused": reused,
            "report": str(report) if report else None, "results": results}


def _after_tune(plan: runfile.Plan, result: dict) -> None:
    """The grid's best point decides the from_tune students' settings, and its (short-run) student
    is evaluated beside the others."""
    for name, cfg in plan.students:
        if name in plan.from_tune:
            cfg.temperature, cfg.alpha, cfg.loss = result["temperature"], result["alpha"], result["loss"]
    if plan.evaluation is not None and result.get("student"):
        plan.evaluation.model.append(result["student"])


DEMO_YAML = Path(__file__).resolve().parents[1] / "data" / "demo" / "pipeline.yaml"
QUICK = {"limit": {"train": 256, "transfer": 256, "validation": 64, "test": 128}, "max_steps": 8}


def demo(workdir: str = "runs/demo", quick: bool = False, progress: bool = True) -> dict:
    """The embedded default, end to end; `quick` is the reduced run CI keeps from rotting."""
    import yaml

    if not DEMO_YAML.exists():
        raise KDError(f"the demo pipeline {DEMO_YAML} is missing: run kd demo from a checkout (pip install -e .)")
    from pipeline.config import load_yaml

    doc = load_yaml(DEMO_YAML, "the demo pipeline")
    base = DEMO_YAML.parent
    for split, file in doc["data"].items():
        if split in ("train", "transfer", "validation", "test"):
            doc["data"][split] = str((base / file).resolve())
    if quick:
        doc["data"]["limit"] = QUICK["limit"]
        doc["teacher"]["finetune"]["max_steps"] = QUICK["max_steps"]
        for s in doc["students"]:
            s["max_steps"] = QUICK["max_steps"]
        doc["tune"].update(temperatures=[1, 2], alphas=[1.0], max_steps=QUICK["max_steps"] // 2)
        doc["eval"]["timing_examples"] = 8
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    from pipeline import io

    io.write_text(work / "pipeline.yaml", yaml.safe_dump(doc, sort_keys=False))
    t0 = time.monotonic()
    result = run(str(work / "pipeline.yaml"), workdir=str(work), progress=progress)
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result
