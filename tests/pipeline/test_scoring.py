"""scoring.Tally and _cached_probs on hand-made rows, against numbers worked out by hand.

Rows have the shape stages/evaluate.py streams (`scoring.cache_rows`): row, input_ids, labels,
positions and teacher = (topk_ids [P, k], topk_logits [P, k] = z/T, lse [P]) as numpy arrays.
The expected values below are computed from the teacher's raw logits z and the student's
logits with plain numpy/math, never through pipeline.metrics.
"""

import math

import numpy as np
import pytest
import torch

from pipeline.scoring import Tally, _cached_probs


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def cache_entry(z, T=1.0, k=None, dtype=np.float32):
    """What the cache stores for teacher logits z [P, V]: top-k ids, z/T at them, logsumexp(z/T)."""
    z = np.asarray(z, dtype=np.float64)
    k = z.shape[-1] if k is None else k
    ids = np.argsort(-z, axis=-1, kind="stable")[:, :k]
    vals = np.take_along_axis(z, ids, -1) / T
    lse = np.log(np.exp(z / T).sum(-1))
    return ids.astype(np.int64), vals.astype(dtype), lse.astype(dtype)


def seq_rows(labels, teacher_z=None, T=1.0, k=None):
    rows = []
    for i, y in enumerate(labels):
        t = cache_entry([teacher_z[i]], T, k) if teacher_z is not None else None
        rows.append({"row": i, "input_ids": [101, 7 + i, 102], "labels": y, "positions": [0], "teacher": t})
    return rows


def ece_by_hand(conf, correct, n_bins=15):
    """Equal-width bins (b/n, (b+1)/n]; sum over bins of |sum correct - sum conf| / N."""
    bins = {}
    for c, ok in zip(conf, correct):
        b = min(max(math.ceil(c * n_bins) - 1, 0), n_bins - 1)
        acc, cf = bins.get(b, (0.0, 0.0))
        bins[b] = (acc + ok, cf + c)
    return sum(abs(a - c) for a, c in bins.values()) / len(conf)


# --- sequence classification -----------------------------------------------------------------

STUDENT = [[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]]   # predicts 0, 1, 0
LABELS = [0, 0, 1]
TEACHER_Z = [[3.0, 1.0], [0.0, 2.0], [1.0, 1.2]]  # predicts 0, 1, 1


def test_sequence_classification_student_scores():
    T = 2.0
    tally = Tally("sequence-classification", {0: "neg", 1: "pos"})
    tally.add_model(seq_rows(LABELS, TEACHER_Z, T), torch.tensor(STUDENT), T)
    r = tally.result()

    assert r["rows"] == 3 and r["positions"] == 3
    assert r["accuracy"] == pytest.approx(1 / 3)
    # class 0: TP 1, FP 1, FN 1 -> F1 1/2; class 1: TP 0, FP 1, FN 1 -> F1 0
    assert r["macro_f1"] == pytest.approx(0.25)
    conf = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))]
    assert r["ece"] == pytest.approx((abs(1 - conf[0]) + conf[1] + conf[2]) / 3)
    assert r["ece"] == pytest.approx(ece_by_hand(conf, [1, 0, 0]))
    assert r["agreement"] == pytest.approx(2 / 3)
    # KL(teacher || student) at T = 1: the cache holds z/2, the teacher's T = 1 logits are z
    p, q = softmax(TEACHER_Z), softmax(STUDENT)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    assert r["kl"] == pytest.approx(kl.mean(), rel=1e-5)
    assert "perplexity" not in r


def test_rows_without_labels_are_left_out_of_accuracy():
    tally = Tally("sequence-classification", {0: "neg", 1: "pos"})
    tally.add_model(seq_rows([0, None, 1], TEACHER_Z), torch.tensor(STUDENT), 1.0)
    r = tally.result()
    assert r["rows"] == 3 and r["positions"] == 3
    assert r["accuracy"] == pytest.approx(0.5)  # row 0 right, row 2 wrong, row 1 unlabelled
    conf0, conf2 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-0.5))
    assert r["ece"] == pytest.approx(ece_by_hand([conf0, conf2], [1, 0]))
    assert r["agreement"] == pytest.approx(2 / 3)  # the teacher comparison needs no label


