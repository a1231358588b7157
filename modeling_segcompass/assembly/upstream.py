"""Convert checkpoints of upstream SegCompass (github.com/ZhenyuLU-Heliodore/SegCompass).

Upstream's trainer (`verl/utils/checkpoint/fsdp_checkpoint_manager.py`) writes, per saved
step, `refseg_modules.pt` (rank 0: a plain dict of tensors keyed `sae.*`, `query_book.*`,
`heatmap_head.*`, `prompt_encoder.*`, `mask_decoder.*`) and `llm_hf/` (the LLM's config,
tokenizer and processor, plus its weights in safetensors when saved with `save_llm_hf`). SAM
comes from segment_anything's `.pth` (`sam_vit_h_4b8939.pth`), the SAE from a SAELens folder
or from `refseg_modules.pt` itself.

`convert_upstream_state_dict` renames those tensors to this package's names:

* `query_book.codebook.weight` (d_q, d_sae), an `nn.Linear` weight -> `codebook.codebook`
  (d_sae, d_q), its transpose; `query_book.slot_queries` (1, K, d_q) -> `codebook.slot_queries`
  (K, d_q); `query_book.encoder.layers.i.*` -> `codebook.layers.i.*` (both are PyTorch
  `TransformerEncoderLayer`s with the fused `in_proj`); `query_book.final_norm.*` unchanged.
* `heatmap_head.*` -> `slot_mapper.*`: the upstream slot mapper keeps upstream's names.
* `sae.*` -> `sae.*` (SAELens names on both sides).
* `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*` (segment_anything names) ->
  transformers' SAM names (`segment_anything_names`) -> this package's (`SAM_PREFIX_MAP`).

`convert_upstream_checkpoint` reads such a checkpoint and writes a safetensors folder that
loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`. Torch files are read
with `torch.load(..., weights_only=True)` only: anything but a plain dict of tensors is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AddedToken, SamModel

from ..answer_format import ANSWER_TOKENS
from ..configuration_segcompass import SegCompassConfig
from ..modeling_segcompass import SegCompassForReasoningSegmentation
from ..sparse_autoencoder import SparseAutoencoder
from .backbones import (
    SAM_PREFIX_MAP,
    SAM_SHARED_PE_KEY,
    SEGCOMPASS_SHARED_PE_KEY,
    assemble_from_backbones,
)
from .segment_anything_names import (
    SEGMENT_ANYTHING_IGNORED,
    mlp_depths,
    sam_config_from_segment_anything,
    segment_anything_key,
    segment_anything_to_sam_model,
)

logger = logging.getLogger(__name__)

#: The file upstream's checkpoint manager writes the non-LLM modules to.
REFSEG_FILE = "refseg_modules.pt"
#: The folder upstream's checkpoint manager writes the LLM (and its tokenizer) to.
LLM_FOLDER = "llm_hf"
#: Upstream module prefixes -> this package's module prefixes.
UPSTREAM_MODULES: dict[str, str] = {
    "sae.": "sae.",
    "query_book.": "codebook.",
    "heatmap_head.": "slot_mapper.",
    "image_encoder.": "image_encoder.",
    "prompt_encoder.": "prompt_encoder.",
    "mask_decoder.": "mask_decoder.",
}
#: Upstream's launch scripts (scripts/train/*/) set `worker.sae.hook_layer`, the index into
#: the LLM's `hidden_states` that feeds the SAE (13 for Qwen2.5-VL-7B, 16 for LLaVA-1.5).
UPSTREAM_HOOK_LAYERS: dict[str, int] = {
    "qwen2.5-vl-7b": 13,
    "llava-1.5-7b": 16,
    "llava-1.5-13b": 16,
}
_CODEBOOK_LAYER = re.compile(r"^query_book\.encoder\.layers\.(\d+)\.(.+)$")
_SAE_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


# ---------------------------------------------------------------------------- reading files
def load_tensor_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """`torch.load(path, weights_only=True)` of a file that must hold a plain dict of tensors.

    Args:
        path: the torch file.
        what: what the file is, for the messages (e.g. "upstream refseg_modules.pt").

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds pickled objects other than tensors (refused unread: a
            pickle can run arbitrary code), or is not a flat ``{str: Tensor}`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} is not a file: {str(path)!r}.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Refusing {str(path)!r} ({what}): it holds pickled Python objects other than "
            "tensors, and loading those can run arbitrary code, so it is read only with "
            "torch.load(weights_only=True), which refused it. Expected a plain dict of tensors "
            "(as torch.save(module.state_dict(), path) writes). If you trust the file, re-save "
            f"just its tensors. torch said: {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"Cannot read {str(path)!r} ({what}) as a torch file: {error}. Expected a plain "
            "dict of tensors written by torch.save."
        ) from error
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"Refusing {str(path)!r} ({what}): expected a plain dict of tensors, got a "
            f"{type(loaded).__name__}."
        )
    bad = [
        f"{key!r} ({type(value).__name__})"
        for key, value in loaded.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if bad:
        raise ValueError(
            f"Refusing {str(path)!r} ({what}): expected a plain dict of tensors, but these "
            f"entries are not str -> Tensor: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}."
        )
    return dict(loaded)


# ---------------------------------------------------------------------------- renaming
def _sam_model_to_segcompass(key: str) -> str:
    """A transformers `SamModel` name -> this package's name."""
    if key == SAM_SHARED_PE_KEY:
        return SEGCOMPASS_SHARED_PE_KEY
    for prefix, target in SAM_PREFIX_MAP.items():
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    return key


def _rename(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Upstream names -> this package's names; returns (renamed, unknown keys)."""
    sam_keys = [k for k in state_dict if k.startswith(("image_encoder.", "prompt_encoder.",
                                                        "mask_decoder."))]  # fmt: skip
    depths = mlp_depths(sam_keys)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        target: str | None = None
        if key in SEGMENT_ANYTHING_IGNORED:
            continue
        if key == "query_book.codebook.weight":
            target, tensor = "codebook.codebook", tensor.t().contiguous()  # (d_sae, d_q)
        elif key == "query_book.slot_queries":
            target, tensor = "codebook.slot_queries", tensor.reshape(tensor.shape[-2:])  # (K, d_q)
        elif key.startswith("query_book.final_norm."):
            target = "codebook." + key[len("query_book.") :]
        elif match := _CODEBOOK_LAYER.match(key):
            target = f"codebook.layers.{match[1]}.{match[2]}"
        elif key.startswith("heatmap_head."):
            target = "slot_mapper." + key[len("heatmap_head.") :]
        elif key.startswith("sae.") and key[len("sae.") :] in _SAE_NAMES:
            target = key
        elif key in sam_keys:
            sam_name = segment_anything_key(key, depths)
            target = None if sam_name is None else _sam_model_to_segcompass(sam_name)
        if target is None:
            unknown.append(key)
        else:
            out[target] = tensor
    return out, unknown


def _expected_shapes(config: SegCompassConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the model `config` builds (built on the meta device)."""
    with torch.device("meta"):
        model = SegCompassForReasoningSegmentation(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _listed(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_upstream_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: SegCompassConfig
) -> dict[str, torch.Tensor]:
    """Rename upstream SegCompass tensors to this package's names, checked against `config`.

    Accepts the keys of upstream's `refseg_modules.pt` (`sae.*`, `query_book.*`,
    `heatmap_head.*`, `prompt_encoder.*`, `mask_decoder.*`) and of a segment_anything SAM
    state dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`), alone or together
    (see the module docstring for the mapping). The SAM ViT tensors are dropped when
    `config.image_encoder_type` is not `"sam"` (the model then has no SAM ViT).

    Every module the input touches must come out complete: the result loads with
    ``model.load_state_dict(result, strict=False)`` and sets every tensor of those modules.

    Args:
        state_dict: upstream name -> tensor.
        config: the config of the model the tensors are for; `SegCompassConfig.upstream`
            gives a slot mapper with upstream's parameter names.

    Returns:
        this package's name -> tensor (the codebook transposed, the slot queries reshaped,
        everything else as given).

    Raises:
        ValueError: listing the keys that are not upstream names, the keys this config's
            model has no place for (e.g. `heatmap_head.*` with the package's own slot
            mapper), the shape mismatches, or the tensors missing from a module.
    """
    renamed, unknown = _rename(state_dict)
    if unknown:
        raise ValueError(
            f"convert_upstream_state_dict: {len(unknown)} keys are not upstream SegCompass or "
            f"segment_anything SAM names: {_listed(sorted(unknown))}. Expected keys under "
            f"{sorted(UPSTREAM_MODULES)} (refseg_modules.pt, a SAM .pth)."
        )
    if config.image_encoder_type != "sam":
        dropped = [k for k in renamed if k.startswith("image_encoder.")]
        for key in dropped:
            del renamed[key]
        if dropped:
            logger.info(
                "image_encoder_type=%r: the %d SAM ViT tensors are not used.",
                config.image_encoder_type,
                len(dropped),
            )
    expected = _expected_shapes(config)
    homeless = sorted(k for k in renamed if k not in expected)
    if homeless:
        hint = (
            " The heatmap_head.* tensors need the upstream slot mapper: build the config with "
            "SegCompassConfig.upstream(...)."
            if any(k.startswith("slot_mapper.") for k in homeless)
            else ""
        )
        raise ValueError(
            f"convert_upstream_state_dict: this config's model has no place for "
            f"{len(homeless)} converted tensors: {_listed(homeless)}.{hint}"
        )
    mismatched = [
        f"{k}: {tuple(t.shape)} vs {tuple(expected[k])}"
        for k, t in renamed.items()
        if tuple(t.shape) != tuple(expected[k])
    ]
    if mismatched:
        raise ValueError(
            "convert_upstream_state_dict: shapes differ between the checkpoint and the config "
            f"(checkpoint vs model): {_listed(mismatched, 8)}. Build the config with the "
            "checkpoint's dimensions (d_sae, codebook_dim, num_slots, the VLM and SAM sizes)."
        )
    modules = {k.split(".")[0] for k in renamed}
    missing = sorted(k for k in expected if k.split(".")[0] in modules and k not in renamed)
    if missing:
        raise ValueError(
            f"convert_upstream_state_dict: the checkpoint lacks {len(missing)} tensors of the "
            f"modules it holds ({sorted(modules)}): {_listed(missing)}."
        )
    return renamed


# ---------------------------------------------------------------------------- whole checkpoints
def _has_weights(folder: Path) -> bool:
    return any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )


def _upstream_base(vlm_config: Mapping[str, Any]) -> str:
    """The `SegCompassConfig.upstream` base of a VLM config.json (its model type and width)."""
    model_type = vlm_config.get("model_type")
    if model_type in ("qwen2_5_vl", "qwen2_5_vl_text"):
        return "qwen2.5-vl-7b"
    if model_type == "llava":
        hidden = (vlm_config.get("text_config") or {}).get("hidden_size", 4096)
        return "llava-1.5-13b" if hidden == 5120 else "llava-1.5-7b"
    raise ValueError(
        f"convert_upstream_checkpoint: VLM model_type {model_type!r} is none of upstream's "
        "backbones (qwen2_5_vl, llava); pass base= explicitly."
    )


def _preset_fields(base: str, num_slots: int) -> dict[str, Any]:
    """The architecture fields of `SegCompassConfig.upstream(base)` (weights-independent ones).

    The VLM / SAM configs, token ids and the SAE's size come from the checkpoint instead.
    """
    skip = {"vlm_config", "sam_config", "ref_token_id", "think_start_token_id",
            "think_end_token_id", "d_sae", "sae_architecture", "sae_k", "num_slots",
            "image_encoder_type", "tie_word_embeddings"}  # fmt: skip
    preset = SegCompassConfig.upstream(base=base, num_slots=num_slots)
    fields = SegCompassConfig.__annotations__
    names = [n for n in fields if n not in skip and "ClassVar" not in str(fields[n])]
    return {n: getattr(preset, n) for n in names if hasattr(preset, n)}


def _sae_from_refseg(refseg: Mapping[str, torch.Tensor], hook_layer: int) -> SparseAutoencoder:
    """Upstream's SAE (SAELens "standard": relu, b_dec not subtracted) from `sae.*` tensors."""
    w_enc = refseg["sae.W_enc"]  # (d_in, d_sae)
    sae = SparseAutoencoder(
        d_in=int(w_enc.shape[0]),
        d_sae=int(w_enc.shape[1]),
        architecture="jumprelu" if "sae.threshold" in refseg else "relu",
        k=1,
        apply_b_dec_to_input=False,
    )
    sae.load_state_dict({k[len("sae.") :]: v for k, v in refseg.items() if k.startswith("sae.")})
    sae.sae_metadata = {"hook_layer": hook_layer - 1}
    return sae


