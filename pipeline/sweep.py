"""A sweep file: a list of overrides, one student per entry, trained as a job array.

The cache is paid for once; a sweep of students (layer choices, alpha, temperature, loss, lr)
over it is embarrassingly parallel, so entry i is simply array task i. Entries are checked
against the trainer's configuration before anything runs, so a typo in entry 37 fails at
submission time in every task rather than as one silent default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline import config, jobarray
from pipeline.errors import KDError, short

NOT_SWEEPABLE = {"sweep", "task_index", "config"}


def load(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise KDError(f"cannot read --sweep {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise KDError(f"--sweep {path} is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    else:
        data = config.load_yaml(path, "--sweep")
    if isinstance(data, dict) and "students" in data:
        data = data["students"]
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise KDError(f"--sweep {path} must hold a non-empty list of mappings (flag: value), one per student")
    return [config.normalize_keys(e, f"--sweep {path} entry {i}") for i, e in enumerate(data)]


def select(cfg, path: str | Path, task_index: int | None):
    """`cfg` with the overrides of this task's entry; its output goes to OUT/NAME (entry
    `name`, default the zero-padded index) unless the entry sets `out` itself."""
    entries = load(path)
    allowed = {f.name for f in config.flags(type(cfg))} - NOT_SWEEPABLE | {"name"}
    names: dict[str, int] = {}
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for i, e in enumerate(entries):
        where = f"--sweep {path} entry {i}"
        config.check_keys(e, allowed, where)
        name = config.check_name(e.get("name", f"{i:03d}"), where)
        config.build(type(cfg), {**base, **{k: v for k, v in e.items() if k != "name"}}, where)  # types, before any task runs
        name = str(e.get("out") or name)
        if name in names:  # two array tasks would train into one directory
            raise KDError(f"--sweep {path}: entries {names[name]} and {i} both train into {short(name)}; give each entry its own name")
        names[name] = i
    try:
        index, _ = jobarray.resolve_task(task_index, len(entries))
    except KDError as exc:
        raise KDError(f"--sweep {path} has {len(entries)} entries: {exc}") from None
    entry = dict(entries[index])
    name = str(entry.pop("name", f"{index:03d}"))
    if "out" not in entry:
        if not cfg.out:
            raise KDError("--sweep needs --out: each entry trains into OUT/<name>")
        entry["out"] = str(Path(cfg.out) / name)
    built = config.build(type(cfg), {**base, **entry, "sweep": None, "task_index": None}, f"--sweep {path} entry {index}")
    return built, index, name
