"""The training commands: ``train-sae``, ``sft`` and ``grpo``.

Each one opens a model folder, reads ``--data``, trains with the library's trainer and saves
the model and its processor into ``--output`` with a JSON log. Trainer-side modules (trl,
peft, datasets) are imported inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .common import CLIError, check_output_dir, require_positive, seed_everything, write_json
from .data import need_responses, parse_data_spec, read_rows
from .model_folder import load_model, save_model

#: What `--lr-multipliers paper` means for GRPO (arXiv 2605.22658, the paper's training
#: section: the heads learn at 5-80x the base rate).
GRPO_PAPER_MULTIPLIERS = {"codebook": 25.0, "slot_mapper": 25.0, "prompt_encoder": 10.0,
                          "mask_decoder": 5.0}  # fmt: skip


# =========================================================================== train-sae
def _sae_batches(rows: list[dict[str, Any]], processor: Any, batch_size: int) -> list[Any]:
    """VLM input batches: prompt + gold response when every row has one, else prompts."""
    from ..data.collator import SegCompassCollator

    with_responses = all(row.get("response") for row in rows)
    collator = SegCompassCollator(processor)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if with_responses:
            batches.append(collator(chunk))
        else:
            batches.append(
                processor([r["image"] for r in chunk], [r["instruction"] for r in chunk])
            )
    return batches


def cmd_train_sae(args: argparse.Namespace) -> int:
    """`segcompass train-sae`: `sae_training.pretrain_sae_for_model`, then save the model."""
    from ..training.sae_training import pretrain_sae_for_model

    output = Path(args.output)
    check_output_dir(output, overwrite=args.overwrite)
    require_positive(args, "steps", "batch_size", "data_batch_size")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    spec = parse_data_spec(args.data)
    seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    rows = read_rows(args, spec, num_slots=loaded.model.config.num_slots, default_count=256)
    batches = _sae_batches(rows, loaded.processor, args.data_batch_size)
    result = pretrain_sae_for_model(
        loaded.model,
        batches,
        output / "sae",
        cache_dir=args.cache_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        l1_coefficient=args.l1,
        max_tokens=args.max_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    save_model(loaded.model, loaded.processor, output)
    report = result.report
    summary = {
        "model": str(loaded.folder),
        "data": args.data,
        "steps": args.steps,
        "l0": float(report.l0),
        "fvu": float(report.fvu),
        "initial_fvu": float(report.initial_fvu),
        "dead_fraction": float(report.dead_fraction),
        "sae_path": result.sae_path,
    }
    write_json(output / "sae_report.json", summary)
    print(
        f"SAE trained for {args.steps} steps: FVU {report.initial_fvu:.4f} -> {report.fvu:.4f}, "
        f"L0 {report.l0:.1f}, dead {100 * report.dead_fraction:.1f}%."
    )
    print(f"model with the new SAE: {output}  (SAELens-format SAE: {result.sae_path})")
    return 0


# =========================================================================== resume
def resume_target(value: str | None, output: Path) -> str | bool | None:
    """`--resume` of `sft` and `grpo`: None (fresh run), True (last complete checkpoint in
    --output) or a checkpoint path; a missing or incomplete checkpoint is a user error."""
    from ..training.checkpointing import (
        COMPLETE_MARKER,
        is_complete_checkpoint,
        last_complete_checkpoint,
    )

    if value is None:
        return None
    if value == "auto":
        if not output.is_dir() or last_complete_checkpoint(output) is None:
            raise CLIError(
                f"--resume: no complete checkpoint-N folder in {str(output)!r} to resume from; "
                "run without --resume and with --save-steps N first."
            )
        return True
    path = Path(value)
    if not path.is_dir():
        raise CLIError(f"--resume {value!r}: no such checkpoint folder.")
    if not is_complete_checkpoint(path) and not is_complete_checkpoint(path, require_marker=False):
        last = last_complete_checkpoint(path.parent)
        hint = f" The last complete one there is {last!r}." if last else ""
        raise CLIError(
            f"--resume {value!r}: incomplete checkpoint (neither {COMPLETE_MARKER} nor "
            f"trainer_state.json; the run stopped while writing it).{hint}"
        )
    return str(path)


# =========================================================================== report-to
def report_targets(value: str) -> list[str] | str:
    """`--report-to` of `sft` and `grpo`: a comma-separated list of transformers reporting
    integrations, 'all' or 'none'; an unknown or uninstalled one is a user error."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [name.strip() for name in value.split(",") if name.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return "all"
    unknown = [name for name in names if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise CLIError(
            f"--report-to {value!r}: unknown integration(s) {unknown}; transformers supports "
            f"{sorted(INTEGRATION_TO_CALLBACK)}, or 'all' / 'none'."
        )
    available = set(get_available_reporting_integrations())
    missing = [name for name in names if name not in available]
    if missing:
        raise CLIError(
            f"--report-to {value!r}: {missing} not installed here; install the package "
            f"(e.g. `pip install {missing[0].replace('_', '-')}`) or pass --report-to none."
        )
    return names


def _print_report_location(report_to: list[str] | str, output: Path) -> None:
    if report_to == "all" or "tensorboard" in report_to:
        print(f"tensorboard logs: {output / 'runs'}  (tensorboard --logdir {output / 'runs'})")


# =========================================================================== sft
def cmd_sft(args: argparse.Namespace) -> int:
    """`segcompass sft`: `sft.train_sft`, then save the (LoRA-merged) model and processor."""
    from ..training.sft import ModuleLearningRates, merge_lora, sft_training_arguments, train_sft

    output = Path(args.output)
    require_positive(args, "steps", "batch_size", "save_steps", "logging_steps")
    resume = resume_target(args.resume, output)
    if resume is None:
        check_output_dir(output, overwrite=args.overwrite)
    spec = parse_data_spec(args.data)
    report_to = report_targets(args.report_to)
    seed_everything(args.seed)
    loaded = load_model(args.model, device=args.device)
    rows = read_rows(
        args,
        spec,
        num_slots=loaded.model.config.num_slots,
        default_count=max(256, args.steps * args.batch_size),
    )
    need_responses(rows, spec, "sft")
    rates = ModuleLearningRates.paper() if args.lr_multipliers == "paper" else None
    if rates is None:
        rates = ModuleLearningRates.uniform()
    training_args = sft_training_arguments(
        str(output),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        disable_tqdm=args.no_progress,
        report_to=report_to,
        **({"use_cpu": True, "bf16": False} if loaded.model.device.type == "cpu" else {}),
    )
    lora: Any = None
    if args.lora:
        from ..training.sft import default_lora_config

        lora = default_lora_config(loaded.model, r=args.lora_r, lora_alpha=args.lora_alpha)
    result = train_sft(
        loaded.model,
        rows,
        processor=loaded.processor,
        args=training_args,
        lora=lora,
        module_learning_rates=rates,
        resume_from_checkpoint=resume,
    )
    if args.lora:
        merge_lora(loaded.model)
    save_model(loaded.model, loaded.processor, output)
    history = result.trainer.state.log_history
    write_json(output / "training_log.json", history)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    last = f", last logged loss {losses[-1]:.4f}" if losses else ""
    print(f"supervised fine-tuning: {result.trainer.state.global_step} steps{last}.")
    print(f"model saved to {output} (log: {output / 'training_log.json'})")
    _print_report_location(report_to, output)
    return 0


# =========================================================================== grpo
def grpo_multipliers(value: str) -> dict[str, float] | None:
    """`--lr-multipliers` of `grpo`: 'paper', 'none' or a JSON object of prefixes."""
    if value == "paper":
        return dict(GRPO_PAPER_MULTIPLIERS)
    if value == "none":
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise CLIError(
            f"--lr-multipliers {value!r}: expected 'paper', 'none' or a JSON object such as "
            f"'{{\"codebook\": 25}}' ({error})."
        ) from error
    if not isinstance(parsed, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in parsed.values()
    ):
        raise CLIError(
            f"--lr-multipliers {value!r}: the JSON must map parameter-name prefixes to numbers."
        )
    return {str(k): float(v) for k, v in parsed.items()}


def cmd_grpo(args: argparse.Namespace) -> int:
    """`segcompass grpo`: `grpo_trainer.SegCompassGRPOTrainer`, then save model and processor."""
    output = Path(args.output)
    resume = resume_target(args.resume, output)
    if resume is None:
        check_output_dir(output, overwrite=args.overwrite)
    require_positive(
        args, "steps", "batch_size", "num_generations", "max_completion_length", "logging_steps"
    )
    if args.num_generations < 2:
        raise CLIError(
            f"--num-generations must be >= 2 (GRPO compares completions within a group), got "
            f"{args.num_generations}."
        )
    if args.batch_size % args.num_generations:
        raise CLIError(
            f"--batch-size ({args.batch_size}) must be a multiple of --num-generations "
            f"({args.num_generations}): each batch holds whole groups of completions."
        )
    multipliers = grpo_multipliers(args.lr_multipliers)
    report_to = report_targets(args.report_to)
    seed_everything(args.seed)
    from ..training.grpo_trainer import (
        SegCompassGRPOConfig,
        SegCompassGRPOTrainer,
        build_grpo_dataset,
    )

    spec = parse_data_spec(args.data)
    loaded = load_model(args.model, device=args.device)
    rows = read_rows(
        args,
        spec,
        num_slots=loaded.model.config.num_slots,
        default_count=max(64, args.steps * args.batch_size // args.num_generations),
    )
    for row in rows:  # ignore regions (255, ReasonSeg) count as background for the rewards
        row["masks"] = (np.asarray(row["masks"]) == 1).astype(np.uint8)
    dataset = build_grpo_dataset(rows, loaded.processor)
    on_cpu = loaded.model.device.type == "cpu"
    config = SegCompassGRPOConfig(
        output_dir=str(output),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        learning_rate=args.lr,
        format_reward_weight=args.format_weight,
        mask_reward_weight=args.mask_weight,
        mask_reward=args.mask_reward,
        seg_loss_weight=args.seg_loss_weight,
        conf_loss_weight=args.conf_loss_weight,
        mask_loss_completions=args.mask_loss_completions,
        conf_loss_completions=args.conf_loss_completions,
        module_lr_multipliers=multipliers,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=report_to,
        seed=args.seed,
        disable_tqdm=args.no_progress,
        **({"use_cpu": True, "bf16": False} if on_cpu else {}),
    )
    trainer = SegCompassGRPOTrainer(
        model=loaded.model,
        args=config,
        train_dataset=dataset,
        processing_class=loaded.processor,
    )
    trainer.train(resume_from_checkpoint=resume)
    save_model(loaded.model, loaded.processor, output)
    write_json(output / "training_log.json", trainer.state.log_history)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    last = f", last logged mean reward {rewards[-1]:.4f}" if rewards else ""
    print(f"GRPO: {trainer.state.global_step} steps{last}.")
    print(f"model saved to {output} (log: {output / 'training_log.json'})")
    _print_report_location(report_to, output)
    return 0


__all__ = ["GRPO_PAPER_MULTIPLIERS", "cmd_grpo", "cmd_sft", "cmd_train_sae", "report_targets"]
