"""Attribution that adds up: how much of a slot's mask each (token, concept) pair carries.

A slot's raw weight on a concept (attention x activation, `trace.slot_concept_totals`) says
what the slot looked at, not what its mask needs. Here each pair is scored by its
contribution to the mask itself: integrated gradients of a slot's *mask score* with respect
to the pair's activation, along the straight path from "no concept active" to the actual
codes. The mask score of slot k is the mean mask logit on the unedited mask minus the mean
mask logit elsewhere (on the valid image area), so a pair that supports the mask gets a
positive share. By the completeness of integrated gradients the shares add up to the score
of the actual codes minus the score with every concept removed (`PairAttribution.completeness_gap`
says how close the Riemann sum came). A concept's attribution is the sum over its pairs,
because removing a concept removes all of its pairs.

`deletion_curves` checks the ranking causally: concepts are removed (zeroed in the sparse
codes, everything else frozen, as `ablate_concepts` does) one more at a time in the
explained order and in random orders, and the IoU of the slot's mask with its unedited mask
is recorded for k = 1..max_k. Its area (mean of 1 - IoU over k) is large when the named
concepts carry the mask.

Both run only the part of the model after the SAE (query codebook, slot mapper, SAM's
prompt encoder and mask decoder) on the codes, `<REF_POS>` states and image embedding of
one frozen forward: an edit of the codes leaves everything before them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..modeling_segcompass import SegCompassOutput
from ..precision import floating_dtype
from ..query_codebook import codebook_token_mask
from ..vlm_states import fill_outside_image
from .edits import _reference_output
from .trace import _check_inputs, _valid_area, slot_concept_totals


@dataclass
class _Frozen:
    """What the part after the SAE reads, from one unedited forward (all on the model's device)."""

    indices: torch.Tensor  # (B, L, n)
    values: torch.Tensor  # (B, L, n)
    attention_mask: torch.Tensor  # (B, L)
    ref_states: torch.Tensor  # (B, K, d)
    image_embeddings: torch.Tensor  # (B, C, E, E)
    valid: torch.Tensor  # (B, M, M) bool, the image area
    fill_valid: torch.Tensor | None  # what forward gave `fill_outside_image`
    mask: torch.Tensor  # (B, K, M, M) bool, the unedited masks


def _freeze(model: Any, inputs: Mapping[str, Any], output: SegCompassOutput) -> _Frozen:
    device = next(model.parameters()).device
    batch = inputs["input_ids"].shape[0]
    mask_logits = output.mask_logits.detach()
    valid = _valid_area(inputs, batch, mask_logits.shape[-1]).to(device)
    attention = inputs.get("attention_mask")
    if attention is None:
        attention = torch.ones_like(inputs["input_ids"])
    fill = inputs.get("valid_mask")
    return _Frozen(
        indices=output.concept_indices.detach().to(device),
        values=output.concept_values.detach().to(device),
        # the tokens the codebook read (config.codebook_span_start_token_id)
        attention_mask=codebook_token_mask(model.config, inputs["input_ids"], attention).to(device),
        ref_states=output.ref_hidden_states.detach().to(device),
        image_embeddings=output.image_embeddings.detach().to(device),
        valid=valid,
        fill_valid=None if fill is None else fill.to(device),
        mask=(mask_logits.to(device) > model.config.mask_threshold) & valid.unsqueeze(1),
    )


def decode_from_codes(
    model: Any,
    frozen: _Frozen,
    rows: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, K, M, M) mask logits of samples ``rows`` with the given codes (differentiable)."""
    cfg = model.config
    indices = frozen.indices[rows] if indices is None else indices
    book = model.codebook(indices, values, frozen.attention_mask[rows], sparse=cfg.sparse_codebook)
    embeddings = frozen.image_embeddings[rows].to(floating_dtype(model.mask_decoder))
    refs = frozen.ref_states[rows]
    if not getattr(cfg, "slot_mapper_ref_input", True):
        refs = torch.zeros_like(refs)
    mapped = model.slot_mapper(book.slots, refs, embeddings)
    fill_valid = None if frozen.fill_valid is None else frozen.fill_valid[rows]
    prompts = fill_outside_image(mapped.heatmap_logits, fill_valid, cfg.heatmap_outside_fill)
    masks, _ = model.decode_masks(prompts, embeddings)
    return masks


def _mask_score(logits: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(R,) mean logit on the reference mask minus the mean logit on the rest of the valid area."""
    inside = (reference & valid).float()
    outside = (~reference & valid).float()
    logits = logits.float()
    mean_in = (logits * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1)
    mean_out = (logits * outside).flatten(1).sum(1) / outside.flatten(1).sum(1).clamp_min(1)
    return mean_in - mean_out


@dataclass
class PairAttribution:
    """Integrated-gradients attribution of slots' masks to their (token, concept) pairs.

    Attributes:
        slots: the (sample, slot) pairs attributed, in order.
        pairs: (P, L, n) attribution of each (token, concept) pair of the sample to the slot's
            mask score (positive: the pair supports the mask).
        concepts: (P, d_sae) the same summed per latent.
        score: (P,) the mask score with the actual codes; empty_score: with every concept
            removed. ``pairs[p].sum()`` approximates ``score - empty_score``.
        steps: Riemann steps of the path integral.
    """

    slots: list[tuple[int, int]]
    pairs: torch.Tensor
    concepts: torch.Tensor
    score: torch.Tensor
    empty_score: torch.Tensor
    steps: int

    @property
    def completeness_gap(self) -> torch.Tensor:
        """(P,) |sum of attributions - (score - empty_score)| / max(|score - empty_score|, 1e-6)."""
        delta = self.score - self.empty_score
        return (self.pairs.flatten(1).sum(1) - delta).abs() / delta.abs().clamp_min(1e-6)

    def ranking(self, p: int, top: int | None = None) -> list[int]:
        """Latents of slot entry `p` by attribution, largest first (only those > 0)."""
        totals = self.concepts[p]
        count = int((totals > 0).sum()) if top is None else min(top, int((totals > 0).sum()))
        return totals.topk(count).indices.tolist() if count else []


def measured_slots(
    model: Any, inputs: Mapping[str, Any], output: SegCompassOutput, *, matched: bool = True
) -> list[tuple[int, int]]:
    """The (sample, slot) pairs worth explaining: a non-empty mask and, with `matched` and
    ground truth in the inputs, a slot matched to a target object."""
    frozen_mask = (output.mask_logits.detach().cpu() > model.config.mask_threshold) & _valid_area(
        inputs, inputs["input_ids"].shape[0], output.mask_logits.shape[-1]
    ).unsqueeze(1)
    nonempty = frozen_mask.flatten(2).any(-1)  # (B, K)
    if matched and output.slot_to_target is not None:
        nonempty &= output.slot_to_target.cpu() >= 0
    return [(int(b), int(k)) for b, k in nonempty.nonzero().tolist()]


def attribute_pairs(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput | None = None,
    *,
    slots: Sequence[tuple[int, int]] | None = None,
    steps: int = 16,
    chunk_size: int = 8,
) -> PairAttribution:
    """Integrated gradients of each slot's mask score with respect to its sample's activations.

    Args:
        model: a `SegCompassForReasoningSegmentation` (run in eval mode, weights untouched).
        inputs: a processor batch (with ``gt_masks`` the default slots are those matched to
            a target).
        output: the unedited forward on `inputs` (computed when None).
        slots: (sample, slot) pairs to attribute (default: `measured_slots`).
        steps: midpoint Riemann steps from the empty codes to the actual ones (>= 1).
        chunk_size: slots attributed per backward pass.
    """
    _check_inputs(inputs, "attribute_pairs")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"attribute_pairs: steps must be an int >= 1, got {steps!r}.")
    output = _reference_output(model, inputs, output)
    slots = list(measured_slots(model, inputs, output) if slots is None else slots)
    frozen = _freeze(model, inputs, output)
    d_sae = int(model.config.d_sae)
    was_training = model.training
    model.eval()
    pair_parts, scores, empties = [], [], []
    try:
        for start in range(0, len(slots), chunk_size):
            part = slots[start : start + chunk_size]
            rows = torch.tensor([b for b, _ in part], device=frozen.values.device)
            ks = torch.tensor([k for _, k in part], device=frozen.values.device)
            reference = frozen.mask[rows, ks]
            valid = frozen.valid[rows]
            values = frozen.values[rows].float()
            grad_sum = torch.zeros_like(values)
            for s in range(steps):
                # alpha = u^3 at midpoints u: denser steps near the empty codes, where a
                # trained readout switches (d alpha = 3 u^2 du)
                u = (s + 0.5) / steps
                scaled = (u**3 * values).requires_grad_(True)
                logits = decode_from_codes(model, frozen, rows, scaled)
                score = _mask_score(logits[torch.arange(len(part)), ks], reference, valid)
                (grad,) = torch.autograd.grad(score.sum(), scaled)
                grad_sum += 3 * u**2 * grad
            pair_parts.append((values * grad_sum / steps).detach().cpu())
            with torch.no_grad():
                for codes, out in ((values, scores), (torch.zeros_like(values), empties)):
                    logits = decode_from_codes(model, frozen, rows, codes)
                    out.append(
                        _mask_score(logits[torch.arange(len(part)), ks], reference, valid).cpu()
                    )
    finally:
        model.train(was_training)
    pairs = torch.cat(pair_parts) if pair_parts else torch.zeros(0, *frozen.values.shape[1:])
    concepts = torch.zeros(len(slots), d_sae)
    for p, (b, _) in enumerate(slots):
        concepts[p].index_add_(0, frozen.indices[b].cpu().flatten(), pairs[p].flatten())
    empty = torch.zeros(0)
    return PairAttribution(
        slots=slots,
        pairs=pairs,
        concepts=concepts,
        score=torch.cat(scores) if scores else empty,
        empty_score=torch.cat(empties) if empties else empty,
        steps=steps,
    )


