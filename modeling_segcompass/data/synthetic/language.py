"""The words of the world: instructions, the gold chain of thought, the gold response with
its K `<REF_POS>` tokens, the image description, and the closed word vocabulary."""

from __future__ import annotations

from typing import Any

from ...answer_format import REF_TOKEN, THINK_END, THINK_START
from .config import (
    COLOUR_FUNCTIONS,
    DESCRIBE_INSTRUCTION,
    FAMILIES,
    KIND_FUNCTIONS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SORT_SIDE,
    SUPERLATIVES,
    SyntheticWorldConfig,
)
from .queries import _matches
from .shapes import _cell_name, _object_record, _Shape


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
    """Gold reasoning: candidates -> deciding comparison -> answer (see the package docstring).
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


def _marked_chain_of_thought(
    query: dict[str, Any], shapes: list[_Shape], targets: list[int], image_size: int
) -> str:
    """The "scene_marked" reasoning of a family in `MARKED_FAMILIES`: the scene, each object
    followed by "is" (a target) or "not", then the answer (function first says what its word
    means)."""
    chosen = set(targets)
    items = [
        f"{_description([_object_record(s)], image_size)} {'is' if i in chosen else 'not'}"
        for i, s in enumerate(shapes)
    ]
    answer = " , ".join(_name(shapes[i]) for i in targets) or "none"
    head = ""
    if query["family"] == "function":
        head = f"{query['function_word']} means {query['kind'] or query['colour']} . "
    return f"{head}scene : {' , '.join(items)} . answer : {answer}"


def _response(cot: str, cfg: SyntheticWorldConfig) -> str:
    answer = " ".join([REF_TOKEN] * cfg.num_slots)
    prefix = f"{cfg.answer_prefix.strip()} " if cfg.answer_prefix.strip() else ""
    return f"{THINK_START} {cot} {THINK_END} {prefix}{answer}"


def _description(objects: list[dict[str, Any]], size: int) -> str:
    """Every object record (`_object_record`, left to right) as "{size} {colour} {kind} at
    {cell}", comma-separated."""
    return " , ".join(
        f"{o['size']} {o['colour']} {o['kind']} at {_cell_name(*o['center'], size)}"
        for o in objects
    )


def word_vocabulary(config: SyntheticWorldConfig) -> list[str]:
    """Every whitespace-separated word that instructions and responses can contain (sorted).

    Built from the templates, so a tokenizer can be given a closed vocabulary.
    """
    words: set[str] = {REF_TOKEN, THINK_START, THINK_END, ":", ",", ".", "answer", "none"}
    words |= set(config.answer_prefix.split())
    words |= {"the", "shape", "shapes", "all", "only", "that", "is", "not", "a", "it", "at"}
    words |= {"scene"} if config.cot_style in ("scene_first", "scene_marked") else set()
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
