"""Fingerprints of a stage's inputs and the cache key built from them.

The cache key must change exactly when the cached soft targets would: teacher weights and
config, tokenizer (vocabulary, merges, special and added tokens), the data rows, task type,
max length, k, T, value dtype, mask seed and format version -- and nothing else (not the
output path, batch size or number of array tasks), so that every student and pipeline that
needs the same targets finds the one cache.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from pipeline import io
from pipeline.errors import KDError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_MEMO_PATH = Path(os.environ.get("KD_HASH_MEMO", Path.home() / ".cache" / "kd-pipeline" / "sha256-memo.json"))


def sha256_file_memo(path: Path) -> str:
    """sha256 of a large file, memoised by (real path, size, mtime): teachers weigh gigabytes
    and every rerun of a stage needs their fingerprint to find its cache."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = io.read_json(_MEMO_PATH)
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = io.sha256_file(path)
    if st.st_size > (16 << 20):
        memo[key] = digest
        try:
            io.write_json(_MEMO_PATH, memo)
        except (OSError, KDError):
            pass  # a read-only home only costs re-hashing
    return digest


def resolve_model_dir(name: str) -> Path:
    """A local directory for a model given as a path or a hub id (hub only when allowed)."""
    if os.path.isdir(name):
        return Path(name)
    if os.path.exists(name):
        raise KDError(f"model {name!r} is a file: pass the directory that holds config.json and the weights")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name))
    except Exception as exc:
        raise KDError(f"model {name!r} is not a local directory and could not be fetched from the hub "
                      f"({type(exc).__name__}); pass a local path or allow network access") from None


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    config = io.read_json(cfg_path) if cfg_path.exists() else {}
    weights = {p.name: sha256_file_memo(p) for p in sorted(model_dir.iterdir())
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    if not weights:
        raise KDError(f"model directory {model_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    fp = {"config_sha256": io.sha256_bytes(io.canonical_json(config).encode()), "weights": weights}
    fp["sha256"] = io.sha256_bytes(io.canonical_json(fp).encode())
    return fp


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What decides the ids a text becomes: the full backend (vocab, merges, normaliser,
    pre-tokeniser, post-processor) for fast tokenizers, plus special and added tokens."""
    vocab = tokenizer.get_vocab()
    vocab_sha = io.sha256_bytes(io.canonical_json(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"vocab": vocab_sha}
    added = {str(i): str(t) for i, t in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())}
    body = {
        "class": type(tokenizer).__name__,
        "backend": io.sha256_bytes(io.canonical_json(spec).encode()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": added,
    }
    return {
        "sha256": io.sha256_bytes(io.canonical_json(body).encode()),
        "vocab_sha256": vocab_sha,
        "vocab_size": len(tokenizer),
        "class": type(tokenizer).__name__,
    }


def local_data_files(data: str) -> list[Path] | None:
    """The files a --data argument names when it is a local file or glob (else None)."""
    if os.path.isfile(data):
        return [Path(data)]
    if any(ch in data for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(data, recursive=True) if os.path.isfile(p))
        if not files:
            raise KDError(f"--data {data!r} matches no files; check the glob")
        return files
    return None


def split_is_named(data: str, source: dict) -> bool:
    """Whether a split name selects rows of --data: a hub dataset, or a save_to_disk directory of
    several splits (a DatasetDict). The rows of local files are all of them, under whatever split
    name `datasets` was handed (`kd teacher`'s default: train), and a single saved Dataset has none."""
    if source.get("files") is not None or local_data_files(data) is not None:
        return False
    if source.get("directory") or os.path.isdir(data):
        return (Path(data) / "dataset_dict.json").exists()
    return True


def dataset_fingerprint(data: str, split: str, columns: dict[str, str | None], rows: int,
                        limit: int | None, hf_fingerprint: str | None, encoding: str = "utf-8") -> dict[str, Any]:
    files = local_data_files(data)
    if files is not None:
        source = {"files": {str(p.name): io.sha256_file(p) for p in files}}
        if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):  # other text from the same bytes (utf-8 keeps old keys)
            source["encoding"] = encoding
    elif os.path.isdir(data):
        source = {"dataset_fingerprint": hf_fingerprint, "directory": True}
    else:
        source = {"hub": data, "dataset_fingerprint": hf_fingerprint}
    fp = {"source": source, "split": split, "columns": columns, "rows": rows, "limit": limit}
    fp["sha256"] = io.sha256_bytes(io.canonical_json(fp).encode())
    return fp


def cache_key(*, teacher: dict, tokenizer: dict, dataset: dict, task_type: str, max_length: int,
              top_k: int, temperature: float, value_dtype: str, mask: dict | None,
              format_version: int, vocab_limit: int | None = None, temperatures: list[float] | None = None,
              sampling: dict | None = None) -> str:
    body = {
        "teacher": teacher["sha256"],
        "tokenizer": tokenizer["sha256"],
        "dataset": dataset["sha256"],
        "task_type": task_type,
        "max_length": int(max_length),
        "top_k": None if top_k is None else int(top_k),  # None: a sampled cache
        "temperature": float(temperature),
        "value_dtype": value_dtype,
        "mask": mask,
        "format_version": int(format_version),
    }
    if vocab_limit is not None:  # only for padded vocabularies, so every other cache keeps its key
        body["vocab_limit"] = int(vocab_limit)
    if temperatures is not None and len(temperatures) > 1:  # a grid: its lse columns are content; one T keeps its key
        body["temperatures"] = [float(t) for t in temperatures]
    if sampling is not None:  # sampled targets: mode, draws and seed are content; top-k caches keep their key
        body["sampling"] = {k: sampling[k] for k in ("mode", "samples", "seed")}
    return io.sha256_bytes(io.canonical_json(body).encode())
