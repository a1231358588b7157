"""Tests of SegCompassCollator: synthetic-world examples -> the processor's training batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.collator import REQUIRED_KEYS, SegCompassCollator
from modeling_segcompass.processing_segcompass import SegCompassProcessor

EXPECTED_KEYS = {
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "image_grid_thw",
    "sam_pixel_values",
    "gt_masks",
    "num_objects",
    "valid_mask",
}


@pytest.fixture(scope="module")
def processor():
    tokenizer = build_tiny_tokenizer(
        ["the red circle left of the blue square", "<think> red circle </think> <REF_POS>"] * 10,
        vocab_size=320,
    )
    return SegCompassProcessor.tiny(tokenizer, num_slots=2)


def make_example(seed: int, num_objects: int, size: int = 64) -> dict:
    """An example in the synthetic world's schema, with square objects."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_objects, size, size), dtype=np.uint8)  # (N, H, W)
    for j in range(num_objects):
        masks[j, 4 + 20 * j : 16 + 20 * j, 8:24] = 1
    return {
        "image": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        "instruction": "the red circle" if num_objects else "the purple star",
        "response": "<think> red circle </think> " + " ".join(["<REF_POS>"] * 2),
        "masks": masks,
        "num_objects": num_objects,
        "family": "attribute",  # extra keys are ignored
    }


def test_batch_is_the_processor_output(processor):
    examples = [make_example(0, 1), make_example(1, 2), make_example(2, 0)]
    batch = SegCompassCollator(processor)(examples)
    assert set(batch) == EXPECTED_KEYS
    direct = processor(
        [e["image"] for e in examples],
        [e["instruction"] for e in examples],
        responses=[e["response"] for e in examples],
        masks=[e["masks"] for e in examples],
    )
    for key in EXPECTED_KEYS:
        assert torch.equal(batch[key], direct[key]), key
    assert batch["num_objects"].tolist() == [1, 2, 0]
    assert batch["gt_masks"].shape == (3, 2, 64, 64)
    # each object's 12x16 square lands on the 64 grid unchanged (64 px images, S = M = 64)
    assert batch["gt_masks"].sum(dim=(2, 3)).tolist() == [[192, 0], [192, 192], [0, 0]]
    # labels supervise exactly the response: 2 <REF_POS> per row
    assert ((batch["labels"] == 9).sum(1) == 2).all()


def test_dataset_style_rows_are_accepted(processor):
    """A `datasets` row holds masks as nested lists; a no-target row as an empty list."""
    example, empty = make_example(3, 1), make_example(4, 0)
    as_lists = dict(example, masks=example["masks"].tolist())
    no_target = dict(empty, masks=[])
    collator = SegCompassCollator(processor)
    batch = collator([as_lists, no_target])
    reference = collator([example, empty])
    for key in EXPECTED_KEYS:
        assert torch.equal(batch[key], reference[key]), key


def test_num_slots_override_reaches_the_prompt(processor):
    batch = SegCompassCollator(processor, num_slots=3)([make_example(0, 1)])
    text = processor.decode(batch["input_ids"][0])
    assert "give 3 reference position tokens" in text


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_key_is_named(processor, key):
    example = make_example(0, 1)
    del example[key]
    with pytest.raises(KeyError, match=f"examples\\[1\\] lacks the key\\(s\\) \\['{key}'\\]"):
        SegCompassCollator(processor)([make_example(1, 1), example])


def test_inconsistent_num_objects_is_refused(processor):
    example = dict(make_example(0, 2), num_objects=1)
    with pytest.raises(ValueError, match="num_objects=1 but 2 mask"):
        SegCompassCollator(processor)([example])


def test_bad_calls_are_refused(processor):
    collator = SegCompassCollator(processor)
    with pytest.raises(ValueError, match="at least one example"):
        collator([])
    with pytest.raises(TypeError, match="list of examples"):
        collator(make_example(0, 1))
    with pytest.raises(TypeError, match="SegCompassProcessor"):
        SegCompassCollator(processor.tokenizer)
    with pytest.raises(ValueError, match="num_slots"):
        SegCompassCollator(processor, num_slots=0)
