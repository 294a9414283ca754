"""The denser top-k layout (pipeline/layout.py) against today's (format.write_shard), on a real cache.

    python bench/bench_layout.py CACHE_DIR [--ks 8,32,128] [--repeats 5] [--no-write]

CACHE_DIR is a `kd teacher --value-dtype float32` cache (the KL reference needs float32 values);
its k is the largest measured, smaller k are its first columns (rank order, as a reader truncates).
Every shard is re-encoded twice with every other column kept: today's layout (float16 z/T, written
by format.write_shard) and the new one (pipeline.layout: flat per-row lists, written by
layout.write_table, the other columns encoded as write_shard does). Measured per k:

* bytes: whole files (all columns, footer) / target positions, and per column from the Parquet
  metadata;
* fidelity against the float32 values: the (k+1)-bucket KL of pipeline/softtargets.py (stored mass
  above 1 -> renormalised, tail 0, log q floored at log(float64 tiny) as pipeline.metrics does), of
  what each layout's reader returns (float32 z/T and lse), plus, for the new layout, the KL of its
  log-prob output (decode(..., log_probs=True)) and the float32 floor: the float32 values against
  themselves re-rounded once (half an ulp of noise), which is what any float32 z/T output carries;
* max top-k mass - 1 of what the reader returns;
* read + decode on one core: the target columns of every row group (as the loader reads them) to
  numpy, today as stored (int32 ids, float16 z/T: the loader casts on the device) and, for
  reference, cast to float32; the new layout decoded to int32 ids + float32 z/T + lse. Repeats are
  interleaved with a rotating order; medians;
* readers: pyarrow, polars, datasets (Dataset.from_parquet), duckdb, each with a real query on ids
  and values checked against pyarrow (duckdb decodes the new layout in SQL: hot-id table from the
  footer, code deltas summed by a window).
* alternatives (ids + values columns only, same data): the layouts weighed before choosing.

The table is printed and written into bench/RESULTS.md between `<!-- bench_layout:begin` and
`<!-- bench_layout:end -->` (appended at the end of the "Stage 1" section the first time).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import format as fmt  # noqa: E402
from pipeline import layout  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Stage 1"
BEGIN, END = "<!-- bench_layout:begin", "<!-- bench_layout:end -->"
TODAY_TARGETS = ["topk_ids", "topk_logits", "lse"]
NEW_TARGETS = list(layout.COLUMNS)
TINY = np.log(np.finfo(np.float64).tiny)
GOALS = {128: 250.0, 32: 80.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data

def load(cache: Path):
    shards = []
    for path in sorted((cache / "shards").glob("*.parquet")):
        meta = fmt.file_metadata(path)
        if meta.get("value_dtype") != "float32":
            sys.exit(f"{path}: value dtype {meta.get('value_dtype')}; the KL reference needs a --value-dtype float32 cache")
        t = pq.read_table(path)
        k = int(meta["top_k"])
        counts = np.diff(t.column("positions").combine_chunks().offsets.to_numpy())
        ids = t.column("topk_ids").combine_chunks().flatten().flatten().to_numpy().reshape(-1, k)
        vals = t.column("topk_logits").combine_chunks().flatten().flatten().to_numpy().reshape(-1, k)
        lse = t.column("lse").combine_chunks().flatten().to_numpy()
        shards.append({"path": path, "table": t, "meta": meta, "counts": counts, "ids": ids, "vals": vals, "lse": lse})
    if not shards:
        sys.exit(f"{cache}: no shards/*.parquet")
    return shards


def nested(flat2d: np.ndarray, counts, typ) -> pa.Array:
    k = flat2d.shape[1]
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, flat2d.size + 1, k, dtype=np.int32)),
                                     pa.array(np.ascontiguousarray(flat2d).reshape(-1), type=typ))
    outer = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(outer, inner)


def write_today(path: Path, s: dict, k: int) -> None:
    t = s["table"]
    cols = {"topk_ids": nested(s["ids"][:, :k], s["counts"], pa.int32()),
            "topk_logits": nested(s["vals"][:, :k].astype(np.float16), s["counts"], pa.float16())}
    t = pa.table({n: cols.get(n, t.column(n)) for n in t.column_names}).cast(
        fmt.schema(s["meta"]["task_type"], "float16"))
    fmt.write_shard(path, t, {**s["meta"], "top_k": k, "value_dtype": "float16"})


def write_new(path: Path, s: dict, k: int) -> dict:
    cols, lmeta = layout.encode(s["ids"][:, :k], s["vals"][:, :k], s["lse"], vocab_size=VOCAB[0])
    arrs = layout.to_arrow(cols, s["counts"], k)
    t = s["table"]
    names = [n for n in t.column_names if n not in ("topk_ids", "topk_logits", "lse")] + list(arrs)
    table = pa.table({n: arrs[n] if n in arrs else t.column(n) for n in names})
    meta = {**s["meta"], "top_k": str(k), "value_dtype": "layout"}
    per_row = max(1.0, len(s["lse"]) / max(1, table.num_rows))
    layout.write_table(path, table, {**meta, **lmeta}, row_group_size=max(1, int(fmt.POSITIONS_PER_ROW_GROUP / per_row)),
                       column_encoding={f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in ("input_ids", "positions")},
                       write_statistics=["row"])
    return lmeta


def column_bytes(paths) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in paths:
        md = pq.ParquetFile(p).metadata
        for g in range(md.num_row_groups):
            for i in range(md.num_columns):
                c = md.row_group(g).column(i)
                name = c.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + c.total_compressed_size
    return out


def file_meta(path) -> dict[str, str]:
    return layout.read_metadata(pq.ParquetFile(path))


# ------------------------------------------------------------------------------------------- reading

def read_today(paths, cast: bool):
    n = 0
    for p in paths:
        pf = pq.ParquetFile(p)
        for g in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(g, columns=TODAY_TARGETS, use_threads=False)
            ids = t.column("topk_ids").combine_chunks().flatten().flatten().to_numpy()
            vals = t.column("topk_logits").combine_chunks().flatten().flatten().to_numpy()
            lse = t.column("lse").combine_chunks().flatten().to_numpy()
            if cast:
                vals = vals.astype(np.float32)
            n += len(lse) + 0 * len(ids)
    return n


def read_new(paths, metas, decode: bool = True):
    n = 0
    for p, m in zip(paths, metas):
        pf = pq.ParquetFile(p)
        for g in range(pf.metadata.num_row_groups):
            cols = layout.from_arrow(pf.read_row_group(g, columns=NEW_TARGETS, use_threads=False))
            if decode:
                ids, vals, lse = layout.decode(cols, m)
            n += len(cols["lse"])
    return n


def decode_all(paths, metas, new: bool):
    out = []
    for p, m in zip(paths, metas):
        t = pq.read_table(p, columns=NEW_TARGETS if new else TODAY_TARGETS)
        if new:
            out.append(layout.decode(layout.from_arrow(t), m))
        else:
            k = int(m["top_k"])
            out.append((t.column("topk_ids").combine_chunks().flatten().flatten().to_numpy().reshape(-1, k),
                        t.column("topk_logits").combine_chunks().flatten().flatten().to_numpy().astype(np.float32).reshape(-1, k),
                        t.column("lse").combine_chunks().flatten().to_numpy()))
    return [np.concatenate(x) for x in zip(*out)]


def log_q(paths, metas):
    """The new layout read as log-probs (layout.decode(..., log_probs=True)): no float32 z/T rounding."""
    out = [layout.decode(layout.from_arrow(pq.read_table(p, columns=NEW_TARGETS)), m, log_probs=True)[1] for p, m in zip(paths, metas)]
    return np.concatenate(out).astype(np.float64)


# ------------------------------------------------------------------------------------------- fidelity

def buckets(logp: np.ndarray):
    """(k+1)-bucket distribution of softtargets.py: mass >= 1 -> renormalised, tail 0."""
    mass = np.exp(logp).sum(1)
    over = mass >= 1.0
    logp = logp.copy()
    logp[over] -= np.log(mass[over])[:, None]
    return logp, np.where(over, 0.0, 1.0 - mass)


def kl(ref_logp: np.ndarray, q_logp: np.ndarray) -> np.ndarray:
    lp, pt = buckets(ref_logp)
    lq, qt = buckets(q_logp)
    with np.errstate(divide="ignore", invalid="ignore"):
        top = (np.exp(lp) * (lp - np.maximum(lq, TINY))).sum(1)
        tail = np.where(pt > 0, pt * (np.log(np.where(pt > 0, pt, 1.0)) - np.maximum(np.log(qt), TINY)), 0.0)
    return np.maximum(top + tail, 0.0)


def rerounded(vals32: np.ndarray, seed: int = 0) -> np.ndarray:
    """float32 values rounded independently once more (0 or +-1 ulp, as two roundings of one exact value
    differ): the floor of any layout whose reader returns float32 z/T computed from other numbers."""
    v = vals32.astype(np.float64)
    ulp = np.spacing(np.abs(vals32)).astype(np.float64)
    return (v + np.random.default_rng(seed).uniform(-1.0, 1.0, v.shape) * ulp).astype(np.float32)


# -------------------------------------------------------------------------------------------- readers

def check_readers(path: Path, new: bool, meta: dict, tmp: Path) -> dict[str, str]:
    ids, vals, lse = decode_all([path], [meta], new)
    k = ids.shape[1]
    idc, valc = ("topk_rids", "topk_code_deltas") if new else ("topk_ids", "topk_logits")
    t = pq.read_table(path)
    first = (lambda c: t.column(c)[0][0]) if new else (lambda c: t.column(c)[0][0][0])
    want_i, want_v = int(first(idc).as_py()), float(first(valc).as_py())
    out = {"pyarrow": f"ok ({t.num_rows} rows)"}
    try:
        import polars as pl

        df = pl.read_parquet(path)
        one = (lambda c: pl.col(c).list.first()) if new else (lambda c: pl.col(c).list.first().list.first())
        got = df.select(one(idc), one(valc)).row(0)
        out["polars"] = "ok" if (int(got[0]), float(got[1])) == (want_i, want_v) else f"wrong values {got}"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        out["polars"] = f"fails: {str(exc).splitlines()[0][:90]}"
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp / "hf"))
        row = ds[0]
        got = (row[idc][0], row[valc][0]) if new else (row[idc][0][0], row[valc][0][0])
        out["datasets"] = "ok" if (int(got[0]), float(got[1])) == (want_i, want_v) else "wrong values"
    except Exception as exc:  # noqa: BLE001
        out["datasets"] = f"fails: {str(exc).splitlines()[0][:90]}"
    try:
        import duckdb

        con = duckdb.connect()
        con.execute("SET threads = 1")
        if new:
            rows = con.execute(layout.duckdb_sql(str(path))).fetchnumpy()
            same = np.array_equal(rows["id"].reshape(-1, k), ids)
            err = float(np.abs(rows["logq"].reshape(-1, k) - (vals.astype(np.float64) - lse[:, None])).max())
            out["duckdb"] = f"ok: SQL decode of all {ids.size:,} (id, log q): ids {'equal' if same else 'DIFFER'}, max |Δ log q| {err:.1e}"
        else:
            got = con.execute(f"SELECT sum(topk_ids[1][1]), sum(topk_logits[1][1]) FROM read_parquet('{path}')").fetchone()
            out["duckdb"] = f"ok ({got})"
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).splitlines()[0][:110]
        try:
            import duckdb

            ok_ids = duckdb.sql(f"SELECT sum(topk_ids[1][1]) FROM read_parquet('{path}')").fetchone()[0] is not None
            msg += "; a query on topk_ids alone works" if ok_ids else ""
        except Exception:  # noqa: BLE001
            pass
        out["duckdb"] = f"fails: {msg}"
    return out


# --------------------------------------------------------------------------------------- alternatives

def alt_bytes(ids, vals, lse, counts, k) -> list[tuple[str, float, float]]:
    """(name, ids-column B/position, values-column B/position) for the layouts weighed."""
    P = len(lse)

    def colb(a2d, typ, enc="BYTE_STREAM_SPLIT"):
        buf = io.BytesIO()
        pq.write_table(pa.table({"x": nested(a2d, counts, typ)}), buf, use_dictionary=False,
                       column_encoding={"x.list.element.list.element": enc}, compression="zstd", compression_level=1,
                       row_group_size=max(1, int(fmt.POSITIONS_PER_ROW_GROUP / (P / len(counts)))))
        md = pq.ParquetFile(pa.BufferReader(buf.getvalue())).metadata
        return sum(md.row_group(g).column(0).total_compressed_size for g in range(md.num_row_groups)) / P

    ids_k, V = ids[:, :k], vals[:, :k]
    logp = V.astype(np.float64) - lse[:, None]
    step = layout.step_for(k)
    codes = layout._codes(np.maximum(-logp, 0), step, layout.CAP)
    _, fwd = layout.hot_remap(ids_k.astype(np.int64), VOCAB[0])
    R = fwd[ids_k]
    o_nat, o_hot = np.argsort(ids_k, 1, kind="stable"), np.argsort(R, 1, kind="stable")
    gaps = lambda S: np.diff(S, axis=1, prepend=0).astype(np.int32)  # noqa: E731
    tk = lambda a, o: np.take_along_axis(a, o, 1)  # noqa: E731
    deltas = np.diff(codes, axis=1, prepend=0).astype(np.int32)
    rank_nat, rank_hot = colb(ids_k.astype(np.int32), pa.int32()), colb(R.astype(np.int32), pa.int32())
    return [
        ("v1: rank-order ids (int32, BSS) + float16 z/T (BSS)", rank_nat, colb(V.astype(np.float16), pa.float16())),
        ("rank-order ids + float16 log-probs, PLAIN (DuckDB-readable)", rank_nat,
         colb(logp.astype(np.float16), pa.float16(), "PLAIN")),
        ("sorted id gaps (int32, BSS) + float16 log-probs in id order, PLAIN", colb(gaps(tk(ids_k, o_nat)), pa.int32()),
         colb(tk(logp, o_nat).astype(np.float16), pa.float16(), "PLAIN")),
        ("sorted id gaps + sqrt codes in id order (uint16, BSS)", colb(gaps(tk(ids_k, o_nat)), pa.int32()),
         colb(tk(codes, o_nat).astype(np.uint16), pa.uint16())),
        ("sorted id gaps, DELTA_BINARY_PACKED + sqrt codes in id order", colb(gaps(tk(ids_k, o_nat)), pa.int32(), "DELTA_BINARY_PACKED"),
         colb(tk(codes, o_nat).astype(np.uint16), pa.uint16())),
        ("hot-remapped sorted id gaps + sqrt codes in id order", colb(gaps(tk(R, o_hot)), pa.int32()),
         colb(tk(codes, o_hot).astype(np.uint16), pa.uint16())),
        ("rank-order ids + sqrt-code deltas (no remap)", rank_nat, colb(deltas, pa.int32())),
        ("**chosen**: hot-remapped rank-order ids + sqrt-code deltas", rank_hot, colb(deltas, pa.int32())),
    ]


VOCAB = [None]  # the teacher's vocabulary size, from the cache's tokenizer (set in main)


# ----------------------------------------------------------------------------------------------- main

def measure(shards, ks, repeats: int, work: Path) -> dict:
    res = {"ks": ks, "per_k": {}}
    positions = sum(len(s["lse"]) for s in shards)
    ref_all = [(s["ids"], s["vals"], s["lse"]) for s in shards]
    for k in ks:
        log(f"k = {k}: re-encoding {len(shards)} shard(s) both ways")
        d = work / f"k{k}"
        (d / "today").mkdir(parents=True, exist_ok=True)
        (d / "new").mkdir(parents=True, exist_ok=True)
        today, new, metas = [], [], []
        t_new = t_today = 0.0
        for s in shards:
            t0 = time.perf_counter()
            write_today(d / "today" / s["path"].name, s, k)
            t_today += time.perf_counter() - t0
            t0 = time.perf_counter()
            lmeta = write_new(d / "new" / s["path"].name, s, k)
            t_new += time.perf_counter() - t0
            today.append(d / "today" / s["path"].name)
            new.append(d / "new" / s["path"].name)
            metas.append({**file_meta(new[-1]), **lmeta})
        tmetas = [file_meta(p) for p in today]
        r = {"bytes": {}, "step": float(metas[0]["layout_step"]), "hot": len(metas[0]["layout_hot_ids"].split(",")),
             "write_s": {"today": t_today, "new": t_new}}
        for name, paths in (("today", today), ("new", new)):
            r["bytes"][name] = {"total": sum(p.stat().st_size for p in paths) / positions,
                                "columns": {c: b / positions for c, b in column_bytes(paths).items()}}
        r["hot_footer"] = sum(len(m["layout_hot_ids"]) for m in metas) / positions
        # fidelity
        ref_vals = np.concatenate([v[:, :k] for _, v, _ in ref_all])
        ref_lse = np.concatenate([x for _, _, x in ref_all])
        ref_ids = np.concatenate([i[:, :k] for i, _, _ in ref_all])
        ref_logp = ref_vals.astype(np.float64) - ref_lse[:, None]
        fid = {}
        for name, paths, ms in (("today", today, tmetas), ("new", new, metas)):
            ids, vals, lse = decode_all(paths, ms, name == "new")
            if name == "new" and not np.array_equal(ids, ref_ids):
                sys.exit(f"k = {k}: the new layout did not give back the ids in rank order")
            kv = kl(ref_logp, vals.astype(np.float64) - lse.astype(np.float64)[:, None])
            mass = np.exp(vals.astype(np.float64) - lse.astype(np.float64)[:, None]).sum(1)
            fid[name] = {"mean": kv.mean(), "max": kv.max(), "p99": float(np.quantile(kv, 0.99)), "mass": mass.max() - 1.0}
        lq = log_q(new, metas)
        kv = kl(ref_logp, lq)
        fid["new_exact"] = {"mean": kv.mean(), "max": kv.max(), "p99": float(np.quantile(kv, 0.99)), "mass": np.exp(lq).sum(1).max() - 1.0}
        kv = kl(ref_logp, rerounded(ref_vals).astype(np.float64) - ref_lse[:, None])
        fid["floor"] = {"mean": kv.mean(), "max": kv.max(), "p99": float(np.quantile(kv, 0.99)), "mass": float("nan")}
        r["fidelity"] = fid
        # read speed, interleaved
        log(f"k = {k}: read + decode, {repeats} interleaved repeats")
        fns = {"today": lambda t=today: read_today(t, False), "today_f32": lambda t=today: read_today(t, True),
               "new": lambda n=new, m=metas: read_new(n, m), "new_read": lambda n=new, m=metas: read_new(n, m, False)}
        for f in fns.values():  # warm the page cache and the decoders once
            f()
        times = {n: [] for n in fns}
        names = list(fns)
        for rep in range(repeats):
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
        r["speed"] = {n: positions / statistics.median(v) for n, v in times.items()}
        r["speed_ratios"] = [a / b for a, b in zip(times["today"], times["new"])]
        log(f"k = {k}: readers")
        r["readers"] = {"today": check_readers(today[0], False, tmetas[0], work), "new": check_readers(new[0], True, metas[0], work)}
        r["alternatives"] = alt_bytes(np.concatenate([x["ids"] for x in shards]), np.concatenate([x["vals"] for x in shards]),
                                      np.concatenate([x["lse"] for x in shards]), np.concatenate([x["counts"] for x in shards]), k)
        res["per_k"][k] = r
    return res


def fmt_kl(x: float) -> str:
    return "–" if x != x else f"{x:.1e}"


def render(res: dict, info: dict) -> str:
    L = [f"{BEGIN} (generated by bench/bench_layout.py; replaced on each run) -->",
         f"### A denser top-k layout (`pipeline/layout.py`), {info['date']}", "",
         f"- Machine: {info['machine']}; one core (OMP_NUM_THREADS=1, pyarrow cpu/io threads 1); load average at start {info['load']}.",
         f"- Software: Python {info['python']}, numpy {info['numpy']}, pyarrow {info['pyarrow']}, polars {info['polars']}, "
         f"datasets {info['datasets']}, duckdb {info['duckdb']}.",
         f"- Data: `{info['cache']}`: {info['model']} (vocab {info['vocab']:,}), first {info['rows']:,} rows of "
         f"`{info['data']}`, causal-lm, max length {info['max_length']}, T = {info['temperature']}: **{info['positions']:,} target "
         f"positions**, one k = {info['k']} float32 cache; smaller k are its first columns. Each shard re-encoded both ways with every "
         f"other column kept; {info['repeats']} interleaved read repeats, medians. Whole bench {info['seconds']:.0f} s.",
         f"- Reproduce: `{info['command']} --out CACHE && python bench/bench_layout.py CACHE --repeats {info['repeats']}`.", "",
         "| k | layout | **B/position** | ids | values | lse | shift | other columns + footer | goal |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, r in res["per_k"].items():
        for name, ic, vc in (("today (v1, float16 z/T)", "topk_ids", "topk_logits"), ("new", "topk_rids", "topk_code_deltas")):
            b = r["bytes"]["today" if name.startswith("today") else "new"]
            cols = b["columns"]
            shift = cols.get("topk_shift", 0.0)
            other = b["total"] - cols.get(ic, 0) - cols.get(vc, 0) - cols.get("lse", 0) - shift
            goal = f"≤ {GOALS[k]:.0f}" if k in GOALS and name == "new" else ""
            L.append(f"| {k} | {name} | **{b['total']:.1f}** | {cols.get(ic, 0):.1f} | {cols.get(vc, 0):.1f} | {cols.get('lse', 0):.1f} | "
                     f"{shift:.1f} | {other:.1f} | {goal} |")
    L += ["", "New layout: `topk_rids` and `topk_code_deltas` list<int32> (a row's P·k items flat) BYTE_STREAM_SPLIT, `topk_shift` "
              "list<float16> PLAIN, `lse` list<float32> BYTE_STREAM_SPLIT; zstd 1, no dictionary. Other columns + footer include the "
              "hot-id list in the footer: " + ", ".join(f"k = {k}: {r['hot']:,} ids, {r['hot_footer']:.2f} B/position"
                                                        for k, r in res["per_k"].items()) + ". Writing all shards, "
              "today (float16 cast + write) vs new (encode + write): " + ", ".join(
                  f"k = {k}: {r['write_s']['today']:.2f} vs {r['write_s']['new']:.2f} s" for k, r in res["per_k"].items()) + ".", "",
          "| k | values as read | mean KL (nats) | p99 KL | max KL | max top-k mass − 1 |", "|---:|---|---:|---:|---:|---:|"]
    labels = {"today": "today: float16 z/T", "new": "**new: `layout.decode`, float32 z/T**",
              "new_exact": "new: `decode(..., log_probs=True)`, float32 log q", "floor": "float32 floor: float32 values re-rounded once"}
    for k, r in res["per_k"].items():
        for n, lab in labels.items():
            f = r["fidelity"][n]
            mean = f"**{fmt_kl(f['mean'])}**" if n == "new" else fmt_kl(f["mean"])
            L.append(f"| {k} | {lab} | {mean} | {fmt_kl(f['p99'])} | {fmt_kl(f['max'])} | {fmt_kl(f['mass'])} |")
    L += ["", f"KL: the (k+1)-bucket KL(float32 ‖ read) of pipeline/softtargets.py; a read mass ≥ 1 is renormalised with a tail of 0 "
              f"(log q floored at {TINY:.0f}, as pipeline.metrics does), so a head rounded up past a true tail of 1e-4 costs ~0.07 "
              f"nats at that position. Sqrt-code step D = " + ", ".join(f"{r['step']:.3g} (k = {k})" for k, r in res["per_k"].items()) +
          ": per-position target 5e-6. Where the z/T output exceeds the log-prob output, it is float32 rounding of z/T "
          f"(lse up to {info['lse_max']:.0f} here, ulp {np.spacing(np.float32(info['lse_max'])):.0e}) against tails below ~1e-5, which the floor "
          "row shows for the float32 values themselves.", "",
          "| k | read today (int32 ids, float16 z/T as stored) | today + cast to float32 | **new: read + decode to int32 ids, float32 z/T, lse** | "
          "**new ÷ today** | per-repeat | new, read only (decode left to the device) | read only ÷ today |",
          "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for k, r in res["per_k"].items():
        sp = r["speed"]
        rr = r["speed_ratios"]
        L.append(f"| {k} | {sp['today'] / 1e6:.2f} M/s | {sp['today_f32'] / 1e6:.2f} M/s | **{sp['new'] / 1e6:.2f} M/s** | "
                 f"**{sp['new'] / sp['today']:.2f}** | {min(rr):.2f}–{max(rr):.2f} | {sp['new_read'] / 1e6:.2f} M/s | "
                 f"{sp['new_read'] / sp['today']:.2f} |")
    L += ["", "Positions per second on one core: the target columns of every row group to numpy, as the loader reads them.", "",
          "| k | layout | pyarrow | polars | datasets | duckdb |", "|---:|---|---|---|---|---|"]
    for k, r in res["per_k"].items():
        for name in ("today", "new"):
            rd = r["readers"][name]
            L.append(f"| {k} | {name} | {rd['pyarrow']} | {rd['polars']} | {rd['datasets']} | {rd['duckdb']} |")
    per = res["per_k"]
    ok = lambda c: "met" if c else "**not met**"  # noqa: E731
    sizes = "; ".join(f"≤ {g:.0f} B/position at k = {k}: {per[k]['bytes']['new']['total']:.1f}, "
                      f"{ok(per[k]['bytes']['new']['total'] <= g)}" for k, g in GOALS.items() if k in per)
    worst = max(r["fidelity"]["new"]["mean"] for r in per.values())
    ratios = [r["speed"]["new"] / r["speed"]["today"] for r in per.values()]
    reads = [r["speed"]["new_read"] / r["speed"]["today"] for r in per.values()]
    duck = all(r["readers"]["new"]["duckdb"].startswith("ok") for r in per.values())
    L += ["", f"Goals: {sizes}; mean KL ≤ 1e-5: at most {worst:.1e}, {ok(worst <= 1e-5)}; read + decode at least as fast as "
              f"today's read: {min(ratios):.2f}–{max(ratios):.2f}×, {ok(min(ratios) >= 1)} (reading alone: {min(reads):.2f}–"
              f"{max(reads):.2f}×, so the gap is the numpy decode); pyarrow, polars, datasets and DuckDB (with an SQL decode) "
              f"on the new layout: {ok(duck)}."]
    L += ["", "Alternatives (ids + values columns only, B/position; all as today's list<list<>> nesting, zstd 1, no dictionary; "
              "codes use the chosen step; sorted ids: values re-ordered with them):", "",
          "| layout | " + " | ".join(f"k = {k}: ids + values" for k in res["per_k"]) + " |",
          "|---|" + "---:|" * len(res["per_k"])]
    alts = {k: r["alternatives"] for k, r in res["per_k"].items()}
    first = next(iter(alts.values()))
    for i, (name, _, _) in enumerate(first):
        cells = [f"{a[i][1]:.1f} + {a[i][2]:.1f} = **{a[i][1] + a[i][2]:.1f}**" for a in alts.values()]
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L += ["", END]
    return "\n".join(L)


def write_results(block: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        i, j = text.index(BEGIN), text.index(END) + len(END)
        text = text[:i] + block + text[j:]
    else:
        start = text.find(SECTION)
        if start < 0:
            text = text.rstrip() + f"\n\n{SECTION} — teacher\n\n{block}\n"
        else:
            nxt = text.find("\n## ", start + len(SECTION))
            nxt = len(text) if nxt < 0 else nxt + 1
            text = text[:nxt].rstrip() + "\n\n" + block + "\n\n" + text[nxt:]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomically: RESULTS.md is never half-written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", type=Path, help="a kd teacher --value-dtype float32 cache directory")
    ap.add_argument("--ks", default="8,32,128", help="k values to measure (each <= the cache's k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    t0 = time.monotonic()
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    man = json.loads((args.cache / "manifest.json").read_text())
    VOCAB[0] = int(man["stats"].get("outputs") or man["fingerprints"]["tokenizer"]["vocab_size"])
    shards = load(args.cache)
    kmax = shards[0]["ids"].shape[1]
    ks = sorted({int(x) for x in args.ks.split(",")})
    if ks[-1] > kmax:
        sys.exit(f"--ks {args.ks}: the cache holds k = {kmax}")
    with tempfile.TemporaryDirectory(prefix="kd-layout-") as tmp:
        res = measure(shards, ks, args.repeats, Path(tmp))
    import datasets
    import duckdb
    import polars

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": f"{cpu}, {os.cpu_count()} cores",
            "load": load_avg, "python": platform.python_version(), "numpy": np.__version__, "pyarrow": pa.__version__,
            "polars": polars.__version__, "datasets": datasets.__version__, "duckdb": duckdb.__version__,
            "cache": args.cache, "model": Path(man["config"]["model"]).name, "vocab": VOCAB[0], "rows": man["stats"]["rows"],
            "data": man["config"]["data"], "max_length": man["config"]["max_length"], "temperature": man["config"]["temperature"],
            "positions": sum(len(s["lse"]) for s in shards), "k": kmax, "lse_max": float(max(s["lse"].max() for s in shards)), "repeats": args.repeats, "seconds": time.monotonic() - t0}
    c = man["config"]
    info["command"] = (f"kd teacher --model {c['model']} --task-type {c['task_type']} --data {c['data']} --text-column "
                       f"{c['columns']['text']} --max-length {c['max_length']} --top-k {c['top_k']} --value-dtype float32"
                       + (f" --limit {c['limit']}" if c.get("limit") else ""))
    block = render(res, info)
    print(block)
    if not args.no_write:
        write_results(block)
        log(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
