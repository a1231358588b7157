"""Segmentation losses of SegCompass: heatmap, mask and per-slot confidence supervision.

The paper's training (arXiv 2605.22658): the mask path is supervised in the same step as the policy with
heatmap BCE + heatmap Dice, mask Dice + sigmoid focal loss, and a per-slot confidence BCE whose
targets come from Hungarian matching; pixels in SAM's padded area are excluded.

Differences from upstream `verl/workers/actor/dp_actor.py` (`_multiple_seg_loss`) by default,
each one a switch (config fields in brackets; `segmentation_loss_from_config` reads them):

* Slots are matched on the mask logits with a Dice + BCE cost over the valid area; upstream
  matches on the sigmoid heatmap with `1 - soft IoU` over the full grid
  (`match_on="heatmap", matching_cost="soft_iou", match_full_grid=True`).
* Each term is summed over all matched pairs of the batch and divided by their number (at
  least 1); upstream averages per sample and then over the batch, counting no-target samples
  as zeros, which makes the weight of a pair depend on how many objects its sample has
  (`normalization="per_sample"`).
* Dice uses the smoothed form `1 - (2 p.t + eps) / (p + t + eps)` with eps = 1 (two empty masks
  give 0); upstream uses eps = 1e-6 in the denominator only (`dice_eps=1e-6` matches it to
  1e-6 on any non-empty target).
* Upstream switches the mask Dice / focal weights (and the heatmap Dice weight with them) at
  a training step (`loss_schedule_step`, `*_weight_after`); the model learns the step from
  its `training_step` attribute, which the trainers set before each optimisation step.

Remote-code file: imports only torch and the sibling `matching` module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .matching import MatchingCost, SlotAssignment, match_slots

logger = logging.getLogger(__name__)

#: How `compute_segmentation_loss` averages a term over the matched pairs of a batch.
LOSS_NORMALIZATIONS = ("pairs", "per_sample")


def _flatten_per_mask(
    logits: torch.Tensor, targets: torch.Tensor, valid_mask: torch.Tensor | None, caller: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes and flatten (N, ...) inputs to (N, P) logits, targets and pixel weights."""
    if logits.ndim < 1:
        raise ValueError(f"{caller}: `logits` must have shape (N, ...); got a scalar.")
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(
            f"{caller}: `targets` must have the shape of `logits` {tuple(logits.shape)}; "
            f"got {tuple(targets.shape)}."
        )
    targets = targets.to(dtype=logits.dtype)
    if valid_mask is None:
        weight = torch.ones_like(logits)
    else:
        try:
            weight = torch.broadcast_to(valid_mask, logits.shape).to(dtype=logits.dtype)
        except RuntimeError as error:
            raise ValueError(
                f"{caller}: `valid_mask` must be broadcastable to `logits` {tuple(logits.shape)}; "
                f"got {tuple(valid_mask.shape)}."
            ) from error
    # Explicit sizes (not -1) so that N = 0 (no matched pair) also works.
    num, pixels = logits.shape[0], math.prod(logits.shape[1:])
    flat = (num, pixels)  # (N, P)
    return logits.reshape(flat), targets.reshape(flat), weight.reshape(flat)


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    eps: float = 1.0,
) -> torch.Tensor:
    """Soft Dice loss per mask: `1 - (2 sum(p t) + eps) / (sum p + sum t + eps)`, `p = sigmoid`.

    Args:
        logits: (N, H, W) (or any (N, ...)) logits.
        targets: same shape, targets in [0, 1].
        valid_mask: optional bool mask broadcastable to `logits`; False pixels are ignored.
        eps: smoothing in numerator and denominator; an empty target predicted empty costs 0.

    Returns:
        (N,) loss per mask, in [0, 1].

    Example:
        >>> logits = torch.tensor([[[20.0, -20.0], [-20.0, -20.0]]])
        >>> targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
        >>> round(dice_loss(logits, targets, eps=0.0).item(), 4)  # 1 - 2*1/(1+2)
        0.3333
    """
    logits, targets, weight = _flatten_per_mask(logits, targets, valid_mask, "dice_loss")
    probs = torch.sigmoid(logits) * weight
    targets = targets * weight
    inter = (probs * targets).sum(dim=1)
    denom = probs.sum(dim=1) + targets.sum(dim=1)
    return 1.0 - (2.0 * inter + eps) / (denom + eps)


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy per mask, averaged over its valid pixels.

    Args:
        logits: (N, H, W) (or any (N, ...)) logits.
        targets: same shape, targets in [0, 1].
        valid_mask: optional bool mask broadcastable to `logits`; False pixels are ignored.

    Returns:
        (N,) mean BCE per mask (0 for a mask without valid pixels).

    Example:
        >>> round(masked_bce_with_logits(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).item(), 4)
        0.6931
    """
    logits, targets, weight = _flatten_per_mask(logits, targets, valid_mask, "masked_bce")
    pixel_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (pixel_loss * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) per mask, averaged over its valid pixels.

    Per pixel: `alpha_t * (1 - p_t) ** gamma * BCE(x, t)` with `p_t = p t + (1 - p)(1 - t)` and
    `alpha_t = alpha t + (1 - alpha)(1 - t)` (no alpha weighting when `alpha < 0`), the
    definition of torchvision's `sigmoid_focal_loss` used upstream.

    Args:
        logits: (N, H, W) (or any (N, ...)) logits.
        targets: same shape, targets in [0, 1].
        valid_mask: optional bool mask broadcastable to `logits`; False pixels are ignored.
        alpha: weight of the positive class in [0, 1], or negative to disable.
        gamma: focusing exponent >= 0.

    Returns:
        (N,) mean focal loss per mask (0 for a mask without valid pixels).

    Example:
        >>> # p = 0.5 on a positive pixel: 0.25 * 0.5**2 * log 2
        >>> round(sigmoid_focal_loss(torch.zeros(1, 1, 1), torch.ones(1, 1, 1)).item(), 5)
        0.04332
    """
    logits, targets, weight = _flatten_per_mask(logits, targets, valid_mask, "sigmoid_focal_loss")
    probs = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1.0 - probs) * (1.0 - targets)
    pixel_loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        pixel_loss = pixel_loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return (pixel_loss * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)


