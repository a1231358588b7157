"""Shared helpers of the interpret modules: one frozen forward and the concept trace it gives.

`_forward` runs the model once in eval mode without gradients (optionally with an
``edit_concepts`` hook and a fixed image embedding). `slot_concept_totals` /
`top_concepts` read how much each SAE latent fed a slot: the sum over tokens of the model's
``slot_concept_weights`` (last codebook layer's attention to the token times the latent's
activation on it). `_binary_iou` compares masks on the valid (unpadded) area of the mask
grid, the IoU of two empty masks counted as 1 (nothing changed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..modeling_segcompass import SegCompassOutput

# Keys of a processor batch that `forward` takes (targets are added where needed).
_FORWARD_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "sam_pixel_values",
    "image_embeddings",
    "valid_mask",  # the image area: the losses' and `config.heatmap_outside_fill`'s
)
_TARGET_KEYS = ("gt_masks", "num_objects")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _check_inputs(inputs: Any, caller: str) -> Mapping[str, Any]:
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        raise TypeError(
            f"{caller}: expected `inputs` to be a SegCompassProcessor batch (a dict with an "
            f"input_ids (B, L) tensor), got {type(inputs).__name__}. Build it with "
            "processor(images, instructions, responses) or build_explanation_inputs(...)."
        )
    if inputs["input_ids"].dim() != 2:
        raise ValueError(
            f"{caller}: input_ids must be (B, L), got {tuple(inputs['input_ids'].shape)}."
        )
    return inputs


@torch.no_grad()
def _forward(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    targets: bool = False,
    edit: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    image_embeddings: torch.Tensor | None = None,
) -> SegCompassOutput:
    """One eval-mode, no-grad forward on the keys `forward` takes (optionally with an edit)."""
    device = _device(model)
    keys = _FORWARD_KEYS + (_TARGET_KEYS if targets else ())
    kwargs = {k: inputs[k].to(device) for k in keys if inputs.get(k) is not None}
    if image_embeddings is not None:  # frozen: the very same embedding, no re-encoding
        kwargs.pop("sam_pixel_values", None)
        kwargs["image_embeddings"] = image_embeddings.to(device)
    if targets and "gt_masks" in kwargs:
        kwargs["gt_masks"] = kwargs["gt_masks"].float()
    was_training = model.training
    model.eval()
    try:
        return model(**kwargs, compute_logits=False, edit_concepts=edit)
    finally:
        model.train(was_training)


def slot_concept_totals(
    output: SegCompassOutput, sample: int, slot: int, d_sae: int | None = None
) -> torch.Tensor:
    """(d_sae,) weight of every latent in one slot: ``slot_concept_weights`` summed over tokens.

    `d_sae` defaults to the largest active latent id + 1 (pass ``config.d_sae`` for a fixed size).
    """
    weights = output.slot_concept_weights[sample, slot].detach().float().cpu()  # (L, n)
    indices = output.concept_indices[sample].cpu()  # (L, n)
    active = output.concept_values[sample].cpu() > 0
    size = d_sae if d_sae is not None else int(indices.max()) + 1 if indices.numel() else 1
    totals = torch.zeros(size)
    totals.index_add_(0, indices[active].flatten(), weights[active].flatten())
    return totals


def _active_latents(output: SegCompassOutput, sample: int) -> set[int]:
    indices = output.concept_indices[sample]
    return set(indices[output.concept_values[sample] > 0].tolist())


def _valid_area(inputs: Mapping[str, Any], batch: int, size: int) -> torch.Tensor:
    valid = inputs.get("valid_mask")
    if valid is None:
        return torch.ones(batch, size, size, dtype=torch.bool)
    return valid.bool().cpu()


def _binary_iou(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU over the last two dims, restricted to `valid`; both empty -> 1."""
    a, b = a & valid, b & valid
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def top_concepts(output: SegCompassOutput, sample: int, slot: int, n: int) -> list[int]:
    """The `n` latents with the largest weight in one slot (fewer if fewer are active)."""
    totals = slot_concept_totals(output, sample, slot)
    count = min(n, int((totals > 0).sum()))
    return totals.topk(count).indices.tolist() if count else []


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _nan_to_none_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _nan_to_none(v) for k, v in data.items()}
