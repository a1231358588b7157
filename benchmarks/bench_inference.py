"""Benchmark 5: inference of the tiny default model: `model.segment` per image and at batch 8.

`segment` = generate the chain of thought and `<REF_POS>` tokens, one forward on prompt +
completion, post-process masks to the original image size. The model is the embedded default
(`SegCompassConfig.tiny`) with fresh weights and a tokenizer trained on synthetic-world text;
a fresh model writes random tokens, so the completion length is pinned (`min_new_tokens =
max_new_tokens` = the longest gold response of the sample) to time the work a trained model
does. Reported: latency of one image (batch 1) and throughput at batch 8, interleaved.

    python benchmarks/bench_inference.py [--batch 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    MIB,
    Agreement,
    compare,
    format_seconds,
    interleaved_timing,
    machine_summary,
    peak_memory_bytes,
    require_agreement,
    setup,
    timing_lines,
)
from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation  # noqa: E402
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer  # noqa: E402
from modeling_segcompass.data.synthetic import (  # noqa: E402
    SyntheticWorldConfig,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor  # noqa: E402


def build(batch: int, device: torch.device, *, corpus: int = 300, vocab_size: int = 1024):
    """Tiny default model + processor and `batch` synthetic examples.

    Returns (model, processor, images, instructions, completion_tokens).
    """
    world = SyntheticWorldConfig()
    tokenizer = build_tiny_tokenizer(iter_texts(world, corpus), vocab_size=vocab_size)
    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(tokenizer))
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=config.num_slots)
    model = SegCompassForReasoningSegmentation(config).to(device).eval()
    examples = generate_examples(world, batch)
    images = [ex["image"] for ex in examples]
    instructions = [ex["instruction"] for ex in examples]
    completion_tokens = max(len(tokenizer(ex["response"])["input_ids"]) for ex in examples) + 1
    return model, processor, images, instructions, completion_tokens


def segment(model, processor, images, instructions, tokens: int):
    return model.segment(
        images,
        instructions,
        processor=processor,
        max_new_tokens=tokens,
        generation_kwargs={"min_new_tokens": tokens},
    )


def check_agreement(
    model, processor, images, instructions, tokens: int, *, atol: float = 1e-5, rtol: float = 1e-4
) -> list[Agreement]:
    """Batched `segment` must give every image what a batch-1 call gives it.

    Same completion text (greedy decoding through left padding), and heatmaps / confidence
    logits equal up to float32 summation order (padding changes GEMM shapes only); the
    tolerance has the 100x margin of the other benchmarks.
    """
    batched = segment(model, processor, images, instructions, tokens)
    single = [
        segment(model, processor, [im], [ins], tokens)[0] for im, ins in zip(images, instructions)
    ]
    texts_equal = sum(b.text == s.text for b, s in zip(batched, single))
    print(f"agreement completions: {texts_equal}/{len(single)} texts identical")
    if texts_equal != len(single):
        raise AssertionError("batched generation wrote other text than batch-1 generation.")
    return [
        compare(
            "heatmaps",
            torch.stack([b.heatmaps for b in batched]),
            torch.stack([s.heatmaps for s in single]),
            atol=atol,
            rtol=rtol,
        ),
        compare(
            "conf_logits",
            torch.stack([b.conf_logits for b in batched]),
            torch.stack([s.conf_logits for s in single]),
            atol=atol,
            rtol=rtol,
        ),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = setup(args.threads, args.device)
    print("== benchmark 5: inference of the tiny default model (generate + segment) ==")
    print(machine_summary(device))
    model, processor, images, instructions, tokens = build(args.batch, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters; {tokens} generated tokens per image")
    require_agreement(check_agreement(model, processor, images, instructions, tokens))
    variants = {
        "batch_1": lambda: segment(model, processor, images[:1], instructions[:1], tokens),
        f"batch_{args.batch}": lambda: segment(model, processor, images, instructions, tokens),
    }
    memory = {name: peak_memory_bytes(fn, device) for name, fn in variants.items()}
    timings = interleaved_timing(variants, repeats=args.repeats, warmup=1, device=device)
    for line in timing_lines(timings):
        print(line)
    latency = timings.median("batch_1")
    batch_time = timings.median(f"batch_{args.batch}")
    throughput = args.batch / batch_time
    print(
        f"peak memory: batch_1 {memory['batch_1'] / MIB:.1f} MiB, batch_{args.batch} "
        f"{memory[f'batch_{args.batch}'] / MIB:.1f} MiB"
    )
    print(f"RESULT inference latency per image (batch 1) = {format_seconds(latency)}")
    print(
        f"RESULT inference throughput at batch {args.batch} = {throughput:.1f} images/s "
        f"({throughput * latency:.2f}x the batch-1 rate)"
    )
    return {"latency_s": latency, "throughput": throughput}


if __name__ == "__main__":
    main()
