"""`kd inspect` and `kd verify`: what a targets cache holds, and whether it is intact.

Inspection reads one record batch at a time (polars for the arithmetic) so that a cache of any
size can be summarised in bounded memory, after checking every shard's size and sha256 against
the manifest (a flipped bit must not turn into a plausible summary). Verification re-hashes
every file and, optionally, re-runs the teacher on a random sample of stored rows -- on the
stored `input_ids`, i.e. exactly what the teacher saw -- and compares every stored id and value
with the fresh run: each stored id must be among the teacher's top ids with the stored value,
and no id the teacher ranks clearly above the stored k-th value may be missing, so that ties at
the k-th boundary are the only freedom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline import format as fmt
from pipeline import manifest as mf
from pipeline.errors import KDError


def _shards(directory: Path, m: dict) -> list[Path]:
    return [mf.path_of(directory, f["path"]) for f in m["files"]]


def intact(directory: Path, m: dict) -> None:
    """Refuse a cache whose files differ from its manifest (missing, cut short, a flipped bit)."""
    problems = mf.verify_files(directory, m)
    if problems:
        raise KDError(f"{directory}: {len(problems)} file(s) fail verification: {problems[0]}; rebuild them (delete the task record and "
                      f"rerun the task)")


def summarize(directory: str | Path) -> dict:
    directory = Path(directory)
    m = mf.read_cache(directory)
    intact(directory, m)
    try:
        return _summarize(directory, m)
    except (OSError, ValueError) as exc:  # pyarrow's errors for a shard that hashes right but does not decode
        raise KDError(f"{directory}: a shard cannot be read ({str(exc).splitlines()[0][:160]}); rebuild the cache") from None


def _summarize(directory: Path, m: dict) -> dict:
    rows = positions = truncated = 0
    tail_sum = ent_sum = 0.0
    stats = m["stats"]
    pair = ((m.get("config") or {}).get("columns") or {}).get("text_pair") is not None
    for path in _shards(directory, m):
        pf = fmt.check_shard(path, stats["task_type"], stats["value_dtype"], pair, m["key"], lse_grid=bool(stats.get("temperatures")))
        for batch in pf.iter_batches(columns=["topk_logits", "lse", "truncated"], batch_size=4096):
            df = pl.from_arrow(batch)
            rows += df.height
            truncated += int(df["truncated"].sum())
            per_pos = (df.select("topk_logits", "lse").explode(["topk_logits", "lse"]).drop_nulls()
                       .with_row_index("p").explode("topk_logits")
                       .with_columns(lp=pl.col("topk_logits").cast(pl.Float64) - pl.col("lse").cast(pl.Float64))
                       .group_by("p").agg(mass=pl.col("lp").exp().sum(), plogp=(pl.col("lp").exp() * pl.col("lp")).sum()))
            if per_pos.height == 0:
                continue
            tail = np.clip(1.0 - per_pos["mass"].to_numpy(), 0.0, 1.0)
            tail_term = np.where(tail > 0, -tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0)
            positions += per_pos.height
            tail_sum += float(tail.sum())
            ent_sum += float((-per_pos["plogp"].to_numpy() + tail_term).sum())
    total_bytes = sum(f["bytes"] for f in m["files"])
    return {
        "directory": str(directory),
        "key": m["key"],
        "task_type": stats.get("task_type"),
        "rows": rows,
        "positions": positions,
        "top_k": stats.get("top_k"),
        "temperature": stats.get("temperature"),
        "temperatures": stats.get("temperatures") or [stats.get("temperature")],  # the grid: an exact tail at each
        "value_dtype": stats.get("value_dtype"),
        "shards": len(m["files"]),
        "bytes": total_bytes,
        "bytes_per_position": round(total_bytes / positions, 2) if positions else None,
        "mean_tail_mass": round(tail_sum / positions, 6) if positions else None,
        "mean_entropy_nats": round(ent_sum / positions, 6) if positions else None,
        "truncated_rows": truncated,
    }


def verify(directory: str | Path, recompute: int = 0, model: str | None = None, seed: int = 0,
           device: str = "auto", dtype: str = "float32") -> str:
    directory = Path(directory)
    m = mf.read_manifest(directory)
    intact(directory, m)
    msg = f"ok: {len(m['files'])} files match their sha256"
    if recompute > 0:
        if m["kind"] != "targets":
            raise KDError("--recompute applies to targets caches only")
        msg += "; " + _recompute(directory, m, recompute, model or m["config"]["model"], seed, device, dtype)
    return msg


def _recompute(directory: Path, m: dict, n: int, model_path: str, seed: int, device: str, dtype: str) -> str:
    import torch

    from pipeline.models import load_model, pick_device, pick_dtype
    from pipeline.softtargets import Extractor

    stats = m["stats"]
    grid = stats.get("temperatures")  # a grid cache: every stored lse is compared
    table = pq.ParquetDataset([str(p) for p in _shards(directory, m)]).read(
        columns=["row", "input_ids", "positions", "topk_ids", "topk_logits", "lse_grid" if grid else "lse"])
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False).tolist())
    dev = pick_device(device)
    model = load_model(model_path, stats["task_type"], dtype=pick_dtype(dtype, dev), device=dev)
    k = int(stats["top_k"])
    wide = min(int(stats["outputs"]), max(2 * k, k + 8))  # room for ids tied at the k-th boundary
    extractor = Extractor(model, stats["task_type"], wide, stats["temperature"], vocab_limit=stats.get("vocab_limit"), grid=grid)
    worst = [0.0, 0.0]  # |Δ value|, |Δ lse|
    for i in picks:
        r = {c: table[c][i].as_py() for c in table.column_names}
        if not r["positions"]:
            continue
        ids = torch.tensor([r["input_ids"]], device=dev)
        ids_new, vals_new, lse_new = (t.float().cpu().numpy() for t in extractor(ids, torch.ones_like(ids), [r["positions"]]))
        vals_old = np.asarray(r["topk_logits"], dtype=np.float64)
        tol = (2e-2 if dtype != "float32" else 2e-3) * max(1.0, float(np.abs(vals_old).max()))
        for p, pos in enumerate(r["positions"]):
            where = f"row {r['row']} position {pos}"
            _compare_ids(where, np.asarray(r["topk_ids"][p], dtype=np.int64), vals_old[p], ids_new[p].astype(np.int64),
                         vals_new[p], k, tol, worst, model_path)
        worst[1] = max(worst[1], float(np.abs(np.asarray(r["lse_grid" if grid else "lse"]) - lse_new).max()))
        if worst[1] > tol:
            raise KDError(f"row {r['row']}: stored logsumexp differs from a fresh teacher run by {worst[1]:.4g} (> {tol:.3g}); "
                          f"the cache does not match {model_path}")
    return f"recomputed {len(picks)} rows: max |Δ logit| {worst[0]:.3g}, max |Δ lse| {worst[1]:.3g}"


def _compare_ids(where: str, old_ids, old_vals, new_ids, new_vals, k: int, tol: float, worst: list, model_path: str) -> None:
    """One position: every stored id is among the fresh top ids with the stored value, in
    descending order, and the fresh top-k has no id clearly above the stored k-th value that the
    cache lacks. Only ties (within `tol`) at the k-th boundary may differ."""
    fresh = dict(zip(new_ids.tolist(), new_vals.tolist()))
    if len(set(old_ids.tolist())) != len(old_ids) or np.any(np.diff(old_vals) > tol):
        raise KDError(f"{where}: stored top-k ids repeat or are not in descending order of value; the cache is damaged or edited")
    for rank, (i, v) in enumerate(zip(old_ids.tolist(), old_vals.tolist())):
        if i not in fresh:
            raise KDError(f"{where}: stored id {i} (rank {rank}) is not among a fresh teacher run's top {len(new_ids)}; "
                          f"the cache does not match {model_path}")
        worst[0] = max(worst[0], abs(fresh[i] - v))
        if abs(fresh[i] - v) > tol:
            raise KDError(f"{where}: stored value of id {i} (rank {rank}) differs from a fresh teacher run by "
                          f"{abs(fresh[i] - v):.4g} (> {tol:.3g}); the cache does not match {model_path}")
    stored = set(old_ids.tolist())
    for i, v in zip(new_ids[:k].tolist(), new_vals[:k].tolist()):
        if i not in stored and v > old_vals[-1] + tol:
            raise KDError(f"{where}: a fresh teacher run ranks id {i} in its top {k} but the cache lacks it; the cache does not "
                          f"match {model_path}")