@torch.no_grad()
def occlusion_effects(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput | None = None,
    *,
    slots: Sequence[tuple[int, int]] | None = None,
    chunk_size: int = 64,
) -> PairAttribution:
    """Each active concept's causal effect on each slot's mask score: the score's drop when
    that concept alone is removed (all its pairs zeroed, everything else frozen).

    One edited decode per (sample, active concept) gives the drop for every slot of the
    sample at once. Returned as a `PairAttribution` whose ``concepts`` hold the drops and whose
    ``pairs`` split each concept's drop over its pairs in proportion to their activation;
    ``score`` is the unedited score and ``empty_score`` the score with every concept removed.
    """
    _check_inputs(inputs, "occlusion_effects")
    output = _reference_output(model, inputs, output)
    slots = list(measured_slots(model, inputs, output) if slots is None else slots)
    frozen = _freeze(model, inputs, output)
    d_sae = int(model.config.d_sae)
    device = frozen.values.device
    samples = sorted({b for b, _ in slots})
    jobs: list[tuple[int, int]] = []  # (sample, latent); latent -1: no edit, -2: all removed
    for b in samples:
        active = frozen.indices[b][frozen.values[b] != 0].unique().tolist()
        jobs += [(b, -1), (b, -2)] + [(b, latent) for latent in active]
    was_training = model.training
    model.eval()
    scores: dict[tuple[int, int], torch.Tensor] = {}  # (sample, latent) -> (K,) scores
    try:
        for start in range(0, len(jobs), chunk_size):
            part = jobs[start : start + chunk_size]
            rows = torch.tensor([b for b, _ in part], device=device)
            latents = torch.tensor([c for _, c in part], device=device)
            indices, values = frozen.indices[rows], frozen.values[rows]
            kill = (indices == latents[:, None, None]) | (latents == -2)[:, None, None]
            logits = decode_from_codes(model, frozen, rows, values.masked_fill(kill, 0), indices)
            k = logits.shape[1]
            flat = _mask_score(
                logits.flatten(0, 1),
                frozen.mask[rows].flatten(0, 1),
                frozen.valid[rows].repeat_interleave(k, 0),
            ).view(len(part), k)
            for e, job in enumerate(part):
                scores[job] = flat[e].cpu()
    finally:
        model.train(was_training)
    concepts = torch.zeros(len(slots), d_sae)
    pairs = torch.zeros(len(slots), *frozen.values.shape[1:])
    for p, (b, k) in enumerate(slots):
        base = scores[(b, -1)][k]
        values, indices = frozen.values[b].cpu(), frozen.indices[b].cpu()
        for (sample, latent), score in scores.items():
            if sample != b or latent < 0:
                continue
            drop = float(base - score[k])
            concepts[p, latent] = drop
            hit = (indices == latent) & (values != 0)
            pairs[p][hit] = drop * values[hit] / values[hit].sum()
    return PairAttribution(
        slots=slots,
        pairs=pairs,
        concepts=concepts,
        score=torch.stack([scores[(b, -1)][k] for b, k in slots]) if slots else torch.zeros(0),
        empty_score=torch.stack([scores[(b, -2)][k] for b, k in slots])
        if slots
        else torch.zeros(0),
        steps=0,
    )


