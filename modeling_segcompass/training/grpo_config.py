"""`SegCompassGRPOConfig`: TRL's `GRPOConfig` plus the SegCompass mask path, and its checks.

The fields add the mask rewards (which function, its weight, its confidence threshold), the
mask loss joined to the policy loss (weights, which completions carry it, one or two
forwards), vLLM's VLM checkpoint and per-module learning rates. `__post_init__` refuses
values the trainer cannot use, naming the field and the fix. The trainer is in
`grpo_trainer.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .rewards import format_reward, mask_reward, multi_object_mask_reward, upstream_format_reward
from .upstream_recipe import UPSTREAM_BASE_LR, UPSTREAM_FINAL_DIV_FACTOR, UPSTREAM_WEIGHT_DECAY

__all__ = [
    "CONF_LOSS_COMPLETIONS",
    "FORMAT_REWARDS",
    "MASK_LOSS_COMPLETIONS",
    "MASK_REWARDS",
    "SegCompassGRPOConfig",
]

#: Mask-reward functions selectable by name in `SegCompassGRPOConfig.mask_reward`.
MASK_REWARDS: dict[str, Callable[..., list[float | None]]] = {
    "multi_object": multi_object_mask_reward,
    "single": mask_reward,
}
#: Format-reward functions selectable by name in `SegCompassGRPOConfig.format_reward_rule`.
FORMAT_REWARDS: dict[str, Callable[..., list[float]]] = {
    "segcompass": format_reward,
    "upstream": upstream_format_reward,
}
#: Choices of `SegCompassGRPOConfig.mask_loss_completions`.
MASK_LOSS_COMPLETIONS = ("all", "above_group_mean")
#: Choices of `SegCompassGRPOConfig.conf_loss_completions`.
CONF_LOSS_COMPLETIONS = ("all", "not_below_group_mean")


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
    format_reward_rule: str = field(
        default="segcompass",
        metadata={
            "help": "Default format reward: 'segcompass' (`format_score`: exactly K <REF_POS> "
            "for K slots, stray think tags refused) or 'upstream' (the authors' rule: exactly "
            "one <REF_POS>, think blocks found by a non-greedy regex; `upstream_format_score`)."
        },
    )
    reward_on_full_grid: bool = field(
        default=False,
        metadata={
            "help": "Score the masks on the whole 4E x 4E grid, SAM's padded area included, as "
            "upstream does; False (default) scores only the unpadded image (`valid_mask`)."
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
            "their group's mean, i.e. advantage > 0). With 'all', a completion that names the "
            "wrong object is still supervised with the gold mask, which teaches the mask path "
            "to segment the target whatever the text says; 'above_group_mean' supervises the "
            "masks of completions whose text led to a good answer. The confidence loss is "
            "chosen separately (`conf_loss_completions`): restricted the same way it would "
            "lose the no-target rows, whose completions often tie. Results: docs/grpo.md."
        },
    )
    conf_loss_completions: str = field(
        default="all",
        metadata={
            "help": "Which sampled completions carry the confidence loss: 'all' (the paper) or "
            "'not_below_group_mean' (advantage >= 0: completions that tie with their group, "
            "such as a no-target group that all says 'none', stay in). With 'all', a "
            "completion that says 'none' where the gold has an object still gets the target "
            "'object', which teaches the confidence head to disregard a 'none' in the text; "
            "'not_below_group_mean' leaves such completions out. Results: docs/grpo.md."
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

    one_cycle_final_div_factor: float | None = field(
        default=None,
        metadata={
            "help": "None: `lr_scheduler_type` applies. A number F: upstream's schedule "
            "(torch OneCycleLR, pct_start 0, div_factor 1, cosine): from the peak down to "
            "peak / F over the run (`upstream_recipe.one_cycle_cosine_factor`; upstream 6.7)."
        },
    )

    @classmethod
    def upstream(cls, output_dir: str, **overrides: Any) -> SegCompassGRPOConfig:
        """The GRPO settings of the authors' launch scripts (github.com/ZhenyuLU-Heliodore/
        SegCompass, scripts/train/*/gref_*_n8.sh over scripts/initial.yaml, verl's actor).

        Group of 8, clip 0.2, temperature 1.0; KL coefficient 0.2 with the k3 estimator (the
        scripts' `kl_loss_coef`, which overrides the yaml's 5e-3: the runs behind the paper
        used the scripts); `loss_type="bnpo"`, TRL's token mean over the micro-batch, which is
        verl's `masked_mean` of the clipped objective and the KL; base rate 1.6e-6 with the
        multipliers of `ModuleLearningRates.upstream`, weight decay 0.01, OneCycle cosine to
        1/6.7 of the peak, gradient norm clipped at 1; seg loss 0.3, confidence loss 0.2, no
        SAE loss (frozen); rewards 0.3 format (upstream's rule) + 0.7 multi-object mask on
        the full grid; completions up to 2000 tokens. Freeze the model with
        `upstream_recipe.freeze_like_upstream` and build it with `SegCompassConfig.upstream`
        (loss weights and schedule). Batch sizes are the caller's (upstream: 16 prompts x 8
        completions per update on 8 GPUs, micro-batch 2). Anything can be overridden.
        """
        defaults: dict[str, Any] = {
            "output_dir": output_dir,
            "num_generations": 8,
            "epsilon": 0.2,
            "temperature": 1.0,
            "beta": 0.2,
            "loss_type": "bnpo",
            "learning_rate": UPSTREAM_BASE_LR,
            "weight_decay": UPSTREAM_WEIGHT_DECAY,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "max_grad_norm": 1.0,
            "warmup_steps": 0,
            "one_cycle_final_div_factor": UPSTREAM_FINAL_DIV_FACTOR,
            "module_lr_multipliers": {
                "codebook": 30.0,
                "slot_mapper": 25.0,
                "prompt_encoder": 10.0,
                "mask_decoder": 5.0,
            },  # fmt: skip
            "seg_loss_weight": 0.3,
            "conf_loss_weight": 0.2,
            "sae_loss_weight": 0.0,
            "format_reward_weight": 0.3,
            "mask_reward_weight": 0.7,
            "mask_reward": "multi_object",
            "format_reward_rule": "upstream",
            "reward_on_full_grid": True,
            "reward_conf_threshold": 0.5,
            "max_completion_length": 2000,
        }
        defaults.update(overrides)
        return cls(**defaults)

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
        if self.mask_loss_completions not in MASK_LOSS_COMPLETIONS:
            raise ValueError(
                "SegCompassGRPOConfig.mask_loss_completions must be one of "
                f"{MASK_LOSS_COMPLETIONS}; got {self.mask_loss_completions!r}."
            )
        if self.conf_loss_completions not in CONF_LOSS_COMPLETIONS:
            raise ValueError(
                "SegCompassGRPOConfig.conf_loss_completions must be one of "
                f"{CONF_LOSS_COMPLETIONS}; got {self.conf_loss_completions!r}."
            )
        if self.format_reward_rule not in FORMAT_REWARDS:
            raise ValueError(
                "SegCompassGRPOConfig.format_reward_rule must be one of "
                f"{sorted(FORMAT_REWARDS)}; got {self.format_reward_rule!r}."
            )
        factor = self.one_cycle_final_div_factor
        if factor is not None and (isinstance(factor, bool) or not 1 <= factor < float("inf")):
            raise ValueError(
                "SegCompassGRPOConfig.one_cycle_final_div_factor must be None or a number >= 1; "
                f"got {factor!r}."
            )
        if self.mask_reward not in MASK_REWARDS:
            raise ValueError(
                f"SegCompassGRPOConfig.mask_reward must be one of {sorted(MASK_REWARDS)}; got "
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
