"""Evaluation metrics for reasoning / referring segmentation: gIoU, cIoU, N-acc, T-acc.

Definitions (the field's convention, from LISA's and ReLA's evaluation code):

- A sample is one (image, query) pair. Its IoU is computed on binary masks; ground-truth
  pixels equal to ``ignore_index`` (255, ReasonSeg's "ignore" label) are excluded from both
  the intersection and the union, exactly as LISA's ``intersectionAndUnion`` does.
- **gIoU** is the mean of the per-sample IoUs; **cIoU** is sum(I) / sum(U) over all samples.
- **Multi-object samples** (gRefCOCO): the union of the predicted masks is compared with the
  union of the ground-truth masks, the ReLA convention. A sample's masks may therefore be
  given as one (H, W) mask or as a stack (K, H, W) of K object masks.
- **No-target samples** (gRefCOCO, ReLA ``refer_evaluation.py``): "predicted no-target"
  means the (union of the) predicted mask is empty.

  * TP: no-target and predicted empty -> IoU 1, nothing added to sum(I) / sum(U).
  * FN: no-target and predicted non-empty -> IoU 0, sum(U) grows by the predicted area.
  * FP: target present and predicted empty -> I = 0, U = ground-truth area.
  * TN: target present and predicted non-empty -> the ordinary I and U.

  **N-acc = TP / (TP + FN)** over no-target samples and **T-acc = TN / (TN + FP)** over
  target samples (samples whose ground truth has at least one foreground pixel).
- **Empty prediction vs empty ground truth on a sample that is not flagged no-target**
  (e.g. a ReasonSeg mask that is entirely "ignore"): the IoU is 0/0, and the field does not
  agree. LISA counts it as 1.0, Seg-Zero as 0.0. ``empty_iou`` selects the value; the
  default 1.0 follows LISA, whose evaluation code the SegCompass paper reports against, and
  agrees with the ReLA no-target rule above. Such samples count in gIoU and cIoU only, not
  in N-acc / T-acc.

Metric values are fractions in [0, 1]; a value whose denominator is zero (for example N-acc
when no sample is no-target) is ``None``.

Example:
    >>> import numpy as np
    >>> pred = np.array([[1, 1], [0, 0]], dtype=bool)
    >>> gt = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    >>> mask_iou_stats(pred, gt)
    IoUStats(intersection=1, union=2)
    >>> metrics = SegmentationMetrics()
    >>> _ = metrics.add(pred, gt, family="refcoco")
    >>> metrics.compute().overall.giou
    0.5
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

OVERALL = "overall"
"""Row name of the all-samples group in [`MetricsResult`]; not allowed as a family name."""


class IoUStats(NamedTuple):
    """Pixel counts of one sample.

    Attributes:
        intersection: pixels that are foreground in both prediction and ground truth.
        union: pixels that are foreground in either (ignored pixels excluded from both).
    """

    intersection: int
    union: int

    def iou(self, empty_iou: float = 1.0) -> float:
        """Intersection over union; ``empty_iou`` when the union is empty (see module doc)."""
        return empty_iou if self.union == 0 else self.intersection / self.union


class SampleScore(NamedTuple):
    """What one call of [`SegmentationMetrics.add`] recorded.

    Attributes:
        intersection: pixels added to sum(I).
        union: pixels added to sum(U).
        iou: the sample's IoU as it enters gIoU.
        pred_empty: the prediction has no foreground pixel ("predicted no-target").
        no_target: the sample was treated as a no-target sample.
    """

    intersection: int
    union: int
    iou: float
    pred_empty: bool
    no_target: bool


@dataclass
class GroupMetrics:
    """Metrics of one group of samples (one family, or all samples).

    Attributes:
        giou: mean per-sample IoU.
        ciou: sum(I) / sum(U); ``None`` if sum(U) is 0.
        n_acc: TP / (TP + FN) over no-target samples; ``None`` without no-target samples.
        t_acc: TN / (TN + FP) over target samples; ``None`` without target samples.
        n: number of samples.
        intersection: sum(I) in pixels.
        union: sum(U) in pixels.
        tp: no-target samples predicted empty.
        fn: no-target samples predicted non-empty.
        tn: target samples predicted non-empty.
        fp: target samples predicted empty.
    """

    giou: float
    ciou: float | None
    n_acc: float | None
    t_acc: float | None
    n: int
    intersection: int
    union: int
    tp: int
    fn: int
    tn: int
    fp: int

    def to_dict(self) -> dict[str, Any]:
        """Metrics under their paper names (``gIoU``, ``cIoU``, ``N-acc``, ``T-acc``) + counts."""
        counts = asdict(self)
        for name in ("giou", "ciou", "n_acc", "t_acc"):
            counts.pop(name)
        return {
            "gIoU": self.giou,
            "cIoU": self.ciou,
            "N-acc": self.n_acc,
            "T-acc": self.t_acc,
            **counts,
        }


@dataclass
class MetricsResult:
    """Result of [`SegmentationMetrics.compute`].

    Attributes:
        overall: metrics over every sample.
        per_family: metrics per family name (e.g. ``"reasonseg_val"``, ``"grefcoco_testA"``),
            in the order the families were first seen; samples added without a family count
            in ``overall`` only.
        empty_iou: the empty-vs-empty convention used (1.0 LISA, 0.0 Seg-Zero).
    """

    overall: GroupMetrics
    per_family: dict[str, GroupMetrics] = field(default_factory=dict)
    empty_iou: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict: ``{"overall": {...}, "per_family": {name: {...}}, "empty_iou"}``."""
        return {
            OVERALL: self.overall.to_dict(),
            "per_family": {name: group.to_dict() for name, group in self.per_family.items()},
            "empty_iou": self.empty_iou,
        }

    def to_table(self, *, percent: bool = True, digits: int = 2) -> str:
        """Markdown table: one row per family, then ``overall``; undefined values show ``-``.

        Args:
            percent: show metrics in percent (as papers report them) instead of fractions.
            digits: decimals after the point.
        """
        scale = 100.0 if percent else 1.0

        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value * scale:.{digits}f}"

        lines = ["| group | gIoU | cIoU | N-acc | T-acc | n |", "|---|---|---|---|---|---|"]
        rows = [*self.per_family.items(), (OVERALL, self.overall)]
        for name, group in rows:
            values = [cell(group.giou), cell(group.ciou), cell(group.n_acc), cell(group.t_acc)]
            lines.append(f"| {name} | {' | '.join(values)} | {group.n} |")
        return "\n".join(lines)


