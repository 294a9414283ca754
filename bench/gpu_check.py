#!/usr/bin/env python
"""One prepared GPU check: stage 1 and the fused loss on CUDA, correctness and speed, one block.

    bash bench/gpu_check.sh            # the GPU suite, bench/configs/gpu.json (about 3-5 min on an H200)
    bash bench/gpu_check.sh --smoke    # the same steps on the CPU with tiny shapes (CI, < 1 min)

Why it exists: no CUDA path of this project had ever run, and GPU time comes rarely, in short
leases, on a bare machine with no network. So everything the check needs is made here, from
configs kept in bench/configs/: random-weight models of real shapes (a Llama-shaped 1.5B causal
LM with a 151,936-row embedding, a BERT-large classifier), built directly on the device and saved
with `save_pretrained`; real `tokenizers` WordLevel tokenizers ("w0", "w1", ... words) saved next
to them -- 151,665 tokens for the Llama, so its embedding is *padded* and stage 1 must leave the
padding ids out of top-k and logsumexp (pipeline/fit.py); and random JSONL data of those words.

Then, per case, through the project's public interfaces only:

1. stage 1 (`stages.teacher.run`) in the suite's dtype (`auto`: bf16 on a GPU) on all rows; its
   manifest's stats are reported as they were recorded;
2. correctness: the cache's lse / top-k ids / z/T values of the first rows against a float64 CPU
   recompute of the same saved weights, for that run and for a `--dtype float32` run on those rows.
   float32 has a tight absolute tolerance; bf16's is set by bf16 itself: the model's own bf16
   `model(...).logits` on the same rows, against the same reference, may err by X, and the cache
   may err by at most 2 X (floor 0.01) -- a stage 1 that only inherits bf16 rounding passes, one
   that adds error of its own does not. The padding rows of the Llama's embedding are scaled up
   (`pad_row_scale`), so a stage 1 that forgot `vocab_limit` would put padding ids in every top-k;
3. throughput: stage-1 positions/s (`stats.compute_seconds`) over a bare `model(ids, mask).logits`
   forward on the same padded batches (`Encoder`, `token_budget_batches`, `pad_batch`, as
   `softtargets.launch` builds them), synchronised, after a warm-up, in alternating repeats;
4. the fused vs unfused loss, by running bench/bench_loss_memory.py with the suite's arguments.

The block (markdown, ready for bench/RESULTS.md) is printed, and written to WORK/gpu_check.md and,
when $OUT is set (the device tool returns files under it), to $OUT/gpu_check.md, with the raw
numbers beside it as gpu_check.json. It is rewritten after every case, so a run stopped by a time
limit still leaves what it measured. Exit status: 0 when every check ran and every correctness
row passed; the throughput goal is reported, never enforced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import manifest, tasks  # noqa: E402
from pipeline.config import TeacherConfig  # noqa: E402
from pipeline.data import Encoder, pad_batch, pad_id, token_budget_batches  # noqa: E402
from pipeline.inputs import resolve_inputs  # noqa: E402
from pipeline.models import auto_class, load_model, pick_dtype  # noqa: E402
from stages import teacher  # noqa: E402

CONFIGS = ROOT / "bench" / "configs"
ARRAY_ENV = ("SLURM_ARRAY_", "PBS_ARRAY", "LSB_JOBINDEX", "SGE_TASK_", "KD_TASK_INDEX", "KD_NUM_TASKS")
SPECIALS = {"causal-lm": ["<|endoftext|>", "<unk>"],
            "sequence-classification": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
F32_ATOL = 2e-3          # float32 compute vs float64: |Δlse| and |Δvalue| (values stored as float32)
F32_MIN_AGREE = 0.99     # top-1 and top-k id agreement (a near-tie may flip one position in a hundred)
LOWP_FACTOR, LOWP_FLOOR, LOWP_SLACK = 2.0, 1e-2, 0.05  # bf16: <= 2 x the bare bf16 forward's own error
THROUGHPUT_GOAL = 0.97
MB = 1 << 20


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Drop dead models before the next load: a 1.5B teacher in float32 is 6 GB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Inputs made here: tokenizer, data, random-weight model of a real shape.

def build_tokenizer(case: dict, dest: Path, model_max_length: int) -> int:
    """A real `tokenizers` WordLevel tokenizer of `tokenizer_size` tokens: the special tokens, then
    "w0", "w1", ... No hub and no real 151k-token tokenizer exist offline; this one has the real
    size, so the padded-vocabulary rule and the tokenizer fingerprint work on the real numbers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[case["task_type"]]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{j}": len(specials) + j for j in range(case["tokenizer_size"] - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if case["task_type"] == "causal-lm":  # Qwen2-like: no BOS, the end-of-text token pads
        kw = {"eos_token": specials[0], "pad_token": specials[0], "unk_token": specials[1]}
    else:  # BERT-like: [CLS] text [SEP]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        kw = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **kw)
    fast.save_pretrained(dest)
    if len(fast) != case["tokenizer_size"]:
        raise RuntimeError(f"built a {len(fast)}-token tokenizer, the suite asks for {case['tokenizer_size']}")
    return len(specials)


