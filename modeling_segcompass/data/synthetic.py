"""The synthetic reasoning-segmentation world of the embedded default (ARCHITECTURE.md).

Coloured shapes on a plain canvas, an instruction that needs a small piece of reasoning to
resolve (attributes, spatial relations, superlatives, negation, function words, "all ...",
and no-target), a gold chain of thought, the gold assistant response with exactly K
`<REF_POS>` tokens (the upstream multi-object format, PAPER.md step 1) and the target masks.

Design choices (DEMO_PROBE.md measured that the weak link of a tiny VLM is naming the wrong
object in its own reasoning):

* The chain of thought walks the visual reasoning step by step in a fixed, regular pattern:
  first the relevant candidate objects (colour, shape and, where it matters, size and a
  coarse 3x3 position), then the deciding comparison, then the answer object(s) named
  compactly as ``{colour} {shape} at {cell}``. It is at most `MAX_COT_WORDS` words.
* Every instruction has a unique answer set by construction: a scene is resampled whenever
  the instruction would be ambiguous (two matching objects, near ties in position, an object
  on the diagonal of a relation, two objects with the same answer phrase, ...).
* Everything is drawn with numpy (no PIL drawing), so 10k examples take seconds on one core.
* Each example ``i`` has its own random generator seeded with ``(config.seed, i)``: the same
  seed gives byte-identical examples however many are drawn, and example ``i`` can be
  regenerated on its own.

Conventions: objects are listed left to right (by mask centroid x, then y); ``masks`` and
``target_indices`` follow the same order, and the answer names the targets in that order, so
target ``j`` belongs to the ``j``-th `<REF_POS>` slot; the remaining ``K - N`` slots hold no
object (their confidence target is 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

REF_TOKEN = "<REF_POS>"
THINK_START = "<think>"
THINK_END = "</think>"
# DEMO_PROBE.md: generation must allow the longest response; a bounded CoT keeps that small.
MAX_COT_WORDS = 40

FAMILIES = (
    "attribute",
    "relation",
    "superlative",
    "negation",
    "function",
    "multi_object",
    "no_target",
)
SHAPE_KINDS = ("circle", "square", "triangle", "cross", "star")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "star": "stars",
}
# Clearly distinct RGB values; every pair differs by >= 100 in at least one channel.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 255),
    "yellow": (245, 220, 40),
    "purple": (170, 70, 220),
    "orange": (255, 140, 20),
}
BACKGROUND = (60, 60, 60)
SIZES = ("small", "large")
# Half-size of a shape as a fraction of the canvas side. The ratio (1.83) makes every large
# shape larger in area than every small one (smallest large: star 1.32 r^2; largest small:
# square 3.24 r^2), so "largest" by size word agrees with "largest" by pixel count.
RADIUS_FRACTION = {"small": 0.09, "large": 0.165}
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
# Superlative -> the side the CoT sorts from.
SORT_SIDE = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}
# The instruction of the image-description task (`describe_example`).
DESCRIBE_INSTRUCTION = "describe the shapes"
# Styles of the gold chain of thought (`SyntheticWorldConfig.cot_style`).
COT_STYLES = ("focused", "scene_first")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

# The explicit function-word table of the `function` family: instruction -> shape or colour.
# (keyword used in the CoT, instruction phrase)
KIND_FUNCTIONS: dict[str, tuple[str, str]] = {
    "circle": ("roll", "something that could roll"),
    "square": ("stack", "something you could stack boxes on"),
    "triangle": ("roof", "something shaped like a roof"),
    "cross": ("plus", "something you could use as a plus sign"),
    "star": ("night", "something you could see in the night sky"),
}
COLOUR_FUNCTIONS: dict[str, tuple[str, str]] = {
    "red": ("strawberry", "something the colour of a strawberry"),
    "green": ("grass", "something the colour of grass"),
    "blue": ("sky", "something the colour of the sky"),
    "yellow": ("banana", "something the colour of a banana"),
    "purple": ("grape", "something the colour of a grape"),
    "orange": ("pumpkin", "something the colour of a pumpkin"),
}

_MAX_ATTEMPTS = 500
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


def _default_family_weights() -> dict[str, float]:
    return dict.fromkeys(FAMILIES, 1.0)


@dataclass
class SyntheticWorldConfig:
    """Settings of the synthetic world. Cross-field checks run in `__post_init__`."""

    image_size: int = 64
    """Side of the square RGB canvas in pixels, 64..256 (64 is what a CPU run can afford)."""
    min_objects: int = 2
    """Fewest shapes in a scene (>= 2: relations and comparisons need two)."""
    max_objects: int = 4
    """Most shapes in a scene (<= 6, so that they fit without overlap)."""
    kinds: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    """Shape kinds, a subset of `SHAPE_KINDS` with at least 3 ("star" is hard to see at 64 px)."""
    colours: tuple[str, ...] = tuple(PALETTE)
    """Colour names, a subset of `PALETTE` with at least 3."""
    sizes: tuple[str, ...] = SIZES
    """Size words, a non-empty subset of ("small", "large"). With one size there are no
    size superlatives."""
    texture_noise: float = 0.03
    """Standard deviation of the per-pixel Gaussian noise as a fraction of 255 (0 = flat)."""
    allow_overlap: bool = False
    """Let shapes overlap (later ones occlude earlier ones; masks are the visible pixels and
    each shape keeps >= 60% of its area). Off by default: masks are then disjoint."""
    num_slots: int = 3
    """K: every response ends with exactly K `<REF_POS>` tokens; multi-object answers have
    2..K targets."""
    family_weights: dict[str, float] = field(default_factory=_default_family_weights)
    """Relative sampling weight of each family in `FAMILIES` (missing families weigh 0)."""
    distractor_similarity: float = 0.5
    """Probability that each distractor copies the colour or the shape of the target (or of
    the relation anchor): 0 gives random distractors, 1 the hardest near-misses."""
    answer_prefix: str = ""
    """Words between `</think>` and the first `<REF_POS>` (upstream uses "Here are the K
    reference positions:"). Empty by default: constant filler only lengthens generation."""
    cot_style: str = "focused"
    """How the gold chain of thought starts. "focused": straight at the relevant candidates
    (see the module docstring). "scene_first": first the whole scene as the image
    description of `describe_example` ("scene : large red circle at top left , ... ."), then
    the focused reasoning, which can then copy from that text instead of reading the image
    again (negation drops its own listing of every shape, which the scene already gives).
    The scenes, instructions and masks are the same for both styles."""
    seed: int = 0
    """Seed of the world; example i uses the generator seeded with (seed, i)."""

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.colours = tuple(self.colours)
        self.sizes = tuple(self.sizes)
        self.family_weights = dict(self.family_weights)
        if not 64 <= self.image_size <= 256:
            raise ValueError(
                f"image_size must be in 64..256, got {self.image_size}; shapes are too small "
                "to read below 64 px and generation gets slow above 256."
            )
        if not 2 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError(
                "Expected 2 <= min_objects <= max_objects <= 6, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}."
            )
        unknown = [k for k in self.kinds if k not in SHAPE_KINDS]
        if unknown or len(set(self.kinds)) < 3 or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(
                f"kinds must be at least 3 distinct names from {SHAPE_KINDS}, got {self.kinds}."
            )
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown or len(set(self.colours)) < 3 or len(set(self.colours)) != len(self.colours):
            raise ValueError(
                f"colours must be at least 3 distinct names from {tuple(PALETTE)}, "
                f"got {self.colours}."
            )
        if (
            not self.sizes
            or any(s not in SIZES for s in self.sizes)
            or len(set(self.sizes)) != len(self.sizes)
        ):
            raise ValueError(f"sizes must be a non-empty subset of {SIZES}, got {self.sizes}.")
        if not 0.0 <= self.texture_noise <= 0.2:
            raise ValueError(f"texture_noise must be in [0, 0.2], got {self.texture_noise}.")
        if not 0.0 <= self.distractor_similarity <= 1.0:
            raise ValueError(
                f"distractor_similarity must be in [0, 1], got {self.distractor_similarity}."
            )
        if not 1 <= self.num_slots <= 8:
            raise ValueError(f"num_slots (K) must be in 1..8, got {self.num_slots}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")
        if self.cot_style not in COT_STYLES:
            raise ValueError(f"cot_style must be one of {COT_STYLES}, got {self.cot_style!r}.")
        unknown = [f for f in self.family_weights if f not in FAMILIES]
        if unknown or any(w < 0 for w in self.family_weights.values()):
            raise ValueError(
                f"family_weights must map names from {FAMILIES} to weights >= 0, "
                f"got {self.family_weights}."
            )
        if self.num_slots < 2 and self.family_weights.get("multi_object", 0.0) > 0:
            logger.warning("num_slots=1 leaves no room for multi_object examples; weight set to 0.")
            self.family_weights["multi_object"] = 0.0
        if sum(self.family_weights.values()) <= 0:
            raise ValueError(
                f"At least one family needs a positive weight, got {self.family_weights}."
            )

    @property
    def max_response_words(self) -> int:
        """Upper bound on the whitespace-separated words of any `response`: the CoT bound,
        the think tags, the answer prefix and the K `<REF_POS>` tokens."""
        return self.max_cot_words + 2 + len(self.answer_prefix.split()) + self.num_slots

    @property
    def max_cot_words(self) -> int:
        """Upper bound on the words of any `cot`: `MAX_COT_WORDS` for the focused reasoning,
        plus, with `cot_style="scene_first"`, the scene ("scene :", at most 6 words per
        shape, the commas between them, ".")."""
        if self.cot_style == "scene_first":
            return MAX_COT_WORDS + 2 + 6 * self.max_objects + (self.max_objects - 1) + 1
        return MAX_COT_WORDS


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


@dataclass
class _Scene:
    """Everything of one example except its image."""

    index: int
    family: str
    shapes: list[_Shape]
    query: dict[str, Any]
    targets: list[int]
    instruction: str
    cot: str
    response: str
    rng: np.random.Generator


# --------------------------------------------------------------------------- drawing


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


# --------------------------------------------------------------------------- query semantics


def _empty_query(family: str) -> dict[str, Any]:
    """The fixed query schema: every key present in every example (None when unused)."""
    return {
        "family": family,
        "colour": None,  # target (or group) colour
        "kind": None,  # target (or group) shape kind
        "size": None,  # target size word (attribute)
        "negated": False,  # negation: targets are the objects NOT matching colour/kind
        "relation": None,  # "left" | "right" | "above" | "below"
        "anchor_colour": None,
        "anchor_kind": None,
        "anchor_index": -1,  # index into `objects` of the relation anchor
        "superlative": None,  # one of SUPERLATIVES
        "function_word": None,  # key of KIND_FUNCTIONS / COLOUR_FUNCTIONS keyword
    }


def _matches(s: _Shape, colour: str | None, kind: str | None, size: str | None = None) -> bool:
    return (
        (colour is None or s.colour == colour)
        and (kind is None or s.kind == kind)
        and (size is None or s.size == size)
    )


def _direction(s: _Shape, anchor: _Shape, margin: float) -> str | None:
    """Where `s` lies seen from `anchor`: a RELATIONS key, "diagonal", or None (too close).

    An object is "left of" the anchor when its centroid is left by >= margin and the
    horizontal offset dominates the vertical one by 1.5x (angle under ~34 degrees).
    """
    dx, dy = s.x - anchor.x, s.y - anchor.y
    if max(abs(dx), abs(dy)) < margin:
        return None
    if abs(dx) >= 1.5 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "diagonal"


def _resolve(query: dict[str, Any], shapes: list[_Shape], size: int) -> list[int] | None:
    """The answer set of a query in a scene, or None when the query is ambiguous there.

    The single source of truth of what an instruction means; families add count rules
    (exactly one, 2..K, none) in `_count_ok`. Updates `query["anchor_index"]`.
    """
    family = query["family"]
    colour, kind = query["colour"], query["kind"]
    if family in ("attribute", "function", "multi_object", "no_target"):
        return [i for i, s in enumerate(shapes) if _matches(s, colour, kind, query["size"])]
    if family == "negation":
        return [i for i, s in enumerate(shapes) if not _matches(s, colour, kind)]
    if family == "relation":
        anchors = [
            i
            for i, s in enumerate(shapes)
            if _matches(s, query["anchor_colour"], query["anchor_kind"])
        ]
        if len(anchors) != 1:
            return None
        a = anchors[0]
        query["anchor_index"] = a
        wanted = query["relation"]
        sign = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}[wanted]
        hits = []
        for i, s in enumerate(shapes):
            if i == a:
                continue
            label = _direction(s, shapes[a], 0.06 * size)
            if label is None:
                return None
            if label == wanted:
                hits.append(i)
            elif label == "diagonal":
                # A diagonal object on the asked side could be read either way: ambiguous.
                if (s.x - shapes[a].x) * sign[0] + (s.y - shapes[a].y) * sign[1] > 0:
                    return None
        return hits
    if family == "superlative":
        group = [i for i, s in enumerate(shapes) if _matches(s, colour, kind)]
        if len(group) < 2:
            return None
        sup = query["superlative"]
        if sup in ("largest", "smallest"):
            want = "large" if sup == "largest" else "small"
            hits = [i for i in group if shapes[i].size == want]
            return hits if len(hits) == 1 else None
        key = {
            "leftmost": lambda i: shapes[i].x,
            "rightmost": lambda i: -shapes[i].x,
            "topmost": lambda i: shapes[i].y,
            "bottommost": lambda i: -shapes[i].y,
        }[sup]
        order = sorted(group, key=key)
        # Near ties are ambiguous to the eye: demand a clear lead of 10% of the canvas.
        if key(order[1]) - key(order[0]) < 0.1 * size:
            return None
        return [order[0]]
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")


