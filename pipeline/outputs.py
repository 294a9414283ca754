"""A stage's output directory, claimed for one kind and key: the one place that decides
reuse / start / refuse, and that completes a directory with its manifest.

Like datatrove's executor base, which keeps completion logic once for every step, every stage
(teacher, train, eval, and sweeps of them) goes through `StageOutput`:

    output = StageOutput(out, "student", key)
    if output.existing() is not None:     # complete, same kind and key: nothing to do
        return {..., "reused": True}
    output.claim(plan)                    # plan.json: what is being built (refuses another output)
    ... write the files ...
    output.complete(files, stats)         # tasks/00000.json, then manifest.json, last

An array stage calls `task_done(i, record)` per task and `finish()`, which writes the manifest
once the last task is in. The files themselves (plan.json, task records, manifest.json) are
`pipeline.manifest`'s.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from pipeline import format as fmt
from pipeline import io, manifest
from pipeline.errors import KDError

NOUNS = {"targets": "cache", "student": "student", "evaluation": "evaluation"}


@dataclasses.dataclass
class StageOutput:
    out: Path
    kind: str
    key: str
    num_tasks: int = 1
    replace: bool = False  # another output of this kind is replaced (an evaluation) rather than refused

    def __post_init__(self):
        self.out = Path(self.out)

    def existing(self) -> dict[str, Any] | None:
        """The manifest when `out` already holds this very output; None when there is nothing
        complete to reuse; a one-line refusal when it holds something else."""
        self.refuse_other_kind()
        if not (self.out / manifest.MANIFEST).exists():
            return None
        m = manifest.read_manifest(self.out)
        if m.get("key") == self.key:
            gone = [f["path"] for f in m.get("files", []) if not (self.out / f["path"]).exists()]
            if gone and self.replace:
                self._forget()
                return None
            if gone:
                raise KDError(f"{self.out} is damaged ({gone[0]} is missing); run `kd verify {self.out}` and rebuild it")
            return m
        if self.replace:
            self._forget()
            return None
        raise KDError(f"{self.out} holds a different {NOUNS.get(self.kind, self.kind)} (key {str(m.get('key'))[:12]}, "
                      f"this run's key {self.key[:12]}); choose another --out"
                      + (" or use --cache-root" if self.kind == "targets" else ""))

    def claim(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Write plan.json for this output (every task of an array writes the same one)."""
        self.refuse_other_kind()
        if self.out.exists() and not self.out.is_dir():
            raise KDError(f"--out {self.out} is a file, not a directory; choose another --out")
        if self.replace and (self.out / manifest.PLAN).exists() and manifest.read_plan(self.out).get("key") != self.key:
            self._forget()  # an unfinished output of other settings
        full = {"kind": self.kind, "key": self.key, "format_version": fmt.FORMAT_VERSION, "num_tasks": self.num_tasks,
                "created_at": manifest.now(), **plan}
        return manifest.write_plan(self.out, full)

    def task_done(self, index: int, record: dict[str, Any]) -> None:
        manifest.write_task_record(self.out, index, {"key": self.key, **record})

    def finish(self) -> dict[str, Any]:
        """Write the manifest if every task is in (the last task to finish does it); the status."""
        st = manifest.status(self.out)
        if not st["missing"] and not st["complete"]:
            manifest.finalize(self.out)
            st["complete"] = True
        return st

    def complete(self, files: list[dict], stats: dict[str, Any]) -> dict[str, Any]:
        """A single-task output: its record, then its manifest (written last, atomically)."""
        self.task_done(0, {"files": files, "stats": stats})
        return manifest.finalize(self.out)

    def file_records(self, names) -> list[dict]:
        """Manifest entries (path, bytes, sha256) for files of the output directory."""
        return [{"path": n, "bytes": (self.out / n).stat().st_size, "sha256": io.sha256_file(self.out / n)} for n in names]

    def refuse_other_kind(self) -> None:
        for name in (manifest.MANIFEST, manifest.PLAN):
            path = self.out / name
            if path.exists():
                kind = io.read_json(path).get("kind")
                if kind != self.kind:
                    raise KDError(f"--out {self.out} holds the output of another kd stage (a {kind!r} output); "
                                  f"choose another --out")
                return

    def _forget(self) -> None:
        """Drop the records of a replaced output; its files are overwritten as the new one is written."""
        (self.out / manifest.MANIFEST).unlink(missing_ok=True)
        (self.out / manifest.PLAN).unlink(missing_ok=True)
        shutil.rmtree(self.out / manifest.TASKS, ignore_errors=True)
