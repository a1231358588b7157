"""`explain`: per image and slot, the concepts behind the mask, as typed results.

For each slot: its top SAE concepts (latent id, weight in the slot, label, the tokens they
fired on with their activations), the heatmap, the mask and the confidence, as dataclasses
with ``to_dict()`` for JSON and ``to_text()`` for people. A slot's weight on a latent is
`trace.slot_concept_totals`; with ``rank_by="attribution"`` the concepts are ranked by how
much of the slot's mask they carry (`attribution.attribute_pairs`) instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..modeling_segcompass import SegCompassOutput
from .attribution import attribute_pairs
from .labels import ConceptLabels, ConceptWords, TokenInfo, describe_tokens
from .trace import _active_latents, _check_inputs, _forward, slot_concept_totals


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
        words: the concept in attribute words (`labels.ConceptWords.describe`), None without
            ``words``.
        attribution: its share of the slot's mask score (``rank_by="attribution"``), else None.
    """

    latent_id: int
    weight: float
    share: float
    label: str | None
    num_tokens: int
    tokens: list[TokenActivation] = field(default_factory=list)
    words: str | None = None
    attribution: float | None = None


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

    def to_text(self) -> str:
        """The trace for people: per slot, its concepts in words with their tokens."""
        lines = [f"image {self.index}: {self.prompt or ''}".rstrip()]
        if self.cot:
            lines.append(f"  reasoning: {self.cot}")
        for slot in self.slots:
            state = "kept" if slot.kept else "dropped"
            lines.append(
                f"  slot {slot.slot} ({state}, confidence {slot.confidence:.2f}, "
                f"mask {slot.mask_area} px):"
            )
            for c in slot.concepts:
                meaning = c.words or (f'"{c.label}"' if c.label else "unlabelled")
                carried = "" if c.attribution is None else f", carries {c.attribution:+.3f}"
                fired = ", ".join(t.token for t in c.tokens)
                lines.append(
                    f"    #{c.latent_id} {meaning} (weight {c.weight:.3f}{carried}; on {fired})"
                )
        return "\n".join(lines)

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
    words: Mapping[int, ConceptWords] | None = None,
    rank_by: str = "weight",
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
        words: latent -> `labels.ConceptWords` (`labels.concepts_in_words`): each concept is
            also described in attribute words.
        rank_by: "weight" (the slot's raw weight, attention x activation) or "attribution"
            (the concept's share of the slot's mask, integrated gradients; slots without a
            mask keep the weight order).

    Returns:
        One `ImageExplanation` per row of the batch.
    """
    _check_inputs(inputs, "explain")
    if rank_by not in ("weight", "attribution"):
        raise ValueError(f"explain: rank_by must be 'weight' or 'attribution', got {rank_by!r}.")
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
    attributed: dict[tuple[int, int], torch.Tensor] = {}
    if rank_by == "attribution":
        nonempty = (output.mask_logits.detach().cpu() > fg_threshold).flatten(2).any(-1)
        slots_with_mask = [(int(b), int(k)) for b, k in nonempty.nonzero().tolist()]
        if slots_with_mask:
            with torch.enable_grad():
                result = attribute_pairs(model, inputs, output, slots=slots_with_mask)
            attributed = dict(zip(result.slots, result.concepts))
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
            order = attributed.get((b, k), totals)
            count = min(top_n, int((order > 0).sum()))
            top = order.topk(count) if count else None
            concepts = []
            for latent in top.indices.tolist() if top else []:
                weight = float(totals[latent])
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
                        words=words[latent].describe() if words and latent in words else None,
                        attribution=float(attributed[(b, k)][latent])
                        if (b, k) in attributed
                        else None,
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
