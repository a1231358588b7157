"""QueryCodebook: sparse SAE codes of every token -> K slot vectors (arXiv 2605.22658, data flow step 3).

The reference projects the dense (B, L, d_sae) activation matrix through a bias-free
codebook (d_sae -> d_q). Only the active latents contribute to that product, so here the
projection is an embedding-bag over the active (index, value) pairs: the same numbers
without the dense matrix (`sparse=False` keeps the dense path for tests and benchmarks).

`readout_pairs=m` (an option, not the paper's) concentrates each slot on m (token, concept)
pairs: the encoder's slot state only chooses and weighs them, and the slot vector is built
from the codebook rows of those m pairs alone, so removing them removes what the slot read.

This file travels with saved models (remote code): it imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QueryCodebookOutput:
    """Output of [`QueryCodebook`].

    Attributes:
        slots: (B, K, d_q) slot vectors, one per `<REF_POS>` slot.
        slot_token_attention: (B, K, L) attention of each slot over the tokens in the last
            encoder layer, averaged over heads (rows sum to 1 over unpadded tokens).
        slot_concept_weights: (B, K, L, n) how much each (token, active concept) pair fed
            each slot: attention to the token times the concept's activation on it. With
            `readout_pairs` it is exact: the slot is ``out_norm(out_proj(sum w * codebook
            row))`` over the pairs, and at most `readout_pairs` entries of a slot are non-zero.
        token_embeddings: (B, L, d_q) codebook projection of each token's sparse code.
    """

    slots: torch.Tensor
    slot_token_attention: torch.Tensor
    slot_concept_weights: torch.Tensor
    token_embeddings: torch.Tensor


class QueryCodebook(nn.Module):
    """K learnable slot queries gather concepts from the codebook-projected sparse codes.

    The encoder layers are `nn.TransformerEncoderLayer` modules (pre-norm, batch-first) so
    that parameter names match a PyTorch reference; the forward is spelled out here to
    return the last layer's slot attention for interpretability, and it runs the last layer
    on the K slot rows only (queries and feed-forward; keys and values from every row), the
    only rows the slots read.

    Args:
        d_sae: number of SAE latents (rows of the codebook).
        codebook_dim: slot width d_q.
        num_slots: K.
        num_layers, num_heads, ffn_dim, dropout: the transformer encoder.
        readout_pairs: None (the paper's readout: the slot is the encoder's output) or m >= 1:
            each slot reads only its m highest-scoring (token, concept) pairs (see the module
            docstring).
    """

    def __init__(
        self,
        *,
        d_sae: int,
        codebook_dim: int,
        num_slots: int,
        num_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        readout_pairs: int | None = None,
    ) -> None:
        super().__init__()
        if readout_pairs is not None and (
            isinstance(readout_pairs, bool)
            or not isinstance(readout_pairs, int)
            or readout_pairs < 1
        ):
            raise ValueError(
                f"QueryCodebook: readout_pairs must be None (dense readout) or an int >= 1, got "
                f"{readout_pairs!r}."
            )
        self.readout_pairs = readout_pairs
        if codebook_dim % num_heads:
            raise ValueError(
                f"QueryCodebook: codebook_dim ({codebook_dim}) must be divisible by num_heads "
                f"({num_heads})."
            )
        self.d_sae = d_sae
        self.codebook_dim = codebook_dim
        self.num_slots = num_slots
        self.num_heads = num_heads
        # (d_sae, d_q): row i is latent i's embedding. The reference's nn.Linear(d_sae, d_q,
        # bias=False) stores the transpose; `load_reference_linear_weight` converts.
        self.codebook = nn.Parameter(torch.empty(d_sae, codebook_dim))
        self.slot_queries = nn.Parameter(torch.empty(num_slots, codebook_dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=codebook_dim,
                nhead=num_heads,
                dim_feedforward=ffn_dim,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(codebook_dim)
        if readout_pairs is not None:
            # pair score = <pair_query(slot state), pair_key(activation x codebook row)>
            self.pair_query = nn.Linear(codebook_dim, codebook_dim)
            self.pair_key = nn.Linear(codebook_dim, codebook_dim, bias=False)
            self.pair_out = nn.Linear(codebook_dim, codebook_dim)
            self.pair_norm = nn.LayerNorm(codebook_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Codes of a unit-norm SAE are O(1) and ~k are active per token: scale rows so a
        # token's projection starts at unit scale.
        nn.init.normal_(self.codebook, std=self.codebook_dim**-0.5)
        nn.init.normal_(self.slot_queries, std=0.02)

    @torch.no_grad()
    def load_reference_linear_weight(self, weight: torch.Tensor) -> None:
        """Load a reference `nn.Linear(d_sae, d_q, bias=False).weight` of shape (d_q, d_sae)."""
        expected = (self.codebook_dim, self.d_sae)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"QueryCodebook: reference codebook weight must have shape {expected} "
                f"(d_q, d_sae), got {tuple(weight.shape)}."
            )
        self.codebook.copy_(weight.t())

    def project(
        self,
        indices: torch.Tensor,
        values: torch.Tensor,
        *,
        sparse: bool = True,
    ) -> torch.Tensor:
        """Codebook projection of sparse codes: sum_j values[..., j] * codebook[indices[..., j]].

        Args:
            indices: (B, L, n) active latent ids.
            values: (B, L, n) their activations (0 marks padding).
            sparse: embedding-bag (True) or the reference's dense product (False).

        Returns:
            (B, L, d_q) token embeddings.
        """
        batch, length, n = indices.shape
        if not sparse:
            dense = values.new_zeros(batch, length, self.d_sae)
            dense.scatter_add_(-1, indices, values)  # (B, L, d_sae), as the reference holds it
            return dense @ self.codebook.to(values.dtype)
        flat_idx = indices.reshape(batch * length, n)  # (B*L, n)
        flat_val = values.reshape(batch * length, n).to(self.codebook.dtype)
        out = F.embedding_bag(flat_idx, self.codebook, per_sample_weights=flat_val, mode="sum")
        return out.reshape(batch, length, self.codebook_dim).to(values.dtype)  # (B, L, d_q)

    def forward(
        self,
        indices: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        sparse: bool = True,
    ) -> QueryCodebookOutput:
        """Gather concepts into K slots.

        Args:
            indices: (B, L, n) active latent ids per token.
            values: (B, L, n) activations.
            attention_mask: (B, L) 1 for real tokens, 0 for padding.
            sparse: see `project`.
        """
        if indices.shape != values.shape or indices.dim() != 3:
            raise ValueError(
                "QueryCodebook: indices and values must both be (B, L, n); got "
                f"{tuple(indices.shape)} and {tuple(values.shape)}."
            )
        batch, length, _ = indices.shape
        tokens = self.project(indices, values, sparse=sparse)  # (B, L, d_q)
        queries = self.slot_queries.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)
        hidden = torch.cat([queries, tokens], dim=1)  # (B, K+L, d_q)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
        token_pad = ~attention_mask.bool()  # (B, L) True = ignore
        key_padding = torch.cat(
            [torch.zeros(batch, self.num_slots, dtype=torch.bool, device=tokens.device), token_pad],
            dim=1,
        )  # (B, K+L)
        slot_attention = None
        for layer in self.layers[:-1]:
            normed = layer.norm1(hidden)
            attn_out, _ = layer.self_attn(
                normed, normed, normed, key_padding_mask=key_padding, need_weights=False
            )
            hidden = hidden + layer.dropout1(attn_out)
            hidden = hidden + layer._ff_block(layer.norm2(hidden))
        if len(self.layers):
            # only the slot rows of the last layer's output are read: their attention over
            # every row and their feed-forward, not the token rows'
            hidden, weights = self._last_layer_slot_rows(self.layers[-1], hidden, key_padding)
            slot_attention = weights[:, :, self.num_slots :]  # (B, K, L)
            # share of each slot's token attention (slots also attend to each other)
            slot_attention = slot_attention / slot_attention.sum(-1, keepdim=True).clamp_min(1e-12)
        slots = self.final_norm(hidden[:, : self.num_slots])  # (B, K, d_q)
        if self.readout_pairs is not None:
            slots, concept_weights = self._read_pairs(slots, indices, values, attention_mask)
            slot_attention = concept_weights.sum(-1)  # (B, K, L)
            slot_attention = slot_attention / slot_attention.sum(-1, keepdim=True).clamp_min(1e-12)
        else:
            if slot_attention is None:  # zero encoder layers: uniform over real tokens
                mask = attention_mask.to(tokens.dtype)
                slot_attention = (mask / mask.sum(-1, keepdim=True).clamp_min(1)).unsqueeze(1)
                slot_attention = slot_attention.expand(-1, self.num_slots, -1)
            concept_weights = slot_attention.unsqueeze(-1) * values.unsqueeze(1)  # (B, K, L, n)
        return QueryCodebookOutput(
            slots=slots,
            slot_token_attention=slot_attention,
            slot_concept_weights=concept_weights,
            token_embeddings=tokens,
        )

    def _last_layer_slot_rows(
        self, layer: nn.TransformerEncoderLayer, hidden: torch.Tensor, key_padding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm encoder layer's output at the K slot rows, and their attention.

        The same numbers as `layer(hidden)[:, :K]` (queries from the slot rows, keys and values
        from every row), without the token rows' queries and feed-forward.

        Returns:
            (B, K, d_q) slot rows, (B, K, K+L) attention weights averaged over heads.
        """
        attn = layer.self_attn
        batch, rows, dim = hidden.shape
        heads, head_dim = attn.num_heads, dim // attn.num_heads
        normed = layer.norm1(hidden)
        w_q, w_kv = attn.in_proj_weight.split([dim, 2 * dim])
        b_q, b_kv = attn.in_proj_bias.split([dim, 2 * dim])
        # contiguous: F.linear on a strided 3-D view goes through matmul, whose GEMM choice
        # (and so the last bit) depends on whether the weight requires grad
        query = F.linear(normed[:, : self.num_slots].contiguous(), w_q, b_q)  # (B, K, d_q)
        key, value = F.linear(normed, w_kv, b_kv).chunk(2, dim=-1)  # (B, K+L, d_q) each
        query = query.view(batch, self.num_slots, heads, head_dim).transpose(1, 2)
        key = key.view(batch, rows, heads, head_dim).transpose(1, 2)
        value = value.view(batch, rows, heads, head_dim).transpose(1, 2)
        scores = (query * head_dim**-0.5) @ key.transpose(-1, -2)  # (B, h, K, K+L)
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1)
        dropped = F.dropout(weights, p=attn.dropout, training=self.training)
        out = (dropped @ value).transpose(1, 2).reshape(batch, self.num_slots, dim)
        slot_rows = hidden[:, : self.num_slots] + layer.dropout1(attn.out_proj(out))
        slot_rows = slot_rows + layer._ff_block(layer.norm2(slot_rows))
        return slot_rows, weights.mean(1)

    def _read_pairs(
        self,
        state: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot reads its `readout_pairs` best (token, concept) pairs and nothing else.

        Args:
            state: (B, K, d_q) the encoder's slot states (they score the pairs).
            indices, values: (B, L, n) the sparse codes; attention_mask: (B, L).

        Returns:
            slots (B, K, d_q) = pair_norm(pair_out(sum_p w_p * codebook[i_p])) over the chosen
            pairs p, and w (B, K, L, n): softmax weight of the pair times its activation, zero
            outside the chosen pairs.
        """
        batch, length, n = indices.shape
        pairs = length * n
        dtype = state.dtype
        codebook = self.codebook.to(dtype)
        flat_idx = indices.reshape(batch, 1, pairs).expand(-1, self.num_slots, -1)  # (B, K, P)
        vals = values.to(dtype).reshape(batch, 1, pairs)
        active = (vals != 0) & attention_mask.bool().reshape(batch, 1, length, 1).expand(
            -1, -1, -1, n
        ).reshape(batch, 1, pairs)
        # <pair_query(s), pair_key(a * row_i)> = a * <pair_key^T pair_query(s), row_i>: score
        # every latent once per slot, then read each pair's score from that table
        query = self.pair_query(state) @ self.pair_key.weight.to(dtype)  # (B, K, d_q)
        table = query @ codebook.t()  # (B, K, d_sae)
        scores = table.gather(-1, flat_idx) * vals * self.codebook_dim**-0.5  # (B, K, P)
        scores = scores.masked_fill(~active, float("-inf"))
        m = min(self.readout_pairs, pairs)
        top = scores.topk(m, dim=-1)  # (B, K, m)
        chosen = torch.isfinite(top.values)
        attn = torch.where(chosen, top.values, torch.full_like(top.values, -1e4)).softmax(-1)
        attn = attn * chosen.to(dtype)  # no active pair -> an empty slot
        # weight of codebook row i_p in the slot
        coeff = attn * vals.expand(-1, self.num_slots, -1).gather(-1, top.indices)  # (B, K, m)
        chosen_rows = codebook[flat_idx.gather(-1, top.indices)]  # (B, K, m, d_q)
        read = torch.einsum("bkm,bkmd->bkd", coeff, chosen_rows)
        slots = self.pair_norm(self.pair_out(read))
        weights = coeff.new_zeros(batch, self.num_slots, pairs)
        weights = weights.scatter(-1, top.indices, coeff).reshape(batch, self.num_slots, length, n)
        return slots, weights


def codebook_token_mask(
    config: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, L) bool: the tokens the codebook reads under ``config.codebook_span_start_token_id``.

    None: every unpadded token (the paper). A token id: in each row, the tokens after the
    last occurrence of that token, up to the next of ``config.codebook_span_end_token_ids``
    (exclusive; default `</think>` and `<REF_POS>`); a row without the token, or with
    nothing between it and the end, is read whole.
    """
    mask = attention_mask.bool()
    start = getattr(config, "codebook_span_start_token_id", None)
    if start is None:
        return mask
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
    last_start = torch.where(input_ids == start, positions, -1).amax(dim=1, keepdim=True)
    after = positions > last_start  # (B, L)
    stops = getattr(config, "codebook_span_end_token_ids", None)
    if stops is None:
        stops = [config.think_end_token_id, config.ref_token_id]
    is_stop = torch.zeros_like(after)
    for token in (t for t in stops if t is not None):
        is_stop |= input_ids == token
    end = torch.where(is_stop & after, positions, length).amin(dim=1, keepdim=True)
    span = after & (positions < end) & mask
    found = (last_start >= 0) & span.any(dim=1, keepdim=True)
    return torch.where(found, span, mask)


__all__ = ["QueryCodebook", "QueryCodebookOutput", "codebook_token_mask"]
