"""Benchmark 7: one training step of the tiny default, this package's path vs the straightforward one.

The tiny default as `make demo` builds it (`SegCompassConfig.tiny` on the synthetic world's
tokenizer and slots), two steps:

- "warm-up": one supervised step as the demo's warm-up runs it (batch 32 collated by
  `SegCompassCollator`; forward with labels and masks, backward, gradient clipping at 1.0,
  AdamW with `fused=True`, the Trainer's default optimizer);
- "grpo": `SegCompassGRPOTrainer._compute_loss` + backward on a fixed batch of completions
  (benchmark 4's "with_mask_loss" step at the tiny size; sampling is not timed).

Each step is timed on this package's code ("optimised") and with the straightforward forms
of the parts it speeds up swapped in (`straightforward_paths`): SAM's `SamMaskDecoder` called
as a module on the B*K image embeddings repeated per prompt, the SAE reconstruction loss
encoding its input a second time, the input and output checks reading finiteness from an
element-wise `isfinite` mask, the image encoder run on every row of a GRPO batch (each
prompt's image once per completion) instead of once per distinct image, the codebook's last
encoder layer run on every row (slots and tokens) instead of the slot rows it is read at, and
transformers' vision attention calling attention once per window and image. Before timing, both must give the same loss and the same
gradient for every parameter. `--profile` prints the time per stage of both steps (VLM, SAE
encode, codebook, slot mapper, SAM, losses and matching, checks, optimizer, the rest),
forward and backward, from `torch.profiler` (backward operators are attributed to the stage
whose forward operator created them).

    python benchmarks/bench_training_step.py [--threads 1 --repeats 7 --profile]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen  # noqa: E402

from benchmarks import bench_grpo_step  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Agreement,
    compare,
    interleaved_timing,
    machine_summary,
    ratio_line,
    require_agreement,
    setup,
    timing_lines,
    verdict,
)
from modeling_segcompass import (  # noqa: E402
    SegCompassConfig,
    SegCompassForReasoningSegmentation,
    input_checks,
)
from modeling_segcompass import modeling_segcompass as modeling_module  # noqa: E402
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer  # noqa: E402
from modeling_segcompass.data.collator import SegCompassCollator  # noqa: E402
from modeling_segcompass.data.synthetic import (  # noqa: E402
    SyntheticWorldConfig,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor  # noqa: E402

TARGET_SPEEDUP = 1.5
_all_finite = input_checks.all_finite
STEPS = ("warm-up", "grpo")


@dataclass
class StepSetup:
    """The tiny default, one collated warm-up batch, its optimizer and a GRPO step setup."""

    model: SegCompassForReasoningSegmentation
    batch: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    grpo: bench_grpo_step.GRPOStepSetup


def build(
    device: torch.device, *, batch: int = 32, grpo_batch: int = 16, completion_len: int = 96
) -> StepSetup:
    """The demo's tiny model on the synthetic world (seed 0) and a batch of `batch` examples."""
    world = SyntheticWorldConfig(seed=0)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world, 300, descriptions=True)), 1024)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=world.num_slots)
    collated = SegCompassCollator(processor)(generate_examples(world, batch))
    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=world.num_slots)
    model = SegCompassForReasoningSegmentation(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, fused=True)
    grpo = bench_grpo_step.build("tiny", device, batch=grpo_batch, completion_len=completion_len)
    return StepSetup(model, {k: v.to(device) for k, v in collated.items()}, optimizer, grpo)


