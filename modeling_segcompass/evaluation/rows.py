"""Evaluation of a model on data rows: gIoU / cIoU / N-acc / T-acc per family and overall.

`evaluate_rows` is what `segcompass eval` and the demo's held-out evaluations run: end to end
(the model writes its own reasoning) or teacher-forced (the gold reasoning is fed in).
`answer_phrase` / `answer_phrase_accuracy` read which object a chain of thought named, for
data whose reasoning ends with ``answer : <object>`` (the synthetic world).

A row is a dict in the collator schema: ``image`` (PIL RGB), ``instruction``, ``masks``
(N, H, W) at the image size, optional ``family`` and, for teacher forcing, ``response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..answer_format import parse_answer
from .metrics import MetricsResult, SegmentationMetrics

#: What precedes the named object in a synthetic chain of thought ("... . answer : red circle").
ANSWER_MARKER = "answer :"


class EvaluationRun(NamedTuple):
    """What `evaluate_rows` returns.

    Attributes:
        metrics: the `metrics.MetricsResult`.
        samples: one dict per row: index, family, iou, pred_empty, no_target, num_masks
            (and text when the model generated it).
    """

    metrics: MetricsResult
    samples: list[dict[str, Any]]


def row_masks(masks: Any, height: int, width: int) -> np.ndarray:
    """Masks of a row as (N, H, W) uint8: arrays, nested lists or a list of PIL images.

    Raises:
        ValueError: the masks are not one (H, W) mask per target at the image size.
    """
    if isinstance(masks, (list, tuple)) and masks and hasattr(masks[0], "convert"):
        array = np.stack([np.asarray(m) for m in masks])  # list of PIL masks
    else:
        array = np.asarray(masks)
    if array.size == 0:
        return np.zeros((0, height, width), dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (height, width):
        raise ValueError(
            f"a data row has masks of shape {array.shape}, expected (N, {height}, {width}) "
            "(one mask per target at the image size)."
        )
    return array.astype(np.uint8, copy=False)


def evaluate_rows(
    model: Any,
    processor: Any,
    rows: list[dict[str, Any]],
    *,
    teacher_forced: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    empty_iou: float = 1.0,
    confidence_threshold: float | None = None,
    mask_threshold: float | None = None,
    progress: bool = True,
) -> EvaluationRun:
    """gIoU / cIoU / N-acc / T-acc of ``model`` on ``rows``, per family and overall.

    End to end (default) the model writes its own reasoning (`model.segment`); with
    ``teacher_forced`` the gold ``response`` of each row is fed in one forward and the slots
    with a `<REF_POS>` and a confidence logit >= the threshold are kept (as `segment` does).
    Predictions are compared at each image's original size.

    Args:
        model: a `SegCompassForReasoningSegmentation` (put in eval mode here).
        processor: its `SegCompassProcessor`.
        rows: the data rows (see the module docstring).
        teacher_forced: feed the gold reasoning instead of generating it.
        batch_size: rows per forward.
        max_new_tokens: generation budget (end to end).
        empty_iou: IoU of an empty prediction on an empty target (1: LISA, 0: Seg-Zero).
        confidence_threshold: keep slots whose confidence logit is >= this (default:
            ``config.slot_confidence_threshold``).
        mask_threshold: foreground where the mask logit > this (default:
            ``config.mask_threshold``).
        progress: show a progress bar over the batches.
    """
    import torch
    from tqdm.auto import tqdm

    config = model.config
    conf_thr = (
        config.slot_confidence_threshold if confidence_threshold is None else confidence_threshold
    )
    mask_thr = config.mask_threshold if mask_threshold is None else mask_threshold
    metrics = SegmentationMetrics(empty_iou=empty_iou)
    samples: list[dict[str, Any]] = []
    starts = list(range(0, len(rows), batch_size))
    model.eval()
    for start in tqdm(starts, desc="eval", unit="batch", disable=not progress):
        chunk = rows[start : start + batch_size]
        images = [row["image"] for row in chunk]
        instructions = [row["instruction"] for row in chunk]
        texts: list[str | None] = [None] * len(chunk)
        if teacher_forced:
            enc = processor(images, instructions, responses=[row["response"] for row in chunk])
            inputs = {
                k: enc[k].to(model.device)
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                          "sam_pixel_values", "valid_mask")
            }  # fmt: skip
            with torch.no_grad():
                out = model(**inputs, compute_logits=False)
            masks = processor.post_process_masks(
                out.mask_logits.cpu(), enc["original_sizes"], enc["reshaped_input_sizes"],
                threshold=mask_thr,
            )  # fmt: skip
            keep = (out.conf_logits.cpu() >= conf_thr) & out.ref_mask.cpu()  # (B, K)
            predictions = [masks[j][keep[j]].numpy() for j in range(len(chunk))]
        else:
            results = model.segment(
                images, instructions, processor, max_new_tokens=max_new_tokens,
                confidence_threshold=confidence_threshold, mask_threshold=mask_threshold,
            )  # fmt: skip
            predictions = [r.masks.cpu().numpy() for r in results]
            texts = [r.text for r in results]
        for j, row in enumerate(chunk):
            width, height = row["image"].size
            gt = row_masks(row["masks"], height, width)
            score = metrics.add(predictions[j], gt, family=row.get("family"))
            sample = {
                "index": start + j,
                "family": row.get("family"),
                "iou": score.iou,
                "pred_empty": score.pred_empty,
                "no_target": score.no_target,
                "num_masks": int(predictions[j].shape[0]),
            }
            if texts[j] is not None:
                sample["text"] = texts[j]
            samples.append(sample)
    return EvaluationRun(metrics.compute(), samples)


def answer_phrase(text: str) -> str:
    """The object a chain of thought names: the words after its last ``answer :``.

    Only the finished thought counts (the first ``<think> ... </think>`` block, read by
    `answer_format.parse_answer`); "" when there is no such block or it names nothing.

    >>> answer_phrase("<think> red circle . answer : red circle </think> <REF_POS>")
    'red circle'
    """
    thought = parse_answer(text).thought or ""
    return thought.split(ANSWER_MARKER)[-1].strip() if ANSWER_MARKER in thought else ""


def answer_phrase_accuracy(
    samples: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> float | None:
    """Share of generated completions whose answer phrase is their row's gold one.

    Args:
        samples: `EvaluationRun.samples` of an end-to-end run (each has ``index`` and
            ``text``).
        rows: the rows evaluated, each with its gold ``response``.

    Returns:
        The fraction in [0, 1], or None when there is no sample.
    """
    hits = sum(
        answer_phrase(sample["text"]) == answer_phrase(rows[sample["index"]]["response"])
        for sample in samples
    )
    return hits / len(samples) if samples else None


__all__ = [
    "ANSWER_MARKER",
    "EvaluationRun",
    "answer_phrase",
    "answer_phrase_accuracy",
    "evaluate_rows",
    "row_masks",
]
