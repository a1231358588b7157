"""Editing the sparse codes of a frozen forward, and how far each slot moved.

An edit zeroes chosen SAE latents (or renames ``old -> new``: the activation stays, the
concept changes) through the model's ``edit_concepts`` forward hook, before the query
codebook; the inputs and the unedited forward's image embedding stay the same. Every
measure of the change is computed on the valid (unpadded) area of the mask grid: see
`CHANGE_MEASURES` and `_changes`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..modeling_segcompass import SegCompassOutput
from .trace import _binary_iou, _forward, _valid_area


def _take_rows(inputs: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The batch restricted (or replicated) to `rows`, including the Qwen-style flat pixels.

    ``pixel_values`` is (total patches, dim) over the whole batch: image i owns
    ``prod(image_grid_thw[i])`` consecutive rows. One image per sequence is assumed.
    """
    batch = inputs["input_ids"].shape[0]
    index = torch.as_tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    if pixels is not None and grid is not None:
        if grid.shape[0] != batch:
            raise ValueError(
                f"ablation needs one image per sequence; got image_grid_thw for {grid.shape[0]} "
                f"images and {batch} sequences."
            )
        counts = grid.prod(-1).tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        out["pixel_values"] = torch.cat([pixels[starts[r] : starts[r + 1]] for r in rows])
    for key, value in inputs.items():
        if key == "pixel_values" and "pixel_values" in out:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[key] = value[index.to(value.device)]
    return out


def _edit_function(
    zero: Sequence[Sequence[int]],
    swaps: Sequence[Mapping[int, int]],
    d_sae: int,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`edit_concepts` hook: per row, zero the latents in ``zero[b]`` and rename ``a -> c``
    for every ``(a, c)`` in ``swaps[b]`` (the activation stays, the concept changes)."""
    for ids in [*zero, *(list(s) + list(s.values()) for s in swaps)]:
        bad = [int(i) for i in ids if not 0 <= int(i) < d_sae]
        if bad:
            raise ValueError(f"concept ids must lie in [0, d_sae={d_sae}), got {bad}.")
    rows = len(zero)

    def edit(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if indices.shape[0] != rows:
            raise ValueError(f"edit built for {rows} rows applied to {indices.shape[0]}.")
        device = indices.device
        kill = torch.zeros(rows, d_sae, dtype=torch.bool, device=device)
        table = torch.arange(d_sae, device=device).repeat(rows, 1)  # (B, d_sae)
        for b in range(rows):
            if len(zero[b]):
                kill[b, torch.as_tensor(list(zero[b]), device=device)] = True
            for old, new in swaps[b].items():
                table[b, int(old)] = int(new)
        batch_index = torch.arange(rows, device=device)[:, None, None]  # (B, 1, 1)
        values = values.masked_fill(kill[batch_index, indices], 0)  # (B, L, n)
        return table[batch_index, indices], values

    return edit


# The measures of how far an edit moved a slot, all (E, K), computed on the valid area.
CHANGE_MEASURES = (
    "mask_change",
    "soft_mask_change",
    "mask_logit_change",
    "prob_change",
    "heatmap_change",
    "conf_change",
)


def _soft_iou(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft IoU of two probability maps over the last two dims: sum(min) / sum(max) on `valid`.

    Equals the binary IoU for 0/1 maps; 1 for identical maps; both empty -> 1.
    """
    area = valid.to(p.dtype)
    inter = (torch.minimum(p, q) * area).flatten(-2).sum(-1)
    union = (torch.maximum(p, q) * area).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp_min(1e-30), torch.ones_like(union))


