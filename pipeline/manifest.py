"""Plans, task records and manifests: the files that make a directory a stage's output.

A stage's output directory goes through three states, each visible on disk:
  plan.json          what is being built (kind, key, config, fingerprints, number of tasks);
  tasks/NNNNN.json   one completion record per finished task, written after its files;
  manifest.json      written last, by the last task to finish or by `kd finalize`.
A directory without manifest.json is incomplete and every downstream stage refuses it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
from pathlib import Path
from typing import Any

from pipeline import __version__, io
from pipeline.errors import KDError

PLAN, MANIFEST, TASKS = "plan.json", "manifest.json", "tasks"
SUMMED_STATS = ("rows", "positions", "bytes", "truncated_rows", "teacher_seconds", "encode_seconds", "collect_seconds",
                "write_seconds", "compute_seconds", "loop_seconds", "body_seconds", "reduce_seconds")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def task_path(out: Path, index: int) -> Path:
    return Path(out) / TASKS / f"{index:05d}.json"


def write_plan(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Record what `out` is being built as; refuse a directory that is building something else.

    Every task of an array calls this; they all write the same content, so the race is benign."""
    out = Path(out)
    path = out / PLAN
    if path.exists():
        old = io.read_json(path)
        started = done_tasks(out) or any((out / "shards").glob("*.parquet"))
        if old.get("key") != plan["key"] and not started:
            old = plan  # an earlier attempt failed before writing anything: start afresh
            io.write_json(path, plan)
        if old.get("key") != plan["key"]:
            diff = [k for k in sorted(set(old.get("config", {})) | set(plan["config"]))
                    if old.get("config", {}).get(k) != plan["config"].get(k)]
            hint = f" (config differs in: {', '.join(diff)})" if diff else " (inputs differ)"
            raise KDError(f"{out} holds a different {old.get('kind', 'stage')} output {old.get('key', '?')[:12]}{hint}; "
                          f"choose another --out or delete that directory")
        if old.get("num_tasks") != plan["num_tasks"]:
            raise KDError(f"{out} was started as {old.get('num_tasks')} tasks, not {plan['num_tasks']}; "
                          f"rerun with --num-tasks {old.get('num_tasks')} or use a fresh --out")
        return old
    io.write_json(path, plan)
    return plan


def read_plan(out: Path) -> dict[str, Any]:
    path = Path(out) / PLAN
    if not Path(out).is_dir():
        raise KDError(f"{out} does not exist or is not a directory")
    if not path.exists():
        raise KDError(f"{out} holds no {PLAN}: it is not the output of a kd stage")
    return io.read_json(path)


def done_tasks(out: Path) -> dict[int, dict]:
    d = Path(out) / TASKS
    if not d.is_dir():
        return {}
    return {int(p.stem): io.read_json(p) for p in sorted(d.glob("[0-9]*.json"))}


def write_task_record(out: Path, index: int, record: dict[str, Any]) -> None:
    record = {**record, "task_index": index, "finished_at": now(), "host": socket.gethostname(),
              "pid": os.getpid()}
    io.write_json(task_path(out, index), record)


def status(out: Path) -> dict[str, Any]:
    out = Path(out)
    plan = read_plan(out)
    n = plan["num_tasks"]
    complete = (out / MANIFEST).exists()
    done = sorted(range(n)) if complete else sorted(done_tasks(out))  # single-process stages keep no records
    missing = [i for i in range(n) if i not in done]
    return {"kind": plan["kind"], "key": plan["key"], "num_tasks": n, "done": done,
            "missing": missing, "complete": complete}


def finalize(out: Path) -> dict[str, Any]:
    """Merge the task records into manifest.json; refuse while any task is missing.

    Summable task statistics (rows, bytes, …) are added up; everything else a task reports is
    kept as it is (a single-task stage reports all its statistics this way)."""
    out = Path(out)
    plan = read_plan(out)
    records = done_tasks(out)
    missing = [i for i in range(plan["num_tasks"]) if i not in records]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" …" if len(missing) > 20 else "")
        raise KDError(f"{out}: {len(missing)} of {plan['num_tasks']} tasks have not finished (missing: {shown}); "
                      f"rerun them (same command with --task-index) and finalize again")
    files, stats = [], {}
    for i in sorted(records):
        rec = records[i]
        for f in rec.get("files", []):
            if not (out / f["path"]).exists():
                raise KDError(f"{out}: task {i} recorded {f['path']} but the file is gone; delete {task_path(out, i)} and rerun task {i}")
            files.append(f)
        for k, v in rec.get("stats", {}).items():
            stats[k] = stats.get(k, 0) + v if k in SUMMED_STATS else v
    if stats.get("positions") and "bytes" in stats:
        stats["bytes_per_position"] = round(stats["bytes"] / stats["positions"], 2)
    manifest = {
        "kind": plan["kind"],
        "format_version": plan.get("format_version"),
        "key": plan["key"],
        "created_at": now(),
        "package": {"name": "kd-pipeline", "version": __version__, "python": platform.python_version()},
        "config": plan["config"],
        "fingerprints": plan.get("fingerprints", {}),
        "upstream": plan.get("upstream", []),
        "num_tasks": plan["num_tasks"],
        "files": sorted(files, key=lambda f: f["path"]),
        "stats": {**plan.get("stats", {}), **stats},
    }
    manifest.update({k: v for k, v in plan.items() if k not in manifest and k != "created_at"})  # e.g. a student's init
    io.write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(out: Path, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a complete output directory, or a one-line refusal saying why not."""
    out = Path(out)
    path = out / MANIFEST
    if not out.is_dir():
        raise KDError(f"{out} does not exist or is not a directory")
    if not path.exists():
        if (out / PLAN).exists():
            raise KDError(f"{out} is incomplete (no {MANIFEST}); run `kd status {out}` to see missing tasks, then rerun them or `kd "
                          f"finalize {out}`")
        raise KDError(f"{out} has no {MANIFEST}: it is not a complete kd output directory")
    manifest = io.read_json(path)
    if kind is not None and manifest.get("kind") != kind:
        raise KDError(f"{out} holds a {manifest.get('kind')!r} output, not {kind!r}")
    return manifest


def verify_files(out: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found re-checking every listed file's size and sha256 (empty when all match)."""
    problems = []
    for f in manifest.get("files", []):
        p = Path(out) / f["path"]
        if not p.exists():
            problems.append(f"{f['path']}: missing")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['path']}: {p.stat().st_size} bytes, manifest says {f['bytes']}")
        elif io.sha256_file(p) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 does not match the manifest")
    return problems
