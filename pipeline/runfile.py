"""The pipeline YAML of `kd run`: one file naming the data, the teacher, the cache, the
students and the evaluation, turned into the stage configs that the recipes take.

Everything is checked before any stage runs -- unknown keys (at every level, against the
stages' own flags), missing files, a student list without names -- because a typo found after
an hour of teacher inference is an hour lost.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from pipeline import config, tasks, tuning
from pipeline.errors import KDError, short

TOP_KEYS = {"name", "workdir", "task_type", "data", "teacher", "targets", "students", "tune", "eval"}
DATA_KEYS = {"train", "transfer", "validation", "test", "text_column", "text_pair_column", "label_column", "id_column", "limit"}
TEACHER_KEYS = {"model", "finetune"}
PACKAGE_PREFIX = "python-package:"


@dataclasses.dataclass
class Plan:
    """The stage configs of one pipeline, in execution order."""

    name: str
    workdir: Path
    finetune: Any | None            # TrainConfig of stage 0, or None
    targets: dict[str, Any]         # split -> TeacherConfig
    students: list[tuple[str, Any]]  # (name, TrainConfig)
    evaluation: Any | None          # EvalConfig
    tune: Any | None = None         # TuneConfig of a `tune:` block
    from_tune: set[str] = dataclasses.field(default_factory=set)  # students whose T, alpha, loss the tune picks


def _norm(d: Any, where: str) -> dict[str, Any]:
    return config.normalize_keys(d, where)


def _check_keys(d: dict, allowed: set[str], where: str, path: Path) -> None:
    try:
        config.check_keys(d, allowed, where)
    except KDError as exc:
        raise KDError(f"{path}: {exc}") from None


def output_dir(value: str, base: Path) -> str:
    """A directory the pipeline writes (workdir, cache root): relative to the YAML's folder, never a hub id."""
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else base / p)


def resolve_path(value: str, base: Path, what: str, path: Path, must_exist: bool | None = None) -> str:
    """A file named in the YAML: relative to the YAML's folder; `python-package:PKG/sub/dir`
    names a folder inside an installed package (how the demo finds its bundled teacher)."""
    value = str(value)
    if value.startswith(PACKAGE_PREFIX):
        pkg, _, sub = value[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise KDError(f"{path}: {what} names package {pkg!r}, which is not installed (pip install it, e.g. the [demo] extra)")
        found = Path(list(spec.submodule_search_locations)[0]) / sub
        if not found.exists():
            raise KDError(f"{path}: {what} {value!r}: {found} does not exist")
        return str(found)
    p = Path(os.path.expanduser(value))
    p = p if p.is_absolute() else base / p
    explicit = value.startswith(("/", "./", "../", "~")) or any(ch in value for ch in "*?[")
    if p.exists() or any(ch in value for ch in "*?["):
        return str(p)
    if must_exist or (must_exist is None and explicit):
        raise KDError(f"{path}: {what} {value!r} does not exist ({p})")
    return value  # a hub id


def _build(cls, values: dict, where: str, path: Path):
    try:
        return config.build(cls, values, where)
    except KDError as exc:
        raise KDError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise KDError(f"{path}: {where}: {exc}") from None


def _strings(d: dict, keys, where: str, path: Path) -> None:
    """Values the YAML names files, columns or directories with must be strings (numbers pass as text)."""
    for k in keys:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float))):
            raise KDError(f"{path}: {where}{k} must be a string, not {short(v)}")


def _pop_bool(entry: dict, key: str, default: bool, where: str, path: Path) -> bool:
    """A pipeline-only switch of a student or tune entry (not a flag of its stage), taken out of it."""
    value = entry.pop(key, default)
    if not isinstance(value, bool):
        raise KDError(f"{path}: {where}{key} must be true or false, not {short(value)}")
    return value


def _train_caches(entry: dict, work: Path, transfer: bool, where: str, path: Path) -> list[str]:
    """The caches a student streams by default: the train split's, plus the transfer set's when the
    pipeline has one and the entry does not say `transfer: false` (a labelled-only baseline)."""
    use = _pop_bool(entry, "transfer", True, where, path)
    return [str(work / "targets" / "train")] + ([str(work / "targets" / "transfer")] if transfer and use else [])