@dataclass
class SegmentationLossOutput:
    """Result of `compute_segmentation_loss`.

    All losses are scalar tensors attached to the graph (not detached), so a caller may
    re-weight the components; call `.detach()` before logging.

    Attributes:
        seg_loss: weighted sum `heatmap_bce_weight * heatmap_bce + heatmap_dice_weight *
            heatmap_dice + mask_dice_weight * mask_dice + mask_focal_weight * mask_focal
            (+ iou_loss_weight * mask_iou_mse)`.
        conf_loss: mean BCE of the (B, K) confidence logits against the matched-slot targets.
        heatmap_bce: heatmap BCE, averaged over valid pixels and matched pairs.
        heatmap_dice: heatmap Dice loss, averaged over matched pairs.
        mask_dice: mask Dice loss, averaged over matched pairs.
        mask_focal: mask sigmoid focal loss, averaged over valid pixels and matched pairs.
        mask_iou_mse: MSE between SAM's IoU predictions and the true IoU of each matched mask
            (0 when no `iou_predictions` were given).
        conf_targets: (B, K) float, 1 for matched slots and 0 otherwise.
        assignment: the Hungarian `SlotAssignment` used for all terms.
    """

    seg_loss: torch.Tensor
    conf_loss: torch.Tensor
    heatmap_bce: torch.Tensor
    heatmap_dice: torch.Tensor
    mask_dice: torch.Tensor
    mask_focal: torch.Tensor
    mask_iou_mse: torch.Tensor
    conf_targets: torch.Tensor
    assignment: SlotAssignment


