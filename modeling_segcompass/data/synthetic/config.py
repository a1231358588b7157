"""The synthetic world's vocabulary (families, shapes, colours, sizes, relations, function
words) and its settings, `SyntheticWorldConfig`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# Generation must allow the longest response; a bounded chain of thought keeps that small.
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
COT_STYLES = ("focused", "scene_first", "scene_marked")
# Families whose answer is decided object by object (does this object fit the instruction?):
# with cot_style "scene_marked" the scene carries that decision after each object.
MARKED_FAMILIES = ("attribute", "no_target", "function", "multi_object", "negation")
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
    """Words between `</think>` and the first `<REF_POS>` (the upstream repository
    ZhenyuLU-Heliodore/SegCompass uses "Here are the K reference positions:"). Empty by
    default: constant filler only lengthens generation."""
    cot_style: str = "focused"
    """How the gold chain of thought starts. "focused": straight at the relevant candidates
    (see the `data.synthetic` package docstring). "scene_first": first the whole scene as the
    image description of `describe_example` ("scene : large red circle at top left , ... ."),
    then the focused reasoning, which can then copy from that text instead of reading the image
    again (negation drops its own listing of every shape, which the scene already gives).
    "scene_marked": the scene, each object followed by its decision, "is" (it fits the
    instruction) or "not", then the answer, for the families decided object by object
    (`MARKED_FAMILIES`; function first names what its word means); relation and superlative,
    which compare objects, keep the "scene_first" reasoning.
    The scenes, instructions and masks are the same for all styles."""
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
        shape, the commas between them, "."), and with "scene_marked" one decision word more
        per shape."""
        if self.cot_style == "scene_first":
            return MAX_COT_WORDS + 2 + 6 * self.max_objects + (self.max_objects - 1) + 1
        if self.cot_style == "scene_marked":  # + each object's decision word
            return MAX_COT_WORDS + 2 + 7 * self.max_objects + (self.max_objects - 1) + 1
        return MAX_COT_WORDS
