"""Where the model reads the VLM, and the heatmap prompt SAM gets.

The VLM's decoder layers (the SAE input is captured at the output of one of them), the
last-layer states at the `<REF_POS>` tokens in the slot order the config names, and the fill
of heatmap logits outside the unpadded image before they become SAM's dense prompt.

This file travels with saved models (remote code): it imports torch, its flat sibling
configuration_segcompass.py and (inside `batch_vision_windows`) transformers' Qwen2.5-VL
module.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

from .configuration_segcompass import SLOT_ORDERS


def gather_ref_hidden_states(
    hidden_states: torch.Tensor,
    input_ids: torch.Tensor,
    ref_token_id: int,
    num_slots: int,
    order: str = "reading",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer states at the last `num_slots` `<REF_POS>` tokens of each row.

    Args:
        hidden_states: (B, L, d).
        input_ids: (B, L).
        order: one of `SLOT_ORDERS`. "reading": the K-th from last `<REF_POS>` in slot 0 and
            the last in slot K-1 (the order the answer names them); "last_first": the last
            `<REF_POS>` in slot 0, the one before it in slot 1, ... (the authors' code,
            `VLRefSegCore.get_ref_vec` in verl/modeling.py of ZhenyuLU-Heliodore/SegCompass).
    Returns:
        states (B, K, d), zeros where a row has fewer than K `<REF_POS>` tokens (the empty
        slots are the last ones in both orders), and present (B, K) bool.
    """
    if order not in SLOT_ORDERS:
        raise ValueError(
            f"gather_ref_hidden_states: order must be one of {SLOT_ORDERS}; got {order!r}."
        )
    batch, _, dim = hidden_states.shape
    is_ref = input_ids == ref_token_id  # (B, L)
    count = is_ref.sum(-1, keepdim=True)  # (B, 1)
    # number of <REF_POS> at or after each position: the last K have rank 1..K
    rank_from_end = is_ref.flip(-1).long().cumsum(-1).flip(-1)  # (B, L)
    if order == "reading":
        slot = count.clamp(max=num_slots) - rank_from_end  # (B, L): slot index of each kept ref
    else:
        slot = rank_from_end - 1
    take = is_ref & (rank_from_end <= num_slots)
    rows, cols = take.nonzero(as_tuple=True)
    states = hidden_states.new_zeros(batch, num_slots, dim)
    states[rows, slot[rows, cols]] = hidden_states[rows, cols]
    present = torch.arange(num_slots, device=input_ids.device).unsqueeze(0) < count.clamp(
        max=num_slots
    )  # (B, K)
    return states, present


def fill_outside_image(
    heatmap_logits: torch.Tensor, valid_mask: torch.Tensor | None, value: float | None
) -> torch.Tensor:
    """Heatmap logits with `value` on the mask-grid cells outside the unpadded image.

    The authors' code sets -50 there before the prompt encoder (only SAM's prompt; the
    heatmap losses read the unfilled logits). Their valid area is rows < ceil(h / 4) and
    columns < ceil(w / 4) of the 256 grid for a (h, w) image inside the 1024 frame, which is
    the processor's `valid_mask`.

    Args:
        heatmap_logits: (B, K, M, M).
        valid_mask: (B, M, M) bool, True on the image; None leaves the logits as they are.
        value: the fill; None leaves the logits as they are.
    """
    if value is None or valid_mask is None:
        return heatmap_logits
    outside = ~valid_mask.to(device=heatmap_logits.device, dtype=torch.bool).unsqueeze(1)
    return heatmap_logits.masked_fill(outside, value)  # (B, K, M, M)


def _decoder_layers(vlm: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of an image-text-to-text model."""
    candidates = []
    base = getattr(vlm, "model", vlm)
    language_model = getattr(base, "language_model", None)
    if language_model is not None:
        candidates.append(getattr(language_model, "layers", None))
        inner = getattr(language_model, "model", None)
        if inner is not None:
            candidates.append(getattr(inner, "layers", None))
    if hasattr(vlm, "get_decoder"):
        decoder = vlm.get_decoder()
        candidates.append(getattr(decoder, "layers", None))
    for layers in candidates:
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"SegCompass: cannot find the decoder layers of {type(vlm).__name__} "
        "(looked for .model.language_model.layers and get_decoder().layers); "
        "this VLM family is not supported yet, please open an issue."
    )


def batch_vision_windows(vlm: nn.Module) -> int:
    """Let a Qwen2.5-VL vision tower attend over its equal-length windows in one call.

    With the "sdpa" attention, transformers' Qwen2.5-VL vision attention runs one
    attention call per window and image: 160 calls for 32 of the tiny default's images, each
    too small to keep a core busy. Each vision block's attention becomes a
    `WindowBatchedVisionAttention`, which stacks runs of equal-length windows as a batch of
    one `scaled_dot_product_attention` call (the same per-window numbers: every window is
    still a separate softmax) and leaves every other case to transformers' own forward.

    Returns:
        the number of attention modules changed (0 for other VLMs).
    """
    try:
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
    except ImportError:  # pragma: no cover - transformers without Qwen2.5-VL
        return 0
    changed = 0
    for module in vlm.modules():
        if type(module) is qwen.Qwen2_5_VLVisionAttention:
            module.__class__ = _window_batched_class()
            changed += 1
    return changed


@functools.cache
def _window_batched_class() -> type:
    """`WindowBatchedVisionAttention`, a subclass of transformers' Qwen2.5-VL vision attention."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    class WindowBatchedVisionAttention(qwen.Qwen2_5_VLVisionAttention):
        """Qwen2.5-VL vision attention with runs of equal-length windows in one call."""

        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            if self.config._attn_implementation != "sdpa" or (
                self.training and self.attention_dropout > 0
            ):
                return super().forward(hidden_states, cu_seqlens, position_embeddings, **kwargs)
            seq_length = hidden_states.shape[0]
            qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1)
            query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)  # (S, H, d) each
            cos, sin = position_embeddings
            query, key = qwen.apply_rotary_pos_emb_vision(query, key, cos, sin)
            outputs, start = [], 0
            for length, count in _runs((cu_seqlens[1:] - cu_seqlens[:-1]).tolist()):
                end = start + length * count
                q, k, v = (
                    t[start:end].reshape(count, length, self.num_heads, -1).transpose(1, 2)
                    for t in (query, key, value)
                )  # (count, H, length, d) each
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
                outputs.append(out.transpose(1, 2).reshape(length * count, -1))  # (rows, H*d)
                start = end
            return self.proj(outputs[0] if len(outputs) == 1 else torch.cat(outputs, 0))

    return WindowBatchedVisionAttention


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """[(length, how many in a row)] of a list of window lengths (zero lengths dropped)."""
    nonzero = (length for length in lengths if length)  # an empty window adds no rows
    return [(length, len(list(group))) for length, group in itertools.groupby(nonzero)]


__all__ = [
    "SLOT_ORDERS",
    "batch_vision_windows",
    "fill_outside_image",
    "gather_ref_hidden_states",
]
