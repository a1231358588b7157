"""The SAM frame: images and masks into SAM's S x S padded frame and masks back out.

SAM's recipe (resize the longest side to S, normalise, zero-pad bottom/right to S x S) done in
torch, so that torchvision is not needed; ground-truth masks take the same geometry down to
the mask grid M; `post_process_masks` inverts it for predicted mask logits. Images of any
form (PIL of any mode, numpy, tensors) become (H, W, 3) uint8 first (`to_rgb_uint8`); a PIL
image's EXIF orientation is applied there, once for every entry point (`upright`).

Remote-code file: imports only the standard library, numpy and torch (PIL inside ``try``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional: only needed to accept PIL images
    from PIL import Image as PILImage
    from PIL import ImageOps
except ImportError:  # pragma: no cover - PIL ships with almost every transformers install
    PILImage = ImageOps = None

#: SAM's normalisation constants, on the 0-255 scale (segment-anything's `Sam.pixel_mean/std`).
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

#: Above this many pixels, SAM preprocessing resizes in bands (bounded memory).
_LARGE_IMAGE_PIXELS = 1 << 22


def _alpha_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite uint8 RGB over white with a uint8 alpha, exactly (full alpha leaves rgb as is).

    White matches transformers' `convert_to_rgb`; integer arithmetic keeps alpha 255 exact.
    """
    a = alpha.astype(np.int32)[..., None]
    out = (rgb.astype(np.int32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _array_to_rgb_uint8(array: np.ndarray, name: str, channels_first: bool) -> np.ndarray:
    """Convert an HW / HWC (or CHW when ``channels_first``) array to (H, W, 3) uint8."""
    if array.ndim == 3 and channels_first:
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 2:
        array = array[..., None]  # (H, W) -> (H, W, 1)
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"Expected {name} to be an image of shape (H, W), (H, W, C) or (C, H, W) with "
            f"C in 1..4, got shape {tuple(array.shape)}."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"Expected {name} to have a non-zero size, got shape {tuple(array.shape)}."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(
                f"{name} contains NaN or Inf pixels; expected finite values in [0, 1]."
            )
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Expected a float {name} with values in [0, 1], got values in [{low:g}, {high:g}]. "
                "Divide 0-255 data by 255 or pass it as uint8."
            )
        array = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype == np.uint8:
        pass
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:
        # 16-bit data, read from its type and never from its values: 65535 -> 255, and a
        # pixel keeps its 8-bit value whatever the other pixels hold. (x + 128) // 257 is
        # round(x / 257) (no tie: 257 is odd), in integers.
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Expected {name} of dtype {array.dtype} to hold 8-bit values in [0, 255], got "
                f"[{low}, {high}]. Only uint16 (numpy or torch) and PIL's integer modes "
                "(I;16, I) are read as 16-bit; cast 16-bit data to uint16."
            )
        array = array.astype(np.uint8)
    else:
        raise TypeError(
            f"Expected {name} to have an integer, bool or float dtype, got {array.dtype}."
        )
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 2:  # grey + alpha
        return _alpha_over_white(np.repeat(array[..., :1], 3, axis=-1), array[..., 1])
    if channels == 4:
        return _alpha_over_white(array[..., :3], array[..., 3])
    return np.ascontiguousarray(array)


#: The EXIF tag that says how a camera held the picture (1 = upright).
_EXIF_ORIENTATION = 0x0112