# --------------------------------------------------------------------------- straightforward
def _decode_masks_with_sam_module(
    self: SegCompassForReasoningSegmentation, heatmaps: torch.Tensor, embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All B*K prompts in one call of transformers' `SamMaskDecoder`, each image embedding
    repeated K times (the decoder then adds the dense prompt, computes four masks, keeps one)."""
    batch, num_slots, size, _ = heatmaps.shape
    _, dense = self.prompt_encoder(
        input_points=None,
        input_labels=None,
        input_boxes=None,
        input_masks=heatmaps.reshape(batch * num_slots, 1, size, size),
    )
    images = embeddings.repeat_interleave(num_slots, dim=0)  # (B*K, C, E, E)
    positional = self.image_positional_embeddings().to(images.dtype)
    masks, iou = self.mask_decoder(
        image_embeddings=images,
        image_positional_embeddings=positional.expand(batch * num_slots, -1, -1, -1),
        sparse_prompt_embeddings=None,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return masks.reshape(batch, num_slots, size, size), iou.reshape(batch, num_slots)


def _encode_then_encode_again(self, sae_input: torch.Tensor):
    """The concept path's codes; the reconstruction loss then encodes its input again."""
    return self.encode(sae_input), None


def _isfinite_all(value: torch.Tensor) -> bool:
    """Finiteness from an element-wise mask."""
    return bool(torch.isfinite(value).all())


def _encode_every_row(self, sam_pixel_values, deduplicate=None):
    """Every row of the batch through the image encoder, repeated images included (a GRPO
    batch holds each prompt's image once per completion)."""
    return type(self).encode_image(self, sam_pixel_values, deduplicate=False)


def _last_layer_every_row(self, layer, hidden, key_padding):
    """The codebook's last encoder layer on every row (slots and tokens), its attention
    weights from `nn.MultiheadAttention`; only the slot rows are then read."""
    normed = layer.norm1(hidden)
    attn_out, weights = layer.self_attn(
        normed, normed, normed, key_padding_mask=key_padding, need_weights=True
    )
    hidden = hidden + layer.dropout1(attn_out)
    hidden = hidden + layer._ff_block(layer.norm2(hidden))
    return hidden[:, : self.num_slots], weights[:, : self.num_slots]


@contextlib.contextmanager
def straightforward_paths(model: SegCompassForReasoningSegmentation) -> Iterator[None]:
    """Within the block, `model` runs the straightforward forms of the optimised parts."""
    model.decode_masks = MethodType(_decode_masks_with_sam_module, model)
    model.sae.encode_pair = MethodType(_encode_then_encode_again, model.sae)
    model.encode_image = MethodType(_encode_every_row, model)
    input_checks.all_finite = _isfinite_all
    model.codebook._last_layer_slot_rows = MethodType(_last_layer_every_row, model.codebook)
    batched = [m for m in model.vlm.modules() if isinstance(m, qwen.Qwen2_5_VLVisionAttention)]
    classes = [type(m) for m in batched]
    for module in batched:  # transformers' attention: one call per window and image
        module.__class__ = qwen.Qwen2_5_VLVisionAttention
    try:
        yield
    finally:
        for module, cls in zip(batched, classes, strict=True):
            module.__class__ = cls
        del model.decode_masks  # back to the classes' methods
        del model.sae.encode_pair
        del model.encode_image
        del model.codebook._last_layer_slot_rows
        input_checks.all_finite = _all_finite


# --------------------------------------------------------------------------- the steps
def warmup_loss(setup: StepSetup) -> torch.Tensor:
    return setup.model(**setup.batch).loss


def grpo_loss(setup: StepSetup) -> torch.Tensor:
    return bench_grpo_step.with_mask_loss(setup.grpo)


def warmup_step(setup: StepSetup) -> float:
    """Forward, backward, clip, AdamW: the demo's supervised warm-up step."""
    setup.optimizer.zero_grad(set_to_none=True)
    loss = warmup_loss(setup)
    loss.backward()
    with torch.profiler.record_function("stage: optimizer"):
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), 1.0)
        setup.optimizer.step()
    return float(loss.detach())


def grpo_step(setup: StepSetup) -> float:
    """GRPO loss (policy + mask losses from one forward) and backward."""
    return float(bench_grpo_step.step(setup.grpo, bench_grpo_step.with_mask_loss))


