"""Atomic file writing and checksums.

A stage may be killed at any moment (pre-emption, SIGKILL, a node failing); a reader must
never see half a file. So every file is written under a temporary name in its final
directory and renamed into place (rename is atomic on POSIX within one filesystem), and a
rerun deletes temporaries left behind by a killed writer.

Output directories live on shared filesystems where someone else may have planted a symlink
at a name kd is about to write (`shards/`, `metrics.jsonl`, a cache root's `<key>`). Renaming
onto a symlink replaces the link, not its target, so the final component of a file is safe by
construction; the directory a file goes into is not, so `real_dir` refuses a symlink there
instead of following it. Files are published with the user's umask (some writers, e.g.
safetensors, create 0600 files).
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

from pipeline.errors import KDError

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    """A unique sibling temporary name; the marker lets `clean_temporaries` find it later."""
    return path.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:12]}-{path.name}")


def real_dir(path: str | os.PathLike) -> Path:
    """`path` as an existing directory (created with its parents when missing); a symlink or a
    file there is refused rather than written through."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling symlink: refused below
    except PermissionError:
        raise KDError(f"cannot create {path}: permission denied; choose a directory you can write to") from None
    except OSError as exc:
        raise KDError(f"cannot create {path}: {exc.strerror}; choose another directory") from None
    if path.is_symlink():
        raise KDError(f"{path} is a symlink (to {os.readlink(path)[:80]}); kd does not write through symlinks in its outputs: "
                     f"remove it or choose another directory")
    if not path.is_dir():
        raise KDError(f"{path} exists and is not a directory; remove it or choose another directory")
    return path


def refuse_symlink(path: str | os.PathLike) -> None:
    """Refuse a symlink at a name kd is about to open for writing in place (not by rename)."""
    if os.path.islink(path):
        raise KDError(f"{path} is a symlink; kd does not write through symlinks in its outputs: remove it and rerun")


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with writer threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def publish_mode(path: str | os.PathLike) -> None:
    """Give a file (or directory) the permissions a plain open() or mkdir() would have."""
    base = 0o777 if os.path.isdir(path) and not os.path.islink(path) else 0o666
    os.chmod(path, base & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it onto `path` only if the body succeeds."""
    path = Path(path)
    real_dir(path.parent)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            publish_mode(tmp)
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


def read_record(path: str | os.PathLike, what: str, fix: str) -> Any:
    """A kd JSON record (plan, task record, manifest), or a one-line refusal naming the file
    and `fix` when it is damaged (cut short, edited by hand, not JSON at all)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError:
        raise KDError(f"{path}: {what} is not UTF-8 text: it is damaged; {fix}") from None
    except json.JSONDecodeError as exc:
        raise KDError(f"{path}: {what} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): it is damaged; "
                     f"{fix}") from None
    except IsADirectoryError:
        raise KDError(f"{path}: {what} is a directory, not a file; {fix}") from None


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
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def replace_symlink(link: str | os.PathLike, target: str | os.PathLike) -> None:
    """Point `link` at `target` atomically (make a new link, rename it over the old one)."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise KDError(f"{link} exists and is not a symlink: remove it or choose another --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(link)
    os.symlink(os.path.abspath(target), tmp)
    os.replace(tmp, link)
