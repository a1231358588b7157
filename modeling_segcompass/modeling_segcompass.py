"""SegCompassForReasoningSegmentation: the whole forward, top to bottom.

One VLM pass gives both the SAE input (hidden states at `sae_layer`, captured by a hook,
not by keeping every layer) and the last-layer states at the `<REF_POS>` tokens. The
reference runs the LLM twice for these and decodes the SAE output it never uses; this
does one pass and encodes only (same numbers for the same weights).

This file travels with saved models (remote code): it imports only torch, transformers
and its flat siblings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, PreTrainedModel
from transformers import initialization as init
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPromptEncoder,
    SamVisionEncoder,
)
from transformers.utils import ModelOutput

from .answer_format import grounding_problem
from .configuration_segcompass import SegCompassConfig
from .conv_image_encoder import ConvImageEncoder
from .input_checks import (
    check_forward_inputs,
    check_forward_outputs,
    check_forward_values,
    check_segment_results,
    values_are_checked,
)
from .loading import load_safely, tidy_saved_folder
from .losses import (
    SegmentationLossOutput,
    language_model_loss,
    sae_reconstruction_loss,
    segmentation_loss_from_config,
)
from .mask_decoding import decode_single_masks, embed_dense_prompts
from .precision import cast_to_dtype, floating_dtype
from .query_codebook import QueryCodebook, codebook_token_mask
from .slot_mapper import SlotMapper, UpstreamSlotMapper
from .sparse_autoencoder import SparseAutoencoder
from .vlm_states import (
    _decoder_layers,
    batch_vision_windows,
    fill_outside_image,
    gather_ref_hidden_states,
)

#: "auto" images per decoder call: bytes of one call's (b*K, C, E, E) prompt + image sum per
#: device type: a CPU's cache-sized 16 MiB (SAM size: 4 prompts), a GPU's 256 MiB.
DECODER_CALL_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}


@dataclass
class SegCompassOutput(ModelOutput):
    """Output of [`SegCompassForReasoningSegmentation.forward`].

    B = batch, L = sequence length, V = vocabulary, K = slots, n = active latents per
    token, M = 4E = mask grid side (256 for real SAM, 64 for the tiny default).

    Attributes:
        loss: () weighted sum of the losses below that could be computed (None without targets).
        lm_loss: () next-token cross-entropy on `labels` (None without labels).
        seg_loss: () heatmap BCE + Dice, mask Dice + focal, IoU-head MSE on matched slots.
        conf_loss: () per-slot confidence BCE (targets from Hungarian matching).
        sae_loss: () SAE reconstruction MSE normalised by the input variance (joint training).
        logits: (B, L, V) language-model logits at every position. None when
            `compute_logits=False`, and by default (`compute_logits=None`) when `labels` are
            given: the LM loss then projects only the labelled positions through the LM head
            (pass `compute_logits=True` to also get the full logits).
        heatmap_logits: (B, K, M, M) where each slot points.
        conf_logits: (B, K) does each slot hold an object (kept when >= slot_confidence_threshold).
        mask_logits: (B, K, M, M) SAM mask-decoder logits per slot (foreground > 0).
        iou_scores: (B, K) the mask decoder's predicted IoU per slot.
        ref_hidden_states: (B, K, d) last-layer states at the last K `<REF_POS>` tokens, zeros
            where the sequence holds fewer.
        ref_mask: (B, K) True where slot k has a `<REF_POS>` token.
        concept_indices: (B, L, n) active SAE latents per token.
        concept_values: (B, L, n) their activations (0 = inactive / padding).
        slot_concept_weights: (B, K, L, n) how much each (token, concept) fed each slot.
        slot_token_attention: (B, K, L) last codebook layer's slot attention over tokens.
        image_embeddings: (B, C, E, E) the image embedding the masks were decoded from.
        slot_to_target: (B, K) matched ground-truth index per slot, -1 if none (with gt_masks).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    seg_loss: torch.Tensor | None = None
    conf_loss: torch.Tensor | None = None
    sae_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    heatmap_logits: torch.Tensor | None = None
    conf_logits: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None
    ref_hidden_states: torch.Tensor | None = None
    ref_mask: torch.Tensor | None = None
    concept_indices: torch.Tensor | None = None
    concept_values: torch.Tensor | None = None
    slot_concept_weights: torch.Tensor | None = None
    slot_token_attention: torch.Tensor | None = None
    image_embeddings: torch.Tensor | None = None
    slot_to_target: torch.Tensor | None = None


