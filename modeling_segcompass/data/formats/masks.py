"""Masks from annotations: COCO RLE (encode and decode), COCO polygons, and ReasonSeg shapes
rasterised as LISA does. Decoded with numpy and PIL (no pycocotools, no cv2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .common import IGNORE_INDEX, _short

# ----------------------------------------------------------------------------- COCO RLE


def _counts_from_string(counts: str) -> list[int]:
    """Parse COCO's compressed RLE string (pycocotools ``rleFrString``).

    Each count is a little-endian run of 5-bit groups offset by 48 ('0'); bit 0x20 means "more
    groups follow" and bit 0x10 of the last group is the sign. From the 4th count on, the
    value is stored as a difference to the count two places earlier.
    """
    values: list[int] = []
    pos = 0
    while pos < len(counts):
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= len(counts):
                raise ValueError(
                    f"compressed RLE string ends inside a count (after {len(values)} counts)"
                )
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(
                    f"compressed RLE string has the character {counts[pos]!r} at {pos}; "
                    "expected characters in the range '0'..'o'"
                )
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:
                value |= -1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return values


def _counts_to_string(counts: Sequence[int]) -> str:
    """Inverse of :func:`_counts_from_string` (pycocotools ``rleToString``)."""
    chars: list[str] = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            char = value & 0x1F
            value >>= 5
            more = value != -1 if char & 0x10 else value != 0
            if more:
                char |= 0x20
            chars.append(chr(char + 48))
    return "".join(chars)


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode one COCO run-length encoding into a binary mask.

    Args:
        rle: ``{"size": [height, width], "counts": ...}`` where ``counts`` is either the
            compressed string (``str`` or ``bytes``, as written by pycocotools) or the
            uncompressed list of run lengths (``iscrowd`` annotations). Runs alternate
            0, 1, 0, ... starting with zeros, over the pixels in column-major order.

    Returns:
        uint8 array of shape (height, width) with values 0 and 1.

    Raises:
        ValueError: if the size or counts are malformed or the runs do not cover the image.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"expected an RLE dict with keys 'size' and 'counts', got {_short(rle)}")
    size = rle["size"]
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, int) and v >= 0 for v in size)
    ):
        raise ValueError(f"RLE 'size' must be [height, width] of ints >= 0, got {size!r}")
    height, width = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        runs = _counts_from_string(counts)
    elif isinstance(counts, Sequence) and all(isinstance(c, int) for c in counts):
        runs = [int(c) for c in counts]
    else:
        raise ValueError(
            f"RLE 'counts' must be a compressed string or a list of ints, got {_short(counts)}"
        )
    if any(r < 0 for r in runs):
        raise ValueError(f"RLE has a negative run length: {runs}")
    if sum(runs) != height * width:
        raise ValueError(
            f"RLE runs cover {sum(runs)} pixels but size {height}x{width} has "
            f"{height * width}; the counts do not belong to this size"
        )
    values = np.arange(len(runs), dtype=np.int64) % 2  # 0, 1, 0, ... starting with zeros
    flat = np.repeat(values.astype(np.uint8), runs)
    return flat.reshape((height, width), order="F")  # (H, W) from column-major runs


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a binary mask as a compressed COCO RLE (inverse of :func:`decode_rle`).

    Args:
        mask: array of shape (height, width); nonzero pixels are foreground.

    Returns:
        ``{"size": [height, width], "counts": str}``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) mask, got shape {mask.shape}")
    flat = (mask != 0).reshape(-1, order="F").astype(np.int8)  # (H*W,) column-major
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]  # runs always start with a (possibly empty) run of zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_string(runs)}


# ----------------------------------------------------------------------------- polygons


def _draw_polygon(draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], value: int):
    """Fill a closed polygon and its 1-px outline (cv2 ``fillPoly`` + ``polylines``)."""
    if len(points) == 1:
        draw.point(points, fill=value)
    elif len(points) == 2:
        draw.line(points, fill=value, width=1)
    else:
        draw.polygon(points, fill=value, outline=value)


def _check_flat_polygon(polygon: Any) -> list[tuple[float, float]]:
    """Validate a COCO polygon ``[x1, y1, x2, y2, ...]`` and return its points."""
    if not isinstance(polygon, Sequence) or isinstance(polygon, str):
        raise ValueError(
            f"a polygon must be a flat list [x1, y1, x2, y2, ...], got {_short(polygon)}"
        )
    if len(polygon) % 2:
        raise ValueError(
            f"a polygon has an odd number of coordinates ({len(polygon)}); expected pairs "
            "x1, y1, x2, y2, ..."
        )
    if len(polygon) < 2:
        raise ValueError("a polygon is empty; expected at least one (x, y) pair")
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in polygon):
        raise ValueError(f"a polygon has non-numeric or non-finite coordinates: {_short(polygon)}")
    return [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon), 2)]


def polygons_to_mask(polygons: Sequence[Sequence[float]], *, height: int, width: int) -> np.ndarray:
    """Rasterise the COCO polygons of one annotation and take their union.

    Pixels on the polygon boundary are included (PIL fill + outline); boundary pixels may
    differ by one from pycocotools' ``frPoly``.

    Args:
        polygons: list of flat polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixel coordinates.
        height: image height H.
        width: image width W.

    Returns:
        uint8 array of shape (H, W) with values 0 and 1.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        _draw_polygon(draw, _check_flat_polygon(polygon), 1)
    return np.asarray(canvas, dtype=np.uint8).copy()


