"""Trainer callbacks that run a training stage on wall-clock time: stop at a deadline, count
its steps in a progress bar (with the time left), and schedule the learning rate on time.

The demo gives each training stage a share of its budget (`run.STAGE_ENDS`); with these
callbacks a stage ends when its share does, whatever the machine's speed. Under
torch.distributed they read rank 0's clock (`agreed_time`): every rank stops at the same step
(a rank stopping alone would wait forever in the next collective) and sets the same learning
rates (the replicas stay identical).
"""

from __future__ import annotations

import time
from typing import Any

from ..training.vlm_pretraining import agreed_time


def time_limit_callback(deadline: float) -> Any:
    """A callback that stops training at the first step end past `deadline` (a time.time())."""
    from transformers import TrainerCallback

    class StopAtDeadline(TrainerCallback):
        """Stop training when the wall-clock budget of the stage is used up."""

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if agreed_time() > deadline:
                control.should_training_stop = True
            return control

    return StopAtDeadline()


def time_progress_callback(
    deadline: float, description: str, disable: bool = False, total: int | None = None
) -> Any:
    """A progress bar that counts a stage's optimiser steps: over ``total`` steps when the
    step count binds, else (training until `deadline`) a step counter with the seconds left.
    Its postfix shows the latest logged loss and, for GRPO, the mean reward."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar = tqdm(total=total, desc=description, unit="step", disable=disable)
            self.shown: dict[str, str] = {}

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.shown["left"] = f"{max(deadline - time.time(), 0.0):.0f}s"
            self.bar.set_postfix(self.shown, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            for key in ("loss", "reward"):
                if logs and isinstance(logs.get(key), (int, float)):
                    self.shown[key] = f"{logs[key]:.3f}"
            self.bar.set_postfix(self.shown)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            self.bar.close()

    return StepProgress()


def time_schedule_callback(deadline: float, warmup_steps: int, min_ratio: float = 0.1) -> Any:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` over the wall-clock
    time left until `deadline`, applied to every parameter group's learning rate.

    A step-based schedule needs the step count up front; measured from a probe step, it is
    wrong whenever the machine's load changes during training (a schedule planned while the
    machine is busy ends, and stops training, long before the budget does). Scheduling on
    time spends the whole budget at whatever speed the machine gives. Use it with a constant
    scheduler and a large `max_steps`, and the deadline callback to stop.
    """
    import math

    from transformers import TrainerCallback

    class TimeCosineSchedule(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            self.base = [group["lr"] for group in optimizer.param_groups]
            self.cosine_start = None

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
            now = agreed_time()
            if state.global_step < warmup_steps:
                factor = (state.global_step + 1) / warmup_steps
            else:
                if self.cosine_start is None:
                    self.cosine_start = now
                span = max(deadline - self.cosine_start, 1e-6)
                done = min(max((now - self.cosine_start) / span, 0.0), 1.0)
                factor = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done))
            for group, base in zip(optimizer.param_groups, self.base):
                group["lr"] = base * factor
            self.factor = factor

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs is not None and "learning_rate" in logs:
                logs["learning_rate"] = self.base[0] * getattr(self, "factor", 1.0)

    return TimeCosineSchedule()


__all__ = ["time_limit_callback", "time_progress_callback", "time_schedule_callback"]
