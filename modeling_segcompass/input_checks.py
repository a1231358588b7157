"""What `SegCompassForReasoningSegmentation.forward` refuses, with a message naming the fix.

Two kinds of checks:

* `check_forward_inputs`: types, shapes and dtypes. They read tensor metadata only and run on
  every call.
* `check_forward_values`: token ids in the vocabulary, finite pixels, binary masks, object
  counts within the slots. They read tensor values, which on an accelerator waits for the
  device, so the forward runs them for CPU tensors (no wait there) and elsewhere only with
  ``config.check_input_values=True``. The processor writes inputs that pass them.

The outputs are checked the same way: `check_forward_outputs` in the forward under the same
rule, and `check_segment_results` on `segment`'s CPU results always. Non-finite outputs mean
broken weights, and the error names the parameters that hold NaN or Inf.

This file travels with saved models (remote code): it imports only torch.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import torch


def position_limit(model: Any) -> int | None:
    """The VLM's ``max_position_embeddings`` (of its text model), None when it names none."""
    config = getattr(getattr(model, "vlm", None), "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def all_finite(value: torch.Tensor) -> bool:
    """Whether every element is finite, from the two extremes: NaN propagates through min and
    max and an infinity is one of them (one pass, no element-wise bool tensor: ~10x faster
    than ``torch.isfinite(value).all()`` on a CPU)."""
    if value.numel() == 0:
        return True
    low, high = torch.aminmax(value.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _fail(message: str) -> NoReturn:
    raise ValueError(f"SegCompassForReasoningSegmentation.forward: {message}")


def check_forward_inputs(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    sam_pixel_values: Any = None,
    image_embeddings: Any = None,
    gt_masks: Any = None,
    num_objects: Any = None,
    valid_mask: Any = None,
) -> None:
    """Refuse inputs whose type, shape or dtype the forward cannot use (no value is read)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        _fail(
            "`input_ids` must be a (B, L) LongTensor (use SegCompassProcessor); got "
            f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}."
        )
    tensors = {
        "attention_mask": attention_mask,
        "sam_pixel_values": sam_pixel_values,
        "image_embeddings": image_embeddings,
        "gt_masks": gt_masks,
        "num_objects": num_objects,
        "valid_mask": valid_mask,
    }
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            _fail(
                f"`{name}` must be a torch.Tensor (use SegCompassProcessor with "
                f"return_tensors='pt'); got {type(value).__name__}."
            )
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        _fail(f"`input_ids` is empty (shape {tuple(input_ids.shape)}); pass at least one token.")
    limit = position_limit(model)
    if limit is not None and length > limit:
        _fail(
            f"`input_ids` has {length} positions but the VLM has max_position_embeddings={limit}; "
            "shorten the instruction or response, use a smaller image, or a VLM with more "
            "positions."
        )
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        _fail(f"`input_ids` must hold integer token ids; got dtype {input_ids.dtype}.")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        _fail(
            f"`attention_mask` must be (B, L) = {(batch, length)}; got "
            f"{tuple(attention_mask.shape)}."
        )
    if sam_pixel_values is None and image_embeddings is None:
        _fail(
            "pass either `sam_pixel_values` (B, 3, S, S) from SegCompassProcessor, or "
            "precomputed `image_embeddings` (B, C, E, E)."
        )
    config = model.config
    channels, side = config.image_embedding_channels, config.image_embedding_size
    if image_embeddings is not None and (
        image_embeddings.dim() != 4 or tuple(image_embeddings.shape[1:]) != (channels, side, side)
        or image_embeddings.shape[0] != batch
    ):  # fmt: skip
        _fail(
            f"`image_embeddings` must be (B={batch}, C={channels}, E={side}, E={side}); got "
            f"{tuple(image_embeddings.shape)}."
        )
    if sam_pixel_values is not None and image_embeddings is None:
        if (
            sam_pixel_values.dim() != 4
            or sam_pixel_values.shape[0] != batch
            or sam_pixel_values.shape[1] != 3
        ):
            _fail(
                f"`sam_pixel_values` must be (B={batch}, 3, S, S); got "
                f"{tuple(sam_pixel_values.shape)}."
            )
        if model.image_encoder is not None:
            frame = config.sam_config.vision_config.image_size
            if tuple(sam_pixel_values.shape[-2:]) != (frame, frame):
                _fail(
                    f"`sam_pixel_values` must be (B, 3, {frame}, {frame}) (the SAM frame of "
                    f"this model); got {tuple(sam_pixel_values.shape)}. Use the processor "
                    "saved with this model."
                )
    size = config.mask_size
    if gt_masks is not None:
        if (
            gt_masks.dim() != 4
            or gt_masks.shape[0] != batch
            or tuple(gt_masks.shape[2:])
            != (
                size,
                size,
            )
        ):
            _fail(
                f"`gt_masks` must be (B={batch}, G, {size}, {size}) on the mask grid "
                f"(SegCompassProcessor resizes masks for you); got {tuple(gt_masks.shape)}."
            )
        if gt_masks.is_complex():
            _fail(f"`gt_masks` must be real 0/1 masks; got dtype {gt_masks.dtype}.")
    if num_objects is not None:
        if num_objects.is_floating_point() or num_objects.dtype == torch.bool:
            _fail(f"`num_objects` must be an integer tensor (B,); got dtype {num_objects.dtype}.")
        if num_objects.shape != (batch,):
            _fail(f"`num_objects` must be (B={batch},); got {tuple(num_objects.shape)}.")
    if valid_mask is not None and tuple(valid_mask.shape) != (batch, size, size):
        _fail(f"`valid_mask` must be (B={batch}, {size}, {size}); got {tuple(valid_mask.shape)}.")


def check_forward_values(
    model: Any,
    input_ids: torch.Tensor,
    sam_pixel_values: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    gt_masks: torch.Tensor | None = None,
    num_objects: torch.Tensor | None = None,
    pixel_values: Any = None,
) -> None:
    """Refuse out-of-vocabulary ids, non-finite pixels, non-binary masks and object counts
    beyond the slots (reads values: call after `check_forward_inputs`). `pixel_values` are
    the VLM's image inputs, of whatever type its processor gives; only float tensors are read."""
    vocab = model.get_input_embeddings().num_embeddings
    low, high = (int(v) for v in torch.aminmax(input_ids))
    if low < 0 or high >= vocab:
        _fail(
            f"`input_ids` must lie in [0, vocab_size={vocab}); got values in [{low}, {high}]. "
            "Use the processor saved with this model, or resize the token embeddings."
        )
    for name, value in (
        ("sam_pixel_values", sam_pixel_values),
        ("image_embeddings", image_embeddings),
    ):
        if value is not None and value.is_floating_point() and not all_finite(value):
            _fail(f"`{name}` contains NaN or Inf values; expected finite numbers.")
    if (
        isinstance(pixel_values, torch.Tensor)
        and pixel_values.is_floating_point()
        and not all_finite(pixel_values)
    ):
        _fail(
            "`pixel_values` contains NaN or Inf values; expected finite numbers "
            "(SegCompassProcessor refuses such images)."
        )
    if gt_masks is not None and gt_masks.numel():
        low_m, high_m = (float(v) for v in torch.aminmax(gt_masks))
        if gt_masks.is_floating_point() and not (math.isfinite(low_m) and math.isfinite(high_m)):
            _fail("`gt_masks` contains NaN or Inf values.")
        if low_m < 0.0 or high_m > 1.0:
            _fail(
                f"`gt_masks` must hold values in [0, 1] (binary masks); got values in "
                f"[{low_m:g}, {high_m:g}]. Binarise them first, e.g. `masks == 1`."
            )
    if num_objects is not None and num_objects.numel():
        slots = model.config.num_slots
        low_n, high_n = (int(v) for v in torch.aminmax(num_objects))
        if high_n > slots or low_n < 0:
            _fail(
                f"`num_objects` must lie in [0, num_slots={slots}]; got {num_objects.tolist()}. "
                "Drop samples with more objects than slots or raise config.num_slots."
            )
        if gt_masks is not None and high_n > gt_masks.shape[1]:
            _fail(
                f"`num_objects` ({num_objects.tolist()}) exceeds the number of ground-truth "
                f"masks G={gt_masks.shape[1]}."
            )


def non_finite_output_error(model: Any, what: str) -> ValueError:
    """The error for non-finite model outputs, naming the parameters that hold NaN or Inf.

    Reads every parameter, which is fine on this path: it only runs once something is wrong.
    """
    bad = [
        name
        for name, tensor in model.named_parameters()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        cause = (
            f"{len(bad)} of the model's parameters hold NaN or Inf ({shown}): the checkpoint is "
            "corrupted (garbled tensor bytes or NaN weights) or training diverged. Download or "
            "save the checkpoint again, or load an earlier one."
        )
    else:
        cause = (
            "the parameters are finite, so the inputs or an overflow in "
            f"{getattr(model, 'dtype', 'this precision')} produced them (try float32)."
        )
    return ValueError(
        f"SegCompassForReasoningSegmentation: the model's {what} contain NaN or Inf, so every "
        f"slot would look empty; {cause} Check the weights with "
        "`any(not torch.isfinite(p).all() for p in model.parameters())`."
    )


def check_forward_outputs(
    model: Any, mapped: Any, mask_logits: torch.Tensor, iou_scores: torch.Tensor
) -> None:
    """Refuse non-finite heatmaps, confidences, mask logits or IoU scores (reads values: the
    forward calls it when `values_are_checked`). `mapped` is the `SlotMapperOutput`."""
    for what, name, value in (
        ("heatmaps", "heatmap_logits", mapped.heatmap_logits),
        ("slot confidences", "conf_logits", mapped.conf_logits),
        ("mask logits", "mask_logits", mask_logits),
        ("IoU scores", "iou_scores", iou_scores),
    ):
        if not all_finite(value):
            raise non_finite_output_error(model, f"{what} (`{name}`)")


def check_segment_results(model: Any, results: Any) -> None:
    """Refuse `segment` results whose slot confidences or heatmaps are not finite.

    The results are CPU tensors already, so this waits for no device: it is the check that
    runs on accelerators, where the forward reads no values by default. A NaN confidence
    fails every threshold, which would read as "there is no such object".
    """
    for result in results:
        if not bool(torch.isfinite(result.conf_logits).all()):
            raise non_finite_output_error(model, "slot confidences")
        # sigmoid heatmaps lie in [0, 1]: their float32 sum is finite exactly when all are
        if not bool(torch.isfinite(result.heatmaps.float().sum())):
            raise non_finite_output_error(model, "heatmaps")


def values_are_checked(model: Any, input_ids: torch.Tensor) -> bool:
    """Whether the forward reads input values: for CPU tensors, or when the config asks."""
    return input_ids.device.type == "cpu" or bool(
        getattr(model.config, "check_input_values", False)
    )


__all__ = [
    "all_finite",
    "check_forward_inputs",
    "check_forward_outputs",
    "check_forward_values",
    "check_segment_results",
    "non_finite_output_error",
    "values_are_checked",
]
