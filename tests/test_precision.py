"""Lower precision: the model runs in bfloat16 / float16 wherever it meets float32 inputs.

The processor returns float32 pixels and a cache may hold float32 image embeddings; the
model casts what it owns at the boundary. `cast_to_dtype` casts as `from_pretrained` loads
(RoPE's buffers stay float32), so a model returns the same numbers before and after a
save / reload. The answer-token ids belong to the tokenizer: presets leave them unset and a
processor that disagrees with the model is refused where the two meet.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_segcompass import (
    SegCompassCollator,
    SegCompassConfig,
    SegCompassForReasoningSegmentation,
    SegCompassTrainer,
)
from modeling_segcompass.pipeline_segcompass import TASK
from tests.helpers import (
    REF,
    THINK,
    build_tiny_tokenizer_and_processor,
    force_answer,
)
from tests.training.test_grpo_trainer import grpo_args, world  # noqa: F401 (`world` is a fixture)

LOW = [torch.bfloat16, torch.float16]
FORCE = {"prefix_allowed_tokens_fn": force_answer(3)}  # a well-formed answer, K = 3


@pytest.fixture(scope="module")
def processor():
    return build_tiny_tokenizer_and_processor(num_slots=3)[1]


def sam_model(processor, dtype: torch.dtype | None = None) -> SegCompassForReasoningSegmentation:
    """The tiny default with SAM's ViT as image encoder (the real models' path), cast to dtype."""
    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer), image_encoder_type="sam")
    model = SegCompassForReasoningSegmentation(config).eval()
    return model if dtype is None else model.cast_to_dtype(dtype)


def image(seed: int = 0, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def training_batch(processor) -> dict[str, torch.Tensor]:
    mask = np.zeros((1, 48, 80), dtype=np.uint8)
    mask[0, 10:30, 5:40] = 1
    batch = processor(
        image(),
        "the red circle",
        responses="<think> red circle </think> <REF_POS> <REF_POS> <REF_POS>",
        masks=[mask],
    )
    for key in ("original_sizes", "reshaped_input_sizes"):
        batch.pop(key, None)
    assert batch["sam_pixel_values"].dtype == torch.float32  # what the processor returns
    return batch


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_forward_with_labels_and_masks_trains_in_low_precision(processor, dtype):
    model = sam_model(processor, dtype).train()
    out = model(**training_batch(processor))
    assert out.mask_logits.dtype == dtype and out.heatmap_logits.dtype == dtype
    # the losses are float32 sums whatever the precision of the model
    for name in ("loss", "lm_loss", "seg_loss", "conf_loss"):
        value = getattr(out, name)
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    # float16 gradients underflow without loss scaling (what GradScaler / Trainer's fp16 do)
    scale = 2.0**12 if dtype == torch.float16 else 1.0
    (out.loss * scale).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["slot_mapper.fuser.0.weight"].abs().sum() > 0
    assert grads["codebook.codebook"].abs().sum() > 0
    assert all(g is None or (g.dtype == dtype and torch.isfinite(g).all()) for g in grads.values())


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_forward_follows_float32(processor, dtype):
    """Same weights in float32 and `dtype`: the masks agree to the precision's tolerance."""
    batch = training_batch(processor)
    with torch.no_grad():
        ref = sam_model(processor)(**batch)
        low = sam_model(processor, dtype)(**batch)
    diff = (low.mask_logits.float() - ref.mask_logits).abs().max()
    scale = ref.mask_logits.abs().max()
    assert diff <= 0.1 * scale, (float(diff), float(scale))
    assert ((low.mask_logits > 0) == (ref.mask_logits > 0)).float().mean() > 0.95


