"""GRPO for SegCompass on TRL's `GRPOTrainer`: mask rewards and the mask loss in one step.

The paper's training section (arXiv 2605.22658): the reasoning path is trained with GRPO
(group size G = 8, low-variance KL), reward `0.3 * format + 0.7 * mask`, and the
segmentation losses are added to the policy loss in the same step. TRL knows nothing about
masks, so this trainer changes four places of `GRPOTrainer` and keeps the rest (sampling,
advantages, clipping, KL, loss types, logging, vLLM, DeepSpeed) as TRL has it:

1. `_tokenize_prompts` keeps what the processor made for each prompt besides the token ids
   (SAM frame, valid-pixel mask, VLM patches), so the SAM side needs no second preprocessing.
2. `_calculate_rewards` first runs the SegCompass forward (no grad) on prompt + completion of
   every scored completion and hands the reward functions `pred_mask_logits` / `conf_logits`
   (one entry per completion, `rewards.py`), next to the dataset columns.
3. `_generate_and_score_completions` adds the mask targets (`gt_masks`, `num_objects`,
   `valid_mask`) and `sam_pixel_values` to the batch; TRL shuffles and splits them with
   everything else.
4. `_get_per_token_logps_and_entropies` computes TRL's per-token log-probabilities from the
   SegCompass forward. Inside `_compute_loss` that forward also receives the mask targets
   (through a `grpo_forward.PolicyForwardCapture`), so the policy term and
   `seg_loss_weight * seg + conf_loss_weight * conf + sae_loss_weight * sae` come from ONE
   forward of the model (`mask_loss_in_policy_forward=True`). TRL's fused LM head cannot be
   used on the wrapper (its `base_model` is the wrapper itself and returns no
   `last_hidden_state`); instead a forward hook on the VLM backbone projects only the
   completion positions through `lm_head` (a module call, so ZeRO-3 gathers it) and the
   log-softmax follows TRL's formula (temperature-scaled logits, zero on padding).

Checkpoints are atomic and a resumed run reproduces the uninterrupted one exactly
(`grpo_resume.py`, docs/grpo.md "Checkpoints and resume").

Reference model (`beta > 0`): TRL would reload one from `config._name_or_path`, which a model
built in memory does not have; this trainer takes `ref_model=` or copies the policy as it is
when training starts (under ZeRO-3, where a copy of sharded weights is not possible, it loads
`type(model).from_pretrained(config._name_or_path)`).

The configuration is in `grpo_config.py`, the dataset rows and mask targets in
`grpo_data.py`; both are re-exported here. Library side: imports trl; the modeling files
never import this module.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import GRPOTrainer
from trl.trainer.utils import pad

from ..answer_format import AnswerTokenIds, parse_answer_ids
from .checkpointing import AtomicCheckpointMixin
from .grpo_config import FORMAT_REWARDS, MASK_REWARDS, SegCompassGRPOConfig
from .grpo_data import (
    SegmentationTargets,
    build_grpo_dataset,
    grpo_row,
    segmentation_targets,
    with_array_masks,
)
from .grpo_forward import (
    PolicyForwardCapture,
    completion_logits_hook,
    pixel_rows_per_sample,
    slice_pixels,
    slice_rows,
    unwrap_peft,
)
from .grpo_resume import (
    GRPO_STATE_NAME,
    REF_MODEL_FOLDER,
    GRPOResumeMixin,
    ResumableRepeatSampler,
)
from .sft import set_training_step
from .upstream_recipe import one_cycle_cosine_scheduler

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

#: Keys of a processor output that describe the SAM side of a prompt (one row per prompt).
_SAM_KEYS = ("sam_pixel_values", "valid_mask")


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


# --------------------------------------------------------------------------- trainer
class SegCompassGRPOTrainer(GRPOResumeMixin, AtomicCheckpointMixin, GRPOTrainer):
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
        if isinstance(model, str) or not hasattr(unwrap_peft(model), "decode_masks"):
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
            reward_funcs = [FORMAT_REWARDS[args.format_reward_rule], MASK_REWARDS[args.mask_reward]]
            if args.reward_weights is None:
                args.reward_weights = [args.format_reward_weight, args.mask_reward_weight]

        base = unwrap_peft(model)
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

        # TRL's __init__ takes no reference model: with beta != 0 it loads one from
        # `config._name_or_path` (which a model built in memory lacks), and with sync_ref_model
        # it adds a sync callback for that one (and refuses sync_ref_model when beta == 0). So
        # TRL is built seeing beta = 0 and no sync, our own reference and callback are set up
        # after it, and the args (and `self.beta`, which TRL copied) get their values back.
        # Likewise TRL starts vLLM from `config._name_or_path`, so with use_vllm that name
        # points at the VLM checkpoint while TRL builds.
        beta, sync_ref = args.beta, args.sync_ref_model
        is_peft = base is not model
        own_ref = None
        if beta != 0.0 and not is_peft:
            own_ref = ref_model if ref_model is not None else self._build_ref_model(base)
            own_ref.requires_grad_(False).eval()
            args.beta, args.sync_ref_model = 0.0, False
        name_or_path = config._name_or_path
        if args.use_vllm:
            config._name_or_path = args.vllm_model_path
        if "eval_dataset" in kwargs:
            kwargs["eval_dataset"] = with_array_masks(kwargs["eval_dataset"])
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=with_array_masks(train_dataset),
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
        # The processor output of the prompts being sampled, from `_tokenize_prompts` to
        # `_generate_and_score_completions` (which clears it) of the same generation step.
        self._rollout_fields: dict[str, Any] | None = None
        # Set by `_compute_loss` for one loss call only (see `PolicyForwardCapture`).
        self._policy_forward: PolicyForwardCapture | None = None

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
        opt_model = unwrap_peft(self.model)
        decay = set(self.get_decay_parameter_names(opt_model))
        no_decay = {n for n, _ in opt_model.named_parameters() if n not in decay}
        groups = module_param_groups(
            opt_model, self.args.learning_rate, multipliers, self.args.weight_decay, no_decay
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The Trainer's scheduler, or upstream's OneCycle cosine with `one_cycle_final_div_factor`."""
        factor = self.args.one_cycle_final_div_factor
        if factor is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        self.lr_scheduler = one_cycle_cosine_scheduler(optimizer, num_training_steps, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

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
        part = slice_rows(batch, start, end)
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
        config = self.accelerator.unwrap_model(self.model).config
        num_slots = config.num_slots
        answer_ids = AnswerTokenIds.from_config(config)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        enriched = []
        for i, example in enumerate(inputs):
            row = dict(example)
            # the format reward reads answer tokens by id: text that merely spells <REF_POS>
            # with ordinary tokens (grounded nowhere) must not score as a reference
            row["answer"] = parse_answer_ids(
                completion_ids_list[i],
                answer_ids,
                lambda run: tokenizer.decode(run, skip_special_tokens=False),
            )
            row["pred_mask_logits"] = masks[i]
            row["conf_logits"] = confs[i]
            # upstream scores the whole grid, SAM's padding included (`reward_on_full_grid`)
            row["valid_mask"] = None if self.args.reward_on_full_grid else valids[i]
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
        targets = segmentation_targets(fields, self.accelerator.device)
        output["sam_pixel_values"] = targets.sam_pixel_values
        output["gt_masks"] = targets.gt_masks
        output["num_objects"] = targets.num_objects
        if targets.valid_mask is not None:
            output["valid_mask"] = targets.valid_mask
        return output

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

        Inside `_compute_loss` (`self._policy_forward` set, see `PolicyForwardCapture`) the
        policy runs the full SegCompass forward through its (DDP/DeepSpeed) wrapper, with the
        mask targets when the capture asks for the mask loss, whose output it appends to the
        capture. Elsewhere (old / reference log-probs, no grad) only the VLM backbone runs.
        Either way a hook projects the completion positions through `lm_head`: (B, C, V)
        logits, never (B, L, V).
        """
        if compute_aux_loss:
            raise NotImplementedError(
                "SegCompassGRPOTrainer does not support MoE auxiliary losses."
            )
        capture = self._policy_forward
        use_targets = capture is not None and capture.with_mask_loss and model is not self.ref_model
        targets = capture.targets if capture is not None else None
        total = input_ids.shape[0]
        chunk = total if use_targets else (batch_size or total)
        logps, entropies = [], []
        rows_per_sample = pixel_rows_per_sample(pixel_values, image_grid_thw, num_images, total)
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            pv, thw = slice_pixels(
                pixel_values, image_grid_thw, num_images, rows_per_sample, start, end
            )
            ids, mask = input_ids[start:end], attention_mask[start:end]
            unwrapped = unwrap_peft(self.accelerator.unwrap_model(model))
            captured: dict[str, torch.Tensor] = {}
            hook = unwrapped.vlm.model.register_forward_hook(
                completion_logits_hook(unwrapped.vlm.lm_head, logits_to_keep, captured)
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
                        capture.outputs.append(out)
                    elif torch.is_grad_enabled():
                        # A policy forward with grad goes through the wrapper (DDP / ZeRO hooks);
                        # without mask targets SegCompass needs a SAM input, so give it the frame.
                        if targets is None:
                            raise RuntimeError(
                                "SegCompassGRPOTrainer: policy log-probabilities with grad are "
                                "only computed inside `_compute_loss`, which provides the SAM "
                                "frames; call them under torch.no_grad() elsewhere."
                            )
                        sam = targets.sam_pixel_values[start:end]
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
        set_training_step(model, self.state.global_step)  # the model's loss schedule
        capture = PolicyForwardCapture(
            targets, with_mask_loss=self.args.mask_loss_in_policy_forward
        )
        self._policy_forward = capture
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._policy_forward = None
        if capture.with_mask_loss:
            (out,) = capture.outputs
        else:
            out = self._mask_forward(model, inputs, targets)

        sae_weight = self.args.sae_loss_weight
        if sae_weight is None:
            sae_weight = unwrap_peft(
                self.accelerator.unwrap_model(model)
            ).config.sae_reconstruction_weight
        zero = loss.new_zeros(())
        seg = out.seg_loss if out.seg_loss is not None else zero
        conf = out.conf_loss if out.conf_loss is not None else zero
        advantages = inputs["advantages"].reshape(-1)  # (B,); TRL's policy loss needs it too
        if self.args.mask_loss_completions == "above_group_mean":
            # Only the segmentation term: restricted the same way, the confidence loss would
            # lose the no-target prompts whose completions all say "none" (they tie, advantage
            # 0), and with them the only examples that teach the head "no object".
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
        unwrapped = unwrap_peft(self.accelerator.unwrap_model(model))
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
