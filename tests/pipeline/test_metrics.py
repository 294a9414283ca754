"""Tests for pipeline.metrics: every expected number is worked out by hand in a comment."""

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import (
    accuracy,
    bio_entities,
    entity_prf,
    expected_calibration_error,
    kl_per_position,
    macro_f1,
    perplexity,
    teacher_predictions,
    teacher_tail_mass,
)


def kl_teacher_student(*args, **kw) -> float:
    """The mean KL over positions, as stage 3 reports it (a sum of kl_per_position over batches / count)."""
    return float(np.mean(kl_per_position(*args, **kw)))


def _cache(z, k, temperature, dtype=np.float32):
    """A soft-target cache entry per the contract: top-k ids by z, z/T there, lse of z/T."""
    z = np.asarray(z, dtype=np.float64)
    ids = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    zt = z / temperature
    lse = np.log(np.exp(zt - zt.max(-1, keepdims=True)).sum(-1)) + zt.max(-1)
    return ids, np.take_along_axis(zt, ids, -1).astype(dtype), lse.astype(np.float32)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_ignores_minus_100():
    # labelled positions 0,1,2,4 -> preds 1,0,2,1 vs labels 1,1,2,0 -> 2 correct of 4
    assert accuracy([1, 0, 2, 2, 1], [1, 1, 2, -100, 0]) == 0.5


def test_accuracy_accepts_tensors_and_2d():
    preds = torch.tensor([[1, 2], [3, 0]])
    labels = torch.tensor([[1, -100], [0, 0]])
    assert accuracy(preds, labels) == pytest.approx(2 / 3)  # (1=1) (3!=0) (0=0)


def test_accuracy_errors():
    with pytest.raises(ValueError, match="no labelled"):
        accuracy([1, 2], [-100, -100])
    with pytest.raises(ValueError, match="differ in size"):
        accuracy([1, 2], [1])


# ----------------------------------------------------------------------------- macro-F1


def test_macro_f1_with_class_never_predicted():
    labels = [0, 0, 1, 1, 2]
    preds = [0, 0, 1, 0, 1]
    # class 0: TP 2, FP 1, FN 0 -> F1 = 2*2/(2*2+1+0) = 0.8
    # class 1: TP 1, FP 1, FN 1 -> F1 = 2/(2+1+1) = 0.5
    # class 2: TP 0, FP 0, FN 1 -> F1 = 0 (never predicted)
    expected = (0.8 + 0.5 + 0.0) / 3
    assert macro_f1(preds, labels) == pytest.approx(expected)
    # declared but unused classes 3, 4 have TP+FP+FN = 0 and are excluded
    assert macro_f1(preds, labels, num_classes=5) == pytest.approx(expected)


def test_macro_f1_class_only_predicted_counts_and_ignore():
    # class 0: TP 1, FN 1 -> 2/3; class 1 only predicted: FP 1 -> 0; mean = 1/3
    assert macro_f1([0, 1, 2], [0, 0, -100]) == pytest.approx(1 / 3)
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0


def test_macro_f1_errors():
    with pytest.raises(ValueError, match="out of range"):
        macro_f1([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match=">= 0"):
        macro_f1([0, -1], [0, 1])


# ----------------------------------------------------------------------------- BIO entities


@pytest.mark.parametrize(
    "tags, expected",
    [
        (["O", "B-PER", "I-PER"], {("PER", 1, 3)}),  # entity runs to the end of the sequence
        (["O", "I-LOC", "I-LOC", "O"], {("LOC", 1, 3)}),  # lenient start: I- after O
        (["I-PER"], {("PER", 0, 1)}),  # I- at sequence start
        (["I-PER", "I-PER", "I-LOC"], {("PER", 0, 2), ("LOC", 2, 3)}),  # type change I-PER I-LOC
        (["B-PER", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 2)}),  # I- of another type starts anew
        (["B-PER", "B-PER"], {("PER", 0, 1), ("PER", 1, 2)}),  # adjacent B- B-: two entities
        (["B-PER", "I-PER", "B-PER", "I-PER"], {("PER", 0, 2), ("PER", 2, 4)}),
        (["O", "O", "O"], set()),  # all O
        ([], set()),  # empty sequence
        (["PER", "PER", "O", "LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),  # bare tag = I-tag (IO)
        (["B-PER", "PER"], {("PER", 0, 2)}),  # bare PER continues a PER entity
        (["B-MISC-X", "I-MISC-X"], {("MISC-X", 0, 2)}),  # hyphen inside the type
    ],
)
def test_bio_entities(tags, expected):
    assert bio_entities(tags) == expected


@pytest.mark.parametrize("bad", ["E-PER", "S-LOC", "B-", ""])
def test_bio_entities_refuses_non_bio(bad):
    with pytest.raises(ValueError):
        bio_entities(["O", bad])


def test_entity_prf_type_mismatch():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold: PER(0,2) LOC(3,4) | ORG(0,1); pred: PER(0,2) ORG(3,4) | ORG(0,1)
    # correct: PER and the 2nd sentence's ORG -> 2 of 3 found, 2 of 3 gold
    r = entity_prf(true, pred)
    assert r == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


def test_entity_prf_unequal_p_r():
    # gold PER(0,1), LOC(2,3); predicted only PER(0,1): P = 1/1, R = 1/2, F1 = 2*1*.5/1.5 = 2/3
    r = entity_prf([["B-PER", "O", "B-LOC", "O"]], [["B-PER", "O", "O", "O"]])
    assert r == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})