def write_data(path: Path, case: dict, n_specials: int, num_labels: int) -> None:
    """Random rows of the tokenizer's words (every id is reachable, the last ones too), a `text`
    column, plus `label` for classification: stage 1 reads them like any user's JSONL."""
    rng = random.Random(case.get("seed", 0))
    words = case["tokenizer_size"] - n_specials
    lo, hi = case["words"]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(case["rows"]):
            row = {"id": f"r{i}", "text": " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(lo, hi)))}
            if tasks.get(case["task_type"]).classification:
                row["label"] = rng.randrange(num_labels)
            fh.write(json.dumps(row) + "\n")


def build_model(case: dict, dest: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Random weights of the config's shape, built directly on `device` (initialising 1.5B
    parameters on a CPU would take longer than the whole check) and saved as safetensors.
    Padding rows of an LM's output embedding are scaled by `pad_row_scale`: their logits then
    dominate every position, so stage 1 passes the correctness check only if it leaves them out."""
    import transformers

    cfg = json.loads((CONFIGS / case["config"]).read_text())
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(case.get("seed", 0))
    with torch.device(device):
        model = auto_class(case["task_type"]).from_config(config, dtype=dtype)
    model.eval()
    padding = 0
    if not tasks.get(case["task_type"]).classification:
        weight = model.get_output_embeddings().weight
        padding = weight.shape[0] - case["tokenizer_size"]
        if padding > 0 and case.get("pad_row_scale"):
            with torch.no_grad():
                weight[case["tokenizer_size"]:] *= float(case["pad_row_scale"])
    model.save_pretrained(dest, safe_serialization=True)
    info = {"params": sum(p.numel() for p in model.parameters()), "embedding_rows": int(config.vocab_size),
            "padding_rows": padding, "num_labels": int(config.num_labels), "layers": int(config.num_hidden_layers),
            "hidden": int(config.hidden_size), "built_on": str(next(model.parameters()).device)}
    del model
    free(device)
    return info


def prepare(case: dict, work: Path, device: torch.device, build_dtype: torch.dtype) -> dict:
    """Model dir (weights + tokenizer) and data file of one case, made from scratch."""
    t0 = time.perf_counter()
    model_dir, data = work / case["name"] / "model", work / case["name"] / "data.jsonl"
    model_dir.mkdir(parents=True, exist_ok=True)
    info = build_model(case, model_dir, device, build_dtype)
    cfg = json.loads((CONFIGS / case["config"]).read_text())
    n_specials = build_tokenizer(case, model_dir, int(cfg.get("max_position_embeddings", case["max_length"])))
    write_data(data, case, n_specials, info["num_labels"])
    info.update(model_dir=str(model_dir), data=str(data), build_seconds=time.perf_counter() - t0)
    log(f"{case['name']}: {info['params'] / 1e6:,.1f}M parameters, {info['embedding_rows']:,} output rows "
        f"({info['padding_rows']} padding), built on {info['built_on']} and saved in {info['build_seconds']:.1f} s")
    return info


# --------------------------------------------------------------------------------------------
# Stage 1 and the bare forward on the same batches.

def teacher_config(case: dict, built: dict, out: Path, device: torch.device, dtype: str, limit: int | None = None,
                   value_dtype: str = "float16") -> TeacherConfig:
    """The stage-1 configuration of a case, as a user would write it (progress bars off: the log is read later)."""
    return TeacherConfig(model=built["model_dir"], data=built["data"], task_type=case["task_type"], out=str(out),
                         max_length=case["max_length"], top_k=case["top_k"], temperature=case["temperature"],
                         dtype=dtype, value_dtype=value_dtype, batch_tokens=case["batch_tokens"], limit=limit,
                         device=str(device), progress=False)


def stage1(cfg: TeacherConfig, device: torch.device) -> dict:
    """One `kd teacher` run into a fresh directory; its figures are the stats its manifest
    recorded (stages/teacher.py TIMINGS), plus the whole call's wall time and, on CUDA, the peak
    memory it allocated over what was allocated before it."""
    free(device)
    before = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync(device)
    t0 = time.perf_counter()
    teacher.run(cfg)
    sync(device)
    wall = time.perf_counter() - t0
    stats = manifest.read_manifest(Path(cfg.out), kind="targets")["stats"]
    record = next(iter(manifest.done_tasks(Path(cfg.out)).values()))
    keys = (*teacher.TIMINGS, "rows", "positions", "bytes", "bytes_per_position", "truncated_rows", "vocab_limit", "top_k")
    res = {k: stats.get(k) for k in keys}
    if res["bytes_per_position"] is None:  # older manifests: derive it as bench_teacher.py does
        res["bytes_per_position"] = stats["bytes"] / max(1, stats["positions"])
    res.update(run_seconds=wall, out=cfg.out, dtype=str(record.get("dtype")).replace("torch.", ""), device=record.get("device"),
               value_dtype=cfg.value_dtype, limit=cfg.limit,
               peak_mb=(torch.cuda.max_memory_allocated(device) - before) / MB if device.type == "cuda" else None)
    log(f"stage 1 {Path(cfg.out).name}: {res['positions']:,} positions, compute {res['compute_seconds']:.2f} s, "
        f"loop {res['loop_seconds']:.2f} s, {res['bytes_per_position']:.1f} B/position ({res['dtype']})")
    return res


def stage1_batches(cfg: TeacherConfig) -> tuple[list, int]:
    """The padded batches stage 1 runs for these rows, built the way `_extract` and
    `softtargets.launch` build them (shards, `Encoder`, `token_budget_batches`, `pad_batch`), and
    their target positions: the bare forward must do exactly the same work."""
    inp = resolve_inputs(cfg)
    label2id = {str(k): int(v) for k, v in (inp.mconfig.label2id or {}).items()}
    encoder = Encoder(inp.tokenizer, cfg.task_type, inp.cols, inp.max_length, label2id, inp.mconfig.num_labels,
                      cfg.mask_seed, cfg.mask_prob, inp.id_column)
    shard_rows = cfg.shard_rows or tasks.get(cfg.task_type).default_shard_rows(inp.max_length)
    pad, n = pad_id(inp.tokenizer), len(inp.dataset)
    tensors, positions = [], 0
    for s0 in range(0, n, shard_rows):
        examples = encoder.encode(inp.dataset[s0:min(n, s0 + shard_rows)], s0)
        for batch in token_budget_batches([len(e.input_ids) for e in examples], cfg.batch_tokens):
            tensors.append(pad_batch([examples[i].input_ids for i in batch], pad))
            positions += sum(len(examples[i].positions) for i in batch)
    return tensors, positions


@torch.inference_mode()
def bare_pass(model, tensors: list, device: torch.device) -> float:
    """Seconds of `model(input_ids, attention_mask).logits` over all batches, host-to-device copies
    included (stage 1 pays them too), synchronised only at both ends as a plain user loop would be."""
    sync(device)
    t0 = time.perf_counter()
    for ids, att in tensors:
        out = model(input_ids=ids.to(device, non_blocking=True), attention_mask=att.to(device, non_blocking=True)).logits
        del out
    sync(device)
    return time.perf_counter() - t0


def throughput(case: dict, built: dict, work: Path, device: torch.device, dtype: str, repeats: int,
               check: list[dict], limit: int | None) -> dict:
    """Stage 1 against the bare forward, alternating which goes first, after a warm-up of the bare
    side (stage 1 was warmed up by the first run). The bare model also gives the bf16 baseline of
    the correctness check: its own logits on the check rows."""
    cfg = teacher_config(case, built, work / case["name"] / "unused", device, dtype)
    tensors, positions = stage1_batches(cfg)
    model = load_model(built["model_dir"], case["task_type"], dtype=pick_dtype(dtype, device), device=device)
    bare_pass(model, tensors, device)
    baseline = logits_rows(model, check, device, limit, case["temperature"])
    rec = {"bare": [], "kd": []}
    for r in range(repeats):
        for side in (("bare", "kd") if r % 2 == 0 else ("kd", "bare")):
            if side == "bare":
                rec["bare"].append(bare_pass(model, tensors, device))
                log(f"bare forward, repeat {r + 1}: {rec['bare'][-1]:.2f} s")
            else:
                out = work / case["name"] / f"cache-repeat{r + 1}"
                rec["kd"].append(stage1(teacher_config(case, built, out, device, dtype), device))
    del model
    free(device)
    for kd in rec["kd"]:
        if kd["positions"] != positions:
            raise RuntimeError(f"stage 1 counted {kd['positions']} positions, the bare batches {positions}: not the same work")
    return {"batches": len(tensors), "positions": positions, "tokens": int(sum(int(a.sum()) for _, a in tensors)),
            "padded": int(sum(i.numel() for i, _ in tensors)), "bare_seconds": rec["bare"], "kd": rec["kd"],
            "baseline": baseline}


# --------------------------------------------------------------------------------------------
# Correctness: the cache against a float64 recompute of the same saved weights.

def cache_rows(out: str, n: int) -> list[dict]:
    """The first n rows (frozen order) of a cache, read with plain pyarrow."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = ["row", "input_ids", "positions", "topk_ids", "topk_logits", "lse"]
    table = pq.read_table(Path(out) / "shards", columns=cols)
    table = table.filter(pc.less(table["row"], n)).sort_by("row")
    return table.to_pylist()


@torch.inference_mode()
def logits_rows(model, rows: list[dict], device: torch.device, limit: int | None, temperature: float) -> list[dict]:
    """Per row: z/T (float64 numpy) at the row's target positions over the first `limit` ids, its
    logsumexp, and the logsumexp over every output (padding included). One row at a time, no
    padding: the recompute is independent of stage 1's batching."""
    out = []
    for r in rows:
        ids = torch.tensor(r["input_ids"], dtype=torch.long, device=device)[None]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        pos = torch.tensor(r["positions"], dtype=torch.long, device=device)
        z = (logits[0][pos] if logits.dim() == 3 else logits[pos]).double() / temperature
        full = {"lse_full": torch.logsumexp(z, dim=-1).cpu().numpy(),
                "pad_top1": (z.argmax(-1) >= limit).cpu().numpy() if limit else np.zeros(len(z), bool)}
        z = z[:, :limit] if limit else z
        out.append({"z": z.cpu().numpy(), "lse": torch.logsumexp(z, dim=-1).cpu().numpy(), **full})
    return out


def reference(built: dict, task_type: str, rows: list[dict], limit: int | None, temperature: float) -> list[dict]:
    """float64 on the CPU, loaded by the pipeline's own loader from the saved (bf16) weights: the
    same weights every run uses, with no rounding of its own worth mentioning."""
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    model = load_model(built["model_dir"], task_type, dtype=torch.float64, device=cpu)
    ref = logits_rows(model, rows, cpu, limit, temperature)
    del model
    free(cpu)
    log(f"float64 reference of {len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    return ref


def as_cache(rows: list[dict], z_rows: list[dict], k: int) -> list[dict]:
    """A bare forward's logits in the cache's shape (top-k ids and z/T, lse), so the same
    comparison measures it and the cache."""
    out = []
    for r, zr in zip(rows, z_rows):
        z = zr["z"]
        ids = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < z.shape[1] else np.tile(np.arange(z.shape[1]), (len(z), 1))
        ids = np.take_along_axis(ids, np.argsort(-np.take_along_axis(z, ids, 1), axis=1, kind="stable"), 1)
        out.append({**r, "topk_ids": ids, "topk_logits": np.take_along_axis(z, ids, 1), "lse": zr["lse"]})
    return out


def compare(rows: list[dict], ref: list[dict], task_type: str, limit: int | None) -> dict:
    """max |Δlse|, max |Δvalue| (the stored z/T against the reference's z/T at the same ids, so a
    swap of two near-equal logits is not counted as a value error), top-1 agreement, top-k id
    agreement (|stored ids ∩ reference top-k| / k), padding ids stored, and the positions contract."""
    dlse, dval, top1, overlap, padding, contract = [], [], [], [], 0, True
    for r, zr in zip(rows, ref):
        ids = np.asarray(r["topk_ids"], dtype=np.int64)
        vals = np.asarray(r["topk_logits"], dtype=np.float64)
        z, k = zr["z"], ids.shape[1]
        expected = list(range(len(r["input_ids"]) - 1)) if task_type == "causal-lm" else [0]
        contract &= list(r["positions"]) == expected
        padding += int((ids >= z.shape[1]).sum())  # z holds the first vocab_limit ids only
        safe = np.clip(ids, 0, z.shape[1] - 1)
        dval.append(np.abs(vals - np.take_along_axis(z, safe, 1)).max())
        dlse.append(np.abs(np.asarray(r["lse"], dtype=np.float64) - zr["lse"]).max())
        ref_top = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < z.shape[1] else np.tile(np.arange(z.shape[1]), (len(z), 1))
        top1.extend(ids[:, 0] == z.argmax(1))
        overlap.extend(len(set(a) & set(b)) / k for a, b in zip(ids.tolist(), ref_top.tolist()))
    return {"positions": len(top1), "max_dlse": float(max(dlse)), "max_dvalue": float(max(dval)),
            "top1": float(np.mean(top1)), "topk": float(np.mean(overlap)), "padding_ids": padding, "contract": bool(contract)}


def verdict(m: dict, kind: str, base: dict | None = None) -> dict:
    """Pass/fail of one comparison against the stated tolerance; `base` (the bare bf16 forward's
    own comparison) sets the low-precision tolerance."""
    if kind == "float32":
        tol = {"dlse": F32_ATOL, "dvalue": F32_ATOL}
        text = f"\\|Δ\\| ≤ {F32_ATOL:g}, agreement ≥ {F32_MIN_AGREE:g}"
        top1_min = topk_min = F32_MIN_AGREE
    elif kind == "lowp":
        tol = {"dlse": max(LOWP_FLOOR, LOWP_FACTOR * base["max_dlse"]), "dvalue": max(LOWP_FLOOR, LOWP_FACTOR * base["max_dvalue"])}
        top1_min, topk_min = base["top1"] - LOWP_SLACK, base["topk"] - LOWP_SLACK
        text = (f"\\|Δlse\\| ≤ {tol['dlse']:.3g}, \\|Δvalue\\| ≤ {tol['dvalue']:.3g} (2 × bare, ≥ {LOWP_FLOOR:g}); "
                f"agreement ≥ bare − {LOWP_SLACK:g}")
    else:
        return {**m, "tolerance": "sets the bf16 tolerance", "passed": None}
    ok = (m["max_dlse"] <= tol["dlse"] and m["max_dvalue"] <= tol["dvalue"] and m["top1"] >= top1_min
          and m["topk"] >= topk_min and m["padding_ids"] == 0 and m["contract"])
    return {**m, "tolerance": text + "; no padding ids; positions as the contract says", "passed": bool(ok)}


def correctness(case: dict, built: dict, lowp: dict, f32: dict, baseline: list[dict]) -> dict:
    """The three comparisons of one case against one float64 reference of the check rows."""
    task_type, limit = case["task_type"], lowp.get("vocab_limit")
    rows = cache_rows(lowp["out"], case["check_rows"])
    rows32 = cache_rows(f32["out"], case["check_rows"])
    if [r["input_ids"] for r in rows] != [r["input_ids"] for r in rows32]:
        raise RuntimeError("the bf16 and float32 caches disagree on the input ids of the check rows")
    ref = reference(built, task_type, rows, limit, case["temperature"])
    base = compare(as_cache(rows, baseline, lowp["top_k"]), ref, task_type, limit)
    out = {"rows": len(rows), "entries": [
        {"what": "stage-1 cache", "dtype": lowp["dtype"], **verdict(compare(rows, ref, task_type, limit), "lowp", base)},
        {"what": "bare `model(...).logits`", "dtype": lowp["dtype"], **verdict(base, "base")},
        {"what": "stage-1 cache (`--dtype float32`, float32 values)", "dtype": f32["dtype"],
         **verdict(compare(rows32, ref, task_type, limit), "float32")},
    ]}
    if limit:
        shift = np.concatenate([zr["lse_full"] - zr["lse"] for zr in ref])
        out["padding_shift"] = {"mean": float(shift.mean()), "max": float(shift.max()), "limit": limit,
                                "rows": built["embedding_rows"], "scale": case.get("pad_row_scale"),
                                "pad_top1": float(np.concatenate([zr["pad_top1"] for zr in ref]).mean())}
    return out


# --------------------------------------------------------------------------------------------
# One case, the loss benchmark, the machine.

def run_case(res: dict, suite: dict, work: Path, device: torch.device) -> None:
    """Build, stage 1 (all rows), stage 1 in float32 (check rows), throughput, correctness; the
    results go into `res` as they come, so a failure later in the case keeps what was measured."""
    case = res["case"]
    built = res["built"] = prepare(case, work, device, pick_dtype(suite["build_dtype"], device))
    t0 = time.perf_counter()
    lowp = stage1(teacher_config(case, built, work / case["name"] / "cache", device, suite["dtype"]), device)
    res["stage1"] = [lowp]
    f32 = stage1(teacher_config(case, built, work / case["name"] / "cache-float32", device, "float32",
                                limit=case["check_rows"], value_dtype="float32"), device)
    res["stage1"].append(f32)
    check = cache_rows(lowp["out"], case["check_rows"])
    tp = throughput(case, built, work, device, suite["dtype"], int(suite.get("repeats", 2)), check, lowp.get("vocab_limit"))
    res["stage1_seconds"] = time.perf_counter() - t0
    res["throughput"] = {k: v for k, v in tp.items() if k != "baseline"}
    t1 = time.perf_counter()
    res["correctness"] = correctness(case, built, lowp, f32, tp["baseline"])
    res["reference_seconds"] = time.perf_counter() - t1


def loss_bench(suite: dict) -> dict:
    """bench/bench_loss_memory.py as its own command (it spawns one process per case, so each
    case's peak memory is its own); its markdown table goes into the block as printed."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_loss_memory.py"), *suite["loss_bench"]]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=suite.get("loss_bench_timeout_s", 240))
    except subprocess.TimeoutExpired:
        return {"command": cmd[1:], "error": f"timed out after {suite.get('loss_bench_timeout_s', 240)} s"}
    res = {"command": cmd[1:], "seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        return {**res, "error": f"exit {proc.returncode}: {lines[-1][:300]}"}
    return {**res, "table": proc.stdout.strip()}


def machine(device: torch.device) -> dict:
    """Versions and hardware for the block: a number means little without the stack that produced it."""
    import pyarrow
    import tokenizers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "pyarrow": pyarrow.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32), "matmul_precision": torch.get_float32_matmul_precision()}
    try:
        import datasets

        info["datasets"] = datasets.__version__
    except ImportError:
        info["datasets"] = "absent"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_gib=props.total_memory / (1 << 30), capability=f"{props.major}.{props.minor}")
    return info



# --------------------------------------------------------------------------------------------
# The block: one markdown section for bench/RESULTS.md, every number as measured above.

def fmt_s(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def ratio(bare: list[float], kd: list[float]) -> float:
    """Stage-1 positions/s ÷ bare positions/s on the same positions = bare seconds ÷ stage-1 seconds (medians)."""
    return statistics.median(bare) / statistics.median(kd)


def case_line(c: dict) -> str:
    """What a case ran: shapes, data and settings, so a reader can redo it from the block alone."""
    case, b = c["case"], c.get("built")
    if b is None:
        return f"- `{case['name']}`: **ERROR** {c['error']}"
    pad = (f"; tokenizer {case['tokenizer_size']:,} tokens, so {b['padding_rows']} padding rows (scaled ×{case.get('pad_row_scale')})"
           if b["padding_rows"] else "")
    err = f" **ERROR** {c['error']}" if c.get("error") else ""
    return (f"- `{case['name']}`: {case['title']}; {b['params'] / 1e6:,.1f}M parameters, {b['embedding_rows']:,} output rows{pad}; "
            f"{case['task_type']}, {case['rows']:,} rows of {case['words'][0]}–{case['words'][1]} random words, k = {case['top_k']}, "
            f"T = {case['temperature']:g}, max length {case['max_length']}, batches of ≤ {case['batch_tokens']:,} padded tokens.{err}")


def header(res: dict) -> list[str]:
    """Begin marker (bench/RESULTS.md replaces a block by its markers), date, machine, software, cases."""
    m, dev = res["machine"], res["device"]
    where = (f"{m['gpu']} ({m['gpu_gib']:.0f} GiB, compute capability {m['capability']}), CUDA {m['cuda']}; host "
             f"{m['cpu']}, {m['cores']} cores" if dev == "cuda" else f"CPU only ({m['cpu']}, {m['cores']} cores)")
    return [f"<!-- gpu_check:{dev}:begin (generated by bench/gpu_check.sh{' --smoke' if res['smoke'] else ''}) -->",
            f"### GPU check{' — smoke run on the CPU, tiny shapes' if res['smoke'] else ''}, {res['date']}", "",
            f"- Machine: {where}.",
            f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, tokenizers {m['tokenizers']}, "
            f"datasets {m['datasets']}, pyarrow {m['pyarrow']}; TF32 matmul {'on' if m['tf32_matmul'] else 'off'}, float32 matmul "
            f"precision {m['matmul_precision']!r}.",
            f"- Suite `{res['suite']}`: random weights built on the device and saved (safetensors), WordLevel "
            "tokenizers and random JSONL data made in the run; no network.",
            *[case_line(c) for c in res["cases"]], ""]


def stage1_table(res: dict) -> list[str]:
    """Every stage-1 run of the check with the stats its manifest recorded, unrounded by us beyond display."""
    lines = ["#### 1. Stage 1 (`stages.teacher.run`): the manifest's stats", "",
             "| case | run | dtype | rows | positions | compute s | loop s | positions/s (compute) | B/position | encode s | "
             "teacher s | collect s | write s | whole `run()` s | peak GPU MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res["cases"]:
        runs = c.get("stage1", []) + c.get("throughput", {}).get("kd", [])
        names = ["all rows (first run)", "check rows, `--dtype float32`"] + [f"throughput repeat {i + 1}" for i in range(len(runs) - 2)]
        for name, r in zip(names, runs):
            peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
            lines.append(f"| {c['case']['name']} | {name} | {r['dtype']} | {r['rows']:,} | {r['positions']:,} | "
                         f"{r['compute_seconds']:.2f} | {r['loop_seconds']:.2f} | {r['positions'] / max(r['compute_seconds'], 1e-9):,.0f} | "
                         f"{r['bytes_per_position']:.1f} | {r['encode_seconds']:.2f} | {r['teacher_seconds']:.2f} | "
                         f"{r['collect_seconds']:.2f} | {r['write_seconds']:.2f} | {r['run_seconds']:.2f} | {peak} |")
    return lines + ["", "compute = `stats.compute_seconds` (first launch → last results on the host), loop = `stats.loop_seconds` "
                        "(tokenise + compute + write); peak GPU MB = `max_memory_allocated` during the run over what was "
                        "allocated before it.", ""]


def correctness_table(res: dict) -> list[str]:
    """Each comparison with its tolerance and verdict, and what the padded vocabulary would have cost."""
    lines = ["#### 2. Correctness: the cache against a float64 CPU recompute of the same saved weights", "",
             "| case | compared (first rows) | dtype | positions | max \\|Δlse\\| | max \\|Δvalue\\| | top-1 agreement | "
             "top-k id agreement | padding ids stored | tolerance | result |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    notes = []
    for c in res["cases"]:
        cor = c.get("correctness")
        if cor is None:
            continue
        for e in cor["entries"]:
            result = "—" if e["passed"] is None else ("**PASS**" if e["passed"] else "**FAIL**")
            lines.append(f"| {c['case']['name']} | {e['what']}, {cor['rows']} rows | {e['dtype']} | {e['positions']:,} | "
                         f"{e['max_dlse']:.2e} | {e['max_dvalue']:.2e} | {e['top1']:.4f} | {e['topk']:.4f} | {e['padding_ids']} | "
                         f"{e['tolerance']} | {result} |")
        ps = cor.get("padding_shift")
        if ps:
            notes.append(f"- `{c['case']['name']}`, padded vocabulary: {ps['rows']:,} output rows, tokenizer {ps['limit']:,}; over all rows "
                         f"the float64 argmax is a padding id at {100 * ps['pad_top1']:.0f}% of the check positions and lse(z/T) is "
                         f"larger by {ps['mean']:.3f} on average (max {ps['max']:.3f}). The cache stores no padding id and its lse "
                         f"matches the reference over the first {ps['limit']:,} ids: stage 1 applies `vocab_limit`.")
    return lines + ["", "Values: the stored z/T against the reference's z/T at the same ids; top-k id agreement: |stored ids ∩ "
                        "reference top-k| / k, averaged over positions. The bare bf16 forward row is what bf16 itself costs; the "
                        "bf16 cache may err by at most twice that.", *notes, ""]


def throughput_table(res: dict) -> list[str]:
    """Per-repeat seconds as well as the ratio, so a reader sees the spread behind the median."""
    lines = ["#### 3. Throughput: stage 1 ÷ a bare `model(input_ids, attention_mask).logits` forward on the same batches", "",
             "| case | batches | positions | padding | bare s (per repeat) | stage-1 compute s | stage-1 loop s | bare positions/s | "
             "stage-1 positions/s | **stage 1 ÷ bare (compute)** | stage 1 ÷ bare (loop) | goal ≥ 0.97 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in res["cases"]:
        tp = c.get("throughput")
        if not tp:
            continue
        bare, kd = tp["bare_seconds"], [r["compute_seconds"] for r in tp["kd"]]
        loop = [r["loop_seconds"] for r in tp["kd"]]
        rc, rl = ratio(bare, kd), ratio(bare, loop)
        join = " / ".join
        lines.append(f"| {c['case']['name']} | {tp['batches']} | {tp['positions']:,} | {100 * (1 - tp['tokens'] / tp['padded']):.0f}% | "
                     f"{join(f'{x:.2f}' for x in bare)} | {join(f'{x:.2f}' for x in kd)} | {join(f'{x:.2f}' for x in loop)} | "
                     f"{tp['positions'] / statistics.median(bare):,.0f} | {tp['positions'] / statistics.median(kd):,.0f} | "
                     f"**{rc:.3f}** | {rl:.3f} | {'met' if rc >= THROUGHPUT_GOAL else 'not met'} |")
    return lines + ["", "Ratios: median bare seconds ÷ median stage-1 seconds over the repeats (same positions); bare and stage 1 "
                        "alternate which goes first; the bare side is synchronised at both ends, after one warm-up pass.", ""]


def loss_section(res: dict) -> list[str]:
    """bench_loss_memory.py's own table, under the exact command that produced it."""
    lb = res.get("loss")
    if lb is None:
        return ["#### 4. Fused vs unfused loss: not run", ""]
    cmd = "python " + " ".join(Path(x).relative_to(ROOT).as_posix() if x.startswith(str(ROOT)) else x for x in lb["command"])
    if "error" in lb:
        return [f"#### 4. Fused vs unfused loss (`{cmd}`)", "", f"**FAILED**: {lb['error']}", ""]
    return [f"#### 4. Fused vs unfused loss (`{cmd}`, {lb['seconds']:.0f} s)", "", lb["table"], ""]


def passed(res: dict) -> bool:
    """Every case ran, every correctness row passed, the loss benchmark ran."""
    ok = all("error" not in c and "correctness" in c for c in res["cases"]) and "error" not in (res.get("loss") or {"error": 1})
    return ok and all(e["passed"] is not False for c in res["cases"] for e in c["correctness"]["entries"])


def render(res: dict) -> str:
    """The whole block; it renders partial results too (a case that failed shows its error)."""
    ratios = [f"{c['case']['name']} {ratio(c['throughput']['bare_seconds'], [r['compute_seconds'] for r in c['throughput']['kd']]):.3f}"
              for c in res["cases"] if c.get("throughput")]
    correct = all(e["passed"] is not False for c in res["cases"] if "correctness" in c for e in c["correctness"]["entries"])
    ran = all("correctness" in c for c in res["cases"])
    phases = {k: sum(c.get(f"{k}_seconds", c.get("built", {}).get(f"{k}_seconds", 0)) for c in res["cases"])
              for k in ("build", "stage1", "reference")}
    summary = (f"**Summary**: correctness {'PASS' if correct and ran else 'FAIL'}{'' if ran else ' (a case did not finish)'}; "
               f"stage 1 ÷ bare forward (compute): {', '.join(ratios) or 'not measured'} (goal ≥ {THROUGHPUT_GOAL}); "
               f"wall {res.get('wall_seconds', 0):.0f} s (build {phases['build']:.0f}, stage 1 + bare {phases['stage1']:.0f}, "
               f"float64 reference {phases['reference']:.0f}, loss bench {(res.get('loss') or {}).get('seconds', 0):.0f}).")
    body = header(res) + stage1_table(res) + correctness_table(res) + throughput_table(res) + loss_section(res)
    return "\n".join(body + [summary, f"<!-- gpu_check:{res['device']}:end -->"])


def emit(res: dict, work: Path) -> str:
    """Render and write the block and the raw numbers to the work dir and $OUT (if set)."""
    block = render(res)

    def default(x):
        return x.item() if isinstance(x, np.generic) else str(x)

    raw = json.dumps(res, indent=1, default=default)
    for d in [work] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / "gpu_check.md").write_text(block + "\n", encoding="utf-8")
        (d / "gpu_check.json").write_text(raw, encoding="utf-8")
    return block


def main(argv: list[str] | None = None) -> int:
    """Run the suite case by case, then the loss benchmark; exit 0 only if everything ran and passed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the CPU suite with tiny shapes (bench/configs/smoke.json)")
    ap.add_argument("--suite", type=Path, default=None, help="a suite file (default: bench/configs/gpu.json, or smoke.json)")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a new /tmp/kd-gpu-check-* directory)")
    args = ap.parse_args(argv)
    suite_path = args.suite or CONFIGS / ("smoke.json" if args.smoke else "gpu.json")
    suite = json.loads(suite_path.read_text())
    device = torch.device(suite["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; on a CPU run `bash bench/gpu_check.sh --smoke`", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="kd-gpu-check-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))  # read when `datasets` is first imported
    for name in [n for n in os.environ if n.startswith(ARRAY_ENV)]:
        os.environ.pop(name)  # one process, all rows: a job-array environment must not split them
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    shown = suite_path.resolve().relative_to(ROOT) if suite_path.resolve().is_relative_to(ROOT) else suite_path
    res = {"suite": str(shown), "smoke": args.smoke, "device": device.type, "work": str(work), "cases": [],
           "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(device)}
    log(f"suite {shown} on {device} ({res['machine'].get('gpu', res['machine']['cpu'])}), work dir {work}")
    for i, case in enumerate(suite["cases"]):
        entry = {"case": case}
        res["cases"].append(entry)
        try:
            run_case(entry, suite, work, device)
        except Exception as exc:  # one broken case must not cost the other's numbers on a one-shot GPU lease
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        free(device)
        if i == 0:  # right after the main case: should a lease run out, the secondary cases go first
            log("fused vs unfused loss: bench/bench_loss_memory.py " + " ".join(suite["loss_bench"]))
            res["loss"] = loss_bench(suite)
        res["wall_seconds"] = time.perf_counter() - t0
        emit(res, work)
    print(emit(res, work), flush=True)
    log(f"done in {res['wall_seconds']:.0f} s; block in {work / 'gpu_check.md'}" + (f" and {os.environ['OUT']}/gpu_check.md" if os.environ.get("OUT") else ""))
    return 0 if passed(res) else 1


if __name__ == "__main__":
    sys.exit(main())
