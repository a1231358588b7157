"""Custom handler for Hugging Face Inference Endpoints (exported as ``handler.py``).

The Hub's serverless widget does not run custom-code models; an
Inference Endpoint does, with this file at the repository root. The endpoint builds
``EndpointHandler(path)`` once and calls it per request with the JSON payload.

Request (JSON)::

    {"inputs": {"image": "<base64 PNG/JPEG, optionally a data: URL>",
                "instruction": "the object you would use to cut bread"},
     "parameters": {"max_new_tokens": 64, "confidence_threshold": 0.5, ...}}

A binary image upload arrives as ``{"inputs": <PIL image>}``: give the instruction in
``parameters.instruction``. Response: ``{"text", "reason", "scores", "slot_indices",
"masks", "concept_trace"}`` where each mask is COCO uncompressed run-length encoding
``{"size": [H, W], "counts": [...]}`` (column-major runs, starting with background);
`rle_to_mask` decodes it.

Remote file of the export: standard library, numpy, torch, transformers (PIL optional).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Any

import numpy as np
from transformers import pipeline

try:  # PIL decodes base64 images; without it only numpy arrays can be sent in-process
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None

logger = logging.getLogger(__name__)

#: Request parameters passed on to the pipeline.
ALLOWED_PARAMETERS = (
    "max_new_tokens",
    "do_sample",
    "confidence_threshold",
    "mask_threshold",
    "strict_format",
    "top_concepts",
    "top_tokens",
)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask -> COCO uncompressed RLE ``{"size": [H, W], "counts": [...]}``.

    Runs are counted in column-major order and start with a (possibly empty) background run.

    >>> mask_to_rle(np.array([[0, 1], [1, 1]], dtype=bool))
    {'size': [2, 2], 'counts': [1, 3]}
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"Expected a (H, W) mask, got shape {tuple(mask.shape)}.")
    flat = mask.astype(bool).flatten(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of `mask_to_rle`: COCO uncompressed RLE -> (H, W) bool mask."""
    height, width = (int(v) for v in rle["size"])
    counts = [int(c) for c in rle["counts"]]
    if sum(counts) != height * width:
        raise ValueError(
            f"RLE counts sum to {sum(counts)}, expected H*W = {height * width} for size "
            f"{[height, width]}."
        )
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def decode_image(image: Any) -> Any:
    """A request image (PIL, numpy, raw bytes, base64 string or data URL) -> PIL / numpy."""
    if isinstance(image, np.ndarray) or (Image is not None and isinstance(image, Image.Image)):
        return image
    if isinstance(image, str):
        text = image.split(",", 1)[1] if image.startswith("data:") else image
        try:
            image = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(
                "Expected inputs.image to be a base64-encoded PNG/JPEG (or a data: URL), but "
                f"it is not valid base64: {err}."
            ) from err
    if isinstance(image, (bytes, bytearray)):
        if Image is None:
            raise ValueError("Decoding image bytes needs Pillow; install it on the endpoint.")
        try:
            decoded = Image.open(io.BytesIO(image))
            decoded.load()
        except Exception as err:  # PIL raises several types for bad data
            raise ValueError(
                f"Could not decode the image bytes ({err}); send a PNG or JPEG."
            ) from err
        return decoded
    raise ValueError(
        "Expected inputs.image to be a base64 string, bytes, a PIL image or a numpy array, got "
        f"{type(image).__name__}."
    )


class EndpointHandler:
    """Inference Endpoints entry point: ``EndpointHandler(path)(payload) -> dict``.

    Args:
        path: the model folder (the endpoint passes the repository checkout).
        pipe: an already built pipeline (tests, or custom device settings); default:
            ``pipeline(model=path, trust_remote_code=True)``.
    """

    def __init__(self, path: str = "", pipe: Any = None) -> None:
        self.pipe = (
            pipe if pipe is not None else pipeline(model=path or ".", trust_remote_code=True)
        )

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValueError(f"Expected a JSON object payload, got {type(data).__name__}.")
        inputs = data.get("inputs", data)
        parameters = dict(data.get("parameters") or {})
        instruction = parameters.pop("instruction", None)
        if isinstance(inputs, dict):
            image = inputs.get("image")
            instruction = inputs.get("instruction", instruction)
        else:
            image = inputs
        if image is None:
            raise ValueError('Expected an image in inputs.image (or "inputs" itself), got none.')
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(
                "Expected a non-empty instruction in inputs.instruction (or parameters.instruction)."
            )
        unknown = sorted(set(parameters) - set(ALLOWED_PARAMETERS))
        if unknown:
            raise ValueError(
                f"Unknown parameters {unknown}; allowed are {list(ALLOWED_PARAMETERS)} and "
                "'instruction'."
            )
        out = self.pipe(decode_image(image), instruction, **parameters)
        return {
            "text": out["text"],
            "reason": out["reason"],
            "scores": [float(s) for s in out["scores"]],
            "slot_indices": [int(i) for i in out["slot_indices"]],
            "masks": [mask_to_rle(m) for m in out["masks"]],
            "concept_trace": out["concept_trace"],
        }


__all__ = ["ALLOWED_PARAMETERS", "EndpointHandler", "decode_image", "mask_to_rle", "rle_to_mask"]