def test_entity_prf_partial_span_is_wrong():
    # gold PER(0,2), predicted PER(0,1): no exact match -> P = R = F1 = 0
    r = entity_prf([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert r == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_entity_prf_no_predictions_and_empty():
    # no predicted entities: precision 0/0 := 0, recall 0/1 = 0
    assert entity_prf([["B-PER"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_prf([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert entity_prf([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # a gold entity-free corpus with a predicted entity: precision 0/1, recall 0/0 := 0
    assert entity_prf([["O"]], [["B-PER"]])["precision"] == 0.0


def test_entity_prf_entities_are_per_sentence():
    # the same span (PER, 0, 1) in different sentences must not match
    r = entity_prf([["B-PER"], ["O"]], [["O"], ["B-PER"]])
    assert r["f1"] == 0.0
    r = entity_prf([["B-PER"], ["B-LOC"]], [["B-PER"], ["B-LOC"]])
    assert r == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_entity_prf_length_mismatch():
    with pytest.raises(ValueError, match="sequence 0"):
        entity_prf([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="predicted"):
        entity_prf([["O"]], [])


# ----------------------------------------------------------------------------- ECE


def test_ece_perfectly_calibrated():
    # 10 rows at confidence 0.8 with 8 correct, 4 rows at 0.75 with 3 correct: every bin's
    # accuracy equals its mean confidence -> ECE = 0
    probs = [[0.8, 0.2]] * 10 + [[0.25, 0.75]] * 4
    labels = [0] * 8 + [1] * 2 + [1, 1, 1, 0]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident():
    # 4 rows at confidence 0.9, half correct: one bin, |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(probs, [0, 0, 1, 1]) == pytest.approx(0.4)


def test_ece_two_bins_weighted_by_count():
    # n_bins=2: bins (0, .5] and (.5, 1]
    # row 0: conf .4 (argmax 0), label 0 -> bin 0: acc 1, conf .4, gap .6, weight 1/3
    # rows 1-2: conf .9 (argmax 0), labels 0, 1 -> bin 1: acc .5, conf .9, gap .4, weight 2/3
    # ECE = .6/3 + .4*2/3 = 0.2 + 0.26667 = 7/15
    probs = [[0.4, 0.3, 0.3], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]
    assert expected_calibration_error(probs, [0, 0, 1], n_bins=2) == pytest.approx(7 / 15)
    # one bin: |mean acc - mean conf| = |2/3 - 2.2/3| = 0.2/3
    assert expected_calibration_error(probs, [0, 0, 1], n_bins=1) == pytest.approx(0.2 / 3)


def test_ece_ignores_minus_100_and_takes_tensors():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    # the third row is ignored; the rest are two correct at conf .9 -> |1 - .9| = .1
    assert expected_calibration_error(probs, torch.tensor([0, 0, -100])) == pytest.approx(0.1)


def test_ece_refuses_logits_and_empty():
    with pytest.raises(ValueError, match="softmax"):
        expected_calibration_error([[2.0, -1.0]], [0])
    with pytest.raises(ValueError, match="no labelled"):
        expected_calibration_error([[0.5, 0.5]], [-100])


# ----------------------------------------------------------------------------- perplexity


def test_perplexity():
    assert perplexity(10 * math.log(2.0), 10) == pytest.approx(2.0)  # mean NLL ln 2 -> 2
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="count=0"):
        perplexity(1.0, 0)


# ----------------------------------------------------------------------------- teacher side


def test_teacher_predictions_and_tail_mass():
    assert teacher_predictions(np.array([[3, 1], [0, 2]])).tolist() == [3, 0]
    # p = 0.5, 0.25 at lse 0 -> tail 0.25; a float16 overshoot is clipped to 0
    tail = teacher_tail_mass([[math.log(0.5), math.log(0.25)], [0.0, 0.001]], [0.0, 0.0])
    np.testing.assert_allclose(tail, [0.25, 0.0])


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_zero_when_student_equals_teacher_full_k(temperature):
    z = np.random.default_rng(0).normal(size=(6, 5)) * 3
    ids, tl, lse = _cache(z, k=5, temperature=temperature)
    student = np.take_along_axis(tl.astype(np.float64) * temperature, np.argsort(ids, -1), -1)
    assert kl_teacher_student(student, ids, tl, lse, temperature) == pytest.approx(0.0, abs=1e-12)


def test_kl_matches_dense_reference_full_k_t1():
    rng = np.random.default_rng(1)
    z, s = rng.normal(size=(8, 7)) * 2, rng.normal(size=(8, 7)) * 2
    ids, tl, lse = _cache(z, k=7, temperature=1.0)
    # reference: torch's dense KL(p || q) on the float32 values the cache holds
    zt = torch.tensor(z, dtype=torch.float32).double()
    ref = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(s), -1),
                                     torch.log_softmax(zt, -1), log_target=True,
                                     reduction="batchmean").item()
    assert kl_teacher_student(s, ids, tl, lse, 1.0) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_kl_hand_case_exact_tail():
    # teacher p = [.5, .3, .2], k = 1, T = 1: stored p(0) = .5, tail .5
    # student q = [.25, .25, .5]: q(0) = .25, tail .75
    # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3) = 0.1438410...
    ids, tl, lse = _cache(np.log([[0.5, 0.3, 0.2]]), k=1, temperature=1.0, dtype=np.float64)
    student = np.log([[0.25, 0.25, 0.5]])
    assert kl_teacher_student(student, ids, tl, lse, 1.0) == pytest.approx(0.5 * math.log(4 / 3))


def test_kl_hand_case_exact_tail_from_a_grid_lse_at_t1():
    # the hand case above, cached at T = 2 ([ln .5] / 2) with a grid holding T = 1: its lse at T = 1
    # (0 for these normalised logits) makes the tail exact again
    ids, tl = np.array([[0]]), np.array([[math.log(0.5) / 2]])
    student = np.log([[0.25, 0.25, 0.5]])
    assert kl_teacher_student(student, ids, tl, np.array([0.0]), 2.0, lse_temperature=1.0) == pytest.approx(0.5 * math.log(4 / 3))
    assert kl_teacher_student(student, ids, tl, np.array([0.0]), 2.0) == pytest.approx(math.log(4))  # renormalised: p(0) = 1


def test_kl_hand_case_renormalised_when_t_not_1():
    # z at the top-2 = [2, 0], cached at T = 2 as [1, 0]; the T=1 tail is unknown, so the
    # teacher is renormalised: p = [e^2, 1] / (e^2 + 1) = [0.880797, 0.119203], tail 0.
    # student uniform over 3: q = 1/3 at both ids. KL = ln 3 - H(p) = 1.098612 - 0.365334
    p1 = math.e ** 2 / (math.e ** 2 + 1)
    expected = math.log(3) + p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)  # = 0.733278
    assert expected == pytest.approx(0.733278, abs=1e-6)
    ids, tl = np.array([[0, 1]]), np.array([[1.0, 0.0]])
    for lse in (0.0, 123.0):  # lse of z/T carries no T = 1 information and must not matter
        got = kl_teacher_student(np.zeros((1, 3)), ids, tl, np.array([lse]), 2.0)
        assert got == pytest.approx(expected)


def test_kl_nan_free_when_tail_is_zero():
    v = 50
    z = np.full((3, v), -1e4)
    z[:, 0] = 0.0  # the teacher's tail mass is e^-1e4: 0 in any float
    ids, tl, lse = _cache(z, k=1, temperature=1.0, dtype=np.float16)
    tl = tl + np.float16(0.001)  # float16 rounding overshoot: sum of top-k p > 1
    student = z.copy()
    student[1, 1:] = -np.inf  # a student with an exactly empty tail
    student[2, 0] = -np.inf  # a student that rules out the teacher's top token
    per = kl_per_position(student, ids, tl, lse, 1.0)
    assert np.isfinite(per).all() and (per >= 0).all()
    assert per[0] == pytest.approx(0.0, abs=1e-9) and per[1] == pytest.approx(0.0, abs=1e-9)
    assert per[2] > 100  # large but finite (student log-prob floored near -708)


def test_kl_shapes_chunks_and_tensors():
    rng = np.random.default_rng(2)
    z, s = rng.normal(size=(2, 5, 11)), rng.normal(size=(2, 5, 11))
    ids, tl, lse = _cache(z, k=4, temperature=1.0, dtype=np.float16)
    flat = kl_per_position(s.reshape(10, 11), ids.reshape(10, 4), tl.reshape(10, 4),
                           lse.reshape(10), 1.0)
    assert flat.shape == (10,) and (flat > 0).all()
    np.testing.assert_allclose(kl_per_position(s, ids, tl, lse, 1.0), flat)  # [B, L, V] input
    np.testing.assert_allclose(kl_per_position(s, ids, tl, lse, 1.0, chunk_elements=11), flat)
    got = kl_teacher_student(torch.tensor(s, dtype=torch.bfloat16), torch.tensor(ids),
                             torch.tensor(tl), torch.tensor(lse), 1.0)
    assert got == pytest.approx(flat.mean(), rel=0.05)  # bfloat16 student logits


def test_kl_errors():
    s = np.zeros((2, 4))
    ids, tl, lse = np.array([[0], [1]]), np.zeros((2, 1)), np.zeros(2)
    with pytest.raises(ValueError, match="position counts"):
        kl_teacher_student(s, ids[:1], tl[:1], lse[:1], 1.0)
    with pytest.raises(ValueError, match="vocabulary"):
        kl_teacher_student(s, ids + 4, tl, lse, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kl_teacher_student(s, ids, tl, lse, 0.0)