def _unflag_answer_tokens(tokenizer: Any) -> None:
    """Register `<REF_POS>`, `<think>`, `</think>` as non-special tokens (same ids).

    Upstream registers `<REF_POS>` as a special token; decoding with
    ``skip_special_tokens=True`` (as TRL does before the rewards read a completion) would
    then drop it and every answer would look ungrounded. The saved tokenizer keeps the ids.
    """
    for token in ANSWER_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            continue
        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)])
        for attribute in ("extra_special_tokens", "additional_special_tokens"):
            listed = getattr(tokenizer, attribute, None)
            if isinstance(listed, list) and token in [str(t) for t in listed]:
                try:
                    setattr(tokenizer, attribute, [t for t in listed if str(t) != token])
                except (AttributeError, TypeError, ValueError):
                    pass  # a tokenizer that keeps the list read-only: the flag is what counts


def convert_upstream_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    sam: str | os.PathLike,
    sae: str | os.PathLike | None = None,
    base_model: str | os.PathLike | None = None,
    base: str | None = None,
    hook_layer: int | None = None,
    dtype: torch.dtype | str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Write an upstream SegCompass checkpoint as a model folder of this package.

    Args:
        checkpoint_dir: a step folder of upstream's trainer, holding `refseg_modules.pt`
            and `llm_hf/`.
        output_dir: where the model (safetensors, config, carried code) and its processor
            are written.
        sam: segment_anything's SAM `.pth` the model was trained with (upstream: ViT-H,
            `sam_vit_h_4b8939.pth`); its ViT becomes the model's image encoder. The prompt
            encoder and mask decoder come from `refseg_modules.pt` (they were trained).
        sae: a SAELens SAE folder (`cfg.json` + `sae_weights.safetensors`). Optional when
            `refseg_modules.pt` holds `sae.*` (upstream saves the SAE there; those tensors
            win over the folder's).
        base_model: a VLM folder in `save_pretrained` format for the LLM weights when
            `llm_hf/` holds none (upstream writes them only when saving with
            `save_llm_hf`), and for its tokenizer / processor files when `llm_hf/` lacks them.
        base: the `SegCompassConfig.upstream` base ("qwen2.5-vl-7b", "llava-1.5-7b",
            "llava-1.5-13b"); default: read from the VLM config.
        hook_layer: upstream's `worker.sae.hook_layer`, the `hidden_states` index that fed
            the SAE; default: the launch script's value for `base` (13 / 16).
        dtype: dtype of the written model (upstream trains in bfloat16).
        overwrite: replace a non-empty `output_dir`.

    The processor is `llm_hf/`'s tokenizer and image processor; `<think>` and `</think>` are
    added when missing (upstream writes them as plain text) and `<REF_POS>` is registered as a
    non-special token with its id unchanged (see `_unflag_answer_tokens`).

    Returns:
        The output folder; ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads
        it without this package installed.

    Raises:
        FileNotFoundError: a file or folder named here is missing.
        ValueError: a torch file holds anything but a plain dict of tensors, keys are unknown
            or missing, shapes disagree, or the LLM weights cannot be found.
    """
    checkpoint = Path(checkpoint_dir)
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"convert_upstream_checkpoint: {str(output)!r} is not empty; pass overwrite=True "
            "(--overwrite) or another output folder."
        )
    refseg = load_tensor_dict(checkpoint / REFSEG_FILE, f"upstream {REFSEG_FILE}")
    sam_state = load_tensor_dict(sam, "segment_anything SAM checkpoint")
    needed = ("query_book.", "heatmap_head.", "prompt_encoder.", "mask_decoder.")
    absent = [p for p in needed if not any(k.startswith(p) for k in refseg)]
    if absent:
        raise ValueError(
            f"convert_upstream_checkpoint: {checkpoint / REFSEG_FILE} holds no "
            f"{[p + '*' for p in absent]} tensors; an upstream step folder's {REFSEG_FILE} "
            f"holds {list(needed)} (and sae.*)."
        )

    # The LLM: llm_hf/ when it holds weights, else base_model.
    llm_hf = checkpoint / LLM_FOLDER
    if _has_weights(llm_hf):
        vlm_source = llm_hf
    elif base_model is not None:
        vlm_source = Path(base_model)
        logger.warning(
            "%s holds no LLM weights; the LLM comes from %s. Upstream writes the trained LLM "
            "to llm_hf/ only with save_llm_hf (or merge its FSDP shards with "
            "scripts/model_merger.py).", llm_hf, vlm_source,
        )  # fmt: skip
    else:
        raise ValueError(
            f"convert_upstream_checkpoint: {str(llm_hf)!r} holds no LLM weights "
            "(model.safetensors[.index.json]); upstream writes them there only when saving "
            "with save_llm_hf. Pass base_model= (--base-model) with a VLM folder, e.g. the "
            "trained LLM merged from the FSDP shards."
        )
    has_tokenizer = (llm_hf / "tokenizer_config.json").is_file()
    processor_source = llm_hf if has_tokenizer else vlm_source
    config_file = vlm_source / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"convert_upstream_checkpoint: no VLM config at {config_file}.")
    vlm_json = json.loads(config_file.read_text(encoding="utf-8"))
    base = base or _upstream_base(vlm_json)
    if base not in UPSTREAM_HOOK_LAYERS:
        raise ValueError(
            f"convert_upstream_checkpoint: base {base!r} is none of {sorted(UPSTREAM_HOOK_LAYERS)}."
        )
    hook_layer = UPSTREAM_HOOK_LAYERS[base] if hook_layer is None else hook_layer
    num_layers = (vlm_json.get("text_config") or vlm_json).get("num_hidden_layers")
    if isinstance(num_layers, int) and not 1 <= hook_layer <= num_layers:
        raise ValueError(
            f"convert_upstream_checkpoint: hook_layer {hook_layer} is outside the LLM's "
            f"hidden_states[1..{num_layers}] (hidden_states[0] is the embedding output, which "
            "upstream never hooks); pass the checkpoint's worker.sae.hook_layer (--hook-layer)."
        )

    # The SAE: a SAELens folder, else upstream's own tensors.
    if sae is not None:
        sae_module = SparseAutoencoder.load(sae)
    elif "sae.W_enc" in refseg:
        sae_module = _sae_from_refseg(refseg, hook_layer)
    else:
        raise ValueError(
            f"convert_upstream_checkpoint: {REFSEG_FILE} holds no sae.* tensors; pass sae= "
            "(--sae) with the SAE as a SAELens folder."
        )

    # SAM: segment_anything names -> a transformers SamModel (no second copy of the weights).
    sam_renamed, sam_unknown = segment_anything_to_sam_model(sam_state)
    if sam_unknown:
        raise ValueError(
            f"convert_upstream_checkpoint: {str(sam)!r} has keys that are not segment_anything "
            f"SAM names: {_listed(sorted(sam_unknown))}."
        )
    with torch.device("meta"):
        sam_model = SamModel(sam_config_from_segment_anything(sam_state))
    sam_model.load_state_dict(sam_renamed, strict=True, assign=True)

    slot_queries = refseg["query_book.slot_queries"]
    num_slots = int(slot_queries.shape[-2])
    layers = {int(m[1]) for k in refseg if (m := _CODEBOOK_LAYER.match(k))}
    overrides = _preset_fields(base, num_slots)
    overrides.update(
        codebook_dim=int(slot_queries.shape[-1]),
        codebook_layers=len(layers),
        codebook_ffn_dim=int(refseg["query_book.encoder.layers.0.linear1.weight"].shape[0]),
        slot_mapper_heads=int(refseg["heatmap_head.fuser.0.weight"].shape[0]),
        sae_layer=hook_layer - 1,
    )
    assembled = assemble_from_backbones(
        str(vlm_source),
        sam_model,
        sae_module,
        vlm_processor=str(processor_source),
        num_slots=num_slots,
        dtype=dtype,
        **overrides,
    )
    model, processor = assembled.model, assembled.processor
    if assembled.added_tokens:
        logger.warning(
            "The tokenizer lacked %s; they were added (with fresh embedding rows).",
            assembled.added_tokens,
        )
    _unflag_answer_tokens(processor.tokenizer)
    converted = convert_upstream_state_dict(refseg, model.config)
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:  # convert_upstream_state_dict checked the names; a bug if not
        raise RuntimeError(f"Unexpected keys after conversion: {result.unexpected_keys[:5]}")
    output.mkdir(parents=True, exist_ok=True)
    del model.processor  # saved next to the model below
    model.save_pretrained(output)
    processor.save_pretrained(output)
    logger.info("Converted %s into %s.", checkpoint, output)
    return output


__all__ = [
    "LLM_FOLDER",
    "REFSEG_FILE",
    "UPSTREAM_HOOK_LAYERS",
    "convert_upstream_checkpoint",
    "convert_upstream_state_dict",
    "load_tensor_dict",
]
