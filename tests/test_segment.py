"""model.segment: generation, one forward, slots kept by confidence, masks at the original size."""

import numpy as np
import pytest
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.answer_format import AnswerTokenIds, format_score, parse_answer_ids
from tests.helpers import IM_END, REF, THINK, THINK_END, build_tiny_tokenizer_and_processor


@pytest.fixture(scope="module")
def setup():
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(
        SegCompassConfig.tiny(vocab_size=len(tokenizer))
    ).eval()
    return model, processor


def forced(sequence):
    """prefix_allowed_tokens_fn that makes generation write `sequence` then stop."""

    def allowed(batch_id, input_ids):
        step = getattr(allowed, "start", None)
        if step is None:
            allowed.start = input_ids.shape[-1]
        position = input_ids.shape[-1] - allowed.start
        return [sequence[min(position, len(sequence) - 1)]]

    return allowed


def image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_completion_with_refs_gives_masks_at_original_size(setup):
    model, processor = setup
    word = (
        processor.tokenizer.convert_tokens_to_ids("the")
        if "the" in processor.tokenizer.get_vocab()
        else 20
    )
    sequence = [THINK, word, THINK_END, REF, REF, IM_END]
    results = model.segment(
        image(48, 80), "the red circle", processor, confidence_threshold=-1e9,
        generation_kwargs={"prefix_allowed_tokens_fn": forced(sequence)},
    )  # fmt: skip
    (result,) = results
    assert result.reason is None
    assert result.text.count("<REF_POS>") == 2 and "</think>" in result.text
    # two <REF_POS> tokens -> two grounded slots (the third has no token)
    assert result.slot_indices.tolist() == [0, 1]
    assert result.masks.shape == (2, 48, 80) and result.masks.dtype == torch.bool
    assert result.heatmaps.shape == (3, 48, 80)
    assert ((result.heatmaps >= 0) & (result.heatmaps <= 1)).all()
    torch.testing.assert_close(result.scores, torch.sigmoid(result.conf_logits[:2]))
    # the concept trace covers exactly the forward's tokens
    assert result.concept_indices.shape[0] == result.input_ids.shape[0]
    assert result.slot_concept_weights.shape[:2] == (3, result.input_ids.shape[0])
    assert result.input_ids.tolist()[-len(sequence) :] == sequence
    # the same masks as a direct forward on those ids
    enc = processor(images=[image(48, 80)], instructions=["the red circle"])
    with torch.no_grad():
        out = model(
            input_ids=result.input_ids[None], attention_mask=torch.ones_like(result.input_ids)[None],
            pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
            sam_pixel_values=enc["sam_pixel_values"],
        )  # fmt: skip
    direct = processor.post_process_masks(
        out.mask_logits, enc["original_sizes"], enc["reshaped_input_sizes"]
    )
    assert torch.equal(direct[0][:2], result.masks)


def test_completion_without_ref_gives_no_mask_and_a_reason(setup):
    model, processor = setup
    results = model.segment(
        [image(64, 64, 1), image(32, 50, 2)], ["the red circle", "the blue square"], processor,
        max_new_tokens=8, confidence_threshold=-1e9, generation_kwargs={"suppress_tokens": [REF]},
    )  # fmt: skip
    for result, (h, w) in zip(results, [(64, 64), (32, 50)]):
        assert result.masks.shape == (0, h, w)
        assert "no <REF_POS>" in result.reason
        assert "<REF_POS>" not in result.text


def test_high_threshold_means_no_target(setup):
    model, processor = setup
    sequence = [THINK, THINK_END, REF, IM_END]
    (result,) = model.segment(
        image(64, 64), "the purple star", processor, confidence_threshold=1e9,
        generation_kwargs={"prefix_allowed_tokens_fn": forced(sequence)},
    )  # fmt: skip
    assert result.masks.shape[0] == 0 and "confidence threshold" in result.reason


def test_errors(setup):
    model, processor = setup
    with pytest.raises(ValueError, match="processor"):
        model.segment(image(8, 8), "x")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.segment(image(8, 8), "x", processor, max_new_tokens=0)


def spelled_ref_ids(tokenizer) -> list[int]:
    """Ordinary tokens that decode to the text "<REF_POS>" (one per character)."""
    ids = [i for ch in "<REF_POS>" for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    assert REF not in ids and tokenizer.decode(ids) == "<REF_POS>"
    return ids


@pytest.mark.parametrize("strict_format", [True, False])
def test_ref_spelled_with_ordinary_tokens_is_no_ref_and_never_raises(setup, strict_format):
    # The text reads "<think>...</think><REF_POS>", but no token is the <REF_POS> id: no slot
    # is grounded, in strict and in permissive mode, and segment returns a reason.
    model, processor = setup
    sequence = [THINK, 20, THINK_END, *spelled_ref_ids(processor.tokenizer), IM_END]
    (result,) = model.segment(
        image(40, 56), "the red circle", processor, max_new_tokens=len(sequence) + 1,
        confidence_threshold=-1e9, strict_format=strict_format,
        generation_kwargs={"prefix_allowed_tokens_fn": forced(sequence)},
    )  # fmt: skip
    assert result.input_ids.tolist()[-len(sequence) :] == sequence
    assert result.text.endswith("<REF_POS>")  # the text spells it ...
    assert result.masks.shape == (0, 40, 56) and result.slot_indices.numel() == 0
    assert result.reason.startswith("no <REF_POS> token in the completion")  # ... the ids do not
    decode = processor.tokenizer.decode
    answer = parse_answer_ids(sequence[:-1], AnswerTokenIds.from_config(model.config), decode)
    assert answer.num_ref == 0 and format_score(answer, num_ref=1) == 0.0


def test_prompt_past_the_vlm_positions_is_refused_with_the_lengths_and_the_fix(setup):
    model, processor = setup
    assert model.vlm.config.get_text_config().max_position_embeddings == 512
    long = " ".join(["the red circle left of the green triangle"] * 60)  # about 2,700 chars
    old_limit = processor.max_instruction_chars
    processor.max_instruction_chars = 10_000
    try:
        with pytest.raises(ValueError, match=r"instructions\[1\] with images\[1\] makes a prompt of \d+ tokens \(1 of them for the image\).*max_position_embeddings=512.*shorten the instruction"):  # fmt: skip
            model.segment([image(8, 8), image(8, 8)], ["ok", long], processor)
    finally:
        processor.max_instruction_chars = old_limit
    # a prompt that fits, with a generation budget that would not
    with pytest.raises(ValueError, match=r"max_new_tokens=600 .*lower max_new_tokens to at most"):
        model.segment(image(8, 8), "the red circle", processor, max_new_tokens=600)
