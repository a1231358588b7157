"""The data side of SegCompass GRPO: dataset rows and the mask targets of a rollout.

`grpo_row` / `build_grpo_dataset` turn examples (image, instruction, masks) into the rows
`SegCompassGRPOTrainer` trains on: a conversational prompt, the image and the ground truth
on the processor's mask grid. `SegmentationTargets` is what the mask loss needs for a batch
of completions, and `segmentation_targets` stacks it from the scored rows of a rollout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..processing_segcompass import build_prompt, to_rgb_uint8

__all__ = [
    "SegmentationTargets",
    "build_grpo_dataset",
    "grpo_row",
    "segmentation_targets",
    "with_array_masks",
]


def grpo_row(
    example: Mapping[str, Any], processor: Any, *, num_slots: int | None = None
) -> dict[str, Any]:
    """One example (synthetic-world / collator schema) -> one GRPO dataset row.

    Args:
        example: needs ``image``, ``instruction`` and ``masks`` ((N, H, W) at the image size,
            N = 0 for no-target); ``num_objects`` is checked against N when present, and may be
            -1 to ask for the single-object reward.
        processor: the model's `SegCompassProcessor` (its mask grid M and SAM geometry).
        num_slots: K written into the prompt (default ``processor.num_slots``).

    Returns:
        ``prompt``: a conversational prompt (one user turn: an image placeholder and
        `build_prompt(instruction, K)`), which TRL renders with the processor's chat template
        exactly as `SegCompassProcessor` does; ``image``; ``gt_masks``: (G, M, M) uint8 on the
        mask grid (G = max(K, N), zero padded), put through the same resize/pad as the SAM
        frame; ``num_objects``; ``num_ref`` = K (the format reward's required `<REF_POS>` count).
    """
    k = processor.num_slots if num_slots is None else int(num_slots)
    for key in ("image", "instruction", "masks"):
        if key not in example:
            raise KeyError(
                f"grpo_row: the example lacks {key!r}; it needs 'image', 'instruction' and "
                f"'masks' (N, H, W). Found keys: {sorted(example)}."
            )
    rgb = to_rgb_uint8(example["image"], "example['image']")
    masks = example["masks"]
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.size == 0:
        masks = np.zeros((0, *rgb.shape[:2]), dtype=np.uint8)
    grid = processor.prepare_masks(masks.astype(np.uint8), rgb.shape[:2])  # (N, M, M)
    count = int(grid.shape[0])
    num_objects = int(example.get("num_objects", count))
    if num_objects not in (count, -1):
        raise ValueError(
            f"grpo_row: num_objects={num_objects} but the example has {count} mask(s); they must "
            "agree (or num_objects=-1 for the single-object reward)."
        )
    if num_objects == -1 and count < 1:
        raise ValueError("grpo_row: num_objects=-1 (single object) needs one mask; got none.")
    size = processor.mask_size
    gt = np.zeros((max(k, count), size, size), dtype=np.uint8)  # (G, M, M)
    gt[:count] = grid.numpy().astype(np.uint8)
    prompt = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": build_prompt(example["instruction"], k)},
            ],
        }
    ]
    return {
        "prompt": prompt,
        "image": example["image"],
        "gt_masks": gt,
        "num_objects": num_objects,
        "num_ref": k,
    }


def build_grpo_dataset(
    examples: Sequence[Mapping[str, Any]], processor: Any, *, num_slots: int | None = None
):
    """A `datasets.Dataset` of `grpo_row`s (the form `SegCompassGRPOTrainer` trains on)."""
    from datasets import Dataset

    rows = [grpo_row(ex, processor, num_slots=num_slots) for ex in examples]
    return with_array_masks(Dataset.from_list(rows))


def with_array_masks(dataset: Any) -> Any:
    """`dataset` with its ``gt_masks`` column read as numpy arrays (other columns unchanged).

    Arrow hands an unformatted column back as nested Python lists: (G, M, M) masks are G*M*M
    Python ints per row, which every later step walks element by element (accelerate's
    `send_to_device` on each batch, `np.asarray` in the trainer). A `datasets.Dataset` that
    has a ``gt_masks`` column and no format gets this one; anything else is returned as is.
    """
    fmt = getattr(dataset, "format", None)  # an IterableDataset has none
    if "gt_masks" not in (getattr(dataset, "column_names", None) or ()) or not isinstance(
        fmt, dict
    ):
        return dataset
    if fmt.get("type") is not None:
        return dataset  # the caller chose a format
    return dataset.with_format("numpy", columns=["gt_masks"], output_all_columns=True)


@dataclass
class SegmentationTargets:
    """What the mask loss needs for a batch of completions (one row per completion).

    Attributes:
        sam_pixel_values: (B, 3, S, S) SAM frames.
        gt_masks: (B, G, M, M) ground truth on the mask grid, zero padded along G.
        num_objects: (B,) real masks per row (single-object rows count 1).
        valid_mask: (B, M, M) bool, True on the unpadded image area.
    """

    sam_pixel_values: torch.Tensor
    gt_masks: torch.Tensor
    num_objects: torch.Tensor
    valid_mask: torch.Tensor | None


def segmentation_targets(
    fields: Mapping[str, Any], device: torch.device | str
) -> SegmentationTargets:
    """Stack the mask targets of a rollout's scored rows into batch tensors on `device`.

    Args:
        fields: the processor output of the rollout's prompts (``sam_pixel_values``, optional
            ``valid_mask``) and ``examples``, the scored rows (dataset columns ``gt_masks``
            (G, M, M) and ``num_objects``), one per completion.
        device: where the tensors go.
    """
    examples = fields["examples"]
    missing = [i for i, ex in enumerate(examples) if ex.get("gt_masks") is None]
    if missing:
        raise ValueError(
            f"SegCompassGRPOTrainer: rows {missing} have no `gt_masks`; the mask loss needs a "
            "(G, M, M) ground truth per row. Build rows with `grpo_row(example, processor)`."
        )
    grids = [ex["gt_masks"] for ex in examples]
    size = fields["valid_mask"].shape[-1] if "valid_mask" in fields else grids[0].shape[-1]
    depth = max(g.shape[0] if g.ndim == 3 else 1 for g in grids)
    gt = torch.zeros(len(grids), depth, size, size)  # (B, G, M, M)
    for i, g in enumerate(grids):
        g = g.unsqueeze(0) if g.ndim == 2 else g
        if tuple(g.shape[-2:]) != (size, size):
            raise ValueError(
                f"SegCompassGRPOTrainer: gt_masks of row {i} are {tuple(g.shape)}, expected "
                f"(G, {size}, {size}) on the mask grid; build rows with `grpo_row`."
            )
        gt[i, : g.shape[0]] = g
    counts = []
    for i, ex in enumerate(examples):
        n = ex.get("num_objects")
        n = int((gt[i].flatten(1) > 0.5).any(-1).sum()) if n is None else int(n)
        counts.append(1 if n == -1 else n)  # single-object rows have one target
    valid = fields.get("valid_mask")
    return SegmentationTargets(
        sam_pixel_values=fields["sam_pixel_values"].to(device),
        gt_masks=gt.to(device),
        num_objects=torch.tensor(counts, dtype=torch.long, device=device),
        valid_mask=None if valid is None else valid.to(device),
    )