def greedy_deletion_order(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput | None = None,
    *,
    slots: Sequence[tuple[int, int]] | None = None,
    max_k: int = 16,
    chunk_size: int = 8,
) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Each slot's concepts in the order that removes its mask fastest, found greedily.

    Step j takes gradient x activation of the slot's mask score on the codes with the first
    j - 1 concepts already removed, summed per concept, and removes the concept that supports
    the mask most; so a concept whose work another one takes over once the first is gone
    (the same word on two tokens, two latents of one word) is found at the step it matters.
    One forward and backward per step: the cost of `attribute_pairs` with ``steps=max_k``.

    Returns:
        (slots, orders): the (sample, slot) pairs and, for each, up to `max_k` latent ids.
    """
    _check_inputs(inputs, "greedy_deletion_order")
    output = _reference_output(model, inputs, output)
    slots = list(measured_slots(model, inputs, output) if slots is None else slots)
    frozen = _freeze(model, inputs, output)
    d_sae = int(model.config.d_sae)
    device = frozen.values.device
    orders: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(slots), chunk_size):
            part = slots[start : start + chunk_size]
            rows = torch.tensor([b for b, _ in part], device=device)
            ks = torch.tensor([k for _, k in part], device=device)
            arange = torch.arange(len(part), device=device)
            reference, valid = frozen.mask[rows, ks], frozen.valid[rows]
            indices, values = frozen.indices[rows], frozen.values[rows].float()
            flat = indices.flatten(1)  # (P, L*n)
            chosen: list[list[int]] = [[] for _ in part]
            for _ in range(max_k):
                live = (values != 0).flatten(1)
                if not live.any():
                    break
                codes = values.clone().requires_grad_(True)
                logits = decode_from_codes(model, frozen, rows, codes, indices)
                score = _mask_score(logits[arange, ks], reference, valid)
                (grad,) = torch.autograd.grad(score.sum(), codes)
                contribution = (codes.detach() * grad).flatten(1)
                per_latent = torch.zeros(len(part), d_sae, device=device)
                per_latent.scatter_add_(1, flat, contribution)
                active = torch.zeros(len(part), d_sae, dtype=torch.bool, device=device)
                active.scatter_(1, flat, live)
                per_latent = per_latent.masked_fill(~active, float("-inf"))
                pick = per_latent.argmax(1)  # (P,)
                for p in range(len(part)):
                    if bool(active[p].any()):
                        chosen[p].append(int(pick[p]))
                kill = (indices == pick[:, None, None]) & active[arange, pick][:, None, None]
                values = values.masked_fill(kill, 0)
            orders += chosen
    finally:
        model.train(was_training)
    return slots, orders


@dataclass
class DeletionCurves:
    """Mask IoU with the unedited mask as a slot's concepts are removed, k = 1..max_k.

    Attributes:
        slots: the (sample, slot) pairs measured.
        orders: name -> (P, max_k) IoU after removing the first k concepts of that order
            (e.g. "attribution", "weight").
        random: (P, draws, max_k) the same for random orders of the sample's active concepts.
        removed: name -> the concept ids of each slot's order (P lists of max_k or fewer).
    """

    slots: list[tuple[int, int]]
    orders: dict[str, torch.Tensor]
    random: torch.Tensor
    removed: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def max_k(self) -> int:
        return int(self.random.shape[-1])

    def area(self, name: str = "attribution") -> float:
        """Mean over slots and k = 1..max_k of 1 - IoU ("random" for the random orders)."""
        curve = self.random.mean(1) if name == "random" else self.orders[name]
        return float((1 - curve).mean()) if curve.numel() else float("nan")

    def change_at(self, k: int, name: str = "attribution") -> float:
        """Mean 1 - IoU after removing the first `k` concepts (k in 1..max_k)."""
        curve = self.random.mean(1) if name == "random" else self.orders[name]
        return float((1 - curve[:, k - 1]).mean()) if curve.numel() else float("nan")

    def mean_curve(self, name: str = "attribution") -> list[float]:
        curve = self.random.mean(1) if name == "random" else self.orders[name]
        return [float(v) for v in curve.mean(0)] if curve.numel() else []

    def to_dict(self) -> dict[str, Any]:
        names = [*self.orders, "random"]
        return {
            "num_slots": len(self.slots),
            "max_k": self.max_k,
            "mean_iou": {n: self.mean_curve(n) for n in names},
            "area": {n: self.area(n) for n in names},
            "change_at_8": {n: self.change_at(min(8, self.max_k), n) for n in names},
        }


@torch.no_grad()
def deletion_curves(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput | None = None,
    *,
    attribution: PairAttribution | None = None,
    orders: Sequence[str] = ("attribution", "weight"),
    method: str = "integrated_gradients",
    max_k: int = 16,
    random_draws: int = 3,
    seed: int = 0,
    steps: int = 16,
    chunk_size: int = 64,
) -> DeletionCurves:
    """Remove each measured slot's concepts in explained and in random order; mask IoU per k.

    Args:
        model, inputs, output: as `attribute_pairs`.
        attribution: a `PairAttribution` of these inputs (computed by `method` when None and
            "attribution" is among `orders`); its slots are the ones measured.
        method: "occlusion" (`occlusion_effects`) or "integrated_gradients" (`attribute_pairs`
            with `steps`).
        orders: any of "attribution" (integrated gradients, `attribute_pairs`), "weight"
            (the slot's raw weight, attention x activation) and "greedy"
            (`greedy_deletion_order`).
        max_k: removal steps (k = 1..max_k).
        random_draws: random orders per slot (drawn from the concepts active on the tokens
            the codebook reads: every token, or `codebook_span_start_token_id`'s span).
        seed: seeds the random orders.
        chunk_size: edited samples per decoder pass.
    """
    _check_inputs(inputs, "deletion_curves")
    unknown = sorted(set(orders) - {"attribution", "weight", "greedy"})
    if unknown or max_k < 1 or random_draws < 1:
        raise ValueError(
            f"deletion_curves: orders must be among ('attribution', 'weight', 'greedy') (got "
            f"{unknown}), "
            f"max_k >= 1 and random_draws >= 1 (got {max_k}, {random_draws})."
        )
    output = _reference_output(model, inputs, output)
    if attribution is None and "attribution" in orders:
        if method == "occlusion":
            attribution = occlusion_effects(model, inputs, output)
        elif method == "integrated_gradients":
            with torch.enable_grad():
                attribution = attribute_pairs(model, inputs, output, steps=steps)
        else:
            raise ValueError(
                f"deletion_curves: method must be 'occlusion' or 'integrated_gradients', got "
                f"{method!r}."
            )
    slots = attribution.slots if attribution is not None else measured_slots(model, inputs, output)
    frozen = _freeze(model, inputs, output)
    d_sae = int(model.config.d_sae)
    rng = np.random.default_rng(seed)
    removed: dict[str, list[list[int]]] = {name: [] for name in orders}
    if "greedy" in orders:
        with torch.enable_grad():
            _, greedy = greedy_deletion_order(model, inputs, output, slots=slots, max_k=max_k)
    random_orders: list[list[list[int]]] = []
    for p, (b, k) in enumerate(slots):
        # the concepts active on the tokens the codebook reads
        read = (frozen.values[b] != 0) & frozen.attention_mask[b].bool().unsqueeze(-1)
        active = frozen.indices[b][read].unique().cpu().tolist()
        for name in orders:
            if name == "attribution":
                removed[name].append(attribution.ranking(p, max_k))
            elif name == "greedy":
                removed[name].append(greedy[p])
            else:
                totals = slot_concept_totals(output, b, k, d_sae)
                count = min(max_k, int((totals > 0).sum()))
                removed[name].append(totals.topk(count).indices.tolist() if count else [])
        random_orders.append(
            [rng.permutation(active)[:max_k].tolist() for _ in range(random_draws)]
        )
    # one edited copy of a sample per (slot, order, k)
    jobs: list[tuple[int, int, list[int]]] = []  # (sample, slot, removed ids)
    for p, (b, k) in enumerate(slots):
        for name in orders:
            jobs += [(b, k, removed[name][p][:j]) for j in range(1, max_k + 1)]
        for draw in random_orders[p]:
            jobs += [(b, k, draw[:j]) for j in range(1, max_k + 1)]
    was_training = model.training
    model.eval()
    ious = []
    try:
        for start in range(0, len(jobs), chunk_size):
            part = jobs[start : start + chunk_size]
            rows = torch.tensor([b for b, _, _ in part], device=frozen.values.device)
            ks = torch.tensor([k for _, k, _ in part], device=frozen.values.device)
            kill = torch.zeros(len(part), d_sae, dtype=torch.bool, device=rows.device)
            for e, (_, _, ids) in enumerate(part):
                if ids:
                    kill[e, torch.tensor(ids, device=rows.device)] = True
            indices = frozen.indices[rows]
            values = frozen.values[rows].masked_fill(
                kill[torch.arange(len(part), device=rows.device)[:, None, None], indices], 0
            )
            logits = decode_from_codes(model, frozen, rows, values, indices)
            new = (
                logits[torch.arange(len(part)), ks] > model.config.mask_threshold
            ) & frozen.valid[rows]
            old = frozen.mask[rows, ks]
            inter = (new & old).flatten(1).sum(1).float()
            union = (new | old).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, inter / union.clamp_min(1), 1.0).cpu())
    finally:
        model.train(was_training)
    iou = torch.cat(ious) if ious else torch.zeros(0)
    per_slot = (len(orders) + random_draws) * max_k
    iou = iou.reshape(len(slots), per_slot) if len(slots) else iou.reshape(0, per_slot)
    curves = {name: iou[:, i * max_k : (i + 1) * max_k] for i, name in enumerate(orders)}
    random = iou[:, len(orders) * max_k :].reshape(len(slots), random_draws, max_k)
    return DeletionCurves(slots=list(slots), orders=curves, random=random, removed=removed)


__all__ = [
    "DeletionCurves",
    "PairAttribution",
    "attribute_pairs",
    "decode_from_codes",
    "deletion_curves",
    "greedy_deletion_order",
    "measured_slots",
    "occlusion_effects",
]
