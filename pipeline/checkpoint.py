"""Training checkpoints that survive SIGKILL at any instant.

A checkpoint is a directory `checkpoints/step-NNNNNNNNN/` holding the weights, optimizer,
scheduler, every rank's RNG states and `state.json` (step, data cursor, world size). It is
written under a temporary name and renamed into place, so a directory with the final name is
always complete; a killed writer leaves only a temporary, which the next run deletes. The last
`keep` checkpoints are kept (one to resume from, one in case the newest is on a disk that lied
about fsync).

Under DDP the model and optimizer are identical on every rank, so rank 0 writes them; each rank
writes its own RNG states (dropout draws differ per rank) into the shared temporary directory.

Nothing is loaded through pickle: a checkpoint directory is a place someone else can write to
(a shared --out), and unpickling runs whatever code the file names. Each part is stored as
`NAME.safetensors` (every tensor, read back without executing anything) plus `NAME.json` (the
structure around them: dicts with integer keys, tuples, numbers, numpy RNG arrays), see
`_encode`. A checkpoint also records the key and the settings of its training configuration,
so a rerun with other settings is refused, naming them, instead of silently resuming it.
"""

from __future__ import annotations

import math
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
PARTS = ("model", "optimizer")  # plus rng-<rank>; each as NAME.safetensors + NAME.json


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


# --- tensors + JSON, no pickle ------------------------------------------------------------------

def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    """`obj` as JSON, its tensors moved into `tensors` (one entry per distinct tensor: tied
    weights are stored once; a view of an already stored storage is copied, as safetensors
    refuses shared memory)."""
    if torch.is_tensor(obj):
        if id(obj) not in seen:
            t = obj.detach().cpu()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in seen.get("storages", set()) or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
            seen.setdefault("storages", set()).add(ptr)
            seen[id(obj)] = f"t{len(tensors)}"
            tensors[seen[id(obj)]] = t
        return {"__tensor__": seen[id(obj)]}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _save(obj: Any, stem: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors, {})
    save_file(tensors, str(stem.with_name(stem.name + ".safetensors")))
    io.write_json(stem.with_name(stem.name + ".json"), skeleton)
    for suffix in (".safetensors", ".json"):
        path = stem.with_name(stem.name + suffix)
        io.publish_mode(path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _load(stem: Path) -> Any:
    from safetensors.torch import load_file

    tensors_path, json_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    where = stem.parent
    fix = f"delete {where} to resume from the checkpoint before it (or {where.parent} to start over)"
    if not json_path.exists():
        if stem.with_name(stem.name + ".pt").exists():
            raise KDError(f"checkpoint {where} was written by an older kd as a pickle, which is never loaded (it could run "
                          f"code); delete {where.parent} to train from the start")
        raise KDError(f"checkpoint {where} has no {json_path.name}: it is damaged; {fix}")
    skeleton = io.read_record(json_path, "the checkpoint structure", fix)
    try:
        tensors = load_file(str(tensors_path))
        return _decode(skeleton, tensors)
    except Exception as exc:  # a damaged or foreign file: its parser's error, on one line
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise KDError(f"checkpoint {where}: {stem.name} cannot be read ({msg}); {fix}") from None


def clean(out: Path) -> None:
    """Delete temporaries a killed run left in the checkpoint directory (rank 0 only)."""
    io.clean_temporaries(Path(out) / DIRNAME)


def save(out: Path, step: int, state: dict[str, Any], *, model: dict, optimizer: dict, scheduler: dict,
         extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; every rank must call this (it synchronises them).
    `state` should carry the run's "key" and "settings" (see `check_config`)."""
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    root = Path(out) / DIRNAME
    final = root / _name(step)
    tmp = [io.tmp_name(final) if rank == 0 else None]
    if dist:
        dist.broadcast_object_list(tmp, src=0)
    tmp = Path(tmp[0])
    if rank == 0:
        io.real_dir(root)
        tmp.mkdir()
    if dist:
        dist.barrier()
    _save(rng_state(), tmp / f"rng-{rank}")
    if dist:
        dist.barrier()
    if rank == 0:
        _save(model, tmp / "model")
        _save({"optimizer": optimizer, "scheduler": scheduler, **(extra or {})}, tmp / "optimizer")
        io.write_json(tmp / STATE, {**state, "step": step, "world_size": world})
        if final.is_symlink():
            final.unlink()
        elif final.exists():  # the same step written by an earlier, interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.is_symlink())[:-keep]:
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
    done = sorted(p for p in root.glob("step-*") if (p / STATE).exists() and not p.is_symlink()) if root.is_dir() else []
    return done[-1] if done else None


def _state(path: Path) -> dict[str, Any]:
    state = io.read_record(path / STATE, "the checkpoint state", f"delete {path} to resume from the one before it")
    if not isinstance(state, dict):
        raise KDError(f"{path / STATE}: not a JSON object: the checkpoint is damaged; delete {path}")
    return state


def check_config(out: Path, key: str, settings: dict[str, Any]) -> None:
    """Refuse to resume the newest checkpoint of `out` when it was written under another
    training configuration, naming the settings that differ."""
    path = latest(out)
    if path is None:
        return
    state = _state(path)
    if state.get("key") == key:
        return
    theirs = state.get("settings") if isinstance(state.get("settings"), dict) else {}
    diff = [k for k in sorted(set(theirs) | set(settings))
            if io.canonical_json(theirs.get(k)) != io.canonical_json(settings.get(k))] if theirs else []
    what = f"differs in: {', '.join(diff)}" if diff else "its inputs or settings differ"
    raise KDError(f"{out} holds a checkpoint ({path.name}) of another training configuration ({what}); rerun with its settings "
                  f"to resume it, choose another --out, or delete {Path(out) / DIRNAME} to start over")


def load(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    """state, model, optimizer, scheduler and this rank's RNG from checkpoint `path`."""
    state = _state(path)
    if state.get("world_size") != world_size:
        raise KDError(f"checkpoint {path} was written by {state.get('world_size')} process(es), this run has "
                      f"{world_size}; rerun with the same number of processes or use a fresh --out")
    opt = _load(path / "optimizer")
    if not isinstance(opt, dict) or "optimizer" not in opt or "scheduler" not in opt:
        raise KDError(f"checkpoint {path}: the optimizer part is damaged; delete {path} to resume from the one before it")
    return {
        "state": state,
        "model": _load(path / "model"),
        "optimizer": opt.pop("optimizer"),
        "scheduler": opt.pop("scheduler"),
        "extra": opt,
        "rng": _load(path / f"rng-{rank}"),
    }


def remove_all(out: Path) -> None:
    shutil.rmtree(Path(out) / DIRNAME, ignore_errors=True)
