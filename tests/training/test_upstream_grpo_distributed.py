"""The upstream recipe end to end: one GRPO step of a tiny `SegCompassConfig.upstream` model
under `accelerate launch` with 2 CPU processes (gloo).

The model is `SegCompassConfig.upstream(...)` (relu SAE with the 2.0 threshold, the authors'
slot head, -50 fill, their loss weights) with the tiny preset's VLM, image encoder, SAM
prompt encoder / mask decoder and small SAE / codebook sizes; `freeze_like_upstream`
decides what trains and `SegCompassGRPOConfig.upstream(...)` (with CPU-sized batches and
lengths) trains it, mask loss included. The test launches this very file as the worker
script; each rank writes a JSON report. Checked: frozen parameters are bit-identical after
the step, the slot mapper, codebook and mask decoder moved, both replicas are identical
(DDP kept them in sync), and the logged loss is finite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from tests.helpers import launch_two_cpu_processes

TIMEOUT_S = 240
REF_BIAS = 3.0  # makes <REF_POS> likelier when sampling, so completions carry mask slots


def _digest(params) -> str:
    import torch

    digest = hashlib.sha256()
    for name, param in params:
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def tiny_upstream_model(processor):
    """`SegCompassConfig.upstream` at the tiny preset's sizes, 3 decoder layers (sae_layer 0,
    so decoder layer 2 is the one `freeze_like_upstream` leaves trainable)."""
    import torch

    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation

    tiny = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer))
    tiny.vlm_config.text_config.num_hidden_layers = 3
    tiny.vlm_config.text_config.layer_types = ["full_attention"] * 3
    config = SegCompassConfig.upstream(
        "qwen2.5-vl-7b",
        num_slots=3,
        tokenizer=processor,
        vlm_config=tiny.vlm_config,
        sam_config=tiny.sam_config,
        image_encoder_type=tiny.image_encoder_type,
        conv_encoder_width=tiny.conv_encoder_width,
        sae_layer=0,
        d_sae=tiny.d_sae,
        codebook_dim=tiny.codebook_dim,
        codebook_heads=tiny.codebook_heads,
        codebook_ffn_dim=tiny.codebook_ffn_dim,
        initializer_range=tiny.initializer_range,
    )
    torch.manual_seed(0)  # same initial weights on every rank
    return SegCompassForReasoningSegmentation(config)


def worker(out_dir: str) -> None:
    import torch
    from accelerate import PartialState

    from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
    from modeling_segcompass.data.synthetic import (
        SyntheticWorldConfig,
        generate_examples,
        iter_texts,
    )
    from modeling_segcompass.processing_segcompass import SegCompassProcessor
    from modeling_segcompass.training.grpo_trainer import (
        SegCompassGRPOConfig,
        SegCompassGRPOTrainer,
        build_grpo_dataset,
    )
    from modeling_segcompass.training.upstream_recipe import freeze_like_upstream

    state = PartialState(cpu=True)  # gloo; TrainingArguments(use_cpu=True) shares this state
    rank, world = state.process_index, state.num_processes
    world_config = SyntheticWorldConfig(num_slots=3, seed=2)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world_config, 100)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    examples = generate_examples(world_config, 4)
    model = tiny_upstream_model(processor)
    summary = freeze_like_upstream(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    args = SegCompassGRPOConfig.upstream(
        os.path.join(out_dir, "grpo"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=12,
        gradient_checkpointing=False,
        learning_rate=1e-3,  # the upstream 1.6e-6 would move the tiny heads by rounding only
        generation_kwargs={"sequence_bias": {(processor.ref_token_id,): REF_BIAS}},
    )
    trainer = SegCompassGRPOTrainer(
        model=model,
        args=args,
        train_dataset=build_grpo_dataset(examples, processor),
        processing_class=processor,
    )
    trainer.train()

    params = sorted(model.named_parameters())
    frozen_changed = [n for n, p in params if not p.requires_grad and not torch.equal(p, before[n])]
    moved = [n for n, p in params if p.requires_grad and not torch.equal(p, before[n])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    report = {
        "rank": rank,
        "world_size": world,
        "backend": str(state.backend),
        "slot_mapper_type": model.config.slot_mapper_type,
        "sae_architecture": model.config.sae_architecture,
        "summary": summary,
        "frozen_changed": frozen_changed,
        "moved": moved,
        "losses": losses,
        "mask_loss_logged": bool(trainer._metrics["train"].get("mask_loss"))
        or any("mask_loss" in h for h in trainer.state.log_history),
        "sha256": _digest(params),
        "initial_sha256": _digest(sorted(before.items())),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_upstream_recipe_trains_one_grpo_step_on_two_processes(tmp_path):
    reports, logs = launch_two_cpu_processes(__file__, tmp_path, TIMEOUT_S)
    first = reports[0]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert first["backend"] == "gloo", first["backend"]
    assert (first["slot_mapper_type"], first["sae_architecture"]) == ("upstream", "relu")
    assert first["summary"]["frozen"] > 0 and first["summary"]["trainable"] > 0
    # the same start and, after the step, the same replica on both ranks (DDP sync)
    assert first["initial_sha256"] == reports[1]["initial_sha256"]
    assert first["sha256"] == reports[1]["sha256"], logs
    assert first["sha256"] != first["initial_sha256"]
    for report in reports:
        assert report["frozen_changed"] == [], report["frozen_changed"]  # SAE, VLM, encoder
        for module in ("slot_mapper.", "codebook.", "mask_decoder."):
            assert any(n.startswith(module) for n in report["moved"]), (module, report["moved"])
        assert report["losses"] and all(math.isfinite(x) for x in report["losses"])
        assert report["mask_loss_logged"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="output folder of the rank reports")
    worker(parser.parse_args().worker)
