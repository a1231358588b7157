"""The optimisation recipe of the authors' code: what trains, at which rate, on which schedule.

Upstream SegCompass (github.com/ZhenyuLU-Heliodore/SegCompass) trains with verl; its actor
(`verl/workers/fsdp_workers.py`, `_build_model_optimizer`) and launch scripts
(`scripts/train/*/gref_*_n8.sh`, `scripts/initial.yaml`) fix:

* which parameters train (`freeze_like_upstream`): the SAE is frozen during RL; the whole
  VLM is frozen (vision tower, projector, token embeddings, final norm, `lm_head`) except
  the decoder layers after the SAE hook; SAM's image encoder never runs (its embeddings
  are cached); the codebook, slot mapper, prompt encoder and mask decoder train;
* AdamW, betas (0.9, 0.999), weight decay 0.01 on every parameter, base rate 1.6e-6 with
  per-module multipliers (`ModuleLearningRates.upstream` in `sft.py`);
* torch's `OneCycleLR` with `pct_start=0`, `div_factor=1`, cosine annealing and
  `final_div_factor=6.7` over `training_steps + 1` steps: the rate starts (just below) the
  peak and falls by a half cosine towards peak / 6.7 (`one_cycle_cosine_factor`).

Library side (not remote code).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "UPSTREAM_BASE_LR",
    "UPSTREAM_FINAL_DIV_FACTOR",
    "UPSTREAM_WEIGHT_DECAY",
    "freeze_like_upstream",
    "one_cycle_cosine_factor",
    "one_cycle_cosine_scheduler",
]

#: `worker.actor.optim.base_lr` of the launch scripts (the yaml's 1e-6 is overridden).
UPSTREAM_BASE_LR = 1.6e-6
#: `optim.weight_decay` of scripts/initial.yaml, applied by AdamW to every parameter group.
UPSTREAM_WEIGHT_DECAY = 0.01
#: `optim.lr_final_div_factor`: the last rate is the peak divided by this.
UPSTREAM_FINAL_DIV_FACTOR = 6.7


def one_cycle_cosine_factor(
    step: int, num_training_steps: int, final_div_factor: float = UPSTREAM_FINAL_DIV_FACTOR
) -> float:
    """Learning-rate factor (of the peak) of update `step` (0-based) in upstream's schedule.

    `OneCycleLR(total_steps=T + 1, pct_start=0, div_factor=1, anneal_strategy="cos")` with
    T = `num_training_steps`, stepped once after each update, gives update t the rate
    `peak * (m + (1 - m) * (1 + cos(pi * (t + 1) / (T + 1))) / 2)` with `m = 1 / final_div_factor`.

    >>> round(one_cycle_cosine_factor(0, 1), 4), round(one_cycle_cosine_factor(1, 1), 4)
    (0.5746, 0.1493)
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1; got {num_training_steps}.")
    if not final_div_factor >= 1:
        raise ValueError(f"final_div_factor must be >= 1; got {final_div_factor}.")
    low = 1.0 / final_div_factor
    progress = min(step + 1, num_training_steps + 1) / (num_training_steps + 1)
    return low + (1.0 - low) * (1.0 + math.cos(math.pi * progress)) / 2.0


def one_cycle_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    final_div_factor: float = UPSTREAM_FINAL_DIV_FACTOR,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` over each group's own rate with `one_cycle_cosine_factor` (upstream's
    schedule), for a Trainer's ``optimizers=(optimizer, scheduler)`` or a custom loop."""
    factor: Callable[[int], float] = lambda step: one_cycle_cosine_factor(  # noqa: E731
        step, num_training_steps, final_div_factor
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_like_upstream(model: nn.Module, *, train_sae: bool = False) -> dict[str, Any]:
    """Set `requires_grad` as upstream's RL stage does; returns a summary.

    Trainable: the VLM's decoder layers from index `sae_layer + 2` on, the codebook, the slot
    mapper, SAM's prompt encoder and mask decoder (and the SAE with `train_sae=True`).
    Frozen: everything else of the VLM (vision tower, projector, embeddings, layers
    0 .. `sae_layer + 1`, final norm, `lm_head`), the SAE, the image encoder. Upstream counts
    the hook in hidden states (`hook_layer` = `sae_layer + 1`, entry 0 the embeddings) and
    unfreezes `layers[hook_layer + 1:]`, so the layer right after the SAE input stays frozen.
    With tied embeddings `lm_head` is the embedding matrix: frozen either way.

    Args:
        model: a `SegCompassForReasoningSegmentation` (PEFT / DDP wrappers looked through).
        train_sae: keep the SAE trainable (upstream freezes it during RL).

    Returns:
        ``{"first_trainable_layer": i, "trainable": n, "frozen": n}`` (parameter counts).
    """
    from ..modeling_segcompass import SegCompassForReasoningSegmentation
    from ..vlm_states import _decoder_layers

    inner = model
    for _ in range(8):
        if isinstance(inner, SegCompassForReasoningSegmentation):
            break
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        else:
            break
    if not isinstance(inner, SegCompassForReasoningSegmentation):
        raise TypeError(
            "freeze_like_upstream needs a SegCompassForReasoningSegmentation (optionally wrapped "
            f"by PEFT or DDP); got {type(model).__name__}."
        )
    inner.vlm.requires_grad_(False)
    layers = _decoder_layers(inner.vlm)
    first = inner.config.sae_layer + 2
    for layer in list(layers)[first:]:
        layer.requires_grad_(True)
    inner.sae.requires_grad_(train_sae)
    if inner.image_encoder is not None:
        inner.image_encoder.requires_grad_(False)
    for name in ("codebook", "slot_mapper", "prompt_encoder", "mask_decoder"):
        getattr(inner, name).requires_grad_(True)
    trainable = sum(p.numel() for p in inner.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in inner.parameters() if not p.requires_grad)
    return {"first_trainable_layer": first, "trainable": trainable, "frozen": frozen}
