"""ReasoningSegmentationPipeline: same answers as model.segment, inputs, no-mask reasons, trace."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import pipeline

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.pipeline_segcompass import (
    TASK,
    ReasoningSegmentationPipeline,
    concept_trace,
    top_concepts_of_slot,
)
from tests.helpers import REF, build_tiny_tokenizer_and_processor, force_answer

# Generation of an untrained model is arbitrary; a large bias on <REF_POS> makes it answer
# with K reference tokens, a suppression makes it never write one.
FORCE_REFS = {"prefix_allowed_tokens_fn": force_answer(3)}  # a well-formed answer, K = 3
NO_REFS = {"suppress_tokens": [REF]}


@pytest.fixture(scope="module")
def parts():
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    return model.eval(), processor


@pytest.fixture(scope="module")
def pipe(parts):
    model, processor = parts
    return pipeline(TASK, model=model, processor=processor)


def image(height: int = 48, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_task_builds_the_pipeline_with_the_processor(pipe, parts):
    assert isinstance(pipe, ReasoningSegmentationPipeline)
    assert pipe.processor is parts[1] and pipe.tokenizer is parts[1].tokenizer


def test_pipeline_returns_what_segment_returns(pipe, parts):
    model, processor = parts
    kwargs = {"max_new_tokens": 7, "generation_kwargs": FORCE_REFS, "confidence_threshold": -1e9}
    out = pipe(image(), "the red circle", **kwargs)
    (direct,) = model.segment([image()], ["the red circle"], processor=processor, **kwargs)
    assert out["text"] == direct.text == "<think>+</think><REF_POS><REF_POS><REF_POS>"
    assert out["reason"] is None
    assert out["slot_indices"] == [0, 1, 2]  # every slot kept at this threshold
    assert len(out["masks"]) == 3
    for ours, theirs in zip(out["masks"], direct.masks):
        assert ours.dtype == np.bool_ and ours.shape == (48, 80)  # the original image size
        np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_allclose(out["scores"], direct.scores.numpy(), rtol=1e-6)
    # scores are the sigmoid of the confidence logits of the kept slots
    np.testing.assert_allclose(out["scores"], torch.sigmoid(direct.conf_logits).numpy(), rtol=1e-6)
    assert [slot["confidence"] for slot in out["concept_trace"]] == pytest.approx(out["scores"])
    assert "heatmaps" not in out


def test_threshold_above_every_confidence_gives_no_mask_and_says_why(pipe):
    out = pipe(image(), "the red circle", max_new_tokens=7, generation_kwargs=FORCE_REFS,
               confidence_threshold=1e9)  # fmt: skip
    assert out["masks"] == [] and out["scores"] == [] and out["slot_indices"] == []
    assert "confidence threshold" in out["reason"]
    assert [slot["kept"] for slot in out["concept_trace"]] == [False, False, False]


def test_completion_without_ref_token_gives_no_mask(pipe):
    out = pipe(image(), "the red circle", max_new_tokens=4, generation_kwargs=NO_REFS,
               confidence_threshold=-1e9)  # fmt: skip
    assert "<REF_POS>" not in out["text"]
    assert out["masks"] == [] and "no <REF_POS>" in out["reason"]


def test_input_forms_agree(pipe):
    kwargs = {"max_new_tokens": 7, "generation_kwargs": FORCE_REFS, "confidence_threshold": -1e9}
    images = [image(seed=1), image(32, 32, seed=2)]
    single = [pipe(img, "the blue square", **kwargs) for img in images]
    listed = pipe(images, "the blue square", **kwargs)
    as_dicts = pipe([{"image": img, "instruction": "the blue square"} for img in images], **kwargs)
    for batch in (listed, as_dicts):
        assert len(batch) == 2
        for a, b in zip(single, batch):
            assert a["text"] == b["text"] and a["scores"] == pytest.approx(b["scores"])
            for m1, m2 in zip(a["masks"], b["masks"]):
                np.testing.assert_array_equal(m1, m2)
    assert listed[1]["masks"][0].shape == (32, 32)


def test_bad_inputs_are_refused_clearly(pipe):
    with pytest.raises(ValueError, match="expected an instruction"):
        pipe(image())
    with pytest.raises(ValueError, match="one instruction per image"):
        pipe([image(), image()], ["a", "b", "c"])
    with pytest.raises(TypeError, match="unknown arguments"):
        pipe(image(), "the red circle", temperature_typo=1.0)
    with pytest.raises(ValueError, match="empty"):
        pipe(image(), "   ")


def test_heatmaps_on_request(pipe):
    out = pipe(image(), "the red circle", max_new_tokens=7, generation_kwargs=FORCE_REFS,
               return_heatmaps=True)  # fmt: skip
    heatmaps = out["heatmaps"]
    assert heatmaps.shape == (3, 48, 80)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0


# --------------------------------------------------------------------------- concept trace
def test_top_concepts_of_slot_sums_weights_per_concept():
    # 3 tokens x 2 active concepts; concept 7 appears on tokens 0 and 2
    indices = torch.tensor([[7, 3], [5, 3], [7, 9]])
    values = torch.tensor([[1.0, 0.5], [2.0, 0.0], [0.4, 0.3]])  # (1, 1) inactive
    weights = torch.tensor([[0.10, 0.20], [0.05, 0.90], [0.30, 0.01]])
    top = top_concepts_of_slot(weights, indices, values, top_concepts=2, top_tokens=1)
    # totals: 7 -> 0.10 + 0.30 = 0.40, 3 -> 0.20 (0.90 is on an inactive entry), 5 -> 0.05
    assert [c["id"] for c in top] == [7, 3]
    assert top[0]["weight"] == pytest.approx(0.40) and top[1]["weight"] == pytest.approx(0.20)
    assert top[0]["positions"] == [
        {"position": 2, "activation": pytest.approx(0.4), "weight": pytest.approx(0.30)}
    ]
    assert top_concepts_of_slot(weights, indices, torch.zeros(3, 2)) == []
    with pytest.raises(ValueError, match="same"):
        top_concepts_of_slot(weights, indices[:2], values)


def test_concept_trace_names_tokens(parts):
    tokenizer = parts[1].tokenizer
    ids = tokenizer("the red circle", add_special_tokens=False)["input_ids"]
    length = len(ids)
    result = SimpleNamespace(
        input_ids=torch.tensor(ids),
        conf_logits=torch.tensor([2.0, -1.0]),
        slot_indices=torch.tensor([0]),
        concept_indices=torch.arange(length).unsqueeze(-1),  # token i fires concept i
        concept_values=torch.ones(length, 1),
        slot_concept_weights=torch.stack(
            [torch.linspace(0.0, 1.0, length), torch.linspace(1.0, 0.0, length)]
        ).unsqueeze(-1),  # slot 0 favours the last token, slot 1 the first
    )
    trace = concept_trace(result, tokenizer, top_concepts=1)
    assert [t["slot"] for t in trace] == [0, 1] and [t["kept"] for t in trace] == [True, False]
    assert trace[0]["confidence"] == pytest.approx(1 / (1 + np.exp(-2.0)))
    last, first = trace[0]["concepts"][0], trace[1]["concepts"][0]
    assert last["id"] == length - 1 and first["id"] == 0
    assert last["tokens"][0]["token"] == tokenizer.decode([ids[-1]])
    assert first["tokens"][0]["token_id"] == ids[0]


def test_ref_spelled_with_ordinary_tokens_gives_no_mask_through_the_pipeline(pipe, parts):
    tokenizer = parts[1].tokenizer
    spelled = [
        i for ch in "<REF_POS>" for i in tokenizer(ch, add_special_tokens=False)["input_ids"]
    ]
    assert REF not in spelled and tokenizer.decode(spelled) == "<REF_POS>"

    def allowed(batch_id, input_ids):  # <think> w </think>, then "<REF_POS>" spelled out
        ids = input_ids.tolist()
        turn = ids[len(ids) - ids[::-1].index(1) :]  # after the last <|im_start|>
        if 7 not in turn:
            return [7]
        if 8 not in turn:
            return [20] if turn[-1] == 7 else [8]
        written = len(turn) - turn.index(8) - 1
        return [spelled[written]] if written < len(spelled) else [2]

    for strict in (True, False):
        out = pipe(image(), "the red circle", max_new_tokens=16, confidence_threshold=-1e9,
                   strict_format=strict, generation_kwargs={"prefix_allowed_tokens_fn": allowed})  # fmt: skip
        assert out["text"].endswith("</think><REF_POS>"), out["text"]
        assert out["masks"] == [] and out["reason"].startswith("no <REF_POS> token")


def test_exif_orientation_gives_the_same_upright_masks_through_every_entry_point(
    pipe, parts, tmp_path
):
    import base64

    from PIL import Image

    from modeling_segcompass.serving.endpoint_handler import EndpointHandler, rle_to_mask

    model, processor = parts
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright: the viewer turns the stored pixels clockwise
    path = tmp_path / "phone.png"
    Image.fromarray(image(48, 80)).save(path, exif=exif.tobytes())
    kwargs = {"max_new_tokens": 7, "generation_kwargs": FORCE_REFS, "confidence_threshold": -1e9}
    upright = np.ascontiguousarray(np.rot90(image(48, 80), k=-1))  # (80, 48), as shown
    expected = pipe(upright, "the red circle", **kwargs)["masks"]
    assert expected[0].shape == (80, 48)
    with Image.open(path) as photo:
        (direct,) = model.segment([photo], ["the red circle"], processor=processor, **kwargs)
        from_pil = pipe(photo, "the red circle", **kwargs)["masks"]
    from_path = pipe(str(path), "the red circle", **kwargs)["masks"]
    payload = {
        "image": base64.b64encode(path.read_bytes()).decode(),
        "instruction": "the red circle",
    }
    endpoint = EndpointHandler(pipe=pipeline(TASK, model=model, processor=processor, **kwargs))
    from_endpoint = [rle_to_mask(m) for m in endpoint({"inputs": payload})["masks"]]
    for masks in (list(direct.masks.numpy()), from_pil, from_path, from_endpoint):
        assert len(masks) == len(expected)
        for ours, theirs in zip(masks, expected):
            np.testing.assert_array_equal(ours, theirs)


def test_lone_surrogate_from_json_is_refused_by_name_through_the_endpoint(pipe):
    import json

    from modeling_segcompass.serving.endpoint_handler import EndpointHandler

    payload = json.loads('{"inputs": {"image": null, "instruction": "the \\ud83d cat"}}')
    payload["inputs"]["image"] = image()
    with pytest.raises(ValueError, match=r"instructions\[0\] contains a lone surrogate U\+D83D"):
        EndpointHandler(pipe=pipe)(payload)


def test_prompt_past_the_vlm_positions_is_refused_through_the_pipeline(pipe):
    with pytest.raises(ValueError, match=r"max_position_embeddings=512.*max_new_tokens to at"):
        pipe(image(), "the red circle", max_new_tokens=600)
