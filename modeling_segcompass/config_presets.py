"""The presets of `SegCompassConfig`: the tiny default, the paper's dimensions, the authors' model.

Each function returns the config fields of one preset (a dict); the classmethods
`SegCompassConfig.tiny / paper / upstream` add the caller's overrides and build the config.

This file travels with saved models (remote code): it imports only the standard library.
"""

from __future__ import annotations

from typing import Any

# Published backbone settings (arXiv 2605.22658, the model): name -> (vlm model_type,
# sae_layer). The authors' code feeds the SAE `hidden_states[13]` (Qwen2.5-VL-7B) /
# `hidden_states[16]` (LLaVA); entry 0 is the embedding output, so these are the outputs of
# decoder layers 12 / 15, which is what `sae_layer` names.
PAPER_BACKBONES: dict[str, tuple[str, int]] = {
    "qwen2.5-vl-7b": ("qwen2_5_vl", 12),
    "llava-1.5-7b": ("llava", 15),
    "llava-1.5-13b": ("llava", 15),
}


def tiny_fields(
    *,
    vocab_size: int,
    ref_token_id: int,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
    think_start_token_id: int | None,
    think_end_token_id: int | None,
    eos_token_id: int,
    pad_token_id: int,
    image_size: int,
) -> dict[str, Any]:
    """Fields of `SegCompassConfig.tiny` (its docstring says what the model is)."""
    vlm_config = {
        "model_type": "qwen2_5_vl",
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 2, 4],
            },
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        "image_token_id": image_token_id,
        "video_token_id": video_token_id,
        "vision_start_token_id": vision_start_token_id,
        "vision_end_token_id": vision_end_token_id,
        "tie_word_embeddings": True,
    }
    embed = image_size // 4
    sam_config = {
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": image_size,
            "patch_size": 4,
            "output_channels": 32,
            "global_attn_indexes": [1],
            "window_size": 4,
            "num_pos_feats": 16,
            # std of SAM's random Fourier positional features; 1.0 as in the original SAM
            # (transformers' default of hidden_size // 2 only matters for loaded checkpoints)
            "scale": 1.0,
        },
        "prompt_encoder_config": {
            "hidden_size": 32,
            "image_size": image_size,
            "patch_size": 4,
            # SAM's own value. With 8, the mask embedding's first LayerNorm normalises
            # over 2 channels, where it can only output (+-1, -+1): the heatmap prompt
            # became a 0/1 map and the trained decoder ignored it (docs/interpretability.md)
            "mask_input_channels": 16,
            "image_embedding_size": embed,
        },
        "mask_decoder_config": {
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    }
    return {
        "vlm_config": vlm_config,
        "sam_config": sam_config,
        "image_encoder_type": "conv",
        "conv_encoder_width": 48,
        "sae_layer": 0,
        "d_sae": 512,
        "sae_architecture": "topk",
        "sae_k": 16,
        "sae_reconstruction_weight": 0.1,
        "slot_order_prior": 1.0,
        "codebook_dim": 64,
        "codebook_layers": 2,
        "codebook_heads": 4,
        "codebook_ffn_dim": 128,
        "num_slots": 3,
        "slot_mapper_heads": 4,
        "slot_fuser_channels": 16,
        "ref_token_id": ref_token_id,
        "think_start_token_id": think_start_token_id,
        "think_end_token_id": think_end_token_id,
        "initializer_range": 0.02,
    }


def backbone_fields(vlm: str, caller: str) -> dict[str, Any]:
    """The VLM and SAM configs and `sae_layer` of a published backbone (SAM ViT-H)."""
    if vlm not in PAPER_BACKBONES:
        raise ValueError(
            f"SegCompassConfig.{caller}: unknown vlm {vlm!r}; expected one of "
            f"{sorted(PAPER_BACKBONES)}. For another backbone, build SegCompassConfig(vlm_config=...) "
            "directly or use SegCompassForReasoningSegmentation.from_backbones."
        )
    model_type, sae_layer = PAPER_BACKBONES[vlm]
    if vlm == "qwen2.5-vl-7b":
        vlm_config: dict[str, Any] = {
            "model_type": model_type,
            "text_config": {
                "vocab_size": 152064,
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "max_position_embeddings": 128000,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [16, 24, 24],
                },
                "bos_token_id": 151643,
                "eos_token_id": 151645,
            },
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "out_hidden_size": 3584,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
        }
    else:
        big = vlm == "llava-1.5-13b"
        vlm_config = {
            "model_type": model_type,
            "text_config": {
                "model_type": "llama",
                "vocab_size": 32064,
                "hidden_size": 5120 if big else 4096,
                "intermediate_size": 13824 if big else 11008,
                "num_hidden_layers": 40 if big else 32,
                "num_attention_heads": 40 if big else 32,
                "num_key_value_heads": 40 if big else 32,
                "max_position_embeddings": 4096,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 336,
                "projection_dim": 768,
            },
            "image_token_index": 32000,
        }
    return {
        "vlm_config": vlm_config,
        # SAM ViT-H (facebook/sam-vit-huge)
        "sam_config": {
            "vision_config": {
                "hidden_size": 1280,
                "num_hidden_layers": 32,
                "num_attention_heads": 16,
                "mlp_dim": 5120,
                "global_attn_indexes": [7, 15, 23, 31],
            },
        },
        "image_encoder_type": "sam",
        "sae_layer": sae_layer,
    }


