"""Shared fixtures: a real WordPiece tokenizer trained on a toy corpus and tiny random
transformers models for each task type, saved with save_pretrained like a user's model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a film movie plot actor story great awful boring brilliant dull funny sad long short "
         "director scene music score script cast slow fast warm cold bright dark paris london alice bob "
         "carol dave acme globex visits meets loves hates in at on with and but or not very rather").split()
ENTITIES = {"paris": "LOC", "london": "LOC", "alice": "PER", "bob": "PER", "carol": "PER", "dave": "PER",
            "acme": "ORG", "globex": "ORG"}
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def sentences(n: int, seed: int = 0, min_len: int = 3, max_len: int = 14) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def ner_tags(words: list[str]) -> list[int]:
    return [NER_LABELS.index(f"B-{ENTITIES[w]}") if w in ENTITIES else 0 for w in words]


def train_tokenizer(path: Path, vocab_size: int = 160, extra_words: tuple[str, ...] = ()):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    text = [" ".join(s) for s in sentences(400, seed=1)] + list(extra_words)
    wp.train_from_iterator(text, vocab_size=vocab_size, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                            pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=128)
    tok.save_pretrained(path)
    return tok


def build_model(path: Path, task_type: str, tokenizer_dir: Path, seed: int = 0, layers: int = 2,
                num_labels: int | None = None, vocab_padding: int = 0):
    """`vocab_padding`: extra embedding rows past the tokenizer, as LMs round their vocabulary up."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    if task_type == "causal-lm":
        cfg = transformers.LlamaConfig(vocab_size=len(tok) + vocab_padding, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                       bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        labels = {"sequence-classification": ["negative", "positive"],
                  "token-classification": NER_LABELS}.get(task_type)
        if num_labels is not None and labels is not None:
            labels = [f"L{i}" for i in range(num_labels)]
        kw = dict(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}) if labels else {}
        cfg = transformers.BertConfig(vocab_size=len(tok) + vocab_padding, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      max_position_embeddings=128, **kw)
        cls = {"sequence-classification": transformers.BertForSequenceClassification,
               "token-classification": transformers.BertForTokenClassification,
               "masked-lm": transformers.BertForMaskedLM}[task_type]
        model = cls(cfg)
    with torch.no_grad():  # spread the logits so that top-k ids are well separated
        for p in model.parameters():
            p.mul_(3.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(path: Path, task_type: str, n: int = 40, seed: int = 0) -> Path:
    sents = sentences(n, seed=seed)
    if task_type == "sequence-classification":
        rows = [{"id": f"ex{i}", "text": " ".join(s), "label": int(("great" in s) or ("brilliant" in s))}
                for i, s in enumerate(sents)]
    elif task_type == "token-classification":
        rows = [{"id": f"ex{i}", "tokens": s, "ner_tags": ner_tags(s)} for i, s in enumerate(sents)]
    else:
        rows = [{"text": " ".join(s)} for s in sents]
    return write_jsonl(path, rows)


TASK_TYPES = ["sequence-classification", "token-classification", "masked-lm", "causal-lm"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one thread on a shared 2-core machine; a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {t: build_model(root / t, t, tokenizer_dir) for t in TASK_TYPES}


@pytest.fixture(scope="session")
def datasets_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {t: make_data(root / f"{t}.jsonl", t) for t in TASK_TYPES}


def read_targets(out: Path):
    """A targets cache's rows in row order, top-k as version 1's topk_ids / topk_logits lists whatever
    the format version (pipeline.format.with_topk_lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import format as fmt
    from pipeline import manifest

    m = manifest.read_manifest(out, kind="targets")
    parts = []
    for f in m["files"]:
        pf = pq.ParquetFile(out / f["path"])
        parts.append(fmt.with_topk_lists(pf.read(), fmt.layout_metadata(pf)))
    return pa.concat_tables(parts).sort_by("row")
