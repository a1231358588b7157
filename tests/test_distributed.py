"""SFT (`transformers.Trainer`) and GRPO under `accelerate launch` with 2 CPU processes (gloo).

The test launches this very file as the worker script. Each rank trains the tiny model for
two SFT steps, then two GRPO steps, and writes checksums of its parameters; the test checks
that both ranks finished, that training changed the parameters, and that the two replicas
are identical after each phase (DDP kept them in sync).

A second worker (``SEGCOMPASS_DISTRIBUTED_CASE=clock``) runs the demo's wall-clock stages,
VLM pretraining and a Trainer with the demo's deadline and time-schedule callbacks, with
rank 1's clock 1000 s ahead: the ranks must still stop at the same step (rank 0's clock
decides) with identical parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.helpers import launch_two_cpu_processes

TIMEOUT_S = 240


def _checksum(model) -> dict[str, str | float]:
    import torch

    digest = hashlib.sha256()
    total = 0.0
    for name, param in sorted(model.named_parameters()):
        data = param.detach().to(torch.float64).cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        total += float(data.abs().sum())
    return {"sha256": digest.hexdigest(), "abs_sum": total}


def worker(out_dir: str) -> None:
    import torch
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
    from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
    from modeling_segcompass.data.collator import SegCompassCollator
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

    state = PartialState(cpu=True)  # gloo; TrainingArguments(use_cpu=True) shares this state
    rank, world = state.process_index, state.num_processes
    world_config = SyntheticWorldConfig(num_slots=3, seed=2)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world_config, 100)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    examples = generate_examples(world_config, 4)
    torch.manual_seed(0)  # same initial weights on every rank
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    report = {"rank": rank, "world_size": world, "backend": str(state.backend)}
    report["initial"] = _checksum(model)

    common = {
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 0,
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
    }
    sft_args = TrainingArguments(
        output_dir=os.path.join(out_dir, "sft"), remove_unused_columns=False, **common
    )
    Trainer(
        model=model,
        args=sft_args,
        train_dataset=examples,
        data_collator=SegCompassCollator(processor),
    ).train()
    report["sft"] = _checksum(model)

    grpo_args = SegCompassGRPOConfig(
        output_dir=os.path.join(out_dir, "grpo"),
        num_generations=2,
        max_completion_length=12,
        gradient_checkpointing=False,
        generation_kwargs={"sequence_bias": {(processor.ref_token_id,): 3.0}},
        **common,
    )
    trainer = SegCompassGRPOTrainer(
        model=model,
        args=grpo_args,
        train_dataset=build_grpo_dataset(examples, processor),
        processing_class=processor,
    )
    trainer.train()
    report["grpo"] = _checksum(model)
    report["grpo_logged_mask_loss"] = any(
        "mask_loss" in h for h in trainer.state.log_history
    ) or bool(trainer._metrics["train"].get("mask_loss"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def clock_worker(out_dir: str) -> None:
    import time

    import torch
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
    from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
    from modeling_segcompass.data.collator import SegCompassCollator
    from modeling_segcompass.data.synthetic import (
        SyntheticWorldConfig,
        describe_example,
        generate_examples,
        iter_texts,
    )
    from modeling_segcompass.demo.schedule import time_limit_callback, time_schedule_callback
    from modeling_segcompass.processing_segcompass import SegCompassProcessor
    from modeling_segcompass.training.vlm_pretraining import agreed_time, pretrain_vlm

    state = PartialState(cpu=True)
    rank = state.process_index
    if rank == 1:  # a clock far ahead: alone, this rank would stop at once
        real_time = time.time
        time.time = lambda: real_time() + 1000.0
    world_config = SyntheticWorldConfig(num_slots=3, seed=2)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world_config, 100)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    examples = generate_examples(world_config, 16)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    report = {"rank": rank, "initial": _checksum(model)}

    vlm = pretrain_vlm(
        model, [describe_example(ex, world_config) for ex in examples], processor,
        max_steps=1_000_000, deadline=agreed_time() + 3.0, warmup_steps=1, batch_size=2,
        progress=False,
    )  # fmt: skip
    report["vlm_steps"], report["vlm"] = vlm.steps, _checksum(model)

    deadline = agreed_time() + 3.0
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "sft"), remove_unused_columns=False, use_cpu=True,
        bf16=False, report_to=[], save_strategy="no", logging_strategy="no", seed=0,
        max_steps=1_000_000, per_device_train_batch_size=2, learning_rate=1e-3,
        lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=SegCompassCollator(processor),
        callbacks=[time_schedule_callback(deadline, warmup_steps=1), time_limit_callback(deadline)],
    )
    trainer.train()
    report["sft_steps"], report["sft"] = trainer.state.global_step, _checksum(model)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_wall_clock_stages_stop_together_on_rank_zeros_clock(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCOMPASS_DISTRIBUTED_CASE", "clock")
    reports, logs = launch_two_cpu_processes(__file__, tmp_path, TIMEOUT_S)
    for stage in ("vlm", "sft"):
        assert reports[0][f"{stage}_steps"] == reports[1][f"{stage}_steps"] >= 2, (stage, logs)
        assert reports[0][stage]["sha256"] == reports[1][stage]["sha256"], (stage, logs)
    assert reports[0]["vlm"]["sha256"] != reports[0]["initial"]["sha256"]
    assert reports[0]["sft"]["sha256"] != reports[0]["vlm"]["sha256"]


@pytest.mark.slow
def test_sft_and_grpo_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    reports, logs = launch_two_cpu_processes(__file__, tmp_path, TIMEOUT_S)
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["backend"] == "gloo", reports[0]["backend"]
    for phase in ("initial", "sft", "grpo"):  # replicas identical after every phase
        assert reports[0][phase]["sha256"] == reports[1][phase]["sha256"], (phase, logs)
    assert reports[0]["sft"]["sha256"] != reports[0]["initial"]["sha256"]  # SFT trained
    assert reports[0]["grpo"]["sha256"] != reports[0]["sft"]["sha256"]  # GRPO trained
    assert all(r["grpo_logged_mask_loss"] for r in reports)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="output folder of the rank reports")
    case = os.environ.get("SEGCOMPASS_DISTRIBUTED_CASE", "train")
    (clock_worker if case == "clock" else worker)(parser.parse_args().worker)
