"""The evaluation's outputs: metrics.parquet, the report.md table and the cost/quality plot.

One fixed schema serves every task type (columns that do not apply stay null), so that tables
from many runs concatenate and a missing number reads as missing rather than as 0. Students are
shown relative to the teacher because "92% of the teacher at 6x the speed" is the decision a
distillation run exists to inform; where the teacher's number is unknown the ratio stays empty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline import io, tasks, uncertainty

LOWER_IS_BETTER = {"perplexity", "ece", "kl", "latency_p50_ms"}
LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "entity_precision": "entity P",
          "entity_recall": "entity R", "entity_f1": "entity F1", "perplexity": "perplexity",
          "ece": "ECE", "agreement": "top-1 agreement", "kl": "KL(T‖S)"}

_STR, _F, _I = "str", "f64", "i64"
COLUMNS = {
    "name": _STR, "model": _STR, "role": _STR, "scored_from": _STR, "task_type": _STR,
    "metric": _STR, "value": _F, "pct_of_teacher": _F,
    "accuracy": _F, "macro_f1": _F, "entity_precision": _F, "entity_recall": _F, "entity_f1": _F,
    "perplexity": _F, "ece": _F, "agreement": _F, "kl": _F, "teacher_labels_outside_topk": _F,
    "rows": _I, "positions": _I, "params": _I, "disk_bytes": _I, "param_ratio": _F,
    "examples_per_s": _F, "speedup": _F, "latency_p50_ms": _F, "timing_batch_size": _I, "timing_examples": _I,
}


def relative(rows: list[dict]) -> list[dict]:
    """Each row with its primary metric as a % of the teacher's, its parameter ratio and
    speed-up. For lower-is-better metrics (perplexity) the % is teacher / student, so that
    100% always means "as good as the teacher" and more is better."""
    teacher = next((r for r in rows if r.get("role") == "teacher"), None)
    out = []
    for r in rows:
        r = {**r}
        t = teacher or {}
        r["pct_of_teacher"] = _ratio(t.get("value"), r.get("value")) if r.get("metric") in LOWER_IS_BETTER \
            else _ratio(r.get("value"), t.get("value"))
        if r["pct_of_teacher"] is not None:
            r["pct_of_teacher"] *= 100.0
        r["param_ratio"] = _ratio(r.get("params"), t.get("params"))
        r["speedup"] = _ratio(r.get("examples_per_s"), t.get("examples_per_s"))
        out.append(r)
    return out


def _ratio(a, b) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return float(a) / float(b)


def write_metrics(path: Path, rows: list[dict]) -> None:
    import polars as pl

    dtypes = {_STR: pl.Utf8, _F: pl.Float64, _I: pl.Int64}
    data = {c: [r.get(c) for r in rows] for c in COLUMNS}
    df = pl.DataFrame(data, schema={c: dtypes[t] for c, t in COLUMNS.items()})
    with io.atomic_path(path) as tmp:
        df.write_parquet(tmp)


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"


def _count(n) -> str:
    if n is None:
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def table(rows: list[dict], task_type: str) -> str:
    """The markdown table: the teacher first as the reference, then the students as given."""
    primary, *extra = tasks.get(task_type).metrics
    head = ["model", "role", LABELS[primary], "% of teacher", *(LABELS[c] for c in extra),
            "agreement", "KL(T‖S)", "params", "size (MB)", "ex/s", "speed-up", "p50 ms (batch 1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in sorted(rows, key=lambda r: r.get("role") != "teacher"):
        params = _count(r.get("params"))
        if r.get("role") != "teacher" and r.get("param_ratio") is not None:
            params += f" ({100 * r['param_ratio']:.0f}%)"
        value = _num(r.get(primary), 2 if primary == "perplexity" else 4)
        if r.get("role") == "teacher" and primary == "perplexity" and r.get("teacher_labels_outside_topk"):
            value = f"≥{value}"
        cells = [
            f"`{r['name']}`", r.get("role", ""), value,
            f"{r['pct_of_teacher']:.1f}%" if r.get("pct_of_teacher") is not None else "—",
            *(_num(r.get(c), 4) for c in extra),
            _num(r.get("agreement"), 4), _num(r.get("kl"), 4), params,
            _num(r["disk_bytes"] / 1e6, 2) if r.get("disk_bytes") is not None else "—",
            _num(r.get("examples_per_s"), 1),
            f"{r['speedup']:.2f}×" if r.get("speedup") is not None else "—",
            _num(r.get("latency_p50_ms"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_row(name: str, path: str, role: str, scored_from: str, task_type: str, scores: dict, cost: dict) -> dict:
    metric = tasks.get(task_type).primary_metric
    return {"name": name, "model": path, "role": role, "scored_from": scored_from, "task_type": task_type,
            "metric": metric, "value": scores.get(metric), **scores, **cost}


def teacher_notes(stats: dict, teacher: dict) -> list[str]:
    """What the teacher's numbers mean when they come from a top-k cache rather than a forward."""
    T, k, task = float(stats["temperature"]), int(stats["top_k"]), tasks.get(stats["task_type"])
    if k >= int(stats["outputs"]):  # every output stored: z = T * (z/T) exactly, nothing is left out
        notes = [f"KL(T‖S) at T = 1 over all {stats['outputs']} outputs: the cache stores every one (k = "
                 f"{stats['outputs']}), so the teacher's distribution is exact at any T and so is the KL."]
    elif T != 1.0 and 1.0 in [float(t) for t in stats.get("temperatures") or []]:  # a grid holding T = 1
        notes = [f"KL(T‖S) at T = 1 over the teacher's stored top-{k} plus one bucket for the remaining (tail) mass: "
                 f"the cache holds z/T at T = {T:g} and, on its temperature grid, the full logsumexp at T = 1."]
    else:
        notes = [f"KL(T‖S) at T = 1 over the teacher's stored top-{k}"
                 + (" plus one bucket for the remaining (tail) mass." if T == 1.0 else
                    f", renormalised: the cache holds z/T at T = {T:g}, so the T = 1 tail is unknown "
                    f"(a proxy, exact when the tail is small).")]
    if task.classification and teacher.get("ece") is None:
        notes.append(f"Teacher ECE is empty: from the top-{k} of {stats['outputs']} classes at T = {T:g} "
                     f"its T = 1 confidence is not recoverable.")
    elif not task.classification and teacher.get("perplexity") is None:
        notes.append(f"Teacher perplexity is empty: the cache holds z/T at T = {T:g}, from which a token's T = 1 "
                     f"probability is not recoverable; evaluate with a T = 1 cache (or --teacher without --targets).")
    elif teacher.get("teacher_labels_outside_topk"):
        notes.append(f"Teacher perplexity comes from the cache: {100 * teacher['teacher_labels_outside_topk']:.1f}% of "
                     f"target tokens fell outside the stored top-{k}; for those p is taken as min(tail mass, p_k), "
                     f"an upper bound, so the value is a lower bound (≥).")
    return notes


