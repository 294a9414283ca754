"""Plans, task records and manifests: the files that make a directory a stage's output.

A stage's output directory goes through three states, each visible on disk:
  plan.json          what is being built (kind, key, config, fingerprints, number of tasks);
  tasks/NNNNN.json   one completion record per finished task, written after its files;
  manifest.json      written last, by the last task to finish or by `kd finalize`.
A directory without manifest.json is incomplete and every downstream stage refuses it.

These files are also what a reader trusts least: a cache is copied between projects and shared
on cluster filesystems, so a record may be cut short, edited or crafted. Every record is
checked when it is read (valid JSON, the fields readers rely on, with their types), and every
file path it lists must be a plain relative path that stays inside the directory once symlinks
are resolved (`path_of`), so no reader opens `../../etc/passwd` or a shard of another cache.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import posixpath
import socket
from pathlib import Path
from typing import Any

from pipeline import __version__, io
from pipeline.errors import KDError, short

PLAN, MANIFEST, TASKS = "plan.json", "manifest.json", "tasks"
STARTED = ("shards/*.parquet", "checkpoints/step-*")  # work an earlier attempt kept: its plan may not be replaced
REQUIRED = {  # what readers of a cache index without looking (read_cache)
    "targets": {"stats": ("task_type", "top_k", "temperature", "value_dtype", "outputs", "total_rows"),
                "fingerprints": (), "config": ()},
}
MAX_STATS = ("stored_kl_max",)  # the worst over tasks
SUMMED_STATS = ("rows", "positions", "bytes", "truncated_rows", "teacher_seconds", "encode_seconds", "collect_seconds",
                "write_seconds", "compute_seconds", "loop_seconds", "body_seconds", "reduce_seconds",
                "stored_kl_sum", "stored_kl_positions")


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
        old = read_plan(out)
        started = done_tasks(out) or any(next(out.glob(g), None) for g in STARTED)
        if old.get("key") != plan["key"] and not started:
            old = plan  # an earlier attempt failed before writing anything: start afresh
            io.write_json(path, plan)
        if old.get("key") != plan["key"]:
            raise KDError(f"{out} holds a different {old.get('kind', 'stage')} output {str(old.get('key', '?'))[:12]}"
                          f"{differences(old, plan)}; choose another --out or delete that directory")
        if old.get("num_tasks") != plan["num_tasks"]:
            raise KDError(f"{out} was started as {old.get('num_tasks')} tasks, not {plan['num_tasks']}; "
                          f"rerun with --num-tasks {old.get('num_tasks')} or use a fresh --out")
        return old
    io.write_json(path, plan)
    return plan


def differences(old: dict, new: dict) -> str:
    """' (config differs in: a, b)' between two plans: over the settings their keys were computed
    from where both record them (so flags that do not change the result are not blamed)."""
    part = "settings" if isinstance(old.get("settings"), dict) and isinstance(new.get("settings"), dict) else "config"
    a, b = old.get(part) or {}, new.get(part) or {}
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] if isinstance(a, dict) and isinstance(b, dict) else []
    return f" (config differs in: {', '.join(diff)})" if diff else " (inputs differ)"


def read_plan(out: Path) -> dict[str, Any]:
    path = Path(out) / PLAN
    if not Path(out).is_dir():
        raise KDError(f"{out} does not exist or is not a directory")
    if not path.exists():
        raise KDError(f"{out} holds no {PLAN}: it is not the output of a kd stage")
    plan = io.read_record(path, "the plan", f"delete {out} (or just {path}) and rerun the stage")
    n = plan.get("num_tasks") if isinstance(plan, dict) else None
    if not isinstance(plan, dict) or not isinstance(plan.get("key"), str) or not isinstance(plan.get("kind"), str) \
            or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise KDError(f"{path}: the plan is damaged (it needs kind, key and num_tasks >= 1); delete {out} and rerun the stage")
    return plan


def done_tasks(out: Path) -> dict[int, dict]:
    d = Path(out) / TASKS
    if not d.is_dir():
        return {}
    records = {}
    for p in sorted(d.glob("[0-9]*.json")):
        if not p.stem.isdigit():
            continue
        fix = f"delete {p} and rerun task {int(p.stem)}"
        rec = io.read_record(p, "the task record", fix)
        _check_record(out, rec, p, fix)
        records[int(p.stem)] = rec
    return records


def _check_record(out: Path, rec: Any, where: Path, fix: str) -> None:
    """The fields readers of a task record or manifest rely on, with their types; file paths inside `out`."""
    if not isinstance(rec, dict):
        raise KDError(f"{where}: not a JSON object: it is damaged; {fix}")
    files, stats = rec.get("files", []), rec.get("stats", {})
    if not isinstance(files, list) or not isinstance(stats, dict):
        raise KDError(f"{where}: 'files' must be a list and 'stats' a mapping: it is damaged; {fix}")
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("sha256"), str) \
                or isinstance(f.get("bytes"), bool) or not isinstance(f.get("bytes"), int):
            raise KDError(f"{where}: files[{i}] needs a path, bytes and sha256: it is damaged; {fix}")
        path_of(out, f["path"], where)
    bad = [k for k in SUMMED_STATS if k in stats and (isinstance(stats[k], bool) or not isinstance(stats[k], (int, float)))]
    if bad:
        raise KDError(f"{where}: stats.{bad[0]} is not a number: it is damaged; {fix}")


def path_of(out: Path, rel: Any, where: Any = None) -> Path:
    """The file a record lists, refused unless `rel` is a plain relative path (normalised, no
    '..', not absolute) that stays inside `out` once symlinks are resolved: a record names
    files of its own directory and nothing else."""
    out = Path(out)
    ok = isinstance(rel, str) and rel and "\0" not in rel and not rel.startswith("/") and posixpath.normpath(rel) == rel \
        and rel != ".." and not rel.startswith("../")
    if ok:
        path = out / rel
        root = out.resolve()
        ok = path.resolve().is_relative_to(root) and path.resolve() != root
    if not ok:
        raise KDError(f"{where or out / MANIFEST}: file path {short(rel)} is not a relative path inside {out}; the record is "
                      f"damaged or crafted: rebuild this output (kd never reads files outside it)")
    return path


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
            if not path_of(out, f["path"], task_path(out, i)).exists():
                raise KDError(f"{out}: task {i} recorded {f['path']} but the file is gone; delete {task_path(out, i)} and rerun task {i}")
            files.append(f)
        for k, v in rec.get("stats", {}).items():
            stats[k] = stats.get(k, 0) + v if k in SUMMED_STATS else max(stats.get(k, v), v) if k in MAX_STATS else v
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
    manifest.update({k: v for k, v in plan.items() if k not in manifest and k not in ("created_at", "settings")})  # e.g. init
    try:
        io.write_json(out / MANIFEST, manifest)
    except FileNotFoundError:  # a concurrent finalizer (same content) cleared our temporary after writing its own
        if not (out / MANIFEST).exists():
            raise
    tidy(out)
    return manifest


def tidy(out: Path) -> None:
    """Remove temporaries of manifest writers killed mid-write, once the manifest is in place."""
    for p in Path(out).glob(f"{io.TMP_MARK}*-{MANIFEST}"):
        p.unlink(missing_ok=True)


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
    fix = f"rebuild it, or delete {path} and run `kd finalize {out}`"
    manifest = io.read_record(path, "the manifest", fix)
    _check_record(out, manifest, path, fix)
    if not isinstance(manifest.get("kind"), str) or not isinstance(manifest.get("key"), str):
        raise KDError(f"{path}: the manifest has no kind or key: it is damaged; {fix}")
    if kind is not None and manifest.get("kind") != kind:
        raise KDError(f"{out} holds a {short(manifest.get('kind'))} output, not {kind!r}")
    return manifest


def read_cache(out: Path) -> dict[str, Any]:
    """The manifest of a complete targets cache, with the fields its readers index checked."""
    m = read_manifest(out, kind="targets")
    for part, keys in REQUIRED["targets"].items():
        value = m.get(part)
        missing = [f"{part}.{k}" for k in keys if k not in value] if isinstance(value, dict) else [part]
        if missing:
            raise KDError(f"{Path(out) / MANIFEST}: the manifest lacks {missing[0]}: it is damaged; rebuild the cache")
    return m


def verify_files(out: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found re-checking every listed file's size and sha256 (empty when all match)."""
    problems = []
    for f in manifest.get("files", []):
        p = path_of(out, f["path"])
        if not p.exists():
            problems.append(f"{f['path']}: missing")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['path']}: {p.stat().st_size} bytes, manifest says {f['bytes']}")
        elif io.sha256_file(p) != f["sha256"]:
            problems.append(f"{f['path']}: sha256 does not match the manifest")
    return problems
