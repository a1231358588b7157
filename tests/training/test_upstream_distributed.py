"""A tiny `upstream()` model trains one GRPO step with the mask loss on 2 CPU processes (gloo).

The test launches this very file as the worker script under `accelerate launch`. Each rank
builds `SegCompassConfig.upstream()` at the tiny dims (VLM, SAM and widths overridden),
freezes it as upstream does (`freeze_like_upstream`), trains one step with
`SegCompassGRPOConfig.upstream()` (KL 0.2 with a reference copy, bnpo, upstream rates and
schedule, upstream format rule, rewards on the full grid) and writes checksums; the test
checks that the frozen parameters did not move, the trainable ones did, and both replicas
agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
#: Fields of `SegCompassConfig.tiny()` that give `upstream()` the tiny dims.
TINY_DIMS = ("vlm_config", "sam_config", "image_encoder_type", "conv_encoder_width", "sae_layer",
             "d_sae", "codebook_dim", "codebook_heads", "codebook_ffn_dim", "ref_token_id",
             "think_start_token_id", "think_end_token_id")  # fmt: skip


def _checksum(params) -> str:
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(params):
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def worker(out_dir: str) -> None:
    import torch
    from accelerate import PartialState

    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
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

    state = PartialState(cpu=True)
    rank = state.process_index
    world_config = SyntheticWorldConfig(num_slots=3, seed=2)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world_config, 100)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    examples = generate_examples(world_config, 4)
    tiny = SegCompassConfig.tiny(vocab_size=len(tokenizer)).to_dict()
    small = {key: tiny[key] for key in TINY_DIMS}
    small["vlm_config"]["text_config"].update(
        num_hidden_layers=3, layer_types=["full_attention"] * 3
    )  # sae_layer 0: layers 0 and 1 frozen, layer 2 trains
    config = SegCompassConfig.upstream(num_slots=3, **small)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(config)
    freeze_like_upstream(model)
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    report = {"rank": rank, "world_size": state.num_processes, "backend": str(state.backend)}
    report["before"] = {"frozen": _checksum(frozen), "trainable": _checksum(trainable)}
    args = SegCompassGRPOConfig.upstream(
        os.path.join(out_dir, "grpo"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=0,
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=12,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        generation_kwargs={"sequence_bias": {(processor.ref_token_id,): 3.0}},
    )
    trainer = SegCompassGRPOTrainer(
        model=model,
        args=args,
        train_dataset=build_grpo_dataset(examples, processor),
        processing_class=processor,
    )
    trainer.train()
    report["after"] = {"frozen": _checksum(frozen), "trainable": _checksum(trainable)}
    report["mask_loss"] = [h["mask_loss"] for h in trainer.state.log_history if "mask_loss" in h]
    report["mask_loss"] += list(trainer._metrics["train"].get("mask_loss", []))
    report["training_step"] = model.training_step
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_upstream_grpo_step_on_two_cpu_processes_keeps_the_frozen_parts(tmp_path):
    env = dict(os.environ)
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        ACCELERATE_USE_CPU="true",
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        __file__, "--worker", str(tmp_path),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"accelerate launch did not finish within {TIMEOUT_S} s:\n{error.stderr}")
    logs = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 0, logs
    reports = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2] and reports[0]["backend"] == "gloo"
    for report in reports:
        assert report["after"]["frozen"] == report["before"]["frozen"], logs
        assert report["after"]["trainable"] != report["before"]["trainable"], logs
        assert report["mask_loss"] and all(v > 0 for v in report["mask_loss"])
        assert report["training_step"] == 0
    assert reports[0]["after"] == reports[1]["after"]  # DDP kept the replicas equal


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="output folder of the rank reports")
    worker(parser.parse_args().worker)
