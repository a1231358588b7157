"""SlotMapper: slot vectors + `<REF_POS>` states -> heatmaps on the image (arXiv 2605.22658, data flow step 4).

For each slot: project the slot to the LLM width, fuse it with the last-layer hidden
state of its `<REF_POS>` token (concat -> LayerNorm -> Linear -> SiLU), then compare the
fused query, head by head, with the image embedding; a small conv fuser turns the
per-head similarity maps into one heatmap, upsampled x4 to the mask grid. A confidence
head says whether the slot holds an object.

`UpstreamSlotMapper` is the authors' head (`SlotAttnHeatmapHead` in verl/modeling.py of
github.com/ZhenyuLU-Heliodore/SegCompass) with the same parameter names and shapes, so their
`heatmap_head.*` tensors load into it one to one; `config.slot_mapper_type` picks it.

This file travels with saved models (remote code): it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SlotMapperOutput:
    """Output of [`SlotMapper`].

    Attributes:
        heatmap_logits: (B, K, 4E, 4E) where each slot points on the image.
        conf_logits: (B, K) does the slot hold an object.
        similarity: (B, K, heads, E, E) per-head similarity maps before the fuser.
        queries: fused slot queries, (B, K, C) from [`SlotMapper`], (B, K, d) from
            [`UpstreamSlotMapper`] (it fuses in the LLM width).
    """

    heatmap_logits: torch.Tensor
    conf_logits: torch.Tensor
    similarity: torch.Tensor
    queries: torch.Tensor


def _check_inputs(
    owner: str, slots: torch.Tensor, ref_hidden_states: torch.Tensor, image_embeddings: torch.Tensor
) -> tuple[int, int]:
    """(B, K) of the slots, after refusing `<REF_POS>` states or image embeddings of
    another batch / slot count."""
    batch, num_slots, _ = slots.shape
    if ref_hidden_states.shape[:2] != (batch, num_slots):
        raise ValueError(
            f"{owner}: ref_hidden_states must be (B={batch}, K={num_slots}, d); got "
            f"{tuple(ref_hidden_states.shape)}."
        )
    if image_embeddings.dim() != 4 or image_embeddings.shape[0] != batch:
        raise ValueError(
            f"{owner}: image_embeddings must be (B={batch}, C, E, E); got "
            f"{tuple(image_embeddings.shape)}."
        )
    return batch, num_slots


def _head_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-head scaled dot products of slot queries with every image position.

    Args:
        queries: (B, K, heads, c), c = C / heads.
        keys: (B, C, E, E), the projected image embedding (channels grouped by head).
    Returns:
        (B*K, heads, E, E) similarity maps.
    """
    batch, num_slots, num_heads, head_dim = queries.shape
    _, _, height, width = keys.shape
    keys = keys.reshape(batch, num_heads, head_dim, height * width)  # (B, heads, c, E*E)
    similarity = torch.einsum("bkhc,bhcn->bkhn", queries, keys) * head_dim**-0.5
    return similarity.reshape(batch * num_slots, num_heads, height, width)


