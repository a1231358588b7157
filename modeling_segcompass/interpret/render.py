"""Pictures of the concept trace and a static HTML report of them.

PNG figures of an explanation, of an ablation and of concept quality against accuracy;
`write_report` puts the explanation figures, their concept tables and the study tables in
one HTML page.

matplotlib is imported inside the functions (an Agg canvas, no pyplot state), so the rest
of the interpret package works without it.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling_segcompass import SegCompassOutput
from .ablation import AblationResult, AblationStudy
from .explain import ConceptContribution, ImageExplanation
from .quality import QUALITY_MEASURES, QualityAccuracyReport


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_quality_vs_accuracy(report: QualityAccuracyReport, path: str | os.PathLike) -> Path:
    """Scatter of each quality measure against IoU, Spearman r and CI in the titles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = _figure(4.2 * len(QUALITY_MEASURES), 3.8)
    axes = figure.subplots(1, len(QUALITY_MEASURES), squeeze=False)[0]
    spearman = {c.measure: c for c in report.correlations if c.method == "spearman"}
    ious = np.array([s.iou for s in report.samples], dtype=float)
    for axis, measure in zip(axes, QUALITY_MEASURES):
        values = np.array([getattr(s, measure) for s in report.samples], dtype=float)
        keep = np.isfinite(values) & np.isfinite(ious)
        axis.scatter(values[keep], ious[keep], s=14, alpha=0.7, color="tab:blue")
        c = spearman.get(measure)
        if c is not None and c.n and math.isfinite(c.r):
            title = f"{measure}\nSpearman r={c.r:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}], n={c.n}"
        else:
            title = f"{measure}\n(not available)"
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(measure)
        axis.set_ylabel("mask IoU")
        axis.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    figure.savefig(path)
    return path


_SLOT_COLOURS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                 (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5))  # fmt: skip


def _as_rgb(image: Any, size: tuple[int, int]) -> np.ndarray:
    """Image as float RGB (H, W, 3) in [0, 1] at `size` (a grey canvas when None)."""
    if image is None:
        return np.full((*size, 3), 0.5)
    if hasattr(image, "convert"):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
    array = array.astype(float)
    array = array / 255.0 if array.max() > 1.0 else array
    if array.shape[:2] != tuple(size):
        tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float()
        array = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]
        array = array.permute(1, 2, 0).numpy()
    return np.clip(array[..., :3], 0.0, 1.0)


def _concept_name(concept: ConceptContribution) -> str:
    name = f"#{concept.latent_id}"
    if concept.label:
        name += f" {concept.label}"
    if concept.tokens:
        name += f" ({concept.tokens[0].token})"
    return name if len(name) <= 28 else name[:27] + "..."


#: Inches per panel of the explanation figure (at 100 dpi: 260 px thumbnails).
_PANEL_INCHES = 2.6


