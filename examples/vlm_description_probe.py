"""Description probe (not a unit test): which words of an image description does the tiny VLM
get wrong, and does a change of its configuration help?

Trains ONLY `model.vlm` on the image-description task (`data.synthetic.describe_example`,
"large red circle at top left , small blue square at right ...") for a wall-clock budget with
`vlm_pretraining.pretrain_vlm` (the demo's first stage: AdamW lr 3e-3, 100 warm-up steps,
cosine on time, batch 32), then scores held-out descriptions teacher-forced: the share of
colour, shape-kind, size and cell words predicted exactly (argmax), and of the other tokens
("at", ",", the tags). Every description word of an object needs the image, so these are
reading accuracies; the shape kind is the hardest.

    OMP_NUM_THREADS=1 python examples/vlm_description_probe.py --seconds 400

Measured on 2026-11-30 (one seed each, 1 torch thread, the other core busy; docs/results.md):
the default tiny VLM after 400 s (3,312 steps) reads colour 0.92, kind 0.58, size 0.90 and
cell 0.93 of the held-out words; after 150 s (1,101 steps) colour 0.53 and kind 0.41. None of
the variants tried (rope theta 16 or 4, vision width 64 or 96, patch 4, full attention in
both vision blocks, text width 128) read kinds better within the same time.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch
from transformers import set_seed

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.collator import SegCompassCollator
from modeling_segcompass.data.synthetic import (
    PALETTE,
    SHAPE_KINDS,
    SIZES,
    SyntheticWorldConfig,
    balanced_examples,
    describe_example,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor
from modeling_segcompass.training.vlm_pretraining import pretrain_vlm

CELL_WORDS = ("top", "bottom", "left", "right", "center")


def word_category(word: str) -> str:
    """colour / kind / size / cell / other for one decoded token (whitespace stripped)."""
    if word in PALETTE:
        return "colour"
    if word in SHAPE_KINDS:
        return "kind"
    if word in SIZES:
        return "size"
    if word in CELL_WORDS:
        return "cell"
    return "other"


def vlm_config(config: SegCompassConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The tiny VLM config with the probe's changes applied."""
    vlm = config.vlm_config
    vlm = copy.deepcopy(vlm if isinstance(vlm, dict) else vlm.to_dict())
    text, vision = vlm["text_config"], vlm["vision_config"]
    if args.vision_width:
        vision.update(hidden_size=args.vision_width, intermediate_size=2 * args.vision_width)
        vision.update(num_heads=max(2, args.vision_width // 24))
    if args.text_width:
        heads = args.text_width // 16  # head_dim 16 keeps mrope_section valid
        text.update(hidden_size=args.text_width, intermediate_size=2 * args.text_width)
        text.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
        vision.update(out_hidden_size=args.text_width)
    if args.rope_theta:
        text["rope_parameters"] = dict(text["rope_parameters"], rope_theta=args.rope_theta)
    if args.full_attention:
        vision.update(fullatt_block_indexes=list(range(vision["depth"])))
    if args.patch_size:
        vision.update(patch_size=args.patch_size)
    return vlm


@torch.no_grad()
def reading_accuracy(
    model: SegCompassForReasoningSegmentation,
    processor: SegCompassProcessor,
    described: list[dict[str, Any]],
) -> dict[str, float]:
    """Teacher-forced argmax accuracy per word category on the response tokens."""
    collator = SegCompassCollator(processor)
    hits: dict[str, list[int]] = {}
    model.eval()
    for start in range(0, len(described), 32):
        batch = collator(described[start : start + 32])
        logits = model.vlm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
        predicted = logits[:, :-1].argmax(-1)  # (B, T - 1): the token each position predicts
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        for guess, label in zip(predicted[scored].tolist(), labels[scored].tolist()):
            category = word_category(processor.tokenizer.decode([label]).strip())
            counts = hits.setdefault(category, [0, 0])
            counts[0] += int(guess == label)
            counts[1] += 1
    return {name: round(right / total, 3) for name, (right, total) in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--seconds", type=float, default=400.0, help="wall-clock budget of the training")
    add("--seed", type=int, default=0, help="world, model and batch-order seed")
    add("--train", type=int, default=6000, help="training images (world seed --seed)")
    add("--held_out_per_family", type=int, default=20, help="x 7 families (world --seed + 1000)")
    add("--vision_width", type=int, default=0, help="vision hidden size (0: the tiny 32)")
    add("--text_width", type=int, default=0, help="text hidden size, multiple of 16 (0: 64)")
    add("--rope_theta", type=float, default=0.0, help="text rope theta (0: the tiny 10000)")
    add("--full_attention", action="store_true", help="full attention in every vision block")
    add("--patch_size", type=int, default=0, help="vision patch size (0: the tiny 8)")
    add("--output", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args()
    if args.seconds <= 0:
        parser.error(f"--seconds must be > 0, got {args.seconds}.")
    if args.text_width % 16:
        parser.error(f"--text_width must be a multiple of 16 (head_dim 16), got {args.text_width}.")

    set_seed(args.seed)
    world = SyntheticWorldConfig(seed=args.seed)
    train = [describe_example(ex, world) for ex in generate_examples(world, args.train)]
    held_out = balanced_examples(
        SyntheticWorldConfig(seed=args.seed + 1000), args.held_out_per_family
    )
    described = [describe_example(ex, world) for ex in held_out]
    tokenizer = build_tiny_tokenizer(
        list(iter_texts(world, min(args.train, 3000), descriptions=True)), vocab_size=1024
    )
    processor = SegCompassProcessor.tiny(
        tokenizer, num_slots=world.num_slots, patch_size=args.patch_size or 8
    )
    base = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=world.num_slots)
    config = SegCompassConfig.tiny(
        vocab_size=len(tokenizer), num_slots=world.num_slots, vlm_config=vlm_config(base, args)
    )
    torch.manual_seed(args.seed)
    model = SegCompassForReasoningSegmentation(config)
    report = pretrain_vlm(
        model,
        train,
        processor,
        max_steps=10**9,  # the deadline stops it
        deadline=time.time() + args.seconds,
        learning_rate=3e-3,
        warmup_steps=100,
        batch_size=32,
        seed=args.seed,
        progress=True,
    )
    accuracy = reading_accuracy(model, processor, described)
    result = {
        "args": vars(args),
        "vlm_parameters": sum(p.numel() for p in model.vlm.parameters()),
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "final_loss": round(report.final_loss, 4),
        "held_out_examples": len(described),
        "accuracy": accuracy,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
