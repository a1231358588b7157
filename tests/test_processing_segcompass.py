"""Tests of SegCompassProcessor: prompt, image/SAM preprocessing, labels, masks, errors, IO."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.processing_segcompass import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SegCompassProcessor,
    build_prompt,
    parse_response,
)
from modeling_segcompass.sam_frame import resized_longest_side

PAD, IM_END, IMAGE_PAD, THINK, THINK_END, REF = 0, 2, 5, 7, 8, 9
CORPUS = [
    "the green triangle left of the red circle",
    "the blue square above the small red circle",
    "<think> the red circle is left of the green triangle </think> <REF_POS>",
] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(CORPUS, vocab_size=400)


def build_processor(tokenizer, **overrides) -> SegCompassProcessor:
    """The one helper for tiny processors in these tests."""
    kwargs = {"num_slots": 1}
    kwargs.update(overrides)
    return SegCompassProcessor.tiny(tokenizer, **kwargs)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- prompt
def test_build_prompt_names_instruction_and_slot_count():
    one = build_prompt("the red circle", 1)
    three = build_prompt("all the circles?", 3)
    assert one.startswith("Please find: the red circle. ")
    assert "1 reference position token." in one
    assert three.startswith("Please find: all the circles? ")  # no doubled punctuation
    assert "3 reference position tokens, one per object" in three
    for text in (one, three):  # the answer tokens are named in words, never written
        assert "<think>" not in text and "<REF_POS>" not in text


@pytest.mark.parametrize(("height", "width", "tokens"), [(64, 64, 16), (48, 80, 15), (16, 16, 1)])
def test_prompt_has_one_image_pad_per_merged_patch(processor, height, width, tokens):
    out = processor(random_image(height, width), "the red circle")
    grid = out["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == tokens
    ids = out["input_ids"][0].tolist()
    assert ids.count(IMAGE_PAD) == tokens
    # the pads are contiguous, between <|vision_start|> (3) and <|vision_end|> (4)
    first = ids.index(IMAGE_PAD)
    assert ids[first - 1] == 3 and ids[first + tokens] == 4
    assert out["pixel_values"].shape[0] == int(grid.prod())
    text = processor.decode(out["input_ids"][0])
    assert "Please find: the red circle." in text
    assert text.endswith("<|im_start|>assistant\n")
    assert not {THINK, THINK_END, REF} & set(ids)


def test_num_slots_changes_the_prompt(tokenizer):
    processor = build_processor(tokenizer, num_slots=3)
    assert "give 3 reference position tokens" in processor.decode(
        processor(random_image(64, 64), "x")["input_ids"][0]
    )
    # a per-call override
    assert "give 2 reference position tokens" in processor.decode(
        processor(random_image(64, 64), "x", num_slots=2)["input_ids"][0]
    )


# --------------------------------------------------------------------------- labels / padding
def test_labels_are_ignored_exactly_on_prompt_and_padding(processor, tokenizer):
    images = [random_image(64, 64, 1), random_image(48, 80, 2)]
    instructions = ["the red circle", "the green triangle left of the red circle"]
    responses = ["<think> red </think> <REF_POS>", "<think> the green triangle </think> <REF_POS>"]
    out = processor(images, instructions, responses=responses)
    prompts_only = processor(images, instructions)
    ids, labels, attention = out["input_ids"], out["labels"], out["attention_mask"]
    for i, response in enumerate(responses):
        prompt = prompts_only["input_ids"][i][prompts_only["attention_mask"][i].bool()].tolist()
        answer = tokenizer(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n = int(attention[i].sum())
        # right padding: the real tokens come first
        assert attention[i, :n].all() and not attention[i, n:].any()
        assert ids[i, :n].tolist() == prompt + answer
        assert (labels[i, : len(prompt)] == -100).all()
        assert labels[i, len(prompt) : n].tolist() == answer
        assert (labels[i, n:] == -100).all() and (ids[i, n:] == PAD).all()
        assert answer[-1] == IM_END and answer.count(REF) == 1


def test_prompts_alone_are_left_padded(processor):
    out = processor(
        [random_image(64, 64), random_image(16, 16)], ["the red circle", "the red circle"]
    )
    attention = out["attention_mask"]
    short = 1  # the 16 px image has 1 image token instead of 16
    n = int(attention[short].sum())
    assert n < attention.shape[1]
    assert not attention[short, : attention.shape[1] - n].any() and attention[short, -n:].all()
    assert "labels" not in out
    # explicit override
    right = processor(
        [random_image(64, 64), random_image(16, 16)],
        ["the red circle", "the red circle"],
        padding_side="right",
    )["attention_mask"]
    assert right[short, :n].all() and not right[short, n:].any()


# --------------------------------------------------------------------------- SAM input
def test_sam_pixels_are_normalised_and_zero_padded(processor):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    image = np.broadcast_to(colour, (48, 80, 3)).copy()
    out = processor(image, "the red circle")
    sam = out["sam_pixel_values"][0]
    assert out["reshaped_input_sizes"][0].tolist() == [38, 64]  # 48 * 64 / 80 = 38.4
    assert out["original_sizes"][0].tolist() == [48, 80]
    expected = (
        torch.tensor(colour, dtype=torch.float) - torch.tensor(SAM_PIXEL_MEAN)
    ) / torch.tensor(SAM_PIXEL_STD)
    torch.testing.assert_close(sam[:, :38, :], expected.view(3, 1, 1).expand(3, 38, 64))
    assert (sam[:, 38:, :] == 0).all()


@pytest.mark.parametrize(("size", "mask_size", "rows"), [(64, 64, 38), (64, 16, 10)])
def test_valid_mask_covers_exactly_the_unpadded_area(tokenizer, size, mask_size, rows):
    processor = build_processor(tokenizer, image_size=size, mask_size=mask_size)
    out = processor([random_image(48, 80), random_image(80, 48)], ["a", "b"])
    valid = out["valid_mask"]
    assert valid.dtype == torch.bool and valid.shape == (2, mask_size, mask_size)
    landscape = torch.zeros(mask_size, mask_size, dtype=torch.bool)
    landscape[:rows, :] = True
    assert torch.equal(valid[0], landscape)
    assert torch.equal(valid[1], landscape.T)  # the portrait image pads on the right
    # for S == M it is exactly where SAM pixels are not padding
    if size == mask_size:
        assert torch.equal(valid, out["sam_pixel_values"].abs().sum(1) > 0)


def test_resized_longest_side_matches_sam_rounding():
    assert resized_longest_side(48, 80, 64) == (38, 64)
    assert resized_longest_side(480, 640, 1024) == (768, 1024)
    assert resized_longest_side(1, 500, 64) == (1, 64)


# --------------------------------------------------------------------------- image kinds
def _sam(processor, image) -> torch.Tensor:
    return processor(image, "the red circle")["sam_pixel_values"][0]


def test_every_image_kind_gives_identical_sam_pixels(processor):
    rgb = random_image(40, 56, seed=3)
    reference = _sam(processor, rgb)
    alpha = np.full((40, 56, 1), 255, dtype=np.uint8)
    variants = {
        "PIL RGB": Image.fromarray(rgb),
        "PIL RGBA full alpha": Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA"),
        "PIL CMYK": Image.fromarray(rgb).convert("CMYK"),
        "numpy float [0,1]": rgb.astype(np.float64) / 255.0,
        "numpy float32 [0,1]": (rgb / 255.0).astype(np.float32),
        "numpy RGBA": np.concatenate([rgb, alpha], -1),
        "torch CHW uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch HWC uint8": torch.from_numpy(rgb),
        "torch CHW float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0,
        "numpy uint16": rgb.astype(np.uint16) * 257,
    }
    for name, image in variants.items():
        assert torch.equal(_sam(processor, image), reference), name


def test_grey_and_palette_modes(processor):
    grey = np.random.default_rng(4).integers(0, 256, (30, 30), dtype=np.uint8)
    reference = _sam(processor, np.repeat(grey[..., None], 3, -1))
    la = np.stack([grey, np.full_like(grey, 255)], -1)
    variants = {
        "numpy HW": grey,
        "PIL L": Image.fromarray(grey),
        "PIL LA full alpha": Image.fromarray(la, mode="LA"),
        "PIL I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "torch HW": torch.from_numpy(grey),
        "torch 1HW": torch.from_numpy(grey)[None],
    }
    for name, image in variants.items():
        assert torch.equal(_sam(processor, image), reference), name
    palette = Image.fromarray(random_image(30, 30, 5)).convert("P")
    assert torch.equal(_sam(processor, palette), _sam(processor, palette.convert("RGB")))
    bilevel = Image.fromarray((grey > 127).astype(np.uint8) * 255).convert("1")
    assert torch.equal(_sam(processor, bilevel), _sam(processor, (grey > 127) * np.uint8(255)))


def test_partial_alpha_is_composited_over_white(processor):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red 200 at alpha 0 and at alpha 128
    rgba[:, :8, 3] = 0
    rgba[:, 8:, 3] = 128
    expected = np.zeros((16, 16, 3), dtype=np.uint8)
    expected[:, :8] = 255  # fully transparent -> white
    # 200 * 128/255 + 255 * 127/255 = 227.4 -> 227 ; 0 * 128/255 + 255 * 127/255 = 127
    expected[:, 8:] = (227, 127, 127)
    assert torch.equal(
        _sam(processor, Image.fromarray(rgba, mode="RGBA")), _sam(processor, expected)
    )


def test_vlm_pixels_do_not_depend_on_the_image_kind(processor):
    rgb = random_image(64, 64, seed=6)
    a = processor(Image.fromarray(rgb), "x")["pixel_values"]
    b = processor(torch.from_numpy(rgb).permute(2, 0, 1), "x")["pixel_values"]
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- masks
def test_gt_masks_follow_the_sam_geometry(processor):
    mask = np.zeros((2, 48, 80), dtype=np.uint8)
    mask[0, 10:30, 20:61] = 1  # one rectangle; the second object is empty on purpose
    empty = np.zeros((0, 64, 64), dtype=bool)
    out = processor([random_image(48, 80), random_image(64, 64)], ["a", "b"], masks=[mask, empty])
    gt = out["gt_masks"]
    assert gt.shape == (2, 2, 64, 64) and gt.dtype == torch.float32
    assert out["num_objects"].tolist() == [2, 0]
    assert set(gt.unique().tolist()) <= {0.0, 1.0}
    # rows 10..29 * 0.8 -> 8..23; cols 20..60 * 0.8 -> 16..48 (the last column is 80% covered)
    expected = torch.zeros(64, 64)
    expected[8:24, 16:49] = 1
    assert torch.equal(gt[0, 0], expected)
    assert gt[0, 1].sum() == 0 and gt[1].sum() == 0  # padding for the missing objects


def test_gt_masks_are_padded_to_the_slot_count(tokenizer):
    processor = build_processor(tokenizer, num_slots=3)
    mask = np.ones((1, 64, 64), dtype=bool)
    out = processor(random_image(64, 64), "a", masks=[mask])
    assert out["gt_masks"].shape == (1, 3, 64, 64)  # G = max(K, max N)
    assert out["gt_masks"].sum(dim=(2, 3)).tolist() == [[64 * 64, 0, 0]]
    assert out["num_objects"].tolist() == [1]


@pytest.mark.parametrize(("size", "mask_size"), [(64, 64), (1024, 256)])
@pytest.mark.parametrize(("height", "width"), [(48, 80), (80, 48)])
def test_post_process_inverts_the_resize_within_one_pixel(
    tokenizer, size, mask_size, height, width
):
    processor = build_processor(tokenizer, image_size=size, mask_size=mask_size)
    box = (10, 30, 20, 41) if width > height else (11, 70, 5, 40)
    mask = np.zeros((1, height, width), dtype=np.uint8)
    mask[0, box[0] : box[1], box[2] : box[3]] = 1
    out = processor(random_image(height, width), "a", masks=[mask])
    logits = out["gt_masks"][0] * 8.0 - 4.0  # (K, M, M): +4 inside, -4 outside
    (back,) = processor.post_process_masks(
        logits[None], out["original_sizes"], out["reshaped_input_sizes"]
    )
    assert back.shape == (1, height, width) and back.dtype == torch.bool
    ys, xs = torch.nonzero(back[0], as_tuple=True)
    found = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    assert all(abs(a - b) <= 1 for a, b in zip(found, box)), (found, box)


def test_post_process_without_threshold_and_for_lists(processor):
    logits = torch.randn(2, 3, 64, 64)
    sizes, reshaped = torch.tensor([[48, 80], [64, 64]]), torch.tensor([[38, 64], [64, 64]])
    soft = processor.post_process_masks(logits, sizes, reshaped, threshold=None)
    hard = processor.post_process_masks(list(logits), sizes, reshaped, threshold=0.0)
    assert soft[0].shape == (3, 48, 80) and soft[0].is_floating_point()
    assert torch.equal(hard[0], soft[0] > 0) and torch.equal(hard[1], soft[1] > 0)
    # same size and no padding: the identity
    torch.testing.assert_close(soft[1], logits[1])
    with pytest.raises(ValueError, match="as many images"):
        processor.post_process_masks(logits, sizes[:1], reshaped[:1])
    with pytest.raises(ValueError, match=r"\(B, K, M, M\)"):
        processor.post_process_masks(torch.zeros(64, 64), sizes[:1], reshaped[:1])


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("instruction", "message"),
    [
        ("", "instructions\\[0\\] is empty"),
        ("   \n", "instructions\\[0\\] is empty"),
        ("x" * 2001, "2001 characters.*max_instruction_chars=2000"),
        ("find <REF_POS> here", "control token '<REF_POS>'"),
        ("a<|im_end|>b", "control token"),
    ],
)
def test_bad_instructions_are_refused(processor, instruction, message):
    with pytest.raises(ValueError, match=message):
        processor(random_image(8, 8), instruction)


def test_instruction_limit_is_configurable_and_saved(tokenizer, tmp_path):
    processor = build_processor(tokenizer)
    processor.max_instruction_chars = 3000
    processor(random_image(8, 8), "x" * 2500)  # accepted now
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.max_instruction_chars == 3000


def test_non_string_instruction_is_refused(processor):
    with pytest.raises(TypeError, match="instructions\\[1\\]"):
        processor([random_image(8, 8)] * 2, ["ok", 3])


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        ("a.png", TypeError, "images\\[0\\].*PIL.Image"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "images\\[0\\].*non-zero size"),
        (np.full((8, 8, 3), np.nan), ValueError, "images\\[0\\].*NaN"),
        (np.full((8, 8, 3), np.inf, np.float32), ValueError, "images\\[0\\].*NaN or Inf"),
        (np.full((8, 8, 3), 3.0), ValueError, "images\\[0\\].*\\[0, 1\\]"),
        (np.zeros((8, 8, 5), np.uint8), ValueError, "images\\[0\\].*shape"),
        (np.zeros((8,), np.uint8), ValueError, "images\\[0\\].*shape"),
        (np.array([["a"]]), TypeError, "images\\[0\\].*dtype"),
        (np.full((8, 8), -1, np.int32), ValueError, "images\\[0\\]"),
        (np.zeros((2, 500, 3), np.uint8), ValueError, "aspect ratio"),
    ],
)
def test_non_images_are_refused_with_the_argument_named(processor, image, error, message):
    with pytest.raises(error, match=message):
        processor(image, "the red circle")


def test_zero_size_pil_image_is_refused(processor):
    with pytest.raises(ValueError, match="images\\[1\\].*non-zero"):
        processor([random_image(8, 8), Image.new("RGB", (0, 4))], ["a", "b"])


def test_count_mismatches_are_refused(processor):
    with pytest.raises(ValueError, match="one instruction per image.*2 images and 1"):
        processor([random_image(8, 8)] * 2, ["a"])
    with pytest.raises(ValueError, match="one response per image"):
        processor([random_image(8, 8)] * 2, ["a", "b"], responses=["<think> x </think>"])
    with pytest.raises(ValueError, match="one \\(N, H, W\\) array per image"):
        processor([random_image(8, 8)] * 2, ["a", "b"], masks=[np.zeros((1, 8, 8), np.uint8)])


def test_bad_masks_are_refused(processor):
    image = random_image(20, 30)
    with pytest.raises(ValueError, match="masks\\[0\\].*\\(20, 30\\).*\\(30, 20\\)"):
        processor(image, "a", masks=[np.zeros((1, 30, 20), np.uint8)])
    with pytest.raises(TypeError, match="masks\\[0\\].*dtype.*float"):
        processor(image, "a", masks=[np.zeros((1, 20, 30), np.float32)])
    with pytest.raises(ValueError, match="masks\\[0\\].*\\{0, 1\\}.*255"):
        processor(image, "a", masks=[np.full((1, 20, 30), 255, np.uint8)])
    with pytest.raises(TypeError, match="masks\\[0\\]"):
        processor(image, "a", masks=["not a mask"])


def test_bad_processor_arguments_are_refused(tokenizer):
    with pytest.raises(ValueError, match="num_slots"):
        build_processor(tokenizer, num_slots=0)
    processor = build_processor(tokenizer)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(random_image(8, 8), "a", return_tensors="np")
    with pytest.raises(ValueError, match="padding_side"):
        processor(random_image(8, 8), "a", padding_side="middle")


# --------------------------------------------------------------------------- save / load
def test_save_and_autoprocessor_round_trip(tokenizer, tmp_path):
    processor = build_processor(tokenizer, num_slots=2, image_size=64, mask_size=16)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_segcompass.py").exists()
    reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "SegCompassProcessor"
    assert (reloaded.num_slots, reloaded.sam_image_size, reloaded.mask_size) == (2, 64, 16)
    assert reloaded.sam_pixel_mean == list(SAM_PIXEL_MEAN)
    assert reloaded.sam_pixel_std == list(SAM_PIXEL_STD)
    assert reloaded.image_processor.patch_size == 8 and reloaded.image_processor.merge_size == 2
    mask = np.zeros((1, 48, 80), np.uint8)
    mask[0, 5:20, 5:40] = 1
    args = ([random_image(48, 80)], ["the red circle"])
    kwargs = {"responses": ["<think> red </think> <REF_POS> <REF_POS>"], "masks": [mask]}
    before, after = processor(*args, **kwargs), reloaded(*args, **kwargs)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


# --------------------------------------------------------------------------- TRL path
def test_text_path_matches_instructions_path(processor):
    """TRL renders the chat template itself and calls processor(text=..., images=...)."""
    image = Image.fromarray(random_image(64, 64, 7))
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": build_prompt("the red circle", 1)},
            ],
        }
    ]
    via_template = processor.apply_chat_template(
        [conversation], tokenize=True, return_dict=True, add_generation_prompt=True
    )
    direct = processor(image, "the red circle")
    assert list(via_template["input_ids"][0]) == direct["input_ids"][0].tolist()
    assert torch.equal(via_template["pixel_values"], direct["pixel_values"])
    assert torch.equal(via_template["sam_pixel_values"], direct["sam_pixel_values"])
    # without return_tensors the ids stay unpadded lists (what TRL reads as prompt ids)
    prompt = processor.build_prompt("the red circle")
    out = processor(text=[prompt, prompt], images=[[image], [Image.new("RGB", (16, 16))]])
    assert [len(x) for x in out["input_ids"]] == [
        len(direct["input_ids"][0]),
        len(direct["input_ids"][0]) - 15,
    ]
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=["no image here"], images=[image])


# --------------------------------------------------------------------------- helpers
def test_parse_response():
    good = parse_response("<think> the red one </think> here: <REF_POS> <REF_POS>")
    assert good.thought == "the red one" and good.num_ref == 2 and good.refs_after_think
    assert good.prefix == "" and good.between == "here:" and good.num_think_blocks == 1
    early = parse_response("hi <REF_POS> <think> x </think>")
    assert early.prefix == "hi <REF_POS>" and not early.refs_after_think
    none = parse_response("no tags at all")
    assert none.thought is None and none.num_ref == 0 and not none.refs_after_think


def test_decode_passthrough(processor, tokenizer):
    ids = tokenizer("<think> red </think> <REF_POS>", add_special_tokens=False)["input_ids"]
    assert processor.decode(ids) == tokenizer.decode(ids)
    assert processor.batch_decode([ids, ids]) == [tokenizer.decode(ids)] * 2


def test_from_vlm_processor_adds_missing_answer_tokens(tokenizer, tmp_path):
    from transformers import Qwen2TokenizerFast

    vocab = {
        t: i
        for t, i in tokenizer.get_vocab().items()
        if t not in ("<think>", "</think>", "<REF_POS>")
    }
    plain = Qwen2TokenizerFast(vocab=vocab, merges=[], chat_template=tokenizer.chat_template)
    plain.add_special_tokens(
        {"extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<|image_pad|>"]}
    )
    plain.save_pretrained(tmp_path)
    build_processor(tokenizer).image_processor.save_pretrained(tmp_path)
    built = SegCompassProcessor.from_vlm_processor(
        str(tmp_path), num_slots=4, sam_image_size=64, mask_size=64
    )
    assert built.num_slots == 4
    ids = built.tokenizer("<think>x</think><REF_POS>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and ids[-1] == built.ref_token_id
    assert built.image_processor.patch_size == 8
    again = SegCompassProcessor.from_vlm_processor(built, num_slots=2)
    assert again.tokenizer is built.tokenizer and again.num_slots == 2


# --------------------------------------------------------------------------- EXIF orientation
def phone_photo(rgb: np.ndarray, orientation: int) -> Image.Image:
    """A PNG as a phone writes it: the sensor's pixels and an EXIF orientation tag."""
    import io

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG", exif=exif.tobytes())
    buffer.seek(0)
    return Image.open(buffer)


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (3, lambda a: a[::-1, ::-1]),  # upside down
        (6, lambda a: np.rot90(a, k=-1)),  # held upright: turn 90 degrees clockwise
        (8, lambda a: np.rot90(a, k=1)),  # turn 90 degrees counter-clockwise
    ],
)
def test_exif_orientation_is_applied_once(processor, orientation, turn):
    rgb = random_image(24, 40, seed=9)
    photo = phone_photo(rgb, orientation)
    viewed = np.ascontiguousarray(turn(rgb))  # what a viewer shows
    out = processor(photo, "the red circle")
    assert out["original_sizes"].tolist() == [list(viewed.shape[:2])]
    reference = processor(viewed, "the red circle")
    assert torch.equal(out["sam_pixel_values"], reference["sam_pixel_values"])
    assert torch.equal(out["pixel_values"], reference["pixel_values"])
    # an image already turned (transformers' load_image does so) is not turned again
    from PIL import ImageOps

    again = processor(ImageOps.exif_transpose(photo), "the red circle")
    assert torch.equal(again["sam_pixel_values"], reference["sam_pixel_values"])
    # ground-truth masks are given at the upright size
    masks = np.zeros((1, *viewed.shape[:2]), np.uint8)
    assert processor(photo, "x", masks=[masks])["gt_masks"].shape[1] == 1


