"""Tests of the tiny BPE tokenizer: id layout, added tokens, round trips."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, Qwen2TokenizerFast

from modeling_segcompass.assembly.tokenizer_builder import (
    ANSWER_TOKENS,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    special_token_ids,
)

CORPUS = [
    "the green triangle left of the red circle",
    "the blue square above the small red circle",
    "the largest yellow square below the green triangle",
    "<think> the red circle is left of the green triangle </think> <REF_POS>",
    "<think> the shape that is not a circle is the blue square </think> <REF_POS> <REF_POS>",
] * 10


@pytest.fixture(scope="module")
def tokenizer() -> Qwen2TokenizerFast:
    return build_tiny_tokenizer(CORPUS, vocab_size=512)


def test_added_tokens_have_the_documented_ids(tokenizer):
    for expected, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected
    ids = special_token_ids(tokenizer)
    assert (ids.pad_token_id, ids.eos_token_id) == (0, 0)
    assert (ids.image_token_id, ids.vision_start_token_id, ids.vision_end_token_id) == (5, 3, 4)
    assert (ids.think_start_token_id, ids.think_end_token_id, ids.ref_token_id) == (7, 8, 9)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_answer_tokens_are_single_ids_without_spaces(tokenizer):
    ids = tokenizer("<think>red</think><REF_POS><REF_POS>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 7
    assert ids[-3:] == [8, 9, 9]
    assert ids.count(9) == 2
    # the word between the tags is not glued to the tags
    assert tokenizer.decode(ids[1:-3]) == "red"


def test_answer_tokens_survive_skip_special_tokens(tokenizer):
    """TRL decodes completions with skip_special_tokens=True; the format reward needs the tags."""
    text = "<think> red circle </think> <REF_POS><|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "<think> red circle </think> <REF_POS>"
    assert tokenizer.decode(ids) == text


def test_corpus_words_are_mostly_single_tokens(tokenizer):
    words = {w for line in CORPUS for w in line.split() if w not in ANSWER_TOKENS}
    single = [
        w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
    ]
    assert len(single) / len(words) >= 0.9, sorted(words - set(single))


def test_plain_text_round_trips_including_unseen_characters(tokenizer):
    for text in ["the green triangle left of the red circle", "Zebra ünïcödé 123 ?!", "a\nb  c"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_training_ignores_added_token_text(tokenizer):
    """No learnt token may contain a piece of `<REF_POS>` / `<think>` (they are blanked out)."""
    learnt = [t for t in tokenizer.get_vocab() if t not in SPECIAL_TOKENS]
    assert not [t for t in learnt if "REF" in t or "think>" in t]


def test_chat_template_renders_the_qwen_layout(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == expected


def test_save_and_autotokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*CORPUS[:5], "<think>x</think><REF_POS><|im_end|>"]:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    assert special_token_ids(reloaded) == special_token_ids(tokenizer)
    assert reloaded.decode([7, 9], skip_special_tokens=True) == "<think><REF_POS>"


def test_save_dir_argument_writes_a_loadable_tokenizer(tmp_path):
    build_tiny_tokenizer(CORPUS[:5], vocab_size=300, save_dir=tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("<REF_POS>") == 9


def test_vocab_size_is_an_upper_bound(tokenizer):
    assert len(tokenizer) <= 512
    assert len(build_tiny_tokenizer(CORPUS * 3, vocab_size=300)) <= 300


@pytest.mark.parametrize("bad", [10, 265, "1024"])
def test_too_small_vocab_is_refused(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(CORPUS, vocab_size=bad)


def test_non_string_texts_are_refused():
    with pytest.raises(TypeError, match="item 1"):
        build_tiny_tokenizer(["fine", 3], vocab_size=300)
    with pytest.raises(TypeError, match="single str"):
        build_tiny_tokenizer("the red circle", vocab_size=300)


def test_special_token_ids_names_a_missing_token(tokenizer):
    # a tokenizer that never heard of <REF_POS>: the same vocabulary without it
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if t != "<REF_POS>"}
    stripped = Qwen2TokenizerFast(vocab=vocab, merges=[])
    with pytest.raises(ValueError, match="<REF_POS>.*add_tokens"):
        special_token_ids(stripped)