def _count_ok(family: str, n_targets: int, cfg: SyntheticWorldConfig) -> bool:
    if family == "no_target":
        return n_targets == 0
    if family == "multi_object":
        return 2 <= n_targets <= cfg.num_slots
    return n_targets == 1


# --------------------------------------------------------------------------- scene proposals


def _pick(rng: np.random.Generator, options) -> Any:
    return options[int(rng.integers(len(options)))]


def _random_attr(rng: np.random.Generator, cfg: SyntheticWorldConfig) -> tuple[str, str, str]:
    return (_pick(rng, cfg.kinds), _pick(rng, cfg.colours), _pick(rng, cfg.sizes))


def _similar_attr(rng: np.random.Generator, cfg: SyntheticWorldConfig, like: tuple) -> tuple:
    """A distractor that, with probability `distractor_similarity`, shares colour or kind."""
    kind, colour, size = _random_attr(rng, cfg)
    if rng.random() < cfg.distractor_similarity:
        if rng.random() < 0.5:
            kind = like[0]
        else:
            colour = like[1]
    return (kind, colour, size)


def _other(rng: np.random.Generator, options, exclude) -> Any:
    return _pick(rng, [o for o in options if o != exclude])


def _propose(
    family: str, rng: np.random.Generator, cfg: SyntheticWorldConfig, n: int
) -> tuple[list[_Shape], dict[str, Any]] | None:
    """A scene of `n` shapes and a query likely (not certainly) valid for `family`;
    `_resolve` decides."""
    query = _empty_query(family)
    if family in ("attribute", "no_target"):
        target = _random_attr(rng, cfg)
        forms = ["colour_kind", "colour_kind", "kind", "colour"]
        if family == "attribute" and len(cfg.sizes) > 1:
            forms.append("size_kind")
        form = _pick(rng, forms)
        query["kind"] = target[0] if "kind" in form else None
        query["colour"] = target[1] if "colour" in form else None
        query["size"] = target[2] if "size" in form else None
        attrs = [_similar_attr(rng, cfg, target) for _ in range(n - 1)]
        if family == "attribute":
            attrs.insert(int(rng.integers(n)), target)
        else:
            attrs.append(_similar_attr(rng, cfg, target))
    elif family == "function":
        target = _random_attr(rng, cfg)
        if rng.random() < 0.5:
            query["kind"] = target[0]
            query["function_word"] = KIND_FUNCTIONS[target[0]][0]
        else:
            query["colour"] = target[1]
            query["function_word"] = COLOUR_FUNCTIONS[target[1]][0]
        attrs = [target]
        for _ in range(n - 1):
            # Distractors may share anything but the attribute the function word names.
            kind, colour, size = _similar_attr(rng, cfg, target)
            if query["kind"] is not None and kind == target[0]:
                kind = _other(rng, cfg.kinds, target[0])
            if query["colour"] is not None and colour == target[1]:
                colour = _other(rng, cfg.colours, target[1])
            attrs.append((kind, colour, size))
        rng.shuffle(attrs)
    elif family == "relation":
        anchor = _random_attr(rng, cfg)
        query["anchor_kind"], query["anchor_colour"] = anchor[0], anchor[1]
        attrs = [anchor] + [_similar_attr(rng, cfg, anchor) for _ in range(n - 1)]
    elif family == "superlative":
        sups = ["leftmost", "rightmost", "topmost", "bottommost"]
        if len(cfg.sizes) > 1:
            sups += ["largest", "smallest"]
        sup = _pick(rng, sups)
        query["superlative"] = sup
        groups = ["colour", "kind"] if sup in ("largest", "smallest") else ["colour", "kind", "all"]
        group = _pick(rng, groups)
        members = n if group == "all" else int(rng.integers(2, n + 1))
        g_kind, g_colour = _pick(rng, cfg.kinds), _pick(rng, cfg.colours)
        query["kind"] = g_kind if group == "kind" else None
        query["colour"] = g_colour if group == "colour" else None
        attrs = []
        for j in range(n):
            kind, colour, size = _random_attr(rng, cfg)
            if j < members:
                kind = g_kind if group == "kind" else kind
                colour = g_colour if group == "colour" else colour
                if sup in ("largest", "smallest"):
                    extreme = "large" if sup == "largest" else "small"
                    size = extreme if j == 0 else _other(rng, SIZES, extreme)
            else:
                kind = _other(rng, cfg.kinds, g_kind) if group == "kind" else kind
                colour = _other(rng, cfg.colours, g_colour) if group == "colour" else colour
            attrs.append((kind, colour, size))
        rng.shuffle(attrs)
    elif family == "negation":
        value_kind, value_colour = _pick(rng, cfg.kinds), _pick(rng, cfg.colours)
        if rng.random() < 0.5:
            query["kind"] = value_kind
            attrs = [
                (value_kind, _pick(rng, cfg.colours), _pick(rng, cfg.sizes)) for _ in range(n - 1)
            ]
            odd = (
                _other(rng, cfg.kinds, value_kind),
                _pick(rng, cfg.colours),
                _pick(rng, cfg.sizes),
            )
        else:
            query["colour"] = value_colour
            attrs = [
                (_pick(rng, cfg.kinds), value_colour, _pick(rng, cfg.sizes)) for _ in range(n - 1)
            ]
            odd = (
                _pick(rng, cfg.kinds),
                _other(rng, cfg.colours, value_colour),
                _pick(rng, cfg.sizes),
            )
        query["negated"] = True
        attrs.insert(int(rng.integers(n)), odd)
    elif family == "multi_object":
        members = int(rng.integers(2, min(cfg.num_slots, n) + 1))
        g_kind, g_colour = _pick(rng, cfg.kinds), _pick(rng, cfg.colours)
        by_colour = rng.random() < 0.5
        query["colour" if by_colour else "kind"] = g_colour if by_colour else g_kind
        attrs = []
        for j in range(n):
            kind, colour, size = _random_attr(rng, cfg)
            if by_colour:
                colour = g_colour if j < members else _other(rng, cfg.colours, g_colour)
            else:
                kind = g_kind if j < members else _other(rng, cfg.kinds, g_kind)
            attrs.append((kind, colour, size))
        rng.shuffle(attrs)
    else:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")

    shapes = _place(rng, cfg, attrs)
    if shapes is None:
        return None
    if family == "relation":
        # Ask about a direction in which the scene has exactly one clear object.
        for direction in rng.permutation(list(RELATIONS)):
            query["relation"] = str(direction)
            targets = _resolve(query, shapes, cfg.image_size)
            if targets is not None and len(targets) == 1:
                break
    return shapes, query


