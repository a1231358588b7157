"""Configuration of SegCompass (arXiv 2605.22658).

This file travels with saved models (remote code): it imports only transformers and its flat
siblings loading.py and config_presets.py (the presets' fields).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig, SamConfig
from transformers.configuration_utils import SubConfigSpec

from .config_presets import PAPER_BACKBONES as PAPER_BACKBONES  # re-exported
from .config_presets import paper_fields, tiny_fields, upstream_fields
from .loading import verify_code_checksums

SAE_ARCHITECTURES = ("relu", "topk", "jumprelu")
#: The answer tokens whose ids the tokenizer decides: config field -> token.
SPECIAL_TOKEN_FIELDS: dict[str, str] = {
    "ref_token_id": "<REF_POS>",
    "think_start_token_id": "<think>",
    "think_end_token_id": "</think>",
}
IMAGE_ENCODERS = ("sam", "conv", "none")
#: `slot_mapper_type`: this package's `SlotMapper` or the authors' head (`UpstreamSlotMapper`).
SLOT_MAPPER_TYPES = ("segcompass", "upstream")
#: `slot_order`: which `<REF_POS>` feeds slot 0 (`vlm_states.gather_ref_hidden_states`).
SLOT_ORDERS = ("reading", "last_first")


class SegCompassConfig(PreTrainedConfig):
    r"""
    Configuration of [`SegCompassForReasoningSegmentation`].

    Args:
        vlm_config (`dict` or `PreTrainedConfig`):
            Config of any image-text-to-text model (Qwen2.5-VL, LLaVA, ...). It writes the
            chain of thought and the `<REF_POS>` tokens, and its hidden states feed the SAE.
        sam_config (`dict` or `SamConfig`):
            Config of SAM; its prompt encoder and mask decoder turn heatmaps into masks.
            `mask_decoder_config.hidden_size` is the image-embedding width C, and
            `prompt_encoder_config.image_embedding_size` the embedding side E (masks are 4E).
        image_encoder_type (`str`, defaults to `"sam"`):
            `"sam"`: SAM's ViT (`SamVisionEncoder`, real checkpoints). `"conv"`: a small
            convolutional encoder (the tiny default: a ViT trained from scratch learns far
            slower on CPU). `"none"`: no encoder, `image_embeddings` must be
            passed to `forward` (the reference caches SAM ViT-H embeddings).
        conv_encoder_width (`int`): width of the convolutional image encoder.
        sae_layer (`int`):
            Index of the language-model decoder layer whose *output* (residual stream after
            the block, SAELens `blocks.{L}.hook_resid_post`, `hidden_states[L + 1]`) feeds the
            SAE; 12 reads the `hidden_states[13]` of Qwen2.5-VL-7B that the paper uses.
        d_sae (`int`): number of SAE latents (65536 in the paper).
        sae_architecture (`str`): `"topk"` (default here), `"relu"` (reference) or `"jumprelu"`.
        sae_k (`int`): active latents per token for `"topk"` (64, as measured in
            docs/performance.md; the same for `paper()` and for a fresh SAE of `from_backbones`).
        sae_apply_b_dec_to_input (`bool`): subtract `b_dec` before encoding (SAELens).
        activation_threshold (`float`):
            Codes with |a| below this are zeroed before the codebook. The reference uses 2.0
            on relu codes ("faithful threshold mode"); 0.0 keeps every active latent.
        sae_max_active (`int`, *optional*):
            Cap on active latents per token kept for relu/jumprelu codes (largest kept).
        sae_reconstruction_weight (`float`):
            Weight of the SAE reconstruction MSE in the total loss (joint SAE training).
        codebook_dim (`int`): slot width d_q (512 in the paper).
        codebook_layers (`int`), codebook_heads (`int`), codebook_ffn_dim (`int`), codebook_dropout (`float`):
            The pre-norm transformer encoder in which K slot queries gather concepts.
        codebook_readout_pairs (`int`, *optional*):
            None (the paper's readout): a slot is the encoder's output at its query. m >= 1
            (an interpretability option): each slot reads only its m highest-scoring (token,
            concept) pairs, its vector built from those pairs' codebook rows alone, so the
            concepts an explanation names are all the slot read (docs/interpretability.md).
        codebook_span_start_token_id (`int`, *optional*):
            None (the paper's): the codebook reads every token. A token id (an
            interpretability option): in each row the codebook reads only the tokens after
            the last occurrence of that token, up to the next of `codebook_span_end_token_ids`
            (with the id of the word that opens the answer, the answer's words): the codebook
            sees a bag of concepts without token positions, so over the whole text a slot
            cannot tell the answer's "blue" from the scene's. A row without the token, or
            with nothing after it, is read whole.
        codebook_span_end_token_ids (`list[int]`, *optional*):
            The tokens that end that span; None: `</think>` and `<REF_POS>`.
        num_slots (`int`): K, the number of `<REF_POS>` tokens / slots / masks.
        slot_mapper_ref_input (`bool`):
            True (the paper's): the slot mapper fuses each slot with its `<REF_POS>` state.
            False (an interpretability option): it reads zeros there, so the only path from
            the reasoning to the mask runs through the SAE concepts the slot gathered.
        slot_mapper_ref_dropout (`float`):
            0.0 (the paper's): off. p in (0, 1) (an interpretability option): in training,
            each slot's `<REF_POS>` state reaches the slot mapper as zeros with probability
            p, so the mask must also be carried by the slot's concepts; inference is
            unchanged.
        slot_mapper_heads (`int`): heads of the slot-to-image similarity.
        slot_fuser_channels (`int`): width of the conv fuser that turns similarity maps into a heatmap.
        slot_mapper_type (`str`): `"segcompass"` ([`SlotMapper`], this package's head) or
            `"upstream"` ([`UpstreamSlotMapper`], the authors' `SlotAttnHeatmapHead` with their
            parameter names; `slot_fuser_channels` is unused, its fuser is `slot_mapper_heads` wide).
        slot_order (`str`): `"reading"`: slot k reads the k-th of the last K `<REF_POS>` tokens in
            the order of the text; `"last_first"` (the authors' code): slot 0 reads the last one.
        heatmap_outside_fill (`float`, *optional*): heatmap logits outside the unpadded image
            (the forward's `valid_mask`) are set to this before they become SAM's prompt (the
            authors' code: -50.0); None leaves them. Without a `valid_mask` nothing is filled.
        ref_token_id (`int`, *optional*): id of `<REF_POS>`. The tokenizer decides it (a
            Qwen2.5-VL tokenizer gets it appended after its own tokens), so presets leave it
            None and the assembly (`from_backbones`) or `special_token_ids_from(tokenizer)`
            sets it; a model refuses to run without it, and `segment`, the pipeline and the
            trainers refuse a processor whose `<REF_POS>` has another id.
        think_start_token_id, think_end_token_id (`int`, *optional*): ids of `<think>` / `</think>`.
        lm_loss_weight, seg_loss_weight, conf_loss_weight, heatmap_bce_weight, heatmap_dice_weight,
        mask_dice_weight, mask_focal_weight, iou_loss_weight (`float`):
            Loss weights. `seg_loss = heatmap_bce_weight*BCE(heatmap) + heatmap_dice_weight*Dice(heatmap)
            + mask_dice_weight*Dice(mask) + mask_focal_weight*Focal(mask) + iou_loss_weight*MSE(iou)`;
            `loss = lm_loss_weight*lm + seg_loss_weight*seg + conf_loss_weight*conf + sae_reconstruction_weight*sae`.
        focal_alpha, focal_gamma (`float`): sigmoid focal-loss parameters.
        loss_schedule_step (`int`, *optional*), heatmap_dice_weight_after, mask_dice_weight_after,
        mask_focal_weight_after (`float`, *optional*): from optimisation step `loss_schedule_step`
            on (the model's `training_step`, set by the trainers), each `*_after` that is not
            None replaces its weight (upstream: Dice 0.8 -> 2.0, focal 0 -> 5.0 at step 1500).
        loss_normalization (`str`): `"pairs"` (a term's sum over matched pairs / their number)
            or `"per_sample"` (upstream: mean per sample, then over the batch).
        dice_eps (`float`): Dice smoothing (1.0; upstream's form: 1e-6).
        matching_on (`str`), matching_cost (`str`), matching_full_grid (`bool`): Hungarian
            matching on `"mask"` or `"heatmap"` logits, cost `"dice_bce"` or `"soft_iou"`, over
            the valid area or the full grid (upstream: heatmap, soft_iou, full grid).
        slot_order_prior (`float`):
            Extra matching cost when slot k is matched to target g != k. 0.0 is the paper's
            pure Hungarian matching; the tiny default uses 1.0 so that slot j learns the j-th
            object the reasoning names (see docs/model.md, deviations).
        slot_confidence_threshold (`float`):
            A slot holds an object when its confidence *logit* is >= this (the reference's 0.5).
        mask_threshold (`float`): mask logits above this are foreground (0.0, the field convention).
        max_images_per_decoder_call (`"auto"`, `int` or None):
            `decode_masks` runs SAM's mask decoder on the K prompts of at most this many images
            per call (None: all B images in one call). Same numbers either way; it trades
            per-call overhead (small decoders, GPUs: larger is faster) against the size of the
            per-prompt (b*K, C, E, E) tensors of one call (SAM's 256 x 64 x 64 on a CPU: small
            is faster and bounds memory). "auto" (default) picks it from these sizes and the
            device (`DECODER_CALL_BYTES`); see docs/performance.md, benchmark 3.
        check_input_values (`bool`):
            Also read input values in `forward` on an accelerator (token ids in the vocabulary,
            finite pixels, binary masks, object counts): each check waits for the device, so
            by default they run only for CPU tensors; shapes and dtypes are always checked.
        sparse_codebook (`bool`):
            Project codes with an embedding-bag over active latents (fast). False uses the
            dense (L x d_sae) product of the reference; both give the same numbers.
    """

    model_type = "segcompass"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl"),
        "sam_config": SamConfig,
    }

    vlm_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    image_encoder_type: str = "sam"
    conv_encoder_width: int = 48
    # SAE
    sae_layer: int = 12
    d_sae: int = 65536
    sae_architecture: str = "topk"
    sae_k: int = 64
    sae_apply_b_dec_to_input: bool = True
    sae_jumprelu_init_threshold: float = 0.001
    activation_threshold: float = 0.0
    sae_max_active: int | None = None
    sae_reconstruction_weight: float = 0.0
    # query codebook
    codebook_dim: int = 512
    codebook_layers: int = 2
    codebook_heads: int = 8
    codebook_ffn_dim: int = 2048
    codebook_dropout: float = 0.0
    sparse_codebook: bool = True
    codebook_readout_pairs: int | None = None
    codebook_span_start_token_id: int | None = None
    codebook_span_end_token_ids: list[int] | None = None
    # slot mapper
    num_slots: int = 1
    slot_mapper_heads: int = 8
    slot_fuser_channels: int = 32
    slot_mapper_type: str = "segcompass"
    slot_mapper_ref_input: bool = True
    slot_mapper_ref_dropout: float = 0.0
    slot_order: str = "reading"
    heatmap_outside_fill: float | None = None
    # token ids
    ref_token_id: int | None = None
    think_start_token_id: int | None = None
    think_end_token_id: int | None = None
    # losses (arXiv 2605.22658, training; the authors' scripts: seg 0.3, conf 0.2, dice 2.0, focal 5.0)
    lm_loss_weight: float = 1.0
    seg_loss_weight: float = 1.0
    conf_loss_weight: float = 0.2
    heatmap_bce_weight: float = 1.0
    heatmap_dice_weight: float = 1.0
    mask_dice_weight: float = 1.0
    mask_focal_weight: float = 1.0
    iou_loss_weight: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    slot_order_prior: float = 0.0
    loss_schedule_step: int | None = None
    heatmap_dice_weight_after: float | None = None
    mask_dice_weight_after: float | None = None
    mask_focal_weight_after: float | None = None
    loss_normalization: str = "pairs"
    dice_eps: float = 1.0
    matching_on: str = "mask"
    matching_cost: str = "dice_bce"
    matching_full_grid: bool = False
    # inference
    slot_confidence_threshold: float = 0.5
    mask_threshold: float = 0.0
    max_images_per_decoder_call: int | str | None = "auto"
    check_input_values: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name in ("vlm_config", "sam_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (dict, PreTrainedConfig)):
                raise TypeError(
                    f"SegCompassConfig.{name}: expected a dict or a PreTrainedConfig, got "
                    f"{type(value).__name__}. Check config.json or pass a valid `{name}=`."
                )
        super().__post_init__(**kwargs)
        self.validate_segcompass()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedConfig.from_pretrained`, first refusing a local folder whose code files
        differ from its ``code_checksums.json`` (`loading.verify_code_checksums`). Loading
        with ``trust_remote_code`` reads the config before it imports the modeling file, so a
        cut modeling file is named here, not at the first forward."""
        verify_code_checksums(pretrained_model_name_or_path, kwargs.get("subfolder"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Build from a saved dict (config.json), refusing one without the backbone configs.

        Without them the class defaults (a full-size VLM and SAM) would be built silently and
        the weights would not fit; a saved SegCompass config always holds both.
        """
        missing = [key for key in ("vlm_config", "sam_config") if key not in config_dict]
        if missing:
            raise ValueError(
                f"SegCompassConfig: the saved config lacks {missing}; a SegCompass config.json "
                "holds the VLM and SAM configs. Re-save the model with `save_pretrained`, or "
                "build the config with SegCompassConfig.tiny() / .paper(...)."
            )
        return super().from_dict(config_dict, **kwargs)

    # ------------------------------------------------------------------ validation
    def validate_segcompass(self) -> None:
        """Raise a ValueError naming the field, what is allowed and what was given."""

        def fail(field: str, allowed: str, given: Any) -> None:
            raise ValueError(
                f"SegCompassConfig.{field}: expected {allowed}, got {given!r}. "
                f"Pass a valid `{field}=` to SegCompassConfig (or the preset you used)."
            )

        if self.sae_architecture not in SAE_ARCHITECTURES:
            fail("sae_architecture", f"one of {SAE_ARCHITECTURES}", self.sae_architecture)
        if self.image_encoder_type not in IMAGE_ENCODERS:
            fail("image_encoder_type", f"one of {IMAGE_ENCODERS}", self.image_encoder_type)
        if self.slot_mapper_type not in SLOT_MAPPER_TYPES:
            fail("slot_mapper_type", f"one of {SLOT_MAPPER_TYPES}", self.slot_mapper_type)
        if self.slot_order not in SLOT_ORDERS:
            fail("slot_order", f"one of {SLOT_ORDERS}", self.slot_order)
        fill = self.heatmap_outside_fill
        if fill is not None and (
            not isinstance(fill, (int, float)) or isinstance(fill, bool) or not math.isfinite(fill)
        ):
            fail("heatmap_outside_fill", "a finite number or None", fill)
        for name in ("d_sae", "codebook_dim", "codebook_layers", "codebook_heads", "num_slots",
                     "slot_mapper_heads", "slot_fuser_channels", "codebook_ffn_dim",
                     "conv_encoder_width"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "a positive integer", value)
        chunk = self.max_images_per_decoder_call
        if (
            chunk is not None
            and chunk != "auto"
            and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1)
        ):
            fail(
                "max_images_per_decoder_call",
                '"auto" (images per call from the sizes), a positive integer or None (all)',
                chunk,
            )
        if not isinstance(self.slot_mapper_ref_input, bool):
            fail("slot_mapper_ref_input", "True or False", self.slot_mapper_ref_input)
        dropout = self.slot_mapper_ref_dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
            fail("slot_mapper_ref_dropout", "a probability in [0, 1)", dropout)
        pairs = self.codebook_readout_pairs
        if pairs is not None and (
            not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1
        ):
            fail(
                "codebook_readout_pairs",
                "None (the paper's dense readout) or a positive integer (pairs each slot reads)",
                pairs,
            )
        span = self.codebook_span_start_token_id
        if span is not None and (not isinstance(span, int) or isinstance(span, bool) or span < 0):
            fail(
                "codebook_span_start_token_id",
                "None (the codebook reads every token) or a token id (it reads what follows it)",
                span,
            )
        ends = self.codebook_span_end_token_ids
        if ends is not None and (
            not isinstance(ends, (list, tuple))
            or not ends
            or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ends)
        ):
            fail(
                "codebook_span_end_token_ids",
                "None (</think> and <REF_POS> end the span) or a non-empty list of token ids",
                ends,
            )
        if ends is not None:
            self.codebook_span_end_token_ids = [int(t) for t in ends]
        for name in ("sae_k", "sae_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                fail(name, "an integer", value)
        for name in SPECIAL_TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                fail(name, "an integer token id or None (set from the tokenizer)", value)
        for name in ("activation_threshold", "lm_loss_weight", "seg_loss_weight",
                     "conf_loss_weight", "heatmap_bce_weight", "heatmap_dice_weight",
                     "mask_dice_weight", "mask_focal_weight", "iou_loss_weight",
                     "sae_reconstruction_weight", "focal_alpha", "focal_gamma", "slot_order_prior",
                     "slot_confidence_threshold", "mask_threshold", "codebook_dropout",
                     "initializer_range", "sae_jumprelu_init_threshold"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                fail(name, "a number", value)
            if not math.isfinite(value):  # config.json may hold NaN / Infinity literals
                fail(name, "a finite number", value)
        if not 1 <= self.sae_k <= self.d_sae:
            fail("sae_k", f"an integer in [1, d_sae={self.d_sae}]", self.sae_k)
        if self.codebook_dim % self.codebook_heads:
            fail(
                "codebook_dim",
                f"a multiple of codebook_heads={self.codebook_heads}",
                self.codebook_dim,
            )
        if self.activation_threshold < 0:
            fail("activation_threshold", "a value >= 0", self.activation_threshold)
        for name in ("lm_loss_weight", "seg_loss_weight", "conf_loss_weight", "heatmap_bce_weight",
                     "heatmap_dice_weight", "mask_dice_weight", "mask_focal_weight",
                     "iou_loss_weight", "sae_reconstruction_weight"):  # fmt: skip
            if getattr(self, name) < 0:
                fail(name, "a non-negative loss weight", getattr(self, name))
        for name, allowed in (("loss_normalization", ("pairs", "per_sample")),
                              ("matching_on", ("mask", "heatmap")),
                              ("matching_cost", ("dice_bce", "soft_iou"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                fail(name, f"one of {allowed}", getattr(self, name))
        for name in ("heatmap_dice_weight_after", "mask_dice_weight_after",
                     "mask_focal_weight_after", "dice_eps"):  # fmt: skip
            value = getattr(self, name)
            if (value is not None or name == "dice_eps") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < math.inf):  # fmt: skip
                fail(name, "a finite number >= 0" + ("" if name == "dice_eps" else " or None"),
                     value)  # fmt: skip
        step = self.loss_schedule_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            fail("loss_schedule_step", "an integer step or None", step)
        num_layers = self.vlm_text_config.num_hidden_layers
        if not 0 <= self.sae_layer < num_layers:
            fail("sae_layer", f"a decoder-layer index in [0, {num_layers - 1}]", self.sae_layer)
        channels = self.sam_config.mask_decoder_config.hidden_size
        if channels % self.slot_mapper_heads:
            fail("slot_mapper_heads", f"a divisor of the image-embedding width {channels}",
                 self.slot_mapper_heads)  # fmt: skip
        if (
            self.image_encoder_type == "sam"
            and self.sam_config.vision_config.output_channels != channels
        ):
            fail(
                "sam_config.vision_config.output_channels",
                f"the mask decoder width {channels}",
                self.sam_config.vision_config.output_channels,
            )
        vocab = self.vlm_text_config.vocab_size
        for name in SPECIAL_TOKEN_FIELDS:
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab:
                fail(name, f"a token id in [0, vocab_size={vocab})", value)

    # ------------------------------------------------------------------ special tokens
    @staticmethod
    def special_token_ids_from(tokenizer: Any) -> dict[str, int]:
        """`ref_token_id`, `think_start_token_id`, `think_end_token_id` as `tokenizer` has them.

        Args:
            tokenizer: a tokenizer, or a processor holding one (its `ref_token` names the
                reference token, default `<REF_POS>`).

        Returns:
            ``{"ref_token_id": ..., "think_start_token_id": ..., "think_end_token_id": ...}``,
            e.g. for ``config.update(...)`` or ``SegCompassConfig.paper(**...)``.

        Raises:
            ValueError: the tokenizer lacks one of the tokens (add them with
                `SegCompassProcessor.from_vlm_processor`, which `from_backbones` calls).
        """
        tokens = dict(SPECIAL_TOKEN_FIELDS)
        tokens["ref_token_id"] = getattr(tokenizer, "ref_token", None) or tokens["ref_token_id"]
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        ids = {}
        for field, token in tokens.items():
            token_id = _token_id(tokenizer, token)
            if token_id is None:
                raise ValueError(
                    f"SegCompassConfig: the tokenizer has no {token!r} token, so `{field}` cannot "
                    "be taken from it. Build the processor with "
                    "SegCompassProcessor.from_vlm_processor(...) or assemble the model with "
                    "SegCompassForReasoningSegmentation.from_backbones(...); both add "
                    "<think>, </think> and <REF_POS> (then resize the token embeddings)."
                )
            ids[field] = token_id
        return ids

    def check_special_tokens(self, processor: Any) -> None:
        """Refuse a processor (or tokenizer) whose answer tokens are not this config's ids.

        The model grounds its masks on the hidden states at `ref_token_id`; with another
        tokenizer's id it would read the wrong tokens (e.g. `<think>`) and silently return
        wrong masks. `segment`, the pipeline and the trainers call this when model and
        processor meet.

        Raises:
            ValueError: naming the field, both ids, what the config's id is in the tokenizer,
                and how to fix it.
        """
        fix = (
            "Use the processor saved with this model, or take the ids from the tokenizer: "
            "`model.config.update(SegCompassConfig.special_token_ids_from(processor))` "
            "(from_backbones does this)."
        )
        if self.ref_token_id is None:
            raise ValueError(
                "SegCompassConfig.ref_token_id is not set: the tokenizer decides the id of "
                f"<REF_POS>, and presets leave it to the assembly. {fix}"
            )
        tokenizer = getattr(processor, "tokenizer", processor)
        tokens = dict(SPECIAL_TOKEN_FIELDS)
        tokens["ref_token_id"] = getattr(processor, "ref_token", None) or tokens["ref_token_id"]
        for field, token in tokens.items():
            wanted = getattr(self, field)
            if wanted is None:
                continue
            have = _token_id(tokenizer, token)
            if have != wanted:
                where = f"has {token} at id {have}" if have is not None else f"has no {token}"
                seen = _id_to_token(tokenizer, wanted)
                raise ValueError(
                    f"SegCompassConfig.{field} is {wanted} but the processor's tokenizer {where}"
                    f"{f' (id {wanted} is {seen!r} there)' if seen is not None else ''}: the "
                    f"model and the processor disagree on {token}, so the model would read the "
                    f"wrong tokens. {fix}"
                )
        image_id = getattr(self.vlm_config, "image_token_id", None)
        processor_image_id = getattr(processor, "image_token_id", None)
        if None not in (image_id, processor_image_id) and image_id != processor_image_id:
            raise ValueError(
                f"SegCompassConfig.vlm_config.image_token_id is {image_id} but the processor "
                f"expands images with token id {processor_image_id}: the VLM would find no image "
                "tokens. Use the VLM checkpoint's own tokenizer (the processor saved with the "
                "model)."
            )

    # ------------------------------------------------------------------ derived
    @property
    def vlm_text_config(self) -> PreTrainedConfig:
        """The language-model part of the VLM config (hidden size, layers, vocab)."""
        return self.vlm_config.get_text_config()

    @property
    def llm_hidden_size(self) -> int:
        return self.vlm_text_config.hidden_size

    @property
    def image_embedding_size(self) -> int:
        """E: side of the image embedding (64 for real SAM)."""
        return self.sam_config.prompt_encoder_config.image_embedding_size

    @property
    def mask_size(self) -> int:
        """4E: side of heatmaps and mask logits (256 for real SAM)."""
        return 4 * self.image_embedding_size

    @property
    def image_embedding_channels(self) -> int:
        """C: channels of the image embedding (256 for real SAM)."""
        return self.sam_config.mask_decoder_config.hidden_size

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(
        cls,
        *,
        vocab_size: int = 1024,
        ref_token_id: int = 9,
        image_token_id: int = 5,
        video_token_id: int = 6,
        vision_start_token_id: int = 3,
        vision_end_token_id: int = 4,
        think_start_token_id: int | None = 7,
        think_end_token_id: int | None = 8,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        image_size: int = 64,
        **overrides: Any,
    ) -> SegCompassConfig:
        """The embedded default: a ~0.4M-parameter model that trains on 2 CPU cores.

        Token ids default to the tiny tokenizer's layout (`tokenizer_builder.SPECIAL_TOKENS`).
        Tiny Qwen2.5-VL (text hidden 64, 2 layers, vision patch 8 + merge 2: 16 image tokens
        at 64 px), a conv image encoder giving a (B, 32, 16, 16) embedding, SAM prompt
        encoder / mask decoder of width 32, masks at 64x64 (docs/model.md).
        """
        defaults = tiny_fields(
            vocab_size=vocab_size,
            ref_token_id=ref_token_id,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            vision_start_token_id=vision_start_token_id,
            vision_end_token_id=vision_end_token_id,
            think_start_token_id=think_start_token_id,
            think_end_token_id=think_end_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            image_size=image_size,
        )
        defaults.update(overrides)
        return cls(**defaults)

    @classmethod
    def paper(
        cls,
        vlm: str = "qwen2.5-vl-7b",
        *,
        num_slots: int = 4,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> SegCompassConfig:
        """The published dimensions (arXiv 2605.22658): d_sae 65536, codebook 512, 2 layers, 8 heads.

        `vlm` is one of `PAPER_BACKBONES` ("qwen2.5-vl-7b", "llava-1.5-7b", "llava-1.5-13b");
        SAM is ViT-H (the `SamConfig()` default). The reference runs a relu SAE with the
        |a| < 2.0 threshold; the topk SAE here is the faster default, pass
        `sae_architecture="relu", activation_threshold=2.0` for the faithful mode.
        This builds a config only; weights come from `from_backbones` / `from_pretrained`.

        The ids of `<REF_POS>`, `<think>` and `</think>` belong to the tokenizer (they are
        appended to the VLM's vocabulary), so they are not guessed here: pass `tokenizer=`
        (a tokenizer or processor that has them) to take them from it, or leave them None for
        the assembly to set; a model refuses to run until `ref_token_id` is set.
        """
        defaults = paper_fields(vlm, num_slots)
        if tokenizer is not None:
            defaults.update(cls.special_token_ids_from(tokenizer))
        defaults.update(overrides)
        return cls(**defaults)

    @classmethod
    def upstream(
        cls,
        base: str = "qwen2.5-vl-7b",
        *,
        num_slots: int = 4,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> SegCompassConfig:
        """The model as the authors' code runs it (github.com/ZhenyuLU-Heliodore/SegCompass:
        verl/modeling.py and the launch scripts scripts/train/*/).

        `base` is one of `PAPER_BACKBONES`, with `paper()`'s VLM and SAM ViT-H configs. The
        choices that differ from `paper()`: a relu SAE without `b_dec` subtracted from its
        input and the |a| < 2.0 threshold before the codebook, the authors' slot head
        (`slot_mapper_type="upstream"`, 4 heads: their `heatmap_head.*` tensors load into
        it), slot 0 reading the last `<REF_POS>`, heatmap prompts filled with -50 outside the
        image, and the launch scripts' loss weights before their switch step (seg 0.3, conf
        0.2, heatmap BCE 1, mask and heatmap Dice 0.8, focal 0, no IoU-head loss, pure
        Hungarian). docs/model.md lists every difference with `paper()`. `tokenizer=` and
        the special-token ids work as in `paper()`.
        """
        defaults = upstream_fields(base, num_slots)
        if tokenizer is not None:
            defaults.update(cls.special_token_ids_from(tokenizer))
        defaults.update(overrides)
        return cls(**defaults)


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` as one token of `tokenizer`, None when it does not know it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (token_id == unk and token != getattr(tokenizer, "unk_token", None)):
        return None
    return int(token_id)


def _id_to_token(tokenizer: Any, token_id: int) -> str | None:
    """The token of `token_id` in `tokenizer`, None when the id is outside its vocabulary."""
    try:
        token = tokenizer.convert_ids_to_tokens(int(token_id))
    except (IndexError, OverflowError, TypeError, ValueError):
        return None
    return token if isinstance(token, str) else None


__all__ = ["SegCompassConfig"]