def markdown(rows: list[dict], task_type: str, header: list[str], notes: list[str],
             plot_name: str | None, comparisons: list[dict] | None = None) -> str:
    if any(r.get("role") == "teacher" for r in rows):
        notes = ["% of teacher = student ÷ teacher (for perplexity, lower is better: teacher ÷ student); "
                 "params % = student ÷ teacher parameters; speed-up = student ÷ teacher examples/s.", *notes]
    parts = [f"# kd eval — {task_type}", "", *(x for h in header for x in (h, "")), table(rows, task_type), ""]
    if comparisons:
        parts += comparison_lines(comparisons, [r["name"] for r in rows])
    if notes:
        parts += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    if plot_name:
        parts += [f"![{LABELS[tasks.get(task_type).primary_metric]} against parameters and examples/s]({plot_name})", ""]
    return "\n".join(parts)


COMPARISON_COLUMNS = {"a": _STR, "b": _STR, "metric": _STR, "diff": _F, "ci_low": _F, "ci_high": _F, "p_value": _F,
                      "n_rows": _I}
_CMP = {"accuracy": ("accuracy", "percentage points", 100.0, True),
        "nll_per_token": ("mean NLL per token", "nats", 1.0, False)}


def write_comparisons(path: Path, comparisons: list[dict]) -> None:
    """comparisons.parquet: one row per ordered pair of models (pipeline.uncertainty.compare)."""
    import polars as pl

    dtypes = {_STR: pl.Utf8, _F: pl.Float64, _I: pl.Int64}
    df = pl.DataFrame({c: [r.get(c) for r in comparisons] for c in COMPARISON_COLUMNS},
                      schema={c: dtypes[t] for c, t in COMPARISON_COLUMNS.items()})
    with io.atomic_path(path) as tmp:
        df.write_parquet(tmp)