def paper_fields(vlm: str, num_slots: int) -> dict[str, Any]:
    """Fields of `SegCompassConfig.paper`: the published dimensions with this package's
    choices (topk SAE, the package's slot mapper)."""
    return {
        **backbone_fields(vlm, "paper"),
        "d_sae": 65536,
        "sae_architecture": "topk",
        "codebook_dim": 512,
        "codebook_layers": 2,
        "codebook_heads": 8,
        "codebook_ffn_dim": 2048,
        "codebook_readout_pairs": None,  # the paper's dense readout
        "slot_mapper_ref_input": True,
        "num_slots": num_slots,
        "slot_mapper_heads": 8,
        "slot_fuser_channels": 32,
    }


def upstream_fields(base: str, num_slots: int) -> dict[str, Any]:
    """Fields of `SegCompassConfig.upstream`: the model as the authors' code and launch scripts
    (github.com/ZhenyuLU-Heliodore/SegCompass: verl/modeling.py, scripts/train/*/) run it."""
    return {
        **backbone_fields(base, "upstream"),
        # SAELens "standard" SAE with relu, no b_dec subtraction before encoding; the codebook
        # zeroes codes with |a| < 2.0 (QueryBookAttnHead's activation_threshold)
        "d_sae": 65536,
        "sae_architecture": "relu",
        "sae_apply_b_dec_to_input": False,
        "activation_threshold": 2.0,
        "sae_max_active": None,
        "sae_reconstruction_weight": 0.0,  # the SAE is frozen during RL
        # QueryBookAttnHead: width 512, 2 pre-norm layers, 8 heads, ffn 4 x 512, no dropout
        "codebook_dim": 512,
        "codebook_layers": 2,
        "codebook_heads": 8,
        "codebook_ffn_dim": 2048,
        "codebook_dropout": 0.0,
        "codebook_readout_pairs": None,  # the slot is the encoder's output
        "slot_mapper_ref_input": True,  # the <REF_POS> state is fused with the slot
        "num_slots": num_slots,
        # SlotAttnHeatmapHead, get_ref_vec and the -50 fill of VLRefSegCore
        "slot_mapper_type": "upstream",
        "slot_mapper_heads": 4,
        "slot_order": "last_first",
        "heatmap_outside_fill": -50.0,
        # dp_actor's losses with the launch scripts' coefficients before the switch step:
        # seg 0.3, conf 0.2, heatmap BCE 1, mask Dice 0.8 (heatmap Dice = mask Dice x 1.0),
        # focal 0 (torchvision's alpha 0.25, gamma 2), no IoU-head loss, pure Hungarian
        "seg_loss_weight": 0.3,
        "conf_loss_weight": 0.2,
        "heatmap_bce_weight": 1.0,
        "heatmap_dice_weight": 0.8,
        "mask_dice_weight": 0.8,
        "mask_focal_weight": 0.0,
        "iou_loss_weight": 0.0,
        "focal_alpha": 0.25,
        "focal_gamma": 2.0,
        "slot_order_prior": 0.0,
        "slot_confidence_threshold": 0.5,
        # dp_actor's switch at step 1500 (scripts' adjust_loss_step, dice/focal_loss_coef_new),
        # per-sample-then-batch means, Dice 2 I / (U + 1e-6), matching on the sigmoid heatmap
        # with 1 - soft IoU over the full 4E grid
        "loss_schedule_step": 1500,
        "heatmap_dice_weight_after": 2.0,
        "mask_dice_weight_after": 2.0,
        "mask_focal_weight_after": 5.0,
        "loss_normalization": "per_sample",
        "dice_eps": 1e-6,
        "matching_on": "heatmap",
        "matching_cost": "soft_iou",
        "matching_full_grid": True,
    }


__all__ = ["PAPER_BACKBONES", "backbone_fields", "paper_fields", "tiny_fields", "upstream_fields"]