#: `answer_format.grounding_problem` under the name this module has always exported.
completion_format_problem = grounding_problem


class SegCompassPreTrainedModel(PreTrainedModel):
    config_class = SegCompassConfig
    config: SegCompassConfig
    base_model_prefix = "segcompass"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # the forward returns a mean loss already; **vlm_kwargs must not receive Trainer's
    # num_items_in_batch (and gradient accumulation must still divide the loss)
    accepts_loss_kwargs = False
    output_modalities = ("text", "image")
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = [
        "SamVisionLayer",
        "SparseAutoencoder",
        "QueryCodebook",
        "SlotMapper",
        "UpstreamSlotMapper",
    ]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        torch_default = getattr(self, "_torch_default_init_ids", set())
        if id(module) in torch_default and hasattr(module, "reset_parameters"):
            # The new heads and a from-scratch SAM use PyTorch's default (fan-in scaled)
            # init, as the original SAM does; transformers' N(0, 0.02) leaves the conv/heatmap
            # path with near-zero activations and gradients. Loaded tensors are never touched.
            if not any(getattr(p, "_is_hf_initialized", False) for p in module.parameters(False)):
                module.reset_parameters()
            return
        super()._init_weights(module)
        if isinstance(module, SparseAutoencoder):
            if not getattr(module.W_dec, "_is_hf_initialized", False):
                module.reset_parameters()
        elif isinstance(module, QueryCodebook):
            init.normal_(module.codebook, std=module.codebook_dim**-0.5)
            init.normal_(module.slot_queries, std=std)
        elif isinstance(module, SamPositionalEmbedding):
            init.normal_(module.positional_embedding, std=module.scale)
        decoder = getattr(self, "mask_decoder", None)
        if decoder is not None and (module is decoder.iou_token or module is decoder.mask_tokens):
            # The original SAM leaves these at nn.Embedding's N(0, 1). With transformers' 0.02
            # the output tokens start nearly identical, so the image-to-token attention gets
            # no usable gradient when SAM is trained from scratch (the tiny default).
            init.normal_(module.weight, std=1.0)

    def cast_to_dtype(self, dtype: torch.dtype | str) -> SegCompassPreTrainedModel:
        """Cast in place to `dtype` exactly as `from_pretrained(path, dtype=dtype)` loads
        (RoPE buffers stay float32; see `precision.cast_to_dtype`). Returns the model."""
        return cast_to_dtype(self, dtype)


