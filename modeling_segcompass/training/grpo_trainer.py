"""GRPO for SegCompass on TRL's `GRPOTrainer`: mask rewards and the mask loss in one step.

PAPER.md "Training": the reasoning path is trained with GRPO (group size G = 8, low-variance
KL), reward `0.3 * format + 0.7 * mask`, and the segmentation losses are added to the policy
loss in the same step. TRL 1.16 knows nothing about masks, so this trainer changes four
places of `GRPOTrainer` and keeps the rest (sampling, advantages, clipping, KL, loss types,
logging, vLLM, DeepSpeed) as TRL has it:

1. `_tokenize_prompts` keeps what the processor made for each prompt besides the token ids
   (SAM frame, valid-pixel mask, VLM patches), so the SAM side needs no second preprocessing.
2. `_calculate_rewards` first runs the SegCompass forward (no grad) on prompt + completion of
   every scored completion and hands the reward functions `pred_mask_logits` / `conf_logits`
   (one entry per completion, `rewards.py`), next to the dataset columns.
3. `_generate_and_score_completions` adds the mask targets (`gt_masks`, `num_objects`,
   `valid_mask`) and `sam_pixel_values` to the batch; TRL shuffles and splits them with
   everything else.
4. `_get_per_token_logps_and_entropies` computes TRL's per-token log-probabilities from the
   SegCompass forward. Inside `_compute_loss` that forward also receives the mask targets, so
   the policy term and `seg_loss_weight * seg + conf_loss_weight * conf + sae_loss_weight * sae`
   come from ONE forward of the model (`mask_loss_in_policy_forward=True`). TRL's fused LM head
   cannot be used on the wrapper (its `base_model` is the wrapper itself and returns no
   `last_hidden_state`); instead a forward hook on the VLM backbone projects only the completion
   positions through `lm_head` (a module call, so ZeRO-3 gathers it) and the log-softmax
   follows TRL's formula (temperature-scaled logits, zero on padding).

Checkpoints and resume (docs/grpo.md "Checkpoints and resume"): checkpoints are written atomically
(`checkpointing.AtomicCheckpointMixin`: staged, marked complete, renamed), every weight including
the VLM's is restored exactly (`checkpointing.load_model_weights`), and besides TRL's optimizer /
scheduler / RNG files each checkpoint holds ``grpo_state.pt`` (one per process): TRL's micro-step
counter and the buffered rollouts of the current generation batch (reused for
``steps_per_generation * num_iterations`` micro-steps, so a checkpoint can fall inside it) and
the not yet logged metrics. TRL's `RepeatSampler` shuffles every epoch with one generator that a
fresh trainer restarts at epoch 0; `ResumableRepeatSampler` derives epoch e's order from
``(seed, e)`` alone, the same order TRL draws, so a resumed run sees the same prompts. With
``sync_ref_model`` the moving reference policy is saved too (``ref_model/``). A resumed run
therefore samples the same completions and reproduces the uninterrupted run's rewards, losses
and weights (tests/training/test_grpo_trainer.py).

Reference model (`beta > 0`): TRL would reload one from `config._name_or_path`, which a model
built in memory does not have; this trainer takes `ref_model=` or copies the policy as it is
when training starts (under ZeRO-3, where a copy of sharded weights is not possible, it loads
`type(model).from_pretrained(config._name_or_path)`).

Library side: imports trl; the modeling files never import this module.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler, pad

from ..processing_segcompass import build_prompt, to_rgb_uint8
from .checkpointing import AtomicCheckpointMixin, load_model_weights
from .rewards import format_reward, mask_reward, multi_object_mask_reward

logger = logging.getLogger(__name__)

__all__ = [
    "GRPO_STATE_NAME",
    "REF_MODEL_FOLDER",
    "ResumableRepeatSampler",
    "SegCompassGRPOConfig",
    "SegCompassGRPOTrainer",
    "SegmentationTargets",
    "build_grpo_dataset",
    "grpo_row",
    "module_param_groups",
]

#: Per-process file of a checkpoint with TRL's rollout buffer and step counter
#: (``grpo_state.pt``; ``grpo_state_<rank>.pt`` when several processes train).
GRPO_STATE_NAME = "grpo_state"
#: Checkpoint sub-folder with the reference policy when ``sync_ref_model`` moves it.
REF_MODEL_FOLDER = "ref_model"
#: Keys of a processor output that describe the SAM side of a prompt (one row per prompt).
_SAM_KEYS = ("sam_pixel_values", "valid_mask")
#: Mask-reward functions selectable by name in `SegCompassGRPOConfig.mask_reward`.
_MASK_REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "multi_object": multi_object_mask_reward,
    "single": mask_reward,
}
#: Choices of `SegCompassGRPOConfig.mask_loss_completions`.
_MASK_LOSS_COMPLETIONS = ("all", "above_group_mean")
#: Choices of `SegCompassGRPOConfig.conf_loss_completions`.
_CONF_LOSS_COMPLETIONS = ("all", "not_below_group_mean")


# --------------------------------------------------------------------------- config
@dataclass
class SegCompassGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the SegCompass mask path (rewards, mask loss, per-module learning rates).

    Everything of `trl.GRPOConfig` applies: `num_generations` (G, paper 8), `beta` (KL
    coefficient, paper 5e-3 .. 0.2 with the low-variance "k3" estimator that TRL uses),
    `loss_type`, `max_completion_length`, `temperature`, `use_vllm`, ... On CPU pass
    `use_cpu=True, bf16=False`.

    The reward weights come from `format_reward_weight` / `mask_reward_weight` when the trainer
    builds its default reward functions and `reward_weights` is not set.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["module_lr_multipliers"]

    # ---- rewards
    format_reward_weight: float = field(
        default=0.3,
        metadata={"help": "Weight of the format reward (paper: 0.3)."},
    )
    mask_reward_weight: float = field(
        default=0.7,
        metadata={"help": "Weight of the mask reward (paper: 0.7)."},
    )
    mask_reward: str = field(
        default="multi_object",
        metadata={
            "help": "Default mask reward: 'multi_object' (Hungarian mean IoU of the kept slots, "
            "handles no-target and several targets; num_objects=-1 rows use the single-object "
            "score) or 'single' (0.5 soft IoU + 0.2 soft Dice + 0.3 hard IoU of slot 0)."
        },
    )
    reward_conf_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Confidence-logit threshold for keeping a slot in the multi-object reward "
            "(upstream: 0.5 on the logit)."
        },
    )
    # ---- mask loss
    seg_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the segmentation loss (heatmap BCE + Dice, mask Dice + focal) added "
            "to the policy loss (paper: 1.0; upstream scripts 0.3)."
        },
    )
    conf_loss_weight: float = field(
        default=0.2,
        metadata={"help": "Weight of the per-slot confidence BCE (paper: 0.2)."},
    )
    sae_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the SAE reconstruction loss (joint SAE training); None uses the "
            "model's `config.sae_reconstruction_weight`."
        },
    )
    mask_loss_completions: str = field(
        default="all",
        metadata={
            "help": "Which sampled completions carry the segmentation (mask) loss: 'all' (the "
            "paper's joint training) or 'above_group_mean' (only those whose reward beats "
            "their group's mean, i.e. advantage > 0; the confidence loss stays on every "
            "completion, else no-target rows, whose completions often tie, would drop out of "
            "it). With a policy that mostly names the wrong object, 'all' teaches the mask "
            "path to segment the target whatever the text says (docs/grpo.md)."
        },
    )
    conf_loss_completions: str = field(
        default="all",
        metadata={
            "help": "Which sampled completions carry the confidence loss: 'all' (the paper) or "
            "'not_below_group_mean' (advantage >= 0: completions that tie with their group, "
            "such as a no-target group that all says 'none', stay in). On every completion, "
            "a completion that says 'none' where the gold has an object teaches the "
            "confidence head to disregard a 'none' in the text, and no-target recall fell "
            "(docs/grpo.md)."
        },
    )
    mask_loss_in_policy_forward: bool = field(
        default=True,
        metadata={
            "help": "Take the mask loss from the same forward as the policy log-probabilities "
            "(one pass). False runs a second forward for the mask loss, as the reference does; "
            "it exists to measure that cost and is meant for single-process runs."
        },
    )
    vllm_model_path: str | None = field(
        default=None,
        metadata={
            "help": "With use_vllm=True: a checkpoint of the VLM alone (e.g. the Qwen2.5-VL-7B "
            "folder the model was assembled from) that vLLM loads; the trainer then pushes the "
            "policy's `vlm.*` weights into it under their VLM names (untested here: no GPU)."
        },
    )
    # ---- optimisation
    module_lr_multipliers: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "Learning-rate multipliers by parameter-name prefix, e.g. {'codebook': 25, "
            "'slot_mapper': 25, 'prompt_encoder': 10, 'mask_decoder': 5} (paper: heads at 5-80x "
            "the LLM's 1e-6..2e-6). The longest matching prefix wins; unmatched parameters use "
            "`learning_rate`."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "format_reward_weight",
            "mask_reward_weight",
            "seg_loss_weight",
            "conf_loss_weight",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"SegCompassGRPOConfig.{name} must be a number >= 0; got {value!r}."
                )
        if self.sae_loss_weight is not None and self.sae_loss_weight < 0:
            raise ValueError(
                f"SegCompassGRPOConfig.sae_loss_weight must be None or >= 0; got "
                f"{self.sae_loss_weight!r}."
            )
        if self.mask_loss_completions not in _MASK_LOSS_COMPLETIONS:
            raise ValueError(
                "SegCompassGRPOConfig.mask_loss_completions must be one of "
                f"{_MASK_LOSS_COMPLETIONS}; got {self.mask_loss_completions!r}."
            )
        if self.conf_loss_completions not in _CONF_LOSS_COMPLETIONS:
            raise ValueError(
                "SegCompassGRPOConfig.conf_loss_completions must be one of "
                f"{_CONF_LOSS_COMPLETIONS}; got {self.conf_loss_completions!r}."
            )
        if self.mask_reward not in _MASK_REWARDS:
            raise ValueError(
                f"SegCompassGRPOConfig.mask_reward must be one of {sorted(_MASK_REWARDS)}; got "
                f"{self.mask_reward!r}."
            )
        if self.use_vllm and not self.vllm_model_path:
            raise ValueError(
                "SegCompassGRPOConfig: use_vllm=True needs vllm_model_path, a checkpoint of the VLM "
                "alone that vLLM can load (vLLM does not know the SegCompass wrapper)."
            )
        if self.module_lr_multipliers is not None:
            if not isinstance(self.module_lr_multipliers, Mapping):
                raise TypeError(
                    "SegCompassGRPOConfig.module_lr_multipliers must be a dict {prefix: multiplier}; "
                    f"got {type(self.module_lr_multipliers).__name__}."
                )
            bad = {k: v for k, v in self.module_lr_multipliers.items() if not v >= 0}
            if bad:
                raise ValueError(
                    f"SegCompassGRPOConfig.module_lr_multipliers must be >= 0; got {bad}."
                )


# --------------------------------------------------------------------------- data
def grpo_row(
    example: Mapping[str, Any], processor: Any, *, num_slots: int | None = None
) -> dict[str, Any]:
    """One example (synthetic-world / collator schema) -> one GRPO dataset row.

    Args:
        example: needs ``image``, ``instruction`` and ``masks`` ((N, H, W) at the image size,
            N = 0 for no-target); ``num_objects`` is checked against N when present, and may be
            -1 to ask for the single-object reward.
        processor: the model's `SegCompassProcessor` (its mask grid M and SAM geometry).
        num_slots: K written into the prompt (default ``processor.num_slots``).

    Returns:
        ``prompt``: a conversational prompt (one user turn: an image placeholder and
        `build_prompt(instruction, K)`), which TRL renders with the processor's chat template
        exactly as `SegCompassProcessor` does; ``image``; ``gt_masks``: (G, M, M) uint8 on the
        mask grid (G = max(K, N), zero padded), put through the same resize/pad as the SAM
        frame; ``num_objects``; ``num_ref`` = K (the format reward's required `<REF_POS>` count).
    """
    k = processor.num_slots if num_slots is None else int(num_slots)
    for key in ("image", "instruction", "masks"):
        if key not in example:
            raise KeyError(
                f"grpo_row: the example lacks {key!r}; it needs 'image', 'instruction' and "
                f"'masks' (N, H, W). Found keys: {sorted(example)}."
            )
    rgb = to_rgb_uint8(example["image"], "example['image']")
    masks = example["masks"]
    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if masks.size == 0:
        masks = np.zeros((0, *rgb.shape[:2]), dtype=np.uint8)
    grid = processor.prepare_masks(masks.astype(np.uint8), rgb.shape[:2])  # (N, M, M)
    count = int(grid.shape[0])
    num_objects = int(example.get("num_objects", count))
    if num_objects not in (count, -1):
        raise ValueError(
            f"grpo_row: num_objects={num_objects} but the example has {count} mask(s); they must "
            "agree (or num_objects=-1 for the single-object reward)."
        )
    if num_objects == -1 and count < 1:
        raise ValueError("grpo_row: num_objects=-1 (single object) needs one mask; got none.")
    size = processor.mask_size
    gt = np.zeros((max(k, count), size, size), dtype=np.uint8)  # (G, M, M)
    gt[:count] = grid.numpy().astype(np.uint8)
    prompt = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": build_prompt(example["instruction"], k)},
            ],
        }
    ]
    return {
        "prompt": prompt,
        "image": example["image"],
        "gt_masks": gt,
        "num_objects": num_objects,
        "num_ref": k,
    }


def build_grpo_dataset(
    examples: Sequence[Mapping[str, Any]], processor: Any, *, num_slots: int | None = None
):
    """A `datasets.Dataset` of `grpo_row`s (the form `SegCompassGRPOTrainer` trains on)."""
    from datasets import Dataset

    return Dataset.from_list([grpo_row(ex, processor, num_slots=num_slots) for ex in examples])


@dataclass
class SegmentationTargets:
    """What the mask loss needs for a batch of completions (one row per completion).

    Attributes:
        sam_pixel_values: (B, 3, S, S) SAM frames.
        gt_masks: (B, G, M, M) ground truth on the mask grid, zero padded along G.
        num_objects: (B,) real masks per row (single-object rows count 1).
        valid_mask: (B, M, M) bool, True on the unpadded image area.
    """

    sam_pixel_values: torch.Tensor
    gt_masks: torch.Tensor
    num_objects: torch.Tensor
    valid_mask: torch.Tensor | None


# --------------------------------------------------------------------------- optimiser
def module_param_groups(
    model: nn.Module,
    base_lr: float,
    multipliers: Mapping[str, float] | None,
    weight_decay: float = 0.0,
    no_decay: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with per-module learning rates.

    Args:
        model: the (unwrapped) model.
        base_lr: learning rate of parameters no prefix matches.
        multipliers: ``{name prefix: multiplier}``; a parameter takes the multiplier of the
            longest prefix that equals its name or a dotted ancestor of it ("codebook" matches
            "codebook.slot_queries", not "codebook2.x").
        weight_decay: decay of the parameters not in ``no_decay``.
        no_decay: names of parameters without weight decay (biases, norms).

    Returns:
        One group per (learning rate, decay) pair, each ``{"params", "lr", "weight_decay"}``,
        covering every trainable parameter exactly once.

    Raises:
        ValueError: if a prefix matches no trainable parameter (a typo would otherwise silently
            train that module at the base rate).
    """
    multipliers = dict(multipliers or {})
    no_decay = no_decay or set()
    used: set[str] = set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        best, factor = "", 1.0
        for prefix, value in multipliers.items():
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, factor = prefix, float(value)
        if best:
            used.add(best)
        decay = 0.0 if name in no_decay else float(weight_decay)
        groups.setdefault((base_lr * factor, decay), []).append(param)
    unused = sorted(set(multipliers) - used)
    if unused:
        top = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        raise ValueError(
            f"module_lr_multipliers: the prefix(es) {unused} match no trainable parameter; use "
            f"dotted parameter-name prefixes such as {top}."
        )
    return [
        {"params": params, "lr": lr, "weight_decay": decay}
        for (lr, decay), params in groups.items()
    ]


# --------------------------------------------------------------------------- sampler
class ResumableRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle of epoch e depends on ``(seed, e)`` only.

    `RepeatSampler` draws one permutation per pass from a generator seeded once, so epoch e's
    order depends on how many passes the object has made; a trainer built to resume starts
    again at epoch 0's order. This subclass re-seeds and skips e permutations, which gives
    exactly the order TRL draws in an uninterrupted run, and knows its epoch through
    `set_epoch` (Trainer calls it before each epoch; the GRPO trainer also sets it on resume).
    Without `set_epoch` calls it counts passes, as `RepeatSampler` does.

    Args:
        see `trl.trainer.utils.RepeatSampler` (``data_source``, ``mini_repeat_count``,
        ``batch_size``, ``repeat_count``, ``shuffle``, ``seed``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass yields."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(
                f"ResumableRepeatSampler.set_epoch: epoch must be an int >= 0; got {epoch!r}."
            )
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            generator = torch.Generator()
            generator.manual_seed(self.seed)
            for _ in range(self.epoch):  # the permutations of the epochs before this one
                torch.randperm(self.num_samples, generator=generator)
            self.generator = generator
        self.epoch += 1
        yield from super().__iter__()


# --------------------------------------------------------------------------- trainer
class SegCompassGRPOTrainer(AtomicCheckpointMixin, GRPOTrainer):
    """`trl.GRPOTrainer` for `SegCompassForReasoningSegmentation` (see the module docstring).

    Args:
        model: a `SegCompassForReasoningSegmentation` (instance; PEFT-wrapped works too).
        reward_funcs: TRL reward functions; default ``[format_reward, <mask reward>]`` with
            weights ``(format_reward_weight, mask_reward_weight)``. Besides the dataset columns
            every reward function receives ``pred_mask_logits`` (per completion (K, M, M), None
            for a completion without `<REF_POS>`), ``conf_logits`` (per completion (K,); slots
            without a `<REF_POS>` token are -inf, so never kept), ``valid_mask`` (per completion
            (M, M)) and, when the dataset has no such column, ``num_ref`` = K.
        args: a `SegCompassGRPOConfig`.
        train_dataset: rows of `grpo_row` (``prompt``, ``image``, ``gt_masks``, ``num_objects``).
        processing_class: the model's `SegCompassProcessor`.
        ref_model: reference policy for ``beta > 0`` (default: a frozen copy of ``model``).
            A resumed run must start from the same ``model`` (and ``ref_model``) as the
            interrupted one: the reference is not in the checkpoint unless ``sync_ref_model``.
        **kwargs: passed to `GRPOTrainer` (``eval_dataset``, ``callbacks``, ``peft_config``, ...).
    """

    _tag_names = ["trl", "grpo", "segcompass"]

    def __init__(
        self,
        model: nn.Module,
        reward_funcs: Any = None,
        args: SegCompassGRPOConfig | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
        ref_model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(model, str) or not hasattr(_unwrap_peft(model), "decode_masks"):
            given = repr(model) if isinstance(model, str) else type(model).__name__
            raise TypeError(
                "SegCompassGRPOTrainer needs a SegCompassForReasoningSegmentation instance; got "
                f"{given}. Load it first, e.g. "
                "AutoModel.from_pretrained(path, trust_remote_code=True)."
            )
        if processing_class is None or not hasattr(processing_class, "prepare_masks"):
            raise TypeError(
                "SegCompassGRPOTrainer needs processing_class=SegCompassProcessor (it renders the "
                "prompt, the SAM frame and the mask grid); got "
                f"{type(processing_class).__name__}."
            )
        if args is None:
            raise ValueError(
                "SegCompassGRPOTrainer needs args=SegCompassGRPOConfig(...) (on CPU: use_cpu=True, "
                "bf16=False)."
            )
        if not isinstance(args, SegCompassGRPOConfig):
            raise TypeError(
                f"args must be a SegCompassGRPOConfig (a GRPOConfig with the mask fields); got "
                f"{type(args).__name__}."
            )
        if reward_funcs is None:
            reward_funcs = [format_reward, _MASK_REWARDS[args.mask_reward]]
            if args.reward_weights is None:
                args.reward_weights = [args.format_reward_weight, args.mask_reward_weight]

        base = _unwrap_peft(model)
        config = base.config
        config.check_special_tokens(processing_class)
        # TRL suppresses `config.image_token_id` during sampling and reads the model's eos ids;
        # SegCompass keeps the image token in its VLM config and answers end at <|im_end|>.
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config.vlm_config, "image_token_id", None)
            if image_token_id is None:
                image_token_id = processing_class.image_token_id
            config.image_token_id = int(image_token_id)
        eos = base.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        for token_id in (processing_class.im_end_token_id, processing_class.tokenizer.eos_token_id):
            if token_id is not None and token_id not in eos:
                eos.append(int(token_id))
        base.generation_config.eos_token_id = eos

        # TRL would build the reference from `config._name_or_path`; build it here instead.
        beta, sync_ref = args.beta, args.sync_ref_model
        is_peft = base is not model
        own_ref = None
        if beta != 0.0 and not is_peft:
            own_ref = ref_model if ref_model is not None else self._build_ref_model(base)
            own_ref.requires_grad_(False).eval()
            args.beta, args.sync_ref_model = 0.0, False
        name_or_path = config._name_or_path
        if args.use_vllm:  # TRL starts vLLM from `model.name_or_path`: point it at the VLM
            config._name_or_path = args.vllm_model_path
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                processing_class=processing_class,
                **kwargs,
            )
        finally:
            args.beta, args.sync_ref_model = beta, sync_ref
            config._name_or_path = name_or_path
        self.beta = beta
        if args.use_vllm:
            self._push_only_vlm_weights_to_vllm()
        if own_ref is not None:
            self.ref_model = self._prepare_ref_model(own_ref)
            if sync_ref:
                from trl.trainer.callbacks import SyncRefModelCallback

                self.add_callback(
                    SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator)
                )
        self._rollout_fields: dict[str, Any] | None = None
        self._loss_targets: SegmentationTargets | None = None
        self._loss_outputs: list[Any] = []
        self._pending_sam: torch.Tensor | None = None
        self._train_sampler: ResumableRepeatSampler | None = None

    # ------------------------------------------------------------------ checkpoints / resume
    def _get_train_sampler(self, dataset: Any = None) -> ResumableRepeatSampler:
        """TRL's sampler (same arguments, same order) with an epoch-determined shuffle."""
        sampler = ResumableRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )
        self._train_sampler = sampler
        return sampler

    def _grpo_state_path(self, checkpoint: str) -> str:
        name = GRPO_STATE_NAME
        if self.args.world_size > 1:
            name = f"{name}_{self.args.process_index}"
        return os.path.join(checkpoint, f"{name}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        """Trainer's RNG states, then this process's GRPO state (and a moving reference)."""
        super()._save_rng_state(output_dir)
        metrics = {mode: {k: list(v) for k, v in m.items()} for mode, m in self._metrics.items()}
        state = {
            "step": int(self._step),
            "buffered_inputs": send_to_device(self._buffered_inputs, "cpu"),
            "metrics": metrics,
        }
        os.makedirs(output_dir, exist_ok=True)
        torch.save(state, self._grpo_state_path(output_dir))
        if self._ref_model_moves() and self.args.should_save:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                logger.warning(
                    "sync_ref_model under DeepSpeed/FSDP: the moving reference policy is not "
                    "checkpointed; a resumed run restarts it from the initial model."
                )
            else:
                ref = self.accelerator.unwrap_model(self.ref_model)
                ref.save_pretrained(os.path.join(output_dir, REF_MODEL_FOLDER))

    def _ref_model_moves(self) -> bool:
        return self.ref_model is not None and self.beta != 0.0 and self.args.sync_ref_model

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """TRL's optimizer / scheduler (and entropy controller), then the GRPO state."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_grpo_state(checkpoint)

    def _load_grpo_state(self, checkpoint: str) -> None:
        """Restore the micro-step counter, rollout buffer, pending metrics and sampler epoch.

        Called on resume after the trainer state is loaded. A checkpoint without
        ``grpo_state.pt`` (written by plain TRL or with ``save_only_model``) resumes with a fresh
        rollout buffer, as TRL does, and a warning that the run will not match exactly.
        """
        if self._train_sampler is not None:
            # Trainer's epochs_trained: the epoch the first resumed batch belongs to.
            self._train_sampler.set_epoch(int(self.state.epoch or 0))
        path = self._grpo_state_path(checkpoint)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s: resuming with a fresh rollout buffer (TRL's behaviour); the "
                "continuation will differ from an uninterrupted run inside a generation batch.",
                checkpoint,
                os.path.basename(path),
            )
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self._step = int(state["step"])
            self._buffered_inputs = send_to_device(
                state["buffered_inputs"], self.accelerator.device
            )
            for mode, values in state.get("metrics", {}).items():
                self._metrics[mode].clear()
                for key, series in values.items():
                    self._metrics[mode][key] = list(series)
        ref_folder = os.path.join(checkpoint, REF_MODEL_FOLDER)
        if self._ref_model_moves() and os.path.isdir(ref_folder):
            load_model_weights(self.accelerator.unwrap_model(self.ref_model), ref_folder)
        elif self._ref_model_moves():
            logger.warning(
                "sync_ref_model is on but %s has no %s/: the reference policy restarts from the "
                "model the trainer was given.",
                checkpoint,
                REF_MODEL_FOLDER,
            )

    # ------------------------------------------------------------------ reference model
    @staticmethod
    def _build_ref_model(model: nn.Module) -> nn.Module:
        if is_deepspeed_zero3_enabled():
            path = getattr(model.config, "_name_or_path", "")
            if not path:
                raise ValueError(
                    "beta > 0 under DeepSpeed ZeRO-3 needs a reference model: pass ref_model=..., "
                    "or load the policy with from_pretrained so that config._name_or_path is set."
                )
            return type(model).from_pretrained(path, dtype=model.dtype)
        return copy.deepcopy(model)

    def _prepare_ref_model(self, ref_model: nn.Module) -> nn.Module:
        if self.args.disable_dropout:
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(ref_model)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def _push_only_vlm_weights_to_vllm(self) -> None:
        """vLLM holds the VLM alone: sync `vlm.*` weights under their VLM names, skip the rest.

        Every parameter is still visited, because under ZeRO-3 gathering one is a collective.
        """
        generation = self.vllm_generation
        iterate = generation._iter_named_params

        def vlm_params():
            for name, tensor in iterate():
                if name.startswith("vlm."):
                    yield name[len("vlm.") :], tensor

        generation._iter_named_params = vlm_params

    # ------------------------------------------------------------------ optimiser
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or `args.optim`) with `module_lr_multipliers` as parameter groups."""
        multipliers = self.args.module_lr_multipliers
        if not multipliers or self.optimizer is not None:
            return super().create_optimizer()
        opt_model = _unwrap_peft(self.model)
        decay = set(self.get_decay_parameter_names(opt_model))
        no_decay = {n for n, _ in opt_model.named_parameters() if n not in decay}
        groups = module_param_groups(
            opt_model, self.args.learning_rate, multipliers, self.args.weight_decay, no_decay
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ rollout
    def _tokenize_prompts(self, prompts: list) -> Any:
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        # The SegCompassProcessor returns the SAM frame and valid mask next to the VLM inputs.
        self._rollout_fields = {"prompt_ids": prompt_ids, **fields}
        return prompt_ids, images, fields

    def _rollout_batch(self, completion_ids_list: list[list[int]]) -> dict[str, Any]:
        """Prompt + completion of every rollout as the SegCompass forward takes them."""
        fields = self._rollout_fields
        if fields is None or "sam_pixel_values" not in fields:
            raise RuntimeError(
                "SegCompassGRPOTrainer: the processor output of the prompts has no "
                "`sam_pixel_values`. Every prompt needs exactly one image (an `image` column), "
                "and `rollout_func` is not supported (masks need the SAM frame)."
            )
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        prompts = [torch.as_tensor(ids, dtype=torch.long) for ids in fields["prompt_ids"]]
        completions = [torch.as_tensor(ids, dtype=torch.long) for ids in completion_ids_list]
        prompt_ids = pad(prompts, padding_value=pad_id, padding_side="left")  # (B, P)
        prompt_mask = pad(
            [torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left"
        )
        completion_ids = pad(completions, padding_value=pad_id, padding_side="right")  # (B, C)
        completion_mask = pad(
            [torch.ones_like(c) for c in completions], padding_value=0, padding_side="right"
        )
        batch = {
            "input_ids": torch.cat([prompt_ids, completion_ids], 1).to(device),  # (B, P + C)
            "attention_mask": torch.cat([prompt_mask, completion_mask], 1).to(device),
            "logits_to_keep": completion_ids.shape[1],
        }
        for key in ("pixel_values", "image_grid_thw", *_SAM_KEYS):
            if isinstance(fields.get(key), torch.Tensor):
                batch[key] = fields[key].to(device)
        return batch

    @torch.no_grad()
    def _predict_masks(
        self, completion_ids_list: list[list[int]]
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor], list[torch.Tensor | None]]:
        """Mask and confidence logits of every scored completion (the reward's inputs)."""
        batch = self._rollout_batch(completion_ids_list)
        total = batch["input_ids"].shape[0]
        chunk = max(1, self.args.per_device_train_batch_size)
        unwrapped = self.accelerator.unwrap_model(self.model)
        masks: list[torch.Tensor | None] = []
        confs: list[torch.Tensor] = []
        ref_token = unwrapped.config.ref_token_id
        was_training = unwrapped.training
        unwrapped.eval()  # the reward scores the policy's masks, not a dropout sample of them
        try:
            for start in range(0, total, chunk):
                end = min(start + chunk, total)
                self._predict_chunk(unwrapped, batch, start, end, ref_token, masks, confs)
        finally:
            unwrapped.train(was_training)
        valid = batch.get("valid_mask")
        valids = [v.cpu() for v in valid] if valid is not None else [None] * total
        return masks, confs, valids

    @staticmethod
    def _predict_chunk(
        unwrapped: nn.Module,
        batch: dict[str, Any],
        start: int,
        end: int,
        ref_token: int,
        masks: list[torch.Tensor | None],
        confs: list[torch.Tensor],
    ) -> None:
        """Append the mask / confidence logits of rows start..end to `masks` / `confs`."""
        part = _slice_rows(batch, start, end)
        out = unwrapped(
            input_ids=part["input_ids"],
            attention_mask=part["attention_mask"],
            pixel_values=part.get("pixel_values"),
            image_grid_thw=part.get("image_grid_thw"),
            sam_pixel_values=part["sam_pixel_values"],
            compute_logits=False,
        )
        for b in range(out.mask_logits.shape[0]):
            conf = out.conf_logits[b].float().masked_fill(~out.ref_mask[b], -torch.inf)
            has_ref = bool((part["input_ids"][b] == ref_token).any())
            masks.append(out.mask_logits[b].float().cpu() if has_ref else None)
            confs.append(conf.cpu())

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        masks, confs, valids = self._predict_masks(completion_ids_list)
        num_slots = self.accelerator.unwrap_model(self.model).config.num_slots
        enriched = []
        for i, example in enumerate(inputs):
            row = dict(example)
            row["pred_mask_logits"] = masks[i]
            row["conf_logits"] = confs[i]
            row["valid_mask"] = valids[i]
            if "gt_masks" in row and row["gt_masks"] is not None:
                row["gt_masks"] = torch.as_tensor(np.asarray(row["gt_masks"]), dtype=torch.float32)
            row.setdefault("num_ref", num_slots)
            enriched.append(row)
        # Kept for the mask loss: these are the completions the advantages belong to.
        self._rollout_fields["examples"] = enriched
        return super()._calculate_rewards(enriched, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        fields, self._rollout_fields = self._rollout_fields, None
        targets = self._targets_of(fields)
        output["sam_pixel_values"] = targets.sam_pixel_values
        output["gt_masks"] = targets.gt_masks
        output["num_objects"] = targets.num_objects
        if targets.valid_mask is not None:
            output["valid_mask"] = targets.valid_mask
        return output

    def _targets_of(self, fields: dict[str, Any]) -> SegmentationTargets:
        """Stack the rollout's mask targets (dataset columns) into batch tensors."""
        device = self.accelerator.device
        examples = fields["examples"]
        missing = [i for i, ex in enumerate(examples) if ex.get("gt_masks") is None]
        if missing:
            raise ValueError(
                f"SegCompassGRPOTrainer: rows {missing} have no `gt_masks`; the mask loss needs a "
                "(G, M, M) ground truth per row. Build rows with `grpo_row(example, processor)`."
            )
        grids = [ex["gt_masks"] for ex in examples]
        size = fields["valid_mask"].shape[-1] if "valid_mask" in fields else grids[0].shape[-1]
        depth = max(g.shape[0] if g.ndim == 3 else 1 for g in grids)
        gt = torch.zeros(len(grids), depth, size, size)  # (B, G, M, M)
        for i, g in enumerate(grids):
            g = g.unsqueeze(0) if g.ndim == 2 else g
            if tuple(g.shape[-2:]) != (size, size):
                raise ValueError(
                    f"SegCompassGRPOTrainer: gt_masks of row {i} are {tuple(g.shape)}, expected "
                    f"(G, {size}, {size}) on the mask grid; build rows with `grpo_row`."
                )
            gt[i, : g.shape[0]] = g
        counts = []
        for i, ex in enumerate(examples):
            n = ex.get("num_objects")
            n = int((gt[i].flatten(1) > 0.5).any(-1).sum()) if n is None else int(n)
            counts.append(1 if n == -1 else n)  # single-object rows have one target
        valid = fields.get("valid_mask")
        return SegmentationTargets(
            sam_pixel_values=fields["sam_pixel_values"].to(device),
            gt_masks=gt.to(device),
            num_objects=torch.tensor(counts, dtype=torch.long, device=device),
            valid_mask=None if valid is None else valid.to(device),
        )

    # ------------------------------------------------------------------ log-probabilities
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        pixel_values=None,
        image_grid_thw=None,
        num_images=None,
        **unused: Any,
    ):
        """TRL's per-token log-probabilities and entropies, from the SegCompass forward.

        Inside `_compute_loss` (mask targets pending) the policy runs the full SegCompass
        forward through its (DDP/DeepSpeed) wrapper with `gt_masks`, so the same pass gives the
        mask losses (kept in `self._loss_outputs`). Elsewhere (old / reference log-probs, no
        grad) only the VLM backbone runs. Either way a hook projects the completion positions
        through `lm_head`: (B, C, V) logits, never (B, L, V).
        """
        if compute_aux_loss:
            raise NotImplementedError(
                "SegCompassGRPOTrainer does not support MoE auxiliary losses."
            )
        targets = self._loss_targets
        use_targets = targets is not None and model is not self.ref_model
        total = input_ids.shape[0]
        chunk = total if use_targets else (batch_size or total)
        logps, entropies = [], []
        rows_per_sample = _pixel_rows_per_sample(pixel_values, image_grid_thw, num_images, total)
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            pv, thw = _slice_pixels(
                pixel_values, image_grid_thw, num_images, rows_per_sample, start, end
            )
            ids, mask = input_ids[start:end], attention_mask[start:end]
            unwrapped = _unwrap_peft(self.accelerator.unwrap_model(model))
            captured: dict[str, torch.Tensor] = {}
            hook = unwrapped.vlm.model.register_forward_hook(
                _completion_logits_hook(unwrapped.vlm.lm_head, logits_to_keep, captured)
            )
            try:
                with self.accelerator.autocast():
                    if use_targets:
                        out = model(
                            input_ids=ids,
                            attention_mask=mask,
                            pixel_values=pv,
                            image_grid_thw=thw,
                            sam_pixel_values=targets.sam_pixel_values[start:end],
                            gt_masks=targets.gt_masks[start:end],
                            num_objects=targets.num_objects[start:end],
                            valid_mask=None
                            if targets.valid_mask is None
                            else targets.valid_mask[start:end],
                            compute_logits=False,
                        )
                        self._loss_outputs.append(out)
                    elif torch.is_grad_enabled():
                        # A policy forward with grad goes through the wrapper (DDP / ZeRO hooks);
                        # without mask targets SegCompass needs a SAM input, so give it the frame.
                        sam = self._pending_sam[start:end]
                        model(
                            input_ids=ids,
                            attention_mask=mask,
                            pixel_values=pv,
                            image_grid_thw=thw,
                            sam_pixel_values=sam,
                            compute_logits=False,
                        )
                    else:
                        kwargs = {"image_grid_thw": thw} if thw is not None else {}
                        unwrapped.vlm.model(
                            input_ids=ids,
                            attention_mask=mask,
                            pixel_values=pv,
                            use_cache=False,
                            **kwargs,
                        )
            finally:
                hook.remove()
            logits = captured["logits"].float() / self.temperature  # (b, C, V)
            log_probs = logits.log_softmax(-1)
            targets_ids = ids[:, -logits_to_keep:]  # (b, C)
            token_logps = log_probs.gather(-1, targets_ids.unsqueeze(-1)).squeeze(-1)
            real = mask[:, -logits_to_keep:].bool()  # TRL scores padding as 0
            logps.append(token_logps.masked_fill(~real, 0.0))
            if compute_entropy:
                entropy = -(log_probs.exp() * log_probs).sum(-1)
                entropies.append(entropy.masked_fill(~real, 0.0))
        return (
            torch.cat(logps, 0),
            torch.cat(entropies, 0) if compute_entropy else None,
            None,
        )

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        """TRL's policy loss + the weighted mask losses of the same (or, if asked, a second) pass."""
        targets = SegmentationTargets(
            sam_pixel_values=inputs["sam_pixel_values"],
            gt_masks=inputs["gt_masks"],
            num_objects=inputs["num_objects"],
            valid_mask=inputs.get("valid_mask"),
        )
        one_pass = self.args.mask_loss_in_policy_forward
        self._loss_outputs = []
        self._loss_targets = targets if one_pass else None
        self._pending_sam = targets.sam_pixel_values
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._loss_targets = None
        if one_pass:
            (out,) = self._loss_outputs
        else:
            out = self._mask_forward(model, inputs, targets)
        self._loss_outputs = []

        sae_weight = self.args.sae_loss_weight
        if sae_weight is None:
            sae_weight = _unwrap_peft(
                self.accelerator.unwrap_model(model)
            ).config.sae_reconstruction_weight
        zero = loss.new_zeros(())
        seg = out.seg_loss if out.seg_loss is not None else zero
        conf = out.conf_loss if out.conf_loss is not None else zero
        advantages = inputs["advantages"].reshape(-1)  # (B,); TRL's policy loss needs it too
        if self.args.mask_loss_completions == "above_group_mean":
            # Only the segmentation term: with the confidence loss restricted the same way,
            # no-target prompts whose completions all say "none" tie (advantage 0) and drop
            # out, and no-target recall collapsed (demo, seed 1: N-acc 90% -> 0%).
            seg = self._loss_of_completions(
                model, out, targets, advantages > 0, "seg_loss", "mask_loss_fraction"
            )
        if self.args.conf_loss_completions == "not_below_group_mean":
            # Ties stay in (a no-target group that all says "none" keeps teaching "no
            # object"); out go the completions that did worse than their group, such as a
            # "none" where the gold has an object, which would teach the head that a "none"
            # in the text means nothing.
            conf = self._loss_of_completions(
                model, out, targets, advantages >= 0, "conf_loss", "conf_loss_fraction"
            )
        sae = out.sae_loss if out.sae_loss is not None else zero
        mask_loss = self.args.seg_loss_weight * seg + self.args.conf_loss_weight * conf
        mask_loss = mask_loss + sae_weight * sae
        mode = "train" if self.model.training else "eval"
        # TRL divides the policy term by the accumulation steps itself (HF auto-scaling is off).
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + mask_loss / normalizer

        metrics = self._metrics[mode]
        for name, value in (("seg_loss", seg), ("conf_loss", conf), ("sae_loss", sae)):
            metrics[name].append(self.accelerator.gather(value.detach().float()).mean().item())
        metrics["mask_loss"].append(
            self.accelerator.gather(mask_loss.detach().float()).mean().item()
        )
        return loss

    def _loss_of_completions(self, model, out, targets, keep, term: str, metric: str):
        """`term` ("seg_loss" or "conf_loss") of `segmentation_loss` on the forward's rows
        where `keep` (B,) is True, 0 (in the graph) when none is; logs the kept share as
        `metric`."""
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics[metric].append(
            self.accelerator.gather(keep.float().mean().reshape(1)).mean().item()
        )
        if not keep.any():
            logits = out.mask_logits if term == "seg_loss" else out.conf_logits
            return logits.sum() * 0.0
        unwrapped = _unwrap_peft(self.accelerator.unwrap_model(model))
        valid = None if targets.valid_mask is None else targets.valid_mask[keep]
        iou = None if out.iou_scores is None else out.iou_scores[keep]
        part = unwrapped.segmentation_loss(
            out.heatmap_logits[keep], out.mask_logits[keep], out.conf_logits[keep], iou,
            targets.gt_masks[keep], targets.num_objects[keep], valid,
        )  # fmt: skip
        return getattr(part, term)

    def _mask_forward(self, model, inputs, targets: SegmentationTargets):
        """The reference-style second pass: the whole forward again, for the mask loss only."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        kwargs = {}
        if inputs.get("image_grid_thw") is not None:
            kwargs["image_grid_thw"] = inputs["image_grid_thw"]
        with self.accelerator.autocast():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=inputs.get("pixel_values"),
                sam_pixel_values=targets.sam_pixel_values,
                gt_masks=targets.gt_masks,
                num_objects=targets.num_objects,
                valid_mask=targets.valid_mask,
                compute_logits=False,
                **kwargs,
            )


# --------------------------------------------------------------------------- helpers
def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The SegCompass model under a PEFT wrapper (or the model itself)."""
    if hasattr(model, "decode_masks"):
        return model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _completion_logits_hook(
    lm_head: nn.Module, logits_to_keep: int, store: dict[str, torch.Tensor]
) -> Callable[..., None]:
    """Forward hook on the VLM backbone: logits of the positions that predict the completion.

    The state at position t predicts token t + 1, so the C completion tokens are predicted by
    the states at -C-1 .. -2. Calling `lm_head` as a module (not reading its weight) keeps
    DeepSpeed ZeRO-3's gather hooks in charge of the weight.
    """

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        store["logits"] = lm_head(hidden[:, -logits_to_keep - 1 : -1])  # (B, C, V)

    return hook


def _pixel_rows_per_sample(
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    num_images: list[int] | None,
    total: int,
) -> list[int] | None:
    """Rows of `pixel_values` owned by each sample (Qwen2-VL packs patches of all images)."""
    if pixel_values is None:
        return None
    if image_grid_thw is not None:
        per_image = image_grid_thw.prod(-1).tolist()
        counts = num_images if num_images is not None else [1] * len(per_image)
        rows, cursor = [], 0
        for n in counts:
            rows.append(int(sum(per_image[cursor : cursor + n])))
            cursor += n
        return rows
    if pixel_values.shape[0] == total:
        return [1] * total
    raise ValueError(
        "SegCompassGRPOTrainer: cannot split pixel_values "
        f"{tuple(pixel_values.shape)} over {total} samples without image_grid_thw; VLMs with "
        "one pixel row per sample (LLaVA) or Qwen2-VL patch packing are supported."
    )


def _slice_pixels(
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    num_images: list[int] | None,
    rows_per_sample: list[int] | None,
    start: int,
    end: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if pixel_values is None or rows_per_sample is None:
        return pixel_values, image_grid_thw
    row_start, row_end = sum(rows_per_sample[:start]), sum(rows_per_sample[:end])
    pv = pixel_values[row_start:row_end]
    if image_grid_thw is None:
        return pv, None
    counts = num_images if num_images is not None else [1] * image_grid_thw.shape[0]
    return pv, image_grid_thw[sum(counts[:start]) : sum(counts[:end])]


def _slice_rows(batch: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """Rows start..end of a rollout batch (VLM patches split by image grid)."""
    total = batch["input_ids"].shape[0]
    rows = _pixel_rows_per_sample(
        batch.get("pixel_values"), batch.get("image_grid_thw"), None, total
    )
    pv, thw = _slice_pixels(
        batch.get("pixel_values"), batch.get("image_grid_thw"), None, rows, start, end
    )
    out = {
        key: value[start:end]
        for key, value in batch.items()
        if isinstance(value, torch.Tensor) and key not in ("pixel_values", "image_grid_thw")
    }
    out["pixel_values"], out["image_grid_thw"] = pv, thw
    return out
