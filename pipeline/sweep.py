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

from pipeline import jobarray
from pipeline.errors import KDError

NOT_SWEEPABLE = {"sweep", "task_index", "config"}


def load(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KDError(f"cannot read --sweep {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise KDError(f"--sweep {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "students" in data:
        data = data["students"]
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise KDError(f"--sweep {path} must hold a non-empty list of mappings (flag: value), one per student")
    return [{str(k).replace("-", "_"): v for k, v in e.items()} for e in data]


def select(cfg, path: str | Path, task_index: int | None):
    """`cfg` with the overrides of this task's entry; its output goes to OUT/NAME (entry
    `name`, default the zero-padded index) unless the entry sets `out` itself."""
    entries = load(path)
    fields = {f.name for f in dataclasses.fields(cfg)}
    for i, e in enumerate(entries):
        bad = sorted(set(e) - (fields - NOT_SWEEPABLE) - {"name"})
        if bad:
            raise KDError(f"--sweep {path} entry {i}: unknown or unsweepable key(s) {', '.join(bad)}")
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
    return dataclasses.replace(cfg, sweep=None, task_index=None, **entry), index, name
