"""Reading probe (not a unit test): does the tiny VLM of SegCompass read the image, and how
often does its greedy reasoning name the right object?

Why: the embedded default builds its VLM from scratch, and trained on the reasoning task alone
its language model ignored the image: held-out LM loss of the gold reasoning was 0.369 with
the right image and 0.369 with another one (the demo model, docs/training.md section 0b).
This script trains ONLY `model.vlm` (LM loss; no SAE, codebook or mask path) with
`vlm_pretraining.pretrain_vlm` (AdamW, warm-up + cosine to 10 %) in two optional phases:

1. image-description pretraining (`data.synthetic.describe_example`, ``--description_steps``);
2. reasoning SFT on the gold responses (``--reasoning_steps``).

After each phase that ran (or once, untrained, if neither did) it measures on held-out
examples (world seed ``--seed`` + 1000, ``--held_out_per_family`` of each of the 7 families):

a. image dependence (`vlm_pretraining.image_dependence`): LM loss of the gold responses with
   the right image vs with another example's image, for the reasoning and the description
   task (equal losses = the language model ignores the image);
b. greedy answer exact match: `model.vlm.generate` (greedy, 64 new tokens); the answer phrase
   (after "answer :", before "</think>") must equal the gold one, whitespace ignored; overall
   and per family. Also the exact-match rate of greedy descriptions (the whole think text).

    OMP_NUM_THREADS=1 python examples/vlm_reading_probe.py --output /tmp/vlm_reading.json

Measured by the throw-away probe this script replaces (1 torch thread, a shared 2-core
machine, batch 32, lr 3e-3, world seed 0, 140 held-out examples; its held-out set was the
first 140 examples of world seed 1000, not family-balanced, and its schedule multiplied the
warm-up into the cosine, so figures of this script can differ slightly):

* reasoning SFT alone, 600 steps (*): LM loss right / other image 0.419 / 0.419; answer
  exact match 0.221 (no_target 1.00, every other family 0.00);
* descriptions 1500 steps, then reasoning 600: 0.298 / 0.563; exact 0.264;
* descriptions 1200, then reasoning 2500 (the defaults): 0.189 / 0.578; exact 0.243
  (attribute 0.32, superlative 0.31, no_target 0.55, function 0.17, multi_object 0.10,
  negation 0.00, relation 0.00);
* descriptions 1500 steps alone, description task: 0.297 / 1.519; greedy description
  exact match 0.03.

(*) measured with an experimental visual-position option of the VLM
(``visual_position_frequencies=4``) that the current config no longer has; the other rows
ran without it. Speed: about 7.7 LM-only steps/s (~5.5 min for 2500 steps), so the defaults
take about 8 min in all (each measurement about 3 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.synthetic import (
    COT_STYLES,
    FAMILIES,
    SyntheticWorldConfig,
    balanced_examples,
    describe_example,
    generate_examples,
    iter_texts,
)
from modeling_segcompass.processing_segcompass import SegCompassProcessor
from modeling_segcompass.training.vlm_pretraining import image_dependence, pretrain_vlm

MAX_NEW_TOKENS = 64  # the focused style; scene_first responses need up to 96


# --------------------------------------------------------------------------- data
def held_out_set(seed: int, per_family: int, cot_style: str = "focused") -> list[dict[str, Any]]:
    """`per_family` examples of each family from the world with seed `seed` + 1000, in
    generation order (`data.synthetic.balanced_examples`, as the learning check uses)."""
    return balanced_examples(
        SyntheticWorldConfig(seed=seed + 1000, cot_style=cot_style), per_family
    )


# --------------------------------------------------------------------------- scoring
def _squash(text: str) -> str:
    """`text` without any whitespace (decoded completions may space tokens differently)."""
    return "".join(text.split())


def answer_phrase(text: str) -> str | None:
    """The words after the last "answer :" inside the think text, whitespace removed; None
    when there is no answer.

    >>> answer_phrase("<think> reds : one . answer : red circle at top </think> <REF_POS>")
    'redcircleattop'
    """
    inner = _squash(text).split("</think>")[0]
    return inner.split("answer:")[-1] if "answer:" in inner else None


def think_text(text: str) -> str:
    """The text between "<think>" and "</think>", whitespace removed."""
    return _squash(text).split("<think>")[-1].split("</think>")[0]


@torch.no_grad()
def greedy_completions(
    model: SegCompassForReasoningSegmentation,
    processor: SegCompassProcessor,
    examples: list[dict[str, Any]],
    *,
    batch_size: int = 32,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy completions of `model.vlm` (special tokens kept), one per example, in order."""
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            enc = processor(
                images=[ex["image"] for ex in chunk],
                instructions=[ex["instruction"] for ex in chunk],
                return_tensors="pt",
            )
            generated = model.vlm.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            # prompts are left-padded to one length: the completion starts right after it
            completions = generated[:, enc["input_ids"].shape[1] :]  # (B, new tokens)
            texts += processor.tokenizer.batch_decode(completions, skip_special_tokens=False)
    finally:
        model.train(was_training)
    return texts


