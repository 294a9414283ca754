"""`kd inspect` and `kd verify`: what a targets cache holds, and whether it is intact.

Inspection reads one record batch at a time (polars for the arithmetic) so that a cache of any
size can be summarised in bounded memory. Verification re-hashes every file and, optionally,
re-runs the teacher on a random sample of stored rows -- on the stored `input_ids`, i.e.
exactly what the teacher saw -- and compares ids and values within float tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline.errors import KDError


def _shards(directory: Path, m: dict) -> list[Path]:
    return [Path(directory) / f["path"] for f in m["files"]]


def summarize(directory: str | Path) -> dict:
    directory = Path(directory)
    m = mf.read_manifest(directory, kind="targets")
    rows = positions = truncated = 0
    tail_sum = ent_sum = 0.0
    for path in _shards(directory, m):
        for batch in pq.ParquetFile(path).iter_batches(columns=["topk_logits", "lse", "truncated"], batch_size=4096):
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
    stats = m["stats"]
    total_bytes = sum(f["bytes"] for f in m["files"])
    return {
        "directory": str(directory),
        "key": m["key"],
        "task_type": stats.get("task_type"),
        "rows": rows,
        "positions": positions,
        "top_k": stats.get("top_k"),
        "temperature": stats.get("temperature"),
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
    problems = mf.verify_files(directory, m)
    if problems:
        raise KDError(f"{directory}: {len(problems)} file(s) fail verification: {problems[0]}; rebuild them (delete the task record and "
                      f"rerun the task)")
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
    table = pq.ParquetDataset([str(p) for p in _shards(directory, m)]).read(
        columns=["row", "input_ids", "positions", "topk_ids", "topk_logits", "lse"])
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False).tolist())
    dev = pick_device(device)
    model = load_model(model_path, stats["task_type"], dtype=pick_dtype(dtype, dev), device=dev)
    extractor = Extractor(model, stats["task_type"], stats["top_k"], stats["temperature"])
    worst_val = worst_lse = 0.0
    for i in picks:
        r = {c: table[c][i].as_py() for c in table.column_names}
        if not r["positions"]:
            continue
        ids = torch.tensor([r["input_ids"]], device=dev)
        ids_new, vals_new, lse_new = (t.float().cpu().numpy() for t in extractor(ids, torch.ones_like(ids), [r["positions"]]))
        vals_old = np.asarray(r["topk_logits"], dtype=np.float64)
        scale = max(1.0, float(np.abs(vals_old).max()))
        tol = 2e-2 * scale if dtype != "float32" else 2e-3 * scale
        for p in range(len(r["positions"])):
            old_ids, new_ids = np.asarray(r["topk_ids"][p]), ids_new[p].astype(np.int64)
            differ = old_ids != new_ids
            # ids may swap only where their values tie within tolerance
            if differ.any() and np.abs(vals_old[p][differ] - vals_new[p][differ]).max() > tol:
                raise KDError(f"row {r['row']} position {r['positions'][p]}: top-k ids differ from a fresh teacher run; the cache does "
                              f"not match {model_path}")
        worst_val = max(worst_val, float(np.abs(np.sort(vals_old, -1) - np.sort(vals_new, -1)).max()))
        worst_lse = max(worst_lse, float(np.abs(np.asarray(r["lse"]) - lse_new).max()))
        if worst_val > tol or worst_lse > tol:
            raise KDError(f"row {r['row']}: stored values differ from a fresh teacher run by {max(worst_val, worst_lse):.4g} (> "
                          f"{tol:.3g}); the cache does not match {model_path}")
    return f"recomputed {len(picks)} rows: max |Δ logit| {worst_val:.3g}, max |Δ lse| {worst_lse:.3g}"