def test_all_rows_unlabelled_gives_no_accuracy():
    tally = Tally("sequence-classification", {0: "neg", 1: "pos"})
    tally.add_model(seq_rows([None, None, None], TEACHER_Z), torch.tensor(STUDENT), 1.0)
    r = tally.result()
    assert "accuracy" not in r and "macro_f1" not in r and "ece" not in r
    assert r["agreement"] == pytest.approx(2 / 3)


def test_streamed_batches_equal_one_batch():
    one = Tally("sequence-classification", {0: "neg", 1: "pos"})
    one.add_model(seq_rows(LABELS, TEACHER_Z), torch.tensor(STUDENT), 1.0)
    two = Tally("sequence-classification", {0: "neg", 1: "pos"})
    rows = seq_rows(LABELS, TEACHER_Z)
    two.add_model(rows[:1], torch.tensor(STUDENT[:1]), 1.0)
    two.add_model(rows[1:], torch.tensor(STUDENT[1:]), 1.0)
    a, b = one.result(), two.result()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key])


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_cached_teacher_classification_k_equals_c(T):
    tally = Tally("sequence-classification", {0: "neg", 1: "pos"}, from_cache=True)
    tally.add_cached_teacher(seq_rows(LABELS, TEACHER_Z, T), T)
    r = tally.result()
    # teacher predicts 0, 1, 1 against labels 0, 0, 1
    assert r["accuracy"] == pytest.approx(2 / 3)
    # class 0: TP 1, FN 1 -> 2/3; class 1: TP 1, FP 1 -> 2/3
    assert r["macro_f1"] == pytest.approx(2 / 3)
    p = softmax(TEACHER_Z)  # exact T = 1 probabilities, whatever T the cache was built at
    assert r["ece"] == pytest.approx(ece_by_hand(p.max(-1), [1, 0, 1]), rel=1e-5)
    assert "agreement" not in r and "kl" not in r


def test_cached_teacher_classification_k_below_c_at_other_t_is_uncalibrated():
    z = [[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.2, -1.0]]
    tally = Tally("sequence-classification", {0: "a", 1: "b", 2: "c"}, from_cache=True)
    tally.add_cached_teacher(seq_rows([0, 0, 1], z, T=2.0, k=2), 2.0)
    r = tally.result()
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert "ece" not in r


# --- causal LM --------------------------------------------------------------------------------

def test_causal_lm_perplexity_from_student_logits():
    rows = [{"row": 0, "input_ids": [5, 2, 3, 1], "labels": None, "positions": [0, 1, 2], "teacher": None},
            {"row": 1, "input_ids": [4, 0], "labels": None, "positions": [0], "teacher": None}]
    gold = [2, 3, 1, 0]  # input_ids[p + 1]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=g) * 2
    tally = Tally("causal-lm", {})
    tally.add_model(rows[:1], logits[:3], None)
    tally.add_model(rows[1:], logits[3:], None)
    r = tally.result()
    z = logits.double().numpy()
    nll = [math.log(np.exp(z[i]).sum()) - z[i, gold[i]] for i in range(4)]
    assert r["rows"] == 2 and r["positions"] == 4
    assert r["perplexity"] == pytest.approx(math.exp(sum(nll) / 4), rel=1e-6)
    assert "accuracy" not in r and "agreement" not in r and "teacher_labels_outside_topk" not in r


def test_causal_lm_cached_teacher_at_t1():
    z = np.array([[3.0, 1.0, 0.0, -1.0, 2.0],     # top-2: 0, 4; next token 4 is stored
                  [0.0, 1.0, 2.5, -1.0, -2.0],    # top-2: 2, 1; next token 3 is outside, tail < p(1)
                  [0.0, 1.0, 2.5, -1.0, 0.5]])    # top-2: 2, 1; next token 0 is outside, p(1) < tail
    rows = [{"row": 0, "input_ids": [9, 4, 3, 0], "labels": None, "positions": [0, 1, 2],
             "teacher": cache_entry(z, 1.0, k=2)}]
    tally = Tally("causal-lm", {}, from_cache=True)
    tally.add_cached_teacher(rows, 1.0)
    r = tally.result()
    p = softmax(z)
    # outside the top-k, p(token) <= the tail mass and <= the k-th stored probability
    tail1, tail2 = p[1, 0] + p[1, 3] + p[1, 4], p[2, 0] + p[2, 3] + p[2, 4]
    assert tail1 < p[1, 1] and p[2, 1] < tail2  # the example exercises both bounds
    lp = [math.log(p[0, 4]), math.log(tail1), math.log(p[2, 1])]
    assert r["perplexity"] == pytest.approx(math.exp(-sum(lp) / 3), rel=1e-5)
    assert r["teacher_labels_outside_topk"] == pytest.approx(2 / 3)
    assert r["rows"] == 1 and r["positions"] == 3

    hot = Tally("causal-lm", {}, from_cache=True)
    hot.add_cached_teacher([{**rows[0], "teacher": cache_entry(z, 2.0, k=2)}], 2.0)
    assert "perplexity" not in hot.result()  # the T = 1 probabilities are unknown at T = 2


