"""Input validation at the public entry points, and completions that break the format.

Only the cases that other test files do not already cover (docs/reliability.md maps every
case to its test).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.training.rewards import format_score
from tests.helpers import (
    IM_END,
    REF,
    THINK,
    THINK_END,
    build_tiny_model,
    build_tiny_tokenizer_and_processor,
    make_batch,
)


@pytest.fixture(scope="module")
def setup():
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    return model.eval(), processor


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def forced(sequence: list[int]):
    """prefix_allowed_tokens_fn that makes generation write `sequence` then stop."""
    state: dict[str, int] = {}

    def allowed(batch_id, input_ids):
        start = state.setdefault("start", input_ids.shape[-1])
        return [sequence[min(input_ids.shape[-1] - start, len(sequence) - 1)]]

    return allowed


# --------------------------------------------------------------------------- processor
@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 150), (150, 1)])
def test_tiny_and_thin_images_are_processed(setup, height, width):
    _, processor = setup
    out = processor(image(height, width), "the red circle")
    assert out["original_sizes"].tolist() == [[height, width]]
    # the longest side fills the 64 px SAM frame, the other side keeps at least one pixel
    expected = (max(1, round(64 * height / max(height, width))),
                max(1, round(64 * width / max(height, width))))  # fmt: skip
    assert tuple(out["reshaped_input_sizes"][0].tolist()) == expected
    assert int(out["valid_mask"][0].sum()) == expected[0] * expected[1]  # mask grid = SAM frame
    assert int((out["input_ids"] == processor.image_token_id).sum()) >= 1


def test_8000_pixel_image_is_resized_first_and_matches_a_small_copy(setup):
    _, processor = setup
    big = np.zeros((8000, 8000, 3), dtype=np.uint8)
    big[:4000] = (255, 0, 0)  # red top half, blue bottom half
    big[4000:] = (0, 0, 255)
    out = processor(big, "the red half")
    small = big[::125, ::125]  # the same picture at 64 px
    reference = processor(small, "the red half")
    assert out["original_sizes"].tolist() == [[8000, 8000]]
    assert out["reshaped_input_sizes"].tolist() == [[64, 64]]
    assert out["pixel_values"].shape == reference["pixel_values"].shape  # 16 image tokens
    torch.testing.assert_close(
        out["sam_pixel_values"][:, :, 2:30], reference["sam_pixel_values"][:, :, 2:30]
    )  # away from the colour edge, identical pixels
    # a mask predicted at 64 px comes back at 8000 px
    (mask,) = processor.post_process_masks(
        torch.full((1, 1, 64, 64), 5.0), out["original_sizes"], out["reshaped_input_sizes"]
    )
    assert mask.shape == (1, 8000, 8000) and bool(mask.all())


def test_huge_images_are_resized_in_bands_with_identical_numbers(setup, monkeypatch):
    # the banded path (no full-size float copy) gives exactly the one-shot numbers
    from modeling_segcompass import sam_frame

    _, processor = setup
    rgb = image(300, 250, seed=9)
    one_shot = processor.prepare_sam_image(rgb).pixel_values
    monkeypatch.setattr(sam_frame, "_LARGE_IMAGE_PIXELS", 1000)  # bands of 4 rows
    banded = processor.prepare_sam_image(rgb)
    assert banded.reshaped_size == (64, 53)
    assert torch.equal(banded.pixel_values, one_shot)


def test_100k_character_instruction_is_refused_before_tokenizing(setup, monkeypatch):
    _, processor = setup
    calls = []
    monkeypatch.setattr(processor, "tokenizer", _Spy(processor.tokenizer, calls))
    with pytest.raises(ValueError, match=r"instructions\[0\] has 100000 characters"):
        processor(image(8, 8), "x" * 100_000)
    assert calls == []


class _Spy:
    def __init__(self, inner, calls):
        self._inner, self._calls = inner, calls

    def __call__(self, *args, **kwargs):
        self._calls.append(args)
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("PIL P with transparency", lambda rgb: _palette_with_transparency(rgb)),
        ("PIL F float32", lambda rgb: Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0)),
        ("numpy float64 HW", lambda rgb: rgb[..., 0].astype(np.float64) / 255.0),
        ("numpy bool HW", lambda rgb: rgb[..., 0] > 127),
    ],
)
def test_more_image_kinds_are_converted_exactly(setup, kind, make):
    _, processor = setup
    rgb = image(24, 24, seed=7)
    grey = rgb[..., 0]
    expected = {
        "PIL P with transparency": _palette_reference(rgb),
        "PIL F float32": np.repeat(grey[..., None], 3, -1),
        "numpy float64 HW": np.repeat(grey[..., None], 3, -1),
        "numpy bool HW": np.repeat(((grey > 127) * 255).astype(np.uint8)[..., None], 3, -1),
    }[kind]
    got = processor(make(rgb), "x")["sam_pixel_values"]
    assert torch.equal(got, processor(expected, "x")["sam_pixel_values"]), kind


def _palette_with_transparency(rgb: np.ndarray) -> Image.Image:
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    return palette


def _palette_reference(rgb: np.ndarray) -> np.ndarray:
    palette = _palette_with_transparency(rgb)
    index = np.asarray(palette)
    out = np.asarray(palette.convert("RGB")).copy()
    out[index == palette.info["transparency"]] = 255  # transparent -> white
    return out


def test_more_ground_truth_masks_than_slots(setup, caplog):
    model, processor = setup
    masks = np.zeros((5, 64, 64), dtype=np.uint8)
    for j in range(5):
        masks[j, 10 * j : 10 * j + 8, :] = 1
    with caplog.at_level(logging.WARNING):
        out = processor(
            image(64, 64), "every stripe", responses="<think> a </think>", masks=[masks]
        )
    assert "5 ground-truth masks but the prompt asks for 3 slots" in caplog.text
    assert out["gt_masks"].shape == (1, 5, 64, 64) and out["num_objects"].tolist() == [5]
    assert out["gt_masks"][0].sum(dim=(1, 2)).tolist() == [8 * 64.0] * 5  # nothing dropped
    with pytest.raises(
        ValueError, match=r"`num_objects` must lie in \[0, num_slots=3\]; got \[5\]"
    ):
        model(
            **{k: v for k, v in out.items() if k not in ("original_sizes", "reshaped_input_sizes")}
        )


# --------------------------------------------------------------------------- forward
def _set(key, value):
    return lambda b: b.update({key: value(b)})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("input_ids", lambda b: b["input_ids"].float()), "`input_ids` must hold integer"),
        (_set("input_ids", lambda b: b["input_ids"].clamp(max=10**6).index_fill(1, torch.tensor([30]), 10**6)),
         r"`input_ids` must lie in \[0, vocab_size=128\); got values in \[\d+, 1000000\]"),
        (_set("input_ids", lambda b: b["input_ids"][:, :0]), "`input_ids` is empty"),
        (_set("sam_pixel_values", lambda b: b["sam_pixel_values"].index_fill(2, torch.tensor([3]), float("nan"))),
         "`sam_pixel_values` contains NaN or Inf"),
        (_set("pixel_values", lambda b: b["pixel_values"].index_fill(0, torch.tensor([0]), float("inf"))),
         "`pixel_values` contains NaN or Inf"),
        (_set("sam_pixel_values", lambda b: b["sam_pixel_values"][:, :, :32, :32]),
         r"`sam_pixel_values` must be \(B, 3, 64, 64\).*got \(1, 3, 32, 32\)"),
        (_set("sam_pixel_values", lambda b: b["sam_pixel_values"].numpy()),
         "`sam_pixel_values` must be a torch.Tensor.*got ndarray"),
        (_set("gt_masks", lambda b: (b["gt_masks"] * 255).to(torch.uint8)),
         r"`gt_masks` must hold values in \[0, 1\].*got values in \[0, 255\]"),
        (_set("gt_masks", lambda b: b["gt_masks"].numpy()), "`gt_masks` must be a torch.Tensor"),
        (_set("num_objects", lambda b: [1]), "`num_objects` must be a torch.Tensor.*got list"),
        (_set("num_objects", lambda b: torch.tensor([1.0])), "`num_objects` must be an integer"),
        (_set("labels", lambda b: b["labels"][:, :5]),
         r"`labels` must be a tensor of the shape of input_ids \(1, \d+\); got Tensor \(1, 5\)"),
    ],
    ids=["float-ids", "ids-out-of-vocab", "empty-ids", "nan-sam-pixels", "inf-vlm-pixels",
         "wrong-sam-size", "numpy-sam-pixels", "masks-0-255", "numpy-masks", "list-num-objects",
         "float-num-objects", "labels-shape"],
)  # fmt: skip
def test_forward_refuses_bad_inputs_by_name(mutate, message):
    model = build_tiny_model()
    batch = make_batch(model.config, [1], with_targets=True)
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        model(**batch)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.long])
def test_forward_accepts_integer_and_bool_masks_with_the_float_loss(dtype):
    model = build_tiny_model()
    batch = make_batch(model.config, [1], with_targets=True)
    with torch.no_grad():
        reference = model(**batch).loss
        batch["gt_masks"] = batch["gt_masks"].to(dtype)
        assert torch.equal(model(**batch).loss, reference)


# --------------------------------------------------------------------------- segment
def test_segment_refuses_bad_images_and_instructions_by_name(setup):
    model, processor = setup
    with pytest.raises(ValueError, match=r"images\[0\] contains NaN or Inf"):
        model.segment(np.full((8, 8, 3), np.nan), "x", processor)
    with pytest.raises(TypeError, match=r"instructions\[0\] to be a str, got int"):
        model.segment(image(8, 8), [3], processor)
    with pytest.raises(ValueError, match=r"instructions\[0\] is empty"):
        model.segment(image(8, 8), " \t ", processor)
    with pytest.raises(TypeError, match=r"images\[0\] to be a PIL.Image.*got dict"):
        model.segment({"not": "an image"}, "x", processor)


def _segment(setup, sequence, height=40, width=56, **kwargs):
    model, processor = setup
    (result,) = model.segment(
        image(height, width), "the red circle", processor, max_new_tokens=len(sequence) + 1,
        confidence_threshold=-1e9, generation_kwargs={"prefix_allowed_tokens_fn": forced(sequence)},
        **kwargs,
    )  # fmt: skip
    return result


@pytest.mark.parametrize(
    ("sequence", "problem"),
    [
        ([THINK, 20, REF, IM_END], "has 1 <think> and 0 </think> tags"),
        ([20, REF, IM_END], "has 0 <think> and 0 </think> tags"),
        ([THINK, 20, THINK_END, THINK_END, REF, IM_END], "has 1 <think> and 2 </think> tags"),
        ([THINK_END, THINK, 20, REF, IM_END], "</think> comes before <think>"),
        ([THINK, REF, THINK_END, REF, IM_END], "a <REF_POS> token stands inside"),
        (
            [THINK, 20, THINK_END, *[REF] * 5, IM_END],
            "it has 5 <REF_POS> tokens but the model has 3",
        ),
    ],
    ids=[
        "no-think-end",
        "no-think",
        "two-think-ends",
        "reversed-tags",
        "ref-in-thought",
        "too-many",
    ],
)
def test_completion_that_breaks_the_format_gets_no_mask_a_reason_and_format_0(
    setup, sequence, problem
):
    result = _segment(setup, sequence)
    assert result.masks.shape == (0, 40, 56) and result.scores.numel() == 0
    assert result.slot_indices.numel() == 0
    assert result.reason.startswith("the completion breaks the format") and problem in result.reason
    # the heatmaps and the trace are still returned, for inspection
    assert result.heatmaps.shape == (3, 40, 56)
    assert format_score(result.text, num_ref=3) == 0.0


def test_strict_format_false_grounds_the_last_k_refs_of_a_broken_completion(setup):
    result = _segment(setup, [THINK, 20, REF, IM_END], strict_format=False)
    assert "</think>" not in result.text and result.text.count("<REF_POS>") == 1
    assert result.reason is None and result.slot_indices.tolist() == [0]
    assert result.masks.shape == (1, 40, 56)
    result = _segment(setup, [THINK, 20, THINK_END, *[REF] * 5, IM_END], strict_format=False)
    assert result.slot_indices.tolist() == [0, 1, 2] and result.masks.shape == (3, 40, 56)


def test_well_formed_completion_is_grounded_and_scores_format_1(setup):
    result = _segment(setup, [THINK, 20, THINK_END, REF, REF, IM_END])
    assert result.reason is None and result.slot_indices.tolist() == [0, 1]
    assert format_score(result.text, num_ref=2) == 1.0


@pytest.mark.parametrize(
    "sequence",
    [[20, 21, 22, 23, IM_END], [THINK, THINK, THINK_END, THINK, IM_END], [IM_END]],
    ids=["garbage", "broken-tags", "empty"],
)
def test_completion_without_ref_gives_no_mask_a_reason_and_format_0(setup, sequence):
    result = _segment(setup, sequence)
    assert result.masks.shape == (0, 40, 56) and result.scores.numel() == 0
    assert result.reason.startswith("no <REF_POS> token in the completion")
    assert format_score(result.text, num_ref=3) == 0.0


def test_input_values_are_read_on_cpu_and_elsewhere_only_when_asked():
    from modeling_segcompass.input_checks import values_are_checked

    model = build_tiny_model()
    assert values_are_checked(model, torch.zeros(1, 2, dtype=torch.long))
    on_device = torch.zeros(1, 2, dtype=torch.long, device="meta")  # stands for an accelerator
    assert not values_are_checked(model, on_device)
    model.config.check_input_values = True
    assert values_are_checked(model, on_device)


# --------------------------------------------------------------------------- bit depth
def _png16(values: np.ndarray) -> Image.Image:
    """A 16-bit grey PNG holding `values`, as read back from disk."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, "PNG")
    buffer.seek(0)
    return Image.open(buffer)


