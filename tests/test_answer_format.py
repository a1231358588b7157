"""answer_format: one parser of `<think> ... </think> <REF_POS>` for text and for token ids."""

from __future__ import annotations

import pytest

from modeling_segcompass.answer_format import (
    AnswerTokenIds,
    format_score,
    grounding_problem,
    parse_answer,
    parse_answer_ids,
)
from tests.helpers import REF, THINK, THINK_END, build_tiny_tokenizer_and_processor

CASES = [
    "<think> the red one </think> here: <REF_POS> <REF_POS>",
    "hi <REF_POS> <think> x </think>",
    "no tags at all",
    "<think> a <REF_POS> b </think> <REF_POS>",
    "</think> <think> a </think> <REF_POS>",
    "<think> a </think> <REF_POS> <think> b",
]


def test_fields_of_a_well_formed_answer():
    a = parse_answer("Sure. <think> red is left </think> it is <REF_POS> <REF_POS>")
    assert (a.thought, a.thought_chars, a.prefix, a.between) == (
        "red is left",
        13,
        "Sure.",
        "it is",
    )
    assert (a.num_think_blocks, a.num_think_ends, a.num_ref, a.refs_after_think) == (1, 1, 2, True)
    assert a.text == "Sure. <think> red is left </think> it is <REF_POS> <REF_POS>"


@pytest.mark.parametrize("text", CASES)
def test_ids_and_text_give_the_same_answer(text):
    tokenizer, _ = build_tiny_tokenizer_and_processor()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert {THINK, THINK_END, REF} & set(ids) or "<" not in text
    by_ids = parse_answer_ids(
        ids, AnswerTokenIds(ref=REF, think_start=THINK, think_end=THINK_END), tokenizer.decode
    )
    by_text = parse_answer(tokenizer.decode(ids))
    for field in ("num_think_blocks", "num_think_ends", "num_ref", "refs_after_think"):
        assert getattr(by_ids, field) == getattr(by_text, field), field
    for field in ("thought", "prefix", "between"):  # runs decode on their own: spacing may differ
        a, b = getattr(by_ids, field), getattr(by_text, field)
        assert (a is None) == (b is None) and (a or "").split() == (b or "").split(), field
    assert grounding_problem(by_ids, 3) == grounding_problem(by_text, 3)
    assert format_score(by_ids, 2) == format_score(by_text, 2)


def test_a_reference_token_is_found_by_id_not_by_its_spelling():
    spelled = [60, 61, 62]  # three ordinary tokens that decode to "<REF_POS>"
    decode = {(60, 61, 62): "<REF_POS>"}

    def fake_decode(run):
        return " ".join(decode.get(tuple(run[i : i + 3]), "w") for i in range(0, len(run), 3))

    ids = AnswerTokenIds(ref=REF, think_start=THINK, think_end=THINK_END)
    a = parse_answer_ids([THINK, 70, 71, 72, THINK_END, *spelled], ids, fake_decode)
    assert a.num_ref == 0 and "<REF_POS>" in a.text
    assert grounding_problem(a, 3).startswith("no <REF_POS> token")
    b = parse_answer_ids([THINK, 70, 71, 72, THINK_END, REF], ids, fake_decode)
    assert b.num_ref == 1 and grounding_problem(b, 3) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<think> a </think> <REF_POS>", None),
        ("a </think> <REF_POS>", None),  # the chat template opened the thought
        ("<think> a </think>", "no <REF_POS>"),
        ("<think> a <REF_POS>", "0 </think>"),
        ("</think> <think> a <REF_POS>", "</think> comes before <think>"),
        ("<think> a <REF_POS> </think> <REF_POS>", "inside the"),
        ("<think> a </think>" + " <REF_POS>" * 4, "4 <REF_POS> tokens but the model has 3"),
    ],
)
def test_grounding_problem_names_what_is_wrong(text, problem):
    reason = grounding_problem(text, 3)
    assert reason is None if problem is None else problem in reason


def test_format_score_grades_style_and_refuses_bad_arguments():
    assert format_score("<think>" + "x" * 2049 + "</think><REF_POS>") == 0.9
    assert format_score("<think>x</think>" + " w" * 11 + "<REF_POS>") == 0.9
    assert format_score("<think>x</think>" + " w" * 10 + "<REF_POS>") == 1.0
    assert format_score("<think>x</think><think>y</think><REF_POS>") == 0.0
    with pytest.raises(ValueError, match="num_ref"):
        format_score("<think>x</think><REF_POS>", 0)
    with pytest.raises(TypeError, match="must be a str"):
        format_score(None)
