"""Does concept quality predict mask accuracy? Per-sample measures and their correlations.

`concept_quality_vs_accuracy` sets per-sample concept-quality measures (`QUALITY_MEASURES`)
against mask IoU; `correlate` gives Spearman / Pearson coefficients with confidence
intervals. Nothing here draws: `render.plot_quality_vs_accuracy` plots a report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modeling_segcompass import _decoder_layers
from ..sparse_autoencoder import SparseCodes, fraction_of_variance_unexplained
from .labels import ConceptLabels
from .trace import (
    _binary_iou,
    _forward,
    _nan_to_none,
    _nan_to_none_dict,
    _valid_area,
    slot_concept_totals,
)


@dataclass
class SampleQuality:
    """Concept-quality measures and mask accuracy of one sample.

    Attributes:
        index: position in the dataset; family: the row's ``family`` (synthetic world) or None.
        num_objects: targets of the sample.
        iou: mean IoU of the targets with their matched slots' masks (unmatched target: 0).
        sae_fvu: fraction of variance the SAE leaves unexplained on the sample's tokens
            (lower = better concepts).
        slot_concentration: share of a matched slot's weight held by its `top_n` concepts,
            averaged over matched slots (higher = more focused slots).
        attribute_agreement: share of a matched slot's `top_n` concepts whose label is one of
            its target's attribute words (colour, kind, size), averaged; NaN without labels
            or object attributes.
    """

    index: int
    family: str | None
    num_objects: int
    iou: float
    sae_fvu: float
    slot_concentration: float
    attribute_agreement: float


@dataclass
class Correlation:
    """Correlation of one quality measure with mask IoU.

    Attributes:
        measure: the `SampleQuality` field; method: "spearman" or "pearson".
        n: samples used (both values finite); r: the coefficient; p_value: two-sided.
        ci_low, ci_high: the confidence interval; confidence: its level; ci_method:
            "fisher" (Fisher z; Bonett-Wright standard error for Spearman) or "bootstrap"
            (percentile).
    """

    measure: str
    method: str
    n: int
    r: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    ci_method: str


def correlate(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    method: str = "spearman",
    confidence: float = 0.95,
    ci_method: str = "fisher",
    n_bootstrap: int = 1000,
    seed: int = 0,
    measure: str = "x",
) -> Correlation:
    """Spearman or Pearson correlation with a confidence interval (NaN pairs dropped).

    Fisher z: ``tanh(atanh(r) +- z_(1+c)/2 * se)`` with ``se = 1/sqrt(n-3)`` (Pearson) or
    ``sqrt((1 + r^2/2)/(n-3))`` (Spearman, Bonett & Wright 2000). Needs n >= 4; otherwise the
    interval is NaN.

    >>> c = correlate([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], method="pearson")
    >>> round(c.r, 4)
    0.7746
    """
    from scipy import stats

    if method not in ("spearman", "pearson"):
        raise ValueError(f"correlate: method must be 'spearman' or 'pearson', got {method!r}.")
    if ci_method not in ("fisher", "bootstrap"):
        raise ValueError(
            f"correlate: ci_method must be 'fisher' or 'bootstrap', got {ci_method!r}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"correlate: confidence must lie in (0, 1), got {confidence}.")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"correlate: x and y must be 1-D of equal length, got {x.shape}, {y.shape}."
        )
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    nan = Correlation(
        measure, method, n, math.nan, math.nan, math.nan, math.nan, confidence, ci_method
    )
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan
    func = stats.spearmanr if method == "spearman" else stats.pearsonr
    result = func(x, y)
    r, p = float(result[0]), float(result[1])
    low = high = math.nan
    if ci_method == "fisher" and n >= 4:
        z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
        se = (1 + r * r / 2) ** 0.5 if method == "spearman" else 1.0
        se /= math.sqrt(n - 3)
        crit = float(stats.norm.ppf(0.5 + confidence / 2))
        low, high = math.tanh(z - crit * se), math.tanh(z + crit * se)
    elif ci_method == "bootstrap":
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_bootstrap):
            pick = rng.integers(0, n, n)
            if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
                samples.append(float(func(x[pick], y[pick])[0]))
        if samples:
            low, high = np.quantile(samples, [0.5 - confidence / 2, 0.5 + confidence / 2]).tolist()
    return Correlation(measure, method, n, r, p, low, high, confidence, ci_method)


@dataclass
class QualityAccuracyReport:
    """Concept quality against mask accuracy over a dataset.

    Attributes:
        samples: one `SampleQuality` per sample with at least one target.
        correlations: Spearman and Pearson for each measure.
        plot_path: the scatter plot PNG, once drawn (``report.plot_path =
            render.plot_quality_vs_accuracy(report, path)``; `render.write_report` shows it).
    """

    samples: list[SampleQuality]
    correlations: list[Correlation]
    plot_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": [_nan_to_none(list(asdict(s).values())) for s in self.samples],
            "sample_fields": list(SampleQuality.__dataclass_fields__),
            "correlations": [_nan_to_none_dict(asdict(c)) for c in self.correlations],
            "plot_path": str(self.plot_path) if self.plot_path else None,
        }

    def to_markdown(self) -> str:
        lines = ["| measure | method | n | r | 95% CI | p |", "|---|---|---|---|---|---|"]
        for c in self.correlations:
            lines.append(
                f"| {c.measure} | {c.method} | {c.n} | {c.r:.3f} | [{c.ci_low:.3f}, "
                f"{c.ci_high:.3f}] | {c.p_value:.2g} |"
            )
        return "\n".join(lines)


QUALITY_MEASURES = ("sae_fvu", "slot_concentration", "attribute_agreement")


def _default_attributes(row: Mapping[str, Any], target: int) -> set[str]:
    """Attribute words of target `target` of a synthetic-world row (colour, kind, size)."""
    objects, targets = row.get("objects"), row.get("target_indices")
    if not objects or targets is None or target >= len(targets):
        return set()
    obj = objects[int(targets[target])]
    return {str(obj[key]).lower() for key in ("colour", "kind", "size") if obj.get(key)}


def _row_masks(row: Mapping[str, Any]) -> np.ndarray:
    masks = np.asarray(row["masks"])
    if masks.size == 0:
        image = row["image"]
        width, height = (
            image.size
            if hasattr(image, "size") and not isinstance(image, np.ndarray)
            else (
                image.shape[1],
                image.shape[0],
            )
        )
        return np.zeros((0, height, width), dtype=np.uint8)
    return masks.astype(np.uint8)


@torch.no_grad()
def concept_quality_vs_accuracy(
    model: Any,
    dataset: Iterable[Mapping[str, Any]],
    processor: Any | None = None,
    *,
    batch_size: int = 8,
    concept_labels: ConceptLabels | None = None,
    top_n: int = 5,
    target_attributes: Callable[[Mapping[str, Any], int], set[str]] | None = None,
    confidence: float = 0.95,
    ci_method: str = "fisher",
    n_bootstrap: int = 1000,
    seed: int = 0,
    plot_path: str | os.PathLike | None = None,
) -> QualityAccuracyReport:
    """Per-sample concept quality against mask IoU, with correlations.

    arXiv 2605.22658 reports that concept quality correlates with mask accuracy; this measures
    it on any dataset of rows with ``image``, ``instruction``, ``response`` (the gold or a
    generated completion), ``masks`` (N, H, W) and, for attribute agreement, the synthetic
    world's ``objects`` / ``target_indices`` (or pass `target_attributes(row, j) -> set of
    words`). Samples without targets are skipped (their IoU is undefined). The computation
    draws nothing; `plot_path` asks `render.plot_quality_vs_accuracy` to draw the result there.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        dataset: the rows (a list, a `datasets.Dataset`, any iterable).
        processor: a `SegCompassProcessor` (default: ``model.processor``).
        batch_size: rows per forward.
        concept_labels: enables the attribute-agreement measure.
        top_n: concepts per slot for concentration and agreement.
        confidence, ci_method, n_bootstrap, seed: see `correlate`.
        plot_path: not accepted any more (a clear error says how to draw the report).
    """
    if plot_path is not None:
        raise TypeError(
            "concept_quality_vs_accuracy computes the correlations and draws nothing; draw them "
            "with `from modeling_segcompass.interpret.render import plot_quality_vs_accuracy; "
            "report.plot_path = plot_quality_vs_accuracy(report, path)`."
        )
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            "concept_quality_vs_accuracy: pass processor=SegCompassProcessor(...) or attach one "
            "as model.processor."
        )
    attributes = target_attributes or _default_attributes
    config = model.config
    layer = _decoder_layers(model.vlm)[config.sae_layer]
    samples: list[SampleQuality] = []
    rows: list[Mapping[str, Any]] = []
    start = 0

    def flush() -> None:
        nonlocal start
        if not rows:
            return
        inputs = processor(
            [r["image"] for r in rows],
            [r["instruction"] for r in rows],
            responses=[r["response"] for r in rows],
            masks=[_row_masks(r) for r in rows],
        )
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: Any, _inputs: Any, out: Any) -> None:
            captured["hidden"] = out[0] if isinstance(out, tuple) else out

        handle = layer.register_forward_hook(hook)
        try:
            output = _forward(model, inputs, targets=True)
        finally:
            handle.remove()
        hidden = captured["hidden"].float()
        threshold = config.mask_threshold
        valid = _valid_area(inputs, len(rows), output.mask_logits.shape[-1])
        pred = output.mask_logits.cpu() > threshold
        gt = inputs["gt_masks"].cpu() > 0.5
        assignment = output.slot_to_target.cpu()
        attention = inputs["attention_mask"].bool()
        for b, row in enumerate(rows):
            count = int(inputs["num_objects"][b])
            if count == 0:
                continue
            ious, concentration, agreement = [], [], []
            for j in range(count):
                slots = (assignment[b] == j).nonzero().flatten().tolist()
                if not slots:
                    ious.append(0.0)
                    continue
                k = slots[0]
                ious.append(float(_binary_iou(pred[b, k], gt[b, j], valid[b])))
                totals = slot_concept_totals(output, b, k, model.config.d_sae)
                total = float(totals.sum())
                top = totals.topk(min(top_n, int((totals > 0).sum())))
                concentration.append(float(top.values.sum()) / total if total > 0 else math.nan)
                words = attributes(row, j)
                if concept_labels is not None and words and top.indices.numel():
                    labels = [concept_labels.label(c) for c in top.indices.tolist()]
                    agreement.append(
                        float(np.mean([(label or "").lower() in words for label in labels]))
                    )
            real = attention[b].to(hidden.device)
            codes = SparseCodes(output.concept_indices[b][real], output.concept_values[b][real])
            fvu = fraction_of_variance_unexplained(hidden[b][real], model.sae.decode(codes).float())
            samples.append(
                SampleQuality(
                    index=start + b,
                    family=row.get("family"),
                    num_objects=count,
                    iou=float(np.mean(ious)),
                    sae_fvu=float(fvu),
                    slot_concentration=float(np.nanmean(concentration))
                    if any(np.isfinite(concentration))
                    else math.nan,
                    attribute_agreement=float(np.mean(agreement)) if agreement else math.nan,
                )
            )
        start += len(rows)
        rows.clear()

    for row in dataset:
        rows.append(row)
        if len(rows) == batch_size:
            flush()
    flush()
    correlations = [
        correlate(
            [getattr(s, measure) for s in samples],
            [s.iou for s in samples],
            method=method,
            confidence=confidence,
            ci_method=ci_method,
            n_bootstrap=n_bootstrap,
            seed=seed,
            measure=measure,
        )
        for measure in QUALITY_MEASURES
        for method in ("spearman", "pearson")
    ]
    return QualityAccuracyReport(samples, correlations)
