"""Interpretability: why this mask, and does it depend on the concepts it names.

The paper claims a white-box path from reasoning to mask (PAPER.md, "The interpretability
claim"): SAE concepts fire on visual and CoT tokens, each slot gathers some of them through
the query codebook, the slot points on the image (heatmap) and SAM turns that into a mask.
Its reviewers asked for causal evidence, which the paper does not give. This module makes
both one call:

* `explain(model, inputs)`: per image and slot, the top concepts (latent id, weight in the
  slot, label, the tokens they fired on with activations), the heatmap, the mask and the
  confidence, as typed dataclasses with ``to_dict()`` for JSON.
* `ablate_concepts(model, inputs, concept_ids | top_n | swap)`: zero (or swap) chosen latents
  in the sparse codes with everything else frozen (same inputs, same image embedding, eval
  mode, no grad; the model's ``edit_concepts`` forward hook is the only change) and measure
  how the masks move. `rank_concepts_by_effect` ranks a sample's active concepts by that
  causal effect; `concept_ablation_study` compares ablating each slot's top concepts against
  ablating as many random active ones (the reviewers' experiment).
* `concept_quality_vs_accuracy(model, dataset)`: per-sample concept-quality measures against
  mask IoU, with Spearman / Pearson correlations, confidence intervals and a plot.
* `render_explanation` / `write_report`: PNG overlays and a static HTML report.

Conventions: a slot's weight on a latent is the sum over tokens of the model's
``slot_concept_weights`` (last codebook layer's attention to the token times the latent's
activation on it). Mask change between two binary masks is ``1 - IoU``, IoU of two empty
masks counted as 1 (nothing changed), computed on the valid (unpadded) area of the mask grid.

Library side: uses matplotlib (Agg canvas, no pyplot state), numpy and scipy.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling_segcompass import SegCompassOutput, _decoder_layers
from ..sparse_autoencoder import SparseCodes, fraction_of_variance_unexplained
from .labels import ConceptLabels, TokenInfo, describe_tokens

logger = logging.getLogger(__name__)

# Keys of a processor batch that `forward` takes (targets are added where needed).
_FORWARD_KEYS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_grid_thw",
    "sam_pixel_values",
    "image_embeddings",
)
_TARGET_KEYS = ("gt_masks", "num_objects", "valid_mask")


# =========================================================================== plumbing
def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _check_inputs(inputs: Any, caller: str) -> Mapping[str, Any]:
    if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), torch.Tensor):
        raise TypeError(
            f"{caller}: expected `inputs` to be a SegCompassProcessor batch (a dict with an "
            f"input_ids (B, L) tensor), got {type(inputs).__name__}. Build it with "
            "processor(images, instructions, responses) or build_explanation_inputs(...)."
        )
    if inputs["input_ids"].dim() != 2:
        raise ValueError(
            f"{caller}: input_ids must be (B, L), got {tuple(inputs['input_ids'].shape)}."
        )
    return inputs


@torch.no_grad()
def _forward(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    targets: bool = False,
    edit: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    image_embeddings: torch.Tensor | None = None,
) -> SegCompassOutput:
    """One eval-mode, no-grad forward on the keys `forward` takes (optionally with an edit)."""
    device = _device(model)
    keys = _FORWARD_KEYS + (_TARGET_KEYS if targets else ())
    kwargs = {k: inputs[k].to(device) for k in keys if inputs.get(k) is not None}
    if image_embeddings is not None:  # frozen: the very same embedding, no re-encoding
        kwargs.pop("sam_pixel_values", None)
        kwargs["image_embeddings"] = image_embeddings.to(device)
    if targets and "gt_masks" in kwargs:
        kwargs["gt_masks"] = kwargs["gt_masks"].float()
    was_training = model.training
    model.eval()
    try:
        return model(**kwargs, compute_logits=False, edit_concepts=edit)
    finally:
        model.train(was_training)


def _take_rows(inputs: Mapping[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """The batch restricted (or replicated) to `rows`, including the Qwen-style flat pixels.

    ``pixel_values`` is (total patches, dim) over the whole batch: image i owns
    ``prod(image_grid_thw[i])`` consecutive rows. One image per sequence is assumed.
    """
    batch = inputs["input_ids"].shape[0]
    index = torch.as_tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    pixels, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
    if pixels is not None and grid is not None:
        if grid.shape[0] != batch:
            raise ValueError(
                f"ablation needs one image per sequence; got image_grid_thw for {grid.shape[0]} "
                f"images and {batch} sequences."
            )
        counts = grid.prod(-1).tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        out["pixel_values"] = torch.cat([pixels[starts[r] : starts[r + 1]] for r in rows])
    for key, value in inputs.items():
        if key == "pixel_values" and "pixel_values" in out:
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            out[key] = value[index.to(value.device)]
    return out


def _edit_function(
    zero: Sequence[Sequence[int]],
    swaps: Sequence[Mapping[int, int]],
    d_sae: int,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`edit_concepts` hook: per row, zero the latents in ``zero[b]`` and rename ``a -> c``
    for every ``(a, c)`` in ``swaps[b]`` (the activation stays, the concept changes)."""
    for ids in [*zero, *(list(s) + list(s.values()) for s in swaps)]:
        bad = [int(i) for i in ids if not 0 <= int(i) < d_sae]
        if bad:
            raise ValueError(f"concept ids must lie in [0, d_sae={d_sae}), got {bad}.")
    rows = len(zero)

    def edit(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if indices.shape[0] != rows:
            raise ValueError(f"edit built for {rows} rows applied to {indices.shape[0]}.")
        device = indices.device
        kill = torch.zeros(rows, d_sae, dtype=torch.bool, device=device)
        table = torch.arange(d_sae, device=device).repeat(rows, 1)  # (B, d_sae)
        for b in range(rows):
            if len(zero[b]):
                kill[b, torch.as_tensor(list(zero[b]), device=device)] = True
            for old, new in swaps[b].items():
                table[b, int(old)] = int(new)
        batch_index = torch.arange(rows, device=device)[:, None, None]  # (B, 1, 1)
        values = values.masked_fill(kill[batch_index, indices], 0)  # (B, L, n)
        return table[batch_index, indices], values

    return edit


def slot_concept_totals(
    output: SegCompassOutput, sample: int, slot: int, d_sae: int | None = None
) -> torch.Tensor:
    """(d_sae,) weight of every latent in one slot: ``slot_concept_weights`` summed over tokens.

    `d_sae` defaults to the largest active latent id + 1 (pass ``config.d_sae`` for a fixed size).
    """
    weights = output.slot_concept_weights[sample, slot].detach().float().cpu()  # (L, n)
    indices = output.concept_indices[sample].cpu()  # (L, n)
    active = output.concept_values[sample].cpu() > 0
    size = d_sae if d_sae is not None else int(indices.max()) + 1 if indices.numel() else 1
    totals = torch.zeros(size)
    totals.index_add_(0, indices[active].flatten(), weights[active].flatten())
    return totals


def _active_latents(output: SegCompassOutput, sample: int) -> set[int]:
    indices = output.concept_indices[sample]
    return set(indices[output.concept_values[sample] > 0].tolist())


def _valid_area(inputs: Mapping[str, Any], batch: int, size: int) -> torch.Tensor:
    valid = inputs.get("valid_mask")
    if valid is None:
        return torch.ones(batch, size, size, dtype=torch.bool)
    return valid.bool().cpu()


def _binary_iou(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU over the last two dims, restricted to `valid`; both empty -> 1."""
    a, b = a & valid, b & valid
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


# The measures of how far an edit moved a slot, all (E, K), computed on the valid area.
CHANGE_MEASURES = (
    "mask_change",
    "soft_mask_change",
    "mask_logit_change",
    "prob_change",
    "heatmap_change",
    "conf_change",
)


def _soft_iou(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft IoU of two probability maps over the last two dims: sum(min) / sum(max) on `valid`.

    Equals the binary IoU for 0/1 maps; 1 for identical maps; both empty -> 1.
    """
    area = valid.to(p.dtype)
    inter = (torch.minimum(p, q) * area).flatten(-2).sum(-1)
    union = (torch.maximum(p, q) * area).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp_min(1e-30), torch.ones_like(union))


def _changes(
    before: SegCompassOutput,
    after_masks: torch.Tensor,
    after_heatmaps: torch.Tensor,
    after_conf: torch.Tensor,
    rows: Sequence[int],
    valid: torch.Tensor,
    threshold: float,
) -> dict[str, torch.Tensor]:
    """How far each edited forward moved each slot, relative to the unedited one.

    Returns a dict of (E, K) tensors (E = edits), keys `CHANGE_MEASURES`:
    ``mask_change`` 1 - binary IoU of the masks; ``soft_mask_change`` 1 - soft IoU of the
    sigmoid masks (double precision, so that it does not underflow far from the threshold);
    ``mask_logit_change`` mean |delta mask logit|; ``prob_change`` mean |delta sigmoid|;
    ``heatmap_change`` mean |delta heatmap logit| (the prompt SAM received); ``conf_change``
    the change of the sigmoid confidence. Means are over the valid area.
    """
    index = torch.as_tensor(list(rows))
    ref_logits = before.mask_logits.detach().cpu().double()[index]  # (E, K, M, M)
    new_logits = after_masks.detach().cpu().double()
    area = valid[index].unsqueeze(1)  # (E, 1, M, M)
    count = area.flatten(-2).sum(-1).clamp_min(1).double()  # (E, 1)

    def mean_abs(delta: torch.Tensor) -> torch.Tensor:
        return ((delta.abs() * area).flatten(-2).sum(-1) / count).float()

    ref_prob, new_prob = torch.sigmoid(ref_logits), torch.sigmoid(new_logits)
    ref_heat = before.heatmap_logits.detach().cpu().double()[index]
    conf = torch.sigmoid(after_conf.detach().cpu().float()) - torch.sigmoid(
        before.conf_logits.detach().cpu().float()[index]
    )
    return {
        "mask_change": 1.0 - _binary_iou(ref_logits > threshold, new_logits > threshold, area),
        "soft_mask_change": (1.0 - _soft_iou(ref_prob, new_prob, area)).float(),
        "mask_logit_change": mean_abs(new_logits - ref_logits),
        "prob_change": mean_abs(new_prob - ref_prob),
        "heatmap_change": mean_abs(after_heatmaps.detach().cpu().double() - ref_heat),
        "conf_change": conf,
    }


@torch.no_grad()
def _run_edits(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput,
    rows: Sequence[int],
    zero: Sequence[Sequence[int]],
    swaps: Sequence[Mapping[int, int]] | None = None,
    *,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of sample ``rows[e]`` with edit e, chunked; (mask, heatmap, conf logits) per edit."""
    swaps = swaps if swaps is not None else [{}] * len(rows)
    masks, heatmaps, confs = [], [], []
    for start in range(0, len(rows), chunk_size):
        part = list(rows[start : start + chunk_size])
        sub = _take_rows(inputs, part)
        embeddings = output.image_embeddings[torch.as_tensor(part)]
        edit = _edit_function(
            zero[start : start + chunk_size], swaps[start : start + chunk_size], model.config.d_sae
        )
        out = _forward(model, sub, edit=edit, image_embeddings=embeddings)
        masks.append(out.mask_logits.cpu())
        heatmaps.append(out.heatmap_logits.cpu())
        confs.append(out.conf_logits.cpu())
    return torch.cat(masks), torch.cat(heatmaps), torch.cat(confs)


def _reference_output(
    model: Any, inputs: Mapping[str, Any], output: SegCompassOutput | None
) -> SegCompassOutput:
    # the IoU with the ground truth needs the forward's slot-to-target matching
    if output is None or (inputs.get("gt_masks") is not None and output.slot_to_target is None):
        output = _forward(model, inputs, targets=inputs.get("gt_masks") is not None)
    return output


# =========================================================================== explain
@dataclass
class TokenActivation:
    """A token a concept fired on.

    Attributes:
        position: index in the sequence.
        token: its text (``patch(row,col)`` for a visual token).
        kind: "visual", "prompt", "cot", "ref" or "answer".
        activation: the latent's activation on this token.
        weight: how much this (token, concept) pair fed the slot.
        patch: (frame, row, col) on the merged patch grid for visual tokens.
    """

    position: int
    token: str
    kind: str
    activation: float
    weight: float
    patch: tuple[int, int, int] | None = None


@dataclass
class ConceptContribution:
    """One concept of a slot.

    Attributes:
        latent_id: the SAE latent.
        weight: its total weight in the slot (sum over tokens of attention x activation).
        share: weight / the slot's total weight over all concepts.
        label: its name from the concept labels (None without labels or when unknown).
        num_tokens: tokens of this sequence on which it fired.
        tokens: the tokens that fed the slot most through this concept, strongest first.
    """

    latent_id: int
    weight: float
    share: float
    label: str | None
    num_tokens: int
    tokens: list[TokenActivation] = field(default_factory=list)


@dataclass
class SlotExplanation:
    """One slot of one image.

    Attributes:
        slot: slot index k.
        has_ref: the completion holds this slot's `<REF_POS>` token.
        conf_logit: the confidence logit; confidence: its sigmoid.
        kept: has_ref and conf_logit >= the confidence threshold (the slot yields a mask).
        mask_area: foreground pixels of the mask.
        heatmap: (H, W) sigmoid heatmap, at the original image size when the inputs carry
            ``original_sizes`` / ``reshaped_input_sizes``, else on the (M, M) mask grid.
        mask: (H, W) bool mask, same frame as `heatmap`.
        concepts: the top concepts, strongest first.
    """

    slot: int
    has_ref: bool
    conf_logit: float
    confidence: float
    kept: bool
    mask_area: int
    heatmap: torch.Tensor
    mask: torch.Tensor
    concepts: list[ConceptContribution]

    def to_dict(self, include_maps: bool = False) -> dict[str, Any]:
        data = {
            "slot": self.slot,
            "has_ref": self.has_ref,
            "conf_logit": self.conf_logit,
            "confidence": self.confidence,
            "kept": self.kept,
            "mask_area": self.mask_area,
            "heatmap_peak": list(np.unravel_index(int(self.heatmap.argmax()), self.heatmap.shape)),
            "concepts": [asdict(c) for c in self.concepts],
        }
        data["heatmap_peak"] = [int(v) for v in data["heatmap_peak"]]
        if include_maps:
            data["heatmap"] = self.heatmap.tolist()
            data["mask"] = self.mask.int().tolist()
        return data


@dataclass
class ImageExplanation:
    """The concept trace of one image.

    Attributes:
        index: row in the batch.
        prompt: decoded prompt (None without tokenizer).
        completion: decoded response, CoT and `<REF_POS>` tokens (None without tokenizer).
        cot: decoded chain of thought (None without tokenizer or ``<think>``).
        image_size: (H, W) of the heatmaps and masks.
        num_active_concepts: distinct latents active anywhere in the sequence.
        slots: one `SlotExplanation` per slot.
    """

    index: int
    prompt: str | None
    completion: str | None
    cot: str | None
    image_size: tuple[int, int]
    num_active_concepts: int
    slots: list[SlotExplanation]

    @property
    def kept_slots(self) -> list[SlotExplanation]:
        return [s for s in self.slots if s.kept]

    def to_dict(self, include_maps: bool = False) -> dict[str, Any]:
        """JSON-ready dict (maps omitted unless `include_maps`; the concept trace stays)."""
        return {
            "index": self.index,
            "prompt": self.prompt,
            "completion": self.completion,
            "cot": self.cot,
            "image_size": list(self.image_size),
            "num_active_concepts": self.num_active_concepts,
            "slots": [s.to_dict(include_maps) for s in self.slots],
        }


def _to_image_frame(
    grid: torch.Tensor, original: Sequence[int], reshaped: Sequence[int], sam_size: int
) -> torch.Tensor:
    """(K, M, M) mask-grid values -> (K, H, W): upsample to the SAM frame, crop the padding,
    resize to the original size (what `SegCompassProcessor.post_process_masks` does)."""
    (height, width), (rh, rw) = [int(v) for v in original], [int(v) for v in reshaped]
    x = grid.float().unsqueeze(1)  # (K, 1, M, M)
    x = F.interpolate(x, size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    x = x[..., :rh, :rw]  # (K, 1, rh, rw)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x[:, 0]  # (K, H, W)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False).strip()


def _texts(
    tokenizer: Any, ids: list[int], infos: list[TokenInfo]
) -> tuple[str | None, str | None, str | None]:
    if tokenizer is None:
        return None, None, None
    real = [i for i in infos if i.kind != "pad"]
    prompt = [i.token_id for i in real if i.kind in ("prompt", "visual")]
    response = [i.token_id for i in real if i.kind in ("cot", "ref", "answer")]
    cot = [i.token_id for i in real if i.kind == "cot"]
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True).strip()
    completion = _decode(tokenizer, response) if response else None
    cot_text = _decode(tokenizer, cot) if cot else None
    return prompt_text, completion, cot_text


def explain(
    model: Any,
    inputs: Mapping[str, Any],
    output: SegCompassOutput | None = None,
    *,
    tokenizer: Any | None = None,
    concept_labels: ConceptLabels | None = None,
    top_n: int = 5,
    tokens_per_concept: int = 3,
    confidence_threshold: float | None = None,
    mask_threshold: float | None = None,
) -> list[ImageExplanation]:
    """Per image and slot: top concepts with their tokens, heatmap, mask and confidence.

    Args:
        model: a `SegCompassForReasoningSegmentation` (its config names the special tokens).
        inputs: the processor batch of prompt + completion (``processor(images, instructions,
            responses)`` or `build_explanation_inputs`). With ``original_sizes`` and
            ``reshaped_input_sizes`` the maps come back at each image's size.
        output: the model's output on `inputs` (computed here when None).
        tokenizer: shows token strings and decodes the texts (defaults to
            ``model.processor.tokenizer`` when a processor is attached).
        concept_labels: names the concepts (`interpret.labels.load_concept_labels`).
        top_n: concepts per slot; tokens_per_concept: tokens listed per concept.
        confidence_threshold: slot kept when its confidence logit is >= this (default
            ``config.slot_confidence_threshold``); mask_threshold: foreground logit
            (default ``config.mask_threshold``).

    Returns:
        One `ImageExplanation` per row of the batch.
    """
    _check_inputs(inputs, "explain")
    if top_n < 1 or tokens_per_concept < 0:
        raise ValueError(
            f"explain: expected top_n >= 1 and tokens_per_concept >= 0, got {top_n} and "
            f"{tokens_per_concept}."
        )
    config = model.config
    if tokenizer is None and getattr(model, "processor", None) is not None:
        tokenizer = model.processor.tokenizer
    conf_threshold = (
        config.slot_confidence_threshold if confidence_threshold is None else confidence_threshold
    )
    fg_threshold = config.mask_threshold if mask_threshold is None else mask_threshold
    output = output if output is not None else _forward(model, inputs)
    input_ids = inputs["input_ids"].cpu()
    batch, length = input_ids.shape
    if output.concept_indices.shape[:2] != (batch, length):
        raise ValueError(
            f"explain: output has codes for {tuple(output.concept_indices.shape[:2])} tokens but "
            f"inputs are {(batch, length)}; pass the output of the forward on these inputs."
        )
    infos = describe_tokens(
        input_ids,
        config,
        attention_mask=inputs.get("attention_mask"),
        image_grid_thw=inputs.get("image_grid_thw"),
        tokenizer=tokenizer,
    )
    indices = output.concept_indices.cpu()
    values = output.concept_values.float().cpu()
    weights = output.slot_concept_weights.float().cpu()
    heat = torch.sigmoid(output.heatmap_logits.float().cpu())
    masks = output.mask_logits.float().cpu()
    conf = output.conf_logits.float().cpu()
    ref_mask = output.ref_mask.cpu()
    sized = (
        inputs.get("original_sizes") is not None and inputs.get("reshaped_input_sizes") is not None
    )
    sam_size = (
        int(inputs["sam_pixel_values"].shape[-1])
        if inputs.get("sam_pixel_values") is not None
        else int(getattr(config.sam_config.vision_config, "image_size", masks.shape[-1]))
    )
    results = []
    for b in range(batch):
        if sized:
            frame_heat = _to_image_frame(
                heat[b], inputs["original_sizes"][b], inputs["reshaped_input_sizes"][b], sam_size
            )
            frame_mask = (
                _to_image_frame(
                    masks[b],
                    inputs["original_sizes"][b],
                    inputs["reshaped_input_sizes"][b],
                    sam_size,
                )
                > fg_threshold
            )
        else:
            frame_heat, frame_mask = heat[b], masks[b] > fg_threshold
        slots = []
        for k in range(config.num_slots):
            totals = slot_concept_totals(output, b, k, model.config.d_sae)
            total = float(totals.sum())
            count = min(top_n, int((totals > 0).sum()))
            top = totals.topk(count) if count else None
            concepts = []
            for latent, weight in zip(
                top.indices.tolist() if top else [], top.values.tolist() if top else []
            ):
                hit = (indices[b] == latent) & (values[b] > 0)  # (L, n)
                positions, slots_j = hit.nonzero(as_tuple=True)
                per_token = weights[b, k][positions, slots_j]
                order = per_token.argsort(descending=True)[:tokens_per_concept]
                tokens = [
                    TokenActivation(
                        position=int(positions[o]),
                        token=infos[b][int(positions[o])].token,
                        kind=infos[b][int(positions[o])].kind,
                        activation=float(values[b][positions[o], slots_j[o]]),
                        weight=float(per_token[o]),
                        patch=infos[b][int(positions[o])].patch,
                    )
                    for o in order.tolist()
                ]
                concepts.append(
                    ConceptContribution(
                        latent_id=int(latent),
                        weight=float(weight),
                        share=float(weight) / total if total > 0 else 0.0,
                        label=concept_labels.label(latent) if concept_labels is not None else None,
                        num_tokens=int(positions.numel()),
                        tokens=tokens,
                    )
                )
            has_ref = bool(ref_mask[b, k])
            logit = float(conf[b, k])
            slots.append(
                SlotExplanation(
                    slot=k,
                    has_ref=has_ref,
                    conf_logit=logit,
                    confidence=float(torch.sigmoid(conf[b, k])),
                    kept=has_ref and logit >= conf_threshold,
                    mask_area=int(frame_mask[k].sum()),
                    heatmap=frame_heat[k],
                    mask=frame_mask[k],
                    concepts=concepts,
                )
            )
        prompt, completion, cot = _texts(tokenizer, input_ids[b].tolist(), infos[b])
        results.append(
            ImageExplanation(
                index=b,
                prompt=prompt,
                completion=completion,
                cot=cot,
                image_size=(int(frame_heat.shape[-2]), int(frame_heat.shape[-1])),
                num_active_concepts=len(_active_latents(output, b)),
                slots=slots,
            )
        )
    return results


def build_explanation_inputs(
    processor: Any, images: Any, instructions: str | Sequence[str], completions: str | Sequence[str]
) -> Any:
    """Processor batch of prompt + completion, e.g. for the texts `model.segment` generated.

    Trailing ``<|im_end|>`` / end-of-text markers of generated completions are stripped, since
    the processor appends ``<|im_end|>`` itself.
    """
    completions = [completions] if isinstance(completions, str) else list(completions)
    cleaned = []
    for text in completions:
        text = text.rstrip()
        for marker in ("<|im_end|>", "<|endoftext|>"):
            while text.endswith(marker):
                text = text[: -len(marker)].rstrip()
        cleaned.append(text)
    return processor(images, instructions, responses=cleaned)


# =========================================================================== ablation
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


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def top_concepts(output: SegCompassOutput, sample: int, slot: int, n: int) -> list[int]:
    """The `n` latents with the largest weight in one slot (fewer if fewer are active)."""
    totals = slot_concept_totals(output, sample, slot)
    count = min(n, int((totals > 0).sum()))
    return totals.topk(count).indices.tolist() if count else []


def _gt_iou(
    output: SegCompassOutput,
    mask_logits: torch.Tensor,
    inputs: Mapping[str, Any],
    rows: Sequence[int],
    threshold: float,
) -> torch.Tensor:
    """(E, K) IoU of each slot's mask with its matched ground truth (NaN when unmatched)."""
    index = torch.as_tensor(list(rows))
    shape = (len(rows), mask_logits.shape[1])
    if inputs.get("gt_masks") is None or output.slot_to_target is None:
        return torch.full(shape, float("nan"))
    gt = inputs["gt_masks"].cpu()[index] > 0.5  # (E, G, M, M)
    assignment = output.slot_to_target.cpu()[index]  # (E, K)
    valid = _valid_area(inputs, inputs["input_ids"].shape[0], mask_logits.shape[-1])[index]
    pred = mask_logits.cpu() > threshold
    out = torch.full(shape, float("nan"))
    for e in range(shape[0]):
        for k in range(shape[1]):
            j = int(assignment[e, k])
            if j >= 0:
                out[e, k] = _binary_iou(pred[e, k], gt[e, j], valid[e])
    return out


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
    """The reviewers' causal experiment, in one call.

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


# =========================================================================== quality vs accuracy
@dataclass
class SampleQuality:
    """Concept-quality measures and mask accuracy of one sample.

    Attributes:
        index: position in the dataset; family: the row's ``family`` (synthetic world) or None.
        num_objects: targets of the sample.
        iou: mean IoU of the targets with their matched slots' masks (unmatched target: 0).
        sae_fvu: fraction of variance the SAE leaves unexplained on the sample's tokens
            (lower = better concepts).
        slot_concentration: share of a matched slot's weight held by its `top_n` concepts,
            averaged over matched slots (higher = more focused slots).
        attribute_agreement: share of a matched slot's `top_n` concepts whose label is one of
            its target's attribute words (colour, kind, size), averaged; NaN without labels
            or object attributes.
    """

    index: int
    family: str | None
    num_objects: int
    iou: float
    sae_fvu: float
    slot_concentration: float
    attribute_agreement: float


@dataclass
class Correlation:
    """Correlation of one quality measure with mask IoU.

    Attributes:
        measure: the `SampleQuality` field; method: "spearman" or "pearson".
        n: samples used (both values finite); r: the coefficient; p_value: two-sided.
        ci_low, ci_high: the confidence interval; confidence: its level; ci_method:
            "fisher" (Fisher z; Bonett-Wright standard error for Spearman) or "bootstrap"
            (percentile).
    """

    measure: str
    method: str
    n: int
    r: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    ci_method: str


def correlate(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    method: str = "spearman",
    confidence: float = 0.95,
    ci_method: str = "fisher",
    n_bootstrap: int = 1000,
    seed: int = 0,
    measure: str = "x",
) -> Correlation:
    """Spearman or Pearson correlation with a confidence interval (NaN pairs dropped).

    Fisher z: ``tanh(atanh(r) +- z_(1+c)/2 * se)`` with ``se = 1/sqrt(n-3)`` (Pearson) or
    ``sqrt((1 + r^2/2)/(n-3))`` (Spearman, Bonett & Wright 2000). Needs n >= 4; otherwise the
    interval is NaN.

    >>> c = correlate([1, 2, 3, 4, 5], [2, 4, 5, 4, 5], method="pearson")
    >>> round(c.r, 4)
    0.7746
    """
    from scipy import stats

    if method not in ("spearman", "pearson"):
        raise ValueError(f"correlate: method must be 'spearman' or 'pearson', got {method!r}.")
    if ci_method not in ("fisher", "bootstrap"):
        raise ValueError(
            f"correlate: ci_method must be 'fisher' or 'bootstrap', got {ci_method!r}."
        )
    if not 0 < confidence < 1:
        raise ValueError(f"correlate: confidence must lie in (0, 1), got {confidence}.")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"correlate: x and y must be 1-D of equal length, got {x.shape}, {y.shape}."
        )
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    nan = Correlation(
        measure, method, n, math.nan, math.nan, math.nan, math.nan, confidence, ci_method
    )
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan
    func = stats.spearmanr if method == "spearman" else stats.pearsonr
    result = func(x, y)
    r, p = float(result[0]), float(result[1])
    low = high = math.nan
    if ci_method == "fisher" and n >= 4:
        z = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
        se = (1 + r * r / 2) ** 0.5 if method == "spearman" else 1.0
        se /= math.sqrt(n - 3)
        crit = float(stats.norm.ppf(0.5 + confidence / 2))
        low, high = math.tanh(z - crit * se), math.tanh(z + crit * se)
    elif ci_method == "bootstrap":
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_bootstrap):
            pick = rng.integers(0, n, n)
            if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
                samples.append(float(func(x[pick], y[pick])[0]))
        if samples:
            low, high = np.quantile(samples, [0.5 - confidence / 2, 0.5 + confidence / 2]).tolist()
    return Correlation(measure, method, n, r, p, low, high, confidence, ci_method)


@dataclass
class QualityAccuracyReport:
    """Concept quality against mask accuracy over a dataset.

    Attributes:
        samples: one `SampleQuality` per sample with at least one target.
        correlations: Spearman and Pearson for each measure.
        plot_path: the scatter plot PNG (None when not drawn).
    """

    samples: list[SampleQuality]
    correlations: list[Correlation]
    plot_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": [_nan_to_none(list(asdict(s).values())) for s in self.samples],
            "sample_fields": list(SampleQuality.__dataclass_fields__),
            "correlations": [_nan_to_none_dict(asdict(c)) for c in self.correlations],
            "plot_path": str(self.plot_path) if self.plot_path else None,
        }

    def to_markdown(self) -> str:
        lines = ["| measure | method | n | r | 95% CI | p |", "|---|---|---|---|---|---|"]
        for c in self.correlations:
            lines.append(
                f"| {c.measure} | {c.method} | {c.n} | {c.r:.3f} | [{c.ci_low:.3f}, "
                f"{c.ci_high:.3f}] | {c.p_value:.2g} |"
            )
        return "\n".join(lines)


def _nan_to_none_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _nan_to_none(v) for k, v in data.items()}


QUALITY_MEASURES = ("sae_fvu", "slot_concentration", "attribute_agreement")


def _default_attributes(row: Mapping[str, Any], target: int) -> set[str]:
    """Attribute words of target `target` of a synthetic-world row (colour, kind, size)."""
    objects, targets = row.get("objects"), row.get("target_indices")
    if not objects or targets is None or target >= len(targets):
        return set()
    obj = objects[int(targets[target])]
    return {str(obj[key]).lower() for key in ("colour", "kind", "size") if obj.get(key)}


def _row_masks(row: Mapping[str, Any]) -> np.ndarray:
    masks = np.asarray(row["masks"])
    if masks.size == 0:
        image = row["image"]
        width, height = (
            image.size
            if hasattr(image, "size") and not isinstance(image, np.ndarray)
            else (
                image.shape[1],
                image.shape[0],
            )
        )
        return np.zeros((0, height, width), dtype=np.uint8)
    return masks.astype(np.uint8)


@torch.no_grad()
def concept_quality_vs_accuracy(
    model: Any,
    dataset: Iterable[Mapping[str, Any]],
    processor: Any | None = None,
    *,
    batch_size: int = 8,
    concept_labels: ConceptLabels | None = None,
    top_n: int = 5,
    target_attributes: Callable[[Mapping[str, Any], int], set[str]] | None = None,
    plot_path: str | os.PathLike | None = None,
    confidence: float = 0.95,
    ci_method: str = "fisher",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> QualityAccuracyReport:
    """Per-sample concept quality against mask IoU, with correlations and a plot.

    The paper reports that concept quality correlates with mask accuracy; this measures it on
    any dataset of rows with ``image``, ``instruction``, ``response`` (the gold or a generated
    completion), ``masks`` (N, H, W) and, for attribute agreement, the synthetic world's
    ``objects`` / ``target_indices`` (or pass `target_attributes(row, j) -> set of words`).
    Samples without targets are skipped (their IoU is undefined).

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        dataset: the rows (a list, a `datasets.Dataset`, any iterable).
        processor: a `SegCompassProcessor` (default: ``model.processor``).
        batch_size: rows per forward.
        concept_labels: enables the attribute-agreement measure.
        top_n: concepts per slot for concentration and agreement.
        plot_path: write the scatter plots there (PNG).
        confidence, ci_method, n_bootstrap, seed: see `correlate`.
    """
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            "concept_quality_vs_accuracy: pass processor=SegCompassProcessor(...) or attach one "
            "as model.processor."
        )
    attributes = target_attributes or _default_attributes
    config = model.config
    layer = _decoder_layers(model.vlm)[config.sae_layer]
    samples: list[SampleQuality] = []
    rows: list[Mapping[str, Any]] = []
    start = 0

    def flush() -> None:
        nonlocal start
        if not rows:
            return
        inputs = processor(
            [r["image"] for r in rows],
            [r["instruction"] for r in rows],
            responses=[r["response"] for r in rows],
            masks=[_row_masks(r) for r in rows],
        )
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: Any, _inputs: Any, out: Any) -> None:
            captured["hidden"] = out[0] if isinstance(out, tuple) else out

        handle = layer.register_forward_hook(hook)
        try:
            output = _forward(model, inputs, targets=True)
        finally:
            handle.remove()
        hidden = captured["hidden"].float()
        threshold = config.mask_threshold
        valid = _valid_area(inputs, len(rows), output.mask_logits.shape[-1])
        pred = output.mask_logits.cpu() > threshold
        gt = inputs["gt_masks"].cpu() > 0.5
        assignment = output.slot_to_target.cpu()
        attention = inputs["attention_mask"].bool()
        for b, row in enumerate(rows):
            count = int(inputs["num_objects"][b])
            if count == 0:
                continue
            ious, concentration, agreement = [], [], []
            for j in range(count):
                slots = (assignment[b] == j).nonzero().flatten().tolist()
                if not slots:
                    ious.append(0.0)
                    continue
                k = slots[0]
                ious.append(float(_binary_iou(pred[b, k], gt[b, j], valid[b])))
                totals = slot_concept_totals(output, b, k, model.config.d_sae)
                total = float(totals.sum())
                top = totals.topk(min(top_n, int((totals > 0).sum())))
                concentration.append(float(top.values.sum()) / total if total > 0 else math.nan)
                words = attributes(row, j)
                if concept_labels is not None and words and top.indices.numel():
                    labels = [concept_labels.label(c) for c in top.indices.tolist()]
                    agreement.append(
                        float(np.mean([(label or "").lower() in words for label in labels]))
                    )
            real = attention[b].to(hidden.device)
            codes = SparseCodes(output.concept_indices[b][real], output.concept_values[b][real])
            fvu = fraction_of_variance_unexplained(hidden[b][real], model.sae.decode(codes).float())
            samples.append(
                SampleQuality(
                    index=start + b,
                    family=row.get("family"),
                    num_objects=count,
                    iou=float(np.mean(ious)),
                    sae_fvu=float(fvu),
                    slot_concentration=float(np.nanmean(concentration))
                    if any(np.isfinite(concentration))
                    else math.nan,
                    attribute_agreement=float(np.mean(agreement)) if agreement else math.nan,
                )
            )
        start += len(rows)
        rows.clear()

    for row in dataset:
        rows.append(row)
        if len(rows) == batch_size:
            flush()
    flush()
    correlations = [
        correlate(
            [getattr(s, measure) for s in samples],
            [s.iou for s in samples],
            method=method,
            confidence=confidence,
            ci_method=ci_method,
            n_bootstrap=n_bootstrap,
            seed=seed,
            measure=measure,
        )
        for measure in QUALITY_MEASURES
        for method in ("spearman", "pearson")
    ]
    report = QualityAccuracyReport(samples, correlations)
    if plot_path is not None:
        report.plot_path = plot_quality_vs_accuracy(report, plot_path)
    return report


# =========================================================================== rendering
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_quality_vs_accuracy(report: QualityAccuracyReport, path: str | os.PathLike) -> Path:
    """Scatter of each quality measure against IoU, Spearman r and CI in the titles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = _figure(4.2 * len(QUALITY_MEASURES), 3.8)
    axes = figure.subplots(1, len(QUALITY_MEASURES), squeeze=False)[0]
    spearman = {c.measure: c for c in report.correlations if c.method == "spearman"}
    ious = np.array([s.iou for s in report.samples], dtype=float)
    for axis, measure in zip(axes, QUALITY_MEASURES):
        values = np.array([getattr(s, measure) for s in report.samples], dtype=float)
        keep = np.isfinite(values) & np.isfinite(ious)
        axis.scatter(values[keep], ious[keep], s=14, alpha=0.7, color="tab:blue")
        c = spearman.get(measure)
        if c is not None and c.n and math.isfinite(c.r):
            title = f"{measure}\nSpearman r={c.r:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}], n={c.n}"
        else:
            title = f"{measure}\n(not available)"
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(measure)
        axis.set_ylabel("mask IoU")
        axis.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    figure.savefig(path)
    return path


_SLOT_COLOURS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                 (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5))  # fmt: skip


def _as_rgb(image: Any, size: tuple[int, int]) -> np.ndarray:
    """Image as float RGB (H, W, 3) in [0, 1] at `size` (a grey canvas when None)."""
    if image is None:
        return np.full((*size, 3), 0.5)
    if hasattr(image, "convert"):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
    array = array.astype(float)
    array = array / 255.0 if array.max() > 1.0 else array
    if array.shape[:2] != tuple(size):
        tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float()
        array = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0]
        array = array.permute(1, 2, 0).numpy()
    return np.clip(array[..., :3], 0.0, 1.0)