@dataclass
class _Tally:
    """Running sums of one group; turned into [`GroupMetrics`] by `result()`."""

    iou_sum: float = 0.0
    n: int = 0
    intersection: int = 0
    union: int = 0
    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0

    def add(self, score: SampleScore, target: bool) -> None:
        self.iou_sum += score.iou
        self.n += 1
        self.intersection += score.intersection
        self.union += score.union
        if score.no_target:
            self.tp += int(score.pred_empty)
            self.fn += int(not score.pred_empty)
        elif target:
            self.fp += int(score.pred_empty)
            self.tn += int(not score.pred_empty)

    def result(self) -> GroupMetrics:
        def ratio(num: float, den: float) -> float | None:
            return None if den == 0 else num / den

        return GroupMetrics(
            giou=self.iou_sum / self.n,  # n >= 1: groups exist only once a sample is added
            ciou=ratio(self.intersection, self.union),
            n_acc=ratio(self.tp, self.tp + self.fn),
            t_acc=ratio(self.tn, self.tn + self.fp),
            n=self.n,
            intersection=self.intersection,
            union=self.union,
            tp=self.tp,
            fn=self.fn,
            tn=self.tn,
            fp=self.fp,
        )


def _to_numpy(masks: Any) -> np.ndarray:
    """numpy / torch / nested sequences -> numpy array (a sequence of masks is stacked)."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        if masks.dtype in (torch.bfloat16, torch.float16):
            masks = masks.float()
        return masks.numpy()
    if isinstance(masks, np.ndarray):
        return masks
    if isinstance(masks, Sequence) and any(isinstance(m, torch.Tensor) for m in masks):
        return np.stack([_to_numpy(m) for m in masks])  # (K, H, W) from K tensors
    return np.asarray(masks)  # also nested lists, e.g. rows coming from `datasets`


def _shape(masks: Any) -> tuple[int, ...]:
    """Shape of the masks as the caller gave them (for error messages)."""
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        return tuple(masks.shape)
    return (len(masks), *_shape(masks[0])) if isinstance(masks, Sequence) and masks else ()


def _as_stack(masks: Any, *, what: str, index: int) -> np.ndarray | None:
    """Return masks as a (K, H, W) array, or None for an empty sequence (no mask, no size)."""
    if isinstance(masks, Sequence) and not isinstance(masks, str) and len(masks) == 0:
        return None
    try:
        array = _to_numpy(masks)
    except ValueError as err:  # np.stack of masks with different sizes
        raise ValueError(
            f"Sample {index}: the {what} masks could not be stacked ({err}); all masks of one "
            "sample must share the same (H, W)."
        ) from err
    if array.ndim == 2:
        array = array[None]  # (1, H, W)
    if array.ndim != 3:
        raise ValueError(
            f"Sample {index}: expected the {what} as one (H, W) mask or a (K, H, W) stack of "
            f"object masks, got shape {tuple(array.shape)}. Pass one sample per `add` call "
            "(use `add_batch` for a list of samples)."
        )
    if not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number)):
        raise TypeError(
            f"Sample {index}: expected a numeric or boolean {what} mask, got dtype {array.dtype}."
        )
    return array


def _binarize_prediction(pred: np.ndarray, *, threshold: float | None, index: int) -> np.ndarray:
    """Prediction -> bool; non-binary values need an explicit ``threshold``."""
    if pred.dtype == np.bool_:
        return pred
    if threshold is not None:
        return pred > threshold
    if not ((pred == 0) | (pred == 1)).all():
        low, high = float(pred.min()), float(pred.max())
        raise ValueError(
            f"Sample {index}: the prediction is not binary (values in [{low:g}, {high:g}], "
            f"dtype {pred.dtype}) and no threshold was given. Pass threshold=0.0 for mask "
            "logits (the LISA / SegCompass convention: logit > 0 is foreground) or "
            "threshold=0.5 for probabilities, or binarize the masks yourself."
        )
    return pred == 1


def _split_reference(
    gt: np.ndarray, *, ignore_index: int | None, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth (K, H, W) -> (foreground, ignored) bool maps of shape (H, W)."""
    if gt.dtype == np.bool_:
        foreground = gt.any(axis=0)
        return foreground, np.zeros_like(foreground)
    ignored = gt == ignore_index if ignore_index is not None else np.zeros(gt.shape, bool)
    positive = gt == 1
    if not (positive | ignored | (gt == 0)).all():
        allowed = "0, 1" + (f" and {ignore_index} (ignore)" if ignore_index is not None else "")
        raise ValueError(
            f"Sample {index}: ground-truth values must be {allowed}; got values "
            f"{np.unique(gt)[:10].tolist()}. Convert instance ids or soft masks to binary masks "
            "first, or set ignore_index to the label that marks ignored pixels."
        )
    foreground = positive.any(axis=0)  # (H, W) union over the K objects
    # A pixel is ignored when some object marks it so and no object claims it as foreground.
    return foreground, ignored.any(axis=0) & ~foreground


