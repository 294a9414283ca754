"""The configuration of each stage, defined once: a dataclass whose fields carry their defaults
and help text. The CLI's flags (`pipeline.cli`), the keys of `--config FILE.yaml`, of `kd run`'s
pipeline YAML and of sweep files are all derived from these fields, and the README's flag tables
are checked against them by a test, so a flag cannot exist in one place and not the others.

Field metadata: `help` (the flag's help), `choices`, `required`, `multiple`, `metavar`,
`secondary` (the `--no-…` form of a boolean flag), `cli=False` for settings that only
programs set, and `key=False` for settings that do not change a stage's result (so they stay
out of its output key: changing them resumes rather than refuses).

`build` is the one door into a stage config, from the command line, a --config file, a
pipeline YAML or a sweep entry alike: it refuses unknown keys, missing required ones, values
of the wrong type (checked against the field annotations, so `top_k: eight` fails before any
stage runs, not as a TypeError an hour into stage 1), choices, and non-finite floats.
`load_yaml` is the one YAML reader: it bounds what a document may expand to (a 600-byte
billion-laughs file expands to gigabytes through its aliases).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.errors import KDError, short

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSSES = ("kl", "kl-renorm", "reverse-kl", "jsd")
TARGET_MODES = ("topk", "sampled")
NO_DEFAULT = dataclasses.MISSING


def flag(default: Any = NO_DEFAULT, help: str = "", **meta) -> Any:  # noqa: A002 (click's word)
    """A config field that is also a command-line flag."""
    meta["help"] = help
    if default is NO_DEFAULT:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any) -> Any:
    """A setting that programs pass (e.g. progress bars off in tests), not a flag."""
    return dataclasses.field(default=default, metadata={"cli": False, "key": False})


def comma_values(raw: Any, flag: str, convert, example: str, what: str = "values") -> list:
    """A list flag given as `a,b,c` (CLI) or a YAML list, as converted values; blanks are skipped,
    and a value that does not convert, or nothing at all, is a one-line refusal."""
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, (list, tuple)) else [raw]
    values = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            if isinstance(item, bool):
                raise ValueError
            values.append(convert(text))
        except ValueError:
            raise KDError(f"{flag} must be {what} separated by commas, e.g. {example}, not {short(raw)}") from None
    if not values:
        raise KDError(f"{flag} is empty: give at least one value, e.g. {example}")
    return values


@dataclasses.dataclass
class TeacherConfig:
    """Stage 1: run the teacher once and cache its top-k soft targets as Parquet shards."""

    model: str = flag(help="Teacher: a local directory or a hub id.", required=True)
    data: str = flag(help="A .jsonl/.json/.csv/.parquet/.txt file or glob, a save_to_disk directory, or a hub dataset.",
                     required=True)
    task_type: str = flag(help="What a target position is.", required=True, choices=tasks.NAMES)
    out: str | None = flag(None, "Output directory (with --cache-root: a symlink to the keyed cache).")
    split: str = flag("train", "Split of --data to read.")
    encoding: str = flag("utf-8", "Text encoding of .csv/.json/.jsonl/.txt --data files, e.g. latin-1.")
    text_column: str | None = flag(None, "Default: text (tokens for token-classification).")
    text_pair_column: str | None = flag(None, "Second text of a pair (sequence-classification).")
    label_column: str | None = flag(None, "Default: label / ner_tags where present.")
    id_column: str | None = flag(None, "Default: id where present, else the row index.")
    max_length: int = flag(512, "Tokens per example (longer inputs are truncated and counted).")
    top_k: int = flag(32, "Ids kept per position (classification: min(k, C), so exact).")
    target_mode: str = flag("topk", "What a position stores: the top-k ids, or ids sampled from the teacher's "
                                    "distribution at T (unbiased; --samples draws).", choices=TARGET_MODES)
    samples: int = flag(12, "sampled: draws per position, with replacement (distinct ids and counts are stored).")
    sample_seed: int = flag(0, "sampled: seed of the draws (with the cache key and the row, so reruns and "
                               "job-array tasks draw the same ids).")
    temperature: float | None = flag(None, "T of the stored z/T (default: the first of --temperatures, else 1).")
    temperatures: Any = flag(None, "A grid of T, e.g. 1,2,4: z/T stored at the first, plus the full-vocabulary logsumexp "
                                   "at every one, so students train at any of them with the exact tail.",
                             metavar="T1,T2,...")
    dtype: str = flag("auto", "Teacher compute dtype (auto: bf16 on a GPU, float32 on the CPU).", choices=DTYPES)
    value_dtype: str = flag("auto", "How top-k values are stored: code (format 2: a bounded-error code, ~5e-6 nats of KL per "
                                    "position, the fewest bytes), or float16 / float32 z/T (format 1); auto: code for a "
                                    "vocabulary, float32 for classes (exact, a few bytes per example).",
                            choices=("auto", "code", "float16", "float32"))
    batch_tokens: int = flag(16384, "Token budget per teacher batch (padded).")
    shard_rows: int | None = flag(None, "Rows per shard (default: 50000 for classification, 1M/max-length otherwise).")
    mask_seed: int = flag(0, "masked-lm: seed of the masks.")
    mask_prob: float = flag(0.15, "masked-lm: masking probability.")
    task_index: int | None = flag(None, "This task's index (default: from SLURM/PBS/LSF/SGE array variables, else 0).")
    num_tasks: int | None = flag(None, "Number of array tasks (default: from the array variables, else 1).")
    cache_root: str | None = flag(None, "Keep the cache at CACHE_ROOT/<key> so other runs reuse it.")
    limit: int | None = flag(None, "Use only the first N rows.")
    device: str = flag("auto", "cuda when present, else cpu.")
    progress: bool = internal(True)
    profile: bool = internal(False)  # synchronised body / head timers in the stats (benchmarks only)

    def grid(self) -> list[float]:
        """The temperatures the cache is built for, the stored one first: --temperatures, or [--temperature]
        (1 when neither is given). Refused unless positive, finite and distinct, and unless a --temperature
        given beside a grid is its first entry: the values are stored at that one, so the two would contradict."""
        if self.temperatures is None:
            t = 1.0 if self.temperature is None else float(self.temperature)
            if not (math.isfinite(t) and t > 0):
                raise KDError(f"--temperature must be a positive finite number, got {t}")
            return [t]
        grid = comma_values(self.temperatures, "--temperatures", float, "1,2,4", "numbers")
        for i, t in enumerate(grid):
            if not (math.isfinite(t) and t > 0):
                raise KDError(f"--temperatures must all be positive finite numbers, got {t:g}; drop it from the grid")
            if any(math.isclose(t, u, rel_tol=1e-9) for u in grid[:i]):
                raise KDError(f"--temperatures lists {t:g} twice; give each temperature once")
        if self.temperature is not None and not math.isclose(float(self.temperature), grid[0], rel_tol=1e-9):
            raise KDError(f"--temperature {self.temperature:g} is not the first of --temperatures "
                          f"{','.join(f'{t:g}' for t in grid)} (the T the values are stored at); drop --temperature "
                          f"or list {self.temperature:g} first")
        return grid

    def resolved(self) -> "TeacherConfig":
        """This config with the grid settled: temperature = its first entry, temperatures = the grid as
        floats when it has more than one (else None, so a one-entry grid is recorded, keyed and stored
        exactly as --temperature alone)."""
        grid = self.grid()
        return dataclasses.replace(self, temperature=grid[0], temperatures=grid if len(grid) > 1 else None,
                                   value_dtype=self.stored_dtype())

    def stored_dtype(self) -> str:
        """--value-dtype with auto settled: the code where it pays (a vocabulary's top-k), float32 where
        the values are few and exact ones cost nothing (a classifier's C classes)."""
        if self.value_dtype != "auto":
            return self.value_dtype
        return "float32" if tasks.get(self.task_type).classification else "code"


@dataclasses.dataclass
class TrainConfig:
    """Stage 2: train a student from a targets cache (stage 0 without one); resumes from its checkpoints."""

    out: str | None = flag(None, "Output directory of the student.", key=False)
    targets: list[str] | None = flag(None, "A complete targets cache (absent: plain fine-tuning on --data with "
                                           "cross-entropy); repeat to stream several caches of one teacher as one "
                                           "training set, e.g. a labelled one and an unlabelled transfer set.",
                                     multiple=True, metavar="DIR")
    data: str | None = flag(None, "Without --targets: the dataset to fine-tune on (as for `kd teacher`).")
    split: str = flag("train", "Without --targets: the split of --data.")
    encoding: str = flag("utf-8", "Without --targets: text encoding of --data files (as for `kd teacher`).", key=False)
    task_type: str | None = flag(None, "Without --targets: the task (with --targets it comes from the cache).",
                                 choices=tasks.NAMES)
    text_column: str | None = flag(None, "Without --targets: as for `kd teacher`.")
    text_pair_column: str | None = flag(None, "Without --targets: as for `kd teacher`.")
    label_column: str | None = flag(None, "Without --targets: as for `kd teacher`.")
    labels: Any = flag(None, "Without --targets: label names in id order, e.g. neg,pos (default: from the data).")
    max_length: int = flag(512, "Without --targets: tokenisation length.")
    limit: int | None = flag(None, "Without --targets: use only the first N rows.")
    student: str | None = flag(None, "The student: a local directory or a hub id.")
    student_from_teacher: str | None = flag(None, "Cut the student from this teacher (with --student-layers).",
                                            metavar="MODEL")
    student_layers: Any = flag(None, "Teacher layers the student keeps, e.g. 0,2,4.")
    alpha: float = flag(0.5, "Loss = alpha*T^2*KD + (1-alpha)*CE on hard labels.")
    temperature: float | None = flag(None, "Training temperature (default: the cache's).")
    loss: str = flag("kl", "Divergence of the KD term.", choices=LOSSES)
    epochs: int = flag(3, "Passes over the data.")
    max_steps: int | None = flag(None, "Stop after N optimizer steps (overrides --epochs).")
    lr: float = flag(5e-5, "Peak learning rate (AdamW, linear warmup and decay).")
    batch_size: int = flag(32, "Rows per micro-batch (per process).")
    grad_accum: int = flag(1, "Micro-batches per optimizer step.")
    warmup_ratio: float = flag(0.0, "Fraction of the steps spent warming up.")
    weight_decay: float = flag(0.01, "AdamW weight decay (not on biases and norms).")
    max_grad_norm: float = flag(1.0, "Gradient clipping (0: off).")
    seed: int = flag(0, "Seed of the initialisation, the data order and the masks.")
    dtype: str = flag("auto", "Autocast dtype (weights stay float32); auto: bf16 on a GPU, float32 on the CPU.",
                      choices=DTYPES)
    save_every: int = flag(500, "Checkpoint every N steps (0: never).", key=False)
    eval_targets: str | None = flag(None, "A held-out targets cache: report validation KD loss and agreement.", key=False)
    sweep: str | None = flag(None, "YAML/JSON list of overrides; trains entry --task-index into OUT/<name>.", key=False)
    task_index: int | None = flag(None, "Sweep entry (default: from SLURM/PBS/LSF/SGE array variables).", key=False)
    fused_head: bool = flag(True, "LM students: fuse the output projection with the loss, chunk by chunk (no full "
                                  "[positions, vocabulary] logits); the same result, less memory and time.",
                            secondary="--no-fused-head", key=False)
    num_workers: int = flag(1, "DataLoader worker processes per rank.")
    shuffle_buffer: int | None = flag(None, "Rows kept back for shuffling across row groups (default: a row group's worth).")
    device: str = flag("auto", "cuda when present, else cpu.")
    progress: bool = internal(True)

    def __post_init__(self):
        if isinstance(self.targets, (str, Path)):  # one cache, as programs and older YAML files give it
            self.targets = [str(self.targets)]
        elif self.targets is not None:
            self.targets = [str(t) for t in self.targets] or None


@dataclasses.dataclass
class EvalConfig:
    """Stage 3: score students on a labelled split and against the teacher, with their size and speed."""

    model: list[str] = flag(help="A student (any model directory); repeat for several.", required=True, multiple=True)
    out: str = flag(help="Output directory: metrics.parquet, report.md, plot.png, manifest.json.", required=True, key=False)
    data: str | None = flag(None, "The labelled split's data (as for kd teacher); with --targets optional and checked "
                                  "against the cache.")
    split: str = flag("test", "Split of --data.")
    encoding: str = flag("utf-8", "Text encoding of --data files (as for `kd teacher`).", key=False)
    targets: str | None = flag(None, "Targets cache of this split: teacher metrics and comparisons without rerunning the teacher.")
    teacher: str | None = flag(None, "Teacher model: without --targets it runs here once (cached under OUT/targets); "
                                     "with --targets it is only timed.")
    task_type: str | None = flag(None, "Default: from the cache, the students' manifests or their configs.",
                                 choices=tasks.NAMES)
    text_column: str | None = flag(None, "Without --targets: default text (tokens for token-classification).")
    text_pair_column: str | None = flag(None, "Without --targets: as for `kd teacher`.")
    label_column: str | None = flag(None, "Default: label / ner_tags where present.")
    id_column: str | None = flag(None, "Default: id where present, else the row index.")
    max_length: int | None = flag(None, "Default: the cache's, else 512.")
    top_k: int = flag(32, "k of the targets when --teacher runs here.")
    mask_seed: int = flag(0, "masked-lm without --targets: seed of the masks.")
    mask_prob: float = flag(0.15, "masked-lm without --targets: masking probability.")
    batch_size: int = flag(32, "Rows per forward (and the batch of the examples/s figure).")
    timing_examples: int = flag(64, "Rows each model is timed on.")
    bootstrap: int = flag(1000, "Paired bootstrap resamples (seeded) for the 95% intervals of the differences between "
                                "models; 0: none.")
    time_teacher: bool = flag(True, "Load the cache's teacher to measure its size and speed.", secondary="--no-time-teacher")
    limit: int | None = flag(None, "Use only the first N rows.")
    device: str = flag("auto", "cuda when present, else cpu.")
    dtype: str = flag("auto", "Model dtype (auto: bf16 on a GPU, float32 on the CPU).", choices=DTYPES)
    progress: bool = internal(True)


# `kd tune` trains one `kd train` student per (T, alpha, loss) grid point. It takes every `kd train`
# flag, applied to every point, except those it sets per point (TUNE_SETS) and those of fine-tuning
# without a cache (TUNE_DROPS: tune always distils from one). Derived, not copied, so that a new
# `kd train` flag is a `kd tune` flag too.
TUNE_SETS = ("out", "temperature", "alpha", "loss", "eval_targets", "sweep", "task_index")
TUNE_DROPS = ("data", "split", "encoding", "task_type", "text_column", "text_pair_column", "label_column", "labels",
              "max_length", "limit")


def _tune_config():
    own = [
        ("eval_targets", "str", flag(help="The validation targets cache every point is scored on (of the teacher, "
                                          "tokenizer and task of --targets).", required=True, metavar="DIR")),
        ("out", "str", flag(help="Output directory: points/<name>/ (the students), evals/<name>/, tune.parquet, "
                                 "heatmap.png, report.md, manifest.json.", required=True, key=False)),
        ("temperatures", "Any", flag("1,2,4", "Training temperatures T of the grid.", metavar="T1,T2,...")),
        ("alphas", "Any", flag("0.5,0.9,1.0", "KD weights alpha of the grid (each in [0, 1]).", metavar="A1,A2,...")),
        ("losses", "Any", flag("kl", f"Divergences of the grid ({', '.join(LOSSES)}).", metavar="L1,L2,...")),
        ("task_index", "int | None", flag(None, "Train and evaluate only grid point N (array task N of `kd slurm tune`; "
                                                "default: from SLURM/PBS/LSF/SGE array variables, else every point, "
                                                "then the outputs).", key=False)),
    ]
    inherited = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in TUNE_SETS + TUNE_DROPS:
            continue
        if f.name == "targets":  # required: tune distils from the cache(s)
            meta = {**f.metadata, "required": True, "help": "The training targets cache(s) every point streams (the "
                                                            "teacher never runs again)."}
            inherited.append((f.name, f.type, dataclasses.field(metadata=meta)))
        else:
            inherited.append((f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                                metadata=f.metadata)))
    return dataclasses.make_dataclass(
        "TuneConfig", own + inherited, kw_only=True,
        namespace={"__module__": __name__, "__doc__": "Choose T, alpha and the loss by measurement: one student per "
                                                      "grid point from the same cache(s), each scored on a validation "
                                                      "cache; the best point is named in report.md.",
                   "__post_init__": TrainConfig.__post_init__})  # --targets: always a list, as kd train's


TuneConfig = _tune_config()
STAGES = {"teacher": TeacherConfig, "train": TrainConfig, "eval": EvalConfig, "tune": TuneConfig}


def flags(cls) -> list[dataclasses.Field]:
    """The fields of a stage config that are command-line flags, in definition order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def result_settings(cfg) -> dict[str, Any]:
    """The settings that decide a stage's result: what its output key is computed over."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("key", True)}


def recorded(cfg) -> dict[str, Any]:
    """The settings a manifest records: every flag (not the programs-only ones)."""
    return {f.name: getattr(cfg, f.name) for f in flags(type(cfg))}


def normalize_keys(values: Any, where: str) -> dict[str, Any]:
    """A mapping of flag names to values, with `max-length` and `max_length` meaning the same;
    the one place where YAML keys (a --config file, a pipeline, a sweep entry) become field names."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise KDError(f"{where} must be a mapping of flag names to values, not a {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def check_keys(values: dict, allowed, where: str) -> None:
    """Refuse keys that are not settings: a typo found after an hour of teacher work is an hour lost."""
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise KDError(f"unknown key {unknown[0]!r}{more} in {where} (allowed: {', '.join(sorted(allowed))})")


def build(cls, values: dict[str, Any], where: str):
    """A stage config from normalised keys, refusing unknown keys, missing required ones and
    values of the wrong type; numbers given as strings ("1e-4", which YAML 1.1 reads as a
    string) are converted."""
    check_keys(values, [f.name for f in dataclasses.fields(cls)], where)
    missing = [flag_name(f) for f in dataclasses.fields(cls)
               if f.default is NO_DEFAULT and f.default_factory is NO_DEFAULT and f.name not in values]
    if missing:
        raise KDError(f"{where}: missing {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: _typed(fields[k], hints[k], v, where) for k, v in values.items()})


def _typed(f: dataclasses.Field, hint, value: Any, where: str) -> Any:
    """`value` as the type `hint` of field `f`, or a one-line refusal naming the key."""
    name = f.name.replace("_", "-")
    args = typing.get_args(hint)
    if value is None and (type(None) in args or hint is Any or f.default is None):
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    want = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(hint, "a value")
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise KDError(f"{where}: {name} must be a finite number, not {value}")
        value = float(value) if ok else value
    elif hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is list:
        value = [value] if isinstance(value, str) else list(value) if isinstance(value, tuple) else value
        if value == [] and f.default is None:  # a repeatable flag not given
            return None
        ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    else:  # Any: a comma-separated string or a list of plain values (--labels, --student-layers)
        ok = isinstance(value, (str, int)) and not isinstance(value, bool) \
            or isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value)
        want = "a string or a list"
    if not ok:
        raise KDError(f"{where}: {name} must be {want}, not {short(value)}")
    if f.metadata.get("choices") and value not in f.metadata["choices"]:
        raise KDError(f"{where}: {name} must be one of {', '.join(f.metadata['choices'])}, not {short(value)}")
    return value


def check_name(name: Any, where: str) -> str:
    """A name that becomes one directory under an output (a sweep entry, a pipeline's student):
    one path component, so that `../../x` cannot train outside the directory it belongs in."""
    text = str(name) if isinstance(name, (str, int)) and not isinstance(name, bool) else None
    if not text or text in (".", "..") or len(text) > 200 or any(c in text for c in "/\\") \
            or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise KDError(f"{where}: name {short(name)} must be a plain directory name (no '/', not '..', no control "
                      f"characters, at most 200 characters)")
    return text


MAX_YAML_NODES = 100_000


def load_yaml(path: str | Path, what: str) -> Any:
    """The YAML document of `path` as Python values, refused (one line, nothing echoed) when it
    cannot be read, is not YAML, or expands to more than MAX_YAML_NODES values."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KDError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise KDError(f"cannot read {what} {path}: {exc.strerror}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _bounded(node, path, what)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise KDError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    finally:
        loader.dispose()


def _bounded(root, path, what: str) -> None:
    """Count the values a YAML node tree expands to, aliases counted every time they are used
    (each distinct node is visited once, so this is linear in the document's size)."""
    import yaml

    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    active: set[int] = set()
    while stack:
        node, done = stack.pop()
        kids = [] if isinstance(node, yaml.ScalarNode) else \
            [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else list(node.value)
        if done:
            active.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise KDError(f"{what} {path} expands to more than {MAX_YAML_NODES} values through its aliases (&/*); "
                              f"refusing it as a YAML bomb: write the values out")
            continue
        if id(node) in sizes:
            continue
        if id(node) in active:
            raise KDError(f"{what} {path} has an alias inside the value it names (a recursive structure); write the values out")
        active.add(id(node))
        stack.append((node, True))
        stack += [(k, False) for k in kids if id(k) not in sizes]