# --------------------------------------------------------------------------- instruction text
def test_lone_surrogate_is_refused_by_name(processor):
    import json

    half_emoji = json.loads('"the \\ud83d cat"')  # half of a pair, as JSON can carry it
    with pytest.raises(ValueError, match=r"instructions\[1\] contains a lone surrogate.*U\+D83D"):
        processor([random_image(8, 8)] * 2, ["ok", half_emoji])
    with pytest.raises(ValueError, match=r"responses\[0\] contains a lone surrogate"):
        processor(random_image(8, 8), "ok", responses=["<think> \udfff </think> <REF_POS>"])
    whole = json.loads('"the \\ud83d\\ude00 cat"')  # a whole pair is one character: accepted
    assert processor(random_image(8, 8), whole)["input_ids"].shape[0] == 1


def test_control_tokens_come_from_the_tokenizer():
    tokenizer = build_tiny_tokenizer(CORPUS, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|box_start|>", "<|box_end|>"]})
    tokenizer.add_tokens(["<tool_call>", "blorp"])
    processor = build_processor(tokenizer)
    for token in ("<|box_start|>", "<|box_end|>", "<tool_call>", "<think>"):
        message = re.escape(f"instructions[0] contains the control token {token!r}")
        with pytest.raises(ValueError, match=message):
            processor(random_image(8, 8), f"the box {token} here")
    assert {"<|box_start|>", "<tool_call>", "<REF_POS>", "<|im_end|>"} <= set(
        processor.control_tokens
    )
    # an added plain word is vocabulary, not markup
    assert processor(random_image(8, 8), "the blorp")["input_ids"].shape[0] == 1
