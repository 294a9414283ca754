"""What training sees of the two top-k layouts: positions/s through kd train's own streaming loader.

bench_layout.py times a bare read + decode; this times the whole path a training step waits on
(`ParquetSource` row groups -> `Collate.decode` -> shuffle buffer -> `Collate` tensors), one process
and one core, for the same teacher's targets stored as format 1 (float16 z/T, the old default) and
format 2 (`--value-dtype code`, the new default). Input: a float32 kd cache (`kd teacher
--value-dtype float32 --top-k 128`); its shards are re-written both ways with `format.write_shard`
(every other column kept) at each k, cut in rank order. Repeats interleave the two layouts; medians.

    python bench/bench_stream.py CACHE [--ks 8,32,128] [--repeats 5] [--copies 8] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline import format as fmt  # noqa: E402
from pipeline import io, layout, manifest  # noqa: E402
from pipeline.loader import Collate, ParquetSource, StreamingDataset  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench_stream:begin -->", "<!-- bench_stream:end -->"


def rewrite(cache: Path, k: int, dest: Path, copies: int = 1) -> dict[str, list[Path]]:
    """The cache's shards at top-k `k`, as format 1 float16 and as format 2, each `copies` times (a
    longer stream than one small cache gives, for timers)."""
    out = {"float16": [], "code": []}
    m = manifest.read_manifest(cache, kind="targets")
    for f in m["files"]:
        t = pq.read_table(cache / f["path"])
        ids, vals, lse = fmt.read_topk(t)
        ids, vals = np.ascontiguousarray(ids[:, :k]), np.ascontiguousarray(vals[:, :k])
        counts = np.diff(t.column("positions").combine_chunks().offsets.to_numpy())
        rows = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        base = t.drop_columns(["topk_ids", "topk_logits", "lse"])
        lse_col = pa.ListArray.from_arrays(rows, pa.array(lse))
        for dtype in out:
            if dtype == "code":
                coded, meta = layout.encode(ids, vals, lse, vocab_size=int(m["stats"]["outputs"]))
                cols = layout.to_arrow(coded, counts, k)
            else:
                meta, cols = None, {"lse": lse_col}
                for name, a, typ in (("topk_ids", ids, pa.int32()), ("topk_logits", vals.astype(np.float16), pa.float16())):
                    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, a.size + 1, k, dtype=np.int32)), pa.array(a.ravel(), typ))
                    cols[name] = pa.ListArray.from_arrays(rows, inner)
            schema = fmt.schema("causal-lm", dtype)
            table = pa.Table.from_arrays([(base.column(c.name) if c.name in base.column_names else cols[c.name]).cast(c.type)
                                          for c in schema], schema=schema)
            for c in range(copies):
                path = dest / dtype / f"k{k}-{c}-{Path(f['path']).name}"
                path.parent.mkdir(parents=True, exist_ok=True)
                fmt.write_shard(path, table, {"task_type": "causal-lm", "top_k": k}, meta)
                out[dtype].append(path)
    return out


def stream(paths: list[Path], dtype: str) -> tuple[float, int]:
    src = ParquetSource(paths, "causal-lm", dtype, False)
    ds = StreamingDataset(src, Collate("causal-lm", 0, True, value_dtype=dtype), 32)
    ds.set_epoch(0)
    t0, n = time.perf_counter(), 0
    for b in ds:
        n += b["b_idx"].numel()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache", type=Path)
    ap.add_argument("--ks", default="8,32,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--copies", type=int, default=8, help="each shard streamed this many times per pass")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.ks.split(",")):
            files = rewrite(args.cache, k, Path(tmp), args.copies)
            for dtype in files:
                stream(files[dtype], dtype)  # warm the page cache and the allocator
            seconds = {d: [] for d in files}
            for r in range(args.repeats):
                for dtype in (list(files) if r % 2 == 0 else list(files)[::-1]):
                    s, n = stream(files[dtype], dtype)
                    seconds[dtype].append(s)
            ratios = [a / b for a, b in zip(seconds["float16"], seconds["code"])]
            rows.append({"k": k, "positions": n, **{d: n / statistics.median(v) for d, v in seconds.items()},
                         "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
                         "bytes": {d: sum(p.stat().st_size for p in files[d]) / n for d in files}})
    block = render(rows, args, load)
    print(block)
    if not args.no_write:
        text = RESULTS.read_text(encoding="utf-8")
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            anchor = "<!-- bench_layout:end -->"
            text = text.replace(anchor, anchor + "\n\n" + block, 1) if anchor in text else text + "\n" + block + "\n"
        io.write_text(RESULTS, text)


def render(rows: list[dict], args, load) -> str:
    lines = [BEGIN + " (generated by bench/bench_stream.py; replaced on each run)",
             f"### Streaming both layouts through kd train's loader, {datetime.now(timezone.utc).isoformat(timespec='seconds')}", "",
             f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one used (torch, Arrow and "
             f"OMP threads 1, no loader workers); load average at start {load[0]:.2f}.",
             f"- Data: `{args.cache}` ({rows[0]['positions'] // args.copies:,} positions, streamed {args.copies}× per pass), re-written as format 1 (float16 z/T) and format 2 "
             f"(code) at each k; `ParquetSource` -> `StreamingDataset` (batches of 32 rows, shuffled) -> `Collate`; "
             f"{args.repeats} interleaved repeats, medians; ratio = format 2 positions/s ÷ format 1, per repeat.", "",
             "| k | format 1 (float16) positions/s | format 2 (code) positions/s | **2 ÷ 1** | per-repeat | B/position 1 → 2 |",
             "|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['float16'] / 1e6:.2f} M | {r['code'] / 1e6:.2f} M | **{r['ratio']:.2f}** | "
                     f"{r['lo']:.2f}–{r['hi']:.2f} | {r['bytes']['float16']:.1f} → {r['bytes']['code']:.1f} |")
    return "\n".join(lines) + "\n" + END


if __name__ == "__main__":
    main()
