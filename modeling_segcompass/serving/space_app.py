"""Gradio demo of a SegCompass model (exported as ``app.py``, ready for a Hugging Face Space).

Upload an image (or pick the model's example), type an instruction, and see the masks over
the image, the chain of thought and the concept trace: which SAE concepts each slot gathered,
with their labels from the model's ``concept_labels.json``, and the tokens they fired on, image
tokens named ``patch(row,col)`` on the merged patch grid as the ``segcompass`` CLI names them.

The work is in `segment_for_demo`, a plain function (no gradio needed, so it is tested
directly); `build_demo` wraps it in `gr.Blocks`. Which model: the ``SEGCOMPASS_MODEL``
environment variable (a Hub id or folder), else the folder this file sits in (the export
puts it next to the model), else `DEFAULT_MODEL_ID` (set by the export to the repo id).

Run: ``pip install gradio`` then ``python app.py``. In a Space: copy ``app.py`` and the
export's ``requirements.txt``, and set ``SEGCOMPASS_MODEL`` to the model repo id unless the
export named it; the example image and the concept labels are read from the model's folder or
downloaded from its repo.

Remote file of the export: standard library, numpy, PIL, transformers, huggingface_hub, gradio.
"""

from __future__ import annotations

import copy
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
#: The example image of an export (next to this file, or a file of the model folder / repo).
EXAMPLE_IMAGE = "example.png"
#: The concept-label side file of a model folder (written by `interpret.labels`).
CONCEPT_LABELS_FILE = "concept_labels.json"
_CONCEPT_LABELS_FORMAT = "segcompass-concept-labels"
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


