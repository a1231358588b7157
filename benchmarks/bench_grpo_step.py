"""Benchmark 4: one GRPO training step with the mask loss vs the same step with the policy loss only.

`SegCompassGRPOTrainer._compute_loss` + `backward()` on a fixed batch of completions:

- "with_mask_loss": this package's step. ONE SegCompass forward gives TRL's per-token
  log-probabilities of the completions and the mask losses (segmentation + confidence + SAE
  reconstruction, weighted as in `SegCompassGRPOConfig`); their sum is back-propagated.
- "policy_only": the same GRPO loss (TRL's `_compute_loss`, same advantages, loss type and
  temperature) from the VLM alone, as plain GRPO on the VLM would compute it: no SAE, codebook,
  image encoder or SAM decoder runs.

Rollout (sampling) and reward scoring are not timed: sampling is the same in both; the mask
reward's no-grad scoring forward is an extra cost of the mask path and is printed separately.

Two model sizes: "tiny" (the embedded default of `SegCompassConfig.tiny`, what the tests
train) and "proportional" (benchmark 1's Qwen2.5-VL-shaped VLM, text hidden 512, 8 layers, with
the tiny conv image encoder and SAM decoder: the VLM dominates as it does at 7B).

    python benchmarks/bench_grpo_step.py [--sizes tiny proportional --repeats 3 --batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import pad  # noqa: E402

from benchmarks.bench_forward_backward import (  # noqa: E402
    ProportionalSize,
    proportional_config,
)
from benchmarks.harness import (  # noqa: E402
    MIB,
    Agreement,
    compare,
    format_seconds,
    interleaved_timing,
    machine_summary,
    peak_memory_bytes,
    ratio_line,
    require_agreement,
    setup,
    timing_lines,
    verdict,
)
from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation  # noqa: E402
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer  # noqa: E402
from modeling_segcompass.data.synthetic import (  # noqa: E402
    SyntheticWorldConfig,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor  # noqa: E402
from modeling_segcompass.training.grpo_trainer import (  # noqa: E402
    SegCompassGRPOConfig,
    SegCompassGRPOTrainer,
    build_grpo_dataset,
)

TARGET_TIME_RATIO = 1.25
SIZES = ("tiny", "proportional")
MASK_WEIGHTS = ("seg_loss_weight", "conf_loss_weight", "sae_loss_weight")


@dataclass
class GRPOStepSetup:
    """A trainer on a model and one fixed, scored batch of completions (the GRPO inputs).

    Attributes:
        trainer: `SegCompassGRPOTrainer` (beta 0, TRL's default loss type).
        model: the policy, in train mode.
        batch: TRL's per-step inputs: ``prompt_ids`` (B, P) left padded, ``prompt_mask``,
            ``completion_ids`` (B, C) right padded, ``completion_mask``, ``advantages`` (B,),
            ``pixel_values`` / ``image_grid_thw`` (VLM), ``sam_pixel_values`` (B, 3, S, S),
            ``gt_masks`` (B, G, M, M), ``num_objects`` (B,), ``valid_mask`` (B, M, M).
    """

    trainer: SegCompassGRPOTrainer
    model: SegCompassForReasoningSegmentation
    batch: dict[str, Any]


def build(
    size: str,
    device: torch.device,
    *,
    batch: int = 8,
    completion_len: int = 128,
    num_slots: int = 3,
    output_dir: str | None = None,
    vlm_size: ProportionalSize | None = None,
) -> GRPOStepSetup:
    """Model, processor, trainer and a fixed batch of `batch` completions.

    `batch` rows are `batch // 2` prompts (synthetic-world images and instructions) with G = 2
    completions each; completion b is ``<think>`` + random text + ``</think>`` + K `<REF_POS>`
    + ``<|im_end|>``, ``completion_len - 3 * (b % 4)`` tokens long (so rows are padded).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; got {size!r}.")
    if batch < 2 or batch % 2:
        raise ValueError(f"batch must be an even number >= 2 (G = 2 per prompt); got {batch}.")
    if completion_len < num_slots + 13:
        raise ValueError(
            f"completion_len must be >= num_slots + 13 = {num_slots + 13} (think tags, K "
            f"<REF_POS>, <|im_end|> and some text in every row); got {completion_len}."
        )
    world = SyntheticWorldConfig(num_slots=num_slots, seed=2)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world, 200)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=num_slots)
    examples = generate_examples(world, batch // 2)
    dataset = build_grpo_dataset(examples, processor)
    torch.manual_seed(0)
    if size == "tiny":
        config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=num_slots)
    else:
        vlm = vlm_size or ProportionalSize(num_slots=num_slots)
        config = proportional_config(vlm)
        config.image_encoder_type = SegCompassConfig.tiny().image_encoder_type  # conv encoder
        config.sae_reconstruction_weight = SegCompassConfig.tiny().sae_reconstruction_weight
    model = SegCompassForReasoningSegmentation(config).to(device).train()
    args = SegCompassGRPOConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="bench_grpo_"),
        use_cpu=device.type == "cpu",
        bf16=False,
        report_to=[],
        per_device_train_batch_size=batch,
        num_generations=2,
        max_completion_length=completion_len,
        max_steps=1,
        save_strategy="no",
        seed=0,
        temperature=0.7,
    )
    trainer = SegCompassGRPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor
    )
    trainer.current_gradient_accumulation_steps = 1
    return GRPOStepSetup(
        trainer, model, _fixed_batch(processor, examples, config, completion_len, device)
    )