def _loss_and_grads(model, loss_fn: Callable[[], torch.Tensor]):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_agreement(setup: StepSetup, *, atol: float = 1e-6, rtol: float = 1e-4) -> list[Agreement]:
    """Loss and every parameter's gradient, optimised vs straightforward, for both steps.

    Tolerance: float32. The SAE codes and every forward value are the same numbers; the
    single-mask product and the broadcast sum change only GEMM blocking and summation order
    (observed: a few ulps); a data-flow error (a prompt decoded against another image, a
    dropped loss term, a gradient reaching the VLM through the reconstruction loss) moves the
    loss or a gradient by far more than rtol 1e-4 of its largest magnitude.
    """
    results = []
    for name, model, loss_fn in (
        ("warm-up", setup.model, functools.partial(warmup_loss, setup)),
        ("grpo", setup.grpo.model, functools.partial(grpo_loss, setup)),
    ):
        loss, grads = _loss_and_grads(model, loss_fn)
        with straightforward_paths(model):
            ref_loss, ref_grads = _loss_and_grads(model, loss_fn)
        if sorted(grads) != sorted(ref_grads):
            raise AssertionError(
                f"{name}: the two paths reach different parameters: "
                f"{sorted(set(grads) ^ set(ref_grads))[:5]}"
            )
        results.append(compare(f"{name} loss", loss, ref_loss, atol=atol, rtol=rtol))
        worst = max(grads, key=lambda n: (grads[n] - ref_grads[n]).abs().max().item())
        results.append(
            compare(
                f"{name} grad (worst: {worst})",
                grads[worst],
                ref_grads[worst],
                atol=atol,
                rtol=rtol,
            )
        )
    return results


# --------------------------------------------------------------------------- profile
def _stage_targets(model: SegCompassForReasoningSegmentation) -> dict[str, Any]:
    """Stage name -> module (its forward is the stage) or (owner, attribute) of a function."""
    inner = model.vlm.model
    return {
        "VLM vision tower": inner.visual,
        "VLM language model": inner.language_model,
        "LM head + LM loss": (modeling_module, "language_model_loss"),
        "SAE encode": [(model.sae, "encode"), (model.sae, "encode_pair")],
        "SAE reconstruction loss": (modeling_module, "sae_reconstruction_loss"),
        "codebook": model.codebook,
        "slot mapper": model.slot_mapper,
        "image encoder": model.image_encoder,
        "SAM prompt encoder": [model.prompt_encoder, (modeling_module, "embed_dense_prompts")],
        "SAM mask decoder": [model.mask_decoder, (modeling_module, "decode_single_masks")],
        "losses + matching": (model, "segmentation_loss"),
        "input / output checks": [
            (modeling_module, "check_forward_inputs"),
            (modeling_module, "check_forward_values"),
            (modeling_module, "check_forward_outputs"),
        ],
    }


@contextlib.contextmanager
def stage_annotations(model: SegCompassForReasoningSegmentation) -> Iterator[None]:
    """Wrap each stage's forward in `record_function("stage: <name>")`."""
    handles, restore = [], []

    def annotate(fn, label):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return wrapped

    for name, target in _stage_targets(model).items():
        label = f"stage: {name}"
        for item in target if isinstance(target, list) else [target]:
            if isinstance(item, torch.nn.Module):
                item.forward = annotate(item.forward, label)
                restore.append((item, "forward", None))
            elif item is not None:
                owner, attr = item
                original = getattr(owner, attr)
                setattr(owner, attr, annotate(original, label))
                restore.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(restore):
            if original is None or isinstance(owner, torch.nn.Module) and attr in vars(owner):
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        for handle in handles:
            handle.remove()


def stage_profile(fn: Callable[[], Any], model) -> dict[str, tuple[float, float]]:
    """Seconds per stage of one call of `fn`: {stage: (forward, backward)}.

    Forward: each stage annotation's time less the annotations nested in it. Backward: the
    autograd nodes' time, attributed through the sequence number they share with the
    forward operator that created them (to the innermost stage around that operator);
    gradient accumulation into `.grad` is its own row. "other" is the step's time that no
    stage covers (the Python between stages, the GRPO trainer's own work, ...).
    """
    from torch.profiler import ProfilerActivity, profile

    with stage_annotations(model):
        fn()  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.profiler.record_function("stage: step"):
                fn()
    events = list(prof.events())
    stages = [e for e in events if e.name.startswith("stage: ")]

    def innermost(event) -> Any:
        start, end = event.time_range.start, event.time_range.end
        best = None
        for s in stages:
            if s.time_range.start <= start and end <= s.time_range.end and s.thread == event.thread:
                if best is None or s.time_range.elapsed_us() < best.time_range.elapsed_us():
                    best = s
        return best

    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    for s in stages:
        parent = innermost_parent(s, stages)
        own = s.time_range.elapsed_us()
        forward[s.name[7:]] += own
        if parent is not None:
            forward[parent.name[7:]] -= own
    by_sequence: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and not e.is_async:
            stage = innermost(e)
            if stage is not None:
                by_sequence.setdefault(e.sequence_nr, stage.name[7:])
    for e in events:
        if not e.name.startswith("autograd::engine::evaluate_function: "):
            continue
        if "AccumulateGrad" in e.name:
            key = "gradient accumulation"
        else:
            key = by_sequence.get(e.sequence_nr, "step")
        backward[key] += e.time_range.elapsed_us()
        forward["step"] -= e.time_range.elapsed_us()
    names = sorted(set(forward) | set(backward), key=lambda n: (n == "step", n))
    return {
        ("other" if n == "step" else n): (forward[n] / 1e6, backward.get(n, 0.0) / 1e6)
        for n in names
    }