class SegmentationMetrics:
    """Streaming gIoU / cIoU / N-acc / T-acc, overall and per family (see module docstring).

    Args:
        empty_iou: IoU of a sample whose prediction and ground truth are both empty when the
            sample is not flagged no-target. 1.0 (default) is LISA's convention, used for the
            numbers of the SegCompass paper; 0.0 is Seg-Zero's.
        ignore_index: ground-truth label of pixels excluded from I and U (255 in ReasonSeg);
            ``None`` disables it.
        threshold: binarize non-boolean predictions with ``pred > threshold`` (0.0 for
            logits, 0.5 for probabilities). ``None`` (default) accepts only binary
            predictions (bool, or numbers that are all 0 or 1) and refuses anything else.

    Example:
        >>> import numpy as np
        >>> metrics = SegmentationMetrics(empty_iou=0.0)
        >>> empty = np.zeros((2, 2), dtype=bool)
        >>> metrics.add(empty, empty).iou
        0.0
    """

    def __init__(
        self,
        *,
        empty_iou: float = 1.0,
        ignore_index: int | None = 255,
        threshold: float | None = None,
    ) -> None:
        if not 0.0 <= float(empty_iou) <= 1.0:
            raise ValueError(
                f"empty_iou must lie in [0, 1] (1.0 = LISA, 0.0 = Seg-Zero), got {empty_iou}."
            )
        self.empty_iou = float(empty_iou)
        self.ignore_index = ignore_index
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        """Forget every sample added so far."""
        self._overall = _Tally()
        self._families: dict[str, _Tally] = {}

    def __len__(self) -> int:
        return self._overall.n

    def add(
        self,
        pred_masks: Any,
        gt_masks: Any,
        *,
        family: str | None = None,
        no_target: bool | None = None,
    ) -> SampleScore:
        """Add one sample.

        Args:
            pred_masks: (H, W) mask or (K, H, W) stack of predicted object masks (numpy, torch
                or a list of 2-D masks; an empty list means "nothing predicted"). The union
                over K is evaluated (gRefCOCO convention).
            gt_masks: (H, W) or (K, H, W) ground truth with values 0, 1 and ``ignore_index``
                (or bool). A (0, H, W) stack or an empty list means "no target".
            family: optional group name (dataset / split) for the per-family rows.
            no_target: whether this is a no-target sample. ``None`` infers it: True only
                when the ground truth holds zero object masks (K = 0, as in SegCompass's
                prepared gRefCOCO rows). An empty 2-D mask is *not* inferred as no-target; it
                gets ``empty_iou`` instead. Pass True/False to say it explicitly.

        Returns:
            The sample's [`SampleScore`].

        Raises:
            ValueError: masks of different (H, W), wrong ranks, non-binary values without a
                threshold, or ``no_target=True`` with a non-empty ground truth.
        """
        index = len(self)
        if family is not None and not isinstance(family, str):
            raise TypeError(f"family must be a string or None, got {type(family).__name__}.")
        if family == OVERALL:
            raise ValueError(
                f"family={OVERALL!r} is reserved for the all-samples row; pick another name."
            )
        pred = _as_stack(pred_masks, what="prediction", index=index)
        gt = _as_stack(gt_masks, what="ground truth", index=index)
        if pred is not None and gt is not None and pred.shape[1:] != gt.shape[1:]:
            raise ValueError(
                f"Sample {index}: prediction shape {_shape(pred_masks)} and ground-truth shape "
                f"{_shape(gt_masks)} differ in (H, W). Resize the prediction to the ground "
                "truth's original image size before evaluating."
            )
        if no_target is None:
            no_target = gt is None or gt.shape[0] == 0

        if gt is None or gt.shape[0] == 0:
            foreground = ignored = None
        else:
            foreground, ignored = _split_reference(gt, ignore_index=self.ignore_index, index=index)
        if pred is None or pred.shape[0] == 0:
            predicted = None
        else:
            predicted = _binarize_prediction(pred, threshold=self.threshold, index=index).any(
                axis=0
            )  # (H, W) union over the K predicted objects
            if ignored is not None:
                predicted = predicted & ~ignored

        pred_area = 0 if predicted is None else int(predicted.sum())
        gt_area = 0 if foreground is None else int(foreground.sum())
        if no_target and gt_area > 0:
            raise ValueError(
                f"Sample {index}: no_target=True but the ground truth has {gt_area} foreground "
                "pixels. Pass no_target=False (or None to infer it) for samples with a target."
            )
        if no_target:
            # ReLA: TP -> IoU 1 and nothing added; FN -> IoU 0 and U grows by the prediction.
            stats = IoUStats(0, pred_area)
            iou = 1.0 if pred_area == 0 else 0.0
        else:
            inter = 0 if predicted is None or foreground is None else predicted & foreground
            stats = IoUStats(int(np.sum(inter)), pred_area + gt_area - int(np.sum(inter)))
            iou = stats.iou(self.empty_iou)
        score = SampleScore(stats.intersection, stats.union, iou, pred_area == 0, bool(no_target))

        is_target = not no_target and gt_area > 0
        self._overall.add(score, is_target)
        if family is not None:
            self._families.setdefault(family, _Tally()).add(score, is_target)
        return score

    def add_batch(
        self,
        predictions: Sequence[Any],
        references: Sequence[Any],
        *,
        families: Sequence[str | None] | None = None,
        no_target: Sequence[bool | None] | None = None,
    ) -> list[SampleScore]:
        """Add several samples; each argument is a per-sample list as in [`add`]."""
        n = len(predictions)
        for name, values in (("references", references), ("families", families)):
            if values is not None and len(values) != n:
                raise ValueError(
                    f"Got {n} predictions but {len(values)} {name}; give one per sample."
                )
        if no_target is not None and len(no_target) != n:
            raise ValueError(
                f"Got {n} predictions but {len(no_target)} no_target flags; give one per sample."
            )
        return [
            self.add(
                pred,
                gt,
                family=None if families is None else families[i],
                no_target=None if no_target is None else no_target[i],
            )
            for i, (pred, gt) in enumerate(zip(predictions, references))
        ]

    def compute(self) -> MetricsResult:
        """Metrics over everything added so far (the accumulator is not reset)."""
        if len(self) == 0:
            raise ValueError("No sample was added; call `add` before `compute`.")
        logger.debug("Computing metrics over %d samples (empty_iou=%s).", len(self), self.empty_iou)
        return MetricsResult(
            overall=self._overall.result(),
            per_family={name: tally.result() for name, tally in self._families.items()},
            empty_iou=self.empty_iou,
        )


