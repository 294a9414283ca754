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
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import format as fmt
from pipeline import io, jobarray, manifest
from pipeline.data import Columns, Encoder, load_split, pad_batch, pad_id, token_budget_batches
from pipeline.errors import KDError
from pipeline.fingerprint import cache_key, dataset_fingerprint, model_fingerprint, resolve_model_dir, tokenizer_fingerprint
from pipeline.models import load_model, load_tokenizer, pick_device, pick_dtype
from pipeline.progress import Progress, say
from pipeline.softtargets import Extractor, check_finite, to_value_dtype


@dataclasses.dataclass
class TeacherConfig:
    model: str
    data: str
    task_type: str
    out: str | None = None
    split: str = "train"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    id_column: str | None = None
    max_length: int = 512
    top_k: int = 32
    temperature: float = 1.0
    dtype: str = "auto"
    value_dtype: str = "float16"
    batch_tokens: int = 16384
    shard_rows: int | None = None
    mask_seed: int = 0
    mask_prob: float = 0.15
    task_index: int | None = None
    num_tasks: int | None = None
    cache_root: str | None = None
    limit: int | None = None
    device: str = "auto"
    progress: bool = True


def run(cfg: TeacherConfig) -> dict:
    t_start = time.monotonic()
    if cfg.task_type not in fmt.TASK_TYPES:
        raise KDError(f"unknown --task-type {cfg.task_type!r}: use one of {', '.join(fmt.TASK_TYPES)}")
    if cfg.temperature <= 0:
        raise KDError(f"--temperature must be positive, got {cfg.temperature}")
    if cfg.top_k < 1:
        raise KDError(f"--top-k must be at least 1, got {cfg.top_k}")
    if not cfg.out and not cfg.cache_root:
        raise KDError("say where the cache goes: --out DIR or --cache-root DIR")
    task_index, num_tasks = jobarray.resolve_task(cfg.task_index, cfg.num_tasks)

    # 1. Inputs, their fingerprints and the cache key (no teacher forward, no weights loaded).
    inp = resolve_inputs(cfg)
    model_dir, tokenizer, mconfig, dataset, cols = inp.model_dir, inp.tokenizer, inp.mconfig, inp.dataset, inp.cols
    id_column, top_k, outputs, fps, key = inp.id_column, inp.top_k, inp.outputs, inp.fingerprints, inp.key

    # 2. Where the cache lives; a complete cache with this key means no teacher work at all.
    out = Path(cfg.cache_root) / key if cfg.cache_root else Path(cfg.out)
    if cfg.cache_root and cfg.out:
        io.replace_symlink(cfg.out, out)
    if (out / manifest.MANIFEST).exists():
        m = manifest.read_manifest(out)
        if m.get("key") != key:
            raise KDError(f"--out {out} holds a different cache (key {m.get('key', '?')[:12]}, this run's key {key[:12]}); "
                          f"choose another --out or use --cache-root")
        gone = [f["path"] for f in m["files"] if not (out / f["path"]).exists()]
        if gone:
            raise KDError(f"cache {out} is damaged ({gone[0]} is missing); run `kd verify {out}` and rebuild it")
        say(f"cache hit: {out} already holds these targets (key {key[:12]}); no teacher work")
        return {"out": str(out), "key": key, "cache_hit": True}

    rows = len(dataset)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)}
    config.update(top_k=top_k, columns=dataclasses.asdict(cols), id_column=id_column)
    plan = {
        "kind": "targets", "key": key, "format_version": fmt.FORMAT_VERSION, "num_tasks": num_tasks,
        "created_at": manifest.now(), "config": config, "fingerprints": fps,
        "stats": {"total_rows": rows, "top_k": top_k, "outputs": outputs, "temperature": cfg.temperature,
                  "task_type": cfg.task_type, "value_dtype": cfg.value_dtype,
                  "id2label": {str(k): v for k, v in (mconfig.id2label or {}).items()}
                  if cfg.task_type.endswith("classification") else None},
    }
    if (out / manifest.PLAN).exists() and task_index in manifest.done_tasks(out):
        manifest.write_plan(out, plan)  # refuses a directory of another cache
        say(f"task {task_index}/{num_tasks} is already complete in {out}; nothing to do")
        return _maybe_finalize(out, key, task_index)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model = load_model(str(model_dir), cfg.task_type, dtype=dtype, device=device)  # refuses a headless teacher
    manifest.write_plan(out, plan)
    _save_tokenizer(tokenizer, out / "tokenizer")
    _clean_own_temporaries(out, task_index)

    # 3. This task's rows, shard by shard.
    start, stop = jobarray.row_range(task_index, num_tasks, rows)
    shard_rows = cfg.shard_rows or (50_000 if cfg.task_type == "sequence-classification" else max(1, 1_000_000 // cfg.max_length))
    label2id = {str(k): int(v) for k, v in (mconfig.label2id or {}).items()}
    encoder = Encoder(tokenizer, cfg.task_type, cols, cfg.max_length, label2id, mconfig.num_labels,
                      cfg.mask_seed, cfg.mask_prob, id_column)
    extractor = Extractor(model, cfg.task_type, top_k, cfg.temperature)
    meta = {"cache_key": key, "task_type": cfg.task_type, "top_k": top_k, "temperature": cfg.temperature,
            "value_dtype": cfg.value_dtype}
    schema = fmt.schema(cfg.task_type, cfg.value_dtype, text_pair=cols.text_pair is not None)
    records, stats = [], {"rows": 0, "positions": 0, "bytes": 0, "truncated_rows": 0, "teacher_seconds": 0.0}
    progress = Progress(stop - start, f"teacher task {task_index}/{num_tasks}", enabled=cfg.progress)
    writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending: list[cf.Future] = []
    try:
        for j, s0 in enumerate(range(start, stop, shard_rows)):
            s1 = min(stop, s0 + shard_rows)
            path = out / "shards" / f"{task_index:05d}-{j:05d}.parquet"
            if _complete_shard(path, key, s0, s1):  # written by an earlier, interrupted run
                records.append(_record_of(path))
                progress.update(s1 - s0)
                continue
            examples = encoder.encode(dataset[s0:s1], s0)
            t0 = time.monotonic()
            launched = _run_teacher(extractor, examples, tokenizer, cfg.batch_tokens, device)
            stats["teacher_seconds"] += time.monotonic() - t0
            pending.append(writer.submit(_write, path, examples, launched, schema, cfg.value_dtype,
                                         {**meta, "rows": f"{s0}-{s1}"}))
            while len(pending) > 1:  # bounded: at most one shard waits while the next one computes
                records.append(pending.pop(0).result())
            progress.update(s1 - s0)
        records += [f.result() for f in pending]
    finally:
        writer.shutdown(wait=True)
        progress.close()
    for r in records:
        stats["truncated_rows"] += r.pop("truncated")
        for k in ("rows", "positions", "bytes"):
            stats[k] += r[k]
    manifest.write_task_record(out, task_index, {
        "key": key, "row_range": [start, stop], "files": [{**r, "path": f"shards/{r['path']}"} for r in records],
        "stats": stats, "wall_seconds": round(time.monotonic() - t_start, 3), "device": str(device), "dtype": str(dtype),
    })
    say(f"task {task_index}/{num_tasks}: rows {start}..{stop} -> {len(records)} shard(s), "
        f"{stats['positions']} positions, {stats['bytes']} bytes")
    return _maybe_finalize(out, key, task_index)


@dataclasses.dataclass
class Inputs:
    """Everything stage 1 knows before loading the teacher's weights."""

    model_dir: Path
    tokenizer: object
    mconfig: object
    dataset: object
    cols: Columns
    id_column: str | None
    top_k: int
    outputs: int
    fingerprints: dict
    key: str


def resolve_inputs(cfg: TeacherConfig) -> Inputs:
    """Resolve model, tokenizer and data, fingerprint them and derive the cache key."""
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(str(model_dir))
    from transformers import AutoConfig

    mconfig = AutoConfig.from_pretrained(model_dir)
    dataset = load_split(cfg.data, cfg.split, cfg.limit)
    cols = Columns.resolve(dataset.column_names, cfg.task_type, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    if cfg.id_column and cfg.id_column not in dataset.column_names:
        raise KDError(f"--id-column {cfg.id_column!r} is not a column of the data (columns: {', '.join(dataset.column_names)})")
    id_column = cfg.id_column or ("id" if "id" in dataset.column_names else None)
    classification = cfg.task_type.endswith("classification")
    outputs = mconfig.num_labels if classification else mconfig.vocab_size
    top_k = min(cfg.top_k, outputs) if classification else cfg.top_k  # exact over C classes
    if top_k > outputs:
        raise KDError(f"--top-k {top_k} is larger than the teacher's vocabulary ({outputs}); use --top-k {outputs} or less")
    fps = {
        "teacher": model_fingerprint(model_dir),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(cfg.data, cfg.split, dataclasses.asdict(cols) | {"id": id_column},
                                       len(dataset), cfg.limit, getattr(dataset, "_fingerprint", None)),
    }
    mask = {"seed": cfg.mask_seed, "prob": cfg.mask_prob} if cfg.task_type == "masked-lm" else None
    key = cache_key(teacher=fps["teacher"], tokenizer=fps["tokenizer"], dataset=fps["dataset"],
                    task_type=cfg.task_type, max_length=cfg.max_length, top_k=top_k,
                    temperature=cfg.temperature, value_dtype=cfg.value_dtype, mask=mask,
                    format_version=fmt.FORMAT_VERSION)
    return Inputs(model_dir, tokenizer, mconfig, dataset, cols, id_column, top_k, outputs, fps, key)


def _run_teacher(extractor, examples, tokenizer, batch_tokens, device):
    """Launch the teacher on every batch of a shard, length-bucketed under the token budget.

    Results come back as device-to-host copies still in flight plus an event: nothing here
    waits for the GPU, so the writer thread (which synchronises on the event) overlaps the
    copies and the Parquet writing with the next shard's forward passes."""
    pad = pad_id(tokenizer)
    launched = []
    for batch in token_budget_batches([len(e.input_ids) for e in examples], batch_tokens):
        ids, att = pad_batch([examples[i].input_ids for i in batch], pad)
        res = extractor(ids.to(device, non_blocking=True), att.to(device, non_blocking=True),
                        [examples[i].positions for i in batch])
        launched.append((batch, *(t.to("cpu", non_blocking=True) for t in res)))
    event = None
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
    return launched, event


def _collect(examples, launched, event):
    """Per example, in input order: (topk_ids [p,k] int32, z/T [p,k] float32, lse [p] float32)."""
    if event is not None:
        event.synchronize()
    results = [None] * len(examples)
    for batch, top_ids, top_vals, lse in launched:
        top_ids, top_vals, lse = top_ids.numpy(), top_vals.float().numpy(), lse.float().numpy()
        owners = [(i, p) for i in batch for p in examples[i].positions]
        check_finite(lse, top_vals, lambda j: (examples[owners[j][0]].row, owners[j][1]))
        offset = 0
        for i in batch:
            p = len(examples[i].positions)
            results[i] = (top_ids[offset:offset + p], top_vals[offset:offset + p], lse[offset:offset + p])
            offset += p
    return results


def _nested(values: np.ndarray, row_counts: list[int], k: int, arrow_type) -> pa.Array:
    """list<list<T>> from a flat [P, k] array and the number of positions of each row."""
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, values.size + 1, k, dtype=np.int32)),
                                     pa.array(values.reshape(-1), type=arrow_type))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(row_counts)]).astype(np.int32)), inner)


