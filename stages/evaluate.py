"""Stage 3 — score students on the task and against the teacher, next to what they cost.

Read top to bottom: find the evaluation rows (a targets cache of the split, one built here by
running --teacher once, or the plain labelled split), check that every model fits them (task
type, label set, vocabulary), score the teacher from its cache (it is never run twice), then
stream the rows through each student in batches, keeping running sums of its task metric and
of its agreement with the teacher, and time it on the same fixed sample. metrics.parquet,
report.md and the plot are written next, manifest.json last, after everything it lists.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import __version__, costs, io, manifest, report, scoring
from pipeline import format as fmt
from pipeline import metrics as M
from pipeline.data import Columns, Encoder, load_split, pad_id
from pipeline.errors import KDError
from pipeline.fingerprint import dataset_fingerprint, local_data_files, model_fingerprint, resolve_model_dir, tokenizer_fingerprint
from pipeline.models import has_tokenizer, load_model, load_tokenizer, pick_device, pick_dtype
from pipeline.progress import Progress, say

ARCH_TASKS = {"ForSequenceClassification": "sequence-classification", "ForTokenClassification": "token-classification",
              "ForMaskedLM": "masked-lm", "ForCausalLM": "causal-lm"}
OUTPUTS = ("metrics.parquet", "report.md", "plot.png")
CHUNK_ROWS = 512


@dataclasses.dataclass
class EvalConfig:
    model: list[str]
    out: str
    data: str | None = None
    split: str = "test"
    targets: str | None = None
    teacher: str | None = None
    task_type: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    id_column: str | None = None
    max_length: int | None = None
    top_k: int = 32
    mask_seed: int = 0
    mask_prob: float = 0.15
    batch_size: int = 32
    timing_examples: int = 64
    time_teacher: bool = True
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


@dataclasses.dataclass
class Candidate:
    """A student and what decides whether it fits the rows; `view` is how it reads them:
    stored (the cache's input_ids), retokenise (its own tokenizer on the cache's text) or own
    (it encodes the split itself: no cache)."""

    path: Path
    name: str
    config: object
    tokenizer: object | None
    manifest: dict | None  # a kd train output's manifest
    view: str = "stored"


def run(cfg: EvalConfig) -> dict:
    if not cfg.model:
        raise KDError("name at least one model to evaluate: --model DIR (repeat it for several)")
    if cfg.batch_size < 1 or cfg.timing_examples < 0:
        raise KDError("--batch-size must be at least 1 and --timing-examples at least 0")
    out = Path(cfg.out)
    _check_out(out)
    students = [_candidate(p) for p in cfg.model]
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    notes: list[str] = []

    # 1. The evaluation rows: a cache of the split (given, or built here by running --teacher once) or the split itself.
    cache_dir = Path(cfg.targets) if cfg.targets else None
    if cache_dir is None and cfg.teacher:
        cache_dir = _run_teacher(cfg, out, _task_type(cfg, students, None))
    cache = _open_cache(cache_dir, cfg) if cache_dir else None
    task_type = _task_type(cfg, students, cache and cache["stats"]["task_type"])
    teacher_path = str(cfg.teacher or cache["config"]["model"]) if cache else None
    names = _names([c.path for c in students] + ([teacher_path] if cache else []))
    for c, name in zip(students, names):
        c.name = name
    if cache:
        stats, T = cache["stats"], float(cache["stats"]["temperature"])
        id2label = {int(k): str(v) for k, v in (stats.get("id2label") or {}).items()}
        max_length = cfg.max_length or cache["config"].get("max_length") or 512
        total = min(stats["total_rows"], cfg.limit or stats["total_rows"])
        rows_of = lambda: _cache_rows(cache_dir, cache, cfg.limit)  # noqa: E731  (a fresh pass per model)
        dataset = cols = None
    else:
        if not cfg.data:
            raise KDError("say what to evaluate on: --data (with --split), or --targets CACHE")
        dataset = load_split(cfg.data, cfg.split, cfg.limit)
        cols = Columns.resolve(dataset.column_names, task_type, cfg.text_column, cfg.text_pair_column, cfg.label_column)
        if task_type.endswith("classification") and cols.label is None:
            raise KDError(f"--data {cfg.data!r} has no label column for {task_type}; name it with --label-column")
        id2label, T, max_length, total = _labels(students[0].config), None, cfg.max_length or 512, len(dataset)
        notes.append("No teacher: neither --targets nor --teacher was given, so there is no reference row.")

    # An evaluation of the same models, rows and settings is already complete: nothing to redo.
    key, fps = _eval_key(cfg, students, cache, dataset, cols)
    if (out / manifest.MANIFEST).exists() and io.read_json(out / manifest.MANIFEST).get("key") == key \
            and all((out / n).exists() for n in OUTPUTS):
        say(f"{out} already holds this evaluation (key {key[:12]}); nothing to do")
        table = report.table(pl.read_parquet(out / "metrics.parquet").to_dicts(), task_type)
        return {"out": str(out), "report": str(out / "report.md"), "metrics": str(out / "metrics.parquet"),
                "plot": str(out / "plot.png"), "table": table, "reused": True}

    # 2. Every model must fit those rows: task type (above), label set and vocabulary.
    for c in students:
        c.view = _fit(c, task_type, cache, cache_dir, id2label) if cache else _fit_own(c, task_type, id2label)
        if c.view == "retokenise":
            notes.append(f"`{c.name}` has its own tokenizer: it reads the cache's text, re-tokenised (max length {max_length}).")

    # 3. The teacher, scored from its cache; timed here when its weights are at hand.
    rows = []
    if cache:
        tally = scoring.Tally(task_type, id2label, from_cache=True)
        for window in _windows(rows_of(), CHUNK_ROWS):
            tally.add_cached_teacher(window, T)
        cost, tdir = {}, _teacher_dir(cfg, cache, cache_dir, notes)
        if tdir is not None:
            model = load_model(str(tdir), task_type, dtype=dtype, device=device)
            sample = [r["input_ids"] for r in itertools.islice(rows_of(), cfg.timing_examples)]
            cost = _cost(model, tdir, sample, pad_id(load_tokenizer(str(cache_dir / "tokenizer"))), cfg, device)
            del model
        rows.append(report.metrics_row(names[-1], teacher_path, "teacher", "cache", task_type, tally.result(), cost))
        notes += report.teacher_notes(stats, rows[0])

    # 4. Each student: stream the rows through it in length-sorted batches, then time it on the first rows it read.
    for c in students:
        model = load_model(str(c.path), task_type, dtype=dtype, device=device)
        source = rows_of() if c.view != "own" else _split_rows(dataset, Encoder(
            c.tokenizer, task_type, cols, _max_len(c, max_length), {v: k for k, v in _labels(c.config).items()},
            c.config.num_labels, cfg.mask_seed, cfg.mask_prob, cfg.id_column))
        tally, sample = scoring.Tally(task_type, id2label), []
        progress = Progress(total, f"eval {c.name}", enabled=cfg.progress)
        for window in _windows(source, cfg.batch_size * 8):
            if c.view == "retokenise":
                window = _retokenise(window, c.tokenizer, _max_len(c, max_length))
            sample += [r["input_ids"] for r in window[:cfg.timing_examples - len(sample)]]
            window = sorted(window, key=lambda r: len(r["input_ids"]))
            for b in range(0, len(window), cfg.batch_size):
                batch = window[b:b + cfg.batch_size]
                tally.add_model(batch, _forward(model, batch, c, device), T)
            progress.update(len(window))
        progress.close()
        rows.append(report.metrics_row(c.name, str(c.path), "student", "model", task_type, tally.result(),
                                       _cost(model, c.path, sample, pad_id(c.tokenizer), cfg, device)))
        del model

    # 5. Outputs; manifest.json last, so a directory that has one is complete.
    rows = report.relative(rows)
    (out / manifest.MANIFEST).unlink(missing_ok=True)
    report.write_metrics(out / "metrics.parquet", rows)
    report.plot(out / "plot.png", rows, task_type)
    header = [f"{total} rows of split `{cfg.split}`, {rows[0]['positions']} target positions.",
              f"Teacher `{names[-1]}` is scored from its targets cache `{cache_dir}` (key `{cache['key'][:12]}`, top-{stats['top_k']}, "
              f"T = {T:g}); students are compared with it at T = 1." if cache else f"Evaluated on `{cfg.data}`.",
              f"Costs on {device} ({torch.get_num_threads()} threads, {str(dtype).replace('torch.', '')}): examples/s at batch "
              f"{cfg.batch_size} and p50 latency at batch 1, over the first {min(total, cfg.timing_examples)} rows each model reads."]
    io.write_text(out / "report.md", report.markdown(rows, task_type, header, notes, "plot.png"))
    _write_manifest(out, cfg, key, fps, task_type, students, cache, cache_dir, rows, device, dtype)
    say(f"wrote {out / 'report.md'}, {out / 'metrics.parquet'}, {out / 'plot.png'} and {out / manifest.MANIFEST}")
    return {"out": str(out), "report": str(out / "report.md"), "metrics": str(out / "metrics.parquet"),
            "plot": str(out / "plot.png"), "table": report.table(rows, task_type), "rows": len(rows)}


def _run_teacher(cfg: EvalConfig, out: Path, task_type: str) -> Path:
    """No cache of this split yet: make one with stage 1 (T = 1, kept under OUT/targets for reuse)."""
    from stages.teacher import TeacherConfig, run as run_teacher

    if not cfg.data:
        raise KDError("--teacher without --targets needs --data: the teacher runs on that split here")
    say(f"no --targets: running the teacher once on {cfg.data} [{cfg.split}] into {out / 'targets'}")
    return Path(run_teacher(TeacherConfig(
        model=cfg.teacher, data=cfg.data, split=cfg.split, task_type=task_type, out=str(out / "targets"),
        text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
        id_column=cfg.id_column, max_length=cfg.max_length or 512, top_k=cfg.top_k, temperature=1.0, dtype=cfg.dtype,
        mask_seed=cfg.mask_seed, mask_prob=cfg.mask_prob, task_index=0, num_tasks=1, limit=cfg.limit,
        device=cfg.device, progress=cfg.progress))["out"])


@torch.inference_mode()
def _forward(model, rows: list[dict], c: Candidate, device) -> torch.Tensor:
    """The model's logits at every target position of the batch, [P, outputs] float32 on the CPU."""
    width, limit = max(len(r["input_ids"]) for r in rows), getattr(c.config, "max_position_embeddings", None)
    if limit and width > limit:
        raise KDError(f"{c.path} takes at most {limit} tokens but a row has {width}; evaluate with --max-length {limit} (or a cache built with it)")
    logits = model(**costs.model_inputs([r["input_ids"] for r in rows], pad_id(c.tokenizer), device)).logits
    b = torch.tensor([i for i, r in enumerate(rows) for _ in r["positions"]], dtype=torch.long, device=logits.device)
    if logits.dim() == 2:  # sequence classification: one output per row
        return logits[b].float().cpu()
    p = torch.tensor([p for r in rows for p in r["positions"]], dtype=torch.long, device=logits.device)
    return logits[b, p].float().cpu()


