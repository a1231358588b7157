"""Examples of the world: building an unambiguous scene for example ``i`` from the generator
seeded with ``(config.seed, i)``, the example dicts, the image-description task, balanced
held-out sets, the text corpus for the tokenizer, and drawing an example for documentation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .config import (
    DESCRIBE_INSTRUCTION,
    FAMILIES,
    MARKED_FAMILIES,
    MAX_COT_WORDS,
    SyntheticWorldConfig,
)
from .language import (
    _chain_of_thought,
    _description,
    _instruction,
    _marked_chain_of_thought,
    _response,
)
from .queries import _count_ok, _propose, _resolve
from .shapes import _clear_of_cell_border, _object_record, _render, _Shape

_MAX_ATTEMPTS = 500


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
        if cfg.cot_style == "scene_marked" and family in MARKED_FAMILIES:
            cot = _marked_chain_of_thought(query, shapes, targets, cfg.image_size)
        elif scene_first or cfg.cot_style == "scene_marked":
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
