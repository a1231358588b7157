"""SegCompassCollator: a list of examples -> one training batch for `transformers.Trainer`.

Library side. Examples follow the synthetic world's schema (`data.synthetic.generate_example`)
and the Hugging Face dataset rows built from it: ``image``, ``instruction``, ``response``,
``masks`` ((N, H, W) uint8 in {0, 1}, N = 0 for no-target) and ``num_objects``. Extra keys
(``family``, ``objects``, ...) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..processing_segcompass import SegCompassProcessor, to_rgb_uint8

logger = logging.getLogger(__name__)

#: Keys every example must have.
REQUIRED_KEYS: tuple[str, ...] = ("image", "instruction", "response", "masks", "num_objects")


class SegCompassCollator:
    """Collate examples with `SegCompassProcessor` (prompt + response, masks on the M grid).

    Args:
        processor: the `SegCompassProcessor` of the model.
        num_slots: K written into the prompt; defaults to ``processor.num_slots``.

    Calling it on a list of examples returns a dict of tensors: ``input_ids``,
    ``attention_mask``, ``labels`` (B, L) (right padded; -100 on prompt and padding),
    ``pixel_values``, ``image_grid_thw``, ``sam_pixel_values`` (B, 3, S, S),
    ``gt_masks`` (B, G, M, M), ``num_objects`` (B,) and ``valid_mask`` (B, M, M); exactly the
    processor's output for these images, instructions, responses and masks, minus the
    size bookkeeping (``original_sizes``, ``reshaped_input_sizes``) the model does not take.
    """

    #: Processor outputs that are not model inputs during training.
    DROPPED_KEYS: tuple[str, ...] = ("original_sizes", "reshaped_input_sizes")

    def __init__(self, processor: SegCompassProcessor, num_slots: int | None = None):
        # Duck-typed: a processor loaded with trust_remote_code is another class object.
        if not callable(processor) or not hasattr(processor, "prepare_masks"):
            raise TypeError(
                f"Expected a SegCompassProcessor, got {type(processor).__name__}. Build one with "
                "SegCompassProcessor.tiny(tokenizer) or AutoProcessor.from_pretrained(path)."
            )
        if num_slots is not None and (not isinstance(num_slots, int) or num_slots < 1):
            raise ValueError(f"Expected num_slots to be an int >= 1 or None, got {num_slots!r}.")
        self.processor = processor
        self.num_slots = num_slots

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence):
            raise TypeError(
                f"Expected a list of examples (dicts), got {type(examples).__name__}. "
                "Call the collator on a batch: collator([example, ...])."
            )
        if len(examples) == 0:
            raise ValueError("Expected at least one example, got an empty list.")
        images, instructions, responses, masks = [], [], [], []
        for i, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise TypeError(
                    f"Expected examples[{i}] to be a dict, got {type(example).__name__}."
                )
            missing = [k for k in REQUIRED_KEYS if k not in example]
            if missing:
                raise KeyError(
                    f"examples[{i}] lacks the key(s) {missing}; every example needs "
                    f"{list(REQUIRED_KEYS)} (the synthetic world's schema). Found keys: "
                    f"{sorted(example)}."
                )
            image = example["image"]
            images.append(image)
            instructions.append(example["instruction"])
            responses.append(example["response"])
            masks.append(self._masks_of(example, i, image))

        batch = self.processor(
            images,
            instructions,
            responses=responses,
            masks=masks,
            return_tensors="pt",
            num_slots=self.num_slots,
        )
        return {k: v for k, v in batch.items() if k not in self.DROPPED_KEYS}

    @staticmethod
    def _masks_of(example: Mapping[str, Any], index: int, image: Any) -> np.ndarray:
        """The example's masks as an (N, H, W) array, checked against ``num_objects``."""
        masks = example["masks"]
        if isinstance(masks, torch.Tensor):
            masks = masks.detach().cpu().numpy()
        elif not isinstance(masks, np.ndarray):
            masks = np.asarray(masks)  # e.g. nested lists from a datasets row
        if masks.size == 0:
            # An empty list loses its (H, W); rebuild it from the image (no-target example).
            height, width = to_rgb_uint8(image, f"examples[{index}]['image']").shape[:2]
            masks = np.zeros((0, height, width), dtype=np.uint8)
        if masks.ndim == 2:
            masks = masks[None]  # (H, W) -> (1, H, W)
        num_objects = example["num_objects"]
        if int(num_objects) != masks.shape[0]:
            raise ValueError(
                f"examples[{index}] has num_objects={num_objects} but {masks.shape[0]} mask(s); "
                "they must agree (num_objects = N of the (N, H, W) masks)."
            )
        return masks
