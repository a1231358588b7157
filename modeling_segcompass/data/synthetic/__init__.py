"""The synthetic reasoning-segmentation world of the embedded default (see ``docs/data.md``).

Coloured shapes on a plain canvas, an instruction that needs a small piece of reasoning to
resolve (attributes, spatial relations, superlatives, negation, function words, "all ...",
and no-target), a gold chain of thought, the gold assistant response with exactly K
`<REF_POS>` tokens (the multi-object answer format of arXiv 2605.22658, as in the upstream
repository ZhenyuLU-Heliodore/SegCompass) and the target masks.

Design choices (the weak link of a tiny VLM is naming the wrong object in its own reasoning,
so the reasoning is regular and every answer is unique):

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

Modules: ``config`` (vocabulary and settings), ``shapes`` (rasterising, placing, painting),
``queries`` (what an instruction means, scene proposals), ``language`` (instructions, chain of
thought, responses), ``examples`` (the example dicts) and ``dataset`` (`datasets` export). The
answer tokens are those of `modeling_segcompass.answer_format`.
"""

from ...answer_format import REF_TOKEN, THINK_END, THINK_START
from .config import (
    BACKGROUND,
    COLOUR_FUNCTIONS,
    COT_STYLES,
    DESCRIBE_INSTRUCTION,
    FAMILIES,
    KIND_FUNCTIONS,
    MARKED_FAMILIES,
    MAX_COT_WORDS,
    NUMBER_WORDS,
    PALETTE,
    PLURALS,
    RADIUS_FRACTION,
    RELATIONS,
    SHAPE_KINDS,
    SIZES,
    SORT_SIDE,
    SUPERLATIVES,
    SyntheticWorldConfig,
)
from .dataset import as_mask_array, build_dataset, dataset_features
from .examples import (
    balanced_examples,
    describe_example,
    draw_example,
    generate_example,
    generate_examples,
    iter_texts,
)
from .language import word_vocabulary
from .shapes import _cell_name

__all__ = [
    "BACKGROUND",
    "COLOUR_FUNCTIONS",
    "COT_STYLES",
    "MARKED_FAMILIES",
    "DESCRIBE_INSTRUCTION",
    "FAMILIES",
    "KIND_FUNCTIONS",
    "MAX_COT_WORDS",
    "NUMBER_WORDS",
    "PALETTE",
    "PLURALS",
    "RADIUS_FRACTION",
    "REF_TOKEN",
    "RELATIONS",
    "SHAPE_KINDS",
    "SIZES",
    "SORT_SIDE",
    "SUPERLATIVES",
    "THINK_END",
    "THINK_START",
    "SyntheticWorldConfig",
    "_cell_name",
    "as_mask_array",
    "balanced_examples",
    "build_dataset",
    "dataset_features",
    "describe_example",
    "draw_example",
    "generate_example",
    "generate_examples",
    "iter_texts",
    "word_vocabulary",
]
