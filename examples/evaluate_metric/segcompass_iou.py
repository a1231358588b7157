"""SegCompass IoU: gIoU, cIoU, N-acc and T-acc as a Hugging Face `evaluate` metric.

Load it from this local file (no Hub access needed)::

    import evaluate
    metric = evaluate.load("examples/evaluate_metric/segcompass_iou.py")
    metric.compute(predictions=[pred_mask], references=[gt_mask])

The computation lives in ``modeling_segcompass.evaluation.metrics``, so the ``modeling_segcompass``
package must be importable (``pip install -e .`` from the repository root). This file only
adapts it to the `evaluate` interface; the definitions are documented there.
"""

import datasets
import evaluate
import numpy as np

from modeling_segcompass.evaluation.metrics import segmentation_metrics

_DESCRIPTION = """
Mask metrics of reasoning / referring segmentation. gIoU is the mean per-sample IoU, cIoU
is sum(I) / sum(U). Ground-truth pixels equal to `ignore_index` (255 in ReasonSeg) are left
out. For gRefCOCO no-target samples (ReLA's definitions), an empty prediction is a true
positive (IoU 1, nothing added to the sums) and a non-empty one a false negative (IoU 0, the
union grows by the predicted area); N-acc = TP / (TP + FN) over no-target samples and
T-acc = TN / (TN + FP) over target samples, where a target sample predicted empty is a FP.
An empty prediction on an empty ground truth of a sample not flagged no-target scores
`empty_iou`: 1.0 (LISA, default) or 0.0 (Seg-Zero).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of binary (H, W) masks (0/1, uint8). For multi-object samples pass the
        union of the predicted object masks. Threshold logits yourself (logit > 0).
    references: list of (H, W) ground-truth masks with 0, 1 and 255 (ignored), same sizes
        as the predictions. For multi-object samples pass the union of the object masks.
    families: optional list of group names (e.g. dataset split), one per sample, for
        per-family results.
    no_target: optional list of bools flagging gRefCOCO no-target samples (ground truth
        must then be empty). Not given: no sample is treated as no-target.
    empty_iou: IoU of empty prediction vs empty ground truth on samples not flagged
        no-target; 1.0 (LISA, default) or 0.0 (Seg-Zero).
    ignore_index: ground-truth label of ignored pixels (default 255).
Returns:
    gIoU, cIoU, N-acc, T-acc: fractions in [0, 1], or None when undefined (no no-target
        sample for N-acc, no target sample for T-acc, empty total union for cIoU);
    n: number of samples;
    per_family: {family: {"gIoU", "cIoU", "N-acc", "T-acc", "n", ...counts}} if families
        were given.
Examples:
    >>> metric = evaluate.load("examples/evaluate_metric/segcompass_iou.py")
    >>> metric.compute(predictions=[[[1, 1]]], references=[[[1, 0]]])["gIoU"]
    0.5
"""

_CITATION = """
@inproceedings{segcompass2026,
  title     = {SegCompass: Exploring Interpretable Alignment with Sparse Autoencoders for
               Enhanced Reasoning Segmentation},
  booktitle = {CVPR},
  note      = {arXiv:2605.22658},
  year      = {2026}
}
"""


class SegcompassIou(evaluate.Metric):
    """gIoU / cIoU / N-acc / T-acc (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))  # (H, W)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": mask, "references": mask}),
            reference_urls=["https://arxiv.org/abs/2605.22658"],
        )

    def _compute(
        self,
        predictions,
        references,
        families=None,
        no_target=None,
        empty_iou: float = 1.0,
        ignore_index: int = 255,
    ) -> dict:
        # Rows come back from Arrow as nested lists; make them (H, W) uint8 arrays.
        preds = [np.asarray(p, dtype=np.uint8) for p in predictions]
        refs = [np.asarray(r, dtype=np.uint8) for r in references]
        result = segmentation_metrics(
            preds,
            refs,
            families=families,
            no_target=[bool(flag) for flag in no_target] if no_target is not None else None,
            empty_iou=empty_iou,
            ignore_index=ignore_index,
        )
        output = result.overall.to_dict()
        if families is not None:
            output["per_family"] = {
                name: group.to_dict() for name, group in result.per_family.items()
            }
        return output