# --------------------------------------------------------------------------- text


def _group_header(colour: str | None, kind: str | None) -> str:
    if colour and kind:
        return f"{colour} {PLURALS[kind]}"
    if colour:
        return f"{colour} shapes"
    if kind:
        return PLURALS[kind]
    return "shapes"


def _describe(
    s: _Shape, *, colour: bool, kind: bool, size: bool = False, cell: bool = False
) -> str:
    words = []
    if size:
        words.append(s.size)
    if colour:
        words.append(s.colour)
    if kind:
        words.append(s.kind)
    if cell:
        words += ["at", s.cell]
    return " ".join(words)


def _name(s: _Shape) -> str:
    """The compact answer phrase; unique within a scene by construction."""
    return f"{s.colour} {s.kind} at {s.cell}"


def _instruction(query: dict[str, Any]) -> str:
    family, colour, kind, size = query["family"], query["colour"], query["kind"], query["size"]
    if family in ("attribute", "no_target"):
        words = [w for w in (size, colour) if w] + [kind or "shape"]
        return "the " + " ".join(words)
    if family == "relation":
        return (
            f"the shape {RELATIONS[query['relation']]} the "
            f"{query['anchor_colour']} {query['anchor_kind']}"
        )
    if family == "superlative":
        words = [query["superlative"]] + ([colour] if colour else []) + [kind or "shape"]
        return "the " + " ".join(words)
    if family == "negation":
        return "the only shape that is not " + (f"a {kind}" if kind else colour)
    if family == "function":
        return KIND_FUNCTIONS[kind][1] if kind else COLOUR_FUNCTIONS[colour][1]
    if family == "multi_object":
        return "all the " + _group_header(colour, kind)
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")