def _write(path: Path, examples, launched, schema: pa.Schema, value_dtype: str, meta: dict) -> dict:
    results = _collect(examples, *launched)
    counts = [len(e.positions) for e in examples]
    k = int(meta["top_k"])
    ids = np.concatenate([r[0] for r in results]).reshape(-1, k) if results else np.zeros((0, k), np.int32)
    vals = to_value_dtype(np.concatenate([r[1] for r in results]).reshape(-1, k), value_dtype)
    lse = np.concatenate([r[2] for r in results]).astype(np.float32)
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
        "topk_ids": _nested(ids, counts, k, pa.int32()),
        "topk_logits": _nested(vals, counts, k, vtype),
        "lse": pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), pa.array(lse)),
    })
    table = pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)
    record = fmt.write_shard(path, table, meta)
    record["truncated"] = int(sum(e.truncated for e in examples))
    return record


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
            "truncated": int(pa.compute.sum(t["truncated"].cast(pa.int64())).as_py() or 0)}


def _clean_own_temporaries(out: Path, task_index: int) -> None:
    """Remove this task's leftovers only: other array tasks may be writing right now."""
    for pattern in (f"shards/{io.TMP_MARK}*-{task_index:05d}-*", f"tasks/{io.TMP_MARK}*-{task_index:05d}.json"):
        for p in out.glob(pattern):
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


def _maybe_finalize(out: Path, key: str, task_index: int) -> dict:
    st = manifest.status(out)
    result = {"out": str(out), "key": key, "cache_hit": False, "task_index": task_index, "missing": st["missing"]}
    if not st["missing"] and not st["complete"]:
        manifest.finalize(out)
        say(f"all {st['num_tasks']} task(s) done: wrote {out / manifest.MANIFEST}")
    elif st["missing"]:
        say(f"{len(st['missing'])} task(s) still missing in {out}; the last one to finish writes the manifest")
    result["complete"] = (out / manifest.MANIFEST).exists()
    return result
