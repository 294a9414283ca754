"""Loading models for a task type, and choosing device and dtype.

A teacher whose task head was never trained (a bare encoder loaded for classification gets a
randomly initialised head with only a warning) would silently fill a cache with noise, so a
teacher with missing head weights is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from pipeline import tasks
from pipeline.errors import KDError, short

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


def load_config(path) -> object:
    """A model's transformers config, or a one-line refusal: a config.json that is not JSON, of a
    model type this transformers does not know, or missing."""
    import transformers
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # ValueError (unknown model_type), OSError (no config.json), JSON errors
        text = str(exc)
        if "does not recognize this architecture" in text or "Unrecognized model" in text:
            import json

            try:
                with open(f"{path}/config.json", encoding="utf-8") as fh:
                    model_type = json.load(fh).get("model_type")
            except (OSError, ValueError, AttributeError):
                model_type = None
            raise KDError(f"model {path}: config.json has model_type {short(model_type)}, which transformers "
                          f"{transformers.__version__} does not know; fix config.json or upgrade transformers") from None
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise KDError(f"model {path}: no usable config.json ({first})") from None


def position_limit(model_config, tokenizer=None) -> int | None:
    """How many tokens a model takes at most: its position embeddings, or the tokenizer's limit
    where that is up to two less (RoBERTa reserves two positions: 514 embeddings, 512 tokens); None
    when it has no such limit. A tokenizer limit further below is not a limit of the model."""
    limits = [getattr(model_config, n, None) for n in ("max_position_embeddings", "n_positions")]
    limits = [int(x) for x in limits if isinstance(x, int) and not isinstance(x, bool) and 0 < x < 10_000_000]
    if not limits:
        return None
    limit, tok = min(limits), getattr(tokenizer, "model_max_length", None)
    if isinstance(tok, int) and limit - 2 <= tok < limit:
        return tok
    return limit


def capped_length(max_length: int, model_config, tokenizer, who: str) -> int:
    """--max-length, at most the positions `who` takes: a longer row would index past its position
    embeddings (a crash deep in the forward), so the cap is applied and said."""
    limit = position_limit(model_config, tokenizer)
    if limit is not None and max_length > limit:
        from pipeline.progress import say

        say(f"--max-length {max_length} is more than {who} takes ({limit} positions); using --max-length {limit}")
        return limit
    return max_length


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


def finish_logits(z, logit_scale: float | None, softcap: float | None):
    """What some LM heads apply after the output embedding (Cohere's logit scale, Gemma's soft cap):
    the one definition that split_head, Projection, the student's Features and the fused loss share."""
    if logit_scale is not None:
        z = z * logit_scale
    if softcap:  # 0 / None: no cap
        z = torch.tanh(z / softcap) * softcap
    return z


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
            return finish_logits(head(h), scale, cap)

        return body, head_fn
    if kind == "masked":
        body = getattr(model, model.base_model_prefix, None)
        for name in ("cls", "lm_head", "predictions"):
            head = getattr(model, name, None)
            if body is not None and head is not None:
                return body, head
    return None


class _Stop(Exception):
    """Raised by a pre-hook to stop a head's forward just before its output projection."""

    def __init__(self, features):
        super().__init__()
        self.features = features


@dataclasses.dataclass
class Projection:
    """An LM head taken apart as ``post(linear(pre(h)))``, so that the vocabulary-sized matmul can be
    fused with the loss (pipeline.fused_loss) instead of materialising [positions, vocabulary] logits.

    `pre` is whatever the head does before its output embedding (BERT's dense + GELU + LayerNorm;
    nothing for Llama), `linear` the output embedding itself (its weight may be tied to the input
    embedding: the fused loss writes its gradient into the shared tensor), `logit_scale` and
    `softcap` what split_head applies after it."""

    pre: Callable
    linear: torch.nn.Module
    logit_scale: float | None = None
    softcap: float | None = None

    def logits(self, h):
        return finish_logits(self.linear(self.pre(h)), self.logit_scale, self.softcap)


def projection(model, task_type: str) -> Projection | None:
    """The head of an LM model as a Projection, when its output embedding is its last step.

    Found generically: the forward of the head from split_head is stopped, by a pre-hook on the
    model's output embedding, right where that embedding would run, which yields `pre`'s output.
    Callers check ``Projection.logits`` against the head once, as they check the split."""
    split = split_head(model, task_type)
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if split is None or not isinstance(linear, torch.nn.Linear):
        return None
    head = split[1]
    if tasks.get(task_type).lm_head == "causal":
        return Projection(lambda h: h, linear, getattr(model.config, "logit_scale", None),
                          getattr(model.config, "final_logit_softcapping", None))

    def stop(module, args):
        raise _Stop(args[0])

    def pre(h):
        handle = linear.register_forward_pre_hook(stop)
        try:
            head(h)
        except _Stop as s:
            return s.features
        finally:
            handle.remove()
        raise KDError("the LM head never reached its output embedding")  # caught by the caller's check

    return Projection(pre, linear)
