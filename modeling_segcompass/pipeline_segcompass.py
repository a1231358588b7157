"""ReasoningSegmentationPipeline: ``pipe(image, "instruction")`` -> masks, scores, text, concept trace.

Registered as the custom pipeline task ``"reasoning-segmentation"``; `hub.export` saves it
with the model, which writes ``custom_pipelines`` into config.json and copies this file, so
that ``pipeline(model=folder_or_repo, trust_remote_code=True)`` rebuilds it without this
package. The work is done by `segment` here, which the model's `segment` calls too (generate
the chain of thought and the `<REF_POS>` tokens, one forward, keep confident slots, masks at
the original size); the pipeline converts its result to plain Python / numpy and adds the concept trace
(the paper's interpretability claim, arXiv 2605.22658): per slot, the SAE concepts it gathered most and
the tokens they fired on.

Remote-code file: imports only the standard library, numpy, torch, transformers and its
flat siblings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .answer_format import AnswerTokenIds, grounding_problem, parse_answer_ids
from .input_checks import position_limit

logger = logging.getLogger(__name__)

TASK = "reasoning-segmentation"


def top_concepts_of_slot(
    slot_weights: torch.Tensor,
    concept_indices: torch.Tensor,
    concept_values: torch.Tensor,
    *,
    top_concepts: int = 5,
    top_tokens: int = 3,
) -> list[dict[str, Any]]:
    """The concepts one slot gathered most, with the positions they fired on.

    A concept's weight is the sum of the slot's weights over every (token, concept) entry
    holding that concept id (the codebook attends over (token, concept) pairs).

    Args:
        slot_weights: (L, n) how much each (token, active concept) fed this slot.
        concept_indices: (L, n) SAE latent ids.
        concept_values: (L, n) their activations (0 = inactive or padding).
        top_concepts: concepts to keep, by total weight.
        top_tokens: positions to list per concept, by the slot's weight there.

    Returns:
        ``[{"id", "weight", "positions": [{"position", "activation", "weight"}, ...]}, ...]``
        sorted by decreasing weight; concepts with zero weight are left out.
    """
    if not (slot_weights.shape == concept_indices.shape == concept_values.shape):
        raise ValueError(
            "Expected slot_weights, concept_indices and concept_values of the same (L, n) "
            f"shape, got {tuple(slot_weights.shape)}, {tuple(concept_indices.shape)} and "
            f"{tuple(concept_values.shape)}."
        )
    weights = slot_weights.detach().float().cpu()
    indices = concept_indices.detach().cpu().long()
    values = concept_values.detach().float().cpu()
    active = values != 0
    flat_ids = indices[active]  # (A,)
    if flat_ids.numel() == 0:
        return []
    flat_weights = weights[active]
    ids, inverse = flat_ids.unique(return_inverse=True)
    totals = torch.zeros(ids.numel()).index_add_(0, inverse, flat_weights)  # (U,)
    order = torch.argsort(totals, descending=True, stable=True)[:top_concepts]
    out = []
    for u in order.tolist():
        if totals[u] <= 0:
            continue
        concept = int(ids[u])
        rows, cols = torch.nonzero(active & (indices == concept), as_tuple=True)
        entry_weights = weights[rows, cols]
        best = torch.argsort(entry_weights, descending=True, stable=True)[:top_tokens]
        positions = [
            {
                "position": int(rows[b]),
                "activation": float(values[rows[b], cols[b]]),
                "weight": float(entry_weights[b]),
            }
            for b in best.tolist()
        ]
        out.append({"id": concept, "weight": float(totals[u]), "positions": positions})
    return out


def concept_trace(
    result: Any,
    tokenizer: Any = None,
    *,
    top_concepts: int = 5,
    top_tokens: int = 3,
) -> list[dict[str, Any]]:
    """Per slot: confidence, whether it was kept, its top concepts and the tokens they fired on.

    Args:
        result: a `SegmentationResult` of `model.segment` (fields ``conf_logits`` (K,),
            ``slot_indices`` (N,), ``concept_indices`` / ``concept_values`` (L, n),
            ``slot_concept_weights`` (K, L, n), ``input_ids`` (L,)).
        tokenizer: decodes the token at each position (ids only when None).

    Returns:
        One dict per slot k = 0..K-1: ``{"slot", "kept", "confidence", "concepts"}`` where
        each concept is ``{"id", "weight", "tokens": [{"position", "token_id", "token",
        "activation", "weight"}]}`` (JSON-serialisable).
    """
    kept = {int(i) for i in torch.as_tensor(result.slot_indices).reshape(-1).tolist()}
    input_ids = torch.as_tensor(result.input_ids).reshape(-1).tolist()
    conf = torch.as_tensor(result.conf_logits).detach().float().cpu().reshape(-1)
    trace = []
    for slot in range(conf.numel()):
        concepts = top_concepts_of_slot(
            result.slot_concept_weights[slot],
            result.concept_indices,
            result.concept_values,
            top_concepts=top_concepts,
            top_tokens=top_tokens,
        )
        for concept in concepts:
            tokens = []
            for entry in concept.pop("positions"):
                token_id = input_ids[entry["position"]]
                text = tokenizer.decode([token_id]) if tokenizer is not None else f"id{token_id}"
                tokens.append({"token_id": token_id, "token": text, **entry})
            concept["tokens"] = tokens
        trace.append(
            {
                "slot": slot,
                "kept": slot in kept,
                "confidence": 1.0 / (1.0 + math.exp(-float(conf[slot]))),
                "concepts": concepts,
            }
        )
    return trace


# --------------------------------------------------------------------------- segment
def check_prompt_lengths(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    max_new_tokens: int,
) -> None:
    """Refuse a prompt that, with the generation budget, runs past the VLM's positions.

    The processor cannot know the model's limit, so `segment` checks where the two meet.
    Lengths are counted in tokens: the prompt (image tokens included) plus
    ``max_new_tokens``, the longest sequence the forward after generation may see.

    Raises:
        ValueError: naming the row, the lengths and the fix.
    """
    limit = position_limit(model)
    if limit is None:
        return
    lengths = attention_mask.sum(-1).tolist()  # (B,) prompt tokens, padding left out
    for i, length in enumerate(lengths):
        if length + max_new_tokens <= limit:
            continue
        image_tokens = int(((input_ids[i] == image_token_id) & attention_mask[i].bool()).sum())
        fix = (
            f"lower max_new_tokens to at most {limit - length}, shorten the instruction"
            if length < limit
            else "shorten the instruction"
        )
        raise ValueError(
            f"segment(): instructions[{i}] with images[{i}] makes a prompt of {length} tokens "
            f"({image_tokens} of them for the image); with "
            f"max_new_tokens={max_new_tokens} the sequence may reach {length + max_new_tokens} "
            f"tokens, more than the VLM's max_position_embeddings={limit}. To fit, {fix}, "
            "or give a smaller image (fewer image tokens)."
        )


@dataclass
class SegmentationResult:
    """What `segment` returns for one image.

    Attributes:
        text: the generated completion (chain of thought and `<REF_POS>` tokens).
        masks: (N, H, W) bool masks of the kept slots at the original image size.
        scores: (N,) sigmoid of the kept slots' confidence logits.
        slot_indices: (N,) which of the K slots each mask came from.
        heatmaps: (K, H, W) sigmoid heatmaps of every slot at the original image size.
        conf_logits: (K,) confidence logits of every slot.
        input_ids: (L,) the prompt + completion the forward ran on (padding removed).
        concept_indices: (L, n) active SAE latents per token of `input_ids`.
        concept_values: (L, n) their activations.
        slot_concept_weights: (K, L, n) how much each (token, concept) fed each slot.
        reason: why there is no mask (None when there is at least one).
    """

    text: str
    masks: torch.Tensor
    scores: torch.Tensor
    slot_indices: torch.Tensor
    heatmaps: torch.Tensor
    conf_logits: torch.Tensor
    input_ids: torch.Tensor
    concept_indices: torch.Tensor
    concept_values: torch.Tensor
    slot_concept_weights: torch.Tensor
    reason: str | None = None


@torch.no_grad()
def segment(
    model: Any,
    images: Any,
    instructions: str | list[str],
    processor: Any = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    confidence_threshold: float | None = None,
    mask_threshold: float | None = None,
    generation_kwargs: dict[str, Any] | None = None,
    strict_format: bool = True,
) -> list[SegmentationResult]:
    """Segment what each instruction implies with `model`: generate the reasoning, then one
    forward (`SegCompassForReasoningSegmentation.segment` calls this).

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        images: one image or a list (PIL of any mode, numpy, tensors).
        instructions: one instruction per image.
        processor: a `SegCompassProcessor` (default: `model.processor` if attached).
        max_new_tokens: generation budget; it must cover the longest reasoning plus the
            K `<REF_POS>` tokens, or those samples end without a mask.
        do_sample: sample instead of greedy decoding.
        confidence_threshold: keep slots whose confidence logit is >= this
            (default `config.slot_confidence_threshold`).
        mask_threshold: mask logits above this are foreground (default `config.mask_threshold`).
        generation_kwargs: extra arguments for `generate`.
        strict_format: ground only completions whose format is sound (see
            `answer_format.grounding_problem`: one finished `<think>...</think>` block, then 1 to
            K `<REF_POS>` tokens); others get no mask and a `reason`. False grounds the
            last K `<REF_POS>` tokens of any completion, whatever its format.

    Returns:
        One `SegmentationResult` per image. A completion without `<REF_POS>` (or, when
        `strict_format`, with a broken format) gets no mask and a `reason`; it never raises.

    Raises:
        ValueError: for inputs the processor refuses (naming ``images[i]`` or
            ``instructions[i]``), and for a prompt whose tokens plus ``max_new_tokens`` run
            past the VLM's ``max_position_embeddings`` (`check_prompt_lengths`), before
            anything is generated.
    """
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            "segment() needs a SegCompassProcessor: pass `processor=` or attach one with "
            "`model.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)`."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(
            f"segment(): max_new_tokens must be a positive int, got {max_new_tokens!r}."
        )
    model.config.check_special_tokens(processor)
    cfg = model.config
    conf_threshold = (
        cfg.slot_confidence_threshold if confidence_threshold is None else confidence_threshold
    )
    mask_thr = cfg.mask_threshold if mask_threshold is None else mask_threshold
    single = not isinstance(instructions, (list, tuple))
    instruction_list = [instructions] if single else list(instructions)
    image_list = [images] if single or not isinstance(images, (list, tuple)) else list(images)
    enc = processor(images=image_list, instructions=instruction_list, return_tensors="pt")
    check_prompt_lengths(
        model, enc["input_ids"], enc["attention_mask"], processor.image_token_id, max_new_tokens
    )
    device = model.device
    enc = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}
    tokenizer = processor.tokenizer
    stop_ids = [
        i
        for i in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
        if isinstance(i, int) and i >= 0
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    vlm_inputs = {
        k: enc[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        if k in enc
    }
    generated = model.vlm.generate(
        **vlm_inputs,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **(generation_kwargs or {}),
    )  # (B, Lp + T)
    prompt_len = enc["input_ids"].shape[1]
    completion = generated[:, prompt_len:]  # (B, T)
    # keep tokens up to and including the first stop token
    is_stop = torch.zeros_like(completion, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= completion == stop
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0  # (B, T)
    completion_mask = ~after_stop
    completion = completion.masked_fill(after_stop, pad_id)
    input_ids = torch.cat([enc["input_ids"], completion], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], completion_mask.long()], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        sam_pixel_values=enc["sam_pixel_values"],
        valid_mask=enc.get("valid_mask"),  # the image area, for config.heatmap_outside_fill
        compute_logits=False,
    )
    masks = processor.post_process_masks(
        out.mask_logits.float(),
        enc["original_sizes"],
        enc["reshaped_input_sizes"],
        threshold=mask_thr,
    )
    heatmaps = processor.post_process_masks(
        out.heatmap_logits.float(),
        enc["original_sizes"],
        enc["reshaped_input_sizes"],
        threshold=None,
    )
    results = []
    for b in range(input_ids.shape[0]):
        keep_tokens = attention_mask[b].bool()
        answer = parse_answer_ids(
            completion[b][completion_mask[b]].tolist(),
            AnswerTokenIds.from_config(cfg),
            lambda run: tokenizer.decode(run, skip_special_tokens=False),
        )
        conf = out.conf_logits[b].float()
        kept = (conf >= conf_threshold) & out.ref_mask[b]
        reason = grounding_problem(answer, cfg.num_slots)
        if not strict_format and answer.num_ref > 0:
            reason = None  # permissive: ground the last K <REF_POS> whatever the format
        grounded = conf[out.ref_mask[b]]  # (k,) slots that have a <REF_POS> token, k may be 0
        if reason is None and grounded.numel() == 0:
            # the answer parser and the forward both find <REF_POS> by id, so this only
            # guards the message below: never take the max of an empty selection
            reason = "no <REF_POS> token reached the forward, so no slot is grounded"
        if reason is not None:
            kept = torch.zeros_like(kept)
        elif not kept.any():
            reason = (
                f"no slot reached the confidence threshold {conf_threshold} (highest "
                f"confidence logit {float(grounded.max()):.3f}): the model "
                "answers that there is no such object"
            )
        slot_idx = kept.nonzero(as_tuple=True)[0]
        text = tokenizer.decode(completion[b][completion_mask[b]], skip_special_tokens=True)
        results.append(
            SegmentationResult(
                text=text.strip(),
                masks=masks[b][slot_idx].cpu(),
                scores=torch.sigmoid(conf[slot_idx]).cpu(),
                slot_indices=slot_idx.cpu(),
                heatmaps=torch.sigmoid(heatmaps[b]).cpu(),
                conf_logits=conf.cpu(),
                input_ids=input_ids[b][keep_tokens].cpu(),
                concept_indices=out.concept_indices[b][keep_tokens].cpu(),
                concept_values=out.concept_values[b][keep_tokens].cpu(),
                slot_concept_weights=out.slot_concept_weights[b][:, keep_tokens].cpu(),
                reason=reason,
            )
        )
    return results


# --------------------------------------------------------------------------- pipeline
class ReasoningSegmentationPipeline(Pipeline):
    """Reasoning segmentation: an image and an instruction in, masks and their reasons out.

    Example::

        from transformers import pipeline
        pipe = pipeline(model="path/or/repo", trust_remote_code=True)
        out = pipe(image, "the object you would use to cut bread")
        out["masks"]            # list of (H, W) bool arrays, one per found object
        out["scores"]           # their confidences (sigmoid of the slot confidence logits)
        out["text"]             # the generated "<think> ... </think> <REF_POS>" completion
        out["concept_trace"]    # per slot: top SAE concepts and the tokens they fired on
        out["reason"]           # why there is no mask (None when the answer is well formed)

    Call arguments (also accepted by the constructor as defaults): ``max_new_tokens``,
    ``do_sample``, ``confidence_threshold`` (on the slot logits), ``mask_threshold``,
    ``generation_kwargs`` (passed to `generate`), ``strict_format`` (default True: a completion
    whose format is broken gets no mask and a reason), ``top_concepts`` and ``top_tokens`` (size
    of the trace), ``return_heatmaps`` (add the (K, H, W) slot heatmaps).

    Inputs: ``pipe(image, instruction)``, ``pipe({"image": ..., "instruction": ...})`` or lists
    of either (one result per image). Images: PIL, numpy, torch, or a path / URL string.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    _FORWARD_KEYS = (
        "max_new_tokens",
        "do_sample",
        "confidence_threshold",
        "mask_threshold",
        "generation_kwargs",
        "strict_format",
    )
    _POSTPROCESS_KEYS = ("top_concepts", "top_tokens", "return_heatmaps")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Refuse a processor whose <REF_POS> id is not the model's now, not at the first call.
        check = getattr(getattr(self.model, "config", None), "check_special_tokens", None)
        if check is not None and getattr(self, "processor", None) is not None:
            check(self.processor)

    def __repr__(self) -> str:
        model = self.model
        return f"{type(self).__name__}(model={type(model).__name__}, device={self.device})"

    def __call__(self, images: Any, instruction: str | list[str] | None = None, **kwargs: Any):
        """Segment ``images`` by ``instruction`` (see the class docstring for the output)."""
        return super().__call__(self._pack(images, instruction), **kwargs)

    @staticmethod
    def _pack(images: Any, instruction: str | list[str] | None) -> Any:
        if instruction is None:
            if isinstance(images, dict) or (
                isinstance(images, list) and images and all(isinstance(x, dict) for x in images)
            ):
                return images
            raise ValueError(
                "ReasoningSegmentationPipeline: expected an instruction, e.g. "
                'pipe(image, "the red circle") or pipe({"image": image, "instruction": "..."}).'
            )
        if isinstance(images, (list, tuple)):
            instructions = (
                [instruction] * len(images) if isinstance(instruction, str) else instruction
            )
            if len(instructions) != len(images):
                raise ValueError(
                    f"ReasoningSegmentationPipeline: expected one instruction per image, got "
                    f"{len(images)} images and {len(instructions)} instructions."
                )
            return [{"image": i, "instruction": t} for i, t in zip(images, instructions)]
        if not isinstance(instruction, str):
            raise TypeError(
                "ReasoningSegmentationPipeline: for one image, the instruction must be a str, got "
                f"{type(instruction).__name__}."
            )
        return {"image": images, "instruction": instruction}

    def _sanitize_parameters(self, **kwargs: Any):
        unknown = set(kwargs) - set(self._FORWARD_KEYS) - set(self._POSTPROCESS_KEYS)
        if unknown:
            raise TypeError(
                f"ReasoningSegmentationPipeline: unknown arguments {sorted(unknown)}; expected "
                f"some of {sorted(self._FORWARD_KEYS + self._POSTPROCESS_KEYS)}."
            )
        forward = {k: kwargs[k] for k in self._FORWARD_KEYS if kwargs.get(k) is not None}
        post = {k: kwargs[k] for k in self._POSTPROCESS_KEYS if kwargs.get(k) is not None}
        return {}, forward, post

    def preprocess(self, inputs: Any) -> dict[str, Any]:
        if not isinstance(inputs, dict) or "image" not in inputs or "instruction" not in inputs:
            raise ValueError(
                "ReasoningSegmentationPipeline: each input must be an image with an instruction "
                f"(or a dict with keys 'image' and 'instruction'), got {type(inputs).__name__}."
            )
        image = inputs["image"]
        if isinstance(image, str):
            from transformers.image_utils import load_image

            image = load_image(image)
        return {"image": image, "instruction": inputs["instruction"]}

    def _forward(self, model_inputs: dict[str, Any], **segment_kwargs: Any) -> dict[str, Any]:
        results = self.model.segment(
            [model_inputs["image"]],
            [model_inputs["instruction"]],
            processor=self.processor,
            **segment_kwargs,
        )
        return {"result": results[0]}

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        top_concepts: int = 5,
        top_tokens: int = 3,
        return_heatmaps: bool = False,
    ) -> dict[str, Any]:
        result = model_outputs["result"]
        masks = torch.as_tensor(result.masks).detach().cpu().bool()  # (N, H, W)
        out = {
            "masks": [np.asarray(m.numpy(), dtype=bool) for m in masks],
            "scores": [float(s) for s in torch.as_tensor(result.scores).reshape(-1).tolist()],
            "slot_indices": [int(i) for i in torch.as_tensor(result.slot_indices).reshape(-1)],
            "text": result.text,
            "reason": result.reason,
            "concept_trace": concept_trace(
                result, self.tokenizer, top_concepts=top_concepts, top_tokens=top_tokens
            ),
        }
        if return_heatmaps:
            out["heatmaps"] = torch.as_tensor(result.heatmaps).detach().float().cpu().numpy()
        return out


def register_pipeline() -> None:
    """Register ``"reasoning-segmentation"`` so that `save_pretrained` records it in config.json."""
    current = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if current is ReasoningSegmentationPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=ReasoningSegmentationPipeline,
        pt_model=AutoModel,
        type="multimodal",
    )


register_pipeline()

__all__ = [
    "TASK",
    "ReasoningSegmentationPipeline",
    "concept_trace",
    "register_pipeline",
    "top_concepts_of_slot",
]