def test_16_bit_images_are_read_by_type_not_by_values(setup):
    _, processor = setup
    dark = np.zeros((8, 8), np.int64)
    dark[0, 0] = 255  # every value <= 255: still 16-bit data, 255 / 257 -> 1
    brighter = dark.copy()
    brighter[7, 7] = 256  # one more pixel above 255 must not change how (0, 0) is read
    for values in (dark, brighter):
        expected = np.zeros((8, 8), np.uint8)
        expected[0, 0], expected[7, 7] = 1, round(values[7, 7] / 257)  # 1 and 0 / 1
        reference = processor(expected, "x")["sam_pixel_values"]
        for kind, picture in {
            "16-bit PNG": _png16(values),
            "PIL I": Image.fromarray(values.astype(np.int32)),
            "numpy uint16": values.astype(np.uint16),
            "torch uint16": torch.from_numpy(values.astype(np.uint16)),
        }.items():
            assert processor(picture, "x")["sam_pixel_values"].equal(reference), kind
    # other integer types hold 8-bit values: a value above 255 is refused, not guessed at
    with pytest.raises(ValueError, match=r"images\[0\] of dtype int64 to hold 8-bit .*uint16"):
        processor(brighter, "x")
    assert processor(dark, "x")["sam_pixel_values"].equal(
        processor(dark.astype(np.uint8), "x")["sam_pixel_values"]
    )


