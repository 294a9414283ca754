"""Stage 1 — run the teacher once and cache its soft targets.

Read top to bottom: resolve inputs and their fingerprints, derive the cache key, stop early
on a cache hit, claim the output directory, then for this task's contiguous rows: tokenise a
shard's worth of rows, run the teacher on length-bucketed batches under a token budget,
reduce each batch to top-k / logsumexp, and hand the results to a writer thread that
restores row order and writes the shard atomically. The task's completion record is written
last; the last task to finish writes the manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import format as fmt
from pipeline import io, jobarray, layout, manifest, tasks
from pipeline.config import TeacherConfig, recorded
from pipeline.data import Encoder
from pipeline.errors import KDError
from pipeline.inputs import Inputs, resolve_inputs
from pipeline.models import load_model, pick_device, pick_dtype
from pipeline.outputs import StageOutput
from pipeline.progress import Progress, say
from pipeline.softtargets import Extractor, bucket_kl, collect, distinct_draws, launch, sample_seed, to_value_dtype

__all__ = ["TeacherConfig", "resolve_inputs", "run"]
# Where a task's time goes (summed over shards; the manifest sums them over tasks): tokenising,
# launching the teacher, waiting for its results on the host (writer thread), writing Parquet, and
# `compute_seconds`, the union over shards of [launch, results on the host] -- the teacher's share
# of the wall time. `loop_seconds` is all of it; bench/bench_teacher.py reads these.
TIMINGS = ("encode_seconds", "teacher_seconds", "collect_seconds", "write_seconds", "compute_seconds", "loop_seconds")


def run(cfg: TeacherConfig) -> dict:
    t_start = time.monotonic()
    cfg = cfg.resolved()  # temperature = the grid's first T; temperatures = the grid, or None for one T
    _check(cfg)
    task_index, num_tasks = jobarray.resolve_task(cfg.task_index, cfg.num_tasks)

    # 1. Inputs, their fingerprints and the cache key (no teacher forward, no weights loaded).
    inp = resolve_inputs(cfg)
    cfg = dataclasses.replace(cfg, max_length=inp.max_length)  # capped at the teacher's positions

    # 2. Where the cache lives; a complete cache with this key means no teacher work at all.
    out = Path(cfg.cache_root) / inp.key if cfg.cache_root else Path(cfg.out)
    if cfg.cache_root and out.is_symlink():  # the root holds kd's own directories: this one was planted
        raise KDError(f"{out} is a symlink; a --cache-root holds real directories only: remove it and rerun")
    if cfg.cache_root and cfg.out:
        io.replace_symlink(cfg.out, out)
    output = StageOutput(out, "targets", inp.key, num_tasks)
    if output.existing() is not None:
        say(f"cache hit: {out} already holds these targets (key {inp.key[:12]}); no teacher work")
        return {"out": str(out), "key": inp.key, "reused": True}
    plan = _plan(cfg, inp)
    if (out / manifest.PLAN).exists() and task_index in manifest.done_tasks(out):
        with output.claimed(plan, task_index):  # refuses a directory of another cache
            say(f"task {task_index}/{num_tasks} is already complete in {out}; nothing to do")
        return _finish(output, task_index)

    # 3. The teacher, then the claim: nothing is written before the weights have loaded.
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model = load_model(str(inp.model_dir), cfg.task_type, dtype=dtype, device=device)  # refuses a headless teacher
    start, stop = jobarray.row_range(task_index, num_tasks, len(inp.dataset))
    with output.claimed(plan, task_index):
        _save_tokenizer(inp.tokenizer, out / "tokenizer")
        _clean_own_leftovers(out, task_index, _shard_count(cfg, stop - start))

        # 4. This task's rows, shard by shard; its completion record last.
        t_loop = time.monotonic()
        records, stats = _extract(cfg, inp, model, device, out, task_index, num_tasks, (start, stop))
        stats["loop_seconds"] = round(time.monotonic() - t_loop, 3)  # tokenise + teacher + write: what bench_teacher times
        output.task_done(task_index, {
            "row_range": [start, stop], "files": [{**r, "path": f"shards/{r['path']}"} for r in records],
            "stats": stats, "wall_seconds": round(time.monotonic() - t_start, 3), "device": str(device), "dtype": str(dtype),
        })
    say(f"task {task_index}/{num_tasks}: rows {start}..{stop} -> {len(records)} shard(s), "
        f"{stats['positions']} positions, {stats['bytes']} bytes")
    return _finish(output, task_index)


def _check(cfg: TeacherConfig) -> None:
    tasks.get(cfg.task_type)
    if not math.isfinite(cfg.temperature) or cfg.temperature <= 0:
        raise KDError(f"--temperature must be a positive finite number, got {cfg.temperature}")
    if cfg.top_k < 1:
        raise KDError(f"--top-k must be at least 1, got {cfg.top_k}")
    if cfg.max_length < 2:
        raise KDError(f"--max-length must be at least 2 (room for the special tokens), got {cfg.max_length}")
    if not (math.isfinite(cfg.mask_prob) and 0.0 < cfg.mask_prob <= 1.0):
        raise KDError(f"--mask-prob must be in (0, 1], got {cfg.mask_prob}")
    for name in ("batch_tokens", "shard_rows"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise KDError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not cfg.out and not cfg.cache_root:
        raise KDError("say where the cache goes: --out DIR or --cache-root DIR")


def _plan(cfg: TeacherConfig, inp: Inputs) -> dict:
    """What plan.json (and then the manifest) records: settings, fingerprints, fixed statistics."""
    task = tasks.get(cfg.task_type)
    config = {**recorded(cfg)}
    config.update(top_k=inp.top_k, columns=dataclasses.asdict(inp.cols), id_column=inp.id_column)
    id2label = {str(k): v for k, v in (inp.mconfig.id2label or {}).items()} if task.classification else None
    return {"config": config, "fingerprints": inp.fingerprints,
            "format_version": fmt.version_of(cfg.value_dtype, "sampled" if inp.sampling else "topk"),
            "stats": {"total_rows": len(inp.dataset), "top_k": inp.top_k, "outputs": inp.outputs,
                      "temperature": cfg.temperature, "task_type": cfg.task_type, "value_dtype": cfg.value_dtype,
                      "id2label": id2label, **({"vocab_limit": inp.vocab_limit} if inp.vocab_limit else {}),
                      **({"temperatures": cfg.temperatures} if cfg.temperatures else {}),
                      **({"target_mode": "sampled", "samples": inp.sampling["samples"],
                          "sample_seed": inp.sampling["seed"]} if inp.sampling else {})}}


def _extract(cfg: TeacherConfig, inp: Inputs, model, device, out: Path, task_index: int, num_tasks: int,
             rows: tuple[int, int]) -> tuple[list[dict], dict]:
    """Tokenise, run and write this task's rows shard by shard; a writer thread writes shard j
    while the teacher computes shard j + 1. Shards of an interrupted run are kept."""
    start, stop = rows
    task = tasks.get(cfg.task_type)
    shard_rows = cfg.shard_rows or task.default_shard_rows(cfg.max_length)
    label2id = {str(k): int(v) for k, v in (inp.mconfig.label2id or {}).items()}
    encoder = Encoder(inp.tokenizer, cfg.task_type, inp.cols, cfg.max_length, label2id, inp.mconfig.num_labels,
                      cfg.mask_seed, cfg.mask_prob, inp.id_column)
    samples = inp.sampling["samples"] if inp.sampling else None
    extractor = Extractor(model, cfg.task_type, inp.top_k, cfg.temperature, vocab_limit=inp.vocab_limit,
                          profile=cfg.profile, grid=cfg.temperatures, samples=samples, seed=sample_seed(inp.key))
    meta = {"cache_key": inp.key, "task_type": cfg.task_type, "temperature": cfg.temperature, "value_dtype": cfg.value_dtype,
            **({"top_k": inp.top_k} if samples is None else {"target_mode": "sampled", "samples": samples}),
            **({"temperatures": ",".join(map(str, cfg.temperatures))} if cfg.temperatures else {})}
    schema = fmt.schema(cfg.task_type, cfg.value_dtype, text_pair=inp.cols.text_pair is not None,
                        lse_grid=bool(cfg.temperatures), target_mode="sampled" if samples else "topk")
    records, stats = [], {"rows": 0, "positions": 0, "bytes": 0, "truncated_rows": 0, **{t: 0.0 for t in TIMINGS}}
    progress = Progress(stop - start, f"teacher task {task_index}/{num_tasks}", enabled=cfg.progress)
    writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending: list[cf.Future] = []
    try:
        for j, s0 in enumerate(range(start, stop, shard_rows)):
            s1 = min(stop, s0 + shard_rows)
            path = out / "shards" / f"{task_index:05d}-{j:05d}.parquet"
            if _complete_shard(path, inp.key, s0, s1):  # written by an earlier, interrupted run
                records.append(_record_of(path))
                progress.update(s1 - s0)
                continue
            t0 = time.monotonic()
            examples = encoder.encode(inp.dataset[s0:s1], s0)
            t1 = time.monotonic()
            launched = launch(extractor, examples, inp.tokenizer, cfg.batch_tokens, device)
            stats["encode_seconds"] += t1 - t0
            stats["teacher_seconds"] += time.monotonic() - t1
            pending.append(writer.submit(_write, path, examples, launched, schema, cfg.value_dtype,
                                         {**meta, "rows": f"{s0}-{s1}"}, t1, inp.outputs))
            while len(pending) > 1:  # bounded: at most one shard waits while the next one computes
                records.append(pending.pop(0).result())
            progress.update(s1 - s0)
        records += [f.result() for f in pending]
    finally:
        writer.shutdown(wait=True)
        progress.close()
    spans = []
    for r in records:
        stats["truncated_rows"] += r.pop("truncated")
        spans.append(r.pop("span"))
        for k in ("rows", "positions", "bytes", "collect_seconds", "write_seconds"):
            stats[k] += r.pop(k) if k.endswith("_seconds") else r[k]
        if "stored_kl_sum" in r:  # top-k shards written now (not kept from a killed run): what storing cost
            for k in ("stored_kl_sum", "stored_kl_positions"):
                stats[k] = stats.get(k, 0) + r.pop(k)
            stats["stored_kl_max"] = max(stats.get("stored_kl_max", 0.0), r.pop("stored_kl_max"))
    stats["compute_seconds"] = _union(spans)
    if extractor.profile is not None:
        stats.update(extractor.profile)
    return records, {k: round(v, 3) if isinstance(v, float) and not k.startswith("stored_kl") else v for k, v in stats.items()}


def _write(path: Path, examples, launched, schema: pa.Schema, value_dtype: str, meta: dict, launched_at: float,
           outputs: int) -> dict:
    t0 = time.monotonic()
    results = collect(examples, *launched)
    t1 = time.monotonic()
    counts = [len(e.positions) for e in examples]
    k = int(meta.get("top_k") or meta["samples"])  # a sampled cache: M draws per position, deduplicated below
    ids = np.concatenate([r[0] for r in results]).reshape(-1, k) if results else np.zeros((0, k), np.int32)
    exact = np.concatenate([r[1] for r in results]).reshape(-1, k) if results else np.zeros((0, k), np.float32)
    lse = np.concatenate([r[2] for r in results]).astype(np.float32)
    grid, lse = (lse, np.ascontiguousarray(lse[:, 0])) if lse.ndim == 2 else (None, lse)  # a grid: lse at every T, [:, 0] at T0
    vtype = fmt.VALUE_DTYPES[value_dtype]
    columns = {
        "row": pa.array([e.row for e in examples], pa.int64()),
        "id": pa.array([e.id for e in examples], pa.string()),
        "text": pa.array([e.text for e in examples], schema.field("text").type),
    }
    if "text_pair" in schema.names:
        columns["text_pair"] = pa.array([e.text_pair for e in examples], pa.string())
    columns.update({
        "input_ids": pa.array([e.input_ids for e in examples], schema.field("input_ids").type),
        "labels": pa.array([e.labels for e in examples], schema.field("labels").type),
        "truncated": pa.array([e.truncated for e in examples], pa.bool_()),
        "positions": pa.array([e.positions for e in examples], schema.field("positions").type),
        "lse": pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), pa.array(lse)),
    })
    layout_meta = None
    if "samples" in meta:  # sample_logits: float16 for code (its values only report the KL), else as asked
        columns.update(_sampled_columns(ids, to_value_dtype(exact, "float16" if value_dtype == "code" else value_dtype),
                                        counts, vtype))
    elif value_dtype == "code":  # format 2 (pipeline.layout); lse stays the exact float32, no float16 copy is made
        coded, layout_meta = layout.encode(ids, exact, lse, vocab_size=outputs)
        columns.update(layout.to_arrow(coded, counts, k))
        stored = layout.decode(coded, layout_meta)[1]
    else:
        stored = to_value_dtype(exact, value_dtype)
        columns.update({"topk_ids": fmt.nested(ids, counts, k, pa.int32()), "topk_logits": fmt.nested(stored, counts, k, vtype)})
    if grid is not None:
        columns["lse_grid"] = fmt.nested(np.ascontiguousarray(grid), counts, grid.shape[1], pa.float32())
    table = pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)
    record = fmt.write_shard(path, table, meta, layout_meta)
    record["truncated"] = int(sum(e.truncated for e in examples))
    if "samples" not in meta:  # what storing cost: KL(float32 top-k || as stored), kd inspect's fidelity
        kl = bucket_kl(exact - lse[:, None], stored.astype(np.float32) - lse[:, None], exact_tail=k < outputs)
        record.update(stored_kl_sum=float(kl.sum()), stored_kl_max=float(kl.max(initial=0.0)), stored_kl_positions=len(kl))
    record.update(collect_seconds=t1 - t0, write_seconds=time.monotonic() - t1, span=(launched_at, t1))
    return record


def _sampled_columns(draws: np.ndarray, values: np.ndarray, counts: list[int], vtype) -> dict:
    """sample_ids / sample_counts / sample_logits from [P, M] draws: per position, the distinct ids in
    ascending order, how often each was drawn and their z/T (pipeline.format)."""
    width, ids, hits, vals = distinct_draws(draws, values)
    return {"sample_ids": fmt.nested(ids, counts, width, pa.int32()), "sample_counts": fmt.nested(hits, counts, width, pa.uint16()),
            "sample_logits": fmt.nested(vals, counts, width, vtype)}


def _union(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of [start, end] intervals (shards' computations may overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(s for s in spans if s is not None):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _complete_shard(path: Path, key: str, s0: int, s1: int) -> bool:
    if not path.exists():
        return False
    try:
        md = fmt.file_metadata(path)
    except Exception:
        path.unlink()  # unreadable leftovers are recomputed
        return False
    return md.get("cache_key") == key and md.get("rows") == f"{s0}-{s1}"


def _record_of(path: Path) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["positions", "truncated"])
    return {"path": path.name, "rows": t.num_rows,
            "positions": int(pa.compute.sum(pa.compute.list_value_length(t["positions"])).as_py() or 0),
            "bytes": path.stat().st_size, "sha256": io.sha256_file(path),
            "truncated": int(pa.compute.sum(t["truncated"].cast(pa.int64())).as_py() or 0),
            "collect_seconds": 0.0, "write_seconds": 0.0, "span": None}


def _shard_count(cfg: TeacherConfig, rows: int) -> int:
    return -(-rows // (cfg.shard_rows or tasks.get(cfg.task_type).default_shard_rows(cfg.max_length)))


def _clean_own_leftovers(out: Path, task_index: int, shards: int) -> None:
    """Remove this task's leftovers only (other array tasks may be writing right now): the
    temporaries of a killed run, and shards its plan does not own -- an interrupted run with
    another --shard-rows cut the rows into other shards, and `pq.read_table(OUT/shards)`
    would read both."""
    for pattern in (f"shards/{io.TMP_MARK}*-{task_index:05d}-*", f"tasks/{io.TMP_MARK}*-{task_index:05d}.json"):
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)
    own = {f"{task_index:05d}-{j:05d}.parquet" for j in range(shards)}
    for p in out.glob(f"shards/{task_index:05d}-*.parquet"):
        if p.name not in own:
            p.unlink(missing_ok=True)


def _save_tokenizer(tokenizer, dest: Path) -> None:
    """A copy of the teacher's tokenizer, so students and `kd eval` can decode the cache."""
    if dest.exists():
        return
    tmp = io.tmp_name(dest)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:  # another task got there first
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(output: StageOutput, task_index: int) -> dict:
    st = output.finish()
    if st["complete"]:
        say(f"all {st['num_tasks']} task(s) done: {output.out / manifest.MANIFEST} is written")
    else:
        say(f"{len(st['missing'])} task(s) still missing in {output.out}; the last one to finish writes the manifest")
    return {"out": str(output.out), "key": output.key, "reused": False, "task_index": task_index,
            "missing": st["missing"], "complete": st["complete"]}