def comparison_lines(comparisons: list[dict], order: list[str] | None = None) -> list[str]:
    """The report's words on each difference: its size, 95% interval, p-value and whether it is noise.

    With the table's `order`, each pair is said once, later row vs earlier (every student vs the
    teacher, and vs each student above it): b vs a is a vs b with the sign flipped, and the
    parquet file keeps both."""
    if order:
        rank = {n: i for i, n in enumerate(order)}
        comparisons = [c for c in comparisons if rank.get(c["a"], 0) > rank.get(c["b"], 0)] or comparisons
    metric = comparisons[0]["metric"]
    label, unit, scale, higher = _CMP[metric]
    lines = [f"Differences ({label}, a − b on the same {comparisons[0]['n_rows']} rows; paired bootstrap 95% interval "
             f"resampling rows{', McNemar exact p' if any(c['p_value'] is not None for c in comparisons) else ''}; "
             f"{'higher' if higher else 'lower'} is better):", ""]
    for c in comparisons:
        d = c["diff"] * scale
        ci = (f"95% CI [{c['ci_low'] * scale:+.2f}, {c['ci_high'] * scale:+.2f}]" if c["ci_low"] is not None
              else "no interval")
        p = f", p = {c['p_value']:.3g}" if c["p_value"] is not None else ""
        better = "better" if (d > 0) == higher else "worse"
        size = f"{abs(d):.2f} {unit} {better}" if d else "no difference"
        lines.append(f"- `{c['a']}` vs `{c['b']}`: {size} ({d:+.2f}; {ci}{p}): {uncertainty.verdict(c)}.")
    return [*lines, ""]


def plot(path: Path, rows: list[dict], task_type: str) -> None:
    """Metric against parameters and against examples/s; the teacher is a red star, and also a
    dashed line so that it stays visible when its cost was not measured."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    metric = tasks.get(task_type).primary_metric
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    fig.suptitle(f"{task_type}: {LABELS[metric]} against cost")
    teacher = next((r for r in rows if r.get("role") == "teacher"), None)
    for ax, x, xlabel in ((axes[0], "params", "parameters"), (axes[1], "examples_per_s", "examples/s (this device)")):
        for r in rows:
            if r.get(x) is None or r.get(metric) is None or not math.isfinite(r[metric]):
                continue
            is_t = r.get("role") == "teacher"
            ax.scatter([r[x]], [r[metric]], marker="*" if is_t else "o", s=220 if is_t else 50,
                       color="tab:red" if is_t else "tab:blue", zorder=3, label="teacher" if is_t else None)
            ax.annotate(r["name"], (r[x], r[metric]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if teacher is not None and teacher.get(metric) is not None and math.isfinite(teacher[metric]):
            ax.axhline(teacher[metric], color="tab:red", linestyle="--", linewidth=1, label="teacher level")
        if any(r.get(x) for r in rows):
            ax.set_xscale("log")  # labelled at 1-2-5 steps: models often sit within one decade
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: _si(v)))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.15, y=0.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(LABELS[metric] + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="best", fontsize=8)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _si(v: float) -> str:
    """12000000 -> '12M': axis labels for parameter counts and throughputs."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def training_summary(metrics_path: Path) -> dict:
    """First and last losses (means over up to 10 steps) and evaluations, from a student's metrics.jsonl:
    what its manifest's stats and `kd slurm summary` show."""
    steps, evals = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        (evals if rec.get("event") == "eval" else steps if "event" not in rec else []).append(rec)

    def mean(recs):
        return {k: (sum(r[k] for r in recs) / len(recs) if recs and all(r.get(k) is not None for r in recs) else None)
                for k in ("loss", "kd", "ce")}

    n = max(1, min(10, len(steps) // 4))
    return {"initial": mean(steps[:n]), "final": mean(steps[-n:]),
            "eval_initial": next((e for e in evals if e["step"] == 0), None),
            "eval_final": next((e for e in reversed(evals) if e["step"] > 0), None)}