def _from_tune(s: dict, where: str, path: Path, tune: bool) -> bool:
    """`from_tune: true`: the student takes T, alpha and loss from the tune grid's best point, so it
    trains after the grid, and may not set them itself."""
    use = _pop_bool(s, "from_tune", False, where, path)
    if use and not tune:
        raise KDError(f"{path}: {where}from_tune needs a tune: block (the grid whose best point it trains at)")
    own = [k for k in ("temperature", "alpha", "loss") if k in s]
    if use and own:
        raise KDError(f"{path}: {where}from_tune takes {', '.join(own)} from the tune's best point; remove {own[0]}")
    return use


def _students(entries: Any, path: Path, base: Path, work: Path, teacher_model: str, validation: bool,
              transfer: bool = False, tune: bool = False) -> tuple[list, set[str]]:
    """(name, TrainConfig) of each `students:` entry (a name is one directory under workdir/students),
    and the names of those that train at the tune's best point."""
    if not isinstance(entries or [], list):
        raise KDError(f"{path}: students must be a list of mappings (flag: value), each with a name")
    students, from_tune = [], set()
    for i, s in enumerate(entries or []):
        s = _norm(s, f"students[{i}]")
        name = s.pop("name", None)
        if not name:
            raise KDError(f"{path}: students[{i}] needs a name (its output goes to workdir/students/NAME)")
        name = config.check_name(name, f"{path}: students[{i}]")
        if _from_tune(s, f"students[{i}].", path, tune):
            from_tune.add(name)
        _strings(s, ("student", "student_from_teacher") if s.get("student_from_teacher") is not True else ("student",),
                 f"students[{i}].", path)
        if s.get("student_from_teacher") is True:
            s["student_from_teacher"] = teacher_model  # `true` means: the (fine-tuned) teacher of this pipeline
        elif s.get("student_from_teacher"):
            s["student_from_teacher"] = resolve_path(s["student_from_teacher"], base, f"students[{i}].student_from_teacher", path)
        elif s.get("student"):
            s["student"] = resolve_path(s["student"], base, f"students[{i}].student", path)
        caches = _train_caches(s, work, transfer, f"students[{i}].", path)
        values = {"targets": caches, "out": str(work / "students" / name), **s}
        if validation and "eval_targets" not in s:
            values["eval_targets"] = str(work / "targets" / "validation")
        students.append((name, _build(config.TrainConfig, values, f"students[{i}] ({name})", path)))
    if len({n for n, _ in students}) != len(students):
        raise KDError(f"{path}: two students share a name; names must be unique")
    return students, from_tune


def _tune(block: Any, path: Path, base: Path, work: Path, teacher_model: str, validation: bool, transfer: bool = False):
    """The TuneConfig of a `tune:` block (kd tune's flags): its grid trains from this pipeline's
    train cache into workdir/tune and is scored on its validation cache; paths are the YAML's."""
    if block is None:
        return None
    t = _norm(block, "tune")
    _check_keys(t, {f.name for f in config.flags(config.TuneConfig)} - {"task_index"} | {"transfer"}, "tune", path)
    caches = _train_caches(t, work, transfer, "tune.", path)
    own = t.get("student_from_teacher") is True
    _strings(t, ("student", "eval_targets", "out") + (() if own else ("student_from_teacher",)), "tune.", path)
    if own:
        t["student_from_teacher"] = teacher_model  # `true`: the (fine-tuned) teacher of this pipeline
    elif t.get("student_from_teacher"):
        t["student_from_teacher"] = resolve_path(t["student_from_teacher"], base, "tune.student_from_teacher", path)
    elif t.get("student"):
        t["student"] = resolve_path(t["student"], base, "tune.student", path)
    for k in ("eval_targets", "out"):
        if t.get(k):
            t[k] = output_dir(t[k], base)
    if t.get("targets"):
        t["targets"] = [output_dir(v, base) for v in ([t["targets"]] if isinstance(t["targets"], str) else t["targets"])]
    if not validation and not t.get("eval_targets"):
        raise KDError(f"{path}: tune scores each grid point on the validation split's cache: add data.validation "
                      f"(or tune.eval_targets)")
    values = {"targets": caches, "eval_targets": str(work / "targets" / "validation"), "out": str(work / "tune"), **t}
    cfg = _build(config.TuneConfig, values, "tune", path)
    try:
        tuning.grid(cfg.temperatures, cfg.alphas, cfg.losses)  # a bad grid fails now, not after stage 1
    except KDError as exc:
        raise KDError(f"{path}: tune: {exc}") from None
    return cfg


