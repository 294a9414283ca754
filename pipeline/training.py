"""The moving parts of a training step: processes, the step itself, evaluation.

Normalisation is over the whole optimizer step. Before the forward passes, the ranks
all-reduce how many target positions and labelled positions the step holds (over all
gradient-accumulation micro-batches and all ranks); each micro-batch's loss is divided by
those totals. Summed gradients then equal those of one big batch however the step is split,
so a run's result does not depend on --grad-accum or on the number of processes beyond
floating-point order. DDP averages gradients over ranks, so each rank's loss is multiplied by
the world size to turn that average back into the sum.

Ranks may hold different numbers of micro-batches in an epoch (row groups are not all the same
size). DDP needs every rank in every collective, so a rank that has run out runs a no-op
micro-batch (a one-token forward whose loss is multiplied by zero) until the longest rank ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import io
from pipeline.fused_loss import fused_cross_entropy, fused_distillation_loss
from pipeline.losses import distillation_loss, kd_loss_sum
from pipeline.students import Features, as_logits


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def on(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float], device) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; anything else is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def close_distributed(d: Dist) -> None:
    if d.on:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


@dataclasses.dataclass
class Objective:
    alpha: float
    loss: str
    cache_temperature: float
    temperature: float
    targets: bool  # False: plain cross-entropy fine-tuning
    # The T of batch["lse"]: the cache's (None), or the training T when it is on the cache's grid and
    # the loader hands that grid column (pipeline.losses.choose_lse): then the tail is exact.
    lse_temperature: float | None = None


def to_device(batch: dict, device) -> dict:
    out = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for k in ("input_ids", "attention_mask", "b_idx", "p_idx", "hard"):
        out[k] = out[k].long()  # stored narrow, cast here (on the device)
    return out


def _dummy(device) -> dict:
    one = torch.ones((1, 1), dtype=torch.long, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return {"input_ids": one, "attention_mask": one, "b_idx": zero, "p_idx": zero}


def micro_loss(out, batch: dict, obj: Objective, positions: int, labelled: int) -> dict:
    """The micro-batch's share of the step's objective, from logits or, for a fused LM head, from
    the `Features` before the projection (same value and gradients, no [N, V] tensors)."""
    if isinstance(out, Features):
        head = (out.hidden, out.weight, out.bias)
        scale = {"logit_scale": out.logit_scale, "softcap": out.softcap}
        if not obj.targets:
            ce = fused_cross_entropy(*head, batch["hard"], num_labelled=labelled, **scale)
            return {"loss": ce, "kd": None, "ce": ce.detach()}
        return fused_distillation_loss(*head, batch["topk_ids"], batch["topk_logits"], batch["lse"], batch["hard"],
                                       alpha=obj.alpha, loss=obj.loss, cache_temperature=obj.cache_temperature,
                                       temperature=obj.temperature, num_positions=positions, num_labelled=labelled,
                                       lse_temperature=obj.lse_temperature, counts=batch.get("sample_counts"), **scale)
    if not obj.targets:
        ce = F.cross_entropy(out.float(), batch["hard"], ignore_index=-100, reduction="sum") / max(labelled, 1)
        return {"loss": ce, "kd": None, "ce": ce.detach()}
    return distillation_loss(out, batch["topk_ids"], batch["topk_logits"], batch["lse"], batch["hard"],
                             alpha=obj.alpha, loss=obj.loss, cache_temperature=obj.cache_temperature,
                             temperature=obj.temperature, num_positions=positions, num_labelled=labelled,
                             lse_temperature=obj.lse_temperature, counts=batch.get("sample_counts"))


def train_step(model, micro: list[dict | None], obj: Objective, d: Dist, device, autocast, scaler=None) -> dict:
    """One optimizer step's forward/backward over its micro-batches (None = this rank has run out)."""
    local = [0.0, 0.0, 0.0, 0.0]  # positions, labelled, rows, tokens
    for mb in micro:
        if mb is not None:
            local[0] += mb["b_idx"].numel()
            local[1] += int((mb["hard"] != -100).sum())
            local[2] += mb["rows"].numel()
            local[3] += mb["tokens"]
    positions, labelled, rows, tokens = (int(x) for x in d.sum(local, device))
    kd = ce = 0.0
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = model.no_sync() if d.on and not sync else contextlib.nullcontext()
        with ctx:
            with autocast():
                if mb is None:
                    b = _dummy(device)
                    loss = as_logits(model(b["input_ids"], b["attention_mask"], b["b_idx"], b["p_idx"])).float().sum() * 0.0
                    out = None
                else:
                    b = to_device(mb, device)
                    outputs = model(b["input_ids"], b["attention_mask"], b["b_idx"], b["p_idx"])
                    out = micro_loss(outputs, b, obj, positions, labelled)
                    loss = out["loss"]
            loss = loss * d.world_size
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if out is not None:
            kd += float(out["kd"]) if out["kd"] is not None else 0.0
            ce += float(out["ce"])
    kd, ce = d.sum([kd, ce], device)
    t2 = obj.temperature ** 2
    total = ce if not obj.targets else obj.alpha * t2 * kd + (1 - obj.alpha) * ce
    return {"loss": total, "kd": kd if obj.targets else None, "ce": ce, "positions": positions,
            "labelled": labelled, "rows": rows, "tokens": tokens}