def upright(image: Any) -> Any:
    """A PIL image turned as a viewer shows it: its EXIF orientation applied (a copy), or the
    image itself when it has none.

    Phones store the sensor's pixels and an orientation tag; every viewer (and transformers'
    `load_image`, and OpenCV's `imread`) applies the tag, so the pixels a person sees and
    draws masks on are the upright ones. The tag is dropped from the copy, so applying this
    twice turns the image once.
    """
    if image.getexif().get(_EXIF_ORIENTATION, 1) in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _pil_to_rgb_uint8(image: Any, name: str) -> np.ndarray:
    """Convert a PIL image of any mode to (H, W, 3) uint8, upright (EXIF orientation applied)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(
            f"Expected {name} to have a non-zero size, got {image.width}x{image.height}."
        )
    image = upright(image)
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return _alpha_over_white(rgba[..., :3], rgba[..., 3])
    if mode.startswith("I"):
        # Integer grey (I;16, I;16B, I;16L, I): 16-bit data, by the mode. Pillow's decoders
        # give 16-bit grey files these modes (older Pillow opens a 16-bit PNG as I); an 8-bit
        # grey image is mode L.
        array = np.asarray(image)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"Expected {name} of PIL mode {mode} to hold 16-bit values in [0, 65535], got "
                f"[{low}, {high}]. Give 8-bit grey as mode L, or scale the values."
            )
        return _array_to_rgb_uint8(array.astype(np.uint16), name, channels_first=False)
    if mode == "F":  # float grey: values in [0, 1], like a float numpy array
        return _array_to_rgb_uint8(np.asarray(image), name, channels_first=False)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def to_rgb_uint8(image: Any, name: str = "image") -> np.ndarray:
    """Convert one image to a (H, W, 3) uint8 RGB array, or refuse it clearly.

    Accepted: PIL images of any mode (transparency composited over white; an EXIF
    orientation tag is applied, so the pixels are those a viewer shows), numpy arrays
    HW / HWC (uint8, bool, float in [0, 1], uint16 read as 16-bit whatever its values, other
    integer types as 8-bit values in [0, 255]) and torch tensors CHW / HWC
    (a 3-D tensor is read as CHW when its first dimension is 1..4, else as HWC).
    """
    if PILImage is not None and isinstance(image, PILImage.Image):
        return _pil_to_rgb_uint8(image, name)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_complex():
            raise TypeError(f"Expected a real-valued {name}, got a complex tensor.")
        if tensor.dtype == torch.bfloat16 or tensor.dtype == torch.float16:
            tensor = tensor.float()
        channels_first = tensor.ndim == 3 and tensor.shape[0] in (1, 2, 3, 4)
        return _array_to_rgb_uint8(tensor.numpy(), name, channels_first=channels_first)
    if isinstance(image, np.ndarray):
        if image.dtype == object or image.dtype.kind in "USVc":
            raise TypeError(
                f"Expected {name} to hold numbers, got a numpy array of dtype {image.dtype}."
            )
        if image.dtype == np.float16:
            image = image.astype(np.float32)
        return _array_to_rgb_uint8(image, name, channels_first=False)
    raise TypeError(
        f"Expected {name} to be a PIL.Image, a numpy array or a torch tensor, got "
        f"{type(image).__name__}."
    )


def resized_longest_side(height: int, width: int, target: int) -> tuple[int, int]:
    """Size after SAM's ResizeLongestSide: the longest side becomes ``target`` (rounded)."""
    scale = target / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


@dataclass
class SamImage:
    """One image prepared for SAM.

    Attributes:
        pixel_values: (3, S, S) float, normalised with SAM mean/std, zero outside the
            resized image (padding at the bottom and right).
        reshaped_size: (h, w) of the resized image inside the S x S frame.
    """

    pixel_values: torch.Tensor
    reshaped_size: tuple[int, int]