def load(path: str | Path, workdir: str | None = None) -> Plan:
    path = Path(path)
    doc = _norm(config.load_yaml(path, "pipeline file"), str(path))
    _check_keys(doc, TOP_KEYS, "the top level", path)
    _strings(doc, ("name", "workdir", "task_type"), "", path)
    base = path.resolve().parent
    task_type = doc.get("task_type")
    if not task_type:
        raise KDError(f"{path}: task_type is required ({', '.join(tasks.NAMES)})")
    work = Path(workdir) if workdir else Path(output_dir(doc.get("workdir", "runs/" + path.stem), base))

    data = _norm(doc.get("data"), "data")
    _check_keys(data, DATA_KEYS, "data", path)
    _strings(data, DATA_KEYS - {"limit"}, "data.", path)
    if "train" not in data:
        raise KDError(f"{path}: data.train is required (the split the teacher labels and the students learn from)")
    splits = {s: resolve_path(data[s], base, f"data.{s}", path)
              for s in ("train", "transfer", "validation", "test") if data.get(s)}
    columns = {k: data[k] for k in ("text_column", "text_pair_column", "label_column") if data.get(k)}
    limit = data.get("limit")
    limits = _norm(limit, "data.limit") if isinstance(limit, dict) else {s: limit for s in splits}

    teacher = _norm(doc.get("teacher"), "teacher")
    _check_keys(teacher, TEACHER_KEYS, "teacher", path)
    _strings(teacher, ("model",), "teacher.", path)
    if not teacher.get("model"):
        raise KDError(f"{path}: teacher.model is required")
    teacher_model = resolve_path(teacher["model"], base, "teacher.model", path)
    finetune = None
    if teacher.get("finetune") is not None:
        ft = _norm(teacher["finetune"], "teacher.finetune")
        ft = {"data": splits["train"], "split": "train", "task_type": task_type, "student": teacher_model,
              "limit": limits.get("train"), **columns, **ft, "out": str(work / "teacher")}
        finetune = _build(config.TrainConfig, ft, "teacher.finetune", path)
        teacher_model = finetune.out

    tgt = _norm(doc.get("targets"), "targets")
    _strings(tgt, ("cache_root",), "targets.", path)
    cache_root = tgt.pop("cache_root", None)
    cache_root = output_dir(cache_root, base) if cache_root else str(work / "caches")
    targets = {}
    for split, file in splits.items():
        # the transfer set is text without labels: its file need not have the label column
        cols = {k: v for k, v in columns.items() if split != "transfer" or k != "label_column"}
        values = {"model": teacher_model, "data": file, "split": split,
                  "task_type": task_type, "limit": limits.get(split), **cols, **tgt,
                  "cache_root": cache_root, "out": str(work / "targets" / split)}
        if split == "test":  # kd eval scores the teacher from a top-k cache, whatever the students train on
            values["target_mode"] = "topk"
        targets[split] = _build(config.TeacherConfig, values, "targets", path)

    students, from_tune = _students(doc.get("students"), path, base, work, teacher_model, "validation" in targets,
                                    "transfer" in targets, doc.get("tune") is not None)
    tune = _tune(doc.get("tune"), path, base, work, teacher_model, "validation" in targets, "transfer" in targets)

    evaluation = None
    if doc.get("eval") is not None:
        ev = _norm(doc.get("eval"), "eval")
        _strings(ev, ("split",), "eval.", path)
        split = ev.pop("split", "test")
        if split not in splits:
            raise KDError(f"{path}: eval.split {split!r} is not one of the data splits ({', '.join(splits)})")
        values = {"model": [str(c.out) for _, c in students], "data": splits[split],
                  "split": split, "targets": str(work / "targets" / split),
                  "task_type": task_type, **columns, **ev, "out": str(work / "eval")}
        evaluation = _build(config.EvalConfig, values, "eval", path)
    return Plan(doc.get("name", path.stem), work, finetune, targets, students, evaluation, tune, from_tune)
