"""Exact resume of SegCompass GRPO: the state TRL leaves out of a checkpoint, and the sampler.

Checkpoints are written atomically (`checkpointing.AtomicCheckpointMixin`: staged, marked
complete, renamed) and every weight including the VLM's is restored exactly
(`checkpointing.load_model_weights`). What TRL's `GRPOTrainer` does not save, `GRPOResumeMixin`
adds: besides TRL's optimizer / scheduler / RNG files each checkpoint holds
``grpo_state.pt`` (one per process) with TRL's micro-step counter, the buffered rollouts of
the current generation batch (reused for ``steps_per_generation * num_iterations``
micro-steps, so a checkpoint can fall inside it) and the metrics not yet logged; with
``sync_ref_model`` the moving reference policy is saved too (``ref_model/``).

TRL's `RepeatSampler` shuffles every epoch with one generator that a fresh trainer restarts
at epoch 0; `ResumableRepeatSampler` derives epoch e's order from ``(seed, e)`` alone, the
same order TRL draws, so a resumed run sees the same prompts. A resumed run therefore
samples the same completions and reproduces the uninterrupted run's rewards, losses and
weights (docs/grpo.md "Checkpoints and resume").
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate.utils import send_to_device
from trl.trainer.utils import RepeatSampler

from .checkpointing import load_model_weights

logger = logging.getLogger(__name__)

__all__ = ["GRPO_STATE_NAME", "REF_MODEL_FOLDER", "GRPOResumeMixin", "ResumableRepeatSampler"]

#: Per-process file of a checkpoint with TRL's rollout buffer and step counter
#: (``grpo_state.pt``; ``grpo_state_<rank>.pt`` when several processes train).
GRPO_STATE_NAME = "grpo_state"
#: Checkpoint sub-folder with the reference policy when ``sync_ref_model`` moves it.
REF_MODEL_FOLDER = "ref_model"


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


class GRPOResumeMixin:
    """`GRPOTrainer` mixin: checkpoints carry the GRPO state, and resume restores it.

    Put it before `GRPOTrainer` (and `AtomicCheckpointMixin`) in the bases. It uses TRL's
    attributes (``_step``, ``_buffered_inputs``, ``_metrics``, ``num_generations``,
    ``num_iterations``, ``shuffle_dataset``, ``ref_model``, ``beta``) and overrides
    `_get_train_sampler`, `_save_rng_state` and `_load_optimizer_and_scheduler`; each calls
    the next class's version first.
    """

    #: The sampler `_get_train_sampler` made, whose epoch a resume sets.
    _train_sampler: ResumableRepeatSampler | None = None

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
