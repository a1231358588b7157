"""SAM's prompt encoder (dense prompts) and mask decoder (single-mask output), computed from
their weights in a channels-first layout (arXiv 2605.22658, data flow step 6: the slots'
heatmaps as dense prompts).

The same numbers as transformers' `SamPromptEncoder` + `SamMaskDecoder.forward(
multimask_output=False)` (tests compare them with the modules, values and gradients), without
their costs when B*K prompts share B images:

- every tensor the size of the image grid stays (prompts, channels, E*E): projections are one
  batched GEMM each (`baddbmm`), never a copy between NCHW and token-major layouts;
- the mask embedding's and the upscaling's 2x2 stride-2 convolutions are per-cell linear maps,
  and their channel LayerNorms reduce over a leading dimension;
- image-to-token attention softmaxes over the few tokens along a leading dimension (a softmax
  over a last dimension of 5 is 20x slower on CPU);
- the image embedding is broadcast into the per-prompt sum, the positional encoding is
  shared, the keys' positional sum is made once per layer, and only the kept mask's
  hypernetwork runs.

This file travels with saved models (remote code): it imports only torch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _linear(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) and `bias` (out,) applied to channels-first `x` (P, in, N)."""
    prompts, length = x.shape[0], x.shape[-1]
    return torch.baddbmm(
        bias[None, :, None].expand(prompts, -1, length), weight.expand(prompts, -1, -1), x
    )


class _ChannelNorm(torch.autograd.Function):
    """LayerNorm over dim 1 of (P, c, N) with its closed-form backward (autograd through the
    mean / variance / scale ops costs twice as many passes over the tensor)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        centred = x - x.mean(1, keepdim=True)
        rstd = torch.rsqrt(centred.square().mean(1, keepdim=True) + eps)
        normed = centred * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return torch.addcmul(bias[:, None], normed, weight[:, None])

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).sum((0, 2))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2))
        grad_normed = grad * weight[:, None]
        mean = grad_normed.mean(1, keepdim=True)
        mean_projected = (grad_normed * normed).mean(1, keepdim=True)
        grad_x = (grad_normed - mean - normed * mean_projected) * rstd
        return grad_x, grad_weight, grad_bias, None


def _channel_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm` (a LayerNorm over c channels) on channels-first `x` (P, c, N), in float32."""
    out = _ChannelNorm.apply(x.float(), norm.weight.float(), norm.bias.float(), norm.eps)
    return out.to(x.dtype)


def _token_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _is_cell_conv(conv: nn.Module, kernel: int) -> bool:
    return (
        type(conv) in (nn.Conv2d, nn.ConvTranspose2d)
        and conv.kernel_size == (kernel, kernel)
        and conv.stride == (kernel, kernel)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and getattr(conv, "output_padding", (0, 0)) == (0, 0)
        and conv.groups == 1
        and conv.bias is not None
    )


def embed_dense_prompts(mask_embed: nn.Module, heatmaps: torch.Tensor) -> torch.Tensor:
    """SAM's mask embedding (`SamPromptEncoder.mask_embed`) of P heatmaps, channels-first.

    Args:
        mask_embed: transformers' `SamMaskEmbedding` (conv 2x2/2 -> LayerNorm -> act ->
            conv 2x2/2 -> LayerNorm -> act -> conv 1x1).
        heatmaps: (P, M, M), M = 4E.
    Returns:
        (P, C, E*E) dense prompt embeddings.
    """
    prompts, size, _ = heatmaps.shape
    first, second, last = mask_embed.conv1, mask_embed.conv2, mask_embed.conv3
    cells_ok = _is_cell_conv(first, 2) and _is_cell_conv(second, 2) and _is_cell_conv(last, 1)
    if not (cells_ok and first.in_channels == 1):
        return mask_embed(heatmaps.unsqueeze(1)).flatten(2)  # another mask embedding: as is
    cells = size // 4
    # each embedding cell reads a 4x4 patch: (P, 4 kernel pixels x 4 sub-cells, E*E); the
    # first convolution maps each sub-cell's 2x2 pixels (F.pixel_unshuffle orders channels
    # kernel-major), the second each cell's 2x2 sub-cells
    patches = F.pixel_unshuffle(F.pixel_unshuffle(heatmaps.unsqueeze(1), 2), 2)
    patches = patches.reshape(prompts, 4, 4 * cells * cells)
    hidden = _linear(first.weight.reshape(first.out_channels, 4), first.bias, patches)
    hidden = mask_embed.activation(_channel_norm(hidden, mask_embed.layer_norm1))
    hidden = hidden.reshape(prompts, 4 * first.out_channels, cells * cells)  # (o1 x sub-cell)
    hidden = _linear(second.weight.reshape(second.out_channels, -1), second.bias, hidden)
    hidden = mask_embed.activation(_channel_norm(hidden, mask_embed.layer_norm2))
    return _linear(last.weight.reshape(last.out_channels, -1), last.bias, hidden)