def test_precomputed_float32_image_embeddings_are_cast(processor):
    model = sam_model(processor, torch.bfloat16)
    batch = training_batch(processor)
    with torch.no_grad():
        embeddings = model.encode_image(batch["sam_pixel_values"])
        assert embeddings.dtype == torch.bfloat16
        from_pixels = model(**batch)
        batch.pop("sam_pixel_values")
        cached = model(**batch, image_embeddings=embeddings.float())
    torch.testing.assert_close(cached.mask_logits, from_pixels.mask_logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_segment_pipeline_and_endpoint_in_low_precision(processor, dtype):
    from modeling_segcompass.serving.endpoint_handler import EndpointHandler, rle_to_mask

    model = sam_model(processor, dtype)
    picture = image(1)
    [result] = model.segment(picture, "the red circle", processor, generation_kwargs=FORCE)
    assert len(result.masks) == len(result.scores) and result.text.count("<REF_POS>") == 3
    assert all(m.shape == picture.shape[:2] and m.dtype == bool for m in result.masks)

    pipe = pipeline(TASK, model=model, processor=processor)
    out = pipe(picture, "the red circle", generation_kwargs=FORCE)
    assert [m.tolist() for m in out["masks"]] == [m.tolist() for m in result.masks]

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    payload = {
        "inputs": {"image": base64.b64encode(buffer.getvalue()).decode(), "instruction": "red"},
    }
    # the payload cannot carry a Python function: the handler's pipe forces the answer
    forced = lambda img, text, **kw: pipe(img, text, generation_kwargs=FORCE, **kw)  # noqa: E731
    answer = EndpointHandler(pipe=forced)(payload)
    assert answer["text"].count("<REF_POS>") == 3
    for rle in answer["masks"]:
        assert rle_to_mask(rle).shape == picture.shape[:2]


def rope_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if n.endswith("inv_freq")}


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_in_process_cast_equals_the_reloaded_model_bit_for_bit(processor, dtype, tmp_path):
    model = sam_model(processor, dtype)
    assert model.config.dtype == dtype and model.config.vlm_config.dtype == dtype
    assert rope_buffers(model) and all(
        b.dtype == torch.float32 for b in rope_buffers(model).values()
    )
    assert all(p.dtype == dtype for p in model.parameters())
    model.save_pretrained(tmp_path)
    reloaded = SegCompassForReasoningSegmentation.from_pretrained(tmp_path).eval()
    assert {n: t.dtype for n, t in reloaded.state_dict().items()} == {
        n: t.dtype for n, t in model.state_dict().items()
    }
    assert {n: b.dtype for n, b in rope_buffers(reloaded).items()} == {
        n: b.dtype for n, b in rope_buffers(model).items()
    }
    batch = training_batch(processor)
    with torch.no_grad():
        expected, got = model(**batch), reloaded(**batch)
    names = ("mask_logits", "conf_logits", "heatmap_logits", "iou_scores", "concept_values")
    for name in (*names, "lm_loss", "seg_loss"):
        a, b = getattr(got, name), getattr(expected, name)
        assert b is not None and a.dtype == b.dtype and torch.equal(a, b), name


def test_cast_to_dtype_keeps_float32_rope_where_to_does_not(processor):
    cast = sam_model(processor, torch.bfloat16)
    plain = sam_model(processor).to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for b in rope_buffers(cast).values())
    assert all(b.dtype == torch.bfloat16 for b in rope_buffers(plain).values())
    # and back: float32 again everywhere, the parameters equal to the bf16 values
    back = sam_model(processor, torch.bfloat16).cast_to_dtype("float32")
    assert all(
        t.dtype == torch.float32 for t in back.state_dict().values() if t.is_floating_point()
    )
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        cast.cast_to_dtype("int8")


def test_grpo_trainer_steps_in_bfloat16(request, tmp_path):
    from modeling_segcompass import SegCompassGRPOTrainer

    processor, _, dataset = request.getfixturevalue("world")
    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer), image_encoder_type="sam")
    model = SegCompassForReasoningSegmentation(config).cast_to_dtype(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SegCompassGRPOTrainer(
        model=model,
        args=grpo_args(tmp_path, max_steps=1),
        train_dataset=dataset,
        processing_class=processor,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(np.isfinite(h["loss"]) for h in logs)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("slot_mapper.") for n in changed)
    assert any(n.startswith("image_encoder.") for n in changed)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---------------------------------------------------------------- answer-token ids


def test_presets_leave_the_answer_token_ids_to_the_tokenizer(processor):
    config = SegCompassConfig.paper("qwen2.5-vl-7b")
    assert (config.ref_token_id, config.think_start_token_id, config.think_end_token_id) == (
        None,
        None,
        None,
    )
    ids = SegCompassConfig.special_token_ids_from(processor)
    assert ids == {"ref_token_id": REF, "think_start_token_id": THINK, "think_end_token_id": 8}
    taken = SegCompassConfig.paper("qwen2.5-vl-7b", tokenizer=processor)
    assert taken.ref_token_id == REF and taken.think_start_token_id == THINK
    # one SAE width rule for the preset and a fresh SAE of the assembly
    assert config.sae_k == SegCompassConfig().sae_k == 64


def test_special_token_ids_need_the_tokens():
    from tests.assembly.test_backbones_loading import qwen_like_tokenizer

    with pytest.raises(ValueError, match=r"no '<REF_POS>' token.*from_vlm_processor"):
        SegCompassConfig.special_token_ids_from(qwen_like_tokenizer())


def test_a_model_without_ref_token_id_refuses_to_run(processor):
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer))
    config.ref_token_id = None
    model = SegCompassForReasoningSegmentation(config).eval()
    with pytest.raises(ValueError, match="ref_token_id is not set"):
        model(**training_batch(processor))
    with pytest.raises(ValueError, match="ref_token_id is not set"):
        model.segment(image(), "x", processor)


def test_a_processor_that_disagrees_on_ref_pos_is_refused_where_it_meets_the_model(
    processor, tmp_path
):
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer), ref_token_id=THINK)
    model = SegCompassForReasoningSegmentation(config).eval()
    message = (
        r"ref_token_id is 7 but the processor's tokenizer has <REF_POS> at id 9 \(id 7 is '<think>'"
    )
    with pytest.raises(ValueError, match=message):
        model.segment(image(), "x", processor)
    with pytest.raises(ValueError, match=message):
        pipeline(TASK, model=model, processor=processor)
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=message):
        SegCompassTrainer(model=model, args=args, data_collator=SegCompassCollator(processor))
