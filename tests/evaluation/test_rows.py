"""Row evaluation (what `segcompass eval` and the demo run): gold masks of a row, the answer
phrase of a chain of thought, and `evaluate_rows` on a tiny model."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.data.synthetic import SyntheticWorldConfig, generate_examples
from modeling_segcompass.evaluation.rows import (
    answer_phrase,
    answer_phrase_accuracy,
    evaluate_rows,
    row_masks,
)
from tests.helpers import build_tiny_tokenizer_and_processor


# --------------------------------------------------------------------------- row masks
def test_row_masks_accept_arrays_lists_and_pil_masks():
    one = np.zeros((3, 4), np.uint8)
    one[1, 2] = 1
    assert row_masks(one, 3, 4).shape == (1, 3, 4)
    assert row_masks([], 3, 4).shape == (0, 3, 4)
    pil = [Image.fromarray(one), Image.fromarray(1 - one)]
    stacked = row_masks(pil, 3, 4)
    assert stacked.dtype == np.uint8 and stacked.shape == (2, 3, 4)
    assert np.array_equal(stacked[0], one)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 4\)"):
        row_masks(np.zeros((1, 4, 3)), 3, 4)


# --------------------------------------------------------------------------- answer phrase
@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("<think> red circle . answer : red circle </think> <REF_POS>", "red circle"),
        ("<think> a : b . answer : x . answer : blue square </think><REF_POS>", "blue square"),
        ("<think> no answer here </think> <REF_POS>", ""),
        ("<think> answer : red circle", ""),  # the thought did not finish
        ("answer : red circle </think> <REF_POS>", ""),  # no thought block
        ("", ""),
    ],
)
def test_answer_phrase_reads_the_finished_thought(text, phrase):
    assert answer_phrase(text) == phrase


def test_answer_phrase_names_the_object_of_every_synthetic_response():
    for example in generate_examples(SyntheticWorldConfig(num_slots=3, seed=4), 20):
        response = example["response"]
        inner = response.split("</think>")[0]
        assert answer_phrase(response) == inner.split("answer :")[-1].strip() != ""


def test_answer_phrase_accuracy_compares_each_sample_with_its_row():
    rows = [{"response": f"<think> answer : {w} </think> <REF_POS>"} for w in ("a", "b", "c")]
    samples = [
        {"index": 0, "text": "<think> answer : a </think> <REF_POS>"},
        {"index": 2, "text": "<think> answer : b </think> <REF_POS>"},
    ]
    assert answer_phrase_accuracy(samples, rows) == 0.5
    assert answer_phrase_accuracy([], rows) is None


# --------------------------------------------------------------------------- evaluate_rows
@pytest.fixture(scope="module")
def tiny():
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    rows = generate_examples(SyntheticWorldConfig(num_slots=3, seed=1), 5)
    return model, processor, rows


def test_teacher_forced_scores_do_not_depend_on_the_batch_size(tiny):
    model, processor, rows = tiny
    runs = [
        evaluate_rows(model, processor, rows, teacher_forced=True, batch_size=b, progress=False)
        for b in (2, 5)
    ]
    for run in runs:
        assert [s["index"] for s in run.samples] == list(range(5))
        assert all("text" not in s for s in run.samples)
        assert run.metrics.overall.n == 5
        assert run.metrics.overall.giou == pytest.approx(np.mean([s["iou"] for s in run.samples]))
    first, second = ([s["iou"] for s in run.samples] for run in runs)
    assert first == pytest.approx(second, abs=1e-6)


def test_end_to_end_samples_carry_the_completion(tiny):
    model, processor, rows = tiny
    run = evaluate_rows(model, processor, rows[:2], max_new_tokens=4, progress=False)
    assert [s["index"] for s in run.samples] == [0, 1]
    assert all(isinstance(s["text"], str) for s in run.samples)
    assert all(s["num_masks"] >= 0 for s in run.samples)