class SegCompassForReasoningSegmentation(SegCompassPreTrainedModel):
    """SegCompass: a VLM reasons, an SAE exposes its concepts, slots ground them, SAM masks.

    Submodules: `vlm` (any image-text-to-text model), `sae` ([`SparseAutoencoder`]),
    `codebook` ([`QueryCodebook`]), `slot_mapper` ([`SlotMapper`], or [`UpstreamSlotMapper`]
    with `slot_mapper_type="upstream"`), `image_encoder`
    (`SamVisionEncoder`, [`ConvImageEncoder`] or None), `prompt_encoder` / `mask_decoder`
    (transformers' `SamPromptEncoder` / `SamMaskDecoder`, same parameter names as SAM).
    """

    def __init__(self, config: SegCompassConfig) -> None:
        super().__init__(config)
        sam = config.sam_config
        # SAM's sub-modules are plain nn.Modules: hand them the attention choice ourselves.
        sam.mask_decoder_config._attn_implementation = config._attn_implementation
        self.vlm = AutoModelForImageTextToText.from_config(config.vlm_config)
        batch_vision_windows(self.vlm)  # one attention call per run of equal windows
        self.sae = SparseAutoencoder(
            d_in=config.llm_hidden_size,
            d_sae=config.d_sae,
            architecture=config.sae_architecture,
            k=config.sae_k,
            apply_b_dec_to_input=config.sae_apply_b_dec_to_input,
            jumprelu_init_threshold=config.sae_jumprelu_init_threshold,
            activation_threshold=config.activation_threshold,
            max_active=config.sae_max_active,
        )
        self.codebook = QueryCodebook(
            d_sae=config.d_sae,
            codebook_dim=config.codebook_dim,
            num_slots=config.num_slots,
            num_layers=config.codebook_layers,
            num_heads=config.codebook_heads,
            ffn_dim=config.codebook_ffn_dim,
            dropout=config.codebook_dropout,
            readout_pairs=config.codebook_readout_pairs,
        )
        mapper_dims = {
            "codebook_dim": config.codebook_dim,
            "llm_hidden_size": config.llm_hidden_size,
            "image_channels": config.image_embedding_channels,
            "num_heads": config.slot_mapper_heads,
            "upsample": 4,
        }
        if config.slot_mapper_type == "upstream":
            self.slot_mapper = UpstreamSlotMapper(**mapper_dims)
        else:
            self.slot_mapper = SlotMapper(**mapper_dims, fuser_channels=config.slot_fuser_channels)
        if config.image_encoder_type == "sam":
            self.image_encoder = SamVisionEncoder(sam.vision_config)
        elif config.image_encoder_type == "conv":
            self.image_encoder = ConvImageEncoder(
                out_channels=config.image_embedding_channels, width=config.conv_encoder_width
            )
        else:
            self.image_encoder = None
        self.prompt_encoder = SamPromptEncoder(sam)
        self.mask_decoder = SamMaskDecoder(sam.mask_decoder_config)
        # Heatmaps enter SAM only as dense mask prompts: the point/box/no-mask embeddings and
        # the multimask hypernetworks are never used, so they are frozen (DDP and "every
        # trainable parameter learns" both need that). They keep SAM's names for loading.
        for module in (
            *self.prompt_encoder.point_embed,
            self.prompt_encoder.not_a_point_embed,
            self.prompt_encoder.no_mask_embed,
            *self.mask_decoder.output_hypernetworks_mlps[1:],
        ):
            module.requires_grad_(False)
        self._torch_default_init_ids = {
            id(m)
            for part in (
                self.slot_mapper,
                self.image_encoder,
                self.prompt_encoder,
                self.mask_decoder,
            )
            if part is not None and not isinstance(part, PreTrainedModel)
            for m in part.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))
        }
        self._sae_capture: dict[str, torch.Tensor] = {}
        self._sae_hook = None
        self.post_init()

    # ------------------------------------------------------------------ helpers
    def get_input_embeddings(self) -> nn.Module:
        return self.vlm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.vlm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.vlm.get_output_embeddings()

    def image_positional_embeddings(self) -> torch.Tensor:
        """SAM's dense positional encoding of the E x E grid: (1, C, E, E)."""
        size = self.config.image_embedding_size
        pe = self.prompt_encoder.shared_embedding
        grid = torch.ones(
            (size, size),
            device=pe.positional_embedding.device,
            dtype=pe.positional_embedding.dtype,
        )
        y_embed = (grid.cumsum(dim=0) - 0.5) / size
        x_embed = (grid.cumsum(dim=1) - 0.5) / size
        encoding = pe(torch.stack([x_embed, y_embed], dim=-1))  # (E, E, C)
        return encoding.permute(2, 0, 1).unsqueeze(0)

    def encode_image(
        self, sam_pixel_values: torch.Tensor, *, deduplicate: bool | None = None
    ) -> torch.Tensor:
        """SAM-frame pixels (B, 3, S, S) -> image embedding (B, C, E, E).

        With `deduplicate` (default: while gradients are recorded, i.e. in a training step)
        identical images in the batch are encoded once and their embedding shared: a GRPO
        batch holds each prompt's image once per generation. The image encoders work on each
        image alone (no batch statistics), so the embeddings are those of encoding every row
        and the encoder's gradient is the sum over the copies (with SAM's attention dropout
        set above 0, the copies share one dropout draw). Finding the
        duplicates reads the pixels (one device synchronisation on a GPU), which is why
        inference, where batches rarely repeat an image, does not do it.
        """
        if deduplicate is None:
            deduplicate = torch.is_grad_enabled()
        batch = sam_pixel_values.shape[0]
        if deduplicate and batch > 1:
            distinct, inverse = torch.unique(
                sam_pixel_values.reshape(batch, -1), dim=0, return_inverse=True
            )
            if distinct.shape[0] < batch:
                shape = (distinct.shape[0], *sam_pixel_values.shape[1:])
                return self._run_image_encoder(distinct.reshape(shape))[inverse]
        return self._run_image_encoder(sam_pixel_values)

    def _run_image_encoder(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder on (B, 3, S, S) SAM-frame pixels, in its own precision."""
        if self.image_encoder is None:
            raise ValueError(
                "SegCompass: this model has image_encoder_type='none', so pass precomputed "
                "`image_embeddings` (B, C, E, E) instead of `sam_pixel_values`."
            )
        # The processor returns float32 pixels; the encoder runs in its own precision.
        dtype = floating_dtype(self.image_encoder)
        if dtype is not None and sam_pixel_values.is_floating_point():
            sam_pixel_values = sam_pixel_values.to(dtype)
        out = self.image_encoder(sam_pixel_values)
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state

    def _capture_hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._sae_capture["hidden"] = output[0] if isinstance(output, tuple) else output

    def images_per_decoder_call(self, batch: int, num_slots: int, device: torch.device) -> int:
        """Images whose K prompts one mask-decoder call takes (`max_images_per_decoder_call`:
        an int as is, None all `batch`, "auto" as many as keep the call's (b*K, C, E, E)
        prompt + image sum within `DECODER_CALL_BYTES` of the device type)."""
        chunk = self.config.max_images_per_decoder_call
        if chunk != "auto":
            return max(batch, 1) if chunk is None else chunk
        cfg = self.config
        dtype = floating_dtype(self.mask_decoder) or torch.float32
        per_image = num_slots * cfg.image_embedding_channels * cfg.image_embedding_size**2
        per_image *= torch.finfo(dtype).bits // 8
        budget = DECODER_CALL_BYTES.get(device.type, DECODER_CALL_BYTES["cpu"])
        return max(1, min(batch, budget // max(per_image, 1)))

    def decode_masks(
        self, heatmap_logits: torch.Tensor, image_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps as dense prompts through SAM's prompt encoder + mask decoder, batched.

        The prompt encoder takes all B*K heatmaps, the mask decoder the K prompts of
        `images_per_decoder_call` images per call; the split does not change the numbers.

        Args:
            heatmap_logits: (B, K, M, M).
            image_embeddings: (B, C, E, E).
        Returns:
            mask logits (B, K, M, M) and predicted IoU (B, K).
        """
        batch, num_slots, size, _ = heatmap_logits.shape
        dense = embed_dense_prompts(
            self.prompt_encoder.mask_embed, heatmap_logits.reshape(batch * num_slots, size, size)
        )  # (B*K, C, E*E), what SamPromptEncoder computes for input_masks
        dense = dense.unflatten(0, (batch, num_slots))  # (B, K, C, E*E)
        image_embeddings = image_embeddings.flatten(2)  # (B, C, E*E)
        positional = self.image_positional_embeddings()[0].flatten(1)  # (C, E*E)
        step = self.images_per_decoder_call(batch, num_slots, heatmap_logits.device)
        if step >= batch:
            return decode_single_masks(self.mask_decoder, dense, image_embeddings, positional)
        # split, not sliced: a slice's backward fills a zero (B, K, C, E*E) per call
        pairs = zip(dense.split(step), image_embeddings.split(step), strict=True)
        parts = [decode_single_masks(self.mask_decoder, d, e, positional) for d, e in pairs]
        return torch.cat([m for m, _ in parts]), torch.cat([u for _, u in parts])

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        sam_pixel_values: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        gt_masks: torch.Tensor | None = None,
        num_objects: torch.LongTensor | None = None,
        valid_mask: torch.Tensor | None = None,
        compute_logits: bool | None = None,
        sparse_codebook: bool | None = None,
        edit_concepts: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        **vlm_kwargs: Any,
    ) -> SegCompassOutput:
        r"""
        Args:
            input_ids (B, L): prompt + response with the `<REF_POS>` tokens.
            attention_mask (B, L): 1 for tokens, 0 for padding.
            pixel_values, image_grid_thw: the VLM's image inputs (Qwen2.5-VL format; other
                VLMs take their own keys through `**vlm_kwargs`).
            sam_pixel_values (B, 3, S, S): the SAM frame (resized, padded, normalised).
            image_embeddings (B, C, E, E): precomputed image embeddings (skip the encoder).
            labels (B, L): next-token targets, -100 outside the response.
            gt_masks (B, G, M, M): ground-truth masks on the mask grid.
            num_objects (B,): real masks per sample (0 = no target); default: the non-empty ones.
            valid_mask (B, M, M): True on the unpadded image area (losses ignore the rest;
                with `config.heatmap_outside_fill` set, SAM's heatmap prompts take that value
                outside it, while `heatmap_logits` and their losses stay unfilled).
            compute_logits: return the full LM logits (B, L, V): True always, False never,
                None (default) only without `labels` (with labels only the labelled positions
                are projected, for the LM loss: the saving of a training step).
            sparse_codebook: override `config.sparse_codebook` for this call.
            edit_concepts: `f(indices, values) -> (indices, values)` applied to the sparse codes
                (B, L, n) before the codebook, everything else unchanged: the hook for causal
                concept ablation / swapping (see `interpret.ablation.ablate_concepts`).
        """
        check_forward_inputs(
            self, input_ids, attention_mask, sam_pixel_values, image_embeddings, gt_masks,
            num_objects, valid_mask,
        )  # fmt: skip
        if values_are_checked(self, input_ids):
            check_forward_values(
                self, input_ids, sam_pixel_values, image_embeddings, gt_masks, num_objects,
                pixel_values=pixel_values,
            )  # fmt: skip
        if labels is not None and (
            not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape)
        ):
            raise ValueError(
                "SegCompassForReasoningSegmentation.forward: `labels` must be a tensor of the "
                f"shape of input_ids {tuple(input_ids.shape)}; got "
                f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}."
            )
        cfg = self.config
        if cfg.ref_token_id is None:
            raise ValueError(
                "SegCompassForReasoningSegmentation.forward: config.ref_token_id is not set (the "
                "tokenizer decides the id of <REF_POS>; presets leave it unset). Take the ids "
                "from the processor: `model.config.update(SegCompassConfig."
                "special_token_ids_from(processor))`, or assemble with from_backbones."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # 1. One VLM pass; the SAE input is captured at `sae_layer` by a hook.
        layer = _decoder_layers(self.vlm)[cfg.sae_layer]
        handle = layer.register_forward_hook(self._capture_hook)
        try:
            if image_grid_thw is not None:  # Qwen2-VL family; other VLMs do not take it
                vlm_kwargs["image_grid_thw"] = image_grid_thw
            base_out = self.vlm.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                use_cache=False,
                **vlm_kwargs,
            )
        finally:
            handle.remove()
        sae_input = self._sae_capture.pop("hidden")  # (B, L, d)
        last_hidden = base_out.last_hidden_state  # (B, L, d)
        full_logits = labels is None if compute_logits is None else bool(compute_logits)
        logits = self.vlm.lm_head(last_hidden) if full_logits else None  # (B, L, V)

        # 2. <REF_POS> states (last K per row, zeros where fewer).
        ref_states, ref_mask = gather_ref_hidden_states(
            last_hidden, input_ids, cfg.ref_token_id, cfg.num_slots, cfg.slot_order
        )

        # 3. Sparse concepts of every token; padding carries no concept. The reconstruction
        # loss's codes (of the detached input) come from the same selection.
        recon = cfg.sae_reconstruction_weight > 0 and (labels is not None or gt_masks is not None)
        pair = self.sae.encode_pair(sae_input) if recon else (self.sae.encode(sae_input), None)
        codes, recon_codes = pair
        token_mask = attention_mask.bool()
        concept_values = codes.values * token_mask.unsqueeze(-1).to(codes.values.dtype)
        concept_indices = codes.indices
        if edit_concepts is not None:
            concept_indices, concept_values = edit_concepts(concept_indices, concept_values)

        # 4. Slots gather concepts; 5. slots become heatmaps; 6. SAM turns them into masks.
        sparse = cfg.sparse_codebook if sparse_codebook is None else sparse_codebook
        read = codebook_token_mask(cfg, input_ids, attention_mask)  # every token (paper)
        book = self.codebook(concept_indices, concept_values, read, sparse=sparse)
        if image_embeddings is None:
            image_embeddings = self.encode_image(sam_pixel_values)
        else:  # precomputed (e.g. cached in float32): the mask path runs in its own precision
            image_embeddings = image_embeddings.to(floating_dtype(self.mask_decoder))
        mapper_refs = ref_states if cfg.slot_mapper_ref_input else torch.zeros_like(ref_states)
        if self.training and cfg.slot_mapper_ref_dropout > 0:  # per (sample, slot)
            keep = torch.rand(ref_states.shape[:2], device=ref_states.device)
            mapper_refs = mapper_refs * (keep >= cfg.slot_mapper_ref_dropout).unsqueeze(-1)
        mapped = self.slot_mapper(book.slots, mapper_refs, image_embeddings)
        prompts = fill_outside_image(mapped.heatmap_logits, valid_mask, cfg.heatmap_outside_fill)
        mask_logits, iou_scores = self.decode_masks(prompts, image_embeddings)
        if values_are_checked(self, input_ids):  # NaN / Inf outputs mean broken weights
            check_forward_outputs(self, mapped, mask_logits, iou_scores)

        # 7. Losses.
        losses: dict[str, torch.Tensor] = {}
        if labels is not None:
            losses["lm"] = language_model_loss(
                labels, self.vlm.lm_head, logits=logits, last_hidden=last_hidden
            )
        if recon:
            losses["sae"] = sae_reconstruction_loss(self.sae, sae_input, token_mask, recon_codes)
        slot_to_target = None
        if gt_masks is not None:
            seg = self.segmentation_loss(
                mapped.heatmap_logits, mask_logits, mapped.conf_logits, iou_scores,
                gt_masks, num_objects, valid_mask,
            )  # fmt: skip
            slot_to_target = seg.assignment.slot_to_target
            losses["seg"] = seg.seg_loss
            losses["conf"] = seg.conf_loss
        loss = None
        weights = {
            "lm": cfg.lm_loss_weight,
            "seg": cfg.seg_loss_weight,
            "conf": cfg.conf_loss_weight,
            "sae": cfg.sae_reconstruction_weight,
        }
        for name, value in losses.items():
            term = weights[name] * value
            loss = term if loss is None else loss + term

        return SegCompassOutput(
            loss=loss,
            lm_loss=losses.get("lm"),
            seg_loss=losses.get("seg"),
            conf_loss=losses.get("conf"),
            sae_loss=losses.get("sae"),
            logits=logits,
            heatmap_logits=mapped.heatmap_logits,
            conf_logits=mapped.conf_logits,
            mask_logits=mask_logits,
            iou_scores=iou_scores,
            ref_hidden_states=ref_states,
            ref_mask=ref_mask,
            concept_indices=concept_indices,
            concept_values=concept_values,
            slot_concept_weights=book.slot_concept_weights,
            slot_token_attention=book.slot_token_attention,
            image_embeddings=image_embeddings,
            slot_to_target=slot_to_target,
        )

    # ------------------------------------------------------------------ loss pieces
    def segmentation_loss(
        self,
        heatmap_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        conf_logits: torch.Tensor,
        iou_scores: torch.Tensor | None,
        gt_masks: torch.Tensor,
        num_objects: torch.Tensor | None = None,
        valid_mask: torch.Tensor | None = None,
    ) -> SegmentationLossOutput:
        """The forward's segmentation + confidence losses (`segmentation_loss_from_config` with this
        config's weights) for given outputs, e.g. a subset of a batch's rows.

        Args:
            heatmap_logits, mask_logits: (B, K, M, M); conf_logits, iou_scores: (B, K).
            gt_masks: (B, G, M, M); num_objects: (B,) (default: the non-empty masks);
            valid_mask: (B, M, M) or None.
        Returns:
            seg_loss, conf_loss and the slot assignment.
        """
        cfg = self.config
        # The losses are computed in float32 whatever the model's precision (as the LM loss):
        # sums over 256 x 256 masks lose the small terms in bfloat16.
        gt = gt_masks.float()
        if num_objects is None:
            num_objects = (gt.flatten(2) > 0.5).any(-1).sum(-1)
        # `training_step` (optimisation steps done; the trainers set it before each step,
        # a custom loop sets it itself) picks the weights of `config.loss_schedule_step`.
        return segmentation_loss_from_config(
            cfg,
            getattr(self, "training_step", 0),
            heatmap_logits=heatmap_logits.float(),
            mask_logits=mask_logits.float(),
            conf_logits=conf_logits.float(),
            gt_masks=gt,
            num_objects=num_objects,
            valid_mask=valid_mask,
            iou_predictions=None if iou_scores is None else iou_scores.float(),
        )

    # ------------------------------------------------------------------ generation
    def can_generate(self) -> bool:
        return True

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The VLM's `generate` (SAM-side inputs are dropped): writes the CoT and `<REF_POS>`."""
        for key in (
            "sam_pixel_values", "image_embeddings", "gt_masks", "num_objects", "valid_mask",
            "original_sizes", "reshaped_input_sizes", "labels", "edit_concepts",
        ):  # fmt: skip
            kwargs.pop(key, None)
        return self.vlm.generate(*args, **kwargs)

    # ------------------------------------------------------------------ inference
    def segment(
        self,
        images: Any,
        instructions: str | list[str],
        processor: Any = None,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        confidence_threshold: float | None = None,
        mask_threshold: float | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        strict_format: bool = True,
    ) -> list[Any]:
        """Segment what each instruction implies: generate the reasoning, then one forward.

        Returns one `SegmentationResult` per image; the arguments and the rules are
        `pipeline_segcompass.segment`'s, which does the work (the pipeline calls it too).
        Raises `ValueError` naming the broken parameters when the confidences or heatmaps are
        not finite (`input_checks.check_segment_results`).
        """
        from .pipeline_segcompass import segment

        results = segment(
            self,
            images,
            instructions,
            processor,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            confidence_threshold=confidence_threshold,
            mask_threshold=mask_threshold,
            generation_kwargs=generation_kwargs,
            strict_format=strict_format,
        )
        check_segment_results(self, results)
        return results

    # ------------------------------------------------------------------ assembling
    @classmethod
    def from_backbones(
        cls,
        vlm: Any,
        sam: Any,
        sae: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Assemble from an image-text-to-text VLM, a `facebook/sam-vit-*` SAM and an optional
        SAELens SAE (folders, Hub ids or loaded objects); returns ``(model, processor)``.

        See `modeling_segcompass.assembly.backbones.assemble_from_backbones` for the arguments
        (``num_slots``, ``dtype``, ``vlm_processor`` and any `SegCompassConfig` field as an
        override). Needs the installed package: a folder loaded with ``trust_remote_code``
        carries only the model files.
        """
        # Through importlib, not a relative import: this file is carried into saved folders,
        # and transformers takes any `from .x import` here for another file to carry.
        try:
            backbones = importlib.import_module("modeling_segcompass.assembly.backbones")
        except ImportError as error:
            if error.name and not error.name.startswith("modeling_segcompass"):
                raise  # the package is there; something it imports is not
            raise ImportError(
                "from_backbones needs the modeling_segcompass package installed "
                "(pip install modeling_segcompass, or pip install -e . from its repository); "
                "a model loaded with trust_remote_code carries only the model files."
            ) from error
        return backbones.assemble_from_backbones(vlm, sam, sae, model_class=cls, **kwargs)

    # ------------------------------------------------------------------ safe loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, refusing what could run code, half-load or load a
        damaged folder (`loading.load_safely` lists the rules; ``allow_missing_weights=True``
        accepts a checkpoint that lacks tensors, ``use_safetensors=False`` a trusted pickle)."""
        return load_safely(
            super().from_pretrained, pretrained_model_name_or_path, *model_args, **kwargs
        )

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.save_pretrained`, leaving one weight set: the files of the layout
        it did not write (one file vs shards + index) are removed (`loading.tidy_saved_folder`)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        tidy_saved_folder(save_directory, kwargs.get("is_main_process", True))
        return result


__all__ = [
    "SegCompassForReasoningSegmentation",
    "SegCompassOutput",
    "SegCompassPreTrainedModel",
    "completion_format_problem",
    "gather_ref_hidden_states",
]
