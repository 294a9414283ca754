"""Student initialisation (layer copying for BERT- and Llama-like models), the label checks of a
new or existing head, and the positions-only forward (the fit to a cache: test_fit.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import KDError
from pipeline.students import StudentForward, find_layer_list, load_student, parse_layers, shrink
from tests.conftest import build_model


@pytest.mark.parametrize("spec,want", [("0,2,4", [0, 2, 4]), ("[1, 0]", [1, 0]), ([3], [3]), ("2", [2])])
def test_parse_layers(spec, want):
    assert parse_layers(spec) == want


@pytest.mark.parametrize("spec", ["", "a,b", "1,1", None])
def test_parse_layers_refuses_nonsense(spec):
    with pytest.raises(KDError, match="student-layers"):
        parse_layers(spec)


@pytest.mark.parametrize("task_type,prefix", [("masked-lm", "bert.encoder.layer"), ("causal-lm", "model.layers")])
def test_shrink_copies_the_chosen_layers(tmp_path, tokenizer_dir, task_type, prefix):
    from pipeline.models import auto_class

    path = build_model(tmp_path / "t", task_type, tokenizer_dir, layers=3)
    teacher = auto_class(task_type).from_pretrained(path)
    assert find_layer_list(teacher)[0] == prefix
    student = shrink(teacher, [2, 0])
    assert student.config.num_hidden_layers == 2
    for k in ("layer_types",):  # per-layer config lists follow the layers (Llama has one in transformers 5)
        if getattr(teacher.config, k, None) is not None:
            assert len(getattr(student.config, k)) == 2
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        if key.startswith(prefix + ".0."):
            assert torch.equal(value, t[key.replace(prefix + ".0.", prefix + ".2.")])
        elif key.startswith(prefix + ".1."):
            assert torch.equal(value, t[key.replace(prefix + ".1.", prefix + ".0.")])
        else:
            assert torch.equal(value, t[key]), key  # embeddings and head
    ids = torch.randint(0, 100, (2, 7))
    assert student(input_ids=ids).logits.shape == teacher(input_ids=ids).logits.shape


def test_shrink_refuses_out_of_range_layers(models):
    from pipeline.models import auto_class

    teacher = auto_class("masked-lm").from_pretrained(models["masked-lm"])
    with pytest.raises(KDError, match=r"out of range.*0\.\.1"):
        shrink(teacher, [0, 5])


def test_label_count_and_names_must_match(tmp_path, tokenizer_dir):
    three = build_model(tmp_path / "three", "sequence-classification", tokenizer_dir, num_labels=3)
    with pytest.raises(KDError, match=r"predicts \[L0, L1, L2\] \(3\) but the labels of the targets are \[negative, positive\] \(2\)"):
        load_student("sequence-classification", student=str(three), labels=["negative", "positive"])
    two = build_model(tmp_path / "two", "sequence-classification", tokenizer_dir)
    with pytest.raises(KDError, match="label set mismatch: .* same label names in the same order"):
        load_student("sequence-classification", student=str(two), labels=["positive", "negative"])


def test_a_bare_encoder_gets_a_new_head_with_the_cache_labels(tmp_path, tokenizer_dir, models):
    from transformers import AutoModel

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(models["masked-lm"]).save_pretrained(bare)
    s = load_student("sequence-classification", student=str(bare), labels=["neg", "neu", "pos"])
    assert s.model.config.num_labels == 3 and s.model.config.id2label[2] == "pos"
    assert s.tokenizer is None  # no tokenizer saved there: the trainer uses the cache's


def test_student_and_from_teacher_are_exclusive(models):
    with pytest.raises(KDError, match="not both"):
        load_student("masked-lm", student=str(models["masked-lm"]), from_teacher=str(models["masked-lm"]), layers="0")
    with pytest.raises(KDError, match="name the student"):
        load_student("masked-lm")


@pytest.mark.parametrize("task_type", ["sequence-classification", "token-classification", "masked-lm", "causal-lm"])
def test_forward_at_positions_matches_the_full_forward(models, task_type):
    s = load_student(task_type, from_teacher=str(models[task_type]), layers="1")
    fwd = StudentForward(s.model, task_type).eval()
    assert (fwd.body is not None) == (task_type in ("masked-lm", "causal-lm"))  # LM heads run on targets only
    ids = torch.randint(5, 150, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    b, p = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 5])
    full = s.model(input_ids=ids, attention_mask=mask).logits
    want = full[b] if full.dim() == 2 else full[b, p]
    torch.testing.assert_close(fwd(ids, mask, b, p), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["causal-lm", "masked-lm"])
def test_lm_students_hand_the_fused_loss_their_features(models, task):
    """With fused=True the forward stops before the output embedding; the features it returns,
    projected, are exactly the logits of the unfused forward (BERT's transform included)."""
    from pipeline.students import Features

    student = load_student(task, student=str(models[task]))
    fused, plain = StudentForward(student.model, task, fused=True), StudentForward(student.model, task)
    assert fused.projection is not None
    ids = torch.randint(5, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones_like(ids), torch.tensor([0, 0, 1]), torch.tensor([1, 3, 5]))
    with torch.no_grad():
        out = fused(*args)
        assert isinstance(out, Features) and out.hidden.shape == (3, student.model.config.hidden_size)
        torch.testing.assert_close(out.logits(), plain(*args), atol=1e-5, rtol=1e-5)


def test_classification_students_never_fuse(models):
    student = load_student("sequence-classification", student=str(models["sequence-classification"]))
    assert StudentForward(student.model, "sequence-classification", fused=True).projection is None
