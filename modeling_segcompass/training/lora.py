"""LoRA on the VLM's language model, with the new heads trained fully.

* :func:`default_lora_config`: a `peft.LoraConfig` on the language model's attention
  projections, with the heads in ``modules_to_save`` (so ``peft.get_peft_model`` trains and
  saves them next to the adapters);
* :func:`apply_lora`: inject the adapters into ``model.vlm`` in place; the model stays a
  plain `SegCompassForReasoningSegmentation` (what :func:`.sft.train_sft` uses);
* :func:`merge_lora`: fold the adapters into the base weights for a plain export;
* :func:`save_lora_adapter`: save an injected model as a standard PEFT adapter folder
  (adapters + heads) that ``peft.PeftModel.from_pretrained(base, folder)`` restores exactly.

Why injection rather than ``peft.get_peft_model`` for training: a PeftModel with
``modules_to_save`` keeps a second copy of every saved head (at paper scale the SAE alone is
3584 x 65536 x 2 weights, about 1.9 GB in float32), and hides ``segment()`` behind the
wrapper. Injected, the model keeps its own ``forward`` / ``segment`` / ``save_pretrained`` and
full checkpoints that resume exactly; the PEFT folder is written only when asked for.

Library side (not remote code).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..modeling_segcompass import _decoder_layers

logger = logging.getLogger(__name__)

#: The heads SegCompass adds around the VLM (top-level submodules; ``image_encoder`` is None
#: when the model reads SAM embeddings computed elsewhere).
HEAD_MODULES: tuple[str, ...] = (
    "sae",
    "codebook",
    "slot_mapper",
    "image_encoder",
    "prompt_encoder",
    "mask_decoder",
)
#: Attention projections LoRA targets in the language model (Qwen2 / Llama naming).
LORA_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Where PEFT puts the wrapped model in the key names of an adapter file.
_PEFT_PREFIX = "base_model.model."


def _vlm_of(model: nn.Module) -> nn.Module:
    vlm = getattr(model, "vlm", None)
    if vlm is None:
        raise TypeError(
            f"Expected a SegCompassForReasoningSegmentation (with a `.vlm`), got "
            f"{type(model).__name__}."
        )
    return vlm


def _trained_heads(model: nn.Module) -> list[str]:
    """The heads present in ``model`` with at least one trainable parameter."""
    heads = []
    for name in HEAD_MODULES:
        module = getattr(model, name, None)
        if module is not None and any(p.requires_grad for p in module.parameters()):
            heads.append(name)
    return heads


def lora_target_modules(
    model: nn.Module, projections: Iterable[str] = LORA_PROJECTIONS
) -> list[str]:
    """Names (relative to ``model.vlm``) of the language model's attention projections.

    Only the decoder layers of the language model are targeted (the vision tower's
    attention is left alone), found through the same lookup the forward uses.
    """
    vlm = _vlm_of(model)
    layers = _decoder_layers(vlm)
    layer_ids = {id(layer) for layer in layers}
    projections = tuple(projections)
    names = []
    for name, module in vlm.named_modules():
        if id(module) in layer_ids:
            for sub_name, sub in module.named_modules():
                if sub_name.rsplit(".", 1)[-1] in projections and isinstance(sub, nn.Linear):
                    names.append(f"{name}.{sub_name}")
    if not names:
        raise ValueError(
            f"lora_target_modules: no nn.Linear named {list(projections)} in the decoder layers "
            f"of {type(vlm).__name__}; pass the projection names of this VLM family."
        )
    return names


def default_lora_config(
    model: nn.Module, *, r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0
) -> Any:
    """A `peft.LoraConfig` on the language model's q/k/v/o projections of ``model.vlm``.

    Its ``modules_to_save`` names the heads that have trainable parameters, so
    ``peft.get_peft_model(model, config)`` trains them fully and its ``save_pretrained``
    writes them next to the adapters (without them a PeftModel freezes the heads and its
    folder restores only the adapters). :func:`apply_lora` takes the same config: there the
    heads simply stay trainable.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(model),
        modules_to_save=_trained_heads(model) or None,
        bias="none",
    )


