"""`kd inspect` and `kd verify`: what a targets cache holds, and whether it is intact.

Inspection reads one record batch at a time (numpy for the arithmetic) so that a cache of any
size can be summarised in bounded memory, after checking every shard's size and sha256 against
the manifest (a flipped bit must not turn into a plausible summary). Verification re-hashes
every file and, optionally, re-runs the teacher on a random sample of stored rows -- on the
stored `input_ids`, i.e. exactly what the teacher saw -- and compares every stored id and value
with the fresh run: each stored id must be among the teacher's top ids with the stored value,
and no id the teacher ranks clearly above the stored k-th value may be missing, so that ties at
the k-th boundary are the only freedom. A sampled cache is redrawn instead: the draws are keyed
by (cache key, row, position), so a fresh teacher run must draw the very same ids and counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import format as fmt
from pipeline import layout
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
    """Per position, from the stored log-probs lp = value - lse: the tail mass and a lower bound of the
    entropy (top-k), or the distinct ids drawn, their mass and the unbiased entropy estimate
    sum (c / M)(-lp) (sampled)."""
    rows = positions = truncated = 0
    tail_sum = ent_sum = distinct_sum = 0.0
    distinct_max = 0
    stats = m["stats"]
    mode = fmt.target_mode(stats)
    targets = list(fmt.columns_of(stats["value_dtype"], mode))
    pair = ((m.get("config") or {}).get("columns") or {}).get("text_pair") is not None
    for path in _shards(directory, m):
        pf = fmt.check_shard(path, stats["task_type"], stats["value_dtype"], pair, m["key"], lse_grid=bool(stats.get("temperatures")),
                             target_mode=mode)
        coded = fmt.layout_metadata(pf)
        for batch in pf.iter_batches(columns=[*targets, "lse", "truncated"], batch_size=4096):
            t = pa.Table.from_batches([batch])
            rows += t.num_rows
            truncated += int(np.asarray(t.column("truncated")).sum())
            mass, plogp, width = _sampled_sums(t) if mode == "sampled" else _topk_sums(t, coded)
            if len(mass) == 0:
                continue
            tail = np.clip(1.0 - mass, 0.0, 1.0)
            tail_term = np.where(tail > 0, -tail * np.log(np.where(tail > 0, tail, 1.0)), 0.0) if mode != "sampled" else 0.0
            positions += len(mass)
            tail_sum += float(tail.sum())
            ent_sum += float((-plogp + tail_term).sum())
            distinct_sum += float(width.sum())
            distinct_max = max(distinct_max, int(width.max()))
    total_bytes = sum(f["bytes"] for f in m["files"])

    def per(x: float) -> float | None:
        return round(x / positions, 6) if positions else None

    return {
        "directory": str(directory),
        "key": m["key"],
        "task_type": stats.get("task_type"),
        "rows": rows,
        "positions": positions,
        "target_mode": fmt.target_mode(stats),
        "top_k": stats.get("top_k"),
        **({"samples": stats.get("samples"), "sample_seed": stats.get("sample_seed"),
            "mean_distinct_ids": per(distinct_sum), "max_distinct_ids": distinct_max} if mode == "sampled" else {}),
        "temperature": stats.get("temperature"),
        "temperatures": stats.get("temperatures") or [stats.get("temperature")],  # the grid: an exact tail at each
        "value_dtype": stats.get("value_dtype"),
        "shards": len(m["files"]),
        "bytes": total_bytes,
        "bytes_per_position": round(total_bytes / positions, 2) if positions else None,
        # sampled: the mass outside the distinct ids drawn; the entropy is then an unbiased estimate, not a bound
        "mean_tail_mass": per(tail_sum),
        # storing the values: KL(the teacher's float32 top-k || as stored), measured by kd teacher as it wrote them
        **({"stored_kl_mean": float(f"{stats['stored_kl_sum'] / stats['stored_kl_positions']:.3g}"),
            "stored_kl_max": stats.get("stored_kl_max")} if stats.get("stored_kl_positions") else {}),
        "mean_entropy_nats": per(ent_sum),
        "truncated_rows": truncated,
    }


def _topk_sums(t: pa.Table, coded: dict | None):
    """(stored mass, sum p lp, k) per position of a top-k table."""
    ids, vals, lse = fmt.read_topk(t, coded)
    lp = vals.astype(np.float64) - lse.astype(np.float64)[:, None]
    p = np.exp(lp)
    return p.sum(1), (p * lp).sum(1), np.full(len(lse), ids.shape[1])


def _sampled_sums(t: pa.Table):
    """(mass of the distinct ids, sum (c / M) lp, distinct ids) per position of a sampled table."""
    width, _, counts, vals, lse = fmt.read_samples(t)
    counts, lse = counts.astype(np.float64), lse.astype(np.float64)
    at = np.repeat(np.arange(len(width)), width)
    lp = vals.astype(np.float64) - lse[at]
    n = len(width)
    total = np.bincount(at, counts, minlength=n)
    return (np.bincount(at, np.exp(lp), minlength=n), np.bincount(at, counts / np.maximum(total[at], 1) * lp, minlength=n),
            width)


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
    from pipeline.softtargets import Extractor, sample_seed

    stats = m["stats"]
    grid = stats.get("temperatures")  # a grid cache: every stored lse is compared
    sampled = fmt.target_mode(stats) == "sampled"
    table = _rows_for_recompute(directory, m, grid)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False).tolist())
    dev = pick_device(device)
    model = load_model(model_path, stats["task_type"], dtype=pick_dtype(dtype, dev), device=dev)
    if sampled:
        extractor = Extractor(model, stats["task_type"], None, stats["temperature"], vocab_limit=stats.get("vocab_limit"),
                              samples=int(stats["samples"]), seed=sample_seed(m["key"]))
        return _redraw(table, picks, extractor, dev, dtype, model_path)
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
        vals_old = np.asarray(r["topk_logits"], dtype=np.float64)  # [positions, k], decoded
        tol = (2e-2 if dtype != "float32" else 2e-3) * max(1.0, float(np.abs(vals_old).max()))
        lse_old = np.asarray(r["lse"], dtype=np.float64)[:, None]
        # format 2: each value as far off as its code step allows (pipeline.layout.value_error)
        tols = tol + layout.value_error(vals_old - lse_old, k) if stats["value_dtype"] == "code" else np.full(vals_old.shape, tol)
        for p, pos in enumerate(r["positions"]):
            where = f"row {r['row']} position {pos}"
            _compare_ids(where, np.asarray(r["topk_ids"][p], dtype=np.int64), vals_old[p], ids_new[p].astype(np.int64),
                         vals_new[p], k, tols[p], worst, model_path)
        worst[1] = max(worst[1], float(np.abs(np.asarray(r["lse_grid" if grid else "lse"]) - lse_new).max()))
        if worst[1] > tol:
            raise KDError(f"row {r['row']}: stored logsumexp differs from a fresh teacher run by {worst[1]:.4g} (> {tol:.3g}); "
                          f"the cache does not match {model_path}")
    return f"recomputed {len(picks)} rows: max |Δ logit| {worst[0]:.3g}, max |Δ lse| {worst[1]:.3g}"


def _rows_for_recompute(directory: Path, m: dict, grid) -> pa.Table:
    """Every row's input_ids and positions with its targets as stored; a top-k cache's decoded into
    topk_ids / topk_logits [positions][k] whatever its format version (`format.read_topk`)."""
    stats, parts = m["stats"], []
    targets = list(fmt.columns_of(stats["value_dtype"], fmt.target_mode(stats)))
    for path in _shards(directory, m):
        pf = pq.ParquetFile(path)
        t = pf.read(columns=["row", "input_ids", "positions", *targets, "lse"] + (["lse_grid"] if grid else []))
        t = fmt.with_topk_lists(t, fmt.layout_metadata(pf))
        parts.append(t)
    return pa.concat_tables(parts, promote_options="default")


def _redraw(table, picks: list[int], extractor, dev, dtype: str, model_path: str) -> str:
    """A sampled cache's rows drawn again: the draws are keyed by (cache key, row, position), so the
    distinct ids and counts must be the stored ones exactly, and values and lse within tolerance."""
    import torch

    from pipeline.softtargets import distinct_draws

    worst = [0.0, 0.0]
    for i in picks:
        r = {c: table[c][i].as_py() for c in table.column_names}
        if not r["positions"]:
            continue
        ids = torch.tensor([r["input_ids"]], device=dev)
        draws, vals, lse_new = (t.cpu().numpy() for t in extractor(ids, torch.ones_like(ids), [r["positions"]], [r["row"]]))
        _, ids_new, counts_new, vals_new = distinct_draws(draws, vals.astype(np.float64))
        ids_old = np.concatenate([np.asarray(x, np.int64) for x in r["sample_ids"]])
        counts_old = np.concatenate([np.asarray(x, np.int64) for x in r["sample_counts"]])
        vals_old = np.concatenate([np.asarray(x, np.float64) for x in r["sample_logits"]])
        if ids_new.shape != ids_old.shape or (ids_new != ids_old).any() or (counts_new != counts_old).any():
            raise KDError(f"row {r['row']}: the stored sample ids or counts differ from a fresh draw with the cache's key; the cache "
                          f"does not match {model_path} (or was edited)")
        tol = (2e-2 if dtype != "float32" else 2e-3) * max(1.0, float(np.abs(vals_old).max()))
        worst[0] = max(worst[0], float(np.abs(vals_new - vals_old).max()))
        worst[1] = max(worst[1], float(np.abs(np.asarray(r["lse"]) - lse_new).max()))
        if max(worst) > tol:
            raise KDError(f"row {r['row']}: stored values differ from a fresh teacher run by {max(worst):.4g} (> {tol:.3g}); the cache "
                          f"does not match {model_path}")
    return f"redrew {len(picks)} rows: same ids and counts, max |Δ logit| {worst[0]:.3g}, max |Δ lse| {worst[1]:.3g}"


def _compare_ids(where: str, old_ids, old_vals, new_ids, new_vals, k: int, tols: np.ndarray, worst: list, model_path: str) -> None:
    """One position: every stored id is among the fresh top ids with the stored value, in
    descending order, and the fresh top-k has no id clearly above the stored k-th value that the
    cache lacks. Only ties (within the tolerance, `tols` per rank) at the k-th boundary may differ."""
    fresh = dict(zip(new_ids.tolist(), new_vals.tolist()))
    if len(set(old_ids.tolist())) != len(old_ids) or np.any(np.diff(old_vals) > np.maximum(tols[1:], tols[:-1])):
        raise KDError(f"{where}: stored top-k ids repeat or are not in descending order of value; the cache is damaged or edited")
    for rank, (i, v) in enumerate(zip(old_ids.tolist(), old_vals.tolist())):
        if i not in fresh:
            raise KDError(f"{where}: stored id {i} (rank {rank}) is not among a fresh teacher run's top {len(new_ids)}; "
                          f"the cache does not match {model_path}")
        worst[0] = max(worst[0], abs(fresh[i] - v))
        tol = float(tols[rank])
        if abs(fresh[i] - v) > tol:
            raise KDError(f"{where}: stored value of id {i} (rank {rank}) differs from a fresh teacher run by "
                          f"{abs(fresh[i] - v):.4g} (> {tol:.3g}); the cache does not match {model_path}")
    stored = set(old_ids.tolist())
    for i, v in zip(new_ids[:k].tolist(), new_vals[:k].tolist()):
        if i not in stored and v > old_vals[-1] + float(tols[-1]):
            raise KDError(f"{where}: a fresh teacher run ranks id {i} in its top {k} but the cache lacks it; the cache does not "
                          f"match {model_path}")
