"""Peak memory and time of the LM head + distillation loss, fused vs unfused.

Unfused is what training does without `pipeline.fused_loss`: ``logits = hidden @ W.T`` ([N, V]
float32), `distillation_loss` on them, ``backward()``. Fused is `fused_distillation_loss` on the same
inputs (default ``chunk_bytes``: a 512 MB working set per chunk). Both: k = 32 cached targets per position,
loss "kl" with its exact tail, alpha = 0.5 (KD and CE both differentiated), T = 1, no bias, float32,
hidden and W requiring grad (so both build the [V, H] weight gradient).

What "peak" means: each case runs in a fresh Python process, which first allocates its inputs
(teacher targets are synthesised without any [N, V] tensor), then measures

- on CUDA: ``torch.cuda.max_memory_allocated()`` minus the bytes allocated before the loss, after
  ``reset_peak_memory_stats`` -- the caching allocator's true high-water mark of live tensors;
- on CPU (Linux): the process's peak resident set (VmHWM in /proc/self/status) minus its resident
  set (VmRSS) just before the loss, after resetting the peak there (``echo 5 > /proc/self/clear_refs``)
  so that transients of setting up do not hide the loss's own peak. Large CPU tensors are mmap'd and
  unmapped on free, so this is the high-water mark of live tensor pages, plus a little allocator and
  autograd overhead.

So "peak" is the extra memory the loss's forward + backward needs on top of the model and inputs
(including the new weight gradient, 113 MB at V = 49,152 and 604 MB at V = 262,144). Time is the
median of ``--repeats`` forward + backward passes in the same process (the first included; on CPU
the pass is dominated by three N x V x H matmuls, so there is little to warm up).

If an unfused case would need more than ``--max-unfused-gb`` (estimated at 5 float32 [N, V] tensors;
measured: 4.7-4.9 plus the weight gradient), it runs at the largest power-of-two N below ``--positions`` that fits, and the fused
case runs at that N too (for the ratio) as well as at the full N; the table says so.

    python bench/bench_loss_memory.py [--positions 4096] [--vocab 49152,262144] [--hidden 576]
                                      [--device cpu|cuda] [--repeats 3] [--max-unfused-gb 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 32
UNFUSED_NV_TENSORS = 5  # estimate of live float32 [N, V] tensors at the unfused peak, for sizing only


def make_inputs(n: int, v: int, h: int, device: str):
    """Inputs of one case, with no [N, V] temporary: the teacher's ids are k distinct ids per row
    (a random offset plus a stride), its values sorted random logits, lse their logsumexp plus a tail."""
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = torch.randn(v, h, generator=g).div_(h**0.5).to(device).requires_grad_()
    ids = (torch.randint(0, v, (n, 1), generator=g) + torch.arange(K) * (v // K)) % v
    values = torch.sort(3.0 * torch.randn(n, K, generator=g), dim=-1, descending=True).values
    lse = torch.logsumexp(values, dim=-1) + 0.5  # the tail holds 1 - e^-0.5 of the teacher's mass
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return hidden, weight, ids.to(device), values.to(device), lse.to(device), labels.to(device)


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise SystemExit(f"no {field} in /proc/self/status: the CPU measurement needs Linux")


def run_case(path: str, n: int, v: int, h: int, device: str, repeats: int, chunk_mb: int) -> dict:
    """One process, one case: returns {"peak_bytes", "seconds"} (see the module docstring)."""
    import torch

    from pipeline.fused_loss import fused_distillation_loss
    from pipeline.losses import distillation_loss

    hidden, weight, ids, values, lse, labels = make_inputs(n, v, h, device)
    kw = {"alpha": 0.5, "loss": "kl", "cache_temperature": 1.0}

    def step():
        if path == "fused":
            out = fused_distillation_loss(hidden, weight, None, ids, values, lse, labels, chunk_bytes=chunk_mb << 20, **kw)
        else:
            out = distillation_loss(hidden @ weight.T, ids, values, lse, labels, **kw)
        out["loss"].backward()
        hidden.grad = weight.grad = None

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = proc_status_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = proc_status_bytes("VmHWM") - before
    return {"peak_bytes": peak, "seconds": statistics.median(times)}


def spawn(path: str, n: int, v: int, args, chunk_mb: int = 512) -> dict:
    cmd = [sys.executable, __file__, "--case", path, "--positions", str(n), "--vocab", str(v), "--hidden", str(args.hidden),
           "--device", args.device, "--repeats", str(args.repeats), "--chunk-mb", str(chunk_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"case {path} N={n} V={v} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def unfused_positions(n: int, v: int, budget_gb: float) -> int:
    """The largest N' <= n (n, or n halved until it fits) whose unfused peak should fit the budget."""
    while n > 1 and UNFUSED_NV_TENSORS * n * v * 4 > budget_gb * 1e9:
        n //= 2
    return n


def table(args) -> str:
    mb = 1 << 20
    lines = [
        (f"Loss forward + backward, float32, k = {K}, H = {args.hidden}, loss kl, alpha 0.5; device {args.device} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start); "
        "peak = extra memory over the inputs (see the script)."),
        "",
        f"| V | N | path | peak MB | fused / unfused peak | time s (median of {args.repeats}) | fused / unfused time |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]

    def row(v, n, name, res, base=None):
        ratios = (f"{res['peak_bytes'] / base['peak_bytes']:.3f}", f"{res['seconds'] / base['seconds']:.2f}") if base else ("", "")
        lines.append(f"| {v:,} | {n:,} | {name} | {res['peak_bytes'] / mb:,.0f} | {ratios[0]} | {res['seconds']:.2f} | {ratios[1]} |")
        print(lines[-1], file=sys.stderr, flush=True)

    for v in args.vocab:
        n = unfused_positions(args.positions, v, args.max_unfused_gb)
        note = "" if n == args.positions else f" (N reduced from {args.positions:,} to fit {args.max_unfused_gb:g} GB)"
        unfused = spawn("unfused", n, v, args)
        row(v, n, "unfused" + note, unfused)
        for chunk in args.chunk_mb:
            row(v, n, f"fused, chunk {chunk} MB", spawn("fused", n, v, args, chunk), unfused)
        if n != args.positions:
            for chunk in args.chunk_mb:
                row(v, args.positions, f"fused, chunk {chunk} MB (no unfused run fits)", spawn("fused", args.positions, v, args, chunk))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--vocab", type=lambda s: [int(x) for x in s.split(",")], default=[49152, 262144])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-unfused-gb", type=float, default=12.0)
    ap.add_argument("--chunk-mb", type=lambda s: [int(x) for x in s.split(",")], default=[512, 128],
                    help="fused chunk_bytes to run (MB of a chunk's working set; 512 is the default)")
    ap.add_argument("--case", choices=("fused", "unfused"), help=argparse.SUPPRESS)  # internal: one subprocess
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.positions, args.vocab[0], args.hidden, args.device, args.repeats,
                                  args.chunk_mb[0])))
        return
    print(table(args))


if __name__ == "__main__":
    main()