def _chain_of_thought(
    query: dict[str, Any], shapes: list[_Shape], targets: list[int], *, scene_first: bool = False
) -> str:
    """Gold reasoning: candidates -> deciding comparison -> answer (see module docstring).
    With `scene_first` (the scene is listed before it), negation skips its own listing."""
    family, colour, kind = query["family"], query["colour"], query["kind"]
    answer = " , ".join(_name(shapes[i]) for i in targets) or "none"

    def listing(group_colour, group_kind, *, size=False, cell=True, order=None) -> str:
        members = [
            s
            for s in (order if order is not None else shapes)
            if _matches(s, group_colour, group_kind)
        ]
        items = [
            _describe(s, colour=group_colour is None, kind=group_kind is None, size=size, cell=cell)
            for s in members
        ]
        return f"{_group_header(group_colour, group_kind)} : {' , '.join(items) or 'none'}"

    if family in ("attribute", "no_target", "function"):
        # Filter by the first named attribute (colour, else shape), then pick.
        steps = []
        if family == "function":
            steps.append(f"{query['function_word']} means {kind or colour}")
        if colour is not None:
            steps.append(listing(colour, None, size=query["size"] is not None))
        else:
            steps.append(listing(None, kind, size=query["size"] is not None))
        return " . ".join(steps + [f"answer : {answer}"])
    if family == "relation":
        anchor = shapes[query["anchor_index"]]
        target = shapes[targets[0]]
        return (
            f"{_name(anchor)} . {RELATIONS[query['relation']]} it : "
            f"{target.colour} {target.kind} . answer : {answer}"
        )
    if family == "superlative":
        sup = query["superlative"]
        target = shapes[targets[0]]
        if sup in ("largest", "smallest"):
            head = listing(colour, kind, size=True, cell=False)
            pick = _describe(target, colour=colour is None, kind=kind is None)
            return f"{head} . {sup} : {pick} . answer : {answer}"
        key = {
            "leftmost": lambda s: s.x,
            "rightmost": lambda s: -s.x,
            "topmost": lambda s: s.y,
            "bottommost": lambda s: -s.y,
        }[sup]
        ordered = sorted(shapes, key=key)
        head = listing(colour, kind, cell=False, order=ordered)
        head = head.replace(" : ", f" from {SORT_SIDE[sup]} : ", 1)
        return f"{head} . answer : {answer}"
    if family == "negation":
        prop = f"a {kind}" if kind else colour
        odd = shapes[targets[0]]
        decision = f"not {prop} : {odd.colour} {odd.kind} . answer : {answer}"
        if scene_first:
            return decision
        every = " , ".join(_describe(s, colour=True, kind=True) for s in shapes)
        return f"shapes : {every} . {decision}"
    if family == "multi_object":
        return f"{_group_header(colour, kind)} : {NUMBER_WORDS[len(targets)]} . answer : {answer}"
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")