# --- token classification ---------------------------------------------------------------------

def test_token_classification_entity_scores():
    id2label = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}
    rows = [{"row": 0, "input_ids": [101, 7, 8, 9, 10, 102], "labels": [-100, 1, 2, 0, 3, -100],
             "positions": [1, 2, 3, 4], "teacher": None},
            {"row": 1, "input_ids": [101, 11, 12, 102], "labels": [-100, 3, 0, -100],
             "positions": [1, 2], "teacher": None},
            {"row": 2, "input_ids": [101, 13, 102], "labels": None, "positions": [1], "teacher": None}]
    preds = [1, 0, 0, 3,   # B-PER O O B-LOC   vs gold B-PER I-PER O B-LOC
             1, 3,         # B-PER B-LOC       vs gold B-LOC O
             1]            # B-PER             on an unlabelled row: not scored
    logits = torch.full((7, 4), -1.0)
    logits[torch.arange(7), torch.tensor(preds)] = 2.0
    tally = Tally("token-classification", id2label)
    tally.add_model(rows, logits, None)
    r = tally.result()
    # gold entities: PER[0:2], LOC[3:4] | LOC[0:1]; predicted: PER[0:1], LOC[3:4] | PER[0:1], LOC[1:2]
    # correct: LOC[3:4] only -> P = 1/4, R = 1/3, F1 = 2PR/(P+R) = 2/7
    assert r["entity_precision"] == pytest.approx(1 / 4)
    assert r["entity_recall"] == pytest.approx(1 / 3)
    assert r["entity_f1"] == pytest.approx(2 / 7)
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["rows"] == 3 and r["positions"] == 7
    assert "macro_f1" not in r


# --- _cached_probs ------------------------------------------------------------------------------

def test_cached_probs_k_equals_c_is_exact_at_any_t():
    z = np.array([[0.5, 2.0, -1.0], [1.0, 1.0, 3.0]])
    for T in (1.0, 2.0, 0.5):
        got = _cached_probs(*cache_entry(z, T, dtype=np.float64), T, 3)
        assert got == pytest.approx(softmax(z), rel=1e-6)


def test_cached_probs_k_below_c_at_t1_spreads_the_tail_evenly():
    z = np.array([[2.0, 0.5, -1.0, 0.0], [-2.0, 1.0, 0.0, 3.0]])
    got = _cached_probs(*cache_entry(z, 1.0, k=2, dtype=np.float64), 1.0, 4)
    p = softmax(z)
    want = np.array([[p[0, 0], p[0, 1], (p[0, 2] + p[0, 3]) / 2, (p[0, 2] + p[0, 3]) / 2],
                     [(p[1, 0] + p[1, 2]) / 2, p[1, 1], (p[1, 0] + p[1, 2]) / 2, p[1, 3]]])
    assert got == pytest.approx(want, rel=1e-6)
    assert got.sum(-1) == pytest.approx([1.0, 1.0])


def test_cached_probs_k_below_c_at_other_t_is_unknown():
    z = np.array([[2.0, 0.5, -1.0, 0.0]])
    assert _cached_probs(*cache_entry(z, 2.0, k=2, dtype=np.float64), 2.0, 4) is None


def test_cached_probs_no_positions():
    got = _cached_probs(np.zeros((0, 2), np.int64), np.zeros((0, 2)), np.zeros(0), 1.0, 3)
    assert got.shape == (0, 3)
