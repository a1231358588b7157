"""segment_anything (the original SAM repository) parameter names -> transformers' `SamModel` names.

A SAM `.pth` of github.com/facebookresearch/segment-anything (e.g. `sam_vit_h_4b8939.pth`)
holds `image_encoder.*`, `prompt_encoder.*` and `mask_decoder.*`; transformers' `SamModel`
holds the same tensors under other module names (`vision_encoder.layers.i.layer_norm1`
for `image_encoder.blocks.i.norm1`, ...). The shapes are the same, so a rename is enough;
`sam_config_from_segment_anything` reads the architecture back from the shapes.

Upstream SegCompass (github.com/ZhenyuLU-Heliodore/SegCompass) keeps segment_anything's
`prompt_encoder` / `mask_decoder` modules, so its `refseg_modules.pt` uses the same names.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import SamConfig

#: Buffers of segment_anything's `Sam` that transformers keeps in the image processor (the
#: pixel normalisation constants); dropped when present.
SEGMENT_ANYTHING_IGNORED = ("pixel_mean", "pixel_std")
_SHARED_PE = "shared_image_embedding.positional_embedding"
_TIED_PE = "prompt_encoder.shared_embedding.positional_embedding"

# (pattern, replacement) on segment_anything names; the first match wins. Sequential blocks
# are renamed by their position in segment_anything's nn.Sequential.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in (
        # image encoder (ViT)
        (r"^image_encoder\.pos_embed$", "vision_encoder.pos_embed"),
        (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
        (r"^image_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_encoder.layers.\1.layer_norm\2."),
        (
            r"^image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj|rel_pos_h|rel_pos_w)\b",
            r"vision_encoder.layers.\1.attn.\2",
        ),
        (r"^image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.", r"vision_encoder.layers.\1.mlp.\2."),
        (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
        (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
        (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
        (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
        # prompt encoder
        (
            r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$",
            "shared_image_embedding.positional_embedding",
        ),
        (r"^prompt_encoder\.point_embeddings\.(\d+)\.", r"prompt_encoder.point_embed.\1."),
        (r"^prompt_encoder\.(not_a_point_embed|no_mask_embed)\.", r"prompt_encoder.\1."),
        (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
        (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
        (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
        (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
        (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
        # mask decoder
        (r"^mask_decoder\.(iou_token|mask_tokens)\.", r"mask_decoder.\1."),
        (
            r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.",
            r"mask_decoder.transformer.layers.\1.layer_norm\2.",
        ),
        (
            r"^mask_decoder\.transformer\.layers\.(\d+)\."
            r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
            r"(q_proj|k_proj|v_proj|out_proj)\.",
            r"mask_decoder.transformer.layers.\1.\2.\3.",
        ),
        (
            r"^mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.",
            r"mask_decoder.transformer.layers.\1.mlp.\2.",
        ),
        (
            r"^mask_decoder\.transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\.",
            r"mask_decoder.transformer.final_attn_token_to_image.\1.",
        ),
        (
            r"^mask_decoder\.transformer\.norm_final_attn\.",
            "mask_decoder.transformer.layer_norm_final_attn.",
        ),
        (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
        (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
        (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    )
]
# segment_anything's MLP is `layers.0 .. layers.{n-1}`; transformers' is `proj_in`,
# `layers.0 .. layers.{n-3}`, `proj_out`.
_MLP = re.compile(
    r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(.+)$"
)


def mlp_depths(keys: list[str]) -> dict[str, int]:
    """Number of linear layers of each segment_anything MLP in `keys`, by its prefix."""
    depths: dict[str, int] = {}
    for key in keys:
        match = _MLP.match(key)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    return depths


def segment_anything_key(key: str, depths: dict[str, int] | None = None) -> str | None:
    """The `SamModel` name of one segment_anything parameter name (None: not a SAM name).

    `depths` (`mlp_depths` of the whole state dict) is needed for the MLP layers of the mask decoder:
    their last layer becomes `proj_out`.
    """
    match = _MLP.match(key)
    if match:
        prefix, index, rest = match[1], int(match[2]), match[3]
        depth = (depths or {}).get(prefix)
        if depth is None or depth < 2:
            return None
        if index == 0:
            name = "proj_in"
        elif index == depth - 1:
            name = "proj_out"
        else:
            name = f"layers.{index - 1}"
        return f"mask_decoder.{prefix}.{name}.{rest}"
    for pattern, replacement in _RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def segment_anything_to_sam_model(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a segment_anything state dict to `SamModel` names.

    Returns:
        (renamed tensors, keys that are not segment_anything SAM names). The pixel
        normalisation buffers (`SEGMENT_ANYTHING_IGNORED`) are dropped, not reported; the
        positional features appear under both of SamModel's tied names.
    """
    depths = mlp_depths(list(state_dict))
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key in SEGMENT_ANYTHING_IGNORED:
            continue
        target = segment_anything_key(key, depths)
        if target is None:
            unknown.append(key)
        else:
            out[target] = tensor
    if _SHARED_PE in out:  # SamModel keeps the prompt encoder's copy tied to the shared one
        out[_TIED_PE] = out[_SHARED_PE]
    return out, unknown


