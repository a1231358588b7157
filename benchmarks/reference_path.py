"""The reference-style SegCompass forward, re-enacted on the modules of this package's model.

Upstream SegCompass (github.com/ZhenyuLU-Heliodore/SegCompass, `verl/modeling.py`,
`VLRefSegCore.forward` / `_forward_seg` and `QueryBookAttnHead`, called from
`verl/workers/actor/dp_actor.py::_forward_micro_batch`) computes one segmentation forward as:

1. the full causal LM with `output_hidden_states=True` (every layer kept, full-vocabulary
   logits); the `<REF_POS>` states are read from the last hidden state;
2. the full causal LM a second time, again with `output_hidden_states=True`, on
   `sae_input_ids` (the same prompt + response tokens in another padding layout, built by
   `verl/utils/rl_dataset.py::build_sae_llm_inputs`); the SAE input is one entry of that
   tuple;
3. `SAE.forward`: dense encode AND decode; the reconstruction is discarded
   (`sae_embeds, _ = self.sae(sae_in)`);
4. the query book zeroes dense codes with |a| < threshold and applies a dense bias-free
   `nn.Linear(d_sae, d_q)` to the (B, L, d_sae) matrix, prepends K slot queries and runs an
   `nn.TransformerEncoder` (pre-norm) with the attention mask as key padding;
5. the heatmap head; the prompt encoder on all B*K heatmaps at once;
6. SAM's mask decoder once per image in a Python loop (each call decodes that image's K
   prompts).

Everything here uses the very modules and weights of a `SegCompassForReasoningSegmentation`,
so both paths compute the same numbers and only the data flow differs. Choices of upstream
that do not change the cost are not re-enacted: its slot order (latest `<REF_POS>` first; the
package's order is used so that the outputs can be compared), the -50 fill of heatmap logits
outside the unpadded image, bf16 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modeling_segcompass.losses import language_model_loss
from modeling_segcompass.modeling_segcompass import (
    SegCompassForReasoningSegmentation,
    gather_ref_hidden_states,
)
from modeling_segcompass.query_codebook import QueryCodebook
from modeling_segcompass.sparse_autoencoder import SparseAutoencoder


@dataclass
class ReferenceSaeOutput:
    """Upstream `SAE.forward` on hidden states (..., d_in).

    Attributes:
        codes: (..., d_sae) dense activations (before the query book's threshold).
        reconstruction: (..., d_in) the decoded output upstream computes and discards.
    """

    codes: torch.Tensor
    reconstruction: torch.Tensor


@dataclass
class ReferenceOutput:
    """Output of [`reference_forward`]; fields as in `SegCompassOutput`.

    Attributes:
        logits: (B, L, V) from the first LM pass.
        heatmap_logits: (B, K, M, M).
        conf_logits: (B, K).
        mask_logits: (B, K, M, M).
        iou_scores: (B, K).
        slots: (B, K, d_q) query-book slot vectors.
    """

    logits: torch.Tensor
    heatmap_logits: torch.Tensor
    conf_logits: torch.Tensor
    mask_logits: torch.Tensor
    iou_scores: torch.Tensor
    slots: torch.Tensor


def reference_sae(sae: SparseAutoencoder, hidden_states: torch.Tensor) -> ReferenceSaeOutput:
    """SAELens-style `SAE.forward`: dense codes of every position, then the dense decode.

    Args:
        sae: the package's SAE (same parameters: W_enc, b_enc, W_dec, b_dec, threshold).
        hidden_states: (..., d_in).
    """
    if sae.max_active is not None:
        raise ValueError(
            "reference_sae: the reference SAE has no `max_active` cap; build the SAE with "
            f"max_active=None (got {sae.max_active})."
        )
    # SAELens `encode`: `sae_in @ W_enc + b_enc` out of place, the whole (..., d_sae) at once
    # (not `sae.pre_activations`, which adds the bias in place to save that second buffer).
    sae_in = hidden_states.to(sae.W_enc.dtype)
    if sae.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec
    pre = sae_in @ sae.W_enc + sae.b_enc  # (..., d_sae)
    if sae.architecture == "topk":
        top = pre.topk(sae.k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    elif sae.architecture == "jumprelu":
        codes = pre * (pre > sae.threshold.relu()).to(pre.dtype)
    else:  # relu, SAELens "standard"
        codes = F.relu(pre)
    reconstruction = codes @ sae.W_dec + sae.b_dec  # (..., d_in), discarded upstream
    return ReferenceSaeOutput(codes=codes, reconstruction=reconstruction)


def reference_codebook_tokens(
    codebook: QueryCodebook, dense_codes: torch.Tensor, activation_threshold: float
) -> torch.Tensor:
    """The query book's first stage: threshold the dense codes, then the dense projection.

    Args:
        dense_codes: (B, L, d_sae).
    Returns:
        (B, L, d_q): `masked_fill(|a| < threshold, 0) @ codebook` (upstream's Linear weight is
        the transpose of `codebook.codebook`).
    """
    if activation_threshold > 0:
        dense_codes = dense_codes.masked_fill(dense_codes.abs() < activation_threshold, 0.0)
    return dense_codes @ codebook.codebook.to(dense_codes.dtype)  # (B, L, d_q)


def reference_codebook_slots(
    codebook: QueryCodebook, tokens: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Slot queries prepended, the encoder layers run as plain modules, final norm.

    Args:
        tokens: (B, L, d_q) codebook projections.
        attention_mask: (B, L) 1 = token, 0 = padding.
    Returns:
        (B, K, d_q) slot vectors.
    """
    batch = tokens.shape[0]
    queries = codebook.slot_queries.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)
    hidden = torch.cat([queries, tokens], dim=1)  # (B, K+L, d_q)
    padding = torch.cat(
        [
            torch.zeros(batch, codebook.num_slots, dtype=torch.bool, device=tokens.device),
            ~attention_mask.bool(),
        ],
        dim=1,
    )  # (B, K+L) True = ignore
    for layer in codebook.layers:
        hidden = layer(hidden, src_key_padding_mask=padding)
    return codebook.final_norm(hidden[:, : codebook.num_slots])  # (B, K, d_q)


