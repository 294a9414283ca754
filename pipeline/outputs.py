"""A stage's output directory, claimed for one kind and key: the one place that decides
reuse / start / refuse, that keeps two writers out of one directory, and that completes a
directory with its manifest.

Like datatrove's executor base, which keeps completion logic once for every step, every stage
(teacher, train, eval, and sweeps of them) goes through `StageOutput`:

    output = StageOutput(out, "student", key)
    if output.existing() is not None:     # complete, same kind and key: nothing to do
        return {..., "reused": True}
    with output.claimed(plan):            # lock, then plan.json (refuses another output)
        ... write the files ...
        output.complete(files, stats)     # tasks/00000.json, then manifest.json, last

An array stage claims its own task (`claimed(plan, task=i)`), calls `task_done(i, record)`
and `finish()`, which writes the manifest once the last task is in. The files themselves
(plan.json, task records, manifest.json) are `pipeline.manifest`'s.

Shared directories. Output directories sit on cluster filesystems that other people (and other
jobs of the same person) can write to, so a claim:
- takes a lock per task (`.kd-task-NNNNN.lock`, an flock held for the life of the writer, with
  the holder's host and pid in the file): a second writer of the same task is refused with the
  holder named, and the lock of a process that died (SIGKILL, a lost node) is free again, so a
  rerun takes it over;
- refuses to write through symlinks: at the directory itself and directly inside it (where
  someone could redirect `shards/` or `metrics.jsonl` to a file of theirs), see `io.real_dir`;
- removes what an earlier attempt of other settings left behind when it starts afresh (a
  teacher's `tokenizer/`, a student's `metrics.jsonl`), and the temporaries a killed
  single-task writer left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

from pipeline import format as fmt
from pipeline import io, manifest
from pipeline.errors import KDError
from pipeline.progress import say

NOUNS = {"targets": "cache", "student": "student", "evaluation": "evaluation"}
LEFTOVERS = ("tokenizer", "metrics.jsonl")  # written by an attempt before any of its work is kept
_HELD: dict[str, int] = {}  # lock path -> descriptor, for the locks this process holds (re-entrant)
_FORK_HOOK: list[bool] = []  # whether _forget_locks_in_child is registered (once, on the first lock)


def lock_name(task: int) -> str:
    return f".kd-task-{task:05d}.lock"


@dataclasses.dataclass
class StageOutput:
    out: Path
    kind: str
    key: str
    num_tasks: int = 1
    replace: bool = False  # another output of this kind is replaced (an evaluation) rather than refused
    lock: bool = True      # False on the DDP ranks that do not write the output's files

    def __post_init__(self):
        self.out = Path(self.out)
        self._locks: list[Path] = []

    def existing(self) -> dict[str, Any] | None:
        """The manifest when `out` already holds this very output; None when there is nothing
        complete to reuse; a one-line refusal when it holds something else."""
        self.refuse_other_kind()
        if not (self.out / manifest.MANIFEST).exists():
            return None
        m = manifest.read_manifest(self.out)
        if m.get("key") == self.key:
            gone = [f["path"] for f in m.get("files", []) if not manifest.path_of(self.out, f["path"]).exists()]
            if gone and self.replace:
                self._forget()
                return None
            if gone:
                raise KDError(f"{self.out} is damaged ({gone[0]} is missing); run `kd verify {self.out}` and rebuild it")
            with contextlib.suppress(OSError):  # a read-only shared cache is still reusable
                manifest.tidy(self.out)
                drop_stale_locks(self.out)
            return m
        if self.replace:
            self._forget()
            return None
        raise KDError(f"{self.out} holds a different {NOUNS.get(self.kind, self.kind)} (key {str(m.get('key'))[:12]}, "
                      f"this run's key {self.key[:12]}); choose another --out"
                      + (" or use --cache-root" if self.kind == "targets" else ""))

    @contextlib.contextmanager
    def claimed(self, plan: dict[str, Any], task: int = 0) -> Iterator[dict[str, Any]]:
        """`claim` for the body of a `with`; the lock is released however the body ends."""
        try:
            yield self.claim(plan, task)
        finally:
            self.release()

    def claim(self, plan: dict[str, Any], task: int = 0) -> dict[str, Any]:
        """Lock task `task`, then write plan.json for this output (every task of an array writes
        the same one). Refuses a file, a symlink, an unwritable directory and another output."""
        self.refuse_other_kind()
        if self.out.is_symlink():
            raise KDError(f"--out {self.out} is a symlink (to {os.readlink(self.out)[:80]}); kd writes only into real "
                          f"directories: pass the directory it points to, or another --out")
        io.real_dir(self.out)
        planted = next((p.name for p in sorted(self.out.iterdir()) if p.is_symlink()), None)
        if planted:
            raise KDError(f"{self.out / planted} is a symlink; kd does not write through symlinks in its outputs: remove it "
                          f"(or choose another --out)")
        if self.lock and (held := acquire(self.out / lock_name(task), self.out, task, self.num_tasks)) is not None:
            self._locks.append(held)
        if self.replace and (self.out / manifest.PLAN).exists() and manifest.read_plan(self.out).get("key") != self.key:
            self._forget()  # an unfinished output of other settings
        before = manifest.read_plan(self.out).get("key") if (self.out / manifest.PLAN).exists() else self.key
        full = {"kind": self.kind, "key": self.key, "format_version": fmt.FORMAT_VERSION, "num_tasks": self.num_tasks,
                "created_at": manifest.now(), **plan}
        written = manifest.write_plan(self.out, full)
        if before != self.key:  # an earlier attempt of other settings, which kept nothing: its leftovers go
            for name in LEFTOVERS:
                p = self.out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if self.num_tasks == 1 and self.lock:  # the only writer: whatever a killed writer left is garbage
            for d in (self.out, self.out / manifest.TASKS):
                for p in d.glob(f"{io.TMP_MARK}*"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        return written

    def release(self) -> None:
        while self._locks:
            release(self._locks.pop())

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
        """Refuse a file at `out`, or a directory holding another stage's output."""
        self._refuse_file()
        for name in (manifest.MANIFEST, manifest.PLAN):
            path = self.out / name
            if path.exists():
                record = io.read_record(path, f"the {name.split('.')[0]}", f"delete {self.out} and rerun the stage")
                kind = record.get("kind") if isinstance(record, dict) else None
                if kind != self.kind:
                    raise KDError(f"--out {self.out} holds the output of another kd stage (a {str(kind)[:20]!r} output); "
                                  f"choose another --out")
                return

    def _refuse_file(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise KDError(f"--out {self.out} is a file, not a directory; choose another --out")

    def _forget(self) -> None:
        """Drop the records of a replaced output; its files are overwritten as the new one is written."""
        (self.out / manifest.MANIFEST).unlink(missing_ok=True)
        (self.out / manifest.PLAN).unlink(missing_ok=True)
        shutil.rmtree(self.out / manifest.TASKS, ignore_errors=True)


# --- the lock ---------------------------------------------------------------------------------

def acquire(path: Path, out: Path, task: int, num_tasks: int) -> Path | None:
    """Hold the lock at `path` (an flock, so the kernel frees it when its holder dies) and write
    this process's host and pid into it; refuse, naming the holder, while another process holds it.
    Returns None when this process holds it already (its first holder releases it)."""
    key = os.path.abspath(path)
    if key in _HELD:
        return None
    what = f"{out}" if num_tasks == 1 else f"task {task} of {out}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise KDError(f"{path} is a symlink; remove it and rerun") from None
            raise KDError(f"cannot write to {out} ({exc.strerror}); choose a directory you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise KDError(f"{what} is being written by another kd process ({holder}); wait for it to finish, "
                          f"or, if that process is gone, delete {path}") from None
        except OSError as exc:  # a filesystem without locks: fall back to the host/pid record
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            _check_record(fd, path, what)
        if not _same_file(fd, path):  # released (unlinked) by its holder between our open and our flock
            os.close(fd)
            continue
        stale = _read(fd)
        if stale:
            say(f"taking over the lock of {what} from {_holder_text(stale)}: that process is gone")
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": manifest.now()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        _HELD[key] = fd
        if not _FORK_HOOK:
            os.register_at_fork(after_in_child=_forget_locks_in_child)
            _FORK_HOOK.append(True)
        return path


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the parent's open lock descriptions, and an
    flock lasts while any process holds one: a worker that outlives a SIGKILLed writer by the few
    seconds it takes to notice would keep the output locked against the rerun. The child closes
    its copies; it never writes the output itself."""
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


def release(path: Path) -> None:
    """Remove the lock file and let go of the flock (in that order: a waiter then sees no file)."""
    fd = _HELD.pop(os.path.abspath(path), None)
    if fd is None:
        return
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def drop_stale_locks(out: Path) -> None:
    """Remove the lock files of a complete output whose holders died (killed between the
    manifest and the release); a lock still held is left alone."""
    for path in Path(out).glob(".kd-task-*.lock"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(fd: int) -> str:
    info = _read(fd)
    return _holder_text(info) if info else "a process that is just starting"


def _check_record(fd: int, path: Path, what: str) -> None:
    """Without flock: a lock file naming a live process of this host, or any process of another
    host (whose liveness cannot be checked from here), is held."""
    info = _read(fd)
    if not info or info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return
    alive = True
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass
    if alive:
        os.close(fd)
        raise KDError(f"{what} is being written by another kd process ({_holder_text(info)}); wait for it to finish, "
                      f"or, if that process is gone, delete {path}")


def _holder_text(info: dict) -> str:
    return f"pid {str(info.get('pid'))[:12]} on host {str(info.get('host'))[:64]}, since {str(info.get('since'))[:32]}"
