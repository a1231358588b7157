"""Hungarian matching between predicted slots and ground-truth masks.

SegCompass predicts K slots per sample and supervises them with G <= K ground-truth masks
(the paper's training: confidence targets from Hungarian matching). This module provides

* `linear_sum_assignment`: a minimum-cost assignment that uses scipy when it is installed and
  otherwise an exact search over all assignments (fine up to about 8 x 8);
* `pairwise_soft_iou`, `pairwise_dice_cost`, `pairwise_bce_cost`: (K, G) matrices computed with
  one matrix product over the flattened pixels, never a Python loop over pixels;
* `match_slots`: the batched slot <-> target assignment used by the segmentation loss.

Remote-code file: imports only the standard library and torch (scipy optionally).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

try:  # scipy is optional: the exact search below covers the small K used by SegCompass.
    from scipy.optimize import linear_sum_assignment as _scipy_linear_sum_assignment
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _scipy_linear_sum_assignment = None

logger = logging.getLogger(__name__)

# 8! assignments: an 8 x 8 problem is still searched exhaustively in a few milliseconds.
MAX_EXACT_SEARCH_ASSIGNMENTS = math.factorial(8)

MatchingCost = Literal["dice_bce", "soft_iou"]


def _count_assignments(num_rows: int, num_cols: int) -> int:
    """Number of ways to assign min(R, C) rows to distinct columns: max! / (max - min)!."""
    small, large = min(num_rows, num_cols), max(num_rows, num_cols)
    return math.perm(large, small)


def _exact_search(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive minimum-cost assignment for a (R, C) cost with R <= C (float64, on CPU)."""
    num_rows, num_cols = cost.shape
    candidates = torch.tensor(
        list(itertools.permutations(range(num_cols), num_rows)), dtype=torch.long
    )  # (P, R): column chosen for each row
    totals = cost[torch.arange(num_rows).unsqueeze(0), candidates].sum(dim=1)  # (P,)
    best = candidates[int(torch.argmin(totals))]
    return torch.arange(num_rows, dtype=torch.long), best


def linear_sum_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of min(R, C) (row, column) pairs.

    Uses `scipy.optimize.linear_sum_assignment` when scipy is installed, else an exact search
    over all assignments (at most `MAX_EXACT_SEARCH_ASSIGNMENTS` candidates, i.e. up to 8 x 8 or
    e.g. 4 x 12). Both paths return the same pairs for a cost without ties.

    Args:
        cost: (R, C) real matrix; every entry must be finite.

    Returns:
        `(row_ind, col_ind)`, two LongTensors of length min(R, C) on the device of `cost`,
        rows in increasing order (the scipy convention), so that `cost[row_ind, col_ind].sum()`
        is minimal.

    Example:
        >>> rows, cols = linear_sum_assignment(torch.tensor([[4.0, 1.0], [2.0, 0.0], [5.0, 5.0]]))
        >>> rows.tolist(), cols.tolist()
        ([0, 1], [1, 0])
    """
    if not isinstance(cost, torch.Tensor):
        raise TypeError(
            f"`cost` must be a torch.Tensor of shape (R, C); got {type(cost).__name__}."
        )
    if cost.ndim != 2:
        raise ValueError(
            f"`cost` must be a 2-D (R, C) matrix; got shape {tuple(cost.shape)}. "
            "Pass one sample's cost matrix at a time."
        )
    device = cost.device
    num_rows, num_cols = cost.shape
    if num_rows == 0 or num_cols == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    cost64 = cost.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(cost64).all()):
        raise ValueError(
            "`cost` contains NaN or infinite entries; the assignment is undefined. "
            "Check the predictions for NaN logits or clamp the cost before matching."
        )

    if _scipy_linear_sum_assignment is not None:
        rows, cols = _scipy_linear_sum_assignment(cost64.numpy())
        return (
            torch.as_tensor(rows, dtype=torch.long, device=device),
            torch.as_tensor(cols, dtype=torch.long, device=device),
        )

    num_candidates = _count_assignments(num_rows, num_cols)
    if num_candidates > MAX_EXACT_SEARCH_ASSIGNMENTS:
        raise ValueError(
            f"Hungarian matching of a {num_rows} x {num_cols} cost needs scipy: without it an "
            f"exhaustive search is used, limited to {MAX_EXACT_SEARCH_ASSIGNMENTS} candidate "
            f"assignments (this problem has {num_candidates}). Install scipy "
            "(`pip install scipy`) or use fewer slots / targets."
        )
    if num_rows <= num_cols:
        rows, cols = _exact_search(cost64)
    else:
        # Solve the transposed problem (columns pick rows), then sort by row like scipy.
        cols, rows = _exact_search(cost64.T)
        order = torch.argsort(rows)
        rows, cols = rows[order], cols[order]
    return rows.to(device), cols.to(device)


def _flatten_valid(
    pred_probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten (..., N, H, W) to (..., N, H*W) and zero the pixels outside `valid` (..., H, W)."""
    probs = pred_probs.flatten(-2)  # (..., K, H*W)
    gts = targets.flatten(-2).to(probs.dtype)  # (..., G, H*W)
    if valid is None:
        weight = torch.ones_like(probs[..., :1, :])  # (..., 1, H*W)
    else:
        weight = valid.flatten(-2).unsqueeze(-2).to(probs.dtype)  # (..., 1, H*W)
    return probs, gts, weight


