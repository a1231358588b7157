"""What an instruction means: the structured query of each family, its answer set in a scene
(`_resolve`, the one source of truth), and the proposals of scenes plus queries per family."""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import (
    COLOUR_FUNCTIONS,
    FAMILIES,
    KIND_FUNCTIONS,
    RELATIONS,
    SIZES,
    SyntheticWorldConfig,
)
from .shapes import _place, _Shape

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
