"""interpret/quality.py: correlations and concept quality against mask accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from modeling_segcompass.interpret.labels import build_concept_labels
from modeling_segcompass.interpret.quality import (
    QUALITY_MEASURES,
    concept_quality_vs_accuracy,
    correlate,
)
from tests.interpret.known_world import scene


def test_correlate_matches_hand_computed_values():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    pearson = correlate(x, y, method="pearson")
    assert pearson.r == pytest.approx(0.7745967, abs=1e-6)  # 3 / sqrt(10 * 1.5)
    z, half = math.atanh(pearson.r), 1.959964 / math.sqrt(2)
    assert pearson.ci_low == pytest.approx(math.tanh(z - half), abs=1e-5)
    assert pearson.ci_high == pytest.approx(math.tanh(z + half), abs=1e-5)
    spearman = correlate([1, 2, 3, 4, 5, 6], [1, 4, 9, 16, 25, 36])
    assert spearman.r == pytest.approx(1.0)
    few = correlate([1, 2], [2, 1])
    assert math.isnan(few.r) and few.n == 2
    with_nan = correlate([1, 2, float("nan"), 4, 5], [1, 2, 3, 4, 6], method="pearson")
    assert with_nan.n == 4
    boot = correlate(np.arange(30), np.arange(30) + np.random.default_rng(0).normal(0, 5, 30), ci_method="bootstrap", n_bootstrap=200)  # fmt: skip
    assert boot.ci_low <= boot.r <= boot.ci_high


def test_quality_vs_accuracy_on_known_world(world):
    model, processor, tokenizer, batch, _ = world
    rng = np.random.default_rng(11)
    rows = []
    for i in range(6):
        image, instruction, response, masks = scene(rng, i % 2)
        rows.append({"image": Image.fromarray(image), "instruction": instruction,
                     "response": response, "masks": masks, "family": "toy"})  # fmt: skip
    rows.append({**rows[0], "masks": np.zeros((0, 64, 64), np.uint8)})  # no target: skipped
    labels = build_concept_labels(model, [batch([scene(rng, t % 2) for t in range(4)])], tokenizer)
    report = concept_quality_vs_accuracy(
        model, rows, processor, batch_size=4, concept_labels=labels,
        target_attributes=lambda row, j: {"left" if "left" in row["response"] else "right"},
    )  # fmt: skip
    assert [s.index for s in report.samples] == list(range(6))
    for sample in report.samples:
        assert 0 <= sample.iou <= 1 and sample.sae_fvu >= 0
        assert 0 < sample.slot_concentration <= 1
        # the slot's heaviest concept is the word's latent, named after the target's side
        assert sample.attribute_agreement > 0
    assert {(c.measure, c.method) for c in report.correlations} == {
        (m, k) for m in QUALITY_MEASURES for k in ("spearman", "pearson")
    }
    assert report.plot_path is None  # computing draws nothing (render.plot_quality_vs_accuracy)
    assert "| measure |" in report.to_markdown()


def test_quality_refuses_plot_path_and_names_the_renderer():
    from modeling_segcompass.interpret.quality import concept_quality_vs_accuracy

    with pytest.raises(TypeError, match="plot_quality_vs_accuracy"):
        concept_quality_vs_accuracy(None, [], plot_path="x.png")
