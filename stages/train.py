"""Stage 2 — train a student from a targets cache (stage 0 without one: plain fine-tuning).

Read top to bottom: pick this task's sweep entry, join the torchrun process group, open and
verify the cache (or tokenise --data), build the student and refuse it if it cannot read the
cache, claim the output directory under a key of everything that decides the result, build
the streaming loader, then train: resume from the newest checkpoint if there is one, run
optimizer steps of --grad-accum micro-batches with step-wide loss normalisation, checkpoint
atomically every --save-every steps, and finally save the student with its tokenizer,
metrics.jsonl and manifest.json. The teacher never runs here, and the cache is streamed row
group by row group, never loaded whole.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import torch

from pipeline import checkpoint, io, manifest, report, sweep, tasks
from pipeline import format as fmt
from pipeline.config import TrainConfig, recorded, result_settings
from pipeline.data import Columns, Encoder, encode_table, infer_labels, load_split, pad_id
from pipeline.errors import KDError
from pipeline.fingerprint import dataset_fingerprint, tokenizer_fingerprint
from pipeline.fit import Fit, cache_labels, check_caches_agree, fit
from pipeline.loader import Collate, ParquetSource, StreamingDataset, TableSource, unskipped, verify_shards
from pipeline.losses import LOSSES, cache_grid, check_sampled, choose_lse
from pipeline.models import capped_length, load_tokenizer, pick_device, pick_dtype
from pipeline.outputs import StageOutput
from pipeline.progress import Progress, say
from pipeline.students import StudentForward, load_student
from pipeline.training import (MetricsLog, Objective, close_distributed, debug_rows, evaluate, init_distributed,
                               train_step)

__all__ = ["TrainConfig", "run"]


def run(cfg: TrainConfig) -> dict | None:
    """Train one student; returns the result on rank 0 (None on the other ranks)."""
    if cfg.sweep:
        cfg, index, name = sweep.select(cfg, cfg.sweep, cfg.task_index)
        say(f"sweep entry {index} ({name}) -> {cfg.out}")
    _check(cfg)
    d = init_distributed()
    try:
        result = _train(cfg, d)
    finally:
        close_distributed(d)
    return result if d.rank == 0 else None


@dataclasses.dataclass
class Setup:
    """What training reads and how: the student, the rows, the objective, and where they came from."""

    task_type: str
    student: object
    tokenizer: object          # saved with the student: the cache's, or the student's own when it re-tokenises
    fit: Fit
    objective: Objective
    source: object             # ParquetSource (a cache) or TableSource (a tokenised dataset)
    collate: Collate
    text_pair: bool
    cache: dict | None         # the cache's manifest
    upstream: list[dict]
    inputs: dict               # what the key is computed over, besides the settings


@dataclasses.dataclass
class Parts:
    """What an optimizer step works on."""

    model: StudentForward
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object | None
    device: torch.device
    autocast: object


def _train(cfg: TrainConfig, d) -> dict:
    t_start = time.monotonic()
    torch.manual_seed(cfg.seed)  # a new head (or a student built from a config) starts the same everywhere
    device = pick_device(cfg.device)
    if d.on and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    amp_dtype = pick_dtype(cfg.dtype, device)

    # 1. The inputs: a verified targets cache, or a tokenised dataset (stage 0); the student, checked against them.
    setup = _from_cache(cfg, d) if cfg.targets else _from_data(cfg)

    # 2. The output directory, claimed under the key of everything that decides the weights.
    out = Path(cfg.out)
    settings = {**result_settings(cfg), "task_type": setup.task_type, "alpha": setup.objective.alpha,
                "targets": cfg.targets[0] if cfg.targets and len(cfg.targets) == 1 else cfg.targets,  # one cache: as before
                "temperature": setup.objective.temperature if cfg.targets else None, "world_size": d.world_size}
    key = io.sha256_bytes(io.canonical_json({"config": settings, "inputs": setup.inputs,
                                             "init": setup.student.init}).encode())
    config = {**recorded(cfg), **settings}
    output = StageOutput(out, "student", key, lock=d.rank == 0)
    if output.existing() is not None:
        if d.rank == 0:
            _tidy_finished(out)
        say(f"{out} already holds this student (key {key[:12]}); nothing to do")
        return {"out": str(out), "key": key, "complete": True, "reused": True}
    checkpoint.check_config(out, key, settings)  # a checkpoint of other settings is never resumed
    plan = {"config": config, "settings": settings, "upstream": setup.upstream, "init": setup.student.init,
            "mode": setup.fit.mode, "fingerprints": {"tokenizer": tokenizer_fingerprint(setup.tokenizer)}}
    with output.claimed(plan):
        if d.rank == 0:
            checkpoint.clean(out)
        d.barrier()
        return _fit(cfg, d, setup, output, {"key": key, "settings": settings}, (device, amp_dtype), t_start)


def _fit(cfg: TrainConfig, d, setup: Setup, output: StageOutput, ident: dict, where: tuple, t_start: float) -> dict:
    """Steps 3 to 6 of a claimed output: loader, model and optimizer (or the newest checkpoint),
    the training loop, then the student, its tokenizer and the manifest."""
    out, key = output.out, ident["key"]
    device, amp_dtype = where

    # 3. The streaming loader: this rank's disjoint share of the rows, reshuffled every epoch.
    data = StreamingDataset(setup.source, setup.collate, cfg.batch_size, seed=cfg.seed, buffer_rows=cfg.shuffle_buffer,
                            rank=d.rank, world_size=d.world_size, num_workers=cfg.num_workers, text_pair=setup.text_pair)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed),
        prefetch_factor=4 if cfg.num_workers > 0 else None)
    eval_loader = _eval_loader(cfg, d, setup) if cfg.eval_targets else None

    # 4. Model, optimizer, schedule; then the newest checkpoint, if any, replaces all of them.
    model = StudentForward(setup.student.model, setup.task_type, setup.fit.vocab_limit, fused=cfg.fused_head).to(device)
    model.train()
    total = cfg.max_steps or sum(math.ceil(max(data.rank_batches(e)) / cfg.grad_accum) for e in range(cfg.epochs))
    if total < 1:
        raise KDError("nothing to train: the data holds no rows (or --epochs/--max-steps is 0)")
    optimizer, scheduler, scaler = _optimizer(cfg, model, total, device, amp_dtype)
    state = _resume(out, d, model, optimizer, scheduler, scaler)
    train_model = model
    if d.on:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 else contextlib.nullcontext
    parts = Parts(model, train_model, optimizer, scheduler, scaler, device, autocast)
    if d.rank == 0:
        io.refuse_symlink(out / "metrics.jsonl")
        if state["step"] == 0:  # a run from the start starts a fresh log: a killed attempt's lines would repeat
            (out / "metrics.jsonl").unlink(missing_ok=True)
    log = MetricsLog(out / "metrics.jsonl", d.rank == 0, state["step"])
    if eval_loader is not None and state["step"] == 0:
        log.write({"event": "eval", "step": 0, **evaluate(model, eval_loader, setup.objective, d, device, autocast)})

    # 5. Train.
    first_step = state["step"]
    t_train = time.monotonic()
    seen_positions = _loop(cfg, d, data, loader, parts, setup, state, total, log, ident, out)
    train_seconds = time.monotonic() - t_train
    final_eval = evaluate(model, eval_loader, setup.objective, d, device, autocast) if eval_loader is not None else None
    if final_eval:
        log.write({"event": "eval", "step": state["step"], **final_eval})
    log.close()
    del loader  # shuts down persistent workers

    # 6. The student, its tokenizer and the manifest (written last: it marks the output complete).
    step = state["step"]
    if d.rank == 0:
        stats = report.training_summary(out / "metrics.jsonl")
        stats.update(steps=step, epochs_completed=state["epoch"], world_size=d.world_size, device=str(device),
                     dtype=str(amp_dtype), wall_seconds=round(time.monotonic() - t_start, 3),
                     train_seconds=round(train_seconds, 3), resumed_from_step=first_step or None,
                     positions_per_second=round(seen_positions / max(train_seconds, 1e-9), 1),
                     steps_per_second=round((step - first_step) / max(train_seconds, 1e-9), 3))
        _save_student(output, setup, stats)
        say(f"student written to {out}: {step} steps, final loss {stats['final'].get('loss')}")
    d.barrier()
    return {"out": str(out), "key": key, "complete": True, "reused": False, "steps": step,
            "final": report.training_summary(out / "metrics.jsonl")["final"] if d.rank == 0 else None,
            "eval": final_eval, "wall_seconds": round(time.monotonic() - t_start, 3)}


def _from_cache(cfg: TrainConfig, d) -> Setup:
    """Distillation: the caches (complete, checksums verified, of one teacher run the same way), a
    student that fits them, the KD objective. Several caches are one training set: every row of
    each once per epoch; rows without a hard label (a transfer set) give the KD term only."""
    caches = [_open_cache(path, d, cfg.task_type) for path in cfg.targets]
    check_caches_agree(caches, cfg.targets)
    cache = caches[0]
    stats = cache["stats"]
    task_type = stats["task_type"]
    labels = cache_labels(stats) if tasks.get(task_type).classification and stats.get("id2label") else None
    student = load_student(task_type, student=cfg.student, from_teacher=cfg.student_from_teacher,
                           layers=cfg.student_layers, labels=labels)
    where = f"student {cfg.student or cfg.student_from_teacher}"
    how = fit(task_type, student.model.config, student.tokenizer, cache, where, f"the cache {cfg.targets[0]}")
    cache_tok = load_tokenizer(str(Path(cfg.targets[0]) / "tokenizer"))
    retokenize = how.mode == "retokenize"
    cache_t = float(stats["temperature"])
    temperature = cache_t if cfg.temperature is None else float(cfg.temperature)
    samples = int(stats["samples"]) if fmt.target_mode(stats) == "sampled" else None
    if samples:  # only kl at the cache's T has an unbiased estimate from draws
        check_sampled(cfg.loss, cache_t, temperature)
    grid = cache_grid(stats)
    lse_pick = choose_lse(grid, temperature)  # on the cache's grid: the lse taken at this T, and an exact tail
    if not lse_pick.exact and d.rank == 0:
        held = f"T={cache_t}" if len(grid) == 1 else f"the grid T={','.join(f'{t:g}' for t in grid)}"
        say(f"warning: training at T={temperature} but the cache holds {held}: the teacher's tail mass is "
            f"only known there, so the loss uses the renormalised top-{stats['top_k']} and is approximate")
    text_pair = bool((cache["config"].get("columns") or {}).get("text_pair"))
    files = [(manifest.path_of(Path(path), f["path"]), m["key"]) for path, m in zip(cfg.targets, caches) for f in m["files"]]
    source = ParquetSource([f for f, _ in files], task_type, stats["value_dtype"], text_pair, [k for _, k in files],
                           lse_grid=lse_pick.column == "lse_grid", target_mode=fmt.target_mode(stats))
    max_length = max(int(m["config"].get("max_length", 512)) for m in caches)
    if retokenize:  # the student's own tokenizer: at most the positions the student takes
        max_length = capped_length(max_length, student.model.config, student.tokenizer,
                                   f"student {cfg.student or cfg.student_from_teacher}")
    collate = Collate(task_type, pad_id(cache_tok), True, student.tokenizer if retokenize else None, max_length,
                      lse_index=lse_pick.index, samples=samples, value_dtype=stats["value_dtype"])
    return Setup(task_type, student, student.tokenizer if retokenize else cache_tok, how,
                 Objective(cfg.alpha, cfg.loss, cache_t, temperature, targets=True, lse_temperature=lse_pick.temperature),
                 source, collate, text_pair, cache,
                 [{"kind": "targets", "path": str(Path(path).resolve()), "key": m["key"]} for path, m in zip(cfg.targets, caches)],
                 {"targets": cache["key"] if len(caches) == 1 else [m["key"] for m in caches]})


def _from_data(cfg: TrainConfig) -> Setup:
    """Stage 0, plain fine-tuning: the dataset tokenised by the student's own tokenizer, cross-entropy only."""
    task_type = cfg.task_type
    dataset = load_split(cfg.data, cfg.split, cfg.limit, cfg.encoding)
    cols = Columns.resolve(dataset.column_names, task_type, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    labels = infer_labels(dataset, cols.label, task_type, cfg.labels)
    student = load_student(task_type, student=cfg.student, from_teacher=cfg.student_from_teacher,
                           layers=cfg.student_layers, labels=labels, labels_are_ids=not cfg.labels)
    labels = [student.model.config.id2label[i] for i in range(student.model.config.num_labels)] if labels else None
    tokenizer = student.tokenizer
    if tokenizer is None:
        raise KDError(f"student {cfg.student or cfg.student_from_teacher} has no tokenizer; fine-tuning on --data needs one")
    label2id = {n: i for i, n in enumerate(labels or [])}
    max_length = capped_length(cfg.max_length, student.model.config, tokenizer, f"student {cfg.student or cfg.student_from_teacher}")
    encoder = Encoder(tokenizer, task_type, cols, max_length, label2id, len(labels or []), mask_seed=cfg.seed)
    fp = dataset_fingerprint(cfg.data, cfg.split, dataclasses.asdict(cols), len(dataset), cfg.limit,
                             getattr(dataset, "_fingerprint", None), cfg.encoding)
    return Setup(task_type, student, tokenizer, Fit("ids"), Objective(0.0, cfg.loss, 1.0, 1.0, targets=False),
                 TableSource(encode_table(dataset, encoder)), Collate(task_type, pad_id(tokenizer), False),
                 bool(cfg.text_pair_column), None, [], {"data": fp["sha256"]})


def _optimizer(cfg: TrainConfig, model, total: int, device, amp_dtype):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel over all tensors: 3x faster on a CPU
    warm = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return optimizer, scheduler, scaler


def _resume(out: Path, d, model, optimizer, scheduler, scaler) -> dict:
    """The training state: zero, or the newest checkpoint's (weights, optimizer, schedule, RNG, data cursor)."""
    state = {"step": 0, "epoch": 0, "batches": 0, "rows_in_epoch": 0}
    latest = checkpoint.latest(out)
    if latest is None:
        return state
    ck = checkpoint.load(latest, d.rank, d.world_size)
    model.model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if scaler is not None and "scaler" in ck["extra"]:
        scaler.load_state_dict(ck["extra"]["scaler"])
    checkpoint.set_rng_state(ck["rng"])
    state.update({k: ck["state"][k] for k in state})
    if d.rank == 0:
        say(f"resuming from {latest.name} (epoch {state['epoch']}, {state['batches']} micro-batches into it)")
    return state


def _loop(cfg: TrainConfig, d, data: StreamingDataset, loader, p: Parts, setup: Setup, state: dict, total: int, log,
          ident: dict, out: Path) -> int:
    """Optimizer steps of --grad-accum micro-batches until `total`, checkpointing every --save-every;
    `state` (step, epoch, batches into it, rows) advances in place. Returns the positions seen."""
    progress = Progress(total - state["step"], f"train {out.name}", unit="steps", enabled=cfg.progress and d.rank == 0)
    seen = 0
    while state["step"] < total:
        longest = max(data.rank_batches(state["epoch"]))
        if state["batches"] < longest:
            data.set_epoch(state["epoch"], state["batches"])
            stream = unskipped(iter(loader))
            expected = iter(data.expected_tags(state["epoch"], state["batches"]))
        while state["batches"] < longest and state["step"] < total:
            micro = [next(stream, None) for _ in range(min(cfg.grad_accum, longest - state["batches"]))]
            state["batches"] += len(micro)
            for mb in micro:
                if mb is not None:
                    if tuple(mb["tag"]) != next(expected, None):
                        raise RuntimeError(f"loader returned batch {mb['tag']} out of the planned order")
                    debug_rows(mb, state["epoch"], d)
            t0 = time.monotonic()
            res = train_step(p.train_model, micro, setup.objective, d, p.device, p.autocast, p.scaler)
            grad_norm = _optimizer_step(p.model, p.optimizer, p.scaler, cfg.max_grad_norm)
            p.scheduler.step()
            state["step"] += 1
            state["rows_in_epoch"] += res["rows"]
            seen += res["positions"]
            log.write({"step": state["step"], "epoch": state["epoch"], "loss": res["loss"], "kd": res["kd"],
                       "ce": res["ce"], "lr": p.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "positions": res["positions"], "rows": res["rows"], "seconds": round(time.monotonic() - t0, 5)})
            progress.update(1)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
                checkpoint.save(out, state["step"], {"epoch": state["epoch"], "batches": state["batches"],
                                                     "rows_in_epoch": state["rows_in_epoch"], **ident},
                                model=p.model.model.state_dict(), optimizer=p.optimizer.state_dict(),
                                scheduler=p.scheduler.state_dict(), extra={"scaler": p.scaler.state_dict()} if p.scaler else None)
        if state["batches"] >= longest:  # an epoch ends (also when resumed exactly at its end)
            log.write({"event": "epoch", "step": state["step"], "epoch": state["epoch"], "rows": state["rows_in_epoch"],
                       "cache_rows": setup.source.num_rows})
            state.update(epoch=state["epoch"] + 1, batches=0, rows_in_epoch=0)
    progress.close()
    return seen


def _save_student(output: StageOutput, setup: Setup, stats: dict) -> None:
    """save_pretrained into a staging folder, each file renamed into place; then the manifest."""
    out = output.out
    staging = io.tmp_name(out / "final")
    setup.student.model.save_pretrained(staging)
    setup.tokenizer.save_pretrained(staging)
    for p in sorted(staging.iterdir()):
        io.publish_mode(p)  # safetensors writes 0600; every output follows the umask
        os.replace(p, out / p.name)
    staging.rmdir()
    names = [p.name for p in sorted(out.iterdir()) if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
             and p.name not in (manifest.PLAN, manifest.MANIFEST)]
    output.complete(output.file_records(names), stats)
    checkpoint.remove_all(out)


def _tidy_finished(out: Path) -> None:
    """A finished student keeps no checkpoints and no temporaries; a kill after its manifest was
    written (or an older kd) can have left some, which a rerun removes."""
    checkpoint.remove_all(out)
    for p in out.glob(f"{io.TMP_MARK}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _check(cfg: TrainConfig) -> None:
    if not cfg.out:
        raise KDError("say where the student goes: --out DIR")
    if not cfg.targets and not cfg.data:
        raise KDError("give --targets DIR (distillation) or --data (plain fine-tuning)")
    if cfg.targets and cfg.data:
        raise KDError("--data is for fine-tuning without --targets (the cache already holds the data); drop one of them")
    if not cfg.targets and not cfg.task_type:
        raise KDError("fine-tuning without --targets needs --task-type")
    if cfg.loss not in LOSSES:
        raise KDError(f"unknown --loss {cfg.loss!r}: use one of {', '.join(LOSSES)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise KDError(f"--alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.temperature is not None and not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise KDError(f"--temperature must be a positive finite number, got {cfg.temperature}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise KDError(f"--lr must be a positive finite number, got {cfg.lr}")
    if cfg.max_length < 2:
        raise KDError(f"--max-length must be at least 2 (room for the special tokens), got {cfg.max_length}")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise KDError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_steps is None and cfg.epochs < 1:
        raise KDError("--epochs must be at least 1 (or give --max-steps)")
    if cfg.eval_targets and not cfg.targets:
        raise KDError("--eval-targets compares the student with a teacher's targets; it needs --targets too")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise KDError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")


def _open_cache(path: str, d, task_type: str | None) -> dict:
    """The manifest of a complete cache whose shards all match their checksums."""
    m = manifest.read_cache(Path(path))
    if task_type and m["stats"]["task_type"] != task_type:
        raise KDError(f"--task-type {task_type} but {path} holds {m['stats']['task_type']} targets; drop --task-type")
    problems = [p for part in d.gather(verify_shards(Path(path), m["files"], (d.rank, d.world_size))) for p in part]
    if problems:
        raise KDError(f"cache {path} is damaged: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                      + f"; run `kd verify {path}` and rebuild it with `kd teacher`")
    return m


def _eval_loader(cfg: TrainConfig, d, setup: Setup):
    """The held-out cache, in order: it must be of the training cache's teacher outputs and vocabulary."""
    ev, stats = _open_cache(cfg.eval_targets, d, setup.task_type), setup.cache["stats"]
    if ev["stats"]["outputs"] != stats["outputs"]:
        raise KDError(f"--eval-targets {cfg.eval_targets} has {ev['stats']['outputs']} outputs, the training cache {stats['outputs']}")
    same_vocab = ev["fingerprints"]["tokenizer"]["vocab_sha256"] == setup.cache["fingerprints"]["tokenizer"]["vocab_sha256"]
    if setup.fit.mode == "ids" and not same_vocab:
        raise KDError(f"--eval-targets {cfg.eval_targets} was tokenised with another vocabulary than --targets; build both with the same "
                      f"teacher")
    obj, grid = setup.objective, cache_grid(ev["stats"])
    pick = choose_lse(grid, obj.temperature)
    if (grid[0], pick.index, pick.temperature) != (obj.cache_temperature, setup.collate.lse_index, obj.lse_temperature):
        raise KDError(f"--eval-targets {cfg.eval_targets} holds T={grid}, the training cache T={cache_grid(stats)}, "
                      f"and it is read as the training cache is; build both with the same --temperature / --temperatures")
    mode = fmt.target_mode(ev["stats"])
    if (mode, ev["stats"].get("samples")) != (fmt.target_mode(stats), stats.get("samples")):
        raise KDError(f"--eval-targets {cfg.eval_targets} holds {mode} targets (samples {ev['stats'].get('samples')}), the training "
                      f"cache {fmt.target_mode(stats)} (samples {stats.get('samples')}); build both with the same --target-mode "
                      f"and --samples")
    text_pair = bool((ev["config"].get("columns") or {}).get("text_pair"))
    source = ParquetSource([manifest.path_of(Path(cfg.eval_targets), f["path"]) for f in ev["files"]], setup.task_type,
                           ev["stats"]["value_dtype"], text_pair, ev["key"], lse_grid=pick.column == "lse_grid",
                           target_mode=mode)
    collate = copy.copy(setup.collate)  # the held-out cache's own layout (format 1 or 2), the training cache's batches
    collate.value_dtype = ev["stats"]["value_dtype"]
    ds = StreamingDataset(source, collate, cfg.batch_size, shuffle=False, rank=d.rank, world_size=d.world_size,
                          text_pair=text_pair)
    ds.set_epoch(0)
    return ds


def _optimizer_step(model, optimizer, scaler, max_norm: float) -> float:
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm and max_norm > 0 else float("inf")))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