@torch.no_grad()
def evaluate(model, loader, obj: Objective, d: Dist, device, autocast) -> dict:
    """Validation KD loss (mean per position) and top-1 agreement with the teacher."""
    was = model.training
    model.eval()
    kd_sum = agree = n = 0.0
    try:
        for mb in loader:
            b = to_device(mb, device)
            with autocast():
                logits = as_logits(model(b["input_ids"], b["attention_mask"], b["b_idx"], b["p_idx"]))
            counts = b.get("sample_counts")
            kd_sum += float(kd_loss_sum(logits, b["topk_ids"], b["topk_logits"], b["lse"], loss=obj.loss,
                                        cache_temperature=obj.cache_temperature, temperature=obj.temperature,
                                        lse_temperature=obj.lse_temperature, counts=counts))
            agree += float((logits.argmax(-1) == teacher_top1(b["topk_ids"], b["topk_logits"], counts)).sum())
            n += logits.shape[0]
    finally:
        model.train(was)
    kd_sum, agree, n = d.sum([kd_sum, agree, n], device)
    return {"kd": kd_sum / max(n, 1), "agreement": agree / max(n, 1), "positions": int(n)}


def teacher_top1(ids: torch.Tensor, values: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """The teacher's most probable stored id per position: rank 0 of a top-k cache; of a sampled
    cache, the drawn id with the largest z/T (padding excluded), its argmax whenever it was drawn."""
    if counts is None:
        return ids[:, 0].long()
    best = values.float().masked_fill(counts == 0, float("-inf")).argmax(-1, keepdim=True)
    return ids.gather(1, best).squeeze(-1).long()


class MetricsLog:
    """metrics.jsonl: one line per optimizer step (and per epoch / evaluation), flushed at once
    so a killed run's log is readable; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = Path(path), enabled
        if enabled and self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by SIGKILL
                # an epoch that ended exactly at the checkpoint is logged again by the resumed run
                at_resume = rec.get("event") == "epoch" and rec.get("step") == resume_step and resume_step > 0
                if rec.get("step", 0) <= resume_step and not at_resume:
                    keep.append(line)
            io.write_text(self.path, "".join(k + "\n" for k in keep))
        self.fh = None
        if enabled:  # O_NOFOLLOW: a symlink planted at metrics.jsonl is refused, never written through
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fh = os.fdopen(os.open(self.path, flags, 0o666), "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(rec, default=float) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def debug_rows(batch: dict, epoch: int, d: Dist) -> None:
    """KD_DEBUG_ROWS=DIR: append every row id this rank trains on, per epoch (for coverage tests)."""
    where = os.environ.get("KD_DEBUG_ROWS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        with open(Path(where) / f"rows-rank{d.rank}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"epoch": epoch, "rank": d.rank, "rows": batch["rows"].tolist()}) + "\n")
