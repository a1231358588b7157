"""Benchmark 1: segmentation forward + backward, one VLM pass (this package) vs two (reference).

The model is "proportional": a Qwen2.5-VL-shaped VLM (text hidden 512, 8 layers, GQA 8/2
heads, MLP ratio 5.3, untied LM head with a vocabulary worth ~8% of the weights, SAE at a
middle layer with d_sae = 16 x hidden) so that, as at 7B, the language model dominates the
cost of a training step; SAM runs on precomputed image embeddings as upstream does (it caches
SAM ViT-H embeddings). Both paths use the same weights and compute the same loss (LM
cross-entropy + segmentation + confidence), then `backward()`.

    python benchmarks/bench_forward_backward.py [--seq-len 512 --batch 2 --repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    MIB,
    Agreement,
    compare,
    interleaved_timing,
    machine_summary,
    peak_memory_bytes,
    ratio_line,
    require_agreement,
    setup,
    timing_lines,
    verdict,
)
from benchmarks.reference_path import reference_forward, reference_loss  # noqa: E402
from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation  # noqa: E402

TARGET_TIME_RATIO = 0.55
# token ids of SegCompassConfig.tiny's layout
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, THINK, THINK_END, REF = (
    0, 1, 2, 3, 4, 5, 7, 8, 9,
)  # fmt: skip


@dataclass
class ProportionalSize:
    """Dimensions of the proportional model and batch (defaults: the benchmark's size)."""

    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 6144
    sae_ratio: int = 16
    sae_k: int = 32
    codebook_dim: int = 128
    num_slots: int = 4
    batch: int = 2
    seq_len: int = 512
    image_px: int = 128  # patch 8, merge 2 -> (px / 16)^2 image tokens


def proportional_config(size: ProportionalSize) -> SegCompassConfig:
    """A SegCompass config whose VLM has the proportions of Qwen2.5-VL-7B at a small width."""
    head_dim = size.hidden // size.heads
    if head_dim % 16:
        raise ValueError(f"hidden / heads must be a multiple of 16 for mrope; got {head_dim}.")
    unit = head_dim // 16  # mrope sections in Qwen's 2:3:3 proportion, summing to head_dim/2
    vlm_config = {
        "model_type": "qwen2_5_vl",
        "text_config": {
            "vocab_size": size.vocab,
            "hidden_size": size.hidden,
            "intermediate_size": int(size.hidden * 18944 / 3584) // 16 * 16,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "max_position_embeddings": 4 * size.seq_len,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2 * unit, 3 * unit, 3 * unit],
            },
            "bos_token_id": PAD,
            "eos_token_id": PAD,
            "pad_token_id": PAD,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 32,
            "out_hidden_size": size.hidden,
            "fullatt_block_indexes": [1],
        },
        "image_token_id": IMAGE_PAD,
        "video_token_id": 6,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "tie_word_embeddings": False,
    }
    return SegCompassConfig.tiny(
        vocab_size=size.vocab,
        vlm_config=vlm_config,
        image_encoder_type="none",
        sae_layer=(size.layers - 1) // 2,  # a middle layer
        d_sae=size.sae_ratio * size.hidden,
        sae_k=size.sae_k,
        sae_reconstruction_weight=0.0,
        codebook_dim=size.codebook_dim,
        codebook_heads=4,
        codebook_ffn_dim=4 * size.codebook_dim,
        num_slots=size.num_slots,
    )


