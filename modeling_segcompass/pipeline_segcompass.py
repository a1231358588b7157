"""ReasoningSegmentationPipeline: ``pipe(image, "instruction")`` -> masks, scores, text, concept trace.

Registered as the custom pipeline task ``"reasoning-segmentation"``; `hub.export` saves it
with the model, which writes ``custom_pipelines`` into config.json and copies this file, so
that ``pipeline(model=folder_or_repo, trust_remote_code=True)`` rebuilds it without this
package. The work is done by the model's `segment` (generate the chain of thought and the
`<REF_POS>` tokens, one forward, keep confident slots, masks at the original size); the
pipeline converts its result to plain Python / numpy and adds the concept trace
(PAPER.md, "The interpretability claim"): per slot, the SAE concepts it gathered most and
the tokens they fired on.

Remote-code file: imports only the standard library, numpy, torch and transformers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

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
