"""Do a slot's named concepts carry its mask? Deletion curves and purity per query family.

`faithfulness_study` runs, on held-out rows with their gold reasoning (teacher-forced), for
every slot matched to a target object and holding a mask:

* the attribution of its mask to concepts (`attribution.occlusion_effects` by default);
* deletion curves: mask IoU with the unedited mask as its top-k concepts (k = 1..max_k) are
  removed, in the explained orders (integrated gradients; greedy gradient re-attribution after
  each removal), in the order of the raw slot weight, and in random orders of the sample's
  active concepts (`attribution.deletion_curves`);
* purity: the share of its first 8 concepts (in each order) whose label names an attribute
  of its target object (`labels.concepts_in_words`).

Reported per family of the synthetic world and overall.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .attribution import (
    DeletionCurves,
    _freeze,
    attribute_pairs,
    decode_from_codes,
    deletion_curves,
    measured_slots,
    occlusion_effects,
)
from .labels import ConceptWords
from .trace import _forward

# Orders in which a slot's concepts are removed: integrated gradients, greedy re-attribution
# after each removal, the raw slot weight (attention x activation).
ORDERS = ("attribution", "greedy", "weight")


def synthetic_target_words(row: Mapping[str, Any], target: int) -> set[str]:
    """Attribute words of target `target` of a synthetic-world row: colour, kind, size and
    the position words of its 3 x 3 cell (e.g. {"red", "circle", "small", "top", "left"})."""
    from ..data.synthetic.shapes import _cell_name

    obj = row["objects"][row["target_indices"][target]]
    size = int(np.asarray(row["image"]).shape[0])
    cell = _cell_name(*obj["center"], size)
    return {obj["colour"], obj["kind"], obj["size"], *cell.split()}


def concept_matches(words: ConceptWords | None, target: set[str]) -> bool:
    """A concept names the target when its attribute word is one of the target's words (for a
    visual concept: every position word of its image cell is one of them)."""
    if words is None or words.attribute is None:
        return False
    return set(words.attribute.split()) <= target


@dataclass
class FamilyFaithfulness:
    """One group of slots (a family, or all).

    Attributes:
        num_slots: slots measured.
        change_at_k: order name -> mean 1 - IoU after removing the top-`k` (``k`` of the study).
        area: order name -> deletion-curve area (mean of 1 - IoU over k = 1..max_k).
        purity: order name -> mean share of the top-8 concepts that name a target attribute
            (NaN without labels).
        mean_iou: order name -> the mean curve (IoU for k = 1..max_k).
        all_concepts_removed: mean 1 - IoU with every concept removed (the most a concept
            explanation can carry).
        no_text: mean 1 - IoU with every concept and the `<REF_POS>` states removed (the most
            the reasoning can move the mask at all).
    """

    num_slots: int
    change_at_k: dict[str, float]
    area: dict[str, float]
    purity: dict[str, float]
    mean_iou: dict[str, list[float]]
    all_concepts_removed: float = float("nan")
    no_text: float = float("nan")

    def area_ratio(self, name: str = "attribution") -> float:
        random = self.area.get("random", float("nan"))
        return self.area[name] / random if random > 0 else float("inf")


@dataclass
class FaithfulnessStudy:
    """`faithfulness_study`'s result: per family and overall ("all")."""

    k: int
    max_k: int
    method: str
    families: dict[str, FamilyFaithfulness]
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "max_k": self.max_k,
            "method": self.method,
            "families": {
                name: {
                    "num_slots": f.num_slots,
                    f"change_at_{self.k}": f.change_at_k,
                    "area": f.area,
                    "area_ratio": {n: f.area_ratio(n) for n in f.area if n != "random"},
                    "purity": f.purity,
                    "all_concepts_removed": f.all_concepts_removed,
                    "no_text": f.no_text,
                    "mean_iou": f.mean_iou,
                }
                for name, f in self.families.items()
            },
        }


def _summarise(
    curves: DeletionCurves,
    picks: list[int],
    purity: dict[str, list[float]],
    k: int,
    bounds: list[tuple[float, float]],
) -> FamilyFaithfulness:
    names = [*curves.orders, "random"]

    def curve(name: str) -> torch.Tensor:
        c = curves.random.mean(1) if name == "random" else curves.orders[name]
        return c[picks]

    return FamilyFaithfulness(
        num_slots=len(picks),
        change_at_k={n: float((1 - curve(n)[:, k - 1]).mean()) for n in names},
        area={n: float((1 - curve(n)).mean()) for n in names},
        purity={
            n: float(np.mean([purity[n][p] for p in picks])) if purity.get(n) else float("nan")
            for n in curves.orders
        },
        mean_iou={n: [float(v) for v in curve(n).mean(0)] for n in names},
        all_concepts_removed=float(np.mean([bounds[p][0] for p in picks])),
        no_text=float(np.mean([bounds[p][1] for p in picks])),
    )