def make_inputs(config: SegCompassConfig, size: ProportionalSize, seed: int = 0) -> dict:
    """A right-padded batch: image, instruction, a long chain of thought, K `<REF_POS>`.

    Row b is `seq_len - 16 * b` tokens long (the rest is padding) and ends with
    `min(b + 2, K)` `<REF_POS>` tokens; ground truth has `min(b + 1, K)` objects.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = size.image_px // 8
    image_tokens = (grid // 2) ** 2
    rows = []
    for b in range(size.batch):
        length = size.seq_len - 16 * b
        refs = min(b + 2, size.num_slots)
        prompt = [IM_START, VISION_START, *[IMAGE_PAD] * image_tokens, VISION_END]
        tail = [THINK_END, *[REF] * refs, IM_END]
        filler = length - len(prompt) - len(tail) - 2
        if filler < 4:
            raise ValueError(
                f"seq_len {size.seq_len} is too short for {image_tokens} image tokens; raise it."
            )
        text = torch.randint(16, size.vocab, (filler,), generator=gen).tolist()
        rows.append(prompt + [IM_END, THINK] + text + tail)
    input_ids = torch.full((size.batch, size.seq_len), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        start = row.index(THINK)
        labels[b, start : len(row)] = input_ids[b, start : len(row)]
    mask_size = config.mask_size
    objects = [min(b + 1, size.num_slots) for b in range(size.batch)]
    gt = torch.zeros(size.batch, size.num_slots, mask_size, mask_size)
    for b, count in enumerate(objects):
        for j in range(count):
            top = (7 * j) % (mask_size // 2)
            gt[b, j, top : top + mask_size // 4, 4 + 3 * j : 4 + 3 * j + mask_size // 3] = 1.0
    channels, side = config.image_embedding_channels, config.image_embedding_size
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.randn(size.batch * grid * grid, 3 * 2 * 8 * 8, generator=gen),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * size.batch),
        "image_embeddings": torch.randn(size.batch, channels, side, side, generator=gen),
        "labels": labels,
        "gt_masks": gt,
        "num_objects": torch.tensor(objects),
    }


def build(
    size: ProportionalSize, device: torch.device
) -> tuple[SegCompassForReasoningSegmentation, dict]:
    torch.manual_seed(0)
    config = proportional_config(size)
    model = SegCompassForReasoningSegmentation(config).to(device).train()
    inputs = {k: v.to(device) for k, v in make_inputs(config, size).items()}
    return model, inputs


def one_pass_step(model: SegCompassForReasoningSegmentation, inputs: dict):
    """This package: forward (one VLM pass, hook at sae_layer) + backward.

    `compute_logits` is left at its default: with labels, only the labelled positions go
    through the LM head (the loss is the same; the full (B, L, V) logits are not returned).
    """
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out


def two_pass_step(model: SegCompassForReasoningSegmentation, inputs: dict):
    """Reference: two VLM passes, dense SAE encode+decode and codebook, per-image decoder loop."""
    model.zero_grad(set_to_none=True)
    vlm_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_embeddings")
    out = reference_forward(model, **{k: inputs[k] for k in vlm_keys})
    loss = reference_loss(
        model, out, labels=inputs["labels"], gt_masks=inputs["gt_masks"],
        num_objects=inputs["num_objects"],
    )  # fmt: skip
    loss.backward()
    return out, loss


@torch.no_grad()
def one_pass_forward(model: SegCompassForReasoningSegmentation, inputs: dict):
    """Forward only (rollout scoring / inference): this package."""
    return model(**{k: v for k, v in inputs.items() if k != "labels"}, compute_logits=True)


@torch.no_grad()
def two_pass_forward(model: SegCompassForReasoningSegmentation, inputs: dict):
    """Forward only: the reference (upstream `compute_log_prob(forward_seg=True)`)."""
    vlm_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_embeddings")
    return reference_forward(model, **{k: inputs[k] for k in vlm_keys})


def _grads_by_module(model: SegCompassForReasoningSegmentation) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            groups.setdefault(name.split(".")[0], []).append(param.grad.detach().flatten())
    return {k: torch.cat(v) for k, v in groups.items()}


def check_agreement(
    model: SegCompassForReasoningSegmentation,
    inputs: dict,
    *,
    atol: float = 1e-6,
    rtol: float = 1e-4,
) -> list[Agreement]:
    """Run both steps once; compare loss, heatmaps, confidences, masks and every gradient.

    Tolerance: float32 everywhere; the paths differ only in summation order (embedding-bag vs
    dense product, batched vs per-image GEMMs, the VLM gradient accumulated from one pass vs
    two), which moves results by a few float32 ulps of the largest summand. rtol 1e-4 of the
    largest magnitude leaves a 100x margin over that while any data-flow error (a wrong layer,
    a missing token, a swapped slot) is orders of magnitude larger.
    """
    ours = one_pass_step(model, inputs)
    our_grads = _grads_by_module(model)
    ref, ref_loss = two_pass_step(model, inputs)
    ref_grads = _grads_by_module(model)
    model.zero_grad(set_to_none=True)
    results = [
        compare("loss", ours.loss, ref_loss, atol=atol, rtol=rtol),
        compare("heatmap_logits", ours.heatmap_logits, ref.heatmap_logits, atol=atol, rtol=rtol),
        compare("conf_logits", ours.conf_logits, ref.conf_logits, atol=atol, rtol=rtol),
        compare("mask_logits", ours.mask_logits, ref.mask_logits, atol=atol, rtol=rtol),
    ]
    if set(our_grads) != set(ref_grads):
        raise AssertionError(
            f"gradients reach different modules: {sorted(our_grads)} vs {sorted(ref_grads)}."
        )
    for name in sorted(our_grads):
        results.append(
            compare(f"grad[{name}]", our_grads[name], ref_grads[name], atol=atol, rtol=rtol)
        )
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=ProportionalSize.batch)
    parser.add_argument("--seq-len", type=int, default=ProportionalSize.seq_len)
    parser.add_argument("--hidden", type=int, default=ProportionalSize.hidden)
    parser.add_argument("--layers", type=int, default=ProportionalSize.layers)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = setup(args.threads, args.device)
    size = ProportionalSize(
        batch=args.batch, seq_len=args.seq_len, hidden=args.hidden, layers=args.layers
    )
    print("== benchmark 1: segmentation forward + backward, one VLM pass vs two ==")
    print(machine_summary(device))
    model, inputs = build(size, device)
    params = sum(p.numel() for p in model.parameters())
    vlm_params = sum(p.numel() for p in model.vlm.parameters())
    print(
        f"model: {params / 1e6:.1f}M parameters ({100 * vlm_params / params:.0f}% VLM), text "
        f"hidden {size.hidden}, {size.layers} layers, d_sae {model.config.d_sae}, K {size.num_slots}; "
        f"batch {size.batch} x {size.seq_len} tokens"
    )
    require_agreement(check_agreement(model, inputs))
    memory = {
        "one_pass": peak_memory_bytes(lambda: one_pass_step(model, inputs), device),
        "two_pass": peak_memory_bytes(lambda: two_pass_step(model, inputs), device),
    }
    timings = interleaved_timing(
        {
            "one_pass": lambda: one_pass_step(model, inputs),
            "two_pass": lambda: two_pass_step(model, inputs),
        },
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
    )
    forward = interleaved_timing(
        {
            "one_pass_forward": lambda: one_pass_forward(model, inputs),
            "two_pass_forward": lambda: two_pass_forward(model, inputs),
        },
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
    )
    for line in timing_lines(timings) + timing_lines(forward):
        print(line)
    print(ratio_line(timings, "one_pass", "two_pass"))
    print(ratio_line(forward, "one_pass_forward", "two_pass_forward"))
    ratio = timings.paired_ratio("one_pass", "two_pass")
    fwd_ratio = forward.paired_ratio("one_pass_forward", "two_pass_forward")
    fwd_cpu = forward.paired_ratio("one_pass_forward", "two_pass_forward", cpu=True)
    mem_ratio = memory["one_pass"] / memory["two_pass"]
    print(
        f"peak memory: one_pass {memory['one_pass'] / MIB:.0f} MiB, two_pass "
        f"{memory['two_pass'] / MIB:.0f} MiB"
    )
    cpu_ratio = timings.paired_ratio("one_pass", "two_pass", cpu=True)
    print(
        f"RESULT fwd+bwd time ratio one_pass/two_pass = {ratio:.3f} (cpu time {cpu_ratio:.3f}) "
        f"{verdict(ratio, TARGET_TIME_RATIO, higher_is_better=False)}"
    )
    print(f"RESULT fwd+bwd peak memory ratio one_pass/two_pass = {mem_ratio:.3f}")
    print(
        f"RESULT forward-only (no_grad) time ratio one_pass/two_pass = {fwd_ratio:.3f} "
        f"(cpu time {fwd_cpu:.3f})"
    )
    return {
        "time_ratio": ratio,
        "cpu_time_ratio": cpu_ratio,
        "memory_ratio": mem_ratio,
        "forward_time_ratio": fwd_ratio,
    }


if __name__ == "__main__":
    main()