def measure(
    model: SegCompassForReasoningSegmentation,
    processor: SegCompassProcessor,
    held_out: list[dict[str, Any]],
    described: list[dict[str, Any]],
) -> dict[str, Any]:
    """Image dependence (a) and greedy exact match (b) on the held-out examples.

    Returns:
        ``{"reasoning": ImageDependence dict, "descriptions": ImageDependence dict,
        "answer_exact": float, "answer_exact_by_family": {family: float},
        "description_exact": float, "samples": [2 greedy reasoning completions]}``.
    """
    longest = max(len(processor.tokenizer(ex["response"])["input_ids"]) for ex in held_out)
    answers = greedy_completions(
        model, processor, held_out, max_new_tokens=max(MAX_NEW_TOKENS, longest + 8)
    )
    answer_ok = [
        answer_phrase(out) is not None and answer_phrase(out) == answer_phrase(ex["response"])
        for out, ex in zip(answers, held_out, strict=True)
    ]
    families = np.asarray([ex["family"] for ex in held_out])
    ok = np.asarray(answer_ok, dtype=np.float64)
    descriptions = greedy_completions(model, processor, described)
    description_ok = [
        think_text(out) == _squash(ex["cot"])
        for out, ex in zip(descriptions, described, strict=True)
    ]
    return {
        "reasoning": image_dependence(model, held_out, processor).to_dict(),
        "descriptions": image_dependence(model, described, processor).to_dict(),
        "answer_exact": float(ok.mean()),
        "answer_exact_by_family": {f: float(ok[families == f].mean()) for f in FAMILIES},
        "description_exact": float(np.mean(description_ok)),
        "samples": answers[:2],
    }