def _check_loss_inputs(
    heatmap_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    conf_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    num_objects: torch.Tensor,
    valid_mask: torch.Tensor | None,
    iou_predictions: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the argument, the expected shape and the one given."""
    if heatmap_logits.ndim != 4:
        raise ValueError(
            f"`heatmap_logits` must have shape (B, K, H, W); got {tuple(heatmap_logits.shape)}."
        )
    batch, num_slots, height, width = heatmap_logits.shape
    if tuple(mask_logits.shape) != tuple(heatmap_logits.shape):
        raise ValueError(
            f"`mask_logits` must have the shape of `heatmap_logits` (B, K, H, W) = "
            f"{tuple(heatmap_logits.shape)}; got {tuple(mask_logits.shape)}."
        )
    if tuple(conf_logits.shape) != (batch, num_slots):
        raise ValueError(
            f"`conf_logits` must have shape (B, K) = {(batch, num_slots)}; "
            f"got {tuple(conf_logits.shape)}."
        )
    if iou_predictions is not None and tuple(iou_predictions.shape) != (batch, num_slots):
        raise ValueError(
            f"`iou_predictions` must have shape (B, K) = {(batch, num_slots)}; "
            f"got {tuple(iou_predictions.shape)}."
        )
    if gt_masks.ndim != 4 or gt_masks.shape[0] != batch:
        raise ValueError(
            f"`gt_masks` must have shape (B={batch}, G, H, W); got {tuple(gt_masks.shape)}."
        )
    if tuple(gt_masks.shape[2:]) != (height, width):
        raise ValueError(
            f"`gt_masks` must be on the logit grid (H, W) = {(height, width)}; got "
            f"{tuple(gt_masks.shape[2:])}. The processor produces ground truth on the 4E x 4E "
            "grid of SAM's low-resolution masks; resize (nearest or bilinear) before the loss."
        )
    if valid_mask is not None and tuple(valid_mask.shape) != (batch, height, width):
        raise ValueError(
            f"`valid_mask` must have shape (B, H, W) = {(batch, height, width)}; "
            f"got {tuple(valid_mask.shape)}."
        )
    if num_objects.ndim != 1 or num_objects.shape[0] != batch:
        raise ValueError(
            f"`num_objects` must have shape (B,) = ({batch},); got {tuple(num_objects.shape)}."
        )
    # Range checks (num_objects in [0, G] and <= K) are done by `match_slots`.


def _pair_reduction(
    batch_index: torch.Tensor, batch: int, normalization: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that turns (M,) per-pair losses into the batch's scalar term."""
    if normalization == "pairs":
        num_pairs = max(int(batch_index.numel()), 1)
        return lambda per_pair: per_pair.sum() / num_pairs
    counts = torch.bincount(batch_index, minlength=batch).clamp_min(1)  # (B,)

    def per_sample(per_pair: torch.Tensor) -> torch.Tensor:
        sums = per_pair.new_zeros(batch).index_add(0, batch_index, per_pair)  # (B,)
        return (sums / counts.to(per_pair.dtype)).sum() / max(batch, 1)

    return per_sample


def compute_segmentation_loss(
    *,
    heatmap_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    conf_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    num_objects: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    heatmap_bce_weight: float = 1.0,
    heatmap_dice_weight: float = 1.0,
    mask_dice_weight: float = 1.0,
    mask_focal_weight: float = 1.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    iou_predictions: torch.Tensor | None = None,
    iou_loss_weight: float = 0.0,
    match_on: Literal["mask", "heatmap"] = "mask",
    matching_cost: MatchingCost = "dice_bce",
    order_prior: float = 0.0,
    normalization: Literal["pairs", "per_sample"] = "pairs",
    dice_eps: float = 1.0,
    match_full_grid: bool = False,
) -> SegmentationLossOutput:
    """Hungarian-matched segmentation and confidence losses of one batch.

    1. Match the K slots to the first `num_objects[b]` ground-truth masks of each sample
       (`match_slots`, on the mask logits by default).
    2. For every matched (slot, target) pair: heatmap BCE + heatmap Dice on `heatmap_logits`,
       mask Dice + sigmoid focal loss on `mask_logits`, pixels outside `valid_mask` ignored.
       Each term is summed over pairs and divided by the number of pairs in the batch (>= 1),
       so a batch of no-target samples contributes 0 (with zero gradient) to `seg_loss`.
    3. Confidence: BCE of `conf_logits` (B, K) against 1 for matched slots, 0 for the others
       (all 0 for no-target samples), averaged over B * K as upstream.

    Args:
        heatmap_logits: (B, K, H, W) slot-mapper heatmap logits (SAM's dense prompt).
        mask_logits: (B, K, H, W) SAM mask-decoder logits on the same grid.
        conf_logits: (B, K) per-slot confidence logits.
        gt_masks: (B, G, H, W) ground-truth masks in [0, 1] (bool, int or float), zero-padded
            along G.
        num_objects: (B,) long, real masks per sample, in [0, G] and <= K (0 = no target).
        valid_mask: optional (B, H, W) bool, False on SAM's padded area.
        heatmap_bce_weight, heatmap_dice_weight, mask_dice_weight, mask_focal_weight: weights of
            the four terms of `seg_loss`.
        focal_alpha, focal_gamma: focal-loss parameters.
        iou_predictions: optional (B, K) predicted IoU of each mask (SAM's IoU head); its MSE to
            the hard IoU of each matched mask is added with `iou_loss_weight`.
        iou_loss_weight: weight of that MSE (ignored without `iou_predictions`).
        match_on: match on the `"mask"` logits (default) or on the `"heatmap"` (upstream).
        matching_cost: `"dice_bce"` (default) or `"soft_iou"` (upstream), see `match_slots`.
        order_prior: extra matching cost of slot k on target g != k, see `match_slots`.
        normalization: `"pairs"` (default): each term summed over the batch's matched pairs
            and divided by their number; `"per_sample"` (upstream): mean over each sample's
            pairs, then mean over the B samples, a no-target sample counting 0.
        dice_eps: smoothing of both Dice terms (1.0; upstream's form is matched by 1e-6).
        match_full_grid: match over the whole grid, ignoring `valid_mask` (upstream); the
            loss terms still ignore the pixels outside it.

    Returns:
        `SegmentationLossOutput`.
    """
    _check_loss_inputs(
        heatmap_logits, mask_logits, conf_logits, gt_masks, num_objects, valid_mask, iou_predictions
    )
    if match_on not in ("mask", "heatmap"):
        raise ValueError(f"`match_on` must be 'mask' or 'heatmap'; got {match_on!r}.")
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {LOSS_NORMALIZATIONS}; got {normalization!r}."
        )
    num_objects = num_objects.to(device=heatmap_logits.device)
    if valid_mask is not None:
        valid_mask = valid_mask.to(device=heatmap_logits.device, dtype=torch.bool)
    assignment = match_slots(
        mask_logits if match_on == "mask" else heatmap_logits,
        gt_masks,
        num_objects,
        None if match_full_grid else valid_mask,
        cost=matching_cost,
        order_prior=order_prior,
    )

    batch_index, slot_index, target_index = assignment.pairs()
    heat_m = heatmap_logits[batch_index, slot_index]  # (M, H, W)
    mask_m = mask_logits[batch_index, slot_index]  # (M, H, W)
    gt_m = gt_masks[batch_index, target_index].to(dtype=heatmap_logits.dtype)  # (M, H, W)
    valid_m = None if valid_mask is None else valid_mask[batch_index]  # (M, H, W)
    reduce = _pair_reduction(batch_index, heatmap_logits.shape[0], normalization)

    heatmap_bce = reduce(masked_bce_with_logits(heat_m, gt_m, valid_m))
    heatmap_dice = reduce(dice_loss(heat_m, gt_m, valid_m, eps=dice_eps))
    mask_dice = reduce(dice_loss(mask_m, gt_m.to(mask_m.dtype), valid_m, eps=dice_eps))
    mask_focal = reduce(
        sigmoid_focal_loss(mask_m, gt_m.to(mask_m.dtype), valid_m, focal_alpha, focal_gamma)
    )
    seg_loss = (
        heatmap_bce_weight * heatmap_bce
        + heatmap_dice_weight * heatmap_dice
        + mask_dice_weight * mask_dice
        + mask_focal_weight * mask_focal
    )

    if iou_predictions is not None:
        with torch.no_grad():
            pred_bin = mask_m.detach() > 0  # (M, H, W)
            gt_bin = gt_m >= 0.5
            if valid_m is not None:
                pred_bin, gt_bin = pred_bin & valid_m, gt_bin & valid_m
            inter = (pred_bin & gt_bin).flatten(1).sum(1).float()
            union = (pred_bin | gt_bin).flatten(1).sum(1).float()
            # Two empty masks agree perfectly: IoU 1 (the LISA convention of the field's metrics).
            true_iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
        iou_m = iou_predictions[batch_index, slot_index]  # (M,)
        mask_iou_mse = reduce((iou_m - true_iou.to(iou_m.dtype)) ** 2)
        seg_loss = seg_loss + iou_loss_weight * mask_iou_mse
    else:
        mask_iou_mse = heatmap_logits.new_zeros(())

    conf_targets = assignment.matched.to(dtype=conf_logits.dtype)  # (B, K)
    conf_loss = F.binary_cross_entropy_with_logits(conf_logits, conf_targets)
    return SegmentationLossOutput(
        seg_loss=seg_loss,
        conf_loss=conf_loss,
        heatmap_bce=heatmap_bce,
        heatmap_dice=heatmap_dice,
        mask_dice=mask_dice,
        mask_focal=mask_focal,
        mask_iou_mse=mask_iou_mse,
        conf_targets=conf_targets,
        assignment=assignment,
    )


