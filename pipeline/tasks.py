"""The task types, each in one place: what a target position is, where its hard label comes
from, how shards store it, which model class runs it and how it is scored.

Every other module asks the registry (`get(name)`) instead of comparing task names, so a fifth
task type is a new `TaskType` entry here (plus, if its target positions are made in a new way,
one `_positions_*` function) and its tests, not edits across the loader, the scorer and the
stages. The names follow transformers' `AutoModelFor…` classes (DESIGN.md, "Task types").
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.errors import KDError

IGNORE_INDEX = -100


def _list(t: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("item", t, nullable=False))


# --- target positions and hard labels of one encoded row --------------------------------------
# Each takes the Encoder (tokenizer, label map, mask seed), the Example being built, the row's
# raw label (None when the row has none), the tokenizer's batch encoding and the row's index in it.

def _positions_per_row(encoder, ex, label, enc, i) -> None:
    ex.positions = [0]  # one target per example: the class logits
    if label is not None:
        ex.labels = encoder.label_id(label, ex.row)


def _positions_first_subtoken(encoder, ex, label, enc, i) -> None:
    if label is not None and len(label) != len(ex.text):
        raise KDError(f"row {ex.row}: {len(label)} labels for {len(ex.text)} words; each word needs one label")
    labels = [IGNORE_INDEX] * len(ex.input_ids)
    seen = set()
    for pos, w in enumerate(enc.word_ids(i)):
        if w is None or w in seen:
            continue
        seen.add(w)
        if label is None:  # a transfer-set row: every word carries a (soft) target
            ex.positions.append(pos)
        elif isinstance(label[w], str) or label[w] != IGNORE_INDEX:  # -100: word has no label
            labels[pos] = encoder.label_id(label[w], ex.row)
            ex.positions.append(pos)
    ex.labels = labels if label is not None else None


def _positions_masked(encoder, ex, label, enc, i) -> None:
    """BERT's masking, drawn from (mask seed, row) so that any split into tasks draws the same."""
    tok = encoder.tok
    ids = np.asarray(ex.input_ids, dtype=np.int64)
    special = np.asarray(tok.get_special_tokens_mask(ex.input_ids, already_has_special_tokens=True), bool)
    candidates = np.flatnonzero(~special)
    rng = np.random.default_rng([encoder.mask_seed, ex.row])
    chosen = candidates[rng.random(len(candidates)) < encoder.mask_prob]
    if len(chosen) == 0 and len(candidates):
        chosen = candidates[[rng.integers(len(candidates))]]
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[chosen] = ids[chosen]
    action = rng.random(len(chosen))  # BERT's 80/10/10: mask, random token, unchanged
    ids[chosen[action < 0.8]] = tok.mask_token_id
    rand = chosen[(action >= 0.8) & (action < 0.9)]
    ids[rand] = rng.integers(0, len(tok), size=len(rand))
    ex.input_ids, ex.labels, ex.positions = ids.tolist(), labels.tolist(), chosen.tolist()


def _positions_next_token(encoder, ex, label, enc, i) -> None:
    ex.positions = list(range(len(ex.input_ids) - 1))  # position t predicts token t+1
    ex.labels = None  # the hard labels are input_ids shifted by one


@dataclasses.dataclass(frozen=True)
class TaskType:
    name: str
    auto_class: str                 # transformers.AutoModelFor… that loads a model of this task
    classification: bool            # targets over label ids (k = min(k, C), exact) vs over a vocabulary
    words: bool                     # the text column holds a list of words, not a string
    hard_labels: str                # "row": labels[row]; "aligned": labels[position]; "next-token": input_ids[position + 1]
    make_positions: Callable        # (encoder, example, label, encoding, i) -> sets positions and labels
    default_label_column: str | None
    metrics: tuple[str, ...]        # what stage 3 reports, the primary metric first
    lm_head: str | None = None      # "causal" / "masked": how a body/head split composes (models.split_head)
    masked: bool = False            # inputs are masked in stage 1 (the mask seed and rate are part of the key)
    retokenize: bool = False        # a student with its own tokenizer can re-tokenise the stored text
    text_pairs: bool = False        # inputs may be pairs of texts (--text-pair-column)

    @property
    def arch_suffix(self) -> str:
        """The architecture name ending of a model with this task's head, e.g. ForMaskedLM."""
        return self.auto_class.replace("AutoModel", "")

    @property
    def default_text_column(self) -> str:
        return "tokens" if self.words else "text"

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def text_type(self) -> pa.DataType:
        return _list(pa.string()) if self.words else pa.string()

    def label_type(self) -> pa.DataType:
        return pa.int64() if self.hard_labels == "row" else _list(pa.int32())

    def default_shard_rows(self, max_length: int) -> int:
        """About a million tokens per shard; one-target-per-row tasks are small at any length."""
        return 50_000 if self.hard_labels == "row" else max(1, 1_000_000 // max_length)

    def outputs(self, model_config) -> int:
        """How many outputs a target position has: the labels, or the vocabulary."""
        return int(model_config.num_labels if self.classification else model_config.vocab_size)

    def has_head(self, model_config) -> bool:
        """Whether a model config's architecture already carries this task's head."""
        return any(a.endswith(self.arch_suffix) for a in (getattr(model_config, "architectures", None) or []))


TASKS: dict[str, TaskType] = {t.name: t for t in (
    TaskType("sequence-classification", "AutoModelForSequenceClassification", classification=True, words=False,
             hard_labels="row", make_positions=_positions_per_row, default_label_column="label",
             metrics=("accuracy", "macro_f1", "ece"), retokenize=True, text_pairs=True),
    TaskType("token-classification", "AutoModelForTokenClassification", classification=True, words=True,
             hard_labels="aligned", make_positions=_positions_first_subtoken, default_label_column="ner_tags",
             metrics=("entity_f1", "entity_precision", "entity_recall", "accuracy", "ece")),
    TaskType("masked-lm", "AutoModelForMaskedLM", classification=False, words=False, hard_labels="aligned",
             make_positions=_positions_masked, default_label_column=None, metrics=("perplexity",),
             lm_head="masked", masked=True),
    TaskType("causal-lm", "AutoModelForCausalLM", classification=False, words=False, hard_labels="next-token",
             make_positions=_positions_next_token, default_label_column=None, metrics=("perplexity",),
             lm_head="causal"),
)}
NAMES = tuple(TASKS)


def get(name: str) -> TaskType:
    """The task type called `name`, or a one-line refusal listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise KDError(f"unknown task type {name!r}: use one of {', '.join(NAMES)}") from None


def of_architecture(model_config) -> str | None:
    """The task a model config's architecture says it was built for (BertForMaskedLM -> masked-lm)."""
    for arch in getattr(model_config, "architectures", None) or []:
        for t in TASKS.values():
            if arch.endswith(t.arch_suffix):
                return t.name
    return None


def gold_labels(task: TaskType, rows: list[dict]) -> np.ndarray:
    """The hard label of every target position of decoded cache rows, -100 where there is none."""
    if task.hard_labels == "row":
        g = [IGNORE_INDEX if r["labels"] is None else r["labels"] for r in rows for _ in r["positions"]]
    elif task.hard_labels == "next-token":
        g = [r["input_ids"][p + 1] for r in rows for p in r["positions"]]
    else:
        g = [IGNORE_INDEX if r["labels"] is None else r["labels"][p] for r in rows for p in r["positions"]]
    return np.asarray(g, dtype=np.int64)