def _changes(
    before: SegCompassOutput,
    after_masks: torch.Tensor,
    after_heatmaps: torch.Tensor,
    after_conf: torch.Tensor,
    rows: Sequence[int],
    valid: torch.Tensor,
    threshold: float,
) -> dict[str, torch.Tensor]:
    """How far each edited forward moved each slot, relative to the unedited one.

    Returns a dict of (E, K) tensors (E = edits), keys `CHANGE_MEASURES`:
    ``mask_change`` 1 - binary IoU of the masks; ``soft_mask_change`` 1 - soft IoU of the
    sigmoid masks (double precision, so that it does not underflow far from the threshold);
    ``mask_logit_change`` mean |delta mask logit|; ``prob_change`` mean |delta sigmoid|;
    ``heatmap_change`` mean |delta heatmap logit| (the prompt SAM received); ``conf_change``
    the change of the sigmoid confidence. Means are over the valid area.
    """
    index = torch.as_tensor(list(rows))
    ref_logits = before.mask_logits.detach().cpu().double()[index]  # (E, K, M, M)
    new_logits = after_masks.detach().cpu().double()
    area = valid[index].unsqueeze(1)  # (E, 1, M, M)
    count = area.flatten(-2).sum(-1).clamp_min(1).double()  # (E, 1)

    def mean_abs(delta: torch.Tensor) -> torch.Tensor:
        return ((delta.abs() * area).flatten(-2).sum(-1) / count).float()

    ref_prob, new_prob = torch.sigmoid(ref_logits), torch.sigmoid(new_logits)
    ref_heat = before.heatmap_logits.detach().cpu().double()[index]
    conf = torch.sigmoid(after_conf.detach().cpu().float()) - torch.sigmoid(
        before.conf_logits.detach().cpu().float()[index]
    )
    return {
        "mask_change": 1.0 - _binary_iou(ref_logits > threshold, new_logits > threshold, area),
        "soft_mask_change": (1.0 - _soft_iou(ref_prob, new_prob, area)).float(),
        "mask_logit_change": mean_abs(new_logits - ref_logits),
        "prob_change": mean_abs(new_prob - ref_prob),
        "heatmap_change": mean_abs(after_heatmaps.detach().cpu().double() - ref_heat),
        "conf_change": conf,
    }


@torch.no_grad()
def _run_edits(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput,
    rows: Sequence[int],
    zero: Sequence[Sequence[int]],
    swaps: Sequence[Mapping[int, int]] | None = None,
    *,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of sample ``rows[e]`` with edit e, chunked; (mask, heatmap, conf logits) per edit."""
    swaps = swaps if swaps is not None else [{}] * len(rows)
    masks, heatmaps, confs = [], [], []
    for start in range(0, len(rows), chunk_size):
        part = list(rows[start : start + chunk_size])
        sub = _take_rows(inputs, part)
        embeddings = output.image_embeddings[torch.as_tensor(part)]
        edit = _edit_function(
            zero[start : start + chunk_size], swaps[start : start + chunk_size], model.config.d_sae
        )
        out = _forward(model, sub, edit=edit, image_embeddings=embeddings)
        masks.append(out.mask_logits.cpu())
        heatmaps.append(out.heatmap_logits.cpu())
        confs.append(out.conf_logits.cpu())
    return torch.cat(masks), torch.cat(heatmaps), torch.cat(confs)


def _reference_output(
    model: Any, inputs: Mapping[str, Any], output: SegCompassOutput | None
) -> SegCompassOutput:
    # the IoU with the ground truth needs the forward's slot-to-target matching
    if output is None or (inputs.get("gt_masks") is not None and output.slot_to_target is None):
        output = _forward(model, inputs, targets=inputs.get("gt_masks") is not None)
    return output


def _gt_iou(
    output: SegCompassOutput,
    mask_logits: torch.Tensor,
    inputs: Mapping[str, Any],
    rows: Sequence[int],
    threshold: float,
) -> torch.Tensor:
    """(E, K) IoU of each slot's mask with its matched ground truth (NaN when unmatched)."""
    index = torch.as_tensor(list(rows))
    shape = (len(rows), mask_logits.shape[1])
    if inputs.get("gt_masks") is None or output.slot_to_target is None:
        return torch.full(shape, float("nan"))
    gt = inputs["gt_masks"].cpu()[index] > 0.5  # (E, G, M, M)
    assignment = output.slot_to_target.cpu()[index]  # (E, K)
    valid = _valid_area(inputs, inputs["input_ids"].shape[0], mask_logits.shape[-1])[index]
    pred = mask_logits.cpu() > threshold
    out = torch.full(shape, float("nan"))
    for e in range(shape[0]):
        for k in range(shape[1]):
            j = int(assignment[e, k])
            if j >= 0:
                out[e, k] = _binary_iou(pred[e, k], gt[e, j], valid[e])
    return out
