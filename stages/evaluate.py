"""Stage 3 — score students on the task and against the teacher, next to what they cost.

Read top to bottom: find the evaluation rows (a targets cache of the split, one built here by
running --teacher once, or the plain labelled split), check that every model fits them (task
type, label set, vocabulary), score the teacher from its cache (it is never run twice), then
stream the rows through each student in batches, keeping running sums of its task metric and
of its agreement with the teacher, and time it on the same fixed sample. Each student is then
compared with every other model on the same rows (pipeline.uncertainty). metrics.parquet,
comparisons.parquet, report.md and the plot are written next, manifest.json last, after everything it lists.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import polars as pl
import torch

from pipeline import costs, io, manifest, report, scoring, tasks, uncertainty
from pipeline import format as fmt
from pipeline.config import EvalConfig, recorded, result_settings
from pipeline.data import Columns, Encoder, load_split, pad_id
from pipeline.errors import KDError
from pipeline.fingerprint import dataset_fingerprint, local_data_files, model_fingerprint, resolve_model_dir, split_is_named
from pipeline.fit import check_labels, fit
from pipeline.models import capped_length, has_tokenizer, load_config, load_model, load_tokenizer, pick_device, pick_dtype
from pipeline.outputs import StageOutput
from pipeline.progress import Progress, say

__all__ = ["EvalConfig", "run"]
OUTPUTS = ("metrics.parquet", "comparisons.parquet", "report.md", "plot.png")
CHUNK_ROWS = 512


@dataclasses.dataclass
class Candidate:
    """A student and what decides whether it fits the rows; `view` is how it reads them:
    ids (the cache's input_ids), retokenize (its own tokenizer on the cache's text) or own
    (it encodes the split itself: no cache); `vocab_limit` as in pipeline.fit."""

    path: Path
    name: str
    config: object
    tokenizer: object | None
    manifest: dict | None  # a kd train output's manifest
    view: str = "ids"
    vocab_limit: int | None = None


@dataclasses.dataclass
class Split:
    """The rows under evaluation and what is known of them: a targets cache of the split, or the split itself."""

    task_type: str
    id2label: dict[int, str]
    temperature: float | None   # the cache's T (None: no cache, no teacher)
    max_length: int
    total: int
    cache: dict | None = None   # the cache's manifest
    cache_dir: Path | None = None
    dataset: object = None      # without a cache: the datasets split and its columns
    cols: Columns | None = None
    limit: int | None = None
    name: str = "test"          # the split's name: the cache's, else --split

    def rows(self):
        """A fresh pass over the cache's rows (one per model)."""
        return scoring.cache_rows(self.cache_dir, self.cache, self.limit, CHUNK_ROWS)