def _fixed_batch(processor, examples, config, completion_len: int, device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    rows = [ex for ex in examples for _ in range(2)]  # G = 2 completions per prompt
    enc = processor(
        images=[ex["image"] for ex in rows],
        instructions=[ex["instruction"] for ex in rows],
        masks=[ex["masks"] for ex in rows],
    )
    vocab = len(processor.tokenizer)
    completions = []
    for b in range(len(rows)):
        length = completion_len - 3 * (b % 4)
        text = torch.randint(16, vocab, (length - config.num_slots - 3,), generator=gen)
        completions.append(
            torch.tensor(
                [config.think_start_token_id, *text.tolist(), config.think_end_token_id]
                + [config.ref_token_id] * config.num_slots
                + [processor.im_end_token_id]
            )
        )
    completion_ids = pad(completions, padding_value=processor.tokenizer.pad_token_id)
    completion_mask = pad([torch.ones_like(c) for c in completions], padding_value=0)
    gt = enc["gt_masks"] if "gt_masks" in enc else None
    if gt is None:
        raise RuntimeError(f"the processor returned no gt_masks; keys {sorted(enc)}")
    advantages = torch.linspace(-1.0, 1.0, len(rows))
    batch = {
        "prompt_ids": enc["input_ids"],
        "prompt_mask": enc["attention_mask"],
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum().float(),  # DAPO's token normaliser
        "advantages": advantages[torch.randperm(len(rows), generator=gen)],
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": enc["image_grid_thw"],
        "sam_pixel_values": enc["sam_pixel_values"],
        "gt_masks": gt.float(),
        "num_objects": enc["num_objects"],
        "valid_mask": enc["valid_mask"],
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- the two steps
def _vlm_only_logps(
    self: SegCompassGRPOTrainer,
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None = None,
    compute_entropy: bool = False,
    compute_aux_loss: bool = False,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    **unused: Any,
):
    """TRL's per-token log-probabilities of the completions from the VLM alone (with grad).

    Same formula as `SegCompassGRPOTrainer`: states at -C-1 .. -2 through `lm_head`,
    temperature-scaled log-softmax, padding scored 0; shapes (B, C).
    """
    if compute_aux_loss:
        raise NotImplementedError("no MoE auxiliary loss in this benchmark")
    vlm = self.accelerator.unwrap_model(model).vlm
    kwargs = {"image_grid_thw": image_grid_thw} if image_grid_thw is not None else {}
    with self.accelerator.autocast():
        hidden = vlm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            use_cache=False,
            **kwargs,
        ).last_hidden_state  # (B, L, d)
        logits = vlm.lm_head(hidden[:, -logits_to_keep - 1 : -1])  # (B, C, V)
    log_probs = (logits.float() / self.temperature).log_softmax(-1)
    token_logps = log_probs.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
    real = attention_mask[:, -logits_to_keep:].bool()
    entropy = None
    if compute_entropy:
        entropy = (-(log_probs.exp() * log_probs).sum(-1)).masked_fill(~real, 0.0)
    return token_logps.masked_fill(~real, 0.0), entropy, None


def policy_only_loss(setup: GRPOStepSetup) -> torch.Tensor:
    """TRL's GRPO loss of the batch, log-probabilities from the VLM alone (no mask path)."""
    trainer = setup.trainer
    trainer._get_per_token_logps_and_entropies = MethodType(_vlm_only_logps, trainer)
    try:
        return GRPOTrainer._compute_loss(trainer, setup.model, setup.batch)
    finally:
        del trainer._get_per_token_logps_and_entropies  # back to the class's method


def with_mask_loss(setup: GRPOStepSetup) -> torch.Tensor:
    """This package's loss: policy + weighted mask losses from one SegCompass forward."""
    return setup.trainer._compute_loss(setup.model, setup.batch)


def step(setup: GRPOStepSetup, loss_fn: Callable[[GRPOStepSetup], torch.Tensor]) -> torch.Tensor:
    """zero_grad, loss, backward (the optimiser update is the same AdamW call in both)."""
    setup.model.zero_grad(set_to_none=True)
    loss = loss_fn(setup)
    loss.backward()
    return loss.detach()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_agreement(
    setup: GRPOStepSetup, *, atol: float = 1e-6, rtol: float = 1e-4
) -> list[Agreement]:
    """With every mask-loss weight 0 both steps must give the same loss and VLM gradients.

    Also: the mask-path parameters get exactly zero gradient from the weighted-0 step (so the
    with-mask step differs from the policy step only by the mask loss). Tolerance: float32; the
    two compute the same log-probabilities through the same modules, differing at most in
    summation order (rtol 1e-4 of the largest magnitude); a different policy loss (other
    completion positions, advantages or temperature) moves values by O(1e-2) or more.
    """
    args = setup.trainer.args
    saved = {name: getattr(args, name) for name in MASK_WEIGHTS}
    try:
        for name in MASK_WEIGHTS:
            setattr(args, name, 0.0)
        loss_mask = step(setup, with_mask_loss)
        grads_mask = _grads(setup.model)
    finally:
        for name, value in saved.items():
            setattr(args, name, value)
    loss_policy = step(setup, policy_only_loss)
    grads_policy = _grads(setup.model)
    setup.model.zero_grad(set_to_none=True)
    vlm = sorted(n for n in grads_policy if n.startswith("vlm."))
    if not vlm or set(grads_policy) - set(grads_mask):
        raise AssertionError(
            "the policy-only step must reach the VLM and only parameters the with-mask step "
            f"reaches; got {sorted(grads_policy)[:5]}..."
        )
    others = [g.flatten() for n, g in grads_mask.items() if n not in grads_policy]
    flat = torch.cat([grads_mask[n].flatten() for n in vlm])
    results = [
        compare("loss (mask weights 0)", loss_mask, loss_policy, atol=atol, rtol=rtol),
        compare(
            "grad[vlm] (mask weights 0)",
            flat,
            torch.cat([grads_policy[n].flatten() for n in vlm]),
            atol=atol,
            rtol=rtol,
        ),
    ]
    if others:
        mask_path = torch.cat(others)
        results.append(
            compare(
                "grad[mask path] (weight 0)", mask_path, torch.zeros_like(mask_path), atol=0, rtol=0
            )
        )
    return results


def run_size(size: str, device: torch.device, repeats: int, batch: int, completion_len: int):
    setup = build(size, device, batch=batch, completion_len=completion_len)
    cfg = setup.model.config
    params = sum(p.numel() for p in setup.model.parameters())
    vlm_params = sum(p.numel() for p in setup.model.vlm.parameters())
    b = setup.batch
    print(
        f"-- size {size}: {params / 1e6:.2f}M parameters ({100 * vlm_params / params:.0f}% VLM), "
        f"d_sae {cfg.d_sae}, K {cfg.num_slots}, masks {cfg.mask_size}; batch {b['prompt_ids'].shape[0]}"
        f" x ({b['prompt_ids'].shape[1]} prompt + {b['completion_ids'].shape[1]} completion) "
        f"tokens; loss_type {setup.trainer.loss_type}, weights seg "
        f"{setup.trainer.args.seg_loss_weight} conf {setup.trainer.args.conf_loss_weight} sae "
        f"{setup.trainer.args.sae_loss_weight or cfg.sae_reconstruction_weight}"
    )
    require_agreement(check_agreement(setup))
    variants = {
        "with_mask_loss": lambda: step(setup, with_mask_loss),
        "policy_only": lambda: step(setup, policy_only_loss),
    }
    loss_with, loss_policy = variants["with_mask_loss"](), variants["policy_only"]()
    print(
        f"loss with_mask_loss {float(loss_with):.4f} = policy {float(loss_policy):.4f} + mask "
        f"{float(loss_with - loss_policy):.4f}"
    )
    memory = {name: peak_memory_bytes(fn, device) for name, fn in variants.items()}
    timings = interleaved_timing(variants, repeats=repeats, warmup=1, device=device)

    # The mask reward's scoring forward (no grad, every completion): an extra cost of the path.
    completions = [
        ids[m.bool()].tolist() for ids, m in zip(b["completion_ids"], b["completion_mask"])
    ]
    fields = {
        "prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(b["prompt_ids"], b["prompt_mask"])],
        "pixel_values": b["pixel_values"],
        "image_grid_thw": b["image_grid_thw"],
        "sam_pixel_values": b["sam_pixel_values"],
        "valid_mask": b["valid_mask"],
    }

    def scoring():
        setup.trainer._rollout_fields = fields
        return setup.trainer._predict_masks(completions)

    scoring_time = interleaved_timing(
        {"reward_scoring": scoring}, repeats=3, warmup=1, device=device
    )
    for line in timing_lines(timings) + timing_lines(scoring_time):
        print(line)
    print(ratio_line(timings, "with_mask_loss", "policy_only"))
    print(
        f"peak memory: with_mask_loss {memory['with_mask_loss'] / MIB:.1f} MiB, policy_only "
        f"{memory['policy_only'] / MIB:.1f} MiB"
    )
    mean, low, high = timings.paired_ratio_interval("with_mask_loss", "policy_only")
    print(
        f"ratio with_mask_loss/policy_only over {repeats} interleaved rounds: geometric mean "
        f"{mean:.3f}, 95% interval [{low:.3f}, {high:.3f}]"
    )
    return {
        "interval": (mean, low, high),
        "ratio": timings.paired_ratio("with_mask_loss", "policy_only"),
        "cpu": timings.paired_ratio("with_mask_loss", "policy_only", cpu=True),
        "memory": memory["with_mask_loss"] / memory["policy_only"],
        "scoring_over_step": scoring_time.median("reward_scoring") / timings.median("policy_only"),
        "scoring": scoring_time.median("reward_scoring"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    device = setup(args.threads, args.device)
    print("== benchmark 4: GRPO step (loss + backward), with vs without the mask loss ==")
    print(machine_summary(device))
    results = {
        size: run_size(size, device, args.repeats, args.batch, args.completion_len)
        for size in args.sizes
    }
    for size, r in results.items():
        print(
            f"RESULT GRPO step[{size}] time ratio with_mask_loss/policy_only = {r['ratio']:.3f} "
            f"(95% interval of the paired ratio [{r['interval'][1]:.3f}, {r['interval'][2]:.3f}] "
            f"over {args.repeats} rounds; cpu time {r['cpu']:.3f}) "
            f"{verdict(r['ratio'], TARGET_TIME_RATIO, higher_is_better=False)}"
        )
        print(
            f"RESULT GRPO step[{size}] peak memory ratio with_mask_loss/policy_only = "
            f"{r['memory']:.3f}; mask-reward scoring forward {format_seconds(r['scoring'])} "
            f"= {r['scoring_over_step']:.2f} x the policy-only step"
        )
    return results


if __name__ == "__main__":
    main()
