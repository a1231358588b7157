"""SAM's mask decoder with single-mask output, run from its sub-modules (arXiv 2605.22658,
data flow step 6: the slots' heatmaps as dense prompts).

transformers' `SamMaskDecoder.forward(multimask_output=False)` builds B*K copies of the image
embedding and of the positional encoding and computes four masks to keep one; this runs the
same sub-modules without those copies and outputs (same numbers: tests compare it with the
module).

This file travels with saved models (remote code): it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn


def decode_single_masks(
    decoder: nn.Module,
    dense: torch.Tensor,
    image_embeddings: torch.Tensor,
    positional: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (single-mask) output of `decoder` (a `SamMaskDecoder`) for b*K prompts.

    The image is broadcast into the per-prompt sum (not repeated K times first), the
    positional encoding is a view (not b*K copies), and only the first mask's hypernetwork and
    product run.

    Args:
        decoder: transformers' `SamMaskDecoder`.
        dense: (b, K, C, E, E) dense prompt embeddings (the prompt encoder's output).
        image_embeddings: (b, C, E, E).
        positional: (1, C, E, E) SAM's dense positional encoding of the embedding grid.
    Returns:
        mask logits (b, K, M, M) and predicted IoU (b, K).
    """
    batch, num_slots, channels, height, width = dense.shape
    prompts = batch * num_slots
    # prompt + image embedding (SAM's first step): the one (b*K, C, E, E) tensor needed
    keys = (image_embeddings.unsqueeze(1) + dense).reshape(prompts, channels, height, width)
    positional = positional.to(keys.dtype).expand(prompts, -1, -1, -1)
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = tokens.repeat(prompts, 1, 1, 1)  # (b*K, 1, T, C), as SamMaskDecoder builds them
    queries, keys = decoder.transformer(
        point_embeddings=tokens,
        image_embeddings=keys,
        image_positional_embeddings=positional,
        attention_similarity=None,
        target_embedding=None,
    )  # queries: (b*K, 1, T, C); keys: (b*K, 1, E*E, C)
    # (b*K, C, E, E) as a channels-last view (SAM copies it to NCHW; same values, and the
    # transposed convolution is faster on this layout)
    keys = keys.reshape(prompts, height, width, channels).permute(0, 3, 1, 2)
    upscaled = decoder.upscale_conv1(keys)
    upscaled = decoder.activation(decoder.upscale_layer_norm(upscaled))
    upscaled = decoder.activation(decoder.upscale_conv2(upscaled))
    hyper = decoder.output_hypernetworks_mlps[0](queries[:, :, 1, :])  # (b*K, 1, C/8)
    up_channels, mask_height, mask_width = upscaled.shape[1:]
    masks = hyper.unsqueeze(2) @ upscaled.reshape(prompts, 1, up_channels, -1)
    iou = decoder.iou_prediction_head(queries[:, :, 0, :])[..., 0]  # (b*K, 1)
    return (
        masks.reshape(batch, num_slots, mask_height, mask_width),
        iou.reshape(batch, num_slots),
    )


__all__ = ["decode_single_masks"]
