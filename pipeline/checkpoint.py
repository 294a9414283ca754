"""Training checkpoints that survive SIGKILL at any instant.

A checkpoint is a directory `checkpoints/step-NNNNNNNNN/` holding the weights, optimizer,
scheduler, every rank's RNG states and `state.json` (step, data cursor, world size). It is
written under a temporary name and renamed into place, so a directory with the final name is
always complete; a killed writer leaves only a temporary, which the next run deletes. The last
`keep` checkpoints are kept (one to resume from, one in case the newest is on a disk that lied
about fsync).

Under DDP the model and optimizer are identical on every rank, so rank 0 writes them; each rank
writes its own RNG states (dropout draws differ per rank) into the shared temporary directory.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import io
from pipeline.errors import KDError

DIRNAME = "checkpoints"
STATE = "state.json"


def _name(step: int) -> str:
    return f"step-{step:09d}"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def clean(out: Path) -> None:
    """Delete temporaries a killed run left in the checkpoint directory (rank 0 only)."""
    io.clean_temporaries(Path(out) / DIRNAME)


def save(out: Path, step: int, state: dict[str, Any], *, model: dict, optimizer: dict, scheduler: dict,
         extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; every rank must call this (it synchronises them)."""
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    root = Path(out) / DIRNAME
    final = root / _name(step)
    tmp = [io.tmp_name(final) if rank == 0 else None]
    if dist:
        dist.broadcast_object_list(tmp, src=0)
    tmp = Path(tmp[0])
    if rank == 0:
        tmp.mkdir(parents=True)
    if dist:
        dist.barrier()
    _save(rng_state(), tmp / f"rng-{rank}.pt")
    if dist:
        dist.barrier()
    if rank == 0:
        _save(model, tmp / "model.pt")
        _save({"optimizer": optimizer, "scheduler": scheduler, **(extra or {})}, tmp / "optimizer.pt")
        io.write_json(tmp / STATE, {**state, "step": step, "world_size": world})
        if final.exists():  # the same step written by an earlier, interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist:
        dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def latest(out: Path) -> Path | None:
    root = Path(out) / DIRNAME
    done = sorted(p for p in root.glob("step-*") if (p / STATE).exists()) if root.is_dir() else []
    return done[-1] if done else None


def load(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """state, model, optimizer, scheduler and this rank's RNG from checkpoint `path`."""
    state = io.read_json(path / STATE)
    if state.get("world_size") != world_size:
        raise KDError(f"checkpoint {path} was written by {state.get('world_size')} process(es), this run has "
                      f"{world_size}; rerun with the same number of processes or use a fresh --out")
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    return {
        "state": state,
        "model": torch.load(path / "model.pt", map_location="cpu", weights_only=True),
        "optimizer": opt.pop("optimizer"),
        "scheduler": opt.pop("scheduler"),
        "extra": opt,
        "rng": torch.load(path / f"rng-{rank}.pt", map_location="cpu", weights_only=False),
    }


def remove_all(out: Path) -> None:
    shutil.rmtree(Path(out) / DIRNAME, ignore_errors=True)
