"""Atomic file writing and checksums.

A stage may be killed at any moment (pre-emption, SIGKILL, a node failing); a reader must
never see half a file. So every file is written under a temporary name in its final
directory and renamed into place (rename is atomic on POSIX within one filesystem), and a
rerun deletes temporaries left behind by a killed writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    """A unique sibling temporary name; the marker lets `clean_temporaries` find it later."""
    return path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it onto `path` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """The one serialisation that keys and fingerprints hash: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def clean_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove temporaries a killed writer left under `root`; returns what was removed."""
    removed = []
    root = Path(root)
    if not root.exists():
        return removed
    for p in sorted(root.rglob(f"{TMP_MARK}*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def replace_symlink(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Point `link` at `target` atomically (make a new link, rename it over the old one)."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        from pipeline.errors import KDError

        raise KDError(f"{link} exists and is not a symlink: remove it or choose another --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(link)
    os.symlink(os.path.abspath(target), tmp)
    os.replace(tmp, link)