def _concept_name(concept: ConceptContribution) -> str:
    name = f"#{concept.latent_id}"
    if concept.label:
        name += f" {concept.label}"
    if concept.tokens:
        name += f" ({concept.tokens[0].token})"
    return name if len(name) <= 28 else name[:27] + "..."


def render_explanation(
    explanation: ImageExplanation,
    image: Any,
    path: str | os.PathLike,
    *,
    max_concepts: int = 5,
    title: str | None = None,
) -> Path:
    """Draw one image's trace to a PNG.

    Top row: the image, each slot's heatmap over it (confidence in the title, "kept" or
    "dropped"), the kept slots' masks in slot colours. Bottom row: under each slot, a bar
    chart of its top concepts (weight in the slot; label and strongest token in the name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = explanation.image_size
    rgb = _as_rgb(image, size)
    slots = explanation.slots
    columns = len(slots) + 2
    figure = _figure(2.6 * columns, 5.4)
    grid = figure.add_gridspec(2, columns, height_ratios=[1.0, 0.9])
    axis = figure.add_subplot(grid[0, 0])
    axis.imshow(rgb)
    axis.set_title("image", fontsize=9)
    axis.axis("off")
    for i, slot in enumerate(slots):
        axis = figure.add_subplot(grid[0, i + 1])
        axis.imshow(rgb)
        axis.imshow(slot.heatmap.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        status = "kept" if slot.kept else ("no <REF_POS>" if not slot.has_ref else "dropped")
        axis.set_title(
            f"slot {slot.slot} heatmap\nconf {slot.confidence:.2f} ({status})", fontsize=9
        )
        axis.axis("off")
        bars = figure.add_subplot(grid[1, i + 1])
        concepts = slot.concepts[:max_concepts]
        if concepts:
            names = [_concept_name(c) for c in concepts][::-1]
            weights = [c.weight for c in concepts][::-1]
            bars.barh(range(len(concepts)), weights, color=_SLOT_COLOURS[i % len(_SLOT_COLOURS)])
            bars.set_yticks(range(len(concepts)))
            bars.set_yticklabels(names, fontsize=7)
            bars.set_xlabel("weight in slot", fontsize=8)
            bars.tick_params(axis="x", labelsize=7)
        else:
            bars.text(0.5, 0.5, "no active concept", ha="center", va="center", fontsize=8)
            bars.axis("off")
        bars.set_title(f"slot {slot.slot}: top concepts", fontsize=9)
    axis = figure.add_subplot(grid[0, columns - 1])
    overlay = rgb.copy()
    kept = explanation.kept_slots
    for slot in kept:
        colour = np.array(_SLOT_COLOURS[slot.slot % len(_SLOT_COLOURS)])
        mask = slot.mask.numpy().astype(bool)
        overlay[mask] = 0.45 * overlay[mask] + 0.55 * colour
    axis.imshow(overlay)
    axis.set_title(
        "masks: " + (", ".join(f"slot {s.slot}" for s in kept) if kept else "none kept"),
        fontsize=9,
    )
    axis.axis("off")
    text_axis = figure.add_subplot(grid[1, 0])
    text_axis.axis("off")
    text = explanation.completion or ""
    text_axis.text(
        0.0, 1.0, _wrap(text, 30), va="top", ha="left", fontsize=7, family="monospace",
        transform=text_axis.transAxes,
    )  # fmt: skip
    figure.add_subplot(grid[1, columns - 1]).axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def render_ablation(
    output: SegCompassOutput,
    edits: Mapping[str, AblationResult],
    sample: int,
    slot: int,
    path: str | os.PathLike,
    *,
    image: Any = None,
    threshold: float = 0.0,
    title: str | None = None,
) -> Path:
    """Draw what removing concepts did to one slot: heatmaps (top row) and masks (bottom).

    Column 1 is the unedited forward (`output`), then one column per entry of `edits`
    (e.g. ``{"top-3 removed": ..., "3 random removed": ...}``, `ablate_concepts` results on
    the same inputs). Titles give the mean |heatmap logit change| and the mask's 1 - IoU,
    soft change and mean |logit change| against the unedited mask. Maps are drawn on the
    (M, M) mask grid; `image` (square) is resized onto it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heat0 = output.heatmap_logits[sample, slot].detach().float().cpu()
    mask0 = output.mask_logits[sample, slot].detach().float().cpu()
    size = tuple(mask0.shape)
    rgb = _as_rgb(image, size)
    columns = [("unedited", heat0, mask0, None)]
    for name, result in edits.items():
        columns.append(
            (
                name,
                result.heatmap_logits[sample, slot].float().cpu(),
                result.mask_logits[sample, slot].float().cpu(),
                result,
            )
        )
    figure = _figure(2.7 * len(columns), 6.4)
    axes = figure.subplots(2, len(columns), squeeze=False)
    for c, (name, heat, mask, result) in enumerate(columns):
        top, bottom = axes[0][c], axes[1][c]
        top.imshow(rgb)
        top.imshow(torch.sigmoid(heat).numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        top.contour(heat.numpy() > threshold, levels=[0.5], colors="white", linewidths=0.8)
        overlay = rgb.copy()
        fg = (mask > threshold).numpy()
        overlay[fg] = 0.45 * overlay[fg] + 0.55 * np.array(_SLOT_COLOURS[0])
        bottom.imshow(overlay)
        if fg.any():
            bottom.contour(fg, levels=[0.5], colors="white", linewidths=0.8)
        if result is None:
            top.set_title(f"{name}\nheatmap (slot {slot})", fontsize=8)
            bottom.set_title(f"{name}\nmask: {int(fg.sum())} px", fontsize=8)
        else:
            top.set_title(
                f"{name}\nheatmap |d logit| {float(result.heatmap_change[sample, slot]):.3g}",
                fontsize=8,
            )
            bottom.set_title(
                f"mask 1-IoU {float(result.mask_change[sample, slot]):.3f}, "
                f"soft {float(result.soft_mask_change[sample, slot]):.2g}\n"
                f"|d logit| {float(result.mask_logit_change[sample, slot]):.3g}, "
                f"{int(fg.sum())} px",
                fontsize=8,
            )
        top.axis("off")
        bottom.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _wrap(text: str, width: int, max_lines: int = 14) -> str:
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + ["..."]
    return "\n".join(lines)


def write_report(
    explanations: Sequence[ImageExplanation],
    images: Sequence[Any] | None,
    folder: str | os.PathLike,
    *,
    title: str = "SegCompass concept trace",
    instructions: Sequence[str] | None = None,
    ablation_study: AblationStudy | None = None,
    quality: QualityAccuracyReport | None = None,
    max_concepts: int = 5,
) -> Path:
    """A static HTML report (no server): one PNG per image, the texts and concept tables.

    Writes ``folder/index.html`` and ``folder/image_{i}.png`` (paths in the HTML are
    relative, so the folder can be moved or zipped). Optional sections summarise an
    `AblationStudy` and a `QualityAccuracyReport` (its plot is copied next to the report).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images is not None and len(images) != len(explanations):
        raise ValueError(
            f"write_report: got {len(images)} images for {len(explanations)} explanations."
        )
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f"<html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "font-size:13px}pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    for i, explanation in enumerate(explanations):
        picture = render_explanation(
            explanation,
            images[i] if images is not None else None,
            folder / f"image_{i}.png",
            max_concepts=max_concepts,
        )
        parts.append(f"<h2>Image {i}</h2>")
        if instructions is not None and i < len(instructions):
            parts.append(f"<p><b>Instruction:</b> {esc(instructions[i])}</p>")
        parts.append(f"<img src='{picture.name}' alt='concept trace of image {i}' width='100%'>")
        if explanation.completion:
            parts.append(f"<p><b>Completion:</b></p><pre>{esc(explanation.completion)}</pre>")
        parts.append(
            f"<p>{explanation.num_active_concepts} distinct concepts active in the sequence.</p>"
        )
        for slot in explanation.slots:
            status = (
                "kept" if slot.kept else ("no &lt;REF_POS&gt;" if not slot.has_ref else "dropped")
            )
            parts.append(
                f"<h3>Slot {slot.slot}: confidence {slot.confidence:.3f} ({status}), "
                f"mask area {slot.mask_area} px</h3>"
            )
            if not slot.concepts:
                parts.append("<p>No active concept.</p>")
                continue
            parts.append(
                "<table><tr><th>latent</th><th>label</th><th>weight</th><th>share</th>"
                "<th>tokens it fired on (activation)</th></tr>"
            )
            for concept in slot.concepts[:max_concepts]:
                tokens = ", ".join(
                    f"{esc(t.token)} [{t.kind}] ({t.activation:.2f})" for t in concept.tokens
                )
                parts.append(
                    f"<tr><td>{concept.latent_id}</td><td>{esc(concept.label or '')}</td>"
                    f"<td>{concept.weight:.4f}</td><td>{concept.share:.1%}</td>"
                    f"<td>{tokens}</td></tr>"
                )
            parts.append("</table>")
    if ablation_study is not None:
        parts.append("<h2>Causal check: concept ablation</h2>")
        parts.append(_markdown_table_to_html(ablation_study.to_markdown()))
    if quality is not None:
        parts.append("<h2>Concept quality vs mask accuracy</h2>")
        parts.append(_markdown_table_to_html(quality.to_markdown()))
        if quality.plot_path is not None and Path(quality.plot_path).is_file():
            target = folder / "quality_vs_accuracy.png"
            if Path(quality.plot_path).resolve() != target.resolve():
                target.write_bytes(Path(quality.plot_path).read_bytes())
            parts.append(f"<img src='{target.name}' alt='quality vs accuracy' width='100%'>")
    parts.append("</body></html>")
    index = folder / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


def _markdown_table_to_html(markdown: str) -> str:
    """The small tables of `to_markdown` as HTML (header, separator, rows, then free text)."""
    out, rows = [], [line for line in markdown.splitlines()]
    table = [r for r in rows if r.startswith("|")]
    rest = [r for r in rows if r and not r.startswith("|")]
    if table:
        out.append("<table>")
        for n, line in enumerate(table):
            if n == 1:
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            tag = "th" if n == 0 else "td"
            out.append(
                "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"
            )
        out.append("</table>")
    out.extend(f"<p>{html.escape(line)}</p>" for line in rest)
    return "\n".join(out)


__all__ = [
    "AblationResult",
    "AblationStudy",
    "AblationStudyRecord",
    "ConceptContribution",
    "ConceptEffect",
    "ConceptRanking",
    "Correlation",
    "ImageExplanation",
    "PromptDependence",
    "QualityAccuracyReport",
    "SampleQuality",
    "SlotExplanation",
    "TokenActivation",
    "ablate_concepts",
    "build_explanation_inputs",
    "concept_ablation_study",
    "concept_quality_vs_accuracy",
    "correlate",
    "explain",
    "mask_prompt_dependence",
    "plot_quality_vs_accuracy",
    "render_ablation",
    "render_explanation",
    "slot_concept_totals",
    "top_concepts",
    "write_report",
]