class SlotMapper(nn.Module):
    """Ground K slots on the image embedding.

    Args:
        codebook_dim: slot width d_q.
        llm_hidden_size: width d of the `<REF_POS>` hidden states.
        image_channels: C, channels of the image embedding.
        num_heads: similarity heads (C must be divisible by it).
        fuser_channels: hidden width of the conv fuser.
        upsample: factor from the embedding grid E to the mask grid (4 for SAM).
    """

    def __init__(
        self,
        *,
        codebook_dim: int,
        llm_hidden_size: int,
        image_channels: int,
        num_heads: int = 8,
        fuser_channels: int = 32,
        upsample: int = 4,
    ) -> None:
        super().__init__()
        if image_channels % num_heads:
            raise ValueError(
                f"SlotMapper: image_channels ({image_channels}) must be divisible by num_heads "
                f"({num_heads})."
            )
        self.num_heads = num_heads
        self.head_dim = image_channels // num_heads
        self.upsample = upsample
        self.slot_proj = nn.Linear(codebook_dim, llm_hidden_size)
        self.fuse_norm = nn.LayerNorm(2 * llm_hidden_size)
        self.fuse_proj = nn.Linear(2 * llm_hidden_size, image_channels)
        self.query_proj = nn.Linear(image_channels, image_channels)
        self.key_proj = nn.Conv2d(image_channels, image_channels, kernel_size=1)
        self.fuser = nn.Sequential(
            nn.Conv2d(num_heads, fuser_channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(fuser_channels, fuser_channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(fuser_channels, 1, kernel_size=1),
        )
        # The paper only says "a per-slot confidence head". It reads the fused query and the
        # image features pooled where the slot points, so that "no such object here" can be
        # seen from the image and not only from the text.
        self.conf_head = nn.Sequential(
            nn.Linear(2 * image_channels, image_channels),
            nn.SiLU(),
            nn.Linear(image_channels, 1),
        )

    def forward(
        self,
        slots: torch.Tensor,
        ref_hidden_states: torch.Tensor,
        image_embeddings: torch.Tensor,
    ) -> SlotMapperOutput:
        """
        Args:
            slots: (B, K, d_q) from the query codebook.
            ref_hidden_states: (B, K, d) last-layer states at the `<REF_POS>` tokens (zeros
                where the completion has fewer than K of them).
            image_embeddings: (B, C, E, E).
        """
        batch, num_slots = _check_inputs("SlotMapper", slots, ref_hidden_states, image_embeddings)
        _, channels, height, width = image_embeddings.shape
        fused = torch.cat([self.slot_proj(slots), ref_hidden_states.to(slots.dtype)], dim=-1)
        fused = F.silu(self.fuse_proj(self.fuse_norm(fused)))  # (B, K, C)
        queries = self.query_proj(fused).view(batch, num_slots, self.num_heads, self.head_dim)
        similarity = _head_similarity(queries, self.key_proj(image_embeddings))
        heatmap = self.fuser(similarity)  # (B*K, 1, E, E)
        where = heatmap.view(batch, num_slots, height * width).softmax(-1)  # (B, K, E*E)
        pooled = torch.einsum(
            "bkn,bcn->bkc", where, image_embeddings.reshape(batch, channels, height * width)
        )  # (B, K, C)
        heatmap = F.interpolate(
            heatmap, scale_factor=self.upsample, mode="bilinear", align_corners=False
        )  # (B*K, 1, 4E, 4E)
        heatmap = heatmap.view(batch, num_slots, height * self.upsample, width * self.upsample)
        conf = self.conf_head(torch.cat([fused, pooled], dim=-1)).squeeze(-1)  # (B, K)
        return SlotMapperOutput(
            heatmap_logits=heatmap,
            conf_logits=conf,
            similarity=similarity.view(batch, num_slots, self.num_heads, height, width),
            queries=fused,
        )


class _BiasStartConv2d(nn.Conv2d):
    """A Conv2d whose bias starts at a constant (its weight keeps PyTorch's default init)."""

    def __init__(self, *args: Any, bias_start: float, **kwargs: Any) -> None:
        self.bias_start = bias_start
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            with torch.no_grad():
                self.bias.fill_(self.bias_start)


class UpstreamSlotMapper(nn.Module):
    """The authors' slot head: fusion in the LLM width, 4 heads, a two-conv fuser.

    Per slot: `querybook_proj` (d_q -> d, no bias) projects the codebook slot; `ref_fuse`
    (LayerNorm(2d) -> Linear(2d -> d) -> SiLU) fuses cat[`<REF_POS>` state, projected slot];
    `q_proj` (d -> C, no bias) and the 1x1 conv `k_proj` (C -> C, no bias) give per-head
    query / key maps whose scaled dot products the fuser (conv3x3(h -> h) -> SiLU ->
    conv3x3(h -> 1), last bias starting at -1.8 so heatmaps start mostly "off") turns into
    one E x E map, upsampled bilinearly to the mask grid. `conf_head` (LayerNorm(d) ->
    Linear(d -> d/2) -> SiLU -> Linear(d/2 -> 1)) reads the fused query only.

    Args:
        codebook_dim: slot width d_q.
        llm_hidden_size: width d of the `<REF_POS>` hidden states.
        image_channels: C, channels of the image embedding.
        num_heads: similarity heads (C must be divisible by it; 4 upstream).
        upsample: factor from the embedding grid E to the mask grid (4 for SAM).
        fuser_bias_init: starting bias of the fuser's last conv.
    """

    def __init__(
        self,
        *,
        codebook_dim: int,
        llm_hidden_size: int,
        image_channels: int,
        num_heads: int = 4,
        upsample: int = 4,
        fuser_bias_init: float = -1.8,
    ) -> None:
        super().__init__()
        if image_channels % num_heads:
            raise ValueError(
                f"UpstreamSlotMapper: image_channels ({image_channels}) must be divisible by "
                f"num_heads ({num_heads})."
            )
        if llm_hidden_size < 2:
            raise ValueError(
                f"UpstreamSlotMapper: llm_hidden_size must be >= 2 (the confidence head halves "
                f"it); got {llm_hidden_size}."
            )
        self.num_heads = num_heads
        self.head_dim = image_channels // num_heads
        self.upsample = upsample
        self.querybook_proj = nn.Linear(codebook_dim, llm_hidden_size, bias=False)
        self.ref_fuse = nn.Sequential(
            nn.LayerNorm(2 * llm_hidden_size),
            nn.Linear(2 * llm_hidden_size, llm_hidden_size),
            nn.SiLU(),
        )
        self.q_proj = nn.Linear(llm_hidden_size, image_channels, bias=False)
        self.k_proj = nn.Conv2d(image_channels, image_channels, kernel_size=1, bias=False)
        self.fuser = nn.Sequential(
            nn.Conv2d(num_heads, num_heads, kernel_size=3, padding=1),
            nn.SiLU(),
            _BiasStartConv2d(num_heads, 1, kernel_size=3, padding=1, bias_start=fuser_bias_init),
        )
        self.conf_head = nn.Sequential(
            nn.LayerNorm(llm_hidden_size),
            nn.Linear(llm_hidden_size, llm_hidden_size // 2),
            nn.SiLU(),
            nn.Linear(llm_hidden_size // 2, 1),
        )

    def forward(
        self,
        slots: torch.Tensor,
        ref_hidden_states: torch.Tensor,
        image_embeddings: torch.Tensor,
    ) -> SlotMapperOutput:
        """
        Args:
            slots: (B, K, d_q) from the query codebook.
            ref_hidden_states: (B, K, d) last-layer states at the `<REF_POS>` tokens (zeros
                where the completion has fewer than K of them).
            image_embeddings: (B, C, E, E).
        """
        batch, num_slots = _check_inputs(
            "UpstreamSlotMapper", slots, ref_hidden_states, image_embeddings
        )
        _, _, height, width = image_embeddings.shape
        projected = self.querybook_proj(slots)  # (B, K, d)
        fused = self.ref_fuse(
            torch.cat([ref_hidden_states.to(projected.dtype), projected], dim=-1)
        )  # (B, K, d): the <REF_POS> state comes first in the concatenation
        queries = self.q_proj(fused).view(batch, num_slots, self.num_heads, self.head_dim)
        similarity = _head_similarity(queries, self.k_proj(image_embeddings))
        heatmap = self.fuser(similarity)  # (B*K, 1, E, E)
        heatmap = F.interpolate(
            heatmap,
            size=(height * self.upsample, width * self.upsample),
            mode="bilinear",
            align_corners=False,
        )  # (B*K, 1, 4E, 4E)
        heatmap = heatmap.view(batch, num_slots, height * self.upsample, width * self.upsample)
        conf = self.conf_head(fused).squeeze(-1)  # (B, K)
        return SlotMapperOutput(
            heatmap_logits=heatmap,
            conf_logits=conf,
            similarity=similarity.view(batch, num_slots, self.num_heads, height, width),
            queries=fused,
        )


__all__ = ["SlotMapper", "SlotMapperOutput", "UpstreamSlotMapper"]
