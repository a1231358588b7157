"""interpret/render.py: the pictures and the HTML report show what they say."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from modeling_segcompass.interpret.ablation import ablate_concepts
from modeling_segcompass.interpret.explain import explain
from modeling_segcompass.interpret.quality import (
    QUALITY_MEASURES,
    Correlation,
    QualityAccuracyReport,
    SampleQuality,
)
from modeling_segcompass.interpret.render import (
    plot_quality_vs_accuracy,
    render_ablation,
    render_explanation,
    write_report,
)
from modeling_segcompass.interpret.trace import _active_latents, _forward
from tests.interpret.known_world import LEFT, RIGHT, scene


def test_render_and_report_show_what_they_say(world, tmp_path):
    model, _, tokenizer, batch, _ = world
    rng = np.random.default_rng(12)
    rows = [scene(rng, t) for t in (0, 1)]
    inputs = batch(rows)
    explanations = explain(model, inputs, tokenizer=tokenizer)
    explanations[0].slots[0].kept = True  # draw its mask whatever the untrained confidence
    explanations[0].slots[0].mask = torch.zeros(64, 64, dtype=torch.bool)
    explanations[0].slots[0].mask[:32, :32] = True
    path = render_explanation(explanations[0], rows[0][0], tmp_path / "one.png")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue = np.array([31, 120, 181])  # slot 0's colour, blended over the image in the mask panel
    right_part = picture[:, int(picture.shape[1] * 0.75) :]
    close = (np.abs(right_part - (0.45 * 60 + 0.55 * blue)).sum(-1) < 30).sum()
    assert close > 200
    index = write_report(
        explanations, [r[0] for r in rows], tmp_path / "report", instructions=["a <b>", "c"]
    )
    text = index.read_text()
    assert "src='image_0.png'" in text and "src='image_1.png'" in text
    assert (tmp_path / "report" / "image_1.png").is_file()
    assert "a &lt;b&gt;" in text and f"<td>{LEFT}</td>" in text


def test_render_ablation_shows_the_mask_moving(mask_world, tmp_path):
    model, batch = mask_world
    row = scene(np.random.default_rng(500), 1)  # "right": removing RIGHT moves the mask
    inputs = batch([row])
    output = _forward(model, inputs)
    active = sorted(_active_latents(output, 0) - {LEFT, RIGHT})
    edits = {
        "top-1 removed": ablate_concepts(model, inputs, top_n=1, slot=0, output=output),
        "1 random removed": ablate_concepts(model, inputs, [active[0]], output=output),
    }
    assert edits["top-1 removed"].concept_ids == [[RIGHT]]
    path = render_ablation(output, edits, 0, 0, tmp_path / "ablation.png", image=row[0])
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    bottom = picture[picture.shape[0] // 2 :]
    width = picture.shape[1] // 3
    # mask pixels are blended with slot 0's blue: blue - red = 0.55 * (181 - 31) ~ 82
    blue = [
        int(((p[..., 2] - p[..., 0]) > 50).sum()) for p in np.split(bottom[:, : 3 * width], 3, 1)
    ]
    unedited, top, random = blue
    assert unedited > 500 and abs(random - unedited) < 0.1 * unedited
    expected = [
        int((m > 0).sum())
        for m in (output.mask_logits[0, 0], edits["top-1 removed"].mask_logits[0, 0])
    ]
    assert (top > unedited) == (expected[1] > expected[0])  # drawn as computed
    assert float(edits["top-1 removed"].mask_change[0, 0]) > 0.9


def test_plot_quality_vs_accuracy_draws_one_panel_per_measure(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        SampleQuality(i, None, 1, float(rng.uniform()), float(rng.uniform()), 0.5, math.nan)
        for i in range(8)
    ]
    correlations = [
        Correlation(m, k, 8, 0.1, 0.5, -0.2, 0.4, 0.95, "fisher")
        for m in QUALITY_MEASURES[:2]
        for k in ("spearman", "pearson")
    ]  # attribute_agreement all NaN: its panel says "not available"
    report = QualityAccuracyReport(samples, correlations)
    path = plot_quality_vs_accuracy(report, tmp_path / "plots" / "quality.png")
    assert path == tmp_path / "plots" / "quality.png"
    assert Image.open(path).size[0] > 600
    report.plot_path = path
    index = write_report([], None, tmp_path / "report", quality=report)
    assert "src='quality_vs_accuracy.png'" in index.read_text()
    assert (tmp_path / "report" / "quality_vs_accuracy.png").is_file()


def _long_explanation(num_slots=3, size=(64, 64)):
    from modeling_segcompass.interpret.explain import (
        ConceptContribution,
        ImageExplanation,
        SlotExplanation,
        TokenActivation,
    )

    def concept(i):
        token = TokenActivation(position=i, token="<REF_POS>", kind="ref", activation=1.0,
                                weight=0.1, patch=None)  # fmt: skip
        label = "a rather long concept label " * 2
        return ConceptContribution(latent_id=100 + i, weight=0.2 - 0.01 * i, share=0.1,
                                   label=label, num_tokens=3, tokens=[token])  # fmt: skip

    slots = [
        SlotExplanation(
            slot=k,
            has_ref=True,
            conf_logit=0.5,
            confidence=0.62,
            kept=k == 0,
            mask_area=10,
            heatmap=torch.rand(size),
            mask=torch.rand(size) > 0.5,
            concepts=[concept(i) for i in range(5)],
        )  # fmt: skip
        for k in range(num_slots)
    ]
    completion = "<think> the big red triangle left of the circle </think> " + "<REF_POS>" * 30
    return ImageExplanation(index=0, prompt=None, completion=completion, cot=None,
                            image_size=size, num_active_concepts=12, slots=slots)  # fmt: skip


def test_explanation_figure_keeps_text_and_bars_apart_and_draws_large_thumbnails(tmp_path):
    from modeling_segcompass.interpret.render import explanation_figure

    image = Image.new("RGB", (64, 64), (40, 40, 40))
    for num_slots in (1, 3, 5):
        figure = explanation_figure(_long_explanation(num_slots), image, title="a title")
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        by_label = {}
        for axis in figure.axes:
            by_label.setdefault(axis.get_label(), []).append(axis)
        thumbnails, (text_axis,), bars = (
            by_label[k] for k in ("thumbnail", "completion", "concepts")
        )
        assert len(thumbnails) == num_slots + 2 and len(bars) == num_slots
        # thumbnails: at least 200 px on each side (the image is square)
        for axis in thumbnails:
            box = axis.get_window_extent(renderer)
            assert min(box.width, box.height) >= 200, (num_slots, box)
        # the completion's text stays clear of every bar chart (labels and titles included)
        (text,) = text_axis.texts
        text_box = text.get_window_extent(renderer)
        boxes = [axis.get_tightbbox(renderer) for axis in bars + thumbnails]
        assert not any(text_box.overlaps(box) for box in boxes), num_slots
        # neighbouring panels (titles and labels included) and the figure's title stay apart
        for row in (bars, thumbnails):
            for left, right in zip(row, row[1:]):
                assert not left.get_tightbbox(renderer).overlaps(right.get_tightbbox(renderer))
        title_box = figure._suptitle.get_window_extent(renderer)
        assert not any(title_box.overlaps(box) for box in boxes), num_slots
        assert not any(
            t.get_tightbbox(renderer).overlaps(b.get_tightbbox(renderer))
            for t in thumbnails
            for b in bars
        )
        for axis in bars:
            inside = axis.get_window_extent(renderer)
            for name in axis.texts:
                assert inside.x0 <= name.get_window_extent(renderer).x0 < inside.x1
        # the figure is filled: the thumbnails use most of its width
        used = sum(a.get_window_extent(renderer).width for a in thumbnails)
        assert used > 0.75 * figure.bbox.width, num_slots
    figure.savefig(tmp_path / "layout.png")
