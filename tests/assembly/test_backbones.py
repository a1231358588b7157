"""Backbone-agnostic: the whole forward with a second image-text-to-text family (LLaVA)."""

import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation

REF, IMAGE = 9, 5


def tiny_llava_config() -> SegCompassConfig:
    vlm = {
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": 128,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        },
        "image_token_index": IMAGE,
        "vision_feature_layer": -1,
    }
    return SegCompassConfig.tiny(vocab_size=128, vlm_config=vlm, sae_layer=1)


def test_llava_backbone_forward_backward():
    torch.manual_seed(0)
    config = tiny_llava_config()
    model = SegCompassForReasoningSegmentation(config)
    assert type(model.vlm).__name__ == "LlavaForConditionalGeneration"
    image_tokens = (32 // 8) ** 2
    row = [1, *[IMAGE] * image_tokens, 20, 21, 7, 40, 41, 8, REF, REF, 2]
    input_ids = torch.tensor([row, row])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(2, 3, 32, 32),
        "sam_pixel_values": torch.randn(2, 3, 64, 64),
        "labels": input_ids.clone(),
        "gt_masks": torch.zeros(2, 3, 64, 64),
        "num_objects": torch.tensor([1, 0]),
    }
    batch["gt_masks"][0, 0, 10:30, 10:30] = 1
    out = model(**batch)
    assert out.mask_logits.shape == (2, 3, 64, 64)
    assert out.ref_mask.tolist() == [[True, True, False]] * 2
    assert out.ref_hidden_states.shape == (2, 3, 48)
    assert out.concept_indices.shape[:2] == input_ids.shape
    out.loss.backward()
    assert model.sae.W_enc.grad.abs().sum() > 0
    assert model.vlm.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