def run(cfg: EvalConfig) -> dict:
    if not cfg.model:
        raise KDError("name at least one model to evaluate: --model DIR (repeat it for several)")
    if cfg.batch_size < 1 or cfg.timing_examples < 0 or cfg.bootstrap < 0:
        raise KDError("--batch-size must be at least 1, --timing-examples and --bootstrap at least 0")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise KDError(f"--max-length must be at least 2 (room for the special tokens), got {cfg.max_length}")
    out = Path(cfg.out)
    StageOutput(out, "evaluation", "").refuse_other_kind()  # before a teacher runs into OUT/targets
    students = [_candidate(p) for p in cfg.model]
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    notes: list[str] = []

    # 1. The evaluation rows: a cache of the split (given, or built here by running --teacher once) or the split itself.
    split = _split(cfg, out, students, notes)
    teacher_path = str(cfg.teacher or split.cache["config"]["model"]) if split.cache else None
    names = _names([c.path for c in students] + ([teacher_path] if split.cache else []))
    for c, name in zip(students, names):
        c.name = name

    # An evaluation of the same models, rows and settings is already complete: nothing to redo.
    key, fps = _eval_key(cfg, students, split)
    output = StageOutput(out, "evaluation", key, replace=True)
    if output.existing() is not None:
        say(f"{out} already holds this evaluation (key {key[:12]}); nothing to do")
        table = report.table(pl.read_parquet(out / "metrics.parquet").to_dicts(), split.task_type)
        return {"out": str(out), "report": str(out / "report.md"), "metrics": str(out / "metrics.parquet"),
                "plot": str(out / "plot.png"), "table": table, "reused": True}

    # 2. Every model must fit those rows: task type (above), label set and vocabulary.
    for c in students:
        if split.cache:
            how = fit(split.task_type, c.config, c.tokenizer, split.cache, str(c.path), f"the cache {split.cache_dir}")
            c.view, c.vocab_limit = how.mode, how.vocab_limit
        else:
            c.view = _fit_own(c, split.task_type, split.id2label)
        if c.view == "retokenize":
            notes.append(f"`{c.name}` has its own tokenizer: it reads the cache's text, re-tokenised (max length {split.max_length}).")

    # 3. The teacher, scored from its cache (timed here when its weights are at hand); 4. each student.
    rows = [_score_teacher(cfg, split, names[-1], teacher_path, notes, device, dtype)] if split.cache else []
    rows += [_score_student(cfg, split, c, device, dtype) for c in students]

    # 5. Outputs; manifest.json last, so a directory that has one is complete.
    rows = report.relative(rows)
    task = tasks.get(split.task_type)  # McNemar where each row is one labelled pair (pipeline.uncertainty)
    comparisons = uncertainty.compare(rows, cfg.bootstrap, task.classification and task.hard_labels == "row")
    with output.claimed({"config": recorded(cfg), "fingerprints": fps, "upstream": _upstream(split, students)}):
        report.write_metrics(out / "metrics.parquet", rows)
        report.write_comparisons(out / "comparisons.parquet", comparisons)
        report.plot(out / "plot.png", rows, split.task_type)
        io.write_text(out / "report.md", report.markdown(rows, split.task_type, _header(cfg, split, names, rows, device, dtype),
                                                         notes, "plot.png", comparisons))
        counts = {"metrics.parquet": len(rows), "comparisons.parquet": len(comparisons)}
        files = [{**f, "rows": counts.get(f["path"])} for f in output.file_records(OUTPUTS)]
        output.complete(files, {"task_type": split.task_type, "models": len(rows), "rows": rows[0]["rows"] if rows else 0,
                                "device": str(device), "dtype": str(dtype), "torch_threads": torch.get_num_threads(),
                                "summary": [{"name": r["name"], "role": r["role"], r["metric"]: r["value"]} for r in rows]})
    say(f"wrote {out / 'report.md'}, {out / 'metrics.parquet'}, {out / 'comparisons.parquet'}, {out / 'plot.png'} and "
        f"{out / manifest.MANIFEST}")
    return {"out": str(out), "report": str(out / "report.md"), "metrics": str(out / "metrics.parquet"),
            "plot": str(out / "plot.png"), "table": report.table(rows, split.task_type), "rows": len(rows)}