def reference_decode_masks(
    model: SegCompassForReasoningSegmentation,
    heatmap_logits: torch.Tensor,
    image_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder over all B*K heatmaps, then the mask decoder once per image.

    Args:
        heatmap_logits: (B, K, M, M).
        image_embeddings: (B, C, E, E).
    Returns:
        mask logits (B, K, M, M) and predicted IoU (B, K).
    """
    batch, num_slots, size, _ = heatmap_logits.shape
    _, dense = model.prompt_encoder(
        input_points=None,
        input_labels=None,
        input_boxes=None,
        input_masks=heatmap_logits.reshape(batch * num_slots, 1, size, size),
    )  # (B*K, C, E, E)
    positional = model.image_positional_embeddings().to(image_embeddings.dtype)
    masks, scores = [], []
    for i in range(batch):
        # One image, its K prompts (segment-anything repeats the image over the prompts
        # inside MaskDecoder.predict_masks; transformers' decoder takes it repeated).
        image = image_embeddings[i : i + 1].repeat_interleave(num_slots, dim=0)  # (K, C, E, E)
        low_res, iou = model.mask_decoder(
            image_embeddings=image,
            image_positional_embeddings=positional.expand(num_slots, -1, -1, -1),
            sparse_prompt_embeddings=None,
            dense_prompt_embeddings=dense[i * num_slots : (i + 1) * num_slots],
            multimask_output=False,
        )  # (K, 1, 1, M, M), (K, 1, 1)
        masks.append(low_res.reshape(num_slots, low_res.shape[-2], low_res.shape[-1]))
        scores.append(iou.reshape(num_slots))
    return torch.stack(masks), torch.stack(scores)  # (B, K, M, M), (B, K)


def reference_forward(
    model: SegCompassForReasoningSegmentation,
    *,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    sam_pixel_values: torch.Tensor | None = None,
) -> ReferenceOutput:
    """One segmentation forward the upstream way (module docstring, steps 1-6).

    Args:
        input_ids, attention_mask: (B, L) prompt + response with `<REF_POS>` tokens.
        pixel_values, image_grid_thw: the VLM's image inputs.
        image_embeddings: (B, C, E, E) precomputed (upstream caches SAM embeddings), or
        sam_pixel_values: (B, 3, S, S) to run the model's image encoder.
    """
    cfg = model.config
    num_layers = cfg.vlm_text_config.num_hidden_layers
    if not 0 <= cfg.sae_layer < num_layers - 1:
        raise ValueError(
            f"reference_forward: sae_layer must be in [0, {num_layers - 2}] so that its output "
            f"is an un-normalised entry of `hidden_states`; got {cfg.sae_layer}."
        )
    vlm_inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "use_cache": False,
        "output_hidden_states": True,
    }
    if image_grid_thw is not None:
        vlm_inputs["image_grid_thw"] = image_grid_thw

    # 1. First LM pass: logits and every hidden state; <REF_POS> states from the last one.
    first = model.vlm(**vlm_inputs)
    ref_states, _ = gather_ref_hidden_states(
        first.hidden_states[-1], input_ids, cfg.ref_token_id, cfg.num_slots
    )
    # 2. Second LM pass for the SAE input. hidden_states[0] is the embedding output, so the
    #    output of decoder layer `sae_layer` is entry sae_layer + 1.
    second = model.vlm(**vlm_inputs)
    sae_input = second.hidden_states[cfg.sae_layer + 1]  # (B, L, d)
    # 3. Dense encode + decode (reconstruction unused).
    sae_out = reference_sae(model.sae, sae_input)
    # 4. Query book on the dense codes.
    tokens = reference_codebook_tokens(
        model.codebook, sae_out.codes, model.sae.activation_threshold
    )
    slots = reference_codebook_slots(model.codebook, tokens, attention_mask)
    # 5-6. Heatmaps, then masks with the per-image decoder loop.
    if image_embeddings is None:
        image_embeddings = model.encode_image(sam_pixel_values)
    mapped = model.slot_mapper(slots, ref_states, image_embeddings)
    mask_logits, iou_scores = reference_decode_masks(model, mapped.heatmap_logits, image_embeddings)
    return ReferenceOutput(
        logits=first.logits,
        heatmap_logits=mapped.heatmap_logits,
        conf_logits=mapped.conf_logits,
        mask_logits=mask_logits,
        iou_scores=iou_scores,
        slots=slots,
    )


def reference_loss(
    model: SegCompassForReasoningSegmentation,
    output: ReferenceOutput,
    *,
    labels: torch.Tensor,
    gt_masks: torch.Tensor,
    num_objects: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss `SegCompassForReasoningSegmentation.forward` computes, from a reference output.

    LM cross-entropy (the stand-in for the policy loss: same logits, same cost) + seg + conf,
    with the config's weights. The joint SAE reconstruction term is not part of upstream's
    actor loss, so the config must have `sae_reconstruction_weight == 0`.
    """
    cfg = model.config
    if cfg.sae_reconstruction_weight != 0:
        raise ValueError(
            "reference_loss: set sae_reconstruction_weight=0 to compare losses; upstream's "
            f"actor loss has no SAE term (got {cfg.sae_reconstruction_weight})."
        )
    # the package's loss with the config's weights and matching cost (tiny presets: order prior 1)
    seg = model.segmentation_loss(
        output.heatmap_logits, output.mask_logits, output.conf_logits, output.iou_scores,
        gt_masks, num_objects, valid_mask,
    )  # fmt: skip
    lm = language_model_loss(labels, model.vlm.lm_head, logits=output.logits)
    return (
        cfg.lm_loss_weight * lm
        + cfg.seg_loss_weight * seg.seg_loss
        + cfg.conf_loss_weight * seg.conf_loss
    )


__all__ = [
    "ReferenceOutput",
    "ReferenceSaeOutput",
    "reference_codebook_slots",
    "reference_codebook_tokens",
    "reference_decode_masks",
    "reference_forward",
    "reference_loss",
    "reference_sae",
]