def _response(cot: str, cfg: SyntheticWorldConfig) -> str:
    answer = " ".join([REF_TOKEN] * cfg.num_slots)
    prefix = f"{cfg.answer_prefix.strip()} " if cfg.answer_prefix.strip() else ""
    return f"{THINK_START} {cot} {THINK_END} {prefix}{answer}"


# --------------------------------------------------------------------------- examples


def _build_scene(cfg: SyntheticWorldConfig, index: int) -> _Scene:
    rng = np.random.default_rng([cfg.seed, index])
    names = [f for f in FAMILIES if cfg.family_weights.get(f, 0.0) > 0]
    weights = np.array([cfg.family_weights[f] for f in names], dtype=np.float64)
    family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    for attempt in range(_MAX_ATTEMPTS):
        # Keep the object count across retries (resampling it would favour the counts whose
        # scenes are easiest to make unambiguous); only give up on it after many failures.
        if attempt % 100 == 0:
            n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        proposal = _propose(family, rng, cfg, n)
        if proposal is None:
            continue
        shapes, query = proposal
        targets = _resolve(query, shapes, cfg.image_size)
        if targets is None or not _count_ok(family, len(targets), cfg):
            continue
        # Answer phrases ("{colour} {kind} at {cell}") must name one object each.
        phrases = {(s.colour, s.kind, s.cell) for s in shapes}
        if len(phrases) != len(shapes):
            continue
        # Named objects must sit clearly inside their 3x3 cell: a centroid on a cell border
        # would make the gold position word a coin flip for the model.
        named = targets + ([query["anchor_index"]] if query["anchor_index"] >= 0 else [])
        if not all(_clear_of_cell_border(shapes[i], cfg.image_size) for i in named):
            continue
        scene_first = cfg.cot_style == "scene_first"
        # The bound is checked on the focused CoT of either style, so that both styles keep
        # the same scenes (the scene_first negation is shorter than the focused one).
        cot = _chain_of_thought(query, shapes, targets)
        if len(cot.split()) > MAX_COT_WORDS:
            continue
        if scene_first:
            scene_text = _description([_object_record(s) for s in shapes], cfg.image_size)
            cot = f"scene : {scene_text} . " + _chain_of_thought(
                query, shapes, targets, scene_first=True
            )
        return _Scene(
            index=index,
            family=family,
            shapes=shapes,
            query=query,
            targets=targets,
            instruction=_instruction(query),
            cot=cot,
            response=_response(cot, cfg),
            rng=rng,
        )
    raise RuntimeError(
        f"Could not build an unambiguous {family!r} example (index {index}) in "
        f"{_MAX_ATTEMPTS} attempts with {cfg}. Allow more objects, more kinds/colours, or "
        "set this family's weight to 0."
    )


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