def _split(cfg: EvalConfig, out: Path, students: list, notes: list[str]) -> Split:
    cache_dir = Path(cfg.targets) if cfg.targets else None
    if cache_dir is None and cfg.teacher:
        cache_dir = _run_teacher(cfg, out, _task_type(cfg, students, None))
    cache = _open_cache(cache_dir, cfg) if cache_dir else None
    task_type = _task_type(cfg, students, cache and cache["stats"]["task_type"])
    if cache:
        stats = cache["stats"]
        return Split(task_type, {int(k): str(v) for k, v in (stats.get("id2label") or {}).items()},
                     float(stats["temperature"]), cfg.max_length or cache["config"].get("max_length") or 512,
                     min(stats["total_rows"], cfg.limit or stats["total_rows"]), cache, cache_dir, limit=cfg.limit,
                     name=cache["config"]["split"])
    if not cfg.data:
        raise KDError("say what to evaluate on: --data (with --split), or --targets CACHE")
    dataset = load_split(cfg.data, cfg.split, cfg.limit, cfg.encoding)
    cols = Columns.resolve(dataset.column_names, task_type, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    if tasks.get(task_type).classification and cols.label is None:
        raise KDError(f"--data {cfg.data!r} has no label column for {task_type}; name it with --label-column")
    notes.append("No teacher: neither --targets nor --teacher was given, so there is no reference row.")
    return Split(task_type, _labels(students[0].config), None, cfg.max_length or 512, len(dataset),
                 dataset=dataset, cols=cols, limit=cfg.limit, name=cfg.split)


def _score_teacher(cfg: EvalConfig, split: Split, name: str, path: str, notes: list[str], device, dtype) -> dict:
    tally = scoring.Tally(split.task_type, split.id2label, from_cache=True)
    for window in _windows(split.rows(), CHUNK_ROWS):
        tally.add_cached_teacher(window, split.temperature)
    cost, tdir = {}, _teacher_dir(cfg, split.cache, split.cache_dir, notes)
    if tdir is not None:
        model = load_model(str(tdir), split.task_type, dtype=dtype, device=device)
        sample = [r["input_ids"] for r in itertools.islice(split.rows(), cfg.timing_examples)]
        cost = _cost(model, tdir, sample, pad_id(load_tokenizer(str(split.cache_dir / "tokenizer"))), cfg, device)
    row = report.metrics_row(name, path, "teacher", "cache", split.task_type, tally.result(), cost)
    notes += report.teacher_notes(split.cache["stats"], row)
    return {**row, "per_row": tally.per_row()}


def _score_student(cfg: EvalConfig, split: Split, c: Candidate, device, dtype) -> dict:
    """Stream the rows through the student in length-sorted batches, then time it on the first rows it read."""
    model = load_model(str(c.path), split.task_type, dtype=dtype, device=device)
    max_length = capped_length(split.max_length, c.config, c.tokenizer, f"--model {c.path}")
    source = split.rows() if c.view != "own" else _split_rows(split.dataset, Encoder(
        c.tokenizer, split.task_type, split.cols, max_length, {v: k for k, v in _labels(c.config).items()},
        c.config.num_labels, cfg.mask_seed, cfg.mask_prob, cfg.id_column))
    tally, sample = scoring.Tally(split.task_type, split.id2label), []
    progress = Progress(split.total, f"eval {c.name}", enabled=cfg.progress)
    for window in _windows(source, cfg.batch_size * 8):
        if c.view == "retokenize":
            window = _retokenize(window, c.tokenizer, max_length)
        sample += [r["input_ids"] for r in window[:cfg.timing_examples - len(sample)]]
        window = sorted(window, key=lambda r: len(r["input_ids"]))
        for b in range(0, len(window), cfg.batch_size):
            batch = window[b:b + cfg.batch_size]
            tally.add_model(batch, _forward(model, batch, c, device), split.temperature)
        progress.update(len(window))
    progress.close()
    return {**report.metrics_row(c.name, str(c.path), "student", "model", split.task_type, tally.result(),
                                 _cost(model, c.path, sample, pad_id(c.tokenizer), cfg, device)), "per_row": tally.per_row()}


def _header(cfg: EvalConfig, split: Split, names: list[str], rows: list[dict], device, dtype) -> list[str]:
    cache = split.cache
    return [f"{split.total} rows of split `{split.name}`, {rows[0]['positions']} target positions.",
            f"Teacher `{names[-1]}` is scored from its targets cache `{split.cache_dir}` (key `{cache['key'][:12]}`, "
            f"top-{cache['stats']['top_k']}, T = {split.temperature:g}); students are compared with it at T = 1."
            if cache else f"Evaluated on `{cfg.data}`.",
            f"Costs on {device} ({torch.get_num_threads()} threads, {str(dtype).replace('torch.', '')}): examples/s at batch "
            f"{cfg.batch_size} and p50 latency at batch 1, over the first {min(split.total, cfg.timing_examples)} rows each "
            f"model reads."]


def _run_teacher(cfg: EvalConfig, out: Path, task_type: str) -> Path:
    """No cache of this split yet: make one with stage 1 (T = 1, kept under OUT/targets for reuse)."""
    from stages.teacher import TeacherConfig, run as run_teacher

    if not cfg.data:
        raise KDError("--teacher without --targets needs --data: the teacher runs on that split here")
    say(f"no --targets: running the teacher once on {cfg.data} [{cfg.split}] into {out / 'targets'}")
    return Path(run_teacher(TeacherConfig(
        model=cfg.teacher, data=cfg.data, split=cfg.split, encoding=cfg.encoding, task_type=task_type, out=str(out / "targets"),
        text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
        id_column=cfg.id_column, max_length=cfg.max_length or 512, top_k=cfg.top_k, temperature=1.0, dtype=cfg.dtype,
        mask_seed=cfg.mask_seed, mask_prob=cfg.mask_prob, task_index=0, num_tasks=1, limit=cfg.limit,
        device=cfg.device, progress=cfg.progress))["out"])


@torch.inference_mode()
def _forward(model, rows: list[dict], c: Candidate, device) -> torch.Tensor:
    """The model's logits at every target position of the batch, [P, outputs] float32 on the CPU."""
    width, limit = max(len(r["input_ids"]) for r in rows), getattr(c.config, "max_position_embeddings", None)
    if limit and width > limit:
        raise KDError(f"{c.path} takes at most {limit} tokens but a row has {width}; evaluate with --max-length {limit} (or a cache "
                      f"built with it)")
    logits = model(**costs.model_inputs([r["input_ids"] for r in rows], pad_id(c.tokenizer), device)).logits
    if c.vocab_limit is not None:  # a padded vocabulary: the padding ids are impossible (pipeline.fit)
        logits = logits[..., :c.vocab_limit]
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

def _split_rows(dataset, encoder: Encoder):
    for s0 in range(0, len(dataset), CHUNK_ROWS):
        for ex in encoder.encode(dataset[s0:s0 + CHUNK_ROWS], s0):
            yield {"row": ex.row, "input_ids": ex.input_ids, "labels": ex.labels, "positions": ex.positions, "teacher": None}


def _windows(it, size: int):
    it = iter(it)
    while window := list(itertools.islice(it, size)):
        yield window


def _retokenize(window: list[dict], tokenizer, max_length: int) -> list[dict]:
    pairs = [r["text_pair"] for r in window] if window[0].get("text_pair") is not None else None
    enc = tokenizer([r["text"] for r in window], pairs, truncation=True, max_length=max_length)["input_ids"]
    return [{**r, "input_ids": list(ids), "positions": [0]} for r, ids in zip(window, enc)]


# --- checks ----------------------------------------------------------------------------------

def _candidate(path: str) -> Candidate:
    d = Path(path)
    if not d.is_dir():
        raise KDError(f"--model {path}: not a directory; pass a model directory (save_pretrained or kd train output)")
    m = None
    if (d / manifest.MANIFEST).exists() or (d / manifest.PLAN).exists():  # a kd output: complete, and a student
        m = manifest.read_manifest(d)
        if m.get("kind") != "student":
            raise KDError(f"--model {path} holds a {m.get('kind')!r} output, not a model; pass a student directory")
        problems = manifest.verify_files(d, m)  # its weights, as trained: a flipped bit must not become a score
        if problems:
            raise KDError(f"--model {path} is damaged ({problems[0]}); retrain it or restore its files")
    config = load_config(d)
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
    return tasks.of_architecture(c.config)


def _task_type(cfg: EvalConfig, students: list[Candidate], cached: str | None) -> str:
    if cached and cfg.task_type and cfg.task_type != cached:
        raise KDError(f"--task-type {cfg.task_type} but the cache {cfg.targets} holds {cached} targets; drop --task-type or use a "
                      f"{cfg.task_type} cache")
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


def _fit_own(c: Candidate, task_type: str, id2label: dict) -> str:
    if c.tokenizer is None:
        raise KDError(f"{c.path} has no tokenizer files; save its tokenizer with it (or evaluate against a --targets cache)")
    if tasks.get(task_type).classification:
        check_labels(c.config, [id2label[i] for i in sorted(id2label)], task_type, str(c.path), "the first --model")
    return "own"


def _open_cache(cache_dir: Path, cfg: EvalConfig) -> dict:
    """The cache's manifest, once it is complete, intact in its listing, and of this data and split."""
    m = manifest.read_cache(cache_dir)
    stats, conf = m["stats"], m["config"]
    if fmt.target_mode(stats) != "topk":  # the teacher's argmax and tail are what its row is scored from
        raise KDError(f"--targets {cache_dir} holds sampled targets, and kd eval scores the teacher from a top-k cache; give "
                      f"--teacher MODEL --data SPLIT instead (the teacher then runs once on the split here)")
    gone = [f["path"] for f in m["files"] if not manifest.path_of(cache_dir, f["path"]).exists()]
    if gone:
        raise KDError(f"cache {cache_dir} is damaged ({gone[0]} is missing); run `kd verify {cache_dir}` and rebuild it")
    problems = manifest.verify_files(cache_dir, m)  # sizes and sha256: a flipped bit must not become a score
    if problems:
        raise KDError(f"cache {cache_dir} is damaged ({problems[0]}); run `kd verify {cache_dir}` and rebuild it")
    listed = sum(f["rows"] for f in m["files"])
    if listed != stats["total_rows"]:
        raise KDError(f"cache {cache_dir} is incomplete: its shards hold {listed} of {stats['total_rows']} rows; rerun its missing tasks")
    pair = (conf.get("columns") or {}).get("text_pair") is not None
    for f in m["files"]:
        fmt.check_shard(manifest.path_of(cache_dir, f["path"]), stats["task_type"], stats["value_dtype"], pair, m["key"],
                        lse_grid=bool(stats.get("temperatures")))  # a grid cache: its T = 1 lse may be read
    # --split picks the rows of --data only where the data has named splits (a local file's are all of it,
    # under whatever name `datasets` was handed); without --data the split is the cache's.
    if cfg.data and cfg.split != conf["split"] and split_is_named(cfg.data, m["fingerprints"]["dataset"].get("source", {})):
        raise KDError(f"--split {cfg.split} but the cache {cache_dir} holds split {conf['split']!r}; pass --split {conf['split']} or the "
                      f"cache of split {cfg.split}")
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


def _eval_key(cfg, students, split: Split) -> tuple[str, dict]:
    """The key of everything that decides the results: settings, model weights, rows."""
    config = result_settings(cfg)
    fps = {"models": {str(c.path): model_fingerprint(c.path) for c in students}}
    cache = split.cache
    if cache:
        fps.update(teacher=cache["fingerprints"]["teacher"], dataset=cache["fingerprints"]["dataset"])
    else:
        fps["dataset"] = dataset_fingerprint(cfg.data, cfg.split, dataclasses.asdict(split.cols), len(split.dataset),
                                             cfg.limit, getattr(split.dataset, "_fingerprint", None), cfg.encoding)
    key = io.sha256_bytes(io.canonical_json({"config": config, "fingerprints": fps,
                                             "targets": cache and cache["key"]}).encode())
    return key, fps


def _upstream(split: Split, students: list[Candidate]) -> list[dict]:
    return ([{"kind": "targets", "path": str(split.cache_dir), "key": split.cache["key"]}] if split.cache else []) \
        + [{"kind": "student", "path": str(c.path), "key": c.manifest.get("key")} for c in students if c.manifest]
