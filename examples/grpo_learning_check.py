"""Learning check (not a unit test): supervised warm-up on the synthetic world, then GRPO.

Prints, on held-out examples, the mean GRPO reward (0.3 format + 0.7 mask, greedy
completions) and gIoU (union of the kept masks vs union of the targets; empty vs empty = 1)
after the warm-up and after GRPO. About 5-15 minutes on 2 CPU cores (a shared machine is slower):

    PYTHONPATH=. python examples/grpo_learning_check.py [--sft_steps 120 --grpo_steps 20]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.collator import SegCompassCollator
from modeling_segcompass.data_synthetic import SyntheticWorldConfig, generate_examples, iter_texts
from modeling_segcompass.grpo_trainer import (
    SegCompassGRPOConfig,
    SegCompassGRPOTrainer,
    build_grpo_dataset,
)
from modeling_segcompass.metrics import giou
from modeling_segcompass.processing_segcompass import SegCompassProcessor
from modeling_segcompass.rewards import score_completion
from modeling_segcompass.tokenizer_builder import build_tiny_tokenizer


@torch.no_grad()
def evaluate(model, processor, examples, max_new_tokens: int) -> dict[str, float]:
    """Mean reward and gIoU of greedy completions on `examples`."""
    model.eval()
    rewards, predictions, references = [], [], []
    for ex in examples:
        (result,) = model.segment(
            ex["image"], ex["instruction"], processor, max_new_tokens=max_new_tokens
        )
        enc = processor(images=[ex["image"]], instructions=[ex["instruction"]], masks=[ex["masks"]])
        out = model(
            input_ids=result.input_ids[None],
            attention_mask=torch.ones_like(result.input_ids)[None],
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            sam_pixel_values=enc["sam_pixel_values"],
            compute_logits=False,
        )
        has_ref = bool((result.input_ids == processor.ref_token_id).any())
        conf = out.conf_logits[0].masked_fill(~out.ref_mask[0], -torch.inf)
        rewards.append(
            score_completion(
                result.text,
                out.mask_logits[0] if has_ref else None,
                conf,
                enc["gt_masks"][0],
                int(ex["num_objects"]),
                num_ref=processor.num_slots,
                valid_mask=enc["valid_mask"][0],
            ).total
        )
        predictions.append(result.masks.any(0).numpy() if len(result.masks) else
                           np.zeros(ex["masks"].shape[1:], bool))  # fmt: skip
        references.append(ex["masks"].any(0) if len(ex["masks"]) else
                          np.zeros(ex["masks"].shape[1:], bool))  # fmt: skip
    model.train()
    return {"reward": float(np.mean(rewards)), "gIoU": giou(predictions, references)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--held_out", type=int, default=24)
    parser.add_argument("--sft_steps", type=int, default=120)
    parser.add_argument("--grpo_steps", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    start = time.time()

    world = SyntheticWorldConfig(num_slots=3, seed=0)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world, 500)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    train = generate_examples(world, args.train)
    held_out = generate_examples(world, args.held_out, start=10_000)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    print(f"data + model: {time.time() - start:.0f} s")

    out = tempfile.mkdtemp(prefix="segcompass-grpo-check-")
    sft_args = TrainingArguments(
        output_dir=f"{out}/sft", max_steps=args.sft_steps, per_device_train_batch_size=8,
        learning_rate=2e-3, warmup_steps=20, use_cpu=True, bf16=False, report_to=[],
        save_strategy="no", logging_steps=50, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    Trainer(
        model=model, args=sft_args, train_dataset=train, data_collator=SegCompassCollator(processor)
    ).train()
    after_sft = evaluate(model, processor, held_out, args.max_new_tokens)
    print(f"after warm-up ({time.time() - start:.0f} s): {after_sft}")

    grpo_args = SegCompassGRPOConfig(
        output_dir=f"{out}/grpo", max_steps=args.grpo_steps, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=args.max_new_tokens, learning_rate=2e-4,
        beta=0.01, temperature=1.0, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        logging_steps=10, gradient_checkpointing=False, disable_tqdm=True,
        module_lr_multipliers={"codebook": 5.0, "slot_mapper": 5.0, "mask_decoder": 2.0},
    )  # fmt: skip
    trainer = SegCompassGRPOTrainer(
        model=model, args=grpo_args, train_dataset=build_grpo_dataset(train, processor),
        processing_class=processor,
    )  # fmt: skip
    trainer.train()
    after_grpo = evaluate(model, processor, held_out, args.max_new_tokens)
    print(f"after GRPO ({time.time() - start:.0f} s): {after_grpo}")
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"GRPO training reward per logging window: {[round(r, 3) for r in rewards]}")


if __name__ == "__main__":
    main()
