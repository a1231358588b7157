"""The ``predict`` command: one image + instruction -> mask.png (the kept masks over the image,
one colour per slot), result.json (completion, scores, masks as COCO RLE, concept trace) and
report.html."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..answer_format import parse_answer
from .common import CLIError, require_positive, seed_everything, write_json
from .model_folder import load_model

#: Slot colours of the overlay (RGB), slot k uses colour k mod 8.
SLOT_COLOURS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)  # fmt: skip


def overlay_masks(image: Any, masks: np.ndarray, slots: Sequence[int], alpha: float = 0.5) -> Any:
    """The image with each mask tinted in its slot's colour (`SLOT_COLOURS`).

    Args:
        image: PIL RGB image of size (W, H).
        masks: (N, H, W) bool.
        slots: the slot index of each mask (picks its colour).
        alpha: tint strength in [0, 1].
    """
    from PIL import Image

    pixels = np.asarray(image.convert("RGB")).astype(np.float32)  # (H, W, 3)
    for mask, slot in zip(masks, slots):
        colour = np.asarray(SLOT_COLOURS[int(slot) % len(SLOT_COLOURS)], dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--image {str(file)!r}: no such file.")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"--image {str(file)!r} is not an image PIL can read ({error}).") from error


def _mask_record(mask: np.ndarray, slot: int, score: float) -> dict[str, Any]:
    """One kept mask in result.json: slot, score, area, bbox (x0, y0, x1, y1) and COCO RLE."""
    from ..data.formats import encode_rle

    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] if xs.size else None
    return {
        "slot": int(slot),
        "score": float(score),
        "area": int(mask.sum()),
        "bbox": bbox,
        "rle": encode_rle(mask),
    }


def cmd_predict(args: argparse.Namespace) -> int:
    """`segcompass predict`: one image + instruction -> mask.png, result.json, report.html."""
    image = _open_image(args.image)
    if not args.instruction.strip():
        raise CLIError("--instruction is empty; say what to segment.")
    require_positive(args, "max_new_tokens", "top_concepts")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {str(output)!r} is a file; give a folder.")
    seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    model, processor = loaded.model, loaded.processor
    (result,) = model.segment(
        image,
        args.instruction,
        processor,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        confidence_threshold=args.confidence_threshold,
        mask_threshold=args.mask_threshold,
        strict_format=not args.no_strict_format,
    )
    output.mkdir(parents=True, exist_ok=True)
    masks = result.masks.cpu().numpy().astype(bool)  # (N, H, W)
    slots = result.slot_indices.cpu().tolist()
    scores = result.scores.cpu().tolist()
    overlay_masks(image, masks, slots).save(output / "mask.png")

    from ..interpret.explain import build_explanation_inputs, explain
    from ..interpret.render import write_report

    labels = None
    if (loaded.folder / "concept_labels.json").is_file():
        from ..interpret.labels import load_concept_labels

        labels = load_concept_labels(loaded.folder)
    inputs = build_explanation_inputs(processor, [image], [args.instruction], [result.text])
    inputs = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    (explanation,) = explain(
        model,
        inputs,
        tokenizer=processor.tokenizer,
        concept_labels=labels,
        top_n=args.top_concepts,
        confidence_threshold=args.confidence_threshold,
        mask_threshold=args.mask_threshold,
    )
    index = write_report(
        [explanation], [image], output, title="SegCompass prediction",
        instructions=[args.instruction],
    )  # fmt: skip
    report = output / "report.html"
    index.replace(report)
    cot = parse_answer(result.text).thought or ""
    data = {
        "image": str(Path(args.image)),
        "instruction": args.instruction,
        "text": result.text,
        "cot": cot,
        "reason": result.reason,
        "image_size": [image.height, image.width],
        "scores": scores,
        "slot_indices": slots,
        "conf_logits": result.conf_logits.cpu().tolist(),
        "masks": [_mask_record(m, k, s) for m, k, s in zip(masks, slots, scores)],
        "concept_trace": explanation.to_dict(),
        "files": {"overlay": "mask.png", "report": "report.html", "report_image": "image_0.png"},
    }
    write_json(output / "result.json", data)
    print(f"chain of thought: {cot or '(none)'}")
    print(f"completion: {result.text}")
    if result.reason:
        print(f"no mask: {result.reason}")
    else:
        found = ", ".join(f"slot {k} ({s:.2f})" for k, s in zip(slots, scores))
        print(f"{len(slots)} mask(s): {found}")
    print(f"wrote {output / 'mask.png'}, {output / 'result.json'}, {report}")
    return 0


__all__ = ["SLOT_COLOURS", "cmd_predict", "overlay_masks"]
