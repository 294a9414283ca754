"""The one rule of whether a student fits a cache (pipeline.fit), used by train and eval alike:
label sets, vocabularies, re-tokenising classification students, and padded vocabularies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from pipeline import config as C
from pipeline.errors import KDError
from pipeline.fingerprint import tokenizer_fingerprint
from pipeline.fit import Fit, fit
from pipeline.manifest import read_manifest
from pipeline.students import load_student
from stages import teacher, train
from tests.conftest import build_model, make_data, train_tokenizer


def _cache(task_type, tokenizer_dir, outputs=None, id2label=None):
    """The parts of a targets manifest that fit() reads."""
    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_dir))
    return {"stats": {"task_type": task_type, "outputs": outputs or fp["vocab_size"], "id2label": id2label},
            "fingerprints": {"tokenizer": fp}}


def test_another_vocabulary_is_refused_for_token_level_tasks(tmp_path, tokenizer_dir):
    other_tok = tmp_path / "tok2"
    train_tokenizer(other_tok, vocab_size=200, extra_words=("zebra quagga okapi",))
    student = load_student("masked-lm", student=str(build_model(tmp_path / "s", "masked-lm", other_tok)))
    with pytest.raises(KDError, match=r"vocabulary mismatch: s has a \d+-token vocabulary .* teacher's tokenizer"):
        fit("masked-lm", student.model.config, student.tokenizer, _cache("masked-lm", tokenizer_dir), "s", "the cache")


def test_sequence_classification_may_bring_its_own_tokenizer(tmp_path, tokenizer_dir):
    other_tok = tmp_path / "tok2"
    train_tokenizer(other_tok, vocab_size=200, extra_words=("zebra quagga okapi",))
    cache = _cache("sequence-classification", tokenizer_dir, 2, {"0": "negative", "1": "positive"})
    own = load_student("sequence-classification", student=str(build_model(tmp_path / "s", "sequence-classification", other_tok)),
                       labels=["negative", "positive"])
    assert fit("sequence-classification", own.model.config, own.tokenizer, cache, "s", "c") == Fit("retokenize")
    same = load_student("sequence-classification",
                        student=str(build_model(tmp_path / "s2", "sequence-classification", tokenizer_dir)))
    assert fit("sequence-classification", same.model.config, same.tokenizer, cache, "s2", "c") == Fit("ids")


def test_label_sets_must_agree_in_count_and_names(tmp_path, tokenizer_dir):
    cache = _cache("sequence-classification", tokenizer_dir, 2, {"0": "negative", "1": "positive"})
    three = AutoConfig.from_pretrained(build_model(tmp_path / "three", "sequence-classification", tokenizer_dir, num_labels=3))
    with pytest.raises(KDError, match=r"three predicts \[L0, L1, L2\] \(3\) but the labels of c are \[negative, positive\] \(2\)"):
        fit("sequence-classification", three, None, cache, "three", "c")
    swapped = AutoConfig.from_pretrained(build_model(tmp_path / "two", "sequence-classification", tokenizer_dir))
    swapped.id2label = {0: "positive", 1: "negative"}
    with pytest.raises(KDError, match="same label names in the same order"):
        fit("sequence-classification", swapped, None, cache, "two", "c")
    swapped.id2label = {0: "LABEL_0", 1: "LABEL_1"}  # unnamed labels fit any set of that size
    assert fit("sequence-classification", swapped, None, cache, "two", "c").mode == "ids"


@pytest.mark.parametrize("task", ["causal-lm", "masked-lm"])
def test_padded_vocabularies_are_accepted_and_the_padding_ids_cut_off(tmp_path, tokenizer_dir, task):
    real = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    padded = AutoConfig.from_pretrained(build_model(tmp_path / "p", task, tokenizer_dir, vocab_padding=24))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert fit(task, padded, tok, _cache(task, tokenizer_dir), "p", "c") == Fit("ids", real)  # student padded
    exact = AutoConfig.from_pretrained(build_model(tmp_path / "e", task, tokenizer_dir))
    assert fit(task, exact, tok, _cache(task, tokenizer_dir, outputs=real + 8), "e", "c") == Fit("ids", real)  # teacher padded
    assert fit(task, exact, tok, _cache(task, tokenizer_dir), "e", "c") == Fit("ids", None)  # nothing padded
    short = AutoConfig.from_pretrained(build_model(tmp_path / "s", task, tokenizer_dir))
    short.vocab_size = real - 1
    with pytest.raises(KDError, match=f"embeds {real - 1} token ids but c was made with a {real}-token tokenizer"):
        fit(task, short, tok, _cache(task, tokenizer_dir), "s", "c")


def test_padded_teacher_and_student_train_end_to_end_without_the_padding_ids(tmp_path, tokenizer_dir):
    """Stage 1 leaves a padded teacher's padding ids out of the top-k and the logsumexp (so the key
    says so), and a padded student trains on it with its padding logits cut off."""
    task = "causal-lm"
    real = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    teacher_dir = build_model(tmp_path / "teacher", task, tokenizer_dir, vocab_padding=40)
    with torch.no_grad():  # make the padding ids the teacher's favourites: they must still never be stored
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(teacher_dir)
        m.lm_head.weight[real:] = m.lm_head.weight[:real].max(0).values * 50
        m.save_pretrained(teacher_dir)
    data = make_data(tmp_path / "d.jsonl", task, n=12)
    cache = tmp_path / "cache"
    teacher.run(C.TeacherConfig(model=str(teacher_dir), data=str(data), task_type=task, out=str(cache), top_k=8,
                                progress=False))
    m = read_manifest(cache)
    assert m["stats"]["outputs"] == real and m["stats"]["vocab_limit"] == real
    import pyarrow.parquet as pq

    from pipeline import format as fmt

    pf = pq.ParquetFile(cache / m["files"][0]["path"])
    assert fmt.read_topk(pf.read(), fmt.layout_metadata(pf))[0].max() < real
    student = build_model(tmp_path / "student", task, tokenizer_dir, vocab_padding=16, seed=1)
    out = train.run(C.TrainConfig(targets=str(cache), student=str(student), out=str(tmp_path / "s"), max_steps=2,
                                  batch_size=4, progress=False))
    assert out["steps"] == 2 and read_manifest(tmp_path / "s")["stats"]["final"]["loss"] is not None