def sam_config_from_segment_anything(
    state_dict: dict[str, torch.Tensor], *, mask_decoder_heads: int = 8
) -> SamConfig:
    """The `SamConfig` of a segment_anything state dict, read from its tensor shapes.

    Everything but the mask decoder's number of attention heads shows in the shapes (the
    ViT's heads follow from the relative-position tables' width); SAM uses 8 decoder heads
    in every size (`mask_decoder_heads`).

    Raises:
        ValueError: a tensor the architecture is read from is missing.
    """

    def get(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(
                f"The SAM checkpoint has no {key!r}: expected a full segment_anything SAM "
                "state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*), e.g. "
                "sam_vit_h_4b8939.pth."
            )
        return state_dict[key]

    pos = get("image_encoder.pos_embed")  # (1, g, g, D)
    grid, hidden = int(pos.shape[1]), int(pos.shape[3])
    patch = int(get("image_encoder.patch_embed.proj.weight").shape[-1])
    blocks = sorted(
        {int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")}
    )
    rel = [get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in blocks]
    head_dim = int(rel[0].shape[1])
    global_blocks = [i for i, r in zip(blocks, rel) if r.shape[0] == 2 * grid - 1]
    windowed = [r for r in rel if r.shape[0] != 2 * grid - 1]
    window = (int(windowed[0].shape[0]) + 1) // 2 if windowed else 0
    pe = get("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")  # (2, F)
    decoder_width = int(get("mask_decoder.iou_token.weight").shape[1])
    decoder_layers = {
        int(k.split(".")[3]) for k in state_dict if k.startswith("mask_decoder.transformer.layers.")
    }
    iou_depth = mlp_depths(list(state_dict)).get("iou_prediction_head", 3)
    cross_width = int(
        get("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight").shape[0]
    )
    vision: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": hidden // head_dim,
        "mlp_dim": int(get("image_encoder.blocks.0.mlp.lin1.weight").shape[0]),
        "image_size": grid * patch,
        "patch_size": patch,
        "output_channels": int(get("image_encoder.neck.0.weight").shape[0]),
        "global_attn_indexes": global_blocks,
        "window_size": window,
        "num_pos_feats": int(pe.shape[1]),
    }
    prompt = {
        "hidden_size": int(get("prompt_encoder.no_mask_embed.weight").shape[1]),
        "image_size": grid * patch,
        "patch_size": patch,
        "mask_input_channels": int(get("prompt_encoder.mask_downscaling.3.weight").shape[0]),
    }
    decoder = {
        "hidden_size": decoder_width,
        "num_hidden_layers": len(decoder_layers),
        "num_attention_heads": mask_decoder_heads,
        "mlp_dim": int(get("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
        "attention_downsample_rate": decoder_width // cross_width,
        "num_multimask_outputs": int(get("mask_decoder.mask_tokens.weight").shape[0]) - 1,
        "iou_head_depth": iou_depth,
        "iou_head_hidden_dim": int(
            get("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]
        ),
    }
    return SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder
    )


__all__ = [
    "SEGMENT_ANYTHING_IGNORED",
    "mlp_depths",
    "sam_config_from_segment_anything",
    "segment_anything_key",
    "segment_anything_to_sam_model",
]