def segmentation_to_mask(segmentation: Any, *, height: int, width: int) -> np.ndarray:
    """Decode one COCO ``segmentation`` (polygons, an RLE, or a list of RLEs) to a union mask.

    Args:
        segmentation: a list of flat polygons, an RLE dict, or a list of RLE dicts.
        height: image height H (RLE sizes must match it).
        width: image width W.

    Returns:
        uint8 array of shape (H, W) with values 0 and 1.
    """
    if isinstance(segmentation, Mapping):
        parts: list[Any] = [segmentation]
    elif isinstance(segmentation, Sequence) and not isinstance(segmentation, str):
        parts = list(segmentation)
    else:
        raise ValueError(
            f"expected a segmentation as a list of polygons or an RLE dict, got {_short(segmentation)}"
        )
    if not parts:
        raise ValueError("the segmentation is empty (no polygon and no RLE)")
    if all(isinstance(p, Mapping) for p in parts):
        mask = np.zeros((height, width), dtype=np.uint8)
        for part in parts:
            decoded = decode_rle(part)
            if decoded.shape != (height, width):
                raise ValueError(
                    f"RLE size {list(decoded.shape)} differs from the image size "
                    f"[{height}, {width}]"
                )
            mask |= decoded
        return mask
    if any(isinstance(p, Mapping) for p in parts):
        raise ValueError("a segmentation mixes polygons and RLE dicts; expected one kind")
    return polygons_to_mask(parts, height=height, width=width)


def reasonseg_mask(shapes: Sequence[Mapping[str, Any]], *, height: int, width: int) -> np.ndarray:
    """Rasterise ReasonSeg shapes exactly as LISA's ``get_mask_from_json`` does.

    Shapes labelled ``flag`` are skipped. The others are sorted by drawn area, largest first,
    and drawn (points truncated to int, fill plus 1-px outline) so that smaller shapes
    overwrite larger ones: 1 for a target, 255 (:data:`IGNORE_INDEX`) when the label contains
    ``ignore`` (case-insensitive).

    Args:
        shapes: the ``shapes`` list of a ReasonSeg JSON (``label`` and ``points`` per shape).
        height: image height H.
        width: image width W.

    Returns:
        uint8 array of shape (H, W): 0 background, 1 target, 255 ignore.
    """
    drawn: list[tuple[list[tuple[int, int]], int]] = []
    for shape in shapes:
        label = str(shape["label"]).lower()
        if label == "flag":  # LISA: "meaningless deprecated annotations"
            continue
        value = IGNORE_INDEX if "ignore" in label else 1
        drawn.append((_int_points(shape["points"]), value))
    areas = []
    for points, _ in drawn:
        single = Image.new("L", (width, height), 0)
        _draw_polygon(ImageDraw.Draw(single), points, 1)
        areas.append(int(np.count_nonzero(np.asarray(single))))
    # LISA: np.argsort(areas)[::-1]; a stable sort reproduces its order for equal areas.
    order = np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for index in order:
        points, value = drawn[int(index)]
        _draw_polygon(draw, points, value)
    return np.asarray(canvas, dtype=np.uint8).copy()


def _int_points(points: Any) -> list[tuple[int, int]]:
    """Validate ReasonSeg ``points`` ``[[x, y], ...]`` and truncate them to int (as LISA)."""
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise ValueError(f"'points' must be a non-empty list of [x, y], got {_short(points)}")
    out = []
    for point in points:
        if (
            not isinstance(point, Sequence)
            or len(point) != 2
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in point)
        ):
            raise ValueError(f"each point must be [x, y] with finite numbers, got {_short(point)}")
        out.append((int(point[0]), int(point[1])))  # np.int32 cast truncates toward zero
    return out