def visual_token_names(processor: Any, image: Any, instruction: str) -> dict[int, str]:
    """Position -> ``"patch(row,col)"`` for the image tokens of the prompt the pipeline builds.

    The processor encodes ``image`` and ``instruction`` as the pipeline does, so positions
    match those of the concept trace. Image ``(t, h, w)`` raw patches become
    ``t * (h / m) * (w / m)`` tokens, ``m`` the merge size, laid out row-major.
    """
    encoded = processor(images=[image], instructions=[instruction], return_tensors="pt")
    image_id = getattr(processor, "image_token_id", None)
    grid = encoded.get("image_grid_thw")
    if image_id is None or grid is None:
        return {}
    _, height, width = (int(v) for v in grid[0])
    merge = int(getattr(processor, "merge_size", 1) or 1)
    cols = max(width // merge, 1)
    per_frame = max(height // merge, 1) * cols
    names, index = {}, 0
    for position, token_id in enumerate(encoded["input_ids"][0].tolist()):
        if token_id == image_id:
            row, col = divmod(index % per_frame, cols)
            names[position] = f"patch({row},{col})"
            index += 1
    return names


def readable_trace(
    trace: list[dict[str, Any]], token_names: dict[int, str], labels: dict[int, str]
) -> list[dict[str, Any]]:
    """The pipeline's concept trace with the names a reader needs: each token at a position
    of ``token_names`` renamed (``patch(row,col)`` for image tokens) and each concept given
    its ``label`` (None when ``labels`` does not name it). The input is left unchanged."""
    out = copy.deepcopy(trace)
    for slot in out:
        for concept in slot.get("concepts", []):
            concept["label"] = labels.get(int(concept["id"]))
            for token in concept.get("tokens", []):
                if token.get("position") in token_names:
                    token["token"] = token_names[token["position"]]
    return out


def segment_for_demo(
    pipe: Any,
    image: Any,
    instruction: str,
    *,
    alpha: float = 0.5,
    concept_labels: dict[int, str] | None = None,
    **pipe_kwargs: Any,
) -> DemoResult:
    """Run the pipeline on one image and build what the demo shows.

    Args:
        pipe: a ``reasoning-segmentation`` pipeline (or any callable with its output format;
            image tokens are named ``patch(row,col)`` when it has a ``processor``).
        image: PIL image or uint8 array.
        instruction: the instruction.
        alpha: mask opacity of the overlay.
        concept_labels: latent id -> label (`load_concept_labels`), shown in the trace.
        **pipe_kwargs: passed to the pipeline (``max_new_tokens``, thresholds, ...).
    """
    if image is None:
        raise ValueError("Upload an image first.")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("Type an instruction, e.g. 'the largest red shape'.")
    rgb = to_rgb_array(image)
    output = pipe(rgb, instruction.strip(), **pipe_kwargs)
    overlay = overlay_masks(rgb, output.get("masks") or [], alpha=alpha)
    processor = getattr(pipe, "processor", None)
    names = {} if processor is None else visual_token_names(processor, rgb, instruction.strip())
    trace = readable_trace(output.get("concept_trace") or [], names, concept_labels or {})
    return DemoResult(
        overlay=overlay, text=format_answer(output), trace_json=json.dumps(trace, indent=2)
    )


def build_demo(
    pipe: Any,
    *,
    title: str = "SegCompass: reasoning segmentation",
    examples: list[list[str]] | None = None,
    concept_labels: dict[int, str] | None = None,
) -> Any:
    """The Gradio Blocks app around `segment_for_demo` (needs ``pip install gradio``).

    Args:
        pipe: the pipeline.
        title: the page title.
        examples: ``[[image path, instruction], ...]`` offered under the inputs
            (`example_inputs`).
        concept_labels: latent id -> label shown in the trace (`load_concept_labels`).
    """
    import gradio as gr

    config = getattr(getattr(pipe, "model", None), "config", None)
    default_threshold = float(getattr(config, "slot_confidence_threshold", 0.5))

    def run(image: Any, instruction: str, threshold: float, max_new_tokens: int):
        try:
            result = segment_for_demo(
                pipe,
                image,
                instruction,
                concept_labels=concept_labels,
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
                threshold = gr.Slider(
                    -5.0, 5.0, value=default_threshold, step=0.1, label="Confidence logit"
                )
                max_new_tokens = gr.Slider(
                    8, 512, value=DEFAULT_MAX_NEW_TOKENS, step=8, label="Max new tokens"
                )
                button = gr.Button("Segment", variant="primary")
                if examples:
                    gr.Examples(examples=examples, inputs=[image, instruction])
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


def model_file(model_id: str, name: str) -> str | None:
    """The local path of file ``name`` of the model: in its folder, else downloaded from its
    Hub repo; None when it has no such file (or the Hub cannot be reached)."""
    if os.path.isdir(model_id):
        path = os.path.join(model_id, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(model_id, name)
    except Exception as err:  # absent, offline or private: the app runs without the file
        logger.warning("No %s for %s (%s); the app runs without it.", name, model_id, err)
        return None


def load_concept_labels(path: str | None) -> dict[int, str]:
    """Latent id -> label from a ``concept_labels.json`` (None or unnamed latents: left out)."""
    if path is None:
        return {}
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if not isinstance(data, dict) or data.get("format") != _CONCEPT_LABELS_FORMAT:
        raise ValueError(
            f"{path} is not a SegCompass concept-label file (expected format "
            f"{_CONCEPT_LABELS_FORMAT!r}); build one with interpret.labels.build_concept_labels."
        )
    latents = data.get("latents") or {}
    return {int(k): str(v["label"]) for k, v in latents.items() if v.get("label")}


def example_inputs(model_id: str) -> list[list[str]]:
    """``[[image path, instruction]]``: the model's example (`EXAMPLE_IMAGE` next to this
    file or of the model, with `EXAMPLE_INSTRUCTION`); empty when there is none."""
    if not EXAMPLE_INSTRUCTION:
        return []
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), EXAMPLE_IMAGE)
    path = here if os.path.isfile(here) else model_file(model_id, EXAMPLE_IMAGE)
    return [[path, EXAMPLE_INSTRUCTION]] if path else []


def main() -> None:
    """Serve `resolve_model_id` with its example and concept labels."""
    model_id = resolve_model_id()
    labels = load_concept_labels(model_file(model_id, CONCEPT_LABELS_FILE))
    demo = build_demo(
        load_pipeline(model_id), examples=example_inputs(model_id), concept_labels=labels
    )
    demo.launch()


if __name__ == "__main__":
    main()