def _cost(model, model_dir: Path, sample: list[list[int]], pad: int, cfg: EvalConfig, device) -> dict:
    speed = costs.measure_speed(model, sample, pad, cfg.batch_size, device)
    return {"params": costs.param_count(model), "disk_bytes": costs.disk_bytes(model_dir),
            "timing_batch_size": cfg.batch_size, **speed}


# --- reading the rows ------------------------------------------------------------------------

def _cache_rows(cache_dir: Path, m: dict, limit: int | None):
    """The cache's rows in order, with the teacher's per-position arrays as numpy."""
    k = int(m["stats"]["top_k"])
    for f in sorted(m["files"], key=lambda f: f["path"]):
        for rb in pq.ParquetFile(cache_dir / f["path"]).iter_batches(batch_size=CHUNK_ROWS):
            cols = {c: rb.column(c).to_pylist() for c in ("row", "text", "input_ids", "labels", "positions")}
            pairs = rb.column("text_pair").to_pylist() if "text_pair" in rb.schema.names else [None] * rb.num_rows
            ids = rb.column("topk_ids").flatten().flatten().to_numpy().reshape(-1, k)
            vals = rb.column("topk_logits").flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
            lse = rb.column("lse").flatten().to_numpy(zero_copy_only=False)
            ends = np.cumsum(pc.list_value_length(rb.column("positions")).to_numpy(zero_copy_only=False))
            for i in range(rb.num_rows):
                if limit is not None and cols["row"][i] >= limit:
                    return
                a, b = (ends[i - 1] if i else 0), ends[i]
                yield {"row": cols["row"][i], "text": cols["text"][i], "text_pair": pairs[i],
                       "input_ids": cols["input_ids"][i], "labels": cols["labels"][i],
                       "positions": cols["positions"][i], "teacher": (ids[a:b], vals[a:b], lse[a:b])}