def test_forward_refuses_a_sequence_longer_than_the_vlms_positions():
    model = build_tiny_model()
    limit = model.vlm.config.get_text_config().max_position_embeddings
    batch = make_batch(model.config, [1])
    ids = batch["input_ids"]
    pad = torch.full((1, limit + 1 - ids.shape[1]), 30, dtype=ids.dtype)
    batch["input_ids"] = torch.cat([ids, pad], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with pytest.raises(ValueError, match=rf"{limit + 1} positions but the VLM has max_position"):
        model(**batch)


def test_read_only_numpy_image_gives_no_warning(setup):
    import warnings

    _, processor = setup
    rgb = image(40, 60, seed=3)
    rgb.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = processor(rgb, "the red circle")
    rgb_writable = rgb.copy()
    torch.testing.assert_close(
        out["sam_pixel_values"], processor(rgb_writable, "the red circle")["sam_pixel_values"]
    )


def test_all_finite_agrees_with_isfinite_all_wherever_the_bad_value_sits():
    from modeling_segcompass.input_checks import all_finite

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        base = torch.zeros(4, 5, 6, dtype=dtype).permute(2, 0, 1)  # strided view
        assert all_finite(base) and all_finite(base[:0])  # empty: nothing is non-finite
        for bad in (float("nan"), float("inf"), float("-inf")):
            for index in ((0, 0, 0), (3, 2, 4), (5, 3, 1)):
                value = base.clone()
                value[index] = bad
                assert all_finite(value) is False
                assert bool(torch.isfinite(value).all()) is False