def prepare_sam_image(
    rgb: np.ndarray,
    size: int,
    pixel_mean: tuple[float, ...] | list[float] = SAM_PIXEL_MEAN,
    pixel_std: tuple[float, ...] | list[float] = SAM_PIXEL_STD,
) -> SamImage:
    """SAM preprocessing of one (H, W, 3) uint8 image, without torchvision.

    Resize the longest side to S (bilinear, antialiased when shrinking), normalise with
    SAM's mean/std, then zero-pad bottom/right to S x S (segment-anything pads after
    normalising, so the padding is 0 in normalised units).
    """
    height, width = rgb.shape[:2]
    new_h, new_w = resized_longest_side(height, width, size)
    if height * width > _LARGE_IMAGE_PIXELS and new_w < width:
        # Huge images: shrink the width in bands of rows first (a width-only resize treats
        # rows independently), so no float copy of the full image is ever made.
        step = max(1, _LARGE_IMAGE_PIXELS // width)
        bands = [
            _resize(
                torch.from_numpy(np.array(rgb[top : top + step])).permute(2, 0, 1)[None].float(),
                (min(step, height - top), new_w),
            )  # (1, 3, rows, w)
            for top in range(0, height, step)
        ]
        x = torch.cat(bands, dim=2)  # (1, 3, H, w)
    else:
        # a copy when the array is read-only (torch warns on non-writable memory)
        pixels = rgb if rgb.flags.writeable else rgb.copy()
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W)
    x = _resize(x, (new_h, new_w)).clamp_(0.0, 255.0)
    mean = torch.tensor(pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(pixel_std).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.pad(x, (0, size - new_w, 0, size - new_h))  # (1, 3, S, S)
    return SamImage(pixel_values=x[0], reshaped_size=(new_h, new_w))


def valid_mask(reshaped_size: tuple[int, int], mask_size: int, frame: int) -> torch.Tensor:
    """(M, M) bool: True on mask-grid cells that overlap the unpadded (resized) image.

    A cell of the M grid covers S/M SAM pixels; it is valid when any of them is image,
    i.e. for rows < ceil(h * M / S) and columns < ceil(w * M / S).
    """
    m, s = mask_size, frame
    rows = min(m, math.ceil(reshaped_size[0] * m / s))
    cols = min(m, math.ceil(reshaped_size[1] * m / s))
    valid = torch.zeros(m, m, dtype=torch.bool)
    valid[:rows, :cols] = True
    return valid


def prepare_masks(
    masks: Any, image_size: tuple[int, int], mask_size: int, frame: int, name: str = "masks"
) -> torch.Tensor:
    """Ground-truth masks (N, H, W) at the image size -> (N, M, M) float in {0, 1}.

    Same geometry as the SAM image: resize the longest side to S, zero-pad bottom/right
    to S x S, then resize to the M grid (area-averaging, as the reference's bilinear
    ``mask_float_256``) and binarise at 0.5.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if not isinstance(masks, np.ndarray):
        raise TypeError(
            f"Expected {name} to be a numpy array or torch tensor of shape (N, H, W), got "
            f"{type(masks).__name__}."
        )
    if masks.ndim == 2:
        masks = masks[None]  # (H, W) -> (1, H, W)
    if masks.ndim != 3:
        raise ValueError(f"Expected {name} of shape (N, H, W), got shape {tuple(masks.shape)}.")
    if tuple(masks.shape[1:]) != tuple(image_size):
        raise ValueError(
            f"Expected {name} to have the image's size (H, W)={tuple(image_size)}, got "
            f"{tuple(masks.shape[1:])}. Give masks at the original image size."
        )
    if masks.dtype != np.bool_ and not np.issubdtype(masks.dtype, np.integer):
        raise TypeError(
            f"Expected {name} to have a bool or integer dtype (0/1 values), got {masks.dtype}. "
            "Binarise float masks first, e.g. `masks > 0.5`."
        )
    if masks.dtype != np.bool_ and masks.size and (masks.min() < 0 or masks.max() > 1):
        raise ValueError(
            f"Expected {name} values in {{0, 1}}, got values in [{masks.min()}, {masks.max()}]. "
            "Binarise first, e.g. `mask == 1` (ReasonSeg's 255 means 'ignore')."
        )
    m, s = mask_size, frame
    if masks.shape[0] == 0:
        return torch.zeros(0, m, m)
    new_h, new_w = resized_longest_side(image_size[0], image_size[1], s)
    x = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)  # (N, 1, H, W)
    x = _resize(x, (new_h, new_w))
    x = F.pad(x, (0, s - new_w, 0, s - new_h))  # (N, 1, S, S)
    x = _resize(x, (m, m)) if s != m else x
    return (x[:, 0] >= 0.5).float()  # (N, M, M)


def post_process_masks(
    mask_logits: torch.Tensor | list[torch.Tensor],
    original_sizes: Any,
    reshaped_input_sizes: Any,
    frame: int,
    threshold: float | None = 0.0,
) -> list[torch.Tensor]:
    """Mask-grid logits -> masks at each original image size.

    Args:
        mask_logits: (B, K, M, M) for a batch, (N, M, M) for one image, or a list of
            per-image (K_i, M, M) tensors.
        original_sizes: (B, 2) image (H, W), as returned by `__call__`.
        reshaped_input_sizes: (B, 2) resized (h, w) inside the S x S SAM frame.
        frame: S, the side of the SAM frame.
        threshold: masks are ``logits > threshold`` (bool); None returns the resized
            logits (float).

    Returns:
        One tensor per image of shape (K, H, W): bool, or float when threshold is None.
        Each is upsampled M -> S, cropped to the unpadded (h, w) and resized to (H, W).
    """
    original = torch.as_tensor(original_sizes).reshape(-1, 2).tolist()
    reshaped = torch.as_tensor(reshaped_input_sizes).reshape(-1, 2).tolist()
    if isinstance(mask_logits, torch.Tensor):
        if mask_logits.ndim == 3:
            per_image = [mask_logits]
        elif mask_logits.ndim == 4:
            per_image = list(mask_logits)
        else:
            raise ValueError(
                "Expected mask_logits of shape (B, K, M, M) or (N, M, M), got shape "
                f"{tuple(mask_logits.shape)}."
            )
    else:
        per_image = list(mask_logits)
    if not (len(per_image) == len(original) == len(reshaped)):
        raise ValueError(
            f"Expected as many images in mask_logits ({len(per_image)}) as original_sizes "
            f"({len(original)}) and reshaped_input_sizes ({len(reshaped)})."
        )
    s = frame
    results = []
    for i, (logits, (h, w), (rh, rw)) in enumerate(zip(per_image, original, reshaped)):
        if logits.ndim != 3:
            raise ValueError(
                f"Expected mask_logits[{i}] of shape (K, M, M), got {tuple(logits.shape)}."
            )
        if not (0 < rh <= s and 0 < rw <= s):
            raise ValueError(
                f"Expected reshaped_input_sizes[{i}] within the {s}x{s} SAM frame, got {(rh, rw)}."
            )
        x = logits.float().unsqueeze(1)  # (K, 1, M, M)
        if x.shape[0] == 0:
            out = torch.zeros(0, h, w)
        else:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            x = x[..., :rh, :rw]  # (K, 1, h', w') unpadded
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
            out = x[:, 0]  # (K, H, W)
        results.append(out if threshold is None else out > threshold)
    return results