def pairwise_soft_iou(
    pred_probs: torch.Tensor, targets: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft IoU between every prediction and every target.

    `IoU(p, t) = sum(p * t) / max(sum(p + t - p * t), 1e-6)` over the valid pixels, the soft IoU
    of upstream's reward (`pairwise_soft_iou`, union clamped at 1e-6, so two empty masks give 0).

    Args:
        pred_probs: (..., K, H, W) probabilities in [0, 1].
        targets: (..., G, H, W) target masks in [0, 1].
        valid_mask: optional (..., H, W) bool; pixels where it is False are ignored.

    Returns:
        (..., K, G) soft IoU.

    Example:
        >>> p = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
        >>> t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
        >>> round(pairwise_soft_iou(p, t).item(), 4)
        0.75
    """
    probs, gts, weight = _flatten_valid(pred_probs, targets, valid_mask)
    probs = probs * weight
    gts = gts * weight
    inter = probs @ gts.transpose(-1, -2)  # (..., K, G)
    union = probs.sum(-1).unsqueeze(-1) + gts.sum(-1).unsqueeze(-2) - inter  # (..., K, G)
    return inter / union.clamp_min(1e-6)


def pairwise_dice_cost(
    pred_probs: torch.Tensor,
    targets: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    eps: float = 1.0,
) -> torch.Tensor:
    """Soft Dice cost `1 - (2 sum(p t) + eps) / (sum p + sum t + eps)` for every pair.

    Args:
        pred_probs: (..., K, H, W) probabilities.
        targets: (..., G, H, W) targets in [0, 1].
        valid_mask: optional (..., H, W) bool; pixels where it is False are ignored.
        eps: smoothing added to numerator and denominator (two empty masks cost 0).

    Returns:
        (..., K, G) cost in [0, 1].
    """
    probs, gts, weight = _flatten_valid(pred_probs, targets, valid_mask)
    probs = probs * weight
    gts = gts * weight
    inter = probs @ gts.transpose(-1, -2)  # (..., K, G)
    denom = probs.sum(-1).unsqueeze(-1) + gts.sum(-1).unsqueeze(-2)  # (..., K, G)
    return 1.0 - (2.0 * inter + eps) / (denom + eps)


def pairwise_bce_cost(
    pred_logits: torch.Tensor, targets: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy over the valid pixels for every (prediction, target) pair.

    Uses `BCE(x, t) = softplus(x) - x t`, so the (K, G) matrix is one matrix product.

    Args:
        pred_logits: (..., K, H, W) logits.
        targets: (..., G, H, W) targets in [0, 1].
        valid_mask: optional (..., H, W) bool; pixels where it is False are ignored.

    Returns:
        (..., K, G) mean BCE per pair (0 where no pixel is valid).
    """
    logits, gts, weight = _flatten_valid(pred_logits, targets, valid_mask)
    positive = (F.softplus(logits) * weight).sum(-1).unsqueeze(-1)  # (..., K, 1)
    cross = (logits * weight) @ gts.transpose(-1, -2)  # (..., K, G)
    num_valid = weight.sum(-1).unsqueeze(-1).clamp_min(1.0)  # (..., 1, 1)
    return (positive - cross) / num_valid


class MatchedPairs(NamedTuple):
    """Flat indices of all matched (sample, slot, target) triples of a batch.

    Attributes:
        batch_index: (M,) long, the sample of each pair.
        slot_index: (M,) long, the matched slot in [0, K).
        target_index: (M,) long, the matched ground-truth mask in [0, G).
    """

    batch_index: torch.Tensor
    slot_index: torch.Tensor
    target_index: torch.Tensor


@dataclass
class SlotAssignment:
    """Result of `match_slots`.

    Attributes:
        slot_to_target: (B, K) long; the ground-truth index matched to each slot, -1 if the slot
            is unmatched (more slots than real targets, or a no-target sample).
        target_to_slot: (B, G) long; the slot matched to each ground-truth mask, -1 for padding
            targets (index >= num_objects[b]).
    """

    slot_to_target: torch.Tensor
    target_to_slot: torch.Tensor

    @property
    def matched(self) -> torch.Tensor:
        """(B, K) bool: True for slots that hold a matched object (the confidence target)."""
        return self.slot_to_target >= 0

    @property
    def num_matched(self) -> int:
        """Total number of matched pairs in the batch."""
        return int(self.matched.sum())

    def pairs(self) -> MatchedPairs:
        """All matched pairs as flat index tensors, ordered by (sample, slot)."""
        batch_index, slot_index = torch.nonzero(self.matched, as_tuple=True)
        target_index = self.slot_to_target[batch_index, slot_index]
        return MatchedPairs(batch_index, slot_index, target_index)


def match_slots(
    pred_mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    num_objects: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    *,
    cost: MatchingCost = "dice_bce",
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    order_prior: float = 0.0,
) -> SlotAssignment:
    """Hungarian assignment of the K predicted slots to the real ground-truth masks.

    Only the first `num_objects[b]` masks of `gt_masks[b]` are real; the rest is padding.
    `num_objects[b] == 0` is a no-target sample: every slot stays unmatched. Each real target
    gets exactly one slot (callers guarantee num_objects <= K).

    Costs (computed under `torch.no_grad`, batched over B with matrix products):

    * `"dice_bce"` (default): `dice_weight * (1 - soft Dice(sigmoid(pred), gt))
      + bce_weight * mean BCE(pred, gt)` over the valid pixels, the usual mask-matching cost of
      set-prediction segmenters (Mask2Former).
    * `"soft_iou"`: `1 - soft IoU(sigmoid(pred), gt)`, upstream SegCompass's cost
      (`_multiple_seg_loss` matches on the sigmoid heatmap with `1 - pairwise_soft_iou`).

    Args:
        pred_mask_logits: (B, K, H, W) mask (or heatmap) logits.
        gt_masks: (B, G, H, W) ground-truth masks in [0, 1], padded along G.
        num_objects: (B,) long, the number of real targets per sample, in [0, min(G, K)].
        valid_mask: optional (B, H, W) bool; False marks pixels to ignore (e.g. SAM padding).
        cost: `"dice_bce"` or `"soft_iou"`.
        dice_weight, bce_weight: weights of the two `"dice_bce"` terms.
        order_prior: added to the cost of every (slot k, target g) pair with k != g. 0 (the
            paper) is pure Hungarian matching; a positive value makes slot j prefer target j
            (the j-th `<REF_POS>` for the j-th object the reasoning names), which gives the
            confidence head consistent targets from the first step, when all slots predict
            alike and the pure assignment is arbitrary.

    Returns:
        `SlotAssignment` with `slot_to_target` (B, K) and `target_to_slot` (B, G).
    """
    if cost not in ("dice_bce", "soft_iou"):
        raise ValueError(f"`cost` must be 'dice_bce' or 'soft_iou'; got {cost!r}.")
    _check_matching_inputs(pred_mask_logits, gt_masks, num_objects, valid_mask)
    batch, num_slots = pred_mask_logits.shape[:2]
    num_targets = gt_masks.shape[1]
    device = pred_mask_logits.device

    with torch.no_grad():
        logits = pred_mask_logits.detach().float()
        targets = gt_masks.detach().float()
        probs = torch.sigmoid(logits)
        if cost == "soft_iou":
            cost_matrix = 1.0 - pairwise_soft_iou(probs, targets, valid_mask)  # (B, K, G)
        else:
            cost_matrix = dice_weight * pairwise_dice_cost(probs, targets, valid_mask)
            cost_matrix = cost_matrix + bce_weight * pairwise_bce_cost(logits, targets, valid_mask)
        if order_prior:
            off_diagonal = ~torch.eye(num_slots, num_targets, dtype=torch.bool, device=device)
            cost_matrix = cost_matrix + order_prior * off_diagonal.to(cost_matrix.dtype)
        cost_matrix = cost_matrix.cpu()

    slot_to_target = torch.full((batch, num_slots), -1, dtype=torch.long)
    target_to_slot = torch.full((batch, num_targets), -1, dtype=torch.long)
    counts = num_objects.detach().cpu().tolist()
    for b, count in enumerate(counts):  # the assignment itself is per sample
        if count == 0:
            continue
        slots, targets_b = linear_sum_assignment(cost_matrix[b, :, :count])  # (K, n_b) cost
        slot_to_target[b, slots] = targets_b
        target_to_slot[b, targets_b] = slots
    return SlotAssignment(slot_to_target.to(device), target_to_slot.to(device))


def _check_matching_inputs(
    pred_mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    num_objects: torch.Tensor,
    valid_mask: torch.Tensor | None,
) -> None:
    """Validate shapes and counts; raise ValueError naming the argument, expected and given."""
    if pred_mask_logits.ndim != 4:
        raise ValueError(
            f"`pred_mask_logits` must have shape (B, K, H, W); got {tuple(pred_mask_logits.shape)}."
        )
    batch, num_slots, height, width = pred_mask_logits.shape
    if gt_masks.ndim != 4 or gt_masks.shape[0] != batch or gt_masks.shape[2:] != (height, width):
        raise ValueError(
            f"`gt_masks` must have shape (B={batch}, G, H={height}, W={width}) to match the "
            f"predictions; got {tuple(gt_masks.shape)}. Resize the ground truth to the "
            "prediction grid (the processor produces it on the 4E x 4E grid)."
        )
    num_targets = gt_masks.shape[1]
    if num_objects.ndim != 1 or num_objects.shape[0] != batch:
        raise ValueError(
            f"`num_objects` must have shape (B={batch},); got {tuple(num_objects.shape)}."
        )
    if num_objects.dtype.is_floating_point or num_objects.dtype == torch.bool:
        raise ValueError(f"`num_objects` must be an integer tensor; got dtype {num_objects.dtype}.")
    if num_objects.numel() > 0:
        low, high = int(num_objects.min()), int(num_objects.max())
        if low < 0 or high > num_targets:
            raise ValueError(
                f"`num_objects` must lie in [0, G={num_targets}] (the number of real masks in "
                f"`gt_masks`); got values in [{low}, {high}]."
            )
        if high > num_slots:
            raise ValueError(
                f"`num_objects` must be <= K={num_slots} (the number of slots); got a sample "
                f"with {high} objects. Drop such samples or use more slots (upstream drops rows "
                "with more objects than slots)."
            )
    if valid_mask is not None and tuple(valid_mask.shape) != (batch, height, width):
        raise ValueError(
            f"`valid_mask` must have shape (B={batch}, H={height}, W={width}); "
            f"got {tuple(valid_mask.shape)}."
        )
