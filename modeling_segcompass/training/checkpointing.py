"""Atomic training checkpoints: a run killed at any moment resumes from the last complete one.

`transformers.Trainer` (5.23) writes ``checkpoint-N/`` in place, file after file (weights,
optimizer, scheduler, RNG, trainer state). A run killed half-way leaves a ``checkpoint-N``
that `get_last_checkpoint` happily returns and that cannot be resumed from (or, worse,
resumes with a missing optimizer state). This module makes the write atomic:

1. the Trainer writes the checkpoint into a staging folder ``tmp-checkpoint-N/checkpoint-N``
   (``tmp-`` keeps it out of Trainer's ``checkpoint-*`` globs and regexes);
2. a completion marker (:data:`COMPLETE_MARKER`) is written last, every file and folder is
   fsynced;
3. the folder is renamed to ``<output_dir>/checkpoint-N`` (one ``rename``, atomic on POSIX
   within one file system) and the parent folder fsynced.

So a ``checkpoint-N`` folder is either absent or complete, and it holds one weight set (a
fresh folder; the model's ``save_pretrained`` also removes an older layout where it saves). :func:`last_complete_checkpoint`
additionally skips ``checkpoint-N`` folders without the marker (written by a plain Trainer
that crashed) and :func:`remove_staging_folders` clears what a crash left behind.

:class:`AtomicCheckpointMixin` plugs this into any Trainer subclass (SFT here, GRPO in the
RL trainer): ``class MyTrainer(AtomicCheckpointMixin, Trainer)``.

Library side (not remote code).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..loading import check_one_weight_set

logger = logging.getLogger(__name__)

#: Written last into a checkpoint folder; its presence means every other file is complete.
COMPLETE_MARKER = "checkpoint_complete.json"
#: Prefix of staging folders (not matched by Trainer's ``checkpoint-*`` globs).
STAGING_PREFIX = "tmp-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _fsync_path(path: str) -> None:
    """fsync a file or a folder (folders: where the OS allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders on Windows cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder below ``folder`` (and ``folder`` itself), deepest first."""
    folder = os.fspath(folder)
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


def write_complete_marker(folder: str | os.PathLike, **info: Any) -> str:
    """Write :data:`COMPLETE_MARKER` (a small JSON of ``info``) into ``folder``, fsynced.

    Returns:
        The marker's path.
    """
    path = os.path.join(os.fspath(folder), COMPLETE_MARKER)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"complete": True, **info}, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def commit_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Atomically publish ``staged`` as ``final`` (same file system), replacing an old ``final``.

    Every file is fsynced before the rename and the parent folder after it. An existing
    ``final`` is first moved aside and deleted after the new one is in place, so at every
    instant ``final`` is either the old or the new complete folder (or absent for an
    instant only in the replace case, when the old one is at ``<final>.old``).
    """
    staged, final = os.fspath(staged), os.fspath(final)
    if not os.path.isdir(staged):
        raise FileNotFoundError(f"commit_folder: staged folder {staged!r} does not exist.")
    fsync_tree(staged)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    old = None
    if os.path.exists(final):
        old = f"{os.path.join(parent, STAGING_PREFIX)}old-{os.path.basename(final)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_complete_checkpoint(folder: str | os.PathLike, *, require_marker: bool = True) -> bool:
    """Whether ``folder`` is a checkpoint that can be resumed from.

    Args:
        folder: a ``checkpoint-N`` folder.
        require_marker: demand :data:`COMPLETE_MARKER`. Without it, a folder counts as complete
            when it holds ``trainer_state.json`` (the Trainer writes it after the weights,
            optimizer and RNG states), which is the best one can say about foreign checkpoints.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return False
    if require_marker:
        return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))
    return os.path.isfile(os.path.join(folder, "trainer_state.json"))


def _checkpoints(output_dir: str) -> Iterator[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            yield int(match.group(1)), path


def last_complete_checkpoint(
    output_dir: str | os.PathLike, *, require_marker: bool = True
) -> str | None:
    """The ``checkpoint-N`` folder with the largest N that is complete, or None.

    Incomplete ones (no marker, see :func:`is_complete_checkpoint`) are skipped with a warning.
    """
    output_dir = os.fspath(output_dir)
    for _step, path in sorted(_checkpoints(output_dir), reverse=True):
        if is_complete_checkpoint(path, require_marker=require_marker):
            return path
        logger.warning(
            "Skipping incomplete checkpoint %s (no %s: the run stopped while writing it).",
            path,
            COMPLETE_MARKER if require_marker else "trainer_state.json",
        )
    return None


def remove_staging_folders(output_dir: str | os.PathLike) -> list[str]:
    """Delete the ``tmp-*`` staging folders a crash left in ``output_dir``; return their paths."""
    output_dir = os.fspath(output_dir)
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(STAGING_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.warning("Removed leftovers of an interrupted checkpoint write: %s", removed)
    return removed


def _saved_to_model_keys(model: nn.Module) -> dict[str, str]:
    """Map the key names `save_pretrained` writes to the model's own state-dict names.

    transformers 5 saves some models in their original (legacy) key format: a Qwen2.5-VL's
    ``model.language_model.layers`` is written as ``model.layers``. The renaming is
    recovered by reverting the model's own state dict and matching tensors by identity.
    """
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: keys are saved as they are
        return {k: k for k in state}
    reverted = revert_weight_conversion(model, dict(state))
    name_of = {id(tensor): name for name, tensor in state.items()}
    mapping = {}
    for saved_name, tensor in reverted.items():
        if id(tensor) not in name_of:
            raise ValueError(
                f"Cannot map the saved weight {saved_name!r} back to a parameter of "
                f"{type(model).__name__} (a many-to-one weight conversion); load this checkpoint "
                "with from_pretrained instead."
            )
        mapping[saved_name] = name_of[id(tensor)]
    return mapping


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a checkpoint's safetensors weights into ``model`` in place, exactly and strictly.

    `transformers.Trainer._load_from_checkpoint` (5.23) loads ``model.safetensors`` with a
    non-strict ``load_state_dict`` on the raw keys; since `save_pretrained` writes some
    sub-models (Qwen2.5-VL) under their original key names, the VLM's weights were silently
    left untouched on resume. This maps the saved names back and fails loudly on any missing
    or unexpected tensor (tied weights excepted).

    Args:
        model: the model (a `PreTrainedModel`, LoRA layers injected or not).
        checkpoint: a folder with ``model.safetensors`` or ``model.safetensors.index.json``
            (not both: one of them would be stale, see `loading.check_one_weight_set`).
    """
    folder = os.fspath(checkpoint)
    check_one_weight_set(folder)
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, name) for name in shards]
    else:
        raise FileNotFoundError(
            f"load_model_weights: {folder!r} has neither model.safetensors nor "
            "model.safetensors.index.json."
        )
    mapping = _saved_to_model_keys(model)
    own = set(model.state_dict())
    loaded: dict[str, torch.Tensor] = {}
    unexpected = []
    for path in files:
        for saved_name, tensor in load_file(path, device="cpu").items():
            name = saved_name if saved_name in own else mapping.get(saved_name)
            if name is None:
                unexpected.append(saved_name)
            else:
                loaded[name] = tensor
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(own - set(loaded) - tied)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {folder!r} does not match {type(model).__name__}: missing "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
            f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. Was it written by another "
            "model configuration (or with/without LoRA layers)?"
        )
    model.load_state_dict(loaded, strict=False)


