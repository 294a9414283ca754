"""Reading a dataset split and turning rows into what the teacher sees.

The frozen input order is the order of the loaded split (after --limit); every row keeps its
index in that order, so job-array tasks, shards and students all agree on what row N is.
Tokenisation happens per chunk (never the whole dataset at once) and is deterministic:
masked-LM masks are drawn from a generator seeded by (mask seed, row index), so any split of
the rows into tasks draws the same masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pipeline import tasks
from pipeline.errors import KDError, short
from pipeline.fingerprint import local_data_files

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT_BUILDERS = ("json", "csv", "text")  # decoded with --encoding


def load_split(data: str, split: str, limit: int | None = None, encoding: str = "utf-8"):
    """A `datasets.Dataset` for --data/--split, cut to the first --limit rows. Text files are
    checked against `encoding` first: pyarrow's JSON reader takes invalid bytes into a string
    column and fails only when a row is read, long after this."""
    import codecs

    import datasets

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise KDError(f"unknown --encoding {short(encoding)}; use a Python codec name such as utf-8 or latin-1") from None
    datasets.disable_progress_bars()
    files = local_data_files(data)
    try:
        if files is not None:
            exts = {p.suffix.lower() for p in files}
            if len(exts) != 1 or next(iter(exts)) not in BUILDERS:
                raise KDError(f"--data {data!r}: files must share one of the extensions {', '.join(BUILDERS)} (got "
                              f"{', '.join(sorted(exts))})")
            builder = BUILDERS[exts.pop()]
            kw = {"encoding": encoding} if builder in TEXT_BUILDERS else {}
            if builder in TEXT_BUILDERS:
                for p in files:
                    check_encoding(p, encoding)
            ds = datasets.load_dataset(builder, data_files={split: [str(p) for p in files]}, split=split, **kw)
        elif os.path.isdir(data) and any((Path(data) / f).exists() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(data)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KDError(f"--data {data!r} has no split {split!r}; it has: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(data, split=split)
    except KDError:
        raise
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        msg = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
        raise KDError(f"cannot load --data {short(data)} split {short(split)}: {msg}") from None
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    if len(ds) == 0:
        raise KDError(f"--data {data!r} split {split!r} has no rows; point --data at a non-empty dataset")
    return ds


def check_encoding(path: Path, encoding: str) -> None:
    """Refuse a text file that does not decode, naming the line, the byte and the fix. Decodes in
    4 MB blocks; only a file that fails is scanned again line by line to say where."""
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        decoder = codecs.getincrementaldecoder(encoding)()
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as exc:
                raise KDError(f"--data {path}: line {n} is not valid {encoding} text (byte 0x{line[exc.start]:02x} at column "
                              f"{exc.start + 1}); pass --encoding with the file's encoding, e.g. --encoding latin-1") from None
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise KDError(f"--data {path}: the file ends in the middle of a {encoding} character; fix the file or pass "
                          f"--encoding with its encoding") from None


@dataclass
class Columns:
    """Which dataset columns hold the text(s) and the labels."""

    text: str
    text_pair: str | None = None
    label: str | None = None

    @classmethod
    def resolve(cls, dataset_columns: list[str], task_type: str, text: str | None,
                text_pair: str | None, label: str | None) -> "Columns":
        task = tasks.get(task_type)
        text = text or task.default_text_column
        for flag, name in (("--text-column", text), ("--text-pair-column", text_pair)):
            if name is not None and name not in dataset_columns:
                raise KDError(f"{flag} {name!r} is not a column of the data (columns: {', '.join(dataset_columns)})")
        if label is not None and label not in dataset_columns:
            raise KDError(f"--label-column {label!r} is not a column of the data (columns: {', '.join(dataset_columns)})")
        if label is None and task.default_label_column in dataset_columns:
            label = task.default_label_column
        if text_pair is not None and not task.text_pairs:
            pairs = ", ".join(t.name for t in tasks.TASKS.values() if t.text_pairs)
            raise KDError(f"--text-pair-column only applies to --task-type {pairs}")
        return cls(text=text, text_pair=text_pair, label=label)


@dataclass
class Example:
    """One tokenised row: what the teacher sees and which outputs carry a target."""

    row: int
    id: str
    text: Any
    text_pair: str | None
    input_ids: list[int]
    labels: Any
    positions: list[int]
    truncated: bool


def _label_id(value, label2id: dict, num_labels: int, row: int) -> int:
    if isinstance(value, str):
        if value not in label2id:
            raise KDError(f"row {row}: label {short(value)} is not in the model's label set ({', '.join(list(label2id)[:20])}); "
                          f"fix the data or the teacher")
        return int(label2id[value])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise KDError(f"row {row}: label {short(value)} is not a class id (a whole number 0..{num_labels - 1}) or a label name; "
                      f"fix the data")
    v = int(value)
    if not 0 <= v < num_labels:
        raise KDError(f"row {row}: label {v} is outside the model's {num_labels} labels (0..{num_labels - 1}); fix the data or the teacher")
    return v


class Encoder:
    """Tokenises rows for one task type; the same object serves every chunk of a task."""

    def __init__(self, tokenizer, task_type: str, columns: Columns, max_length: int,
                 label2id: dict | None = None, num_labels: int | None = None,
                 mask_seed: int = 0, mask_prob: float = 0.15, id_column: str | None = None):
        self.tok, self.task_type, self.cols, self.max_length = tokenizer, task_type, columns, max_length
        self.task = tasks.get(task_type)
        self.label2id, self.num_labels = label2id or {}, num_labels
        self.mask_seed, self.mask_prob, self.id_column = mask_seed, mask_prob, id_column
        if self.task.masked and tokenizer.mask_token_id is None:
            raise KDError("the tokenizer has no mask token, so it cannot be used for --task-type masked-lm")

    def encode(self, batch: dict[str, list], start_row: int) -> list[Example]:
        n = len(batch[self.cols.text])
        texts = batch[self.cols.text]
        pairs = batch[self.cols.text_pair] if self.cols.text_pair else None
        labels = batch[self.cols.label] if self.cols.label else [None] * n
        ids = batch[self.id_column] if self.id_column else None
        for i, t in enumerate(texts):
            words = self.task.words
            if t is None or (words and not isinstance(t, (list, tuple))) or (not words and not isinstance(t, str)):
                want = "a list of words" if words else "a string"
                raise KDError(f"row {start_row + i}: column {self.cols.text!r} must hold {want}, got {type(t).__name__}")
        words = self.task.words
        kw = dict(truncation=True, max_length=self.max_length, is_split_into_words=words)
        enc = self.tok(list(texts), list(pairs) if pairs else None, **kw)
        out = []
        for i in range(n):
            row = start_row + i
            input_ids = list(enc["input_ids"][i])
            truncated = False
            if len(input_ids) >= self.max_length:  # only a row at the limit can have been cut
                full = self.tok(texts[i], pairs[i] if pairs else None, is_split_into_words=words)
                truncated = len(full["input_ids"]) > len(input_ids)
            ex = Example(row=row, id=str(ids[i]) if ids is not None else str(row), text=texts[i],
                         text_pair=pairs[i] if pairs else None, input_ids=input_ids, labels=None,
                         positions=[], truncated=truncated)
            self.task.make_positions(self, ex, labels[i], enc, i)
            out.append(ex)
        return out

    def label_id(self, value, row: int) -> int:
        return _label_id(value, self.label2id, self.num_labels, row)


def token_budget_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size fits the budget.

    Sorting by length wastes almost no compute on padding; the caller restores row order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and new_max * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def pad_id(tokenizer) -> int:
    """The id to pad with: tokenizers without a pad token (many LLMs) pad with 0, which the
    attention mask hides."""
    return tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0


def pad_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and the attention mask (CPU, int64) for a list of id sequences."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        att[b, :len(r)] = 1
    return ids, att


# --- fine-tuning without a cache (stage 0): labels and a tokenised table --------------------

def infer_labels(dataset, column: str | None, task_type: str, given: str | list | None) -> list[str] | None:
    """The label names of a dataset for a new classification head: --labels, else the
    ClassLabel names, else the sorted distinct strings, else LABEL_0..LABEL_max for integers
    (integer labels carry no names, so they match any head with that many labels)."""
    if not tasks.get(task_type).classification:
        return None
    if given:
        names = given if isinstance(given, list) else [s.strip() for s in str(given).split(",") if s.strip()]
        return [str(n) for n in names]
    if column is None:
        raise KDError(f"{task_type} fine-tuning needs labels: pass --label-column (and optionally --labels a,b,c)")
    feature = dataset.features[column]
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) / List(ClassLabel)
    if getattr(feature, "names", None):
        return list(feature.names)
    import pyarrow.compute as pc

    col = dataset.data.column(column)
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.list_flatten(col)
    values = [v for v in pc.unique(col).to_pylist() if v is not None]
    if values and all(isinstance(v, str) for v in values):
        return sorted(values)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() for v in values):
        bad = next(v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer())
        raise KDError(f"--label-column {column!r}: label {short(bad)} is neither a name nor a whole-number class id; fix the data")
    ints = [int(v) for v in values if int(v) != -100]
    if not ints or min(ints) < 0:
        raise KDError(f"--label-column {column!r}: labels must be strings or integers 0..C-1 (found {sorted(set(ints))[:5]})")
    return [f"LABEL_{i}" for i in range(max(ints) + 1)]


def encode_table(dataset, encoder, chunk: int = 4096) -> pa.Table:
    """A tokenised dataset as a table with the cache's columns (row, input_ids, labels,
    positions, text), so fine-tuning without targets streams through the same loader."""
    task = tasks.get(encoder.task_type)
    parts = []
    for s in range(0, len(dataset), chunk):
        ex = encoder.encode(dataset[s:s + chunk], s)
        cols = {
            "row": pa.array([e.row for e in ex], pa.int64()),
            "text": pa.array([e.text for e in ex], task.text_type()),
            "input_ids": pa.array([e.input_ids for e in ex], pa.list_(pa.int32())),
            "labels": pa.array([e.labels for e in ex], task.label_type()),
            "positions": pa.array([e.positions for e in ex], pa.list_(pa.int32())),
        }
        if encoder.cols.text_pair:
            cols["text_pair"] = pa.array([e.text_pair for e in ex], pa.string())
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)