def describe_measurement(label: str, m: dict[str, Any]) -> str:
    """Three or four printable lines for one `measure` result."""
    r, d = m["reasoning"], m["descriptions"]
    per_family = ", ".join(f"{f} {v:.2f}" for f, v in m["answer_exact_by_family"].items())
    return "\n".join(
        [
            f"after {label}:",
            f"  (a) held-out LM loss, right / other image: reasoning {r['loss_right_image']:.3f}"
            f" / {r['loss_other_image']:.3f} (gap {r['gap']:+.3f}); descriptions "
            f"{d['loss_right_image']:.3f} / {d['loss_other_image']:.3f} (gap {d['gap']:+.3f})",
            f"  (b) greedy answer exact match {m['answer_exact']:.3f} ({per_family}); "
            f"description exact match {m['description_exact']:.3f}",
            f"  e.g. {m['samples'][0][:200]!r}",
        ]
    )


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--description_steps", type=int, default=1200, help="phase 1 steps (0 = skip)")
    add("--reasoning_steps", type=int, default=2500, help="phase 2 steps (0 = skip)")
    add("--lr", type=float, default=3e-3, help="peak learning rate of both phases")
    add("--batch_size", type=int, default=32)
    add("--seed", type=int, default=0, help="world, model and batch-order seed")
    add("--text_layers", type=int, default=0, help="language-model layers (0: the tiny 2)")
    add(
        "--cot_style",
        default="focused",
        choices=COT_STYLES,
        help="gold chain of thought: focused, or scene_first (the scene description first)",
    )
    add("--train", type=int, default=6000, help="training examples (world seed --seed)")
    add("--held_out_per_family", type=int, default=20, help="x 7 families (world --seed + 1000)")
    add("--output", default=None, help="write every number to this JSON file")
    args = parser.parse_args()
    for flag in ("description_steps", "reasoning_steps"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be >= 0 (0 skips the phase), got {getattr(args, flag)}.")
    if args.text_layers < 0:
        parser.error(f"--text_layers must be >= 0 (0 keeps the tiny 2), got {args.text_layers}.")
    for flag in ("batch_size", "train", "held_out_per_family"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}.")
    start = time.time()

    def stamp(msg: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)

    # ---- data, tokenizer, model (as examples/grpo_learning_check.py)
    set_seed(args.seed)
    world = SyntheticWorldConfig(seed=args.seed, cot_style=args.cot_style)
    train = generate_examples(world, args.train)
    held_out = held_out_set(args.seed, args.held_out_per_family, args.cot_style)
    described_held_out = [describe_example(ex, world) for ex in held_out]
    tokenizer = build_tiny_tokenizer(
        list(iter_texts(world, min(args.train, 3000), descriptions=True)), vocab_size=1024
    )
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=world.num_slots)
    config = SegCompassConfig.tiny(vocab_size=len(tokenizer), num_slots=world.num_slots)
    if args.text_layers:
        vlm = config.vlm_config
        vlm = copy.deepcopy(vlm if isinstance(vlm, dict) else vlm.to_dict())
        vlm["text_config"]["num_hidden_layers"] = args.text_layers
        vlm["text_config"].pop("layer_types", None)  # rebuilt for the new depth
        config = SegCompassConfig.tiny(
            vocab_size=len(tokenizer), num_slots=world.num_slots, vlm_config=vlm
        )
    torch.manual_seed(args.seed)
    model = SegCompassForReasoningSegmentation(config)
    stamp(
        f"data: {len(train)} train, {len(held_out)} held-out ({args.held_out_per_family} per "
        f"family, world seed {args.seed + 1000}); torch threads {torch.get_num_threads()}"
    )

    # ---- the two LM-only phases, each followed by the measurement
    phases = [
        ("descriptions", args.description_steps, [describe_example(ex, world) for ex in train]),
        ("reasoning", args.reasoning_steps, train),
    ]
    report: dict[str, Any] = {"args": vars(args), "held_out": len(held_out), "phases": []}
    for index, (name, steps, examples) in enumerate(phases):
        if steps == 0:
            continue
        trained = pretrain_vlm(
            model,
            examples,
            processor,
            max_steps=steps,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            seed=args.seed + index,  # a different batch order per phase
            progress=False,
        )
        stamp(
            f"phase {name}: {trained.steps} steps in {trained.seconds:.1f} s "
            f"({trained.steps / max(trained.seconds, 1e-6):.1f} steps/s), training loss "
            f"{trained.first_loss:.3f} -> {trained.final_loss:.3f}"
        )
        t0 = time.time()
        measured = measure(model, processor, held_out, described_held_out)
        seconds = round(time.time() - t0, 1)
        print(describe_measurement(f"{name} ({steps} steps)", measured), flush=True)
        stamp(f"measured in {seconds:.1f} s")
        report["phases"].append(
            {
                "phase": name,
                "training": trained.to_dict(),
                "measurement": measured,
                "measurement_seconds": seconds,
            }
        )
    if not report["phases"]:
        measured = measure(model, processor, held_out, described_held_out)
        print(describe_measurement("no training", measured), flush=True)
        report["phases"].append({"phase": "untrained", "measurement": measured})
    stamp("done")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