def _split_rows(dataset, encoder: Encoder):
    for s0 in range(0, len(dataset), CHUNK_ROWS):
        for ex in encoder.encode(dataset[s0:s0 + CHUNK_ROWS], s0):
            yield {"row": ex.row, "input_ids": ex.input_ids, "labels": ex.labels, "positions": ex.positions, "teacher": None}


def _windows(it, size: int):
    it = iter(it)
    while window := list(itertools.islice(it, size)):
        yield window


def _retokenise(window: list[dict], tokenizer, max_length: int) -> list[dict]:
    pairs = [r["text_pair"] for r in window] if window[0].get("text_pair") is not None else None
    enc = tokenizer([r["text"] for r in window], pairs, truncation=True, max_length=max_length)["input_ids"]
    return [{**r, "input_ids": list(ids), "positions": [0]} for r, ids in zip(window, enc)]


# --- checks ----------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    """Never write into another stage's output (an old evaluation is replaced, manifest first)."""
    if (out / manifest.PLAN).exists():
        raise KDError(f"--out {out} holds the output of another kd stage (it has {manifest.PLAN}); choose another --out")
    if (out / manifest.MANIFEST).exists() and (kind := io.read_json(out / manifest.MANIFEST).get("kind")) != "evaluation":
        raise KDError(f"--out {out} holds a {kind!r} output; choose another --out for the evaluation")
    out.mkdir(parents=True, exist_ok=True)