def segmentation_loss_weights(config: Any, step: int | None = None) -> dict[str, float]:
    """The weights of the `seg_loss` terms at training step `step` (optimisation steps done).

    Before `config.loss_schedule_step` (or always when it is None) the config's
    `heatmap_bce_weight`, `heatmap_dice_weight`, `mask_dice_weight`, `mask_focal_weight`
    and `iou_loss_weight`; from that step on, each `*_weight_after` that is not None replaces
    its weight. Upstream (`dp_actor.py`) switches mask Dice 0.8 -> 2.0 and focal 0 -> 5.0 at
    step 1500, the heatmap Dice following the mask Dice; `step` counts updates as its
    `global_steps` does (0 during the first update).

    >>> from types import SimpleNamespace as C
    >>> c = C(heatmap_bce_weight=1.0, heatmap_dice_weight=0.8, mask_dice_weight=0.8,
    ...       mask_focal_weight=0.0, iou_loss_weight=0.0, loss_schedule_step=1500,
    ...       heatmap_dice_weight_after=2.0, mask_dice_weight_after=2.0,
    ...       mask_focal_weight_after=5.0)
    >>> segmentation_loss_weights(c, 1499)["mask_focal_weight"], segmentation_loss_weights(c, 1500)["mask_focal_weight"]
    (0.0, 5.0)
    """
    names = ("heatmap_bce_weight", "heatmap_dice_weight", "mask_dice_weight",
             "mask_focal_weight", "iou_loss_weight")  # fmt: skip
    weights = {name: float(getattr(config, name)) for name in names}
    switch = getattr(config, "loss_schedule_step", None)
    if switch is not None and switch >= 0 and int(step or 0) >= switch:
        for name in names:
            after = getattr(config, f"{name}_after", None)
            if after is not None:
                weights[name] = float(after)
    return weights


