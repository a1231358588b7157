"""modeling_segcompass: SegCompass (arXiv 2605.22658) as a Hugging Face Transformers model package.

The core classes import eagerly and the ``reasoning-segmentation`` pipeline task is registered
on import, so that ``pipeline("reasoning-segmentation", model=model, processor=processor)``
works after ``import modeling_segcompass``; trainer-side modules (trl, datasets, matplotlib) are
imported on first use of their names so that the import stays light.
"""

from importlib import import_module
from typing import Any

from transformers import AutoConfig, AutoModel

from .configuration_segcompass import SegCompassConfig
from .conv_image_encoder import ConvImageEncoder
from .modeling_segcompass import (
    SegCompassForReasoningSegmentation,
    SegCompassOutput,
    SegCompassPreTrainedModel,
)
from .pipeline_segcompass import register_pipeline
from .query_codebook import QueryCodebook
from .slot_mapper import SlotMapper, UpstreamSlotMapper
from .sparse_autoencoder import SparseAutoencoder

__version__ = "0.1.0"

AutoConfig.register("segcompass", SegCompassConfig, exist_ok=True)
AutoModel.register(SegCompassConfig, SegCompassForReasoningSegmentation, exist_ok=True)
SegCompassConfig.register_for_auto_class()
SegCompassForReasoningSegmentation.register_for_auto_class("AutoModel")
register_pipeline()  # the task "reasoning-segmentation" (transformers is already imported)

# name -> submodule (dotted, relative to this package) for names imported on first use
_LAZY = {
    "SegCompassProcessor": "processing_segcompass",
    "SegCompassCollator": "data.collator",
    "build_tiny_tokenizer": "assembly.tokenizer_builder",
    "convert_upstream_checkpoint": "assembly.upstream",
    "convert_upstream_state_dict": "assembly.upstream",
    "SegmentationMetrics": "evaluation.metrics",
    "MetricsResult": "evaluation.metrics",
    "segmentation_metrics": "evaluation.metrics",
    "format_reward": "training.rewards",
    "mask_reward": "training.rewards",
    "multi_object_mask_reward": "training.rewards",
    "segcompass_reward": "training.rewards",
    "SegCompassTrainer": "training.sft",
    "ModuleLearningRates": "training.sft",
    "train_sft": "training.sft",
    "pretrain_sae_for_model": "training.sae_training",
    "SegCompassGRPOConfig": "training.grpo_config",
    "SegCompassGRPOTrainer": "training.grpo_trainer",
    "explain": "interpret.explain",
    "ablate_concepts": "interpret.ablation",
    "concept_quality_vs_accuracy": "interpret.quality",
    "ReasoningSegmentationPipeline": "pipeline_segcompass",
    "export": "serving.hub",
    "push_to_hub": "serving.hub",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConvImageEncoder",
    "QueryCodebook",
    "SegCompassConfig",
    "SegCompassForReasoningSegmentation",
    "SegCompassOutput",
    "SegCompassPreTrainedModel",
    "SlotMapper",
    "SparseAutoencoder",
    "UpstreamSlotMapper",
    *_LAZY,
]
