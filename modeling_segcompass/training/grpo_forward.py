"""The policy forward of a SegCompass GRPO loss step, and the helpers it runs on.

`SegCompassGRPOTrainer` computes TRL's per-token log-probabilities from the SegCompass
forward; inside a loss call the same forward also gives the mask loss. This file holds:

* `PolicyForwardCapture`: the one object through which a loss call hands its mask targets
  to the log-probability forward and gets the forward's output back (its docstring gives
  the data flow);
* `completion_logits_hook`: projects only the completion positions through `lm_head`;
* `pixel_rows_per_sample` / `slice_pixels` / `slice_rows`: split a batch whose VLM patches
  are packed (Qwen2-VL) into row ranges;
* `unwrap_peft`: the SegCompass model under a PEFT wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .grpo_data import SegmentationTargets

__all__ = [
    "PolicyForwardCapture",
    "completion_logits_hook",
    "pixel_rows_per_sample",
    "slice_pixels",
    "slice_rows",
    "unwrap_peft",
]


@dataclass
class PolicyForwardCapture:
    """What one loss call hands to the policy's log-probability forward, and what comes back.

    TRL's `_compute_loss` gets the policy's log-probabilities from
    `_get_per_token_logps_and_entropies(model, input_ids, ...)`, whose signature has no room
    for mask targets, so the trainer holds this object as `trainer._policy_forward` for the
    duration of one loss call:

    1. `SegCompassGRPOTrainer._compute_loss` creates it from the batch's mask targets and sets
       `trainer._policy_forward` (the only place that sets it);
    2. TRL's `_compute_loss` calls `_get_per_token_logps_and_entropies` on the policy, which
       reads it. With `with_mask_loss` the policy runs the full SegCompass forward with the
       targets and the output (its `seg_loss`, `conf_loss`, `sae_loss`, mask and confidence
       logits) is appended to `outputs`. Without, the forward gets the SAM frames
       `targets.sam_pixel_values` (a SegCompass forward needs them) and computes no mask loss;
    3. `_compute_loss` clears `trainer._policy_forward` (in a ``finally``, right after TRL's
       loss), then takes the output from `outputs`, or runs a second forward for the mask loss.

    Outside a loss call `trainer._policy_forward` is None: the old-policy and reference
    log-probabilities computed while sampling (without grad) run the VLM backbone alone.

    Attributes:
        targets: the batch's mask targets, one row per completion.
        with_mask_loss: the policy forward also computes the mask loss
            (`SegCompassGRPOConfig.mask_loss_in_policy_forward`).
        outputs: the `SegCompassOutput` of each policy forward that had the targets; one per
            loss call, since that forward takes the whole batch at once.
    """

    targets: SegmentationTargets
    with_mask_loss: bool
    outputs: list[Any] = field(default_factory=list)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The SegCompass model under a PEFT wrapper (or the model itself)."""
    if hasattr(model, "decode_masks"):
        return model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def completion_logits_hook(
    lm_head: nn.Module, logits_to_keep: int, store: dict[str, torch.Tensor]
) -> Callable[..., None]:
    """Forward hook on the VLM backbone: logits of the positions that predict the completion.

    The state at position t predicts token t + 1, so the C completion tokens are predicted by
    the states at -C-1 .. -2. Calling `lm_head` as a module (not reading its weight) keeps
    DeepSpeed ZeRO-3's gather hooks in charge of the weight.
    """

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        store["logits"] = lm_head(hidden[:, -logits_to_keep - 1 : -1])  # (B, C, V)

    return hook


def pixel_rows_per_sample(
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    num_images: list[int] | None,
    total: int,
) -> list[int] | None:
    """Rows of `pixel_values` owned by each sample (Qwen2-VL packs patches of all images)."""
    if pixel_values is None:
        return None
    if image_grid_thw is not None:
        per_image = image_grid_thw.prod(-1).tolist()
        counts = num_images if num_images is not None else [1] * len(per_image)
        rows, cursor = [], 0
        for n in counts:
            rows.append(int(sum(per_image[cursor : cursor + n])))
            cursor += n
        return rows
    if pixel_values.shape[0] == total:
        return [1] * total
    raise ValueError(
        "SegCompassGRPOTrainer: cannot split pixel_values "
        f"{tuple(pixel_values.shape)} over {total} samples without image_grid_thw; VLMs with "
        "one pixel row per sample (LLaVA) or Qwen2-VL patch packing are supported."
    )


def slice_pixels(
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    num_images: list[int] | None,
    rows_per_sample: list[int] | None,
    start: int,
    end: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if pixel_values is None or rows_per_sample is None:
        return pixel_values, image_grid_thw
    row_start, row_end = sum(rows_per_sample[:start]), sum(rows_per_sample[:end])
    pv = pixel_values[row_start:row_end]
    if image_grid_thw is None:
        return pv, None
    counts = num_images if num_images is not None else [1] * image_grid_thw.shape[0]
    return pv, image_grid_thw[sum(counts[:start]) : sum(counts[:end])]


def slice_rows(batch: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Rows start..end of a rollout batch (VLM patches split by image grid)."""
    total = batch["input_ids"].shape[0]
    rows = pixel_rows_per_sample(
        batch.get("pixel_values"), batch.get("image_grid_thw"), None, total
    )
    pv, thw = slice_pixels(
        batch.get("pixel_values"), batch.get("image_grid_thw"), None, rows, start, end
    )
    out = {
        key: value[start:end]
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and key not in ("pixel_values", "image_grid_thw")
    }
    out["pixel_values"], out["image_grid_thw"] = pv, thw
    return out
