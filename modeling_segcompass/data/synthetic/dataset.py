"""The world as a `datasets.Dataset` (features, building) and reading mask rows back."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import SyntheticWorldConfig
from .examples import generate_examples


def dataset_features(config: SyntheticWorldConfig):
    """The `datasets.Features` of `build_dataset` (images as `datasets.Image()`, masks as a
    (N, H, W) uint8 array with variable N)."""
    from datasets import Array3D, Features, List, Value
    from datasets import Image as ImageFeature

    string = Value("string")
    return Features(
        {
            "index": Value("int64"),
            "image": ImageFeature(),
            "instruction": string,
            "family": string,
            "cot": string,
            "response": string,
            "masks": Array3D(shape=(None, config.image_size, config.image_size), dtype="uint8"),
            "num_objects": Value("int32"),
            "objects": List(
                {
                    "kind": string,
                    "colour": string,
                    "size": string,
                    "bbox": List(Value("int32"), length=4),
                    "center": List(Value("float64"), length=2),
                    "area": Value("int32"),
                }
            ),
            "target_indices": List(Value("int32")),
            "query": {
                "family": string,
                "colour": string,
                "kind": string,
                "size": string,
                "negated": Value("bool"),
                "relation": string,
                "anchor_colour": string,
                "anchor_kind": string,
                "anchor_index": Value("int32"),
                "superlative": string,
                "function_word": string,
            },
        }
    )


def build_dataset(config: SyntheticWorldConfig, n: int, *, start: int = 0):
    """A `datasets.Dataset` of examples `start .. start + n - 1`.

    Save with `dataset.save_to_disk(path)` and reload with `datasets.load_from_disk(path)`.
    Rows read back give `masks` as nested lists and `dataset.with_format("numpy")` as
    (N, H, W) arrays (int64 when N = 0); `as_mask_array` turns either into uint8 (N, H, W).
    """
    from datasets import Dataset

    return Dataset.from_list(
        generate_examples(config, n, start=start), features=dataset_features(config)
    )


def as_mask_array(masks: Any, image_size: int) -> np.ndarray:
    """Masks of a row as a (N, H, W) uint8 array, whatever the row format gave.

    `datasets` returns nested lists (python format) or an int64 (0, H, W) array for rows
    without targets (numpy format); this normalises both.
    """
    array = np.asarray(masks)
    if array.size == 0:
        return np.zeros((0, image_size, image_size), dtype=np.uint8)
    if array.ndim != 3 or array.shape[1:] != (image_size, image_size):
        raise ValueError(
            f"Expected masks of shape (N, {image_size}, {image_size}), got {array.shape}; "
            "pass the image_size of the world that produced the row."
        )
    return array.astype(np.uint8, copy=False)