def generate_example(config: SyntheticWorldConfig, index: int) -> dict[str, Any]:
    """Example number `index` of the world (deterministic in `(config.seed, index)`).

    Returns a dict with:
        index (int): the example number.
        image (PIL.Image.Image): RGB, image_size x image_size.
        instruction (str): the referring instruction, e.g. "the shape left of the red circle".
        family (str): one of `FAMILIES`.
        cot (str): gold chain of thought (<= `config.max_cot_words` words; see `cot_style`).
        response (str): "<think> {cot} </think> [answer_prefix] " + K x "<REF_POS>".
        masks (np.ndarray): (N, H, W) uint8 in {0, 1}, the N targets left to right; N = 0
            for no-target.
        num_objects (int): N.
        objects (list[dict]): every shape left to right: kind, colour, size, bbox
            [x_min, y_min, x_max, y_max] (inclusive pixels), center [x, y] (mask centroid,
            pixel units), area (pixels).
        target_indices (list[int]): indices into `objects` of the targets, same order as masks.
        query (dict): the structured instruction (see `_empty_query`), e.g. relation and
            anchor_index for relations.
    """
    scene = _build_scene(config, index)
    image = _render(scene.shapes, config, scene.rng)
    size = config.image_size
    masks = np.zeros((len(scene.targets), size, size), dtype=np.uint8)  # (N, H, W)
    for j, i in enumerate(scene.targets):
        masks[j][scene.shapes[i].window()] = scene.shapes[i].patch
    return {
        "index": index,
        "image": image,
        "instruction": scene.instruction,
        "family": scene.family,
        "cot": scene.cot,
        "response": scene.response,
        "masks": masks,
        "num_objects": len(scene.targets),
        "objects": [_object_record(s) for s in scene.shapes],
        "target_indices": list(scene.targets),
        "query": scene.query,
    }