def _token_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(P, T, c) -> (P, heads, T, c / heads), as SamAttention separates heads."""
    prompts, tokens, channels = x.shape
    return x.reshape(prompts, tokens, heads, channels // heads).transpose(1, 2)


def _merge_token_heads(x: torch.Tensor) -> torch.Tensor:
    prompts, _, tokens, _ = x.shape
    return x.transpose(1, 2).reshape(prompts, tokens, -1)


def _softmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax in float32, as SAM's eager attention computes it."""
    return torch.softmax(scores, dim=dim, dtype=torch.float32).to(scores.dtype)


def _attend_tokens(attention: nn.Module, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """SamAttention among the tokens (P, T, C): keys are the queries."""
    heads = attention.num_attention_heads
    q = _token_heads(attention.q_proj(query), heads)
    k = _token_heads(attention.k_proj(query), heads)
    v = _token_heads(attention.v_proj(value), heads)
    weights = _softmax((q @ k.transpose(-1, -2)) * attention.scaling, dim=-1)
    return attention.out_proj(_merge_token_heads(weights @ v))


def _tokens_to_image(
    attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """SamAttention of the tokens (P, T, C) on the image; `key` and `value` are its projected
    keys and values, channels-first (P, D, E*E)."""
    heads = attention.num_attention_heads
    prompts, inner, length = key.shape
    q = _token_heads(attention.q_proj(query), heads)  # (P, h, T, d)
    k = key.reshape(prompts, heads, inner // heads, length)
    v = value.reshape(prompts, heads, inner // heads, length)
    weights = _softmax((q @ k) * attention.scaling, dim=-1)  # (P, h, T, E*E)
    return attention.out_proj(_merge_token_heads(weights @ v.transpose(-1, -2)))


def _image_to_tokens(
    attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """SamAttention of the image on the tokens; `query` is projected, channels-first
    (P, D, E*E); `key` and `value` are the tokens (P, T, C). Returns (P, C, E*E)."""
    heads = attention.num_attention_heads
    prompts, inner, length = query.shape
    q = query.reshape(prompts, heads, inner // heads, length)
    k = _token_heads(attention.k_proj(key), heads)  # (P, h, T, d)
    v = _token_heads(attention.v_proj(value), heads)
    # scores as (tokens, image cells): the softmax over the few tokens is a leading dimension
    weights = _softmax((k @ q) * attention.scaling, dim=2)  # (P, h, T, E*E)
    out = (v.transpose(-1, -2) @ weights).reshape(prompts, inner, length)
    return _linear(attention.out_proj.weight, attention.out_proj.bias, out)


def _two_way_transformer(
    transformer: nn.Module, points: torch.Tensor, keys: torch.Tensor, positional: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`SamTwoWayTransformer` with channels-first image keys.

    Args:
        points: (P, T, C) output tokens; keys: (P, C, E*E); positional: (C, E*E).
    Returns:
        queries (P, T, C) and keys (P, C, E*E).
    """
    queries = points
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = _attend_tokens(layer.self_attn, queries, queries)
        else:
            query = queries + points
            queries = queries + _attend_tokens(layer.self_attn, query, queries)
        queries = _token_norm(queries, layer.layer_norm1)
        to_image, to_tokens = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        keyed = keys + positional  # read by both cross-attentions (keys change after both)
        # split, not sliced: a slice's backward fills a zero tensor the size of the whole
        image_keys, image_queries = _linear(
            torch.cat([to_image.k_proj.weight, to_tokens.q_proj.weight]),
            torch.cat([to_image.k_proj.bias, to_tokens.q_proj.bias]),
            keyed,
        ).split([to_image.k_proj.out_features, to_tokens.q_proj.out_features], dim=1)
        values = _linear(to_image.v_proj.weight, to_image.v_proj.bias, keys)
        attended = _tokens_to_image(to_image, queries + points, image_keys, values)
        queries = _token_norm(queries + attended, layer.layer_norm2)
        queries = _token_norm(queries + layer.mlp(queries), layer.layer_norm3)
        attended = _image_to_tokens(to_tokens, image_queries, queries + points, queries)
        keys = _channel_norm(keys + attended, layer.layer_norm4)
    final = transformer.final_attn_token_to_image
    key = _linear(final.k_proj.weight, final.k_proj.bias, keys + positional)
    value = _linear(final.v_proj.weight, final.v_proj.bias, keys)
    attended = _tokens_to_image(final, queries + points, key, value)
    return _token_norm(queries + attended, transformer.layer_norm_final_attn), keys


def decode_single_masks(
    decoder: nn.Module,
    dense: torch.Tensor,
    image_embeddings: torch.Tensor,
    positional: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (single-mask) output of `decoder` (a `SamMaskDecoder`) for b*K prompts.

    Args:
        decoder: transformers' `SamMaskDecoder`.
        dense: (b, K, C, E*E) dense prompt embeddings (`embed_dense_prompts`).
        image_embeddings: (b, C, E*E).
        positional: (C, E*E) SAM's dense positional encoding of the embedding grid.
    Returns:
        mask logits (b, K, M, M) (M = 4E for SAM) and predicted IoU (b, K).
    """
    batch, num_slots, channels, length = dense.shape
    prompts = batch * num_slots
    cells = int(round(length**0.5))
    # prompt + image embedding (SAM's first step): the one (b*K, C, E*E) tensor needed
    keys = (image_embeddings.unsqueeze(1) + dense).reshape(prompts, channels, length)
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    points = tokens.to(keys.dtype).unsqueeze(0).expand(prompts, -1, -1)  # (b*K, T, C)
    queries, keys = _two_way_transformer(
        decoder.transformer, points, keys, positional.to(keys.dtype)
    )
    first, second = decoder.upscale_conv1, decoder.upscale_conv2
    hyper = decoder.output_hypernetworks_mlps[0](queries[:, 1, :])  # (b*K, C/8)
    iou = decoder.iou_prediction_head(queries[:, 0, :])[..., 0]  # (b*K,)
    if _is_cell_conv(first, 2) and _is_cell_conv(second, 2):
        # each cell -> 2x2 sub-cells (channels o1 x sub-cell) -> 2x2 pixels each
        out1, out2 = first.out_channels, second.out_channels
        weight = first.weight.permute(1, 2, 3, 0).reshape(4 * out1, channels)
        upscaled = _linear(weight, first.bias.repeat_interleave(4), keys)
        upscaled = _channel_norm(
            upscaled.reshape(prompts, out1, 4 * length), decoder.upscale_layer_norm
        )
        upscaled = decoder.activation(upscaled)
        weight = second.weight.permute(2, 3, 1, 0).reshape(4 * out2, out1)  # (pixel, o2)
        upscaled = decoder.activation(_linear(weight, second.bias.repeat(4), upscaled))
        masks = hyper[:, None, None, :] @ upscaled.reshape(prompts, 4, out2, 4 * length)
        # (pixel, sub-cell, cell) -> the (4E, 4E) grid
        masks = F.pixel_shuffle(F.pixel_shuffle(masks.reshape(prompts, 16, cells, cells), 2), 2)
        masks = masks.reshape(prompts, 4 * cells, 4 * cells)
    else:  # another upscaling: run its modules
        grid = keys.reshape(prompts, channels, cells, cells)
        upscaled = decoder.activation(decoder.upscale_layer_norm(first(grid)))
        upscaled = decoder.activation(second(upscaled))
        masks = (hyper.unsqueeze(1) @ upscaled.flatten(2)).reshape(upscaled[:, 0].shape)
    return masks.unflatten(0, (batch, num_slots)), iou.reshape(batch, num_slots)


__all__ = ["decode_single_masks", "embed_dense_prompts"]
