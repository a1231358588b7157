"""Causal tests of the concept trace: remove (or swap) concepts and measure the masks.

* `ablate_concepts`: zero or swap chosen latents with everything else frozen.
* `rank_concepts_by_effect`: a sample's active concepts ranked by that causal effect.
* `mask_prompt_dependence`: how far a mask can move through its heatmap prompt at all.
* `concept_ablation_study`: each slot's top concepts removed against as many random active
  ones, with a one-sided Wilcoxon signed-rank test (the causal check that the concept
  trace of arXiv 2605.22658 calls for).

The measures of change are `edits.CHANGE_MEASURES`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..modeling_segcompass import SegCompassOutput
from .edits import CHANGE_MEASURES, _changes, _gt_iou, _reference_output, _run_edits
from .labels import ConceptLabels
from .trace import (
    _active_latents,
    _check_inputs,
    _nan_to_none,
    _nan_to_none_dict,
    _valid_area,
    slot_concept_totals,
    top_concepts,
)

logger = logging.getLogger(__name__)


@dataclass
class AblationResult:
    """Masks with some concepts removed (or swapped), everything else frozen.

    B = batch, K = slots, M = mask grid side.

    Attributes:
        concept_ids: per row, the latents zeroed.
        swaps: per row, the latent renames ``{old: new}`` applied.
        mask_logits: (B, K, M, M) mask logits after the edit.
        heatmap_logits: (B, K, M, M) heatmap logits after the edit.
        conf_logits: (B, K) confidence logits after the edit.
        masks, original_masks: (B, K, M, M) bool masks after / before.
        mask_iou_to_original: (B, K) IoU of the new mask with the unedited one (1 = unchanged).
        mask_change: (B, K) 1 - mask_iou_to_original.
        soft_mask_change: (B, K) 1 - soft IoU (sum min / sum max) of the sigmoid masks: moves
            when the mask probabilities move although no pixel crosses the threshold.
        mask_logit_change: (B, K) mean |mask logit change| over the valid area (does not
            saturate far from the threshold, where the sigmoid does).
        prob_change: (B, K) mean |sigmoid change| of the mask over the valid area.
        heatmap_change: (B, K) mean |heatmap logit change|: how far the prompt SAM receives
            moved. A large heatmap change with ~0 mask change means the mask decoder does
            not follow its prompt (see `mask_prompt_dependence`).
        conf_change: (B, K) change of the sigmoid confidence.
        gt_iou_before, gt_iou_after: (B, K) IoU with the slot's matched ground-truth mask
            (needs ``gt_masks`` in the inputs; NaN for slots without a target).
        iou_change: (B, K) gt_iou_after - gt_iou_before.
    """

    concept_ids: list[list[int]]
    swaps: list[dict[int, int]]
    mask_logits: torch.Tensor
    heatmap_logits: torch.Tensor
    conf_logits: torch.Tensor
    masks: torch.Tensor
    original_masks: torch.Tensor
    mask_iou_to_original: torch.Tensor
    mask_change: torch.Tensor
    soft_mask_change: torch.Tensor
    mask_logit_change: torch.Tensor
    prob_change: torch.Tensor
    heatmap_change: torch.Tensor
    conf_change: torch.Tensor
    gt_iou_before: torch.Tensor
    gt_iou_after: torch.Tensor
    iou_change: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept_ids": self.concept_ids,
            "swaps": [{str(a): b for a, b in s.items()} for s in self.swaps],
            "mask_iou_to_original": self.mask_iou_to_original.tolist(),
            "mask_change": self.mask_change.tolist(),
            "soft_mask_change": self.soft_mask_change.tolist(),
            "mask_logit_change": self.mask_logit_change.tolist(),
            "prob_change": self.prob_change.tolist(),
            "heatmap_change": self.heatmap_change.tolist(),
            "conf_change": self.conf_change.tolist(),
            "gt_iou_before": _nan_to_none(self.gt_iou_before.tolist()),
            "gt_iou_after": _nan_to_none(self.gt_iou_after.tolist()),
            "iou_change": _nan_to_none(self.iou_change.tolist()),
        }


def ablate_concepts(
    model: Any,
    inputs: Mapping[str, Any],
    concept_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    top_n: int | None = None,
    slot: int | None = None,
    swap: Mapping[int, int] | None = None,
    output: SegCompassOutput | None = None,
) -> AblationResult:
    """Zero (or swap) chosen latents in the sparse codes and measure how the masks move.

    Everything else is frozen: same inputs, the unedited forward's image embedding, eval mode,
    no grad; the model's ``edit_concepts`` hook edits the codes before the query codebook.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        inputs: processor batch (prompt + completion). With ``gt_masks`` the IoU with the
            ground truth is reported before and after (slots matched as in the loss).
        concept_ids: latents to zero, the same for every row, or one list per row.
        top_n: instead of ids, zero each row's top-n concepts of `slot` (of every slot with a
            `<REF_POS>` token, weights summed, when `slot` is None).
        swap: ``{old: new}``: every activation of latent `old` is given to latent `new`.
            Can be combined with `concept_ids`.
        output: the unedited output on `inputs` (computed when None).

    Returns:
        `AblationResult`.
    """
    _check_inputs(inputs, "ablate_concepts")
    if concept_ids is None and top_n is None and not swap:
        raise ValueError(
            "ablate_concepts: say what to remove: concept_ids=[...], top_n=N or swap={old: new}."
        )
    if concept_ids is not None and top_n is not None:
        raise ValueError("ablate_concepts: pass concept_ids or top_n, not both.")
    if slot is not None and not 0 <= slot < model.config.num_slots:
        raise ValueError(
            f"ablate_concepts: slot must lie in [0, {model.config.num_slots}), got {slot}."
        )
    output = _reference_output(model, inputs, output)
    batch = inputs["input_ids"].shape[0]
    if top_n is not None:
        if top_n < 1:
            raise ValueError(f"ablate_concepts: top_n must be >= 1, got {top_n}.")
        zero = []
        for b in range(batch):
            slots = [slot] if slot is not None else output.ref_mask[b].nonzero().flatten().tolist()
            totals = sum(
                (slot_concept_totals(output, b, k, model.config.d_sae) for k in slots),
                torch.zeros(1),
            )
            count = min(top_n, int((totals > 0).sum())) if len(slots) else 0
            zero.append(totals.topk(count).indices.tolist() if count else [])
    elif concept_ids is None:
        zero = [[] for _ in range(batch)]
    elif len(concept_ids) and not isinstance(concept_ids[0], (int, np.integer)):
        if len(concept_ids) != batch:
            raise ValueError(
                f"ablate_concepts: got {len(concept_ids)} per-row concept lists for {batch} rows."
            )
        zero = [[int(i) for i in ids] for ids in concept_ids]
    else:
        zero = [[int(i) for i in concept_ids] for _ in range(batch)]
    swaps = [{int(a): int(c) for a, c in (swap or {}).items()} for _ in range(batch)]
    rows = list(range(batch))
    new_masks, new_heat, new_conf = _run_edits(model, inputs, output, rows, zero, swaps)
    threshold = model.config.mask_threshold
    valid = _valid_area(inputs, batch, new_masks.shape[-1])
    moved = _changes(output, new_masks, new_heat, new_conf, rows, valid, threshold)
    before = _gt_iou(output, output.mask_logits, inputs, rows, threshold)
    after = _gt_iou(output, new_masks, inputs, rows, threshold)
    return AblationResult(
        concept_ids=zero,
        swaps=swaps,
        mask_logits=new_masks,
        heatmap_logits=new_heat,
        conf_logits=new_conf,
        masks=new_masks > threshold,
        original_masks=output.mask_logits.cpu() > threshold,
        mask_iou_to_original=1.0 - moved["mask_change"],
        **moved,
        gt_iou_before=before,
        gt_iou_after=after,
        iou_change=after - before,
    )


@dataclass
class ConceptEffect:
    """The causal effect of removing one concept (alone) from one sample.

    Attributes:
        latent_id: the latent; weight: its weight in the measured slot(s).
        label: its name (None without labels).
        mask_change: 1 - IoU of the new mask with the unedited one.
        soft_mask_change: 1 - soft IoU of the sigmoid masks.
        mask_logit_change: mean |mask logit change|.
        prob_change: mean |sigmoid change| of the mask.
        heatmap_change: mean |heatmap logit change|.
        conf_change: change of the sigmoid confidence.
    """

    latent_id: int
    weight: float
    label: str | None
    mask_change: float
    soft_mask_change: float
    mask_logit_change: float
    prob_change: float
    heatmap_change: float
    conf_change: float


@dataclass
class ConceptRanking:
    """A sample's concepts ranked by causal effect (largest first).

    Attributes:
        sample: row in the batch; slots: the slots measured (effects averaged over them).
        effects: one `ConceptEffect` per candidate, sorted by (mask_change, soft_mask_change,
            mask_logit_change): the binary change first, the continuous ones break its ties
            (with binary-stable masks every mask_change is 0).
    """

    sample: int
    slots: list[int]
    effects: list[ConceptEffect]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_concepts_by_effect(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    slot: int | None = None,
    max_candidates: int = 32,
    concept_labels: ConceptLabels | None = None,
    output: SegCompassOutput | None = None,
    chunk_size: int = 16,
) -> list[ConceptRanking]:
    """Ablate each active concept alone and rank the concepts by how much the mask moves.

    The candidates are each sample's active latents, the `max_candidates` with the largest
    weight in the measured slot(s) (`slot`, or every slot with a `<REF_POS>` token). All the
    edited copies of a sample run batched (`chunk_size` rows per forward). The ranking key is
    (mask_change, soft_mask_change, mask_logit_change), so that concepts are still ordered by
    their effect on the mask when no pixel crosses the threshold.
    """
    _check_inputs(inputs, "rank_concepts_by_effect")
    output = _reference_output(model, inputs, output)
    batch = inputs["input_ids"].shape[0]
    threshold = model.config.mask_threshold
    valid = _valid_area(inputs, batch, output.mask_logits.shape[-1])
    rankings = []
    for b in range(batch):
        slots = [slot] if slot is not None else output.ref_mask[b].nonzero().flatten().tolist()
        if not slots:
            rankings.append(ConceptRanking(b, [], []))
            continue
        totals = sum(
            (slot_concept_totals(output, b, k, model.config.d_sae) for k in slots), torch.zeros(1)
        )
        count = min(max_candidates, int((totals > 0).sum()))
        top = totals.topk(count)
        candidates, cand_weights = top.indices.tolist(), top.values.tolist()
        rows = [b] * len(candidates)
        new_masks, new_heat, new_conf = _run_edits(
            model, inputs, output, rows, [[c] for c in candidates], chunk_size=chunk_size
        )
        moved = _changes(output, new_masks, new_heat, new_conf, rows, valid, threshold)
        effects = [
            ConceptEffect(
                latent_id=c,
                weight=w,
                label=concept_labels.label(c) if concept_labels is not None else None,
                **{name: float(moved[name][e, slots].mean()) for name in CHANGE_MEASURES},
            )
            for e, (c, w) in enumerate(zip(candidates, cand_weights))
        ]
        effects.sort(
            key=lambda x: (x.mask_change, x.soft_mask_change, x.mask_logit_change), reverse=True
        )
        rankings.append(ConceptRanking(b, slots, effects))
    return rankings


@dataclass
class PromptDependence:
    """How much each slot's mask depends on its heatmap prompt at all.

    Every slot's heatmap is replaced by a blank prompt (a constant map) and decoded again
    with the same image embedding. If the masks barely move, no edit upstream of the heatmap
    (concepts, slots) can move them either: the mask decoder does not follow its prompt.
    B = batch, K = slots.

    Attributes:
        blank: the constant logit(s) used, (B, K).
        mask_change, soft_mask_change, mask_logit_change: (B, K), as in `AblationResult`.
        heatmap_change: (B, K) mean |heatmap logit change| of the blanking itself.
    """

    blank: torch.Tensor
    mask_change: torch.Tensor
    soft_mask_change: torch.Tensor
    mask_logit_change: torch.Tensor
    heatmap_change: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {k: v.tolist() for k, v in asdict(self).items()}


@torch.no_grad()
def mask_prompt_dependence(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput | None = None,
    *,
    blank: str | float = "min",
) -> PromptDependence:
    """Decode every slot again from a blank heatmap and measure how far its mask moves.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        inputs: processor batch (prompt + completion).
        output: the unedited output on `inputs` (computed when None).
        blank: "min" (each slot's prompt becomes a constant map at its own lowest heatmap
            logit: the slot points nowhere) or a number (that constant logit everywhere).
    """
    _check_inputs(inputs, "mask_prompt_dependence")
    if not (blank == "min" or isinstance(blank, (int, float)) and math.isfinite(blank)):
        raise ValueError(
            f"mask_prompt_dependence: blank must be 'min' or a finite number, got {blank!r}."
        )
    output = _reference_output(model, inputs, output)
    heat = output.heatmap_logits.detach()  # (B, K, M, M)
    if blank == "min":
        value = heat.flatten(-2).min(-1).values  # (B, K)
    else:
        value = torch.full(heat.shape[:2], float(blank), dtype=heat.dtype, device=heat.device)
    prompt = value[..., None, None].expand_as(heat).contiguous()
    was_training = model.training
    model.eval()
    try:
        masks, _ = model.decode_masks(prompt, output.image_embeddings)
    finally:
        model.train(was_training)
    batch = heat.shape[0]
    valid = _valid_area(inputs, batch, masks.shape[-1])
    moved = _changes(
        output, masks, prompt, output.conf_logits, range(batch), valid, model.config.mask_threshold
    )
    measures = ("mask_change", "soft_mask_change", "mask_logit_change", "heatmap_change")
    return PromptDependence(blank=value.cpu(), **{name: moved[name] for name in measures})


# measures compared in `concept_ablation_study` (conf_change is signed; it is not averaged)
STUDY_MEASURES = tuple(name for name in CHANGE_MEASURES if name != "conf_change")
_MEASURE_NAMES = {
    "mask_change": "mask change (1 - IoU with the unablated mask)",
    "soft_mask_change": "soft mask change (1 - soft IoU of the mask probabilities)",
    "mask_logit_change": "mean abs. change of the mask logits",
    "prob_change": "mean abs. change of the mask probabilities",
    "heatmap_change": "mean abs. change of the heatmap logits (SAM's prompt)",
}


@dataclass
class AblationStudyRecord:
    """One (sample, slot): its top concepts removed vs as many random active ones.

    Attributes:
        sample, slot: where; top_concepts: the slot's top-n latents.
        top: effect of removing them on this slot, one value per `STUDY_MEASURES` name.
        random: effect of each random draw, one list per measure.
    """

    sample: int
    slot: int
    top_concepts: list[int]
    top: dict[str, float]
    random: dict[str, list[float]]

    def random_mean(self, measure: str) -> float:
        values = self.random[measure]
        return float(np.mean(values)) if values else math.nan

    @property
    def top_mask_change(self) -> float:
        return self.top["mask_change"]

    @property
    def random_mask_change(self) -> float:
        return self.random_mean("mask_change")


@dataclass
class AblationStudy:
    """Does removing the concepts a slot relies on change its mask more than random ones?

    Attributes:
        records: one per (sample, slot with a `<REF_POS>` token and a random baseline).
        top_n, random_draws: the settings.
        mean_top, mean_random: per measure (`STUDY_MEASURES`), the average over records of the
            top-concept effect and of the mean random-draw effect.
        measure: the measure the test below uses ("mask_logit_change" by default: it is not
            0 when the masks are binary-stable and does not underflow as probabilities do).
        fraction_top_greater: share of records where the top concepts moved `measure` more
            than the random average.
        wilcoxon_p: one-sided Wilcoxon signed-rank p-value of top > random on `measure`
            (NaN with fewer than 2 records or no difference).
        prompt_dependence: mean over the measured slots of the mask change (1 - IoU) when the
            slot's heatmap is replaced by a blank prompt (`mask_prompt_dependence`): the most
            any edit of the concepts could move the mask through the heatmap. Near 0, the
            mask decoder ignores its prompt and the binary mask change must be ~0 too.
        prompt_soft_dependence: the same with the soft mask change.
    """

    records: list[AblationStudyRecord]
    top_n: int
    random_draws: int
    mean_top: dict[str, float]
    mean_random: dict[str, float]
    measure: str
    fraction_top_greater: float
    wilcoxon_p: float
    prompt_dependence: float = math.nan
    prompt_soft_dependence: float = math.nan

    @property
    def mean_top_mask_change(self) -> float:
        return self.mean_top.get("mask_change", math.nan)

    @property
    def mean_random_mask_change(self) -> float:
        return self.mean_random.get("mask_change", math.nan)

    def to_dict(self) -> dict[str, Any]:
        return _nan_to_none_dict(asdict(self))

    def to_markdown(self) -> str:
        lines = [
            f"| measure | top-{self.top_n} concepts | {self.top_n} random active concepts | "
            "ratio |",
            "|---|---|---|---|",
        ]
        for name in STUDY_MEASURES:
            top, random = self.mean_top.get(name, math.nan), self.mean_random.get(name, math.nan)
            ratio = f"{top / random:.1f}x" if random > 0 else "-"
            lines.append(f"| {_MEASURE_NAMES[name]} | {top:.3g} | {random:.3g} | {ratio} |")
        lines.append("")
        lines.append(
            f"{len(self.records)} slots; top > random on {self.measure} in "
            f"{self.fraction_top_greater:.0%}; one-sided Wilcoxon p = {self.wilcoxon_p:.2g}. "
            f"Blanking the heatmap prompt changes the masks by {self.prompt_dependence:.3f} "
            f"(1 - IoU; soft {self.prompt_soft_dependence:.3f}): the most a concept edit can "
            "do through the heatmap."
        )
        return "\n".join(lines)


def concept_ablation_study(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    top_n: int = 3,
    random_draws: int = 5,
    seed: int = 0,
    output: SegCompassOutput | None = None,
    chunk_size: int = 16,
    measure: str = "mask_logit_change",
) -> AblationStudy:
    """Top concepts against random active ones: the causal check of the trace, in one call.

    For every sample and every slot with a `<REF_POS>` token: remove the slot's `top_n`
    concepts (by weight in the slot) and measure the change of that slot's mask; then remove
    `top_n` latents drawn at random among those active in the sample but not in the top set,
    `random_draws` times, and average. All edits run batched with everything else frozen.
    Every `STUDY_MEASURES` change is reported; the signed-rank test uses `measure`. The
    study also blanks each slot's heatmap (`mask_prompt_dependence`) to say how much the
    masks can depend on the heatmaps at all.
    """
    from scipy.stats import wilcoxon

    _check_inputs(inputs, "concept_ablation_study")
    if top_n < 1 or random_draws < 1:
        raise ValueError(
            f"concept_ablation_study: top_n and random_draws must be >= 1, got {top_n} and "
            f"{random_draws}."
        )
    if measure not in STUDY_MEASURES:
        raise ValueError(
            f"concept_ablation_study: measure must be one of {STUDY_MEASURES}, got {measure!r}."
        )
    output = _reference_output(model, inputs, output)
    rng = np.random.default_rng(seed)
    batch = inputs["input_ids"].shape[0]
    rows, zero, owners = [], [], []
    for b in range(batch):
        active = sorted(_active_latents(output, b))
        for k in output.ref_mask[b].nonzero().flatten().tolist():
            top = top_concepts(output, b, k, top_n)
            pool = [c for c in active if c not in set(top)]
            if not top or not pool:
                continue
            draws = [
                sorted(rng.choice(pool, size=min(len(top), len(pool)), replace=False).tolist())
                for _ in range(random_draws)
            ]
            for edit in [top, *draws]:
                rows.append(b)
                zero.append(edit)
            owners.append((b, k, top, len(draws)))
    nan = {name: math.nan for name in STUDY_MEASURES}
    if not rows:
        logger.warning(
            "concept_ablation_study: no slot with a <REF_POS> token and active concepts."
        )
        return AblationStudy([], top_n, random_draws, nan, dict(nan), measure, math.nan, math.nan)
    new_masks, new_heat, new_conf = _run_edits(
        model, inputs, output, rows, zero, chunk_size=chunk_size
    )
    valid = _valid_area(inputs, batch, new_masks.shape[-1])
    moved = _changes(
        output, new_masks, new_heat, new_conf, rows, valid, model.config.mask_threshold
    )
    records, e = [], 0
    for b, k, top, draws in owners:
        records.append(
            AblationStudyRecord(
                sample=b,
                slot=k,
                top_concepts=top,
                top={name: float(moved[name][e, k]) for name in STUDY_MEASURES},
                random={
                    name: moved[name][e + 1 : e + 1 + draws, k].tolist() for name in STUDY_MEASURES
                },
            )
        )
        e += 1 + draws
    top_values = np.array([r.top[measure] for r in records])
    random_values = np.array([r.random_mean(measure) for r in records])
    differences = top_values - random_values
    p_value = math.nan
    if len(records) >= 2 and np.any(differences != 0):
        p_value = float(wilcoxon(differences, alternative="greater").pvalue)
    dependence = mask_prompt_dependence(model, inputs, output)
    measured = [(r.sample, r.slot) for r in records]
    return AblationStudy(
        records=records,
        top_n=top_n,
        random_draws=random_draws,
        mean_top={n: float(np.mean([r.top[n] for r in records])) for n in STUDY_MEASURES},
        mean_random={
            n: float(np.mean([r.random_mean(n) for r in records])) for n in STUDY_MEASURES
        },
        measure=measure,
        fraction_top_greater=float(np.mean(differences > 0)),
        wilcoxon_p=p_value,
        prompt_dependence=float(
            np.mean([float(dependence.mask_change[b, k]) for b, k in measured])
        ),
        prompt_soft_dependence=float(
            np.mean([float(dependence.soft_mask_change[b, k]) for b, k in measured])
        ),
    )