def apply_lora(model: nn.Module, lora_config: Any = None) -> nn.Module:
    """Inject LoRA adapters into ``model.vlm``; freeze the VLM's base weights, keep heads.

    After this, the trainable parameters are the LoRA adapters and every head (sae,
    codebook, slot_mapper, image_encoder, prompt_encoder, mask_decoder) that was trainable
    before; the VLM's own weights (vision tower, embeddings, LM head included) are frozen.

    Args:
        model: a `SegCompassForReasoningSegmentation`; modified in place.
        lora_config: a `peft.LoraConfig` whose ``target_modules`` name modules of
            ``model.vlm`` (default :func:`default_lora_config`). Its ``modules_to_save`` may
            name heads only (they train fully anyway).

    Returns:
        The same model (a plain `SegCompassForReasoningSegmentation`).
    """
    from peft import LoraConfig, inject_adapter_in_model

    vlm = _vlm_of(model)
    if lora_config is None:
        lora_config = default_lora_config(model)
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(
            f"apply_lora: expected a peft.LoraConfig, got {type(lora_config).__name__}."
        )
    if has_lora(model):
        raise ValueError(
            "apply_lora: the model already has LoRA layers; merge them first (merge_lora) or "
            "train the existing ones."
        )
    others = [name for name in lora_config.modules_to_save or () if name not in HEAD_MODULES]
    if others:
        raise ValueError(
            f"apply_lora: `modules_to_save` may name only the heads {list(HEAD_MODULES)} (they "
            f"stay fully trainable outside the VLM); got {others}. Remove them from the "
            "LoraConfig, or wrap the model with peft.get_peft_model instead."
        )
    if lora_config.modules_to_save:
        lora_config = copy.deepcopy(lora_config)
        lora_config.modules_to_save = None  # the heads are outside `vlm`: nothing to wrap
    inject_adapter_in_model(lora_config, vlm)
    for name, param in vlm.named_parameters():
        param.requires_grad_(".lora_" in f".{name}")
    trainable = sum(p.numel() for n, p in vlm.named_parameters() if p.requires_grad)
    logger.info("LoRA injected into the VLM: %d adapter parameters train.", trainable)
    return model


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds injected LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and remove the LoRA layers, in place.

    The result is a plain `SegCompassForReasoningSegmentation` (same outputs up to float
    rounding) that ``save_pretrained`` / ``from_pretrained`` handle like any other. VLM
    parameters stay frozen as they were during LoRA training.

    Returns:
        The same model object.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
        replaced += 1
    if replaced == 0:
        logger.warning("merge_lora: the model has no LoRA layers; nothing merged.")
    else:
        logger.info("merge_lora: merged and removed %d LoRA layers.", replaced)
    return model


@torch.no_grad()
def save_lora_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    heads: Iterable[str] | None = None,
    base_model_name_or_path: str | None = None,
    adapter_name: str = "default",
) -> list[str]:
    """Save a model with injected LoRA (:func:`apply_lora`) as a standard PEFT adapter folder.

    The folder (``adapter_config.json`` + ``adapter_model.safetensors``) holds the adapters
    and the heads as ``modules_to_save``, laid out as ``PeftModel.save_pretrained`` lays
    them out, so ``PeftModel.from_pretrained(base, save_directory)`` on the base model the
    training started from gives the trained model's outputs exactly; ``merge_and_unload()``
    on that then gives a plain model.

    Args:
        model: a `SegCompassForReasoningSegmentation` with injected LoRA layers.
        save_directory: the folder (created).
        heads: the heads saved in full (default: every head with a trainable parameter; a
            frozen head equals the base model's).
        base_model_name_or_path: recorded in the config (default: the model's
            ``config._name_or_path``).
        adapter_name: the injected adapter to save.

    Returns:
        The heads saved.
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if isinstance(model, PeftModel):
        raise TypeError(
            "save_lora_adapter: the model is already a PeftModel; call its save_pretrained()."
        )
    vlm = _vlm_of(model)
    peft_config = getattr(vlm, "peft_config", {}).get(adapter_name)
    if peft_config is None or not has_lora(model):
        raise ValueError(
            f"save_lora_adapter: the model has no injected LoRA adapter {adapter_name!r}; inject "
            "one with apply_lora, or save a model without adapters with save_pretrained."
        )
    heads = _trained_heads(model) if heads is None else list(heads)
    unknown = [h for h in heads if h not in HEAD_MODULES or getattr(model, h, None) is None]
    if unknown:
        raise ValueError(
            f"save_lora_adapter: heads {unknown} are not heads of this model; pick from "
            f"{[h for h in HEAD_MODULES if getattr(model, h, None) is not None]}."
        )
    from peft.tuners.tuners_utils import BaseTunerLayer

    vlm_name = next(name for name, module in model.named_children() if module is vlm)
    targets = sorted(
        f"{vlm_name}.{name}"
        for name, module in vlm.named_modules()
        if isinstance(module, BaseTunerLayer)
    )
    config = copy.deepcopy(peft_config)
    config.target_modules = targets  # full names: no head module can match by suffix
    config.modules_to_save = heads or None
    config.inference_mode = True
    config.base_model_name_or_path = base_model_name_or_path or (
        getattr(model.config, "_name_or_path", None) or None
    )

    tensors: dict[str, torch.Tensor] = {}
    for key, value in get_peft_model_state_dict(vlm, adapter_name=adapter_name).items():
        tensors[f"{_PEFT_PREFIX}{vlm_name}.{key}"] = value
    for head in heads:
        for key, value in getattr(model, head).state_dict().items():
            tensors[f"{_PEFT_PREFIX}{head}.{key}"] = value
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    os.makedirs(save_directory, exist_ok=True)
    save_file(
        tensors,
        os.path.join(save_directory, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    config.save_pretrained(os.fspath(save_directory))
    logger.info(
        "save_lora_adapter: %d adapter layers and heads %s saved to %s",
        len(targets),
        heads,
        save_directory,
    )
    return heads


__all__ = [
    "HEAD_MODULES",
    "LORA_PROJECTIONS",
    "apply_lora",
    "default_lora_config",
    "has_lora",
    "lora_target_modules",
    "merge_lora",
    "save_lora_adapter",
]
