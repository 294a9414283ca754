"""What stage 1 knows before it loads the teacher's weights: the inputs, their fingerprints
and the cache key (DESIGN.md, "Manifests and the cache key").

Kept in the library, apart from the recipe, because `kd slurm` needs the key too: with
`--cache-root` the output directory is named by it, so the submitter computes it (hashing
tokenizer, data and weights, no forward pass) to see which tasks are still missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import format as fmt
from pipeline import tasks
from pipeline.config import TeacherConfig
from pipeline.data import Columns, load_split
from pipeline.errors import KDError
from pipeline.fingerprint import cache_key, dataset_fingerprint, model_fingerprint, resolve_model_dir, tokenizer_fingerprint
from pipeline.models import capped_length, load_config, load_tokenizer


@dataclasses.dataclass
class Inputs:
    """Everything stage 1 knows before loading the teacher's weights."""

    model_dir: Path
    tokenizer: object
    mconfig: object
    dataset: object
    cols: Columns
    id_column: str | None
    top_k: int | None               # None for a sampled cache
    outputs: int
    fingerprints: dict
    key: str
    max_length: int                 # --max-length, capped at what the teacher takes (models.position_limit)
    vocab_limit: int | None = None  # a padded vocabulary: outputs past the tokenizer are left out (pipeline.fit)
    sampling: dict | None = None    # --target-mode sampled: {"mode", "samples", "seed"}; None for top-k


def resolve_inputs(cfg: TeacherConfig) -> Inputs:
    """Resolve model, tokenizer and data, fingerprint them and derive the cache key."""
    grid = cfg.grid()  # refused before any hashing
    model_dir = resolve_model_dir(cfg.model)
    mconfig = load_config(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    max_length = capped_length(cfg.max_length, mconfig, tokenizer, "the teacher")
    dataset = load_split(cfg.data, cfg.split, cfg.limit, cfg.encoding)
    cols = Columns.resolve(dataset.column_names, cfg.task_type, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    if cfg.id_column and cfg.id_column not in dataset.column_names:
        raise KDError(f"--id-column {cfg.id_column!r} is not a column of the data (columns: {', '.join(dataset.column_names)})")
    id_column = cfg.id_column or ("id" if "id" in dataset.column_names else None)
    task = tasks.get(cfg.task_type)
    outputs = task.outputs(mconfig)
    vocab_limit = len(tokenizer) if not task.classification and outputs > len(tokenizer) else None
    outputs = vocab_limit or outputs
    top_k = min(cfg.top_k, outputs) if task.classification else cfg.top_k  # exact over C classes
    sampling = _sampling(cfg, task, grid)
    if sampling is not None:
        top_k = None  # a sampled cache stores no top-k: --top-k means nothing to it, in the key or the manifest
    elif top_k > outputs:
        raise KDError(f"--top-k {top_k} is larger than the teacher's vocabulary ({outputs}); use --top-k {outputs} or less")
    fps = {
        "teacher": model_fingerprint(model_dir),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": dataset_fingerprint(cfg.data, cfg.split, dataclasses.asdict(cols) | {"id": id_column},
                                       len(dataset), cfg.limit, getattr(dataset, "_fingerprint", None), cfg.encoding),
    }
    mask = {"seed": cfg.mask_seed, "prob": cfg.mask_prob} if task.masked else None
    key = cache_key(teacher=fps["teacher"], tokenizer=fps["tokenizer"], dataset=fps["dataset"],
                    task_type=cfg.task_type, max_length=max_length, top_k=top_k,
                    temperature=grid[0], value_dtype=cfg.stored_dtype(), mask=mask,
                    format_version=fmt.version_of(cfg.stored_dtype(), "sampled" if sampling else "topk"),
                    vocab_limit=vocab_limit, temperatures=grid, sampling=sampling)
    return Inputs(model_dir, tokenizer, mconfig, dataset, cols, id_column, top_k, outputs, fps, key, max_length, vocab_limit,
                  sampling)


def _sampling(cfg: TeacherConfig, task, grid: list[float]) -> dict | None:
    """`--target-mode sampled`'s settings, checked; None for top-k caches. Refused where a sample
    would be worse than what top-k already gives (classification stores every class, exactly) or
    where its estimator would not be unbiased (a grid: draws at T0 are not draws at T1)."""
    if cfg.target_mode == "topk":
        return None
    if task.classification:
        raise KDError(f"--target-mode sampled is for vocabularies; a {cfg.task_type} cache already stores every class "
                      f"exactly with --top-k: drop --target-mode")
    if len(grid) > 1:
        raise KDError("--target-mode sampled draws at one temperature; drop --temperatures or use --target-mode topk")
    if not 1 <= cfg.samples <= fmt.MAX_SAMPLES:
        raise KDError(f"--samples must be between 1 and {fmt.MAX_SAMPLES}, got {cfg.samples}")
    if not 0 <= cfg.sample_seed < 2**63:
        raise KDError(f"--sample-seed must be a whole number in [0, 2^63), got {cfg.sample_seed}")
    return {"mode": "sampled", "samples": int(cfg.samples), "seed": int(cfg.sample_seed)}