@torch.no_grad()
def _text_bounds(
    model: Any, inputs: Mapping[str, Any], output: Any, slots: Sequence[tuple[int, int]]
) -> np.ndarray:
    """(P, 2) 1 - IoU of each slot's mask with every concept removed, and with every concept
    and the `<REF_POS>` states removed (the most any edit of the reasoning side can do)."""
    frozen = _freeze(model, inputs, output)
    rows = torch.arange(frozen.values.shape[0], device=frozen.values.device)
    zero = torch.zeros_like(frozen.values)
    was_training = model.training
    model.eval()
    try:
        no_concepts = decode_from_codes(model, frozen, rows, zero)
        refs = frozen.ref_states
        frozen.ref_states = torch.zeros_like(refs)
        no_text = decode_from_codes(model, frozen, rows, zero)
        frozen.ref_states = refs
    finally:
        model.train(was_training)
    out = np.zeros((len(slots), 2))
    for p, (b, k) in enumerate(slots):
        old = frozen.mask[b, k]
        for j, logits in enumerate((no_concepts, no_text)):
            new = (logits[b, k] > model.config.mask_threshold) & frozen.valid[b]
            union = int((new | old).sum())
            out[p, j] = 1.0 - (int((new & old).sum()) / union if union else 1.0)
    return out


def faithfulness_study(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    processor: Any,
    *,
    words: Mapping[int, ConceptWords] | None = None,
    target_words: Callable[[Mapping[str, Any], int], set[str]] = synthetic_target_words,
    family: Callable[[Mapping[str, Any]], str] = lambda row: str(row.get("family", "all")),
    method: str = "integrated_gradients",
    orders: Sequence[str] = ORDERS,
    k: int = 8,
    max_k: int = 16,
    random_draws: int = 3,
    seed: int = 0,
    batch_size: int = 16,
) -> FaithfulnessStudy:
    """Deletion curves and purity of every matched slot of `rows`, per family.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        rows: dataset rows with ``image``, ``instruction``, ``response`` (the gold reasoning,
            teacher-forced) and ``masks``; synthetic-world rows also give ``family``,
            ``objects`` and ``target_indices``.
        processor: the model's `SegCompassProcessor`.
        words: latent -> `ConceptWords` (`labels.concepts_in_words`); None skips purity.
        target_words: the attribute words of a row's target j.
        family: a row's group name.
        method: "occlusion" or "integrated_gradients": the attribution of the "attribution"
            order.
        orders: the explained orders measured (`ORDERS` or a subset; random is always).
        k: the removal size reported on its own (1 <= k <= max_k).
        max_k, random_draws, seed: as `attribution.deletion_curves`.
        batch_size: rows per forward.
    """
    if not 1 <= k <= max_k:
        raise ValueError(f"faithfulness_study: expected 1 <= k <= max_k, got k={k}, max_k={max_k}.")
    if method not in ("occlusion", "integrated_gradients"):
        raise ValueError(
            f"faithfulness_study: method must be 'occlusion' or 'integrated_gradients', got "
            f"{method!r}."
        )
    all_curves: list[DeletionCurves] = []
    records: list[dict[str, Any]] = []
    purity: dict[str, list[float]] = {name: [] for name in orders}
    for start in range(0, len(rows), batch_size):
        part = list(rows[start : start + batch_size])
        inputs = processor(
            [r["image"] for r in part],
            [r["instruction"] for r in part],
            responses=[r["response"] for r in part],
            masks=[r["masks"] for r in part],
        )
        output = _forward(model, inputs, targets=True)
        slots = measured_slots(model, inputs, output)
        if not slots:
            continue
        bounds = _text_bounds(model, inputs, output, slots)
        attribution = None
        if "attribution" in orders and method == "occlusion":
            attribution = occlusion_effects(model, inputs, output, slots=slots)
        elif "attribution" in orders:
            attribution = attribute_pairs(model, inputs, output, slots=slots)
        curves = deletion_curves(
            model, inputs, output, attribution=attribution, max_k=max_k,
            random_draws=random_draws, seed=seed + start, orders=orders,
        )  # fmt: skip
        all_curves.append(curves)
        for p, (b, slot) in enumerate(slots):
            row = part[b]
            target = int(output.slot_to_target[b, slot])
            named = target_words(row, target) if words is not None else set()
            ranked = {name: curves.removed[name][p][:8] for name in orders}
            for name, ids in ranked.items():
                if words is not None:
                    share = (
                        np.mean([concept_matches(words.get(i), named) for i in ids]) if ids else 0.0
                    )
                    purity[name].append(float(share))
            records.append(
                {
                    "all_concepts_removed": bounds[p, 0],
                    "no_text": bounds[p, 1],
                    "row": start + b,
                    "slot": slot,
                    "family": family(row),
                    "target_words": sorted(named),
                    "top_concepts": ranked,
                }
            )
    if not all_curves:
        raise ValueError("faithfulness_study: no slot holds a mask matched to a target.")
    merged = DeletionCurves(
        slots=[s for c in all_curves for s in c.slots],
        orders={n: torch.cat([c.orders[n] for c in all_curves]) for n in all_curves[0].orders},
        random=torch.cat([c.random for c in all_curves]),
    )
    for p, record in enumerate(records):
        for name in orders:
            record[f"iou_{name}"] = [float(v) for v in merged.orders[name][p]]
        record["iou_random"] = [float(v) for v in merged.random[p].mean(0)]
    bounds_all = [(r["all_concepts_removed"], r["no_text"]) for r in records]
    groups: dict[str, list[int]] = {"all": list(range(len(records)))}
    for p, record in enumerate(records):
        groups.setdefault(record["family"], []).append(p)
    return FaithfulnessStudy(
        k=k,
        max_k=max_k,
        method=method,
        families={
            name: _summarise(merged, picks, purity, k, bounds_all) for name, picks in groups.items()
        },
        records=records,
    )


__all__ = [
    "FaithfulnessStudy",
    "FamilyFaithfulness",
    "concept_matches",
    "faithfulness_study",
    "synthetic_target_words",
]