def generate_examples(
    config: SyntheticWorldConfig, n: int, *, start: int = 0
) -> list[dict[str, Any]]:
    """Examples `start .. start + n - 1` (see `generate_example` for the fields)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    return [generate_example(config, i) for i in range(start, start + n)]


def _description(objects: list[dict[str, Any]], size: int) -> str:
    """Every object record (`_object_record`, left to right) as "{size} {colour} {kind} at
    {cell}", comma-separated."""
    return " , ".join(
        f"{o['size']} {o['colour']} {o['kind']} at {_cell_name(*o['center'], size)}"
        for o in objects
    )


def describe_example(example: dict[str, Any], config: SyntheticWorldConfig) -> dict[str, Any]:
    """The image-description task on an example's image, for pretraining the VLM to read
    images (`vlm_pretraining.pretrain_vlm`) before it learns to reason about them.

    A tiny VLM trained from scratch on the reasoning task alone learns to ignore the image
    (its LM loss is the same with another image, docs/results.md): most response words follow
    from the instruction, and the few that need the image give too weak a signal. A
    description makes every answer word depend on the image, as the captioning data that
    pretrains real VLMs does.

    Returns a dict with the collator's keys: image (the same PIL image), instruction
    (`DESCRIBE_INSTRUCTION`), family "description", cot (every shape left to right as
    "{size} {colour} {kind} at {cell}", comma-separated; cells are the 3x3 cell of the mask
    centroid), response ("<think> {cot} </think> [answer_prefix] " + K x "<REF_POS>"), masks
    (0, H, W) and num_objects 0: the task trains the language model only.
    """
    size = example["image"].size[0]
    cot = _description(example["objects"], size)
    return {
        "index": example.get("index"),
        "image": example["image"],
        "instruction": DESCRIBE_INSTRUCTION,
        "family": "description",
        "cot": cot,
        "response": _response(cot, config),
        "masks": np.zeros((0, size, size), dtype=np.uint8),
        "num_objects": 0,
        "objects": example["objects"],
        "target_indices": [],
    }