def mask_iou_stats(
    pred: Any,
    gt: Any,
    ignore_index: int | None = 255,
    *,
    threshold: float | None = None,
) -> IoUStats:
    """Intersection and union pixel counts of one prediction against one ground truth.

    Args:
        pred: (H, W) or (K, H, W) predicted mask(s), bool or 0/1 (or scores with
            ``threshold``); a stack is reduced to its union.
        gt: (H, W) or (K, H, W) ground truth, bool or uint8 with 0, 1 and ``ignore_index``.
        ignore_index: ground-truth label whose pixels are left out of both counts.
        threshold: foreground is ``pred > threshold`` for non-binary predictions.

    Returns:
        [`IoUStats`] ``(intersection, union)``; ``.iou()`` gives the ratio.
    """
    metrics = SegmentationMetrics(ignore_index=ignore_index, threshold=threshold)
    score = metrics.add(pred, gt, no_target=False)
    return IoUStats(score.intersection, score.union)


def segmentation_metrics(
    predictions: Sequence[Any],
    references: Sequence[Any],
    *,
    families: Sequence[str | None] | None = None,
    no_target: Sequence[bool | None] | None = None,
    empty_iou: float = 1.0,
    ignore_index: int | None = 255,
    threshold: float | None = None,
) -> MetricsResult:
    """All metrics of a list of samples in one call (see [`SegmentationMetrics`])."""
    metrics = SegmentationMetrics(
        empty_iou=empty_iou, ignore_index=ignore_index, threshold=threshold
    )
    metrics.add_batch(predictions, references, families=families, no_target=no_target)
    return metrics.compute()


def giou(
    predictions: Sequence[Any],
    references: Sequence[Any],
    *,
    empty_iou: float = 1.0,
    ignore_index: int | None = 255,
    threshold: float | None = None,
) -> float:
    """Mean per-sample IoU of paired lists of masks.

    >>> import numpy as np
    >>> giou([np.ones((1, 2), bool)], [np.array([[1, 0]], np.uint8)])
    0.5
    """
    return segmentation_metrics(
        predictions, references, empty_iou=empty_iou, ignore_index=ignore_index, threshold=threshold
    ).overall.giou


def ciou(
    predictions: Sequence[Any],
    references: Sequence[Any],
    *,
    ignore_index: int | None = 255,
    threshold: float | None = None,
) -> float | None:
    """Cumulative IoU sum(I) / sum(U) of paired lists of masks; ``None`` if sum(U) is 0.

    >>> import numpy as np
    >>> ciou([np.ones((1, 2), bool)], [np.array([[1, 0]], np.uint8)])
    0.5
    """
    return segmentation_metrics(
        predictions, references, ignore_index=ignore_index, threshold=threshold
    ).overall.ciou
