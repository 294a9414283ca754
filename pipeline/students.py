"""Making a student, and running it on target positions only.

A student either comes whole (`--student DIR|HUB_ID`) or is cut from the teacher DistilBERT
style (`--student-from-teacher MODEL --student-layers 0,2,4`): same config with fewer layers,
the embeddings, the listed layers (renumbered) and the head copied. The layer stack is found
generically -- the one nn.ModuleList whose length is config.num_hidden_layers -- so BERT-like
(`bert.encoder.layer`) and Llama-like (`model.layers`) models both work without a table of
architectures.

Whether a student can read a cache is decided by `pipeline.fit`, the one rule that stage 3
applies too.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pipeline import tasks
from pipeline.errors import KDError
from pipeline.fingerprint import model_fingerprint, resolve_model_dir
from pipeline.fit import check_labels, default_names, label_names
from pipeline.models import Projection, auto_class, finish_logits, has_tokenizer, load_tokenizer, projection, split_head


def parse_layers(spec: str | Sequence[int] | None) -> list[int]:
    """'0,2,4', '[0, 2, 4]' or [0, 2, 4] -> [0, 2, 4]."""
    if spec is None or spec == "":
        raise KDError("--student-from-teacher needs --student-layers, e.g. --student-layers 0,2,4")
    if isinstance(spec, str):
        parts = [p for p in re.split(r"[,\s\[\]]+", spec) if p]
        try:
            layers = [int(p) for p in parts]
        except ValueError:
            raise KDError(f"--student-layers {spec!r}: give layer indices like 0,2,4") from None
    else:
        layers = [int(x) for x in spec]
    if not layers or len(set(layers)) != len(layers):
        raise KDError(f"--student-layers {spec!r}: give distinct layer indices like 0,2,4")
    return layers


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and nn.ModuleList of the transformer layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise KDError(f"cannot tell which module list holds the {n} layers of {type(model).__name__} "
                      f"(candidates: {names}); pass a ready-made --student instead")
    return found[0]


def shrink(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of `teacher` with only `layers` (in the order given), weights copied."""
    prefix, stack = find_layer_list(teacher)
    n = len(stack)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise KDError(f"--student-layers {bad} out of range: the teacher has layers 0..{n - 1}")
    cfg = copy.deepcopy(teacher.config)
    for key, value in list(vars(cfg).items()):  # per-layer settings, e.g. Llama's layer_types
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(cfg, key, [value[i] for i in layers])
    cfg.num_hidden_layers = len(layers)
    student = type(teacher)(cfg)
    renumber = {old: new for new, old in enumerate(layers)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in renumber:
            state[f"{prefix}.{renumber[int(m.group(1))]}.{m.group(2)}"] = value
    student.load_state_dict(state, strict=True)
    return student


@dataclasses.dataclass
class Student:
    model: nn.Module
    tokenizer: Any  # None: use the cache's (the teacher's) tokenizer
    init: dict


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_student(task_type: str, *, student: str | None = None, from_teacher: str | None = None,
                 layers=None, labels: list[str] | None = None, labels_are_ids: bool = False) -> Student:
    """The initial student; `labels` is the label set a new classification head gets.

    `labels_are_ids`: the labels are integers seen in a dataset (0..max), which says nothing of
    labels that happen not to occur, so an existing head with at least that many keeps its own."""
    if bool(student) == bool(from_teacher):
        raise KDError("name the student: --student DIR|HUB_ID, or --student-from-teacher MODEL --student-layers 0,2,4 (not both)")
    from transformers import AutoConfig

    _quiet()
    task = tasks.get(task_type)
    cls = auto_class(task_type)
    path = resolve_model_dir(student or from_teacher)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise KDError(f"{path} is not a transformers model directory: {str(exc).splitlines()[0]}") from None
    kw: dict[str, Any] = {"dtype": torch.float32}  # master weights; --dtype only sets autocast
    head = task.has_head(config)
    if labels_are_ids and labels and labels == default_names(len(labels)) and head and int(config.num_labels) >= len(labels):
        labels = label_names(config)
    if task.classification and labels is not None:
        if head:  # a new head is made for the labels; an existing one must already fit them
            check_labels(config, labels, task_type, str(path), "the targets")
        else:
            kw.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    try:
        model = cls.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise KDError(f"cannot load {path} for {task_type}: {str(exc).splitlines()[0]}") from None
    if task.classification and labels is not None and label_names(model.config) == default_names(len(labels)):
        model.config.id2label = dict(enumerate(labels))  # so the saved student names its classes
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    if from_teacher:
        layer_list = parse_layers(layers)
        model = shrink(model, layer_list)
        init = {"kind": "teacher-layers", "teacher": str(from_teacher), "layers": layer_list}
    else:
        init = {"kind": "student", "student": str(student)}
    try:
        init["sha256"] = model_fingerprint(Path(path))["sha256"]
    except KDError:
        pass
    tokenizer = load_tokenizer(str(path)) if has_tokenizer(path) else None
    return Student(model=model, tokenizer=tokenizer, init=init)


@dataclasses.dataclass
class Features:
    """A language-model student's output at the target positions *before* its vocabulary-sized
    projection: what the fused head + loss (pipeline.fused_loss) takes instead of logits."""

    hidden: torch.Tensor             # [N, H], the input of the output embedding
    weight: torch.Tensor             # [V, H] (cut to the real vocabulary of a padded one)
    bias: torch.Tensor | None
    logit_scale: float | None = None
    softcap: float | None = None

    def logits(self) -> torch.Tensor:
        return finish_logits(torch.nn.functional.linear(self.hidden, self.weight, self.bias), self.logit_scale, self.softcap)


def as_logits(out) -> torch.Tensor:
    """Logits from what StudentForward returned (evaluation wants them whole)."""
    return out.logits() if isinstance(out, Features) else out


class StudentForward(nn.Module):
    """The student's logits at the target positions only.

    For language-model heads the body runs once and the (vocabulary-sized) head only on the
    gathered positions, which saves memory and time in masked-LM (~15% of tokens are
    targets). The split is checked once against the model's own forward and dropped if the
    model composes them differently. Wrapping this module (not the bare model) in DDP keeps
    the split inside DDP's forward, so gradients are still synchronised. `vocab_limit` cuts off
    the outputs at padding ids of a padded vocabulary (see pipeline.fit).

    With `fused`, a language-model student whose head takes apart as a Projection returns
    `Features` (the projection's input and weights) instead of logits, so that the loss can form
    the logits chunk by chunk and never hold [positions, vocabulary] of them (or their gradient).
    """

    def __init__(self, model: nn.Module, task_type: str, vocab_limit: int | None = None, fused: bool = False):
        super().__init__()
        self.model, self.task_type, self.vocab_limit = model, task_type, vocab_limit
        self.body, self.head = self._split()
        self.projection = self._projection() if fused and self.body is not None else None

    def _split(self):
        split = split_head(self.model, self.task_type)
        if split is None or not self._agrees(*split):
            return None, None
        return split

    @torch.no_grad()
    def _projection(self) -> Projection | None:
        """The head as pre -> output embedding -> scale/softcap, if that is exactly what it computes."""
        proj = projection(self.model, self.task_type)
        if proj is None:
            return None
        m, was_training = self.model, self.model.training
        m.eval()
        try:
            h = torch.randn(4, int(m.config.hidden_size), generator=torch.Generator().manual_seed(0))
            h = h.to(next(m.parameters()).device)
            want, got = self.head(h).float(), proj.logits(h).float()
            return proj if want.shape == got.shape and torch.allclose(want, got, atol=1e-5, rtol=1e-5) else None
        except Exception:
            return None
        finally:
            m.train(was_training)

    @torch.no_grad()
    def _agrees(self, body, head) -> bool:
        m = self.model
        was_training = m.training
        m.eval()
        try:
            g = torch.Generator().manual_seed(0)
            dev = next(m.parameters()).device
            ids = torch.randint(0, int(m.config.vocab_size), (1, 8), generator=g).to(dev)
            mask = torch.ones_like(ids)
            full = m(input_ids=ids, attention_mask=mask).logits
            split = head(body(input_ids=ids, attention_mask=mask)[0])
            return full.shape == split.shape and torch.allclose(full.float(), split.float(), atol=1e-4, rtol=1e-4)
        except Exception:
            return False
        finally:
            m.train(was_training)

    def forward(self, input_ids, attention_mask, b_idx, p_idx):
        if self.body is not None:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask)[0][b_idx, p_idx]
            if self.projection is not None:
                p, limit = self.projection, self.vocab_limit
                bias = p.linear.bias[:limit] if p.linear.bias is not None else None
                return Features(p.pre(hidden), p.linear.weight[:limit], bias, p.logit_scale, p.softcap)
            logits = self.head(hidden)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits[b_idx] if logits.dim() == 2 else logits[b_idx, p_idx]  # 2-d: one output per example
        return logits[:, :self.vocab_limit] if self.vocab_limit is not None else logits
