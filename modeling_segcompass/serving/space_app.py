"""Gradio demo of a SegCompass model (exported as ``app.py``, ready for a Hugging Face Space).

Upload an image, type an instruction, and see the masks over the image, the chain of thought
and the concept trace (which SAE concepts each slot gathered, and on which tokens).

The work is in `segment_for_demo`, a plain function (no gradio needed, so it is tested
directly); `build_demo` wraps it in `gr.Blocks`. Which model: the ``SEGCOMPASS_MODEL``
environment variable (a Hub id or folder), else the folder this file sits in (the export
puts it next to the model), else `DEFAULT_MODEL_ID` (set by the export to the repo id).

Run: ``pip install gradio`` then ``python app.py``. In a Space: copy ``app.py``, add
``requirements.txt`` with torch, transformers, pillow, and set ``SEGCOMPASS_MODEL`` to the
model repo id.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # images in and out; gradio ships Pillow
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

logger = logging.getLogger(__name__)

#: Replaced by `hub.export` with the repo id the model is pushed to (or the export folder).
DEFAULT_MODEL_ID = ""
#: Replaced by `hub.export` with the instruction of the model's example (``example.png``).
EXAMPLE_INSTRUCTION = ""
#: The generation budget the app starts with (`hub.export` may set the model's own).
DEFAULT_MAX_NEW_TOKENS = 96
#: One colour per mask (RGB), cycled.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
)


@dataclass
class DemoResult:
    """What the demo shows for one request.

    Attributes:
        overlay: the image (H, W, 3) uint8 with each mask blended in its palette colour.
        text: markdown with the chain of thought, the answer and the scores (or the reason
            there is no mask).
        trace_json: the concept trace as indented JSON.
    """

    overlay: np.ndarray
    text: str
    trace_json: str


def to_rgb_array(image: Any) -> np.ndarray:
    """PIL (any mode) or numpy (H, W) / (H, W, 3|4) uint8 -> (H, W, 3) uint8."""
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(
            "Expected a PIL image or a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), got "
            f"{array.dtype} {tuple(array.shape)}."
        )
    return np.ascontiguousarray(array[..., :3])


def overlay_masks(image: np.ndarray, masks: list[np.ndarray], *, alpha: float = 0.5) -> np.ndarray:
    """Blend each (H, W) bool mask into the (H, W, 3) uint8 image with its `PALETTE` colour.

    A pixel of mask i becomes ``round((1 - alpha) * pixel + alpha * PALETTE[i])``; later
    masks are drawn over earlier ones; pixels outside every mask are unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Expected alpha in [0, 1], got {alpha}.")
    out = image.astype(np.float64)
    for i, mask in enumerate(masks):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"Mask {i} has shape {mask.shape}, expected the image's (H, W) = {image.shape[:2]}."
            )
        colour = np.asarray(PALETTE[i % len(PALETTE)], dtype=np.float64)
        out[mask] = (1.0 - alpha) * out[mask] + alpha * colour
    return np.rint(out).clip(0, 255).astype(np.uint8)


def format_answer(output: dict[str, Any]) -> str:
    """Markdown: the chain of thought, then one line per mask (or why there is none)."""
    text = output.get("text") or ""
    lines = ["**Model output**", "", "```", text.strip(), "```", ""]
    scores = output.get("scores") or []
    slots = output.get("slot_indices") or list(range(len(scores)))
    if scores:
        for i, (slot, score) in enumerate(zip(slots, scores)):
            name = PALETTE[i % len(PALETTE)]
            lines.append(f"- mask {i + 1} (slot {slot}, colour rgb{name}): confidence {score:.2f}")
    else:
        reason = output.get("reason") or "no slot passed the confidence threshold"
        lines.append(f"No mask: {reason}.")
    return "\n".join(lines)


def segment_for_demo(
    pipe: Any, image: Any, instruction: str, *, alpha: float = 0.5, **pipe_kwargs: Any
) -> DemoResult:
    """Run the pipeline on one image and build what the demo shows.

    Args:
        pipe: a ``reasoning-segmentation`` pipeline (or any callable with its output format).
        image: PIL image or uint8 array.
        instruction: the instruction.
        alpha: mask opacity of the overlay.
        **pipe_kwargs: passed to the pipeline (``max_new_tokens``, thresholds, ...).
    """
    if image is None:
        raise ValueError("Upload an image first.")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("Type an instruction, e.g. 'the largest red shape'.")
    rgb = to_rgb_array(image)
    output = pipe(rgb, instruction.strip(), **pipe_kwargs)
    overlay = overlay_masks(rgb, output.get("masks") or [], alpha=alpha)
    trace = json.dumps(output.get("concept_trace") or [], indent=2)
    return DemoResult(overlay=overlay, text=format_answer(output), trace_json=trace)


def build_demo(pipe: Any, *, title: str = "SegCompass: reasoning segmentation") -> Any:
    """The Gradio Blocks app around `segment_for_demo` (needs ``pip install gradio``)."""
    import gradio as gr

    def run(image: Any, instruction: str, threshold: float, max_new_tokens: int):
        try:
            result = segment_for_demo(
                pipe,
                image,
                instruction,
                confidence_threshold=float(threshold),
                max_new_tokens=int(max_new_tokens),
            )
        except ValueError as err:
            raise gr.Error(str(err)) from err
        return result.overlay, result.text, json.loads(result.trace_json)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\nThe model reasons in `<think>` tags, then each `<REF_POS>` slot gathers "
            "sparse-autoencoder concepts and points SAM at one object. The trace shows which "
            "concepts each slot used and the tokens they fired on."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image")
                instruction = gr.Textbox(label="Instruction", placeholder="the largest red shape")
                threshold = gr.Slider(-5.0, 5.0, value=0.5, step=0.1, label="Confidence logit")
                max_new_tokens = gr.Slider(
                    8, 512, value=DEFAULT_MAX_NEW_TOKENS, step=8, label="Max new tokens"
                )
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                overlay = gr.Image(type="numpy", label="Masks")
                answer = gr.Markdown()
                trace = gr.JSON(label="Concept trace")
        button.click(
            run,
            inputs=[image, instruction, threshold, max_new_tokens],
            outputs=[overlay, answer, trace],
        )
    return demo


def resolve_model_id() -> str:
    """``SEGCOMPASS_MODEL``, else this file's folder when it holds a model, else the repo id."""
    from_env = os.environ.get("SEGCOMPASS_MODEL")
    if from_env:
        return from_env
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(here, "config.json")):
        return here
    if DEFAULT_MODEL_ID:
        return DEFAULT_MODEL_ID
    raise ValueError(
        "No model to serve: set SEGCOMPASS_MODEL to a Hub id or folder of a SegCompass model."
    )


def load_pipeline(model_id: str | None = None) -> Any:
    """``pipeline(model=..., trust_remote_code=True)`` for `resolve_model_id`."""
    from transformers import pipeline

    return pipeline(model=model_id or resolve_model_id(), trust_remote_code=True)


if __name__ == "__main__":
    build_demo(load_pipeline()).launch()