class AtomicCheckpointMixin:
    """Trainer mixin: checkpoints are staged, marked complete, fsynced and renamed into place.

    Also makes ``train(resume_from_checkpoint=True)`` resume from the last *complete*
    checkpoint (and clear staging leftovers) instead of the last ``checkpoint-N`` folder.
    Use it first in the bases: ``class MyTrainer(AtomicCheckpointMixin, Trainer)``.

    Distributed runs: every rank writes into the staging folder (as Trainer does into the
    final one); after a barrier, the main process commits it.
    """

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = self._get_output_dir(trial=trial)
        step = self.state.global_step
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        final = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        # Trainer builds the checkpoint path from `_get_output_dir`; point it at the staging
        # root for this one call (an instance attribute shadows the method).
        self._get_output_dir = lambda trial=None: staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        staged = os.path.join(staging_root, name)
        best = self.state.best_model_checkpoint
        if best is not None and os.path.abspath(best).startswith(os.path.abspath(staging_root)):
            # Trainer recorded the staging path as the best checkpoint: record the final one.
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        write_complete_marker(staged, global_step=step)
        commit_folder(staged, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        logger.info("Committed checkpoint %s", final)
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model
        plain = not _is_peft_wrapper(target) and not self.is_fsdp_enabled
        has_weights = any(
            os.path.isfile(os.path.join(resume_from_checkpoint, name))
            for name in ("model.safetensors", "model.safetensors.index.json")
        )
        if plain and has_weights:
            logger.info("Loading model weights from %s", resume_from_checkpoint)
            load_model_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            output_dir = self.args.output_dir
            if self.args.should_save:
                remove_staging_folders(output_dir)
            checkpoint = last_complete_checkpoint(output_dir)
            if checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True, but {output_dir!r} holds no complete "
                    f"checkpoint (a 'checkpoint-N' folder with {COMPLETE_MARKER}). Start a fresh "
                    "run (resume_from_checkpoint=None) or pass the path of a checkpoint."
                )
            logger.info("Resuming from the last complete checkpoint %s", checkpoint)
            resume_from_checkpoint = checkpoint
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = os.fspath(resume_from_checkpoint)
            if not is_complete_checkpoint(path) and not is_complete_checkpoint(
                path, require_marker=False
            ):
                raise ValueError(
                    f"Checkpoint {path!r} is incomplete (neither {COMPLETE_MARKER} nor "
                    "trainer_state.json): the run stopped while writing it. Resume from "
                    f"{last_complete_checkpoint(os.path.dirname(path))!r} instead, or pass "
                    "resume_from_checkpoint=True to pick the last complete one."
                )
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            finished = self._finished_run(os.fspath(resume_from_checkpoint))
            if finished is not None:
                return finished
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _finished_run(self, checkpoint: str) -> Any:
        """Load a checkpoint that already reached ``max_steps`` without training further.

        Trainer 5.23, resumed from a checkpoint at ``max_steps`` that lies inside an epoch,
        runs one step past ``max_steps`` before it checks the limit; here nothing runs.
        """
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        state_path = os.path.join(checkpoint, "trainer_state.json")
        if self.args.max_steps <= 0 or not os.path.isfile(state_path):
            return None
        state = TrainerState.load_from_json(state_path)
        if state.global_step < self.args.max_steps:
            return None
        logger.warning(
            "Checkpoint %s is already at step %d >= max_steps=%d: loading it, nothing to train.",
            checkpoint,
            state.global_step,
            self.args.max_steps,
        )
        self._load_from_checkpoint(checkpoint)
        self.state = state
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        return TrainOutput(state.global_step, losses[-1] if losses else float("nan"), {})


def _is_peft_wrapper(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


__all__ = [
    "COMPLETE_MARKER",
    "STAGING_PREFIX",
    "AtomicCheckpointMixin",
    "commit_folder",
    "fsync_tree",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "load_model_weights",
    "remove_staging_folders",
    "write_complete_marker",
]
