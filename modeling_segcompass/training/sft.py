"""Supervised fine-tuning of SegCompass with `transformers.Trainer`.

The loss is the model's own (`SegCompassForReasoningSegmentation.forward` with ``labels``
and ``gt_masks``): LM cross-entropy on the gold response + segmentation losses (+ the SAE
reconstruction term when ``config.sae_reconstruction_weight > 0``). This module adds what
the plain Trainer lacks:

* per-module learning rates (the paper's training section, arXiv 2605.22658): the new heads
  learn many times faster than the LLM, through the optimizer's parameter groups
  (:class:`ModuleLearningRates`, :func:`build_param_groups`, :class:`SegCompassTrainer`);
* LoRA on the VLM's language-model attention while the new heads train fully
  (:func:`apply_lora`), merging for export (:func:`merge_lora`) and the PEFT adapter
  folder (:func:`save_lora_adapter`), all in :mod:`.lora` and re-exported here;
* atomic checkpoints and resume from the last complete one (:mod:`.checkpointing`);
* the loss components (lm / seg / conf / sae) in the training logs.

Library side (not remote code).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import get_parameter_names
from transformers.trainer_utils import TrainOutput

from .checkpointing import AtomicCheckpointMixin
from .lora import (
    HEAD_MODULES,
    LORA_PROJECTIONS,
    apply_lora,
    default_lora_config,
    has_lora,
    lora_target_modules,
    merge_lora,
    save_lora_adapter,
)
from .upstream_recipe import one_cycle_cosine_scheduler

logger = logging.getLogger(__name__)

#: Top-level submodules of `SegCompassForReasoningSegmentation`, one learning-rate group each.
MODULE_NAMES: tuple[str, ...] = (
    "vlm",
    *HEAD_MODULES,
)
# Wrappers that prefix parameter names: PEFT (`base_model.model.`), DDP (`module.`),
# torch.compile (`_orig_mod.`).
_WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")


@dataclass
class ModuleLearningRates:
    """Learning-rate multipliers per module: group lr = ``base_lr * multiplier``.

    Defaults follow the per-module learning rates of arXiv 2605.22658 (base 1e-6 to 2e-6 for
    the LLM; codebook x25-30, slot mapper x25-80, prompt encoder x10, mask decoder x5-10),
    taking the lower end of each published range. The paper does not give multipliers for the SAE
    and the image encoder: both arrive pretrained (SAE pretraining, SAM's ViT), so they get
    the LLM's rate (x1). A multiplier of 0 freezes a module (its parameters stay out of the
    optimizer). For the tiny from-scratch default use :meth:`uniform` with base lr 3e-3
    (at that scale one AdamW rate for every module trains best).
    """

    vlm: float = 1.0
    """The multimodal LLM's own (non-LoRA) parameters; the base rate."""
    lora: float = 1.0
    """LoRA adapters inside the VLM (see :func:`apply_lora`)."""
    sae: float = 1.0
    """The sparse autoencoder (pretrained, then trained jointly)."""
    codebook: float = 25.0
    """The query codebook (paper: x25-30)."""
    slot_mapper: float = 25.0
    """The slot mapper and its confidence head (paper: x25-80)."""
    image_encoder: float = 1.0
    """SAM's vision encoder or the conv encoder of the tiny default."""
    prompt_encoder: float = 10.0
    """SAM's prompt encoder (paper: x10)."""
    mask_decoder: float = 5.0
    """SAM's mask decoder (paper: x5-10)."""
    other: float = 1.0
    """Any parameter outside the modules above (e.g. added by a subclass)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"ModuleLearningRates.{f.name} must be a finite number >= 0 (a multiplier "
                    f"of the base learning rate; 0 freezes the module), got {value!r}."
                )

    @classmethod
    def paper(cls) -> ModuleLearningRates:
        """The published multipliers (the defaults)."""
        return cls()

    @classmethod
    def upstream(cls) -> ModuleLearningRates:
        """The multipliers of the authors' code (`verl/workers/fsdp_workers.py`, the launch
        scripts): codebook x30, slot mapper x25, prompt encoder x10, mask decoder x5 of the
        base rate (their 1.6e-6, `upstream_recipe.UPSTREAM_BASE_LR`); the SAE (frozen during
        RL) and SAM's image encoder (its embeddings are cached) at 0, i.e. frozen. Which VLM
        parameters train is `upstream_recipe.freeze_like_upstream`."""
        return cls(codebook=30.0, slot_mapper=25.0, prompt_encoder=10.0, mask_decoder=5.0,
                   sae=0.0, image_encoder=0.0)  # fmt: skip

    @classmethod
    def uniform(cls) -> ModuleLearningRates:
        """Every multiplier 1.0: one learning rate for everything (the tiny default)."""
        return cls(**{f.name: 1.0 for f in dataclasses.fields(cls)})

    def multiplier(self, module: str) -> float:
        """The multiplier of a module name from :func:`module_of_parameter`."""
        if module not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(
                f"No learning-rate multiplier for module {module!r}; known: "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return float(getattr(self, module))


def module_of_parameter(name: str) -> str:
    """Which learning-rate group a parameter name belongs to.

    >>> module_of_parameter("codebook.codebook")
    'codebook'
    >>> module_of_parameter("vlm.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight")
    'lora'
    >>> module_of_parameter("module.mask_decoder.iou_token.weight")
    'mask_decoder'
    """
    stripped = name
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if stripped.startswith(prefix):
                stripped = stripped[len(prefix) :]
                changed = True
    if ".lora_" in f".{stripped}":
        return "lora"
    head = stripped.split(".", 1)[0]
    return head if head in MODULE_NAMES else "other"


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that get weight decay.

    The rule of `transformers.Trainer` (no decay for biases, LayerNorm weights and names
    matching "norm" / "layernorm" / "rmsnorm"), tightened in two ways the Trainer's rule
    misses on this model: no decay for any normalisation layer whatever its name (Qwen2.5-VL's
    vision blocks call their RMSNorms ``norm1`` / ``norm2``), and none for 1-D parameters
    (SAE biases, jumprelu thresholds; decaying a threshold would silently densify codes).
    """
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    trainer_rule = set(get_parameter_names(model, [nn.LayerNorm], forbidden))
    norm_params = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False)
    }
    return [
        name
        for name, param in model.named_parameters()
        if name in trainer_rule and name not in norm_params and param.dim() >= 2
    ]


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    multipliers: ModuleLearningRates | None = None,
    weight_decay: float = 0.0,
    *,
    decay_parameters: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one per (module, decay / no decay), with its own lr.

    Usable with any `torch.optim` optimizer: ``AdamW(build_param_groups(model, 1e-6))``.
    Learning-rate schedulers (`LambdaLR` and the Trainer's) scale every group's own lr, so
    the ratios hold for the whole run.

    Args:
        model: a `SegCompassForReasoningSegmentation` (optionally wrapped by PEFT / DDP).
        base_lr: learning rate of the LLM (multiplier 1.0).
        multipliers: per-module multipliers (default :meth:`ModuleLearningRates.paper`).
        weight_decay: decay of the decayed groups (others get 0).
        decay_parameters: names that get weight decay (default :func:`decay_parameter_names`,
            the Trainer's rule plus every norm layer and 1-D parameter).

    Returns:
        A list of dicts with keys ``params`` (list of tensors), ``lr``, ``weight_decay``,
        ``name`` (e.g. ``"codebook"`` or ``"codebook.no_decay"``) and ``lr_multiplier``.
        Frozen parameters (``requires_grad=False``) and modules with multiplier 0 are left out;
        empty groups are omitted.
    """
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
        raise ValueError(f"build_param_groups: base_lr must be a number > 0, got {base_lr!r}.")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(
            f"build_param_groups: weight_decay must be a number >= 0, got {weight_decay!r}."
        )
    multipliers = ModuleLearningRates.paper() if multipliers is None else multipliers
    if not isinstance(multipliers, ModuleLearningRates):
        raise TypeError(
            "build_param_groups: multipliers must be a ModuleLearningRates, got "
            f"{type(multipliers).__name__}; e.g. ModuleLearningRates(codebook=30.0)."
        )
    decay = set(decay_parameter_names(model) if decay_parameters is None else decay_parameters)
    groups: dict[str, dict[str, Any]] = {}
    frozen_modules: set[str] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = module_of_parameter(name)
        factor = multipliers.multiplier(module)
        if factor == 0:
            frozen_modules.add(module)
            continue
        decayed = name in decay
        key = module if decayed else f"{module}.no_decay"
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": base_lr * factor,
                "weight_decay": weight_decay if decayed else 0.0,
                "name": key,
                "lr_multiplier": factor,
            }
        groups[key]["params"].append(param)
    if frozen_modules:
        logger.info("Multiplier 0: %s left out of the optimizer.", sorted(frozen_modules))
    if not groups:
        raise ValueError(
            "build_param_groups: no trainable parameter (all have requires_grad=False or "
            "multiplier 0); unfreeze some modules or raise their multipliers."
        )
    return list(groups.values())


def set_training_step(model: nn.Module, step: int) -> None:
    """Set ``training_step`` (optimisation steps done) on the SegCompass model inside `model`.

    The model's loss schedule (``config.loss_schedule_step``) reads it, as upstream's actor
    reads its ``global_steps``: `SegCompassTrainer` and the GRPO trainer call this with the
    Trainer's ``state.global_step`` before each step; a custom loop calls it itself. Wrappers
    (DDP ``.module``, PEFT ``get_base_model()``, ``torch.compile``'s ``_orig_mod``) are looked
    through.
    """
    inner = model
    for _ in range(8):  # a few nested wrappers at most
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod
        else:
            break
    inner.training_step = int(step)


class SegCompassTrainer(AtomicCheckpointMixin, Trainer):
    """`transformers.Trainer` with per-module learning rates, atomic checkpoints, loss parts.

    Args:
        module_learning_rates: multipliers of ``args.learning_rate`` per module (default
            :meth:`ModuleLearningRates.paper`; use :meth:`ModuleLearningRates.uniform` for one
            rate). Ignored when ``optimizers=`` supplies an optimizer.
        one_cycle_final_div_factor: None (``args.lr_scheduler_type`` applies) or F: upstream's
            OneCycle cosine from the peak to peak / F (upstream: 6.7;
            `upstream_recipe.one_cycle_cosine_scheduler`).
        *args, **kwargs: those of `transformers.Trainer`.

    The model's loss is a mean, so the Trainer must divide it by the gradient-accumulation
    steps and must not pass ``num_items_in_batch`` into the forward: this is set here
    (``model_accepts_loss_kwargs = False``).
    """

    LOSS_PARTS: tuple[str, ...] = ("lm_loss", "seg_loss", "conf_loss", "sae_loss")

    def __init__(
        self,
        *args: Any,
        module_learning_rates: ModuleLearningRates | None = None,
        one_cycle_final_div_factor: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.one_cycle_final_div_factor = one_cycle_final_div_factor
        # The collator's processor and the model meet here: refuse a tokenizer whose
        # <REF_POS> (or think) ids are not the model's before any step trains on them.
        processor = getattr(self.data_collator, "processor", None)
        check = getattr(getattr(self.model, "config", None), "check_special_tokens", None)
        if processor is not None and check is not None:
            check(processor)
        self.module_learning_rates = (
            ModuleLearningRates.paper() if module_learning_rates is None else module_learning_rates
        )
        if not isinstance(self.module_learning_rates, ModuleLearningRates):
            raise TypeError(
                "SegCompassTrainer: module_learning_rates must be a ModuleLearningRates, got "
                f"{type(self.module_learning_rates).__name__}."
            )
        self.model_accepts_loss_kwargs = False
        self._loss_part_sums: dict[str, float] = {}
        self._loss_part_counts: dict[str, int] = {}

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        """The Trainer's step, after telling the model how many steps are done (`set_training_step`)."""
        set_training_step(model, self.state.global_step)
        return super().training_step(model, inputs, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's scheduler, or upstream's OneCycle cosine (`one_cycle_final_div_factor`)."""
        factor = self.one_cycle_final_div_factor
        if factor is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        self.lr_scheduler = one_cycle_cosine_scheduler(optimizer, num_training_steps, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and kwargs over :func:`build_param_groups`."""
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = build_param_groups(
                opt_model,
                self.args.learning_rate,
                self.module_learning_rates,
                self.args.weight_decay,
                # the Trainer's rule (overridable) minus what decay_parameter_names excludes
                decay_parameters=set(self.get_decay_parameter_names(opt_model))
                & set(decay_parameter_names(opt_model)),
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            if any(k in optimizer_kwargs for k in ("params", "model", "optimizer_dict")):
                raise ValueError(
                    f"SegCompassTrainer: optimizer {self.args.optim!r} builds its own parameter "
                    "groups, which would drop the per-module learning rates; use an AdamW/SGD "
                    "family optimizer or pass `optimizers=(optimizer, None)`."
                )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            for group in groups:
                logger.info(
                    "lr group %-24s lr=%.3g wd=%.3g params=%d",
                    group["name"],
                    group["lr"],
                    group["weight_decay"],
                    sum(p.numel() for p in group["params"]),
                )
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training and isinstance(outputs, Mapping):
            for part in self.LOSS_PARTS:
                value = outputs.get(part)
                if value is not None:
                    self._loss_part_sums[part] = self._loss_part_sums.get(part, 0.0) + float(
                        value.detach()
                    )
                    self._loss_part_counts[part] = self._loss_part_counts.get(part, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean lm / seg / conf / sae losses since the last training log."""
        if "loss" in logs and self._loss_part_counts:
            for part, total in self._loss_part_sums.items():
                logs[part] = round(total / self._loss_part_counts[part], 6)
            self._loss_part_sums.clear()
            self._loss_part_counts.clear()
        super().log(logs, start_time)


# ---------------------------------------------------------------------- one call
def sft_training_arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    """`TrainingArguments` with the settings SegCompass SFT needs, overridable.

    Fixed defaults: ``remove_unused_columns=False`` (the collator needs the raw columns),
    ``prediction_loss_only=True`` (eval returns the loss, not (B, K, M, M) tensors),
    ``report_to=[]``, ``dataloader_num_workers=0``; on a machine without CUDA,
    ``use_cpu=True`` and ``bf16=False``. Anything can be overridden.
    """
    defaults: dict[str, Any] = {
        "output_dir": output_dir,
        "remove_unused_columns": False,
        "prediction_loss_only": True,
        "report_to": [],
        "dataloader_num_workers": 0,
        "save_strategy": "steps",
        "save_steps": 500,
        "logging_steps": 10,
    }
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    defaults.update(overrides)
    return TrainingArguments(**defaults)


@dataclass
class SFTResult:
    """What :func:`train_sft` returns.

    Attributes:
        trainer: the `SegCompassTrainer` (its ``state.log_history`` has the losses).
        train_output: `transformers.trainer_utils.TrainOutput` of ``trainer.train()``.
        eval_metrics: ``trainer.evaluate()`` after training when an eval set was given.
    """

    trainer: SegCompassTrainer
    train_output: TrainOutput
    eval_metrics: dict[str, float] = field(default_factory=dict)


def train_sft(
    model: nn.Module,
    train_dataset: Any,
    *,
    processor: Any = None,
    args: TrainingArguments | None = None,
    eval_dataset: Any = None,
    data_collator: Callable[[list[Any]], dict[str, Any]] | None = None,
    lora: Any = None,
    module_learning_rates: ModuleLearningRates | None = None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[Any] | None = None,
) -> SFTResult:
    """Supervised fine-tuning: LM loss on the gold response + segmentation losses.

    Args:
        model: a `SegCompassForReasoningSegmentation` (put in train mode by the Trainer).
        train_dataset: rows with ``image``, ``instruction``, ``response``, ``masks``,
            ``num_objects`` (the synthetic world / data_formats schema), or anything
            ``data_collator`` understands.
        processor: the model's `SegCompassProcessor`; builds a `SegCompassCollator` when no
            ``data_collator`` is given.
        args: `TrainingArguments` (default :func:`sft_training_arguments` in ``./segcompass-sft``);
            ``remove_unused_columns`` is forced to False.
        eval_dataset: evaluated (loss only) after training.
        data_collator: overrides the processor's collator.
        lora: None (full fine-tuning), True (:func:`default_lora_config`) or a
            `peft.LoraConfig` on modules of ``model.vlm``: see :func:`apply_lora`. Merge with
            :func:`merge_lora` before export.
        module_learning_rates: per-module multipliers (default the paper's).
        resume_from_checkpoint: a checkpoint path, or True for the last complete one in
            ``args.output_dir``.
        callbacks: extra `TrainerCallback` objects.
    """
    if data_collator is None:
        if processor is None:
            raise ValueError(
                "train_sft needs `processor=` (a SegCompassProcessor, to build the collator) or "
                "a `data_collator=`."
            )
        from ..data.collator import SegCompassCollator

        data_collator = SegCompassCollator(processor)
    if args is None:
        args = sft_training_arguments("segcompass-sft")
    if args.remove_unused_columns:
        logger.info("train_sft: setting remove_unused_columns=False (the collator needs them).")
        args.remove_unused_columns = False
    if lora is not None and lora is not False:
        apply_lora(model, None if lora is True else lora)
    trainer = SegCompassTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        module_learning_rates=module_learning_rates,
        callbacks=callbacks,
    )
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    return SFTResult(trainer=trainer, train_output=train_output, eval_metrics=eval_metrics)


__all__ = [
    "HEAD_MODULES",
    "LORA_PROJECTIONS",
    "MODULE_NAMES",
    "ModuleLearningRates",
    "SFTResult",
    "SegCompassTrainer",
    "apply_lora",
    "build_param_groups",
    "decay_parameter_names",
    "default_lora_config",
    "has_lora",
    "lora_target_modules",
    "merge_lora",
    "module_of_parameter",
    "save_lora_adapter",
    "set_training_step",
    "sft_training_arguments",
    "train_sft",
]