def explanation_figure(
    explanation: ImageExplanation,
    image: Any,
    *,
    max_concepts: int = 5,
    title: str | None = None,
) -> Any:
    """The figure of one image's trace (a matplotlib `Figure` on an Agg canvas).

    Three bands, top to bottom, so nothing overlaps whatever the slot count or text length:

    * thumbnails: the image, each slot's heatmap over it (confidence in the title, "kept" or
      "dropped"), the kept slots' masks in slot colours; one panel each, about 2.5 inches;
    * the completion (reasoning and `<REF_POS>` tokens), wrapped across the full width;
    * one bar chart per slot of its top concepts (weight in the slot), the names written
      inside the chart (label and strongest token), so no tick label reaches a neighbour.

    Axes carry labels for tests and tools: "thumbnail", "completion", "concepts".
    """
    size = explanation.image_size
    rgb = _as_rgb(image, size)
    slots = explanation.slots
    columns = len(slots) + 2
    width = _PANEL_INCHES * columns
    text = explanation.completion or ""
    wrap_chars = max(40, int(width * 13))  # monospace at 7.5 pt: about 14 characters an inch
    wrapped = _wrap(text, wrap_chars, max_lines=8)
    text_height = 0.3 + 0.15 * wrapped.count("\n") + 0.15
    bar_height = 0.55 + 0.3 * max(
        1, min(max_concepts, max((len(s.concepts) for s in slots), default=1))
    )
    # Bands in inches: thumbnails, completion, room for the bar charts' titles, bar charts;
    # the figure's title, the thumbnails' titles and the bars' axis labels get their own
    # margins, so nothing needs squeezing and nothing overlaps.
    title_room, heading_room, label_room = (0.35 if title else 0.0), 0.45, 0.5
    heights = [_PANEL_INCHES, text_height, heading_room, bar_height]
    total = title_room + heading_room + sum(heights) + label_room
    figure = _figure(width, total)
    bands = figure.add_gridspec(
        4, 1, height_ratios=heights, left=0.01, right=0.99, hspace=0.0,
        top=1.0 - (title_room + heading_room) / total, bottom=label_room / total,
    )  # fmt: skip
    thumbs = bands[0].subgridspec(1, columns, wspace=0.06)

    def thumbnail(column: int, picture: np.ndarray, heading: str) -> Any:
        axis = figure.add_subplot(thumbs[0, column], label="thumbnail")
        axis.imshow(picture)
        axis.set_title(heading, fontsize=9)
        axis.axis("off")
        return axis

    thumbnail(0, rgb, "image")
    for i, slot in enumerate(slots):
        axis = thumbnail(
            i + 1,
            rgb,
            f"slot {slot.slot} heatmap\nconf {slot.confidence:.2f} "
            f"({'kept' if slot.kept else ('no <REF_POS>' if not slot.has_ref else 'dropped')})",
        )
        axis.imshow(slot.heatmap.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    overlay = rgb.copy()
    kept = explanation.kept_slots
    for slot in kept:
        colour = np.array(_SLOT_COLOURS[slot.slot % len(_SLOT_COLOURS)])
        mask = slot.mask.numpy().astype(bool)
        overlay[mask] = 0.45 * overlay[mask] + 0.55 * colour
    thumbnail(
        columns - 1,
        overlay,
        "masks: " + (", ".join(f"slot {s.slot}" for s in kept) if kept else "none kept"),
    )

    text_axis = figure.add_subplot(bands[1], label="completion")
    text_axis.axis("off")
    text_axis.text(
        0.0, 1.0, "completion: " + wrapped if text else "completion: (none)", va="top",
        ha="left", fontsize=7.5, family="monospace", transform=text_axis.transAxes,
    )  # fmt: skip

    bar_grid = bands[3].subgridspec(1, max(1, len(slots)), wspace=0.08)
    for i, slot in enumerate(slots):
        bars = figure.add_subplot(bar_grid[0, i], label="concepts")
        bars.set_title(f"slot {slot.slot}: top concepts", fontsize=9)
        concepts = slot.concepts[:max_concepts]
        if not concepts:
            bars.text(0.5, 0.5, "no active concept", ha="center", va="center", fontsize=8)
            bars.axis("off")
            continue
        weights = [c.weight for c in concepts][::-1]
        colour = _SLOT_COLOURS[i % len(_SLOT_COLOURS)]
        positions = range(len(concepts))
        bars.barh(positions, weights, color=colour, alpha=0.35, height=0.8)
        largest = max(max(weights), 1e-12)
        for y, concept in zip(positions, concepts[::-1]):
            bars.text(
                0.01 * largest, y, f"{_concept_name(concept)}  {concept.weight:.3g}",
                va="center", ha="left", fontsize=7, clip_on=True,
            )  # fmt: skip
        bars.set_xlim(0, largest * 1.05)
        bars.set_ylim(-0.6, len(concepts) - 0.4)
        bars.set_yticks([])
        bars.set_xlabel("weight in slot", fontsize=8)
        bars.tick_params(axis="x", labelsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def render_explanation(
    explanation: ImageExplanation,
    image: Any,
    path: str | os.PathLike,
    *,
    max_concepts: int = 5,
    title: str | None = None,
) -> Path:
    """Draw one image's trace to a PNG (:func:`explanation_figure`): the image, each slot's
    heatmap and the kept masks; the completion; each slot's top concepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = explanation_figure(explanation, image, max_concepts=max_concepts, title=title)
    figure.savefig(path)
    return path


def render_ablation(
    output: SegCompassOutput,
    edits: Mapping[str, AblationResult],
    sample: int,
    slot: int,
    path: str | os.PathLike,
    *,
    image: Any = None,
    threshold: float = 0.0,
    title: str | None = None,
) -> Path:
    """Draw what removing concepts did to one slot: heatmaps (top row) and masks (bottom).

    Column 1 is the unedited forward (`output`), then one column per entry of `edits`
    (e.g. ``{"top-3 removed": ..., "3 random removed": ...}``, `ablate_concepts` results on
    the same inputs). Titles give the mean |heatmap logit change| and the mask's 1 - IoU,
    soft change and mean |logit change| against the unedited mask. Maps are drawn on the
    (M, M) mask grid; `image` (square) is resized onto it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heat0 = output.heatmap_logits[sample, slot].detach().float().cpu()
    mask0 = output.mask_logits[sample, slot].detach().float().cpu()
    size = tuple(mask0.shape)
    rgb = _as_rgb(image, size)
    columns = [("unedited", heat0, mask0, None)]
    for name, result in edits.items():
        columns.append(
            (
                name,
                result.heatmap_logits[sample, slot].float().cpu(),
                result.mask_logits[sample, slot].float().cpu(),
                result,
            )
        )
    figure = _figure(2.7 * len(columns), 6.4)
    axes = figure.subplots(2, len(columns), squeeze=False)
    for c, (name, heat, mask, result) in enumerate(columns):
        top, bottom = axes[0][c], axes[1][c]
        top.imshow(rgb)
        top.imshow(torch.sigmoid(heat).numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        top.contour(heat.numpy() > threshold, levels=[0.5], colors="white", linewidths=0.8)
        overlay = rgb.copy()
        fg = (mask > threshold).numpy()
        overlay[fg] = 0.45 * overlay[fg] + 0.55 * np.array(_SLOT_COLOURS[0])
        bottom.imshow(overlay)
        if fg.any():
            bottom.contour(fg, levels=[0.5], colors="white", linewidths=0.8)
        if result is None:
            top.set_title(f"{name}\nheatmap (slot {slot})", fontsize=8)
            bottom.set_title(f"{name}\nmask: {int(fg.sum())} px", fontsize=8)
        else:
            top.set_title(
                f"{name}\nheatmap |d logit| {float(result.heatmap_change[sample, slot]):.3g}",
                fontsize=8,
            )
            bottom.set_title(
                f"mask 1-IoU {float(result.mask_change[sample, slot]):.3f}, "
                f"soft {float(result.soft_mask_change[sample, slot]):.2g}\n"
                f"|d logit| {float(result.mask_logit_change[sample, slot]):.3g}, "
                f"{int(fg.sum())} px",
                fontsize=8,
            )
        top.axis("off")
        bottom.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _wrap(text: str, width: int, max_lines: int = 14) -> str:
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["..."]
    return "\n".join(lines)


def write_report(
    explanations: Sequence[ImageExplanation],
    images: Sequence[Any] | None,
    folder: str | os.PathLike,
    *,
    title: str = "SegCompass concept trace",
    instructions: Sequence[str] | None = None,
    ablation_study: AblationStudy | None = None,
    quality: QualityAccuracyReport | None = None,
    max_concepts: int = 5,
) -> Path:
    """A static HTML report (no server): one PNG per image, the texts and concept tables.

    Writes ``folder/index.html`` and ``folder/image_{i}.png`` (paths in the HTML are
    relative, so the folder can be moved or zipped). Optional sections summarise an
    `AblationStudy` and a `QualityAccuracyReport` (its plot is copied next to the report).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images is not None and len(images) != len(explanations):
        raise ValueError(
            f"write_report: got {len(images)} images for {len(explanations)} explanations."
        )
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:13px}pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    for i, explanation in enumerate(explanations):
        picture = render_explanation(
            explanation,
            images[i] if images is not None else None,
            folder / f"image_{i}.png",
            max_concepts=max_concepts,
        )
        parts.append(f"<h2>Image {i}</h2>")
        if instructions is not None and i < len(instructions):
            parts.append(f"<p><b>Instruction:</b> {esc(instructions[i])}</p>")
        parts.append(f"<img src='{picture.name}' alt='concept trace of image {i}' width='100%'>")
        if explanation.completion:
            parts.append(f"<p><b>Completion:</b></p><pre>{esc(explanation.completion)}</pre>")
        parts.append(
            f"<p>{explanation.num_active_concepts} distinct concepts active in the sequence.</p>"
        )
        for slot in explanation.slots:
            status = (
                "kept" if slot.kept else ("no &lt;REF_POS&gt;" if not slot.has_ref else "dropped")
            )
            parts.append(
                f"<h3>Slot {slot.slot}: confidence {slot.confidence:.3f} ({status}), "
                f"mask area {slot.mask_area} px</h3>"
            )
            if not slot.concepts:
                parts.append("<p>No active concept.</p>")
                continue
            parts.append(
                "<table><tr><th>latent</th><th>label</th><th>weight</th><th>share</th>"
                "<th>tokens it fired on (activation)</th></tr>"
            )
            for concept in slot.concepts[:max_concepts]:
                tokens = ", ".join(
                    f"{esc(t.token)} [{t.kind}] ({t.activation:.2f})" for t in concept.tokens
                )
                parts.append(
                    f"<tr><td>{concept.latent_id}</td><td>{esc(concept.label or '')}</td>"
                    f"<td>{concept.weight:.4f}</td><td>{concept.share:.1%}</td>"
                    f"<td>{tokens}</td></tr>"
                )
            parts.append("</table>")
    if ablation_study is not None:
        parts.append("<h2>Causal check: concept ablation</h2>")
        parts.append(_markdown_table_to_html(ablation_study.to_markdown()))
    if quality is not None:
        parts.append("<h2>Concept quality vs mask accuracy</h2>")
        parts.append(_markdown_table_to_html(quality.to_markdown()))
        if quality.plot_path is not None and Path(quality.plot_path).is_file():
            target = folder / "quality_vs_accuracy.png"
            if Path(quality.plot_path).resolve() != target.resolve():
                target.write_bytes(Path(quality.plot_path).read_bytes())
            parts.append(f"<img src='{target.name}' alt='quality vs accuracy' width='100%'>")
    parts.append("</body></html>")
    index = folder / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


def _markdown_table_to_html(markdown: str) -> str:
    """The small tables of `to_markdown` as HTML (header, separator, rows, then free text)."""
    out, rows = [], [line for line in markdown.splitlines()]
    table = [r for r in rows if r.startswith("|")]
    rest = [r for r in rows if r and not r.startswith("|")]
    if table:
        out.append("<table>")
        for n, line in enumerate(table):
            if n == 1:
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            tag = "th" if n == 0 else "td"
            out.append(
                "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"
            )
        out.append("</table>")
    out.extend(f"<p>{html.escape(line)}</p>" for line in rest)
    return "\n".join(out)