def innermost_parent(stage, stages):
    """The smallest stage annotation strictly containing `stage` (None at the top)."""
    best = None
    for s in stages:
        if s is stage or s.thread != stage.thread:
            continue
        if (
            s.time_range.start <= stage.time_range.start
            and stage.time_range.end <= s.time_range.end
        ):
            if best is None or s.time_range.elapsed_us() < best.time_range.elapsed_us():
                best = s
    return best


def profile_lines(title: str, table: dict[str, tuple[float, float]]) -> list[str]:
    total = sum(f + b for f, b in table.values())
    lines = [f"{title}: stage | forward ms | backward ms | share of the step"]
    for name, (f, b) in sorted(table.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        lines.append(f"  {name:28s} | {f * 1e3:8.1f} | {b * 1e3:8.1f} | {(f + b) / total:6.1%}")
    lines.append(f"  {'total':28s} | {total * 1e3:8.1f} ms")
    return lines


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="print the per-stage profile")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    device = setup(args.threads, args.device)
    print("== benchmark 7: training step of the tiny default, optimised vs straightforward ==")
    print(machine_summary(device))
    steps = build(device, batch=args.batch)
    b = steps.batch
    print(
        f"-- warm-up batch {b['input_ids'].shape[0]} x {b['input_ids'].shape[1]} tokens, "
        f"{sum(p.numel() for p in steps.model.parameters()) / 1e6:.2f}M parameters; GRPO batch "
        f"{steps.grpo.batch['completion_ids'].shape[0]} completions"
    )
    require_agreement(check_agreement(steps))
    runs = {
        "warm-up": (steps.model, functools.partial(warmup_step, steps)),
        "grpo": (steps.grpo.model, functools.partial(grpo_step, steps)),
    }
    if args.profile:
        for name, (model, fn) in runs.items():
            for line in profile_lines(f"{name} step, optimised", stage_profile(fn, model)):
                print(line)
    results = {}
    for name, (model, fn) in runs.items():

        def straightforward(model=model, fn=fn):
            with straightforward_paths(model):
                return fn()

        timings = interleaved_timing(
            {"straightforward": straightforward, "optimised": fn},
            repeats=args.repeats,
            warmup=1,
            device=device,
        )
        for line in timing_lines(timings) + [ratio_line(timings, "straightforward", "optimised")]:
            print(f"{name} {line}")
        mean, low, high = timings.paired_ratio_interval("straightforward", "optimised")
        results[name] = {
            "interval": (low, high),
            "speedup": timings.paired_ratio("straightforward", "optimised"),
            "cpu": timings.paired_ratio("straightforward", "optimised", cpu=True),
            "steps_per_s": 1.0 / timings.median("optimised"),
        }
    for name, r in results.items():
        print(
            f"RESULT training step[tiny, {name}, {args.threads} thread(s)] speed-up "
            f"straightforward/optimised = {r['speedup']:.2f}x (95% interval "
            f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}], cpu time {r['cpu']:.2f}x), "
            f"{r['steps_per_s']:.2f} steps/s "
            f"{verdict(r['speedup'], TARGET_SPEEDUP, higher_is_better=True)}"
        )
    return results


if __name__ == "__main__":
    main()