def _candidate(path: str) -> Candidate:
    from transformers import AutoConfig

    d = Path(path)
    if not d.is_dir():
        raise KDError(f"--model {path}: not a directory; pass a model directory (save_pretrained or kd train output)")
    m = None
    if (d / manifest.MANIFEST).exists() or (d / manifest.PLAN).exists():  # a kd output: complete, and a student
        m = manifest.read_manifest(d)
        if m.get("kind") != "student":
            raise KDError(f"--model {path} holds a {m.get('kind')!r} output, not a model; pass a student directory")
    try:
        config = AutoConfig.from_pretrained(d)
    except Exception as exc:
        raise KDError(f"--model {path}: no usable config.json ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tok = load_tokenizer(str(d)) if has_tokenizer(d) else None
    return Candidate(d, d.name or str(d), config, tok, m)


def _names(paths: list) -> list[str]:
    """Short, distinct row names: the directory name, with as many parents as it takes."""
    paths = [Path(p).resolve() for p in paths]
    for depth in range(1, 64):
        names = ["/".join(p.parts[-depth:]) or str(p) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _declared_task(c: Candidate) -> str | None:
    if c.manifest and (c.manifest.get("config") or {}).get("task_type"):
        return c.manifest["config"]["task_type"]
    for arch in getattr(c.config, "architectures", None) or []:
        for suffix, task in ARCH_TASKS.items():
            if arch.endswith(suffix):
                return task
    return None


def _task_type(cfg: EvalConfig, students: list[Candidate], cached: str | None) -> str:
    if cached and cfg.task_type and cfg.task_type != cached:
        raise KDError(f"--task-type {cfg.task_type} but the cache {cfg.targets} holds {cached} targets; drop --task-type or use a {cfg.task_type} cache")
    want = cached or cfg.task_type
    for c in students:
        t = _declared_task(c)
        if t and want and t != want:
            raise KDError(f"{c.path} is a {t} model but this evaluation is {want}; evaluate it against a {t} cache or split")
        want = want or t
    if not want:
        raise KDError("cannot tell the task type from the models' manifests or configs; pass --task-type")
    return want


def _labels(config) -> dict[int, str]:
    return {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}


def _check_labels(c: Candidate, task_type: str, want: dict[int, str], where: str) -> None:
    if not task_type.endswith("classification"):
        return
    got = _labels(c.config)
    if got != want:
        show = lambda d: "[" + ", ".join(d[i] for i in sorted(d)[:8]) + (", …" if len(d) > 8 else "") + f"] ({len(d)})"  # noqa: E731
        raise KDError(f"label set mismatch: {c.path} predicts {show(got)} but {where} has {show(want)}; "
                      f"evaluate against targets with the same labels, in the same order")


def _fit(c: Candidate, task_type: str, cache: dict, cache_dir: Path, id2label: dict) -> str:
    """How a student reads the cache's rows, or a refusal naming what does not fit."""
    _check_labels(c, task_type, id2label, f"the cache {cache_dir}")
    want = cache["fingerprints"]["tokenizer"]
    mine = tokenizer_fingerprint(c.tokenizer) if c.tokenizer is not None else None
    if task_type == "sequence-classification" and mine is not None:
        return "stored" if mine["sha256"] == want["sha256"] else "retokenise"
    if mine is None and getattr(c.config, "vocab_size", None) != want["vocab_size"]:
        raise KDError(f"{c.path} has no tokenizer and a vocabulary of {getattr(c.config, 'vocab_size', '?')}, "
                      f"not the cache's {want['vocab_size']}; save the student's tokenizer with it")
    if mine is not None and mine["vocab_sha256"] != want["vocab_sha256"]:
        raise KDError(f"vocabulary mismatch: {c.path} has a {mine['vocab_size']}-token vocabulary (sha {mine['vocab_sha256'][:12]}) "
                      f"but the cache {cache_dir} was made with {want['vocab_size']} tokens (sha {want['vocab_sha256'][:12]}); "
                      f"{task_type} is scored on the cache's input_ids, so the student needs the teacher's tokenizer")
    outputs = int(cache["stats"]["outputs"])
    if not task_type.endswith("classification") and getattr(c.config, "vocab_size", outputs) < outputs:
        raise KDError(f"vocabulary mismatch: {c.path} predicts {c.config.vocab_size} tokens but the cache's teacher {outputs}; "
                      f"the student needs the teacher's vocabulary")
    return "stored"


def _fit_own(c: Candidate, task_type: str, id2label: dict) -> str:
    if c.tokenizer is None:
        raise KDError(f"{c.path} has no tokenizer files; save its tokenizer with it (or evaluate against a --targets cache)")
    _check_labels(c, task_type, id2label, "the first --model")
    return "own"


def _open_cache(cache_dir: Path, cfg: EvalConfig) -> dict:
    """The cache's manifest, once it is complete, intact in its listing, and of this data and split."""
    m = manifest.read_manifest(cache_dir, kind="targets")
    stats, conf = m["stats"], m["config"]
    gone = [f["path"] for f in m["files"] if not (cache_dir / f["path"]).exists()]
    if gone:
        raise KDError(f"cache {cache_dir} is damaged ({gone[0]} is missing); run `kd verify {cache_dir}` and rebuild it")
    listed = sum(f["rows"] for f in m["files"])
    if listed != stats["total_rows"]:
        raise KDError(f"cache {cache_dir} is incomplete: its shards hold {listed} of {stats['total_rows']} rows; rerun its missing tasks")
    pair = (conf.get("columns") or {}).get("text_pair") is not None
    for f in m["files"]:
        fmt.check_shard(cache_dir / f["path"], stats["task_type"], stats["value_dtype"], pair, m["key"])
    if cfg.split != conf["split"]:
        raise KDError(f"--split {cfg.split} but the cache {cache_dir} holds split {conf['split']!r}; pass --split {conf['split']} or the cache of split {cfg.split}")
    if cfg.data:
        files, theirs = local_data_files(cfg.data), m["fingerprints"]["dataset"].get("source", {}).get("files")
        same = ({p.name: io.sha256_file(p) for p in files} == theirs) if files is not None and theirs is not None \
            else os.path.abspath(cfg.data) == os.path.abspath(conf["data"]) or cfg.data == conf["data"]
        if not same:
            raise KDError(f"--data {cfg.data} is not the data the cache {cache_dir} was built from ({conf['data']}); "
                          f"pass that data, or omit --data, or build a cache of this data")
    return m


def _teacher_dir(cfg: EvalConfig, cache: dict, cache_dir: Path, notes: list[str]) -> Path | None:
    """The teacher's weights for timing, when they are the ones that made the cache."""
    want = cache["fingerprints"]["teacher"]["sha256"]
    if cfg.teacher:  # named by the user: it must be the cache's teacher
        d = resolve_model_dir(cfg.teacher)
        if model_fingerprint(d)["sha256"] != want:
            raise KDError(f"--teacher {cfg.teacher} is not the teacher of cache {cache_dir} (weights or config differ); "
                          f"pass the teacher it was built with ({cache['config']['model']}) or drop --teacher")
    if not cfg.time_teacher:
        notes.append("The teacher was not timed (--no-time-teacher).")
        return None
    if cfg.teacher:
        return d
    d = Path(cache["config"]["model"])
    if not d.is_dir() or model_fingerprint(d)["sha256"] != want:
        notes.append(f"The teacher's weights ({d}) are not here as they were when the cache was built, "
                     f"so its size and speed are not measured; pass --teacher DIR.")
        return None
    return d


def _max_len(c: Candidate, max_length: int) -> int:
    return min(max_length, getattr(c.config, "max_position_embeddings", None) or max_length)


def _eval_key(cfg, students, cache, dataset, cols) -> tuple[str, dict]:
    """The key of everything that decides the results: settings, model weights, rows."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "out")}
    fps = {"models": {str(c.path): model_fingerprint(c.path) for c in students}}
    if cache:
        fps.update(teacher=cache["fingerprints"]["teacher"], dataset=cache["fingerprints"]["dataset"])
    else:
        fps["dataset"] = dataset_fingerprint(cfg.data, cfg.split, dataclasses.asdict(cols), len(dataset), cfg.limit,
                                             getattr(dataset, "_fingerprint", None))
    key = io.sha256_bytes(io.canonical_json({"config": config, "fingerprints": fps,
                                             "targets": cache and cache["key"]}).encode())
    return key, fps


def _write_manifest(out, cfg, key, fps, task_type, students, cache, cache_dir, rows, device, dtype) -> None:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
    upstream = ([{"kind": "targets", "path": str(cache_dir), "key": cache["key"]}] if cache else []) \
        + [{"kind": "student", "path": str(c.path), "key": c.manifest.get("key")} for c in students if c.manifest]
    files = [{"path": n, "rows": len(rows) if n == "metrics.parquet" else None, "bytes": (out / n).stat().st_size,
              "sha256": io.sha256_file(out / n)} for n in OUTPUTS]
    io.write_json(out / manifest.MANIFEST, {
        "kind": "evaluation", "format_version": fmt.FORMAT_VERSION, "key": key, "created_at": manifest.now(),
        "package": {"name": "kd-pipeline", "version": __version__}, "config": config, "fingerprints": fps,
        "upstream": upstream, "num_tasks": 1, "files": files,
        "stats": {"task_type": task_type, "models": len(rows), "rows": rows[0]["rows"] if rows else 0,
                  "device": str(device), "dtype": str(dtype), "torch_threads": torch.get_num_threads(),
                  "summary": [{"name": r["name"], "role": r["role"], r["metric"]: r["value"]} for r in rows]},
    })
