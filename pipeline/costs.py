"""What a model costs to run: parameters, bytes on disk, throughput and batch-1 latency.

Distillation is worth what it saves, so every row of the evaluation report carries these next
to its metrics. Timing runs a fixed sample of real inputs (the same rows for every model), after
warm-up calls, because the first forwards pay for lazy initialisation and allocator growth; on a
GPU each measurement is bracketed by a synchronise so that queued kernels are not mistaken for
speed. The numbers describe this device and thread count only and are recorded with them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from pipeline.data import pad_batch
from pipeline.fingerprint import WEIGHT_SUFFIXES


def param_count(model) -> int:
    """Parameters the model holds; tied tensors (input/output embeddings) count once, as they
    are stored once."""
    return int(sum(p.numel() for p in model.parameters()))


def disk_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files only: the tokenizer and config are the same size for every
    student of one teacher and would blur the comparison."""
    return int(sum(p.stat().st_size for p in Path(model_dir).iterdir()
                   if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_inputs(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Padded input_ids and attention_mask for a list of id sequences, on `device`."""
    ids, att = pad_batch(rows, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device)}


@torch.inference_mode()
def measure_speed(model, sample: list[list[int]], pad_id: int, batch_size: int,
                  device: torch.device, warmup: int = 2) -> dict:
    """examples/s over `sample` in batches of `batch_size` (input order, so every model pays the
    same padding), and the median latency of a single example (batch 1)."""
    sample = [r for r in sample if r]
    if not sample:
        return {"examples_per_s": None, "latency_p50_ms": None, "timing_examples": 0}
    for r in sample[:warmup]:
        model(**model_inputs([r], pad_id, device))
    _sync(device)
    latencies = []
    for r in sample:
        inputs = model_inputs([r], pad_id, device)
        t0 = time.perf_counter()
        model(**inputs)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
    batches = [model_inputs(sample[i:i + batch_size], pad_id, device) for i in range(0, len(sample), batch_size)]
    model(**batches[0])
    _sync(device)
    t0 = time.perf_counter()
    for inputs in batches:
        model(**inputs)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"examples_per_s": len(sample) / max(seconds, 1e-9),
            "latency_p50_ms": 1000.0 * statistics.median(latencies),
            "timing_examples": len(sample)}
