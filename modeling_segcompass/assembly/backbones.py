"""Assemble SegCompass from real checkpoints: an image-text-to-text VLM, SAM, optionally an SAE.

The VLM (a local folder or Hub id in
`save_pretrained` format, e.g. Qwen2.5-VL-7B-Instruct) and SAM (`facebook/sam-vit-*` format,
`SamModel`) keep their weights; `<think>`, `</think>` and `<REF_POS>` are added to the
tokenizer when missing and the token embeddings grow to match; the SAE (SAELens format) is
loaded or built fresh; the query codebook and slot mapper start fresh.

The model skeleton is built on the meta device and the loaded modules are moved in, so the
VLM and SAM weights are held in memory once (a 7B VLM is not allocated twice).

This file travels with saved models (remote code): it imports only torch, transformers and
its flat siblings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AddedToken,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    SamModel,
)
from transformers.processing_utils import ProcessorMixin

from ..configuration_segcompass import SegCompassConfig
from ..modeling_segcompass import SegCompassForReasoningSegmentation
from ..processing_segcompass import (
    DEFAULT_REF_TOKEN,
    THINK_END_TOKEN,
    THINK_START_TOKEN,
    SegCompassProcessor,
)
from ..sparse_autoencoder import SparseAutoencoder

logger = logging.getLogger(__name__)

#: `SamModel` parameter prefixes -> SegCompass prefixes. SegCompass keeps SAM's own module
#: classes, so below these prefixes every name is identical.
SAM_PREFIX_MAP: dict[str, str] = {
    "vision_encoder.": "image_encoder.",
    "prompt_encoder.": "prompt_encoder.",
    "mask_decoder.": "mask_decoder.",
}
#: SamModel stores the Fourier positional features once, as `shared_image_embedding`, and ties
#: the prompt encoder's copy to it; SegCompass reads the image PE from the prompt encoder's copy.
SAM_SHARED_PE_KEY = "shared_image_embedding.positional_embedding"
SEGCOMPASS_SHARED_PE_KEY = "prompt_encoder.shared_embedding.positional_embedding"
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


@dataclass
class AssembledSegCompass:
    """What `assemble_from_backbones` returns; unpacks as ``model, processor = ...``.

    Attributes:
        model: the assembled `SegCompassForReasoningSegmentation` (eval mode).
        processor: the matching `SegCompassProcessor` (its tokenizer holds the new tokens).
        sources: where each part came from: ``{"vlm": ..., "sam": ..., "sae": ... or None}``
            (names for the model card's ``base_model`` list).
        added_tokens: the tokens that were missing from the VLM's tokenizer and were added.
    """

    model: SegCompassForReasoningSegmentation
    processor: SegCompassProcessor
    sources: dict[str, str | None] = field(default_factory=dict)
    added_tokens: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.model, self.processor))


def sam_state_dict_to_segcompass(
    sam_state: dict[str, torch.Tensor], *, include_image_encoder: bool = True
) -> dict[str, torch.Tensor]:
    """Rename a `SamModel` state dict (`facebook/sam-vit-*` names) to SegCompass names.

    ``vision_encoder.*`` -> ``image_encoder.*`` (dropped when ``include_image_encoder`` is
    False, e.g. for ``image_encoder_type="none"``), ``prompt_encoder.*`` and
    ``mask_decoder.*`` unchanged, ``shared_image_embedding.positional_embedding`` ->
    ``prompt_encoder.shared_embedding.positional_embedding`` (SAM's tie, made explicit).

    Raises:
        ValueError: a key outside these groups (not a SAM checkpoint?) or no positional
            embedding.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sam_state.items():
        if key == SAM_SHARED_PE_KEY:
            out[SEGCOMPASS_SHARED_PE_KEY] = tensor
            continue
        if key == SEGCOMPASS_SHARED_PE_KEY:
            continue  # the tied copy; the shared one above is the checkpoint's tensor
        for prefix, target in SAM_PREFIX_MAP.items():
            if key.startswith(prefix):
                if target == "image_encoder." and not include_image_encoder:
                    break
                out[target + key[len(prefix) :]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"Expected a SamModel state dict (keys under {sorted(SAM_PREFIX_MAP)} and "
            f"{SAM_SHARED_PE_KEY!r}), got unexpected keys {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}. Pass a `facebook/sam-vit-*`-format checkpoint."
        )
    if SEGCOMPASS_SHARED_PE_KEY not in out:
        pe = sam_state.get(SEGCOMPASS_SHARED_PE_KEY)
        if pe is None:
            raise ValueError(
                f"The SAM state dict has no {SAM_SHARED_PE_KEY!r}; expected a full SamModel "
                "checkpoint (facebook/sam-vit-base|large|huge format)."
            )
        out[SEGCOMPASS_SHARED_PE_KEY] = pe
    return out


def _load_pretrained(loader: Any, source: Any, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(source)` with an error that names the part being loaded."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        where = "local folder" if os.path.isdir(str(source)) else "Hub id or path"
        raise OSError(
            f"from_backbones: could not load the {what} from {source!r} ({where}). Pass a local "
            "folder written by `save_pretrained` or a reachable Hub id (offline, only folders "
            f"and already-cached ids work). Cause: {err}"
        ) from err


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"from_backbones: dtype must be a torch dtype or its name (e.g. 'bfloat16'), "
                f"got {dtype!r}."
            )
        return resolved
    return dtype


def _read_chat_template(source: Any) -> str | None:
    """`chat_template.jinja` / `chat_template.json` of a local VLM folder (Qwen2.5-VL keeps its
    template at the processor level, not in the tokenizer)."""
    if not isinstance(source, str) or not os.path.isdir(source):
        return None
    jinja = os.path.join(source, "chat_template.jinja")
    as_json = os.path.join(source, "chat_template.json")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    if os.path.isfile(as_json):
        with open(as_json, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


def _build_processor(
    source: Any, *, num_slots: int, sam_image_size: int, mask_size: int
) -> tuple[SegCompassProcessor, list[str]]:
    """The SegCompass processor around the VLM's tokenizer and image processor.

    `<think>`, `</think>` and `<REF_POS>` are added as non-special tokens when missing (as
    the tiny tokenizer has them: TRL decodes completions with ``skip_special_tokens=True``
    and the format reward must still see them). Returns the processor and the added tokens.
    """
    if isinstance(source, ProcessorMixin):
        tokenizer, image_processor = source.tokenizer, source.image_processor
        chat_template = getattr(source, "chat_template", None)
    elif isinstance(source, str):
        tokenizer = _load_pretrained(AutoTokenizer, source, "VLM tokenizer")
        image_processor = _load_pretrained(AutoImageProcessor, source, "VLM image processor")
        chat_template = None
    else:
        raise ValueError(
            "from_backbones: `vlm_processor` must be a processor or a folder / Hub id holding "
            f"the VLM's tokenizer and image processor, got {type(source).__name__}."
        )
    chat_template = chat_template or tokenizer.chat_template or _read_chat_template(source)
    vocab = tokenizer.get_vocab()
    added = [t for t in (THINK_START_TOKEN, THINK_END_TOKEN, DEFAULT_REF_TOKEN) if t not in vocab]
    if added:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
        logger.info("Added %s to the tokenizer (now %d tokens).", added, len(tokenizer))
    processor = SegCompassProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=chat_template,
        num_slots=num_slots,
        sam_image_size=sam_image_size,
        mask_size=mask_size,
    )
    return processor, added


def _default_sae_layer(num_layers: int, sae: SparseAutoencoder | None) -> int:
    """The SAE's own `hook_layer` (SAELens metadata) when known, else the middle layer.

    The paper (arXiv 2605.22658) uses a middle layer of the LLM.
    """
    if sae is not None:
        layer = sae.sae_metadata.get("hook_layer")
        if isinstance(layer, int) and 0 <= layer < num_layers:
            return layer
    return num_layers // 2


def _sae_config_fields(sae: SparseAutoencoder) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "d_sae": sae.d_sae,
        "sae_architecture": sae.architecture,
        "sae_apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "activation_threshold": sae.activation_threshold,
        "sae_max_active": sae.max_active,
    }
    if sae.architecture == "topk":
        fields["sae_k"] = sae.k
    else:
        fields["sae_k"] = min(sae.k, sae.d_sae)
    return fields


def _materialise_fresh_modules(model: SegCompassForReasoningSegmentation) -> list[str]:
    """Allocate and initialise every module still on the meta device (the new heads).

    Uses the model's own `_init_weights`, so fresh heads start exactly as in a model built
    from its config. Returns the names of the modules that were initialised.
    """
    fresh = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.is_meta for t in own):
            module.to_empty(device="cpu", recurse=False)
            fresh.append((name, module))
    with torch.no_grad():
        for _, module in fresh:
            model._init_weights(module)
    # parent modules with their own init logic (e.g. the SAE, the codebook) hold parameters
    # directly, so they are in `fresh`; nothing on meta may remain.
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(
            f"from_backbones: tensors {left[:5]} were neither loaded nor initialised; this is "
            "a bug, please report it with the model config."
        )
    return [name for name, _ in fresh]


def assemble_from_backbones(
    vlm: str | os.PathLike | PreTrainedModel,
    sam: str | os.PathLike | SamModel,
    sae: str | os.PathLike | SparseAutoencoder | None = None,
    *,
    vlm_processor: Any = None,
    num_slots: int = 1,
    dtype: torch.dtype | str | None = None,
    model_class: type[SegCompassForReasoningSegmentation] | None = None,
    vlm_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> AssembledSegCompass:
    """Build a SegCompass model and processor from an image-text-to-text VLM, SAM and an SAE.

    Args:
        vlm: image-text-to-text checkpoint (folder or Hub id, loaded with
            `AutoModelForImageTextToText`) or a loaded model.
        sam: SAM checkpoint in `facebook/sam-vit-*` format (folder or Hub id, `SamModel`) or
            a loaded `SamModel`. Its vision encoder, prompt encoder and mask decoder are used
            as they are (same parameter names).
        sae: optional SAELens-format SAE folder (``cfg.json`` + ``sae_weights.safetensors``)
            or a `SparseAutoencoder`. Its ``d_in`` must equal the VLM's text hidden size;
            ``d_sae``, architecture, k and the SAE layer (SAELens ``hook_layer``) are taken
            from it. Without it, a fresh SAE of the config's size is built.
        vlm_processor: where the tokenizer and image processor come from (default: ``vlm``
            when it is a path); a processor object or a folder / Hub id.
        num_slots: K, slots and `<REF_POS>` tokens per answer.
        dtype: dtype of the whole model (default float32: the new heads train in float32).
        model_class: the class to build (default `SegCompassForReasoningSegmentation`).
        vlm_kwargs: extra keyword arguments of the VLM's `from_pretrained` (e.g. revision).
        **config_overrides: any `SegCompassConfig` field (``sae_layer``, ``codebook_dim``,
            ``d_sae`` when no SAE is given, ...).

    Returns:
        `AssembledSegCompass` (unpacks as ``model, processor``); the processor is also
        attached as ``model.processor``.

    Raises:
        OSError: a checkpoint cannot be found or downloaded (the message names which).
        ValueError: the SAE does not fit the VLM (``d_in``), an override contradicts the
            SAE, or the VLM / SAM inputs are of the wrong kind.
    """
    torch_dtype = _resolve_dtype(dtype)
    model_class = model_class or SegCompassForReasoningSegmentation
    if "num_slots" in config_overrides:
        raise ValueError("from_backbones: pass num_slots as its own argument, not as an override.")

    # 1. The VLM and its processor (tokenizer + image processor).
    if isinstance(vlm, PreTrainedModel):
        vlm_model, vlm_name = vlm, getattr(vlm.config, "_name_or_path", None) or type(vlm).__name__
    elif isinstance(vlm, (str, os.PathLike)):
        vlm_name = os.fspath(vlm)
        vlm_model = _load_pretrained(
            AutoModelForImageTextToText, vlm_name, "VLM", dtype=torch_dtype, **(vlm_kwargs or {})
        )
    else:
        raise ValueError(
            "from_backbones: `vlm` must be a folder, a Hub id or a loaded image-text-to-text "
            f"model, got {type(vlm).__name__}."
        )
    source = vlm_processor if vlm_processor is not None else vlm
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, PreTrainedModel):
        raise ValueError(
            "from_backbones: with a loaded VLM model, also pass `vlm_processor=` (a processor, "
            "or the folder / Hub id holding its tokenizer and image processor)."
        )
    sam_model = (
        sam
        if isinstance(sam, SamModel)
        else _load_pretrained(SamModel, os.fspath(sam), "SAM checkpoint", dtype=torch_dtype)
        if isinstance(sam, (str, os.PathLike))
        else None
    )
    if sam_model is None:
        raise ValueError(
            "from_backbones: `sam` must be a folder, a Hub id (facebook/sam-vit-base|large|huge) "
            f"or a loaded SamModel, got {type(sam).__name__}."
        )
    sam_config = sam_model.config
    processor, added = _build_processor(
        source,
        num_slots=num_slots,
        sam_image_size=sam_config.vision_config.image_size,
        mask_size=4 * sam_config.prompt_encoder_config.image_embedding_size,
    )
    tokenizer = processor.tokenizer

    # 2. Token embeddings grow to the tokenizer (new rows: mean of the old ones).
    embeddings = vlm_model.get_input_embeddings()
    if len(tokenizer) > embeddings.weight.shape[0]:
        old = embeddings.weight.shape[0]
        vlm_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info("Resized the VLM token embeddings from %d to %d.", old, len(tokenizer))
    text_config = vlm_model.config.get_text_config()
    text_config.vocab_size = vlm_model.get_input_embeddings().weight.shape[0]
    hidden = text_config.hidden_size

    # 3. The SAE.
    sae_module: SparseAutoencoder | None
    if sae is None:
        sae_module, sae_name = None, None
    elif isinstance(sae, SparseAutoencoder):
        sae_module, sae_name = sae, "SparseAutoencoder"
    elif isinstance(sae, (str, os.PathLike)):
        sae_name = os.fspath(sae)
        sae_module = SparseAutoencoder.load(sae_name)
    else:
        raise ValueError(
            "from_backbones: `sae` must be None, a SAELens-format folder or a SparseAutoencoder, "
            f"got {type(sae).__name__}."
        )
    if sae_module is not None and sae_module.d_in != hidden:
        raise ValueError(
            f"from_backbones: the SAE has d_in={sae_module.d_in} but the VLM's text hidden size "
            f"is {hidden}; an SAE must be trained on this VLM's hidden states. Pass an SAE with "
            f"d_in={hidden}, or sae=None to build a fresh one."
        )

    # 4. The config.
    num_layers = text_config.num_hidden_layers
    fields: dict[str, Any] = {
        "vlm_config": vlm_model.config,
        "sam_config": sam_config,
        "image_encoder_type": "sam",
        "num_slots": num_slots,
        "sae_layer": _default_sae_layer(num_layers, sae_module),
        "ref_token_id": processor.ref_token_id,
        "think_start_token_id": tokenizer.convert_tokens_to_ids(THINK_START_TOKEN),
        "think_end_token_id": tokenizer.convert_tokens_to_ids(THINK_END_TOKEN),
    }
    if sae_module is not None:
        from_sae = _sae_config_fields(sae_module)
        for key, value in from_sae.items():
            if key in config_overrides and config_overrides[key] != value and key in (
                "d_sae", "sae_architecture", "sae_k"
            ):  # fmt: skip
                raise ValueError(
                    f"from_backbones: {key}={config_overrides[key]!r} contradicts the SAE "
                    f"({key}={value!r}); drop the override or pass another SAE."
                )
        fields.update(from_sae)
    fields.update(config_overrides)
    config = SegCompassConfig(**fields)

    # 5. Skeleton on meta, then the loaded modules move in.
    with torch.device("meta"):
        model = model_class(config)
    model.vlm = vlm_model
    include_encoder = config.image_encoder_type == "sam"
    mapped = sam_state_dict_to_segcompass(
        sam_model.state_dict(), include_image_encoder=include_encoder
    )
    result = model.load_state_dict(mapped, strict=False, assign=True)
    wanted = {
        k
        for k in model.state_dict()
        if k.startswith(_SAM_PARTS) and (include_encoder or not k.startswith("image_encoder."))
    }
    missing = sorted(wanted & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"from_backbones: the SAM checkpoint does not fit SegCompass's SAM modules: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}."
        )
    if sae_module is not None:
        model.sae.load_state_dict(sae_module.state_dict(), assign=True)
        model.sae.sae_metadata = dict(sae_module.sae_metadata)
    fresh = _materialise_fresh_modules(model)
    logger.info("Fresh SegCompass modules: %s", sorted({n.split(".")[0] for n in fresh}))
    # As `from_pretrained(dtype=...)` would load it (RoPE buffers stay float32), so that the
    # model returns the same numbers before and after save / reload.
    model.cast_to_dtype(torch_dtype)
    model.eval()
    model.processor = processor
    sources = {
        "vlm": vlm_name,
        "sam": getattr(sam_config, "_name_or_path", None)
        or (None if isinstance(sam, SamModel) else os.fspath(sam)),
        "sae": sae_name,
    }
    return AssembledSegCompass(
        model=model, processor=processor, sources=sources, added_tokens=added
    )


__all__ = [
    "AssembledSegCompass",
    "SAM_PREFIX_MAP",
    "assemble_from_backbones",
    "sam_state_dict_to_segcompass",
]
