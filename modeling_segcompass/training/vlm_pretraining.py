"""Pretrain a from-scratch VLM to read images (language-model loss only), and measure how much
its language model depends on the image.

Real SegCompass starts from a pretrained VLM (Qwen2.5-VL) that already reads images. The
embedded default builds a tiny VLM from scratch, and trained on the reasoning task alone it
learns to ignore the image: its LM loss on held-out gold responses is the same with the
right image and with another one (docs/results.md), because most response words follow
from the instruction. `pretrain_vlm` first trains it on an image-description
task (`data.synthetic.describe_example`), where every answer word depends on the image, as
the captioning stage of real VLM training does. Only the VLM runs (no SAE, codebook or mask
path), so a step costs about a quarter of a SegCompass training step.

`image_dependence` is the measurement: the held-out LM loss with the right images against
the same examples with the images rotated by one within each batch.

Under torch.distributed (e.g. the demo's ranks, gloo on CPU) `pretrain_vlm` is data-parallel:
each rank draws its own batch, the gradients (and the logged loss) are averaged over the ranks
in one all-reduce per step, and the wall clock that schedules and stops the run is rank 0's
(`agreed_time`), so every rank takes the same steps with the same learning rates and the
replicas stay identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.collator import SegCompassCollator


@dataclass
class ImageDependence:
    """Held-out LM loss of gold responses with the right images and with other images.

    Attributes:
        loss_right_image: mean token cross-entropy with each example's own image.
        loss_other_image: the same examples, each with the next example's image.
        num_examples: examples scored.
    """

    loss_right_image: float
    loss_other_image: float
    num_examples: int

    @property
    def gap(self) -> float:
        """loss_other_image - loss_right_image: 0 when the language model ignores the image."""
        return self.loss_other_image - self.loss_right_image

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "gap": self.gap}


@dataclass
class VLMPretrainingReport:
    """What `pretrain_vlm` did: steps, seconds and the first / last logged training loss;
    ``losses`` holds the loss of every step (for a loss curve; not in `to_dict`)."""

    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "losses"}


def _vlm_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels")
    return {k: batch[k].to(device) for k in keys if k in batch}


def _lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.vlm.parameters()).device
    return model.vlm(**_vlm_inputs(batch, device), use_cache=False).loss


@torch.no_grad()
def image_dependence(
    model: Any,
    examples: Sequence[dict[str, Any]],
    processor: Any,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> ImageDependence:
    """LM loss of the gold responses with the right images vs with the images rotated by one
    within each batch (every batch needs >= 2 examples; a last batch of 1 is dropped).

    Args:
        model: a `SegCompassForReasoningSegmentation` (only `model.vlm` runs).
        examples: dicts with the collator's keys (image, instruction, response, masks,
            num_objects).
        processor: the model's `SegCompassProcessor`.
        progress: show a bar over the batches.
    """
    from tqdm.auto import tqdm

    collator = SegCompassCollator(processor)
    was_training = model.training
    model.eval()
    right = other = 0.0
    count = 0
    starts = range(0, len(examples), batch_size)
    try:
        for start in tqdm(starts, desc="image dependence", unit="batch", disable=not progress):
            chunk = list(examples[start : start + batch_size])
            if len(chunk) < 2:
                continue
            rotated = [
                {**ex, "image": chunk[(i + 1) % len(chunk)]["image"]} for i, ex in enumerate(chunk)
            ]
            right += _lm_loss(model, collator(chunk)).item() * len(chunk)
            other += _lm_loss(model, collator(rotated)).item() * len(chunk)
            count += len(chunk)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("image_dependence: needs at least 2 examples.")
    return ImageDependence(right / count, other / count, count)


def _distributed_world() -> int:
    """The number of ranks of the default process group (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agreed_time() -> float:
    """``time.time()`` on rank 0, broadcast to every rank of the default process group (the
    local time without one). Decisions taken on wall time (stop at a deadline, a learning rate
    scheduled on time) must be the same on every rank: a rank that stops alone waits forever
    in the next collective, and different learning rates let the replicas drift apart."""
    now = time.time()
    if _distributed_world() == 1:
        return now
    import torch.distributed as dist

    shared = torch.tensor([now], dtype=torch.float64)
    dist.broadcast(shared, src=0)
    return float(shared.item())


def _average_over_ranks(params: Sequence[torch.Tensor], loss: torch.Tensor, world: int) -> float:
    """Average the gradients of ``params`` and ``loss`` over the ranks (one all-reduce) and
    return the averaged loss; the gradients are written back in place."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        update = flat[offset : offset + count].view_as(grad)
        if param.grad is None:
            param.grad = update.clone()
        else:
            param.grad.copy_(update)
        offset += count
    return float(flat[-1].item())


def pretrain_vlm(
    model: Any,
    examples: Sequence[dict[str, Any]],
    processor: Any,
    *,
    max_steps: int,
    deadline: float | None = None,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.1,
    batch_size: int = 32,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> VLMPretrainingReport:
    """Train `model.vlm` with its LM loss on `examples` (e.g. `describe_example` outputs).

    AdamW, linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` of the
    learning rate over the run's progress: the larger of step / max_steps and, with a
    `deadline` (a `time.time()` value), elapsed / available time; the run stops at whichever
    comes first. Batches are drawn with replacement from a generator seeded with `seed`.

    Only the VLM's parameters are updated; the rest of SegCompass is untouched.

    Under torch.distributed, `batch_size` is each rank's share of the batch and rank r draws
    with seed ``seed + r``; the replicas must start identical (same seed): the gradients are
    averaged over the ranks and the time is rank 0's, so they stay so.
    """
    if max_steps < 1:
        raise ValueError(f"pretrain_vlm: max_steps must be >= 1, got {max_steps}.")
    if len(examples) == 0:
        raise ValueError("pretrain_vlm: no examples to train on.")
    if batch_size < 1:
        raise ValueError(f"pretrain_vlm: batch_size must be >= 1, got {batch_size}.")
    collator = SegCompassCollator(processor)
    params = [p for p in model.vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    world = _distributed_world()
    rank = 0
    if world > 1:
        import torch.distributed as dist

        rank = dist.get_rank()
    rng = np.random.default_rng(seed + rank)
    start = agreed_time()
    budget = None if deadline is None else max(deadline - start, 1e-6)
    losses: list[float] = []
    was_training = model.training
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # with a deadline the step count is open-ended: a step counter with the time left
        total = max_steps if budget is None else None
        bar = tqdm(total=total, desc="VLM pretraining (image descriptions)", unit="step")
    step = 0
    try:
        while step < max_steps:
            done = step / max_steps
            if budget is not None:
                done = max(done, (agreed_time() - start) / budget)
                if done >= 1.0:
                    break
            if step < warmup_steps:
                factor = (step + 1) / warmup_steps
            else:
                factor = min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * factor
            picks = rng.integers(0, len(examples), size=min(batch_size, len(examples)))
            loss = _lm_loss(model, collator([examples[i] for i in picks]))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"pretrain_vlm: the loss became {loss.item()} at step {step}; lower "
                    f"learning_rate (now {learning_rate})."
                )
            loss.backward()
            logged = _average_over_ranks(params, loss, world) if world > 1 else loss.item()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(logged)
            step += 1
            if bar is not None:
                postfix = {"loss": f"{np.mean(losses[-20:]):.3f}"}
                if deadline is not None:
                    postfix["left"] = f"{max(deadline - time.time(), 0.0):.0f}s"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    window = max(1, min(20, len(losses) // 5))
    return VLMPretrainingReport(
        steps=step,
        seconds=round(agreed_time() - start, 1),
        first_loss=float(np.mean(losses[:window])) if losses else float("nan"),
        final_loss=float(np.mean(losses[-window:])) if losses else float("nan"),
        losses=losses,
    )
