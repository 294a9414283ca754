"""Loading models for a task type, and choosing device and dtype.

A teacher whose task head was never trained (a bare encoder loaded for classification gets a
randomly initialised head with only a warning) would silently fill a cache with noise, so a
teacher with missing head weights is refused.
"""

from __future__ import annotations

import torch

from pipeline import tasks
from pipeline.errors import KDError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it (fp16 otherwise), float32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise KDError(f"unknown --dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def auto_class(task_type: str):
    import transformers

    return getattr(transformers, tasks.get(task_type).auto_class)


def load_model(path: str, task_type: str, dtype: torch.dtype = torch.float32, device=None):
    """Load `path` with the AutoModelFor… class of the task; refuse missing head weights."""
    cls = auto_class(task_type)
    _quiet_transformers()
    try:
        model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0]
        raise KDError(f"model {path} cannot be loaded for {task_type}: {first}") from None
    except OSError as exc:
        raise KDError(f"model {path} cannot be loaded: {str(exc).splitlines()[0]}") from None
    missing = list(info.get("missing_keys", []))
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (" …" if len(missing) > 3 else "")
        raise KDError(f"model {path} has no trained {task_type} head (weights missing: {shown}); "
                      f"fine-tune it first (kd train without --targets) or pass a model with that head")
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _quiet_transformers() -> None:
    """Loading bars and 'newly initialised' warnings would drown our own one-line messages."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer(path) -> bool:
    """Whether a directory holds tokenizer files: AutoTokenizer on a directory without any builds
    an empty tokenizer from the model type (5 special tokens), which would pass for a real one."""
    from pathlib import Path

    return any((Path(path) / n).exists() for n in TOKENIZER_FILES)


def load_tokenizer(path: str):
    from pathlib import Path

    from transformers import AutoTokenizer

    if Path(path).is_dir() and not has_tokenizer(path):
        raise KDError(f"{path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …); "
                      f"save the tokenizer next to the model (tokenizer.save_pretrained)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise KDError(f"no usable tokenizer in {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    tok.padding_side = "right"
    return tok


def split_head(model, task_type: str):
    """(body, head) for LM tasks where we know how the forward composes them, else None.

    Running the vocabulary-sized head on the target positions only is what keeps teacher
    extraction and student training bounded; callers check the split against the model's own
    forward once, so an unknown composition falls back to it."""
    kind = tasks.get(task_type).lm_head
    if kind == "causal":
        body = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings()
        if body is None or head is None:
            return None
        cap = getattr(model.config, "final_logit_softcapping", None)
        scale = getattr(model.config, "logit_scale", None)

        def head_fn(h):
            z = head(h)
            if scale is not None:
                z = z * scale
            if cap:
                z = torch.tanh(z / cap) * cap
            return z

        return body, head_fn
    if kind == "masked":
        body = getattr(model, model.base_model_prefix, None)
        for name in ("cls", "lm_head", "predictions"):
            head = getattr(model, name, None)
            if body is not None and head is not None:
                return body, head
    return None
