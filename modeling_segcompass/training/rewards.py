"""GRPO rewards of SegCompass: format score, mask scores and TRL reward functions.

The reward of the paper's training section (arXiv 2605.22658): reward = 0.3 * format +
0.7 * mask, with

* format in {0, 0.9, 1.0} (`format_score`, defined with the answer parser in
  `modeling_segcompass.answer_format` and re-exported here),
* single-object mask = 0.5 soft IoU + 0.2 soft Dice + 0.3 hard IoU (`single_mask_score`),
* multi-object mask = mean soft IoU after Hungarian matching of the kept slots (confidence
  logit >= 0.5) to the ground truth, padded so that misses and extras count 0
  (`multi_object_mask_score`).

The formulas follow upstream SegCompass (`verl/utils/reward_score/rseg_cot.py` and `scots.py`);
where they differ it is said in the docstring.

TRL reward functions (`format_reward`, `mask_reward`, `multi_object_mask_reward`,
`segcompass_reward`) are called by `GRPOTrainer` as
`f(prompts=..., completions=..., completion_ids=..., **columns)` and return one float per
completion. The predicted masks are not a dataset column: the SegCompass GRPO trainer passes
them as the extra keywords `pred_mask_logits` (one (K, H, W) tensor per completion, or None
when the completion produced no mask) and `conf_logits` (one (K,) tensor per completion). The
ground truth comes from the dataset columns `gt_masks` ((G, H, W) per sample, on the same grid
as the predictions) and `num_objects` (real masks per sample; -1 = single-object mode).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..answer_format import REF_TOKEN, ParsedAnswer, format_score, upstream_format_score
from ..matching import linear_sum_assignment, pairwise_soft_iou

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_WEIGHT",
    "MASK_WEIGHT",
    "REF_TOKEN",
    "RewardBreakdown",
    "combined_reward",
    "completion_text",
    "format_reward",
    "format_score",
    "mask_reward",
    "multi_object_mask_reward",
    "multi_object_mask_score",
    "score_completion",
    "segcompass_reward",
    "single_mask_score",
    "upstream_format_reward",
    "upstream_format_score",
]

#: Reward weights of the paper (its ablation finds 0.3 : 0.7 best; arXiv 2605.22658).
FORMAT_WEIGHT = 0.3
MASK_WEIGHT = 0.7

_EPS = 1e-6  # upstream's epsilon in the single-object soft IoU / Dice / hard IoU denominators


# --------------------------------------------------------------------------- pure scores


def _as_float_tensor(value: Any, name: str) -> torch.Tensor:
    """Convert a tensor, numpy array or nested list to a float32 CPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float32)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float32))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{name}` must be a tensor, numpy array or nested list of numbers; "
            f"got {type(value).__name__}."
        ) from error


def _check_valid(valid_mask: Any, shape: tuple[int, ...], name: str) -> torch.Tensor | None:
    if valid_mask is None:
        return None
    valid = _as_float_tensor(valid_mask, name) > 0.5
    if tuple(valid.shape) != shape:
        raise ValueError(f"`{name}` must have shape (H, W) = {shape}; got {tuple(valid.shape)}.")
    return valid


def single_mask_score(
    pred_logits: torch.Tensor, gt: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> float:
    """Single-object mask score `0.5 soft IoU + 0.2 soft Dice + 0.3 hard IoU`, in [0, 1].

    With `p = sigmoid(pred_logits)` and `g = clamp(gt, 0, 1)` (upstream `rseg_cot.mask_reward`):
    soft IoU `= sum(p g) / (sum(p + g - p g) + 1e-6)`, soft Dice `= 2 sum(p g) /
    (sum(p + g) + 1e-6)`, hard IoU of `p >= 0.5` and `g >= 0.5` with 1e-6 added to the union.
    As upstream, an empty ground truth scores about 0 whatever the prediction (single-object
    data always has a target; use `multi_object_mask_score` for no-target samples).

    Args:
        pred_logits: (H, W) mask logits.
        gt: (H, W) ground truth in [0, 1].
        valid_mask: optional (H, W) bool; False pixels (e.g. SAM padding) are ignored.

    Returns:
        The score as a Python float.

    Example:
        >>> gt = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
        >>> round(single_mask_score(torch.tensor([[30.0, 30.0], [-30.0, -30.0]]), gt), 4)
        1.0
    """
    probs = torch.sigmoid(_as_float_tensor(pred_logits, "pred_logits"))
    target = _as_float_tensor(gt, "gt").clamp(0.0, 1.0)
    if probs.ndim != 2 or tuple(target.shape) != tuple(probs.shape):
        raise ValueError(
            "`pred_logits` and `gt` must both have shape (H, W); got "
            f"{tuple(probs.shape)} and {tuple(target.shape)}."
        )
    valid = _check_valid(valid_mask, tuple(probs.shape), "valid_mask")
    pred_bin, gt_bin = probs >= 0.5, target >= 0.5
    if valid is not None:
        probs, target = probs * valid, target * valid
        pred_bin, gt_bin = pred_bin & valid, gt_bin & valid

    inter = (probs * target).sum()
    soft_iou = inter / ((probs + target - probs * target).sum() + _EPS)
    soft_dice = 2.0 * inter / ((probs + target).sum() + _EPS)
    hard_iou = (pred_bin & gt_bin).sum().float() / ((pred_bin | gt_bin).sum().float() + _EPS)
    return float(0.5 * soft_iou + 0.2 * soft_dice + 0.3 * hard_iou)


def multi_object_mask_score(
    pred_logits: torch.Tensor,
    conf_logits: torch.Tensor,
    gt: torch.Tensor,
    conf_threshold: float = 0.5,
    valid_mask: torch.Tensor | None = None,
) -> float:
    """Multi-object mask score: padded Hungarian mean soft IoU of the kept slots, in [0, 1].

    Slots with `conf_logits >= conf_threshold` are kept (a threshold on the *logit*, as
    upstream `scots.py`, i.e. probability >= 0.62 for 0.5). With K' kept slots and G targets:
    both 0 -> 1.0 (a correct "no target"); exactly one 0 -> 0.0; otherwise the (K', G) soft IoU
    of `sigmoid(pred)` and `gt` (union clamped at 1e-6) is zero-padded to M x M,
    M = max(K', G), matched by maximum total IoU, and the mean over the M pairs is returned,
    so every missing or extra mask counts as IoU 0.

    Args:
        pred_logits: (K, H, W) mask logits of all slots.
        conf_logits: (K,) confidence logits.
        gt: (G, H, W) real ground-truth masks (no padding), G may be 0.
        conf_threshold: keep a slot when its confidence logit is >= this value.
        valid_mask: optional (H, W) bool; False pixels are ignored.

    Returns:
        The score as a Python float.

    Example:
        >>> gt = torch.zeros(1, 2, 2)
        >>> gt[0, 0] = 1.0
        >>> pred = torch.full((2, 2, 2), -30.0)
        >>> pred[0, 0] = 30.0
        >>> multi_object_mask_score(pred, torch.tensor([3.0, -3.0]), gt)  # one kept, perfect
        1.0
        >>> multi_object_mask_score(pred, torch.tensor([3.0, 3.0]), gt)  # an extra mask: 1/2
        0.5
    """
    logits = _as_float_tensor(pred_logits, "pred_logits")
    confidences = _as_float_tensor(conf_logits, "conf_logits")
    target = _as_float_tensor(gt, "gt").clamp(0.0, 1.0)
    if logits.ndim != 3:
        raise ValueError(f"`pred_logits` must have shape (K, H, W); got {tuple(logits.shape)}.")
    if tuple(confidences.shape) != (logits.shape[0],):
        raise ValueError(
            f"`conf_logits` must have shape (K,) = ({logits.shape[0]},); "
            f"got {tuple(confidences.shape)}."
        )
    if target.ndim != 3 or tuple(target.shape[1:]) != tuple(logits.shape[1:]):
        raise ValueError(
            f"`gt` must have shape (G, H, W) with (H, W) = {tuple(logits.shape[1:])}; "
            f"got {tuple(target.shape)}."
        )
    valid = _check_valid(valid_mask, tuple(logits.shape[1:]), "valid_mask")

    kept = torch.sigmoid(logits[confidences >= conf_threshold])  # (K', H, W)
    num_kept, num_gt = kept.shape[0], target.shape[0]
    if num_kept == 0 and num_gt == 0:
        return 1.0
    if num_kept == 0 or num_gt == 0:
        return 0.0
    iou = pairwise_soft_iou(kept, target, valid).double()  # (K', G)
    size = max(num_kept, num_gt)
    padded = iou.new_zeros((size, size))  # (M, M)
    padded[:num_kept, :num_gt] = iou
    rows, cols = linear_sum_assignment(1.0 - padded)
    return float(padded[rows, cols].mean())


def combined_reward(
    format_value: float,
    mask_value: float,
    *,
    format_weight: float = FORMAT_WEIGHT,
    mask_weight: float = MASK_WEIGHT,
) -> float:
    """`format_weight * format_value + mask_weight * mask_value` (paper: 0.3 and 0.7).

    Example:
        >>> round(combined_reward(1.0, 0.5), 4)
        0.65
    """
    return float(format_weight) * float(format_value) + float(mask_weight) * float(mask_value)


@dataclass
class RewardBreakdown:
    """Reward of one completion and its parts.

    Attributes:
        format: format score in {0, 0.9, 1}.
        mask: mask score in [0, 1] (single- or multi-object, see `score_completion`).
        total: `format_weight * format + mask_weight * mask`.
    """

    format: float
    mask: float
    total: float


def score_completion(
    text: str | ParsedAnswer,
    pred_mask_logits: torch.Tensor | None,
    conf_logits: torch.Tensor | None,
    gt_masks: torch.Tensor,
    num_objects: int,
    *,
    num_ref: int = 1,
    conf_threshold: float = 0.5,
    format_weight: float = FORMAT_WEIGHT,
    mask_weight: float = MASK_WEIGHT,
    valid_mask: torch.Tensor | None = None,
) -> RewardBreakdown:
    """Full SegCompass reward of one completion (upstream `scots_compute_score`).

    `num_objects == -1` selects single-object mode: `single_mask_score` of slot 0 against
    `gt_masks[0]`. Otherwise `multi_object_mask_score` of all slots against the first
    `num_objects` masks. A missing prediction (`pred_mask_logits=None`, e.g. the completion had
    no `<REF_POS>`) counts as an empty prediction: single-object 0, multi-object 1 only for a
    no-target sample.

    Args:
        text: completion text, or its `ParsedAnswer` (parsed from token ids).
        pred_mask_logits: (K, H, W) (or (H, W) in single-object mode) mask logits, or None.
        conf_logits: (K,) confidence logits (needed in multi-object mode unless the
            prediction is None).
        gt_masks: (G, H, W) (or (H, W)) ground truth, possibly zero-padded along G.
        num_objects: real masks in `gt_masks`, or -1 for single-object mode.
        num_ref: required number of `<REF_POS>` tokens for the format score.
        conf_threshold: confidence-logit threshold of the multi-object score.
        format_weight, mask_weight: reward weights.
        valid_mask: optional (H, W) bool of pixels to score.

    Returns:
        `RewardBreakdown(format, mask, total)`.
    """
    fmt = format_score(text, num_ref)
    target = _as_float_tensor(gt_masks, "gt_masks")
    if target.ndim == 2:
        target = target.unsqueeze(0)  # (1, H, W)
    if target.ndim != 3:
        raise ValueError(f"`gt_masks` must have shape (G, H, W); got {tuple(target.shape)}.")
    num_objects = int(num_objects)
    if num_objects < -1 or num_objects > target.shape[0]:
        raise ValueError(
            f"`num_objects` must be -1 (single object) or in [0, G={target.shape[0]}]; "
            f"got {num_objects}."
        )

    if num_objects == -1:
        if target.shape[0] < 1:
            raise ValueError("single-object mode (num_objects=-1) needs one mask in `gt_masks`.")
        if pred_mask_logits is None:
            pred = torch.full(tuple(target.shape[1:]), -torch.inf)  # empty prediction
        else:
            pred = _as_float_tensor(pred_mask_logits, "pred_mask_logits")
            pred = pred[0] if pred.ndim == 3 else pred  # slot 0: (H, W)
        mask = single_mask_score(pred, target[0], valid_mask)
    else:
        if pred_mask_logits is None:
            pred = torch.zeros((0, *target.shape[1:]))
            confidences = torch.zeros(0)
        else:
            pred = _as_float_tensor(pred_mask_logits, "pred_mask_logits")
            if conf_logits is None:
                raise ValueError(
                    "multi-object mode needs `conf_logits` (K,) for the predicted masks; got None."
                )
            confidences = _as_float_tensor(conf_logits, "conf_logits")
        mask = multi_object_mask_score(
            pred, confidences, target[:num_objects], conf_threshold, valid_mask
        )
    total = combined_reward(fmt, mask, format_weight=format_weight, mask_weight=mask_weight)
    return RewardBreakdown(format=fmt, mask=mask, total=total)


# --------------------------------------------------------------------------- TRL wrappers


def completion_text(completion: Any) -> str:
    """Text of one TRL completion: a string, or a conversational list of messages.

    For messages (`[{"role": "assistant", "content": ...}]`) the assistant contents are joined;
    a content may be a string or a list of parts `{"type": "text", "text": ...}`.

    Examples:
        >>> completion_text("<think>a</think><REF_POS>")
        '<think>a</think><REF_POS>'
        >>> completion_text([{"role": "assistant", "content": "<think>a</think><REF_POS>"}])
        '<think>a</think><REF_POS>'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, Sequence):
        raise TypeError(
            "a completion must be a str or a list of {'role', 'content'} messages; "
            f"got {type(completion).__name__}."
        )
    texts = []
    for message in completion:
        if not isinstance(message, dict) or "content" not in message:
            raise TypeError(
                "conversational completions must be lists of dicts with a 'content' key; "
                f"got an item {message!r}."
            )
        if message.get("role", "assistant") != "assistant":
            continue
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, Sequence):
            texts.extend(
                part.get("text", "")
                for part in content
                if isinstance(part, dict) and part.get("type", "text") == "text"
            )
        elif content is not None:
            raise TypeError(f"message content must be a str or a list of parts; got {content!r}.")
    return "".join(texts)


def _per_sample(value: Any, count: int, name: str, default: Any) -> list[Any]:
    """Broadcast a scalar keyword to `count` samples, or check a per-sample list's length."""
    if value is None:
        return [default] * count
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * count
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return [value.item()] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(
            f"`{name}` must have one entry per completion ({count}); got {len(values)}."
        )
    return values


def _require(name: str, value: Any, func: str) -> None:
    if value is None:
        raise ValueError(
            f"{func} needs the keyword `{name}` (one entry per completion). The SegCompass GRPO "
            "trainer passes the predicted masks as `pred_mask_logits` / `conf_logits`; the "
            "dataset must have a `gt_masks` column."
        )


def format_reward(
    completions: list[Any], num_ref: Any = None, answer: Any = None, **kwargs: Any
) -> list[float]:
    """TRL reward function: `format_score` of every completion.

    Args:
        completions: strings or conversational message lists.
        num_ref: required `<REF_POS>` count, an int or one int per completion (e.g. a dataset
            column); default 1 as upstream.
        answer: one `answer_format.ParsedAnswer` per completion, parsed from its token ids
            (the SegCompass GRPO trainer passes it); it is scored instead of the text, so text
            that merely spells `<REF_POS>` with ordinary tokens earns nothing.
        **kwargs: other TRL keywords and dataset columns (ignored).

    Returns:
        One float in {0, 0.9, 1} per completion; never None.

    Example:
        >>> format_reward(["<think>x</think><REF_POS>", "no think"])
        [1.0, 0.0]
    """
    counts = _per_sample(num_ref, len(completions), "num_ref", 1)
    parsed = _per_sample(answer, len(completions), "answer", None)
    return [
        format_score(a if a is not None else completion_text(c), int(n))
        for c, n, a in zip(completions, counts, parsed)
    ]


def upstream_format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """TRL reward function: the authors' format rule (`upstream_format_score`: exactly one
    `<REF_POS>` whatever the number of slots) on every completion.

    >>> upstream_format_reward(["<think>x</think><REF_POS>", "<think>x</think><REF_POS><REF_POS>"])
    [1.0, 0.0]
    """
    return [upstream_format_score(completion_text(c)) for c in completions]


def mask_reward(
    completions: list[Any],
    pred_mask_logits: Sequence[Any] | None = None,
    gt_masks: Sequence[Any] | None = None,
    valid_mask: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """TRL reward function: single-object `single_mask_score` of slot 0 of every completion.

    Args:
        completions: the completions (only their number is used).
        pred_mask_logits: per completion a (K, H, W) or (H, W) logit tensor, or None when the
            completion produced no mask (scored as an empty prediction).
        gt_masks: per completion a (G, H, W) or (H, W) ground truth (mask 0 is used), or None
            when the sample has no mask supervision.
        valid_mask: optional per-completion (H, W) bool masks.
        **kwargs: other TRL keywords and dataset columns (ignored).

    Returns:
        One float per completion; None exactly where `gt_masks[i]` is None (TRL then ignores
        this reward for that sample).
    """
    _require("pred_mask_logits", pred_mask_logits, "mask_reward")
    _require("gt_masks", gt_masks, "mask_reward")
    count = len(completions)
    preds = _per_sample(pred_mask_logits, count, "pred_mask_logits", None)
    gts = _per_sample(gt_masks, count, "gt_masks", None)
    valids = _per_sample(valid_mask, count, "valid_mask", None)
    rewards: list[float | None] = []
    for pred, gt, valid in zip(preds, gts, valids):
        if gt is None:
            rewards.append(None)
            continue
        target = _as_float_tensor(gt, "gt_masks")
        target = target[0] if target.ndim == 3 else target  # (H, W)
        if pred is None:
            logits = torch.full(tuple(target.shape), -torch.inf)  # no mask = empty prediction
        else:
            logits = _as_float_tensor(pred, "pred_mask_logits")
            logits = logits[0] if logits.ndim == 3 else logits  # slot 0: (H, W)
        rewards.append(single_mask_score(logits, target, valid))
    return rewards


def multi_object_mask_reward(
    completions: list[Any],
    pred_mask_logits: Sequence[Any] | None = None,
    conf_logits: Sequence[Any] | None = None,
    gt_masks: Sequence[Any] | None = None,
    num_objects: Any = None,
    conf_threshold: float = 0.5,
    valid_mask: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """TRL reward function: `multi_object_mask_score` of every completion.

    Args:
        completions: the completions (only their number is used).
        pred_mask_logits: per completion a (K, H, W) logit tensor, or None (no mask kept).
        conf_logits: per completion a (K,) confidence-logit tensor (None where the prediction
            is None).
        gt_masks: per completion a (G, H, W) ground truth, zero-padded along G, or None when
            the sample has no mask supervision.
        num_objects: per completion the number of real masks (0 = no target, -1 = score slot 0
            with `single_mask_score` as upstream's single-object mode); default: all G.
        conf_threshold: confidence-logit threshold for keeping a slot.
        valid_mask: optional per-completion (H, W) bool masks.
        **kwargs: other TRL keywords and dataset columns (ignored).

    Returns:
        One float per completion; None exactly where `gt_masks[i]` is None.
    """
    _require("pred_mask_logits", pred_mask_logits, "multi_object_mask_reward")
    _require("gt_masks", gt_masks, "multi_object_mask_reward")
    count = len(completions)
    preds = _per_sample(pred_mask_logits, count, "pred_mask_logits", None)
    confs = _per_sample(conf_logits, count, "conf_logits", None)
    gts = _per_sample(gt_masks, count, "gt_masks", None)
    objects = _per_sample(num_objects, count, "num_objects", None)
    valids = _per_sample(valid_mask, count, "valid_mask", None)
    rewards: list[float | None] = []
    for pred, conf, gt, n_obj, valid in zip(preds, confs, gts, objects, valids):
        if gt is None:
            rewards.append(None)
            continue
        target = _as_float_tensor(gt, "gt_masks")
        n_real = target.shape[0] if n_obj is None else int(n_obj)
        breakdown = score_completion(
            "",
            pred,
            conf,
            target,
            n_real,
            conf_threshold=conf_threshold,
            valid_mask=valid,
        )
        rewards.append(breakdown.mask)
    return rewards


def segcompass_reward(
    completions: list[Any],
    pred_mask_logits: Sequence[Any] | None = None,
    conf_logits: Sequence[Any] | None = None,
    gt_masks: Sequence[Any] | None = None,
    num_objects: Any = None,
    num_ref: Any = None,
    conf_threshold: float = 0.5,
    valid_mask: Sequence[Any] | None = None,
    answer: Any = None,
    **kwargs: Any,
) -> list[float | None]:
    """TRL reward function: the paper's `0.3 * format + 0.7 * mask` in one call.

    Equivalent to `format_reward` and the mask reward with TRL `reward_weights=[0.3, 0.7]`.
    `num_objects[i] == -1` selects the single-object score, otherwise the multi-object score
    (default when `num_objects` is not given: multi-object over all G masks).

    Args:
        completions, pred_mask_logits, conf_logits, gt_masks, num_objects, conf_threshold,
        valid_mask: as in `multi_object_mask_reward`.
        num_ref, answer: as in `format_reward`.
        **kwargs: other TRL keywords and dataset columns (ignored).

    Returns:
        One float per completion; None exactly where `gt_masks[i]` is None.
    """
    _require("pred_mask_logits", pred_mask_logits, "segcompass_reward")
    _require("gt_masks", gt_masks, "segcompass_reward")
    count = len(completions)
    preds = _per_sample(pred_mask_logits, count, "pred_mask_logits", None)
    confs = _per_sample(conf_logits, count, "conf_logits", None)
    gts = _per_sample(gt_masks, count, "gt_masks", None)
    objects = _per_sample(num_objects, count, "num_objects", None)
    refs = _per_sample(num_ref, count, "num_ref", 1)
    valids = _per_sample(valid_mask, count, "valid_mask", None)
    parsed = _per_sample(answer, count, "answer", None)
    rewards: list[float | None] = []
    for completion, pred, conf, gt, n_obj, n_ref, valid, parsed_answer in zip(
        completions, preds, confs, gts, objects, refs, valids, parsed
    ):
        if gt is None:
            rewards.append(None)
            continue
        target = _as_float_tensor(gt, "gt_masks")
        if target.ndim == 2:
            target = target.unsqueeze(0)  # (1, H, W)
        n_real = target.shape[0] if n_obj is None else int(n_obj)
        breakdown = score_completion(
            parsed_answer if parsed_answer is not None else completion_text(completion),
            pred,
            conf,
            target,
            n_real,
            num_ref=int(n_ref),
            conf_threshold=conf_threshold,
            valid_mask=valid,
        )
        rewards.append(breakdown.total)
    return rewards
