"""Shapes on the canvas: rasterisation with numpy, placement without (or with bounded)
overlap, the coarse 3x3 cell names, painting the image, and the public record of a shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .config import BACKGROUND, PALETTE, RADIUS_FRACTION, SHAPE_KINDS, SyntheticWorldConfig

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


@dataclass
class _Shape:
    """One shape while a scene is built (public form: `_object_record`)."""

    kind: str
    colour: str
    size: str
    cx: float  # placement centre, pixels
    cy: float
    radius: float
    # Visible pixels as a window: patch (h, w) bool at rows y0.., columns x0.. of the canvas.
    y0: int = 0
    x0: int = 0
    patch: np.ndarray | None = None
    x: float = 0.0  # mask centroid, pixels (pixel centres at +0.5)
    y: float = 0.0
    cell: str = ""

    def window(self) -> tuple[slice, slice]:
        h, w = self.patch.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

    def full_mask(self, size: int) -> np.ndarray:
        """(size, size) bool mask of the visible pixels."""
        mask = np.zeros((size, size), dtype=bool)
        mask[self.window()] = self.patch
        return mask


def _in_polygon(xs: np.ndarray, ys: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd test of pixel centres (xs (1, W), ys (H, 1)) against a polygon -> (H, W)."""
    inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    for (xa, ya), (xb, yb) in zip(verts, verts[1:] + verts[:1]):
        if ya == yb:
            continue
        crosses = (ya > ys) != (yb > ys)  # (H, 1)
        x_hit = xa + (ys - ya) * (xb - xa) / (yb - ya)  # (H, 1)
        inside ^= crosses & (xs < x_hit)
    return inside


def _shape_patch(kind: str, cx: float, cy: float, r: float, size: int):
    """Rasterise one shape in its bounding window -> (y0, x0, (h, w) bool patch)."""
    x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 2, size)
    y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 2, size)
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx)[None, :]  # (1, w)
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy)[:, None]  # (h, 1)
    if kind == "circle":
        patch = xs**2 + ys**2 <= r**2
    elif kind == "square":
        half = 0.9 * r
        patch = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif kind == "triangle":
        # Apex up at -r, base at +0.75 r, base width 2 r.
        patch = (ys <= 0.75 * r) & (np.abs(xs) <= (ys + r) / 1.75)
    elif kind == "cross":
        arm, half_width = 0.95 * r, 0.33 * r
        ax, ay = np.abs(xs), np.abs(ys)
        patch = ((ax <= arm) & (ay <= half_width)) | ((ax <= half_width) & (ay <= arm))
    elif kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        verts = [
            (float(a), float(b)) for a, b in zip(radii * np.cos(angles), radii * np.sin(angles))
        ]
        patch = _in_polygon(xs, ys, verts)
    else:  # guarded by SyntheticWorldConfig
        raise ValueError(f"Unknown shape kind {kind!r}; expected one of {SHAPE_KINDS}.")
    return y0, x0, patch


def _cell_name(x: float, y: float, size: int) -> str:
    """Coarse 3x3 position of a point: "top left", "top", ..., "center", ..., "bottom right"."""
    row = _ROWS[min(int(3 * y / size), 2)]
    col = _COLS[min(int(3 * x / size), 2)]
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


def _clear_of_cell_border(s: _Shape, size: int) -> bool:
    """True when the centroid is at least 2.5% of the canvas away from every 3x3 cell line."""
    band = 0.025 * size
    lines = (size / 3, 2 * size / 3)
    return all(abs(v - line) >= band for v in (s.x, s.y) for line in lines)


def _place(
    rng: np.random.Generator, cfg: SyntheticWorldConfig, attrs: list[tuple]
) -> list[_Shape] | None:
    """Place and rasterise shapes (kind, colour, size); sorted left to right. None on failure."""
    size = cfg.image_size
    gap = max(2.0, 0.03 * size)
    shapes: list[_Shape] = []
    for kind, colour, size_word in attrs:
        r = RADIUS_FRACTION[size_word] * size
        for _ in range(60):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if cfg.allow_overlap or all(
                abs(cx - o.cx) >= r + o.radius + gap or abs(cy - o.cy) >= r + o.radius + gap
                for o in shapes
            ):
                break
        else:
            return None
        shapes.append(_Shape(kind, colour, size_word, float(cx), float(cy), float(r)))
    for s in shapes:
        s.y0, s.x0, s.patch = _shape_patch(s.kind, s.cx, s.cy, s.radius, size)
    if cfg.allow_overlap:
        # Paint in order: later shapes occlude earlier ones; each keeps >= 60% of its area.
        owner = np.full((size, size), -1, dtype=np.int8)
        for i, s in enumerate(shapes):
            owner[s.window()][s.patch] = i
        for i, s in enumerate(shapes):
            full_area = s.patch.sum()
            s.patch = s.patch & (owner[s.window()] == i)
            if s.patch.sum() < 0.6 * full_area:
                return None
    for s in shapes:
        ys, xs = np.nonzero(s.patch)
        if len(xs) == 0:
            return None
        s.x, s.y = float(xs.mean()) + 0.5 + s.x0, float(ys.mean()) + 0.5 + s.y0
        s.cell = _cell_name(s.x, s.y, size)
    shapes.sort(key=lambda s: (s.x, s.y))
    return shapes


def _render(
    shapes: list[_Shape], cfg: SyntheticWorldConfig, rng: np.random.Generator
) -> Image.Image:
    """Paint the shapes (their visible masks) on the background, add light noise."""
    size = cfg.image_size
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for s in shapes:
        canvas[s.window()][s.patch] = PALETTE[s.colour]
    if cfg.texture_noise > 0:
        noise = rng.standard_normal(size=canvas.shape, dtype=np.float32)
        canvas += noise * np.float32(cfg.texture_noise * 255.0)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _object_record(s: _Shape) -> dict[str, Any]:
    ys, xs = np.nonzero(s.patch)
    ys, xs = ys + s.y0, xs + s.x0
    return {
        "kind": s.kind,
        "colour": s.colour,
        "size": s.size,
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
        "center": [round(s.x, 3), round(s.y, 3)],
        "area": int(len(xs)),
    }