def segmentation_loss_from_config(
    config: Any, step: int | None = None, **tensors: torch.Tensor | None
) -> SegmentationLossOutput:
    """`compute_segmentation_loss` with the weights, matching and normalisation of `config`.

    Args:
        config: a `SegCompassConfig` (read by attribute: the loss fields and
            `slot_order_prior`; fields it lacks take the package defaults).
        step: optimisation steps done so far, for the loss schedule (`segmentation_loss_weights`).
        **tensors: `heatmap_logits`, `mask_logits`, `conf_logits`, `gt_masks`, `num_objects`,
            `valid_mask`, `iou_predictions`, as `compute_segmentation_loss` takes them.
    """
    return compute_segmentation_loss(
        **tensors,
        **segmentation_loss_weights(config, step),
        focal_alpha=config.focal_alpha,
        focal_gamma=config.focal_gamma,
        match_on=getattr(config, "matching_on", "mask"),
        matching_cost=getattr(config, "matching_cost", "dice_bce"),
        match_full_grid=bool(getattr(config, "matching_full_grid", False)),
        order_prior=config.slot_order_prior,
        normalization=getattr(config, "loss_normalization", "pairs"),
        dice_eps=float(getattr(config, "dice_eps", 1.0)),
    )


def language_model_loss(
    labels: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    *,
    logits: torch.Tensor | None = None,
    last_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (0 if there are none).

    Args:
        labels: (B, L) next-token targets, -100 where there is none.
        lm_head: the VLM's LM head (hidden states -> vocabulary logits).
        logits: (B, L, V) full LM logits, when the forward computed them; else
        last_hidden: (B, L, d) last-layer states, of which only the N positions that
            predict a label go through the LM head ((N, V) logits instead of (B, L, V)).
    """
    shift_labels = labels[:, 1:]  # (B, L-1)
    source = logits if logits is not None else last_hidden
    keep = shift_labels.to(source.device) != -100
    if not keep.any():  # keep the LM head in the graph
        head = logits if logits is not None else lm_head(last_hidden[:, :1])
        return head.float().sum() * 0.0
    picked = source[:, :-1][keep]  # (N, V) logits or (N, d) states
    if logits is None:
        picked = lm_head(picked)
    return F.cross_entropy(picked.float(), shift_labels.to(source.device)[keep])


def sae_reconstruction_loss(
    sae: nn.Module, sae_input: torch.Tensor, token_mask: torch.Tensor, codes: Any = None
) -> torch.Tensor:
    """Reconstruction MSE / variance of the (detached) SAE input over real tokens, in float32.

    The target is detached so that this term trains the SAE only; the LLM learns through the
    concept path. `codes`: ``sae.encode(sae_input.detach())`` when already computed (the
    forward gets them from `SparseAutoencoder.encode_pair`); encoded here when None.
    """
    target = sae_input.detach()
    recon = sae.decode(sae.encode(target) if codes is None else codes).float()
    target = target.float()
    real = token_mask.unsqueeze(-1).to(target.dtype)  # (B, L, 1)
    count = real.sum().clamp_min(1.0)
    mean = (target * real).sum((0, 1)) / count
    variance = (((target - mean) ** 2) * real).sum() / count
    error = (((recon - target) ** 2) * real).sum() / count
    return error / variance.clamp_min(1e-8)
