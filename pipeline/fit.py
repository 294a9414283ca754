"""Whether a student can learn from (stage 2) or be scored on (stage 3) a targets cache: one rule.

A student that cannot read a cache must be refused before hours of training, not after:

- classification targets are indexed by label id, so the label sets must agree (same count;
  same names in the same order, where both sides name them beyond transformers' LABEL_i);
- token-level targets are indexed by the teacher's token ids, so the student must share the
  teacher's vocabulary (the same token -> id map). Only a task whose targets are per example
  (sequence classification) can use a student with its own tokenizer: it re-tokenises the
  stored text ("retokenize");
- the student must embed and predict every id of that vocabulary.

Padded vocabularies. Many LMs round their embedding matrix up (Qwen2: 151,936 or 152,064 rows
for a 151,665-token tokenizer), and students and teachers of one tokenizer often differ in the
padding. Both are accepted as long as each covers the tokenizer; the ids past the tokenizer are
ids no text can produce, so they are treated as impossible: stage 1 leaves them out of the
teacher's top-k and logsumexp, and the student's logits there are cut off before its softmax
(`Fit.vocab_limit`), so the KD and CE terms compare distributions over the same real ids.
"""

from __future__ import annotations

import dataclasses

from pipeline import tasks
from pipeline.errors import KDError
from pipeline.fingerprint import tokenizer_fingerprint


@dataclasses.dataclass(frozen=True)
class Fit:
    mode: str                      # "ids": the cache's input_ids; "retokenize": its own tokenizer on the stored text
    vocab_limit: int | None = None  # student outputs at ids >= this are padding and are cut off


def default_names(n: int) -> list[str]:
    return [f"LABEL_{i}" for i in range(n)]


def label_names(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", 0) or len(id2label))
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def cache_labels(stats: dict) -> list[str]:
    """The label names of a cache, in id order (transformers' defaults when it has none)."""
    id2label = stats.get("id2label") or {}
    return [str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))] or default_names(int(stats["outputs"]))


def _show(names: list[str]) -> str:
    return "[" + ", ".join(names[:8]) + (", …" if len(names) > 8 else "") + f"] ({len(names)})"


def check_labels(config, labels: list[str], task_type: str, where: str, source: str) -> None:
    """Refuse a student head whose label count or (non-default) names differ from `labels`."""
    mine = label_names(config)
    if len(mine) != len(labels):
        raise KDError(f"label set mismatch: {where} predicts {_show(mine)} but the labels of {source} are {_show(labels)}; "
                      f"use a student with the same label set, or one without a {task_type} head")
    if mine != labels and mine != default_names(len(mine)) and labels != default_names(len(labels)):
        raise KDError(f"label set mismatch: {where} predicts {_show(mine)} but the labels of {source} are {_show(labels)}; "
                      f"use a student with the same label names in the same order")


def fit(task_type: str, config, tokenizer, cache: dict, where: str, source: str) -> Fit:
    """How a student (its config, its tokenizer or None) reads a cache (its manifest), or a
    one-line refusal naming what does not fit. `where` names the student, `source` the cache."""
    task = tasks.get(task_type)
    stats, want = cache["stats"], cache["fingerprints"]["tokenizer"]
    if task.classification:
        check_labels(config, cache_labels(stats), task_type, where, source)
    mine = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    if mine is not None and mine["sha256"] != want.get("sha256"):
        if task.retokenize:
            return Fit("retokenize")
        if mine["vocab_sha256"] != want.get("vocab_sha256"):
            raise KDError(f"vocabulary mismatch: {where} has a {mine['vocab_size']}-token vocabulary "
                          f"(sha {mine['vocab_sha256'][:12]}) but {source} was made with {want.get('vocab_size')} tokens "
                          f"(sha {str(want.get('vocab_sha256'))[:12]}); {task_type} reads the cache's token ids, so the "
                          f"student needs the teacher's tokenizer (e.g. --student-from-teacher)")
    real = int(want.get("vocab_size") or 0)  # ids the tokenizer can produce
    embeds = int(getattr(config, "vocab_size", 0) or 0)
    if embeds < real:
        raise KDError(f"vocabulary mismatch: {where} embeds {embeds} token ids but {source} was made with a "
                      f"{real}-token tokenizer; the student needs the teacher's tokenizer and vocabulary")
    if task.classification:
        return Fit("ids")
    teacher_outputs = int(stats["outputs"])
    if teacher_outputs < real:
        raise KDError(f"{source} holds targets over {teacher_outputs} ids but its tokenizer has {real}; rebuild it "
                      f"with a teacher whose vocabulary covers its tokenizer")
    padded = embeds > real or teacher_outputs > real
    return Fit("ids", real if padded else None)


# What must agree between caches that one student streams as one training set (a labelled cache
# and an unlabelled transfer set, say): the same teacher outputs over the same ids, so that every
# row's targets mean the same thing, and the same layout, so that rows of both share a batch.
# The data, the max length and the masks may differ.
SAME_IN_EVERY_CACHE = {
    "task type": lambda m: m["stats"]["task_type"],
    "teacher": lambda m: m["fingerprints"]["teacher"]["sha256"],
    "tokenizer": lambda m: m["fingerprints"]["tokenizer"]["sha256"],
    "temperature": lambda m: float(m["stats"]["temperature"]),
    "temperature grid": lambda m: m["stats"].get("temperatures"),
    "target mode": lambda m: m["stats"].get("target_mode", "topk"),
    "samples": lambda m: m["stats"].get("samples"),
    "top-k": lambda m: m["stats"]["top_k"],
    "value dtype": lambda m: m["stats"]["value_dtype"],
    "labels": lambda m: m["stats"].get("id2label"),
    "vocabulary limit": lambda m: m["stats"].get("vocab_limit"),
    "text pair column": lambda m: bool((m["config"].get("columns") or {}).get("text_pair")),
}


def first_difference(first: dict, other: dict, fields: tuple[str, ...] = tuple(SAME_IN_EVERY_CACHE)) -> str | None:
    """'FIELD (OTHER vs FIRST)' for the first of `fields` (keys of SAME_IN_EVERY_CACHE) in which two
    cache manifests differ, or None; fingerprints show their first 12 characters, other values at
    most 80 (a label map can be long, and a message is one line)."""
    def shown(field, v):
        text = str(v)
        if field in ("teacher", "tokenizer"):
            return text[:12]
        return text if len(text) <= 80 else text[:79] + "…"

    for field in fields:
        a, b = SAME_IN_EVERY_CACHE[field](first), SAME_IN_EVERY_CACHE[field](other)
        if a != b:
            return f"{field} ({shown(field, b)} vs {shown(field, a)})"
    return None


def check_caches_agree(caches: list[dict], paths: list[str]) -> None:
    """Refuse, naming the first field that differs, caches that cannot be streamed as one set."""
    for m, path in zip(caches[1:], paths[1:]):
        differs = first_difference(caches[0], m)
        if differs:
            raise KDError(f"--targets {path} differs from {paths[0]} in its {differs}; several caches of one student "
                          f"must come from one teacher run the same way (kd teacher with the same model, tokenizer, "
                          f"--top-k or --target-mode/--samples, --temperature and --value-dtype)")