def balanced_examples(config: SyntheticWorldConfig, per_family: int) -> list[dict[str, Any]]:
    """The first `per_family` examples of every family with a positive weight, in generation
    order (a held-out set balanced over the families).

    Examples are drawn in chunks until every family is full, so rare families are never short.

    Raises:
        RuntimeError: a family is still short after 100 x per_family x families examples.
    """
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}.")
    families = [f for f in FAMILIES if config.family_weights.get(f, 0.0) > 0]
    counts = dict.fromkeys(families, 0)
    chosen: list[dict[str, Any]] = []
    chunk, start = per_family * len(families), 0
    while min(counts.values()) < per_family:
        if start >= 100 * chunk:
            raise RuntimeError(
                f"balanced_examples: families still short after {start} examples: {counts} "
                f"(expected {per_family} each); raise the rare families' weights."
            )
        for ex in generate_examples(config, chunk, start=start):
            if counts[ex["family"]] < per_family:
                counts[ex["family"]] += 1
                chosen.append(ex)
        start += chunk
    return chosen


def iter_texts(
    config: SyntheticWorldConfig, n: int, *, start: int = 0, descriptions: bool = False
) -> Iterator[str]:
    """Instruction and response of examples `start .. start + n - 1` (2n strings, in that
    order), without drawing images: the corpus for training the word-level tokenizer. The
    texts are identical to those of `generate_examples` with the same arguments. With
    `descriptions`, each example is followed by the instruction and response of its
    `describe_example` (4n strings)."""
    for i in range(start, start + n):
        scene = _build_scene(config, i)
        yield scene.instruction
        yield scene.response
        if descriptions:
            yield DESCRIBE_INSTRUCTION
            records = [_object_record(s) for s in scene.shapes]
            yield _response(_description(records, config.image_size), config)


def word_vocabulary(config: SyntheticWorldConfig) -> list[str]:
    """Every whitespace-separated word that instructions and responses can contain (sorted).

    Built from the templates, so a tokenizer can be given a closed vocabulary.
    """
    words: set[str] = {REF_TOKEN, THINK_START, THINK_END, ":", ",", ".", "answer", "none"}
    words |= set(config.answer_prefix.split())
    words |= {"the", "shape", "shapes", "all", "only", "that", "is", "not", "a", "it", "at"}
    words |= {"scene"} if config.cot_style == "scene_first" else set()
    words |= {"means", "from", "of"} | set(SORT_SIDE.values())
    words |= set(DESCRIBE_INSTRUCTION.split())
    words |= set(config.colours) | set(config.kinds) | set(config.sizes)
    words |= {PLURALS[k] for k in config.kinds} | set(SUPERLATIVES)
    # Cell words ("middle" never shows: the middle row is named by its column alone) and the
    # counts of multi-object answers (2..K).
    words |= {"top", "bottom", "left", "right", "center"}
    words |= set(NUMBER_WORDS[2 : config.num_slots + 1])
    for phrase in RELATIONS.values():
        words |= set(phrase.split())
    for key in config.kinds:
        words.add(KIND_FUNCTIONS[key][0])
        words |= set(KIND_FUNCTIONS[key][1].split())
    for key in config.colours:
        words.add(COLOUR_FUNCTIONS[key][0])
        words |= set(COLOUR_FUNCTIONS[key][1].split())
    return sorted(words)


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


def draw_example(example: dict[str, Any], *, scale: int = 2) -> Image.Image:
    """The example's image upscaled `scale`x (nearest) with every target mask outlined in
    white, for documentation and reports."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}.")
    pixels = np.asarray(example["image"].convert("RGB")).repeat(scale, 0).repeat(scale, 1).copy()
    for mask in np.asarray(example["masks"], dtype=bool):
        big = mask.repeat(scale, 0).repeat(scale, 1)  # (H*scale, W*scale)
        padded = np.pad(big, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & big
        pixels[big & ~interior] = (255, 255, 255)
    return Image.fromarray(pixels, "RGB")
