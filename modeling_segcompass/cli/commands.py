"""The ``segcompass`` command line: demo, train-sae, sft, grpo, eval, predict, export.

Library side (never copied next to a saved model). Every subcommand is a thin wrapper over
a library function; trainer-side modules (trl, datasets, matplotlib) are imported inside the
command that needs them.

Exit codes: 0 success; 2 a user error (missing file, bad option, model folder without
config or processor, malformed data), reported as one line on stderr; 1 an unexpected
failure (one line too; ``--debug`` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

PROG = "segcompass"
#: Exit code of a user error (argparse uses 2 for its own usage errors too).
USAGE_ERROR = 2
#: Files a folder needs to be a SegCompass model.
MODEL_FILES = ("config.json",)
#: What `--lr-multipliers paper` means for GRPO (PAPER.md, "Training": heads at 5-80x).
GRPO_PAPER_MULTIPLIERS = {"codebook": 25.0, "slot_mapper": 25.0, "prompt_encoder": 10.0,
                          "mask_decoder": 5.0}  # fmt: skip
#: Slot colours of the overlay (RGB), slot k uses colour k mod 8.
SLOT_COLOURS = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
)  # fmt: skip
DATA_HELP = (
    "data: 'synthetic[:N]' (N examples of the synthetic world, seeded by --data-seed), "
    "'reasonseg:ROOT:SPLIT', 'refcoco:ROOT:DATASET:SPLIT' (DATASET refcoco|refcoco+|refcocog), "
    "'grefcoco:ROOT:SPLIT', or a folder written by datasets' save_to_disk (one split)"
)


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2, no traceback."""


# =========================================================================== data
@dataclass
class DataSpec:
    """A parsed ``--data`` value.

    Attributes:
        kind: ``synthetic``, ``reasonseg``, ``refcoco``, ``grefcoco`` or ``disk``.
        count: number of synthetic examples (None: the command's default).
        root: dataset root folder (real formats) or the saved dataset folder (``disk``).
        dataset: ``refcoco`` / ``refcoco+`` / ``refcocog`` for ``refcoco``.
        split: split name for the real formats.
        text: the value as given.
    """

    kind: str
    count: int | None = None
    root: str | None = None
    dataset: str | None = None
    split: str | None = None
    text: str = ""


def parse_data_spec(text: str) -> DataSpec:
    """Parse a ``--data`` value (see `DATA_HELP`). Roots may contain ':' (split from the right).

    Raises:
        CLIError: an unknown form, a bad count or a missing part.
    """
    value = text.strip()
    if value == "synthetic" or value.startswith("synthetic:") or value.startswith("synthetic["):
        rest = value[len("synthetic") :]
        if rest.startswith("[") and rest.endswith("]"):
            rest = rest[1:-1]
        rest = rest.lstrip(":")
        if rest == "":
            return DataSpec("synthetic", None, text=text)
        if not rest.isdigit() or int(rest) < 1:
            raise CLIError(
                f"--data {text!r}: expected 'synthetic[:N]' with N a positive integer, e.g. "
                "'synthetic[:64]'."
            )
        return DataSpec("synthetic", int(rest), text=text)
    for kind, parts in (("reasonseg", 2), ("grefcoco", 2), ("refcoco", 3)):
        if value.startswith(kind + ":"):
            pieces = value[len(kind) + 1 :].rsplit(":", parts - 1)
            if len(pieces) != parts or not all(pieces):
                form = {
                    "reasonseg": "reasonseg:ROOT:SPLIT",
                    "grefcoco": "grefcoco:ROOT:SPLIT",
                    "refcoco": "refcoco:ROOT:DATASET:SPLIT",
                }[kind]
                raise CLIError(f"--data {text!r}: expected the form {form!r}.")
            if kind == "refcoco":
                root, dataset, split = pieces
                if dataset not in ("refcoco", "refcoco+", "refcocog"):
                    raise CLIError(
                        f"--data {text!r}: DATASET must be refcoco, refcoco+ or refcocog, got "
                        f"{dataset!r}."
                    )
                return DataSpec(kind, root=root, dataset=dataset, split=split, text=text)
            root, split = pieces
            return DataSpec(kind, root=root, split=split, text=text)
    path = Path(value)
    if path.is_dir():
        return DataSpec("disk", root=str(path), text=text)
    raise CLIError(
        f"--data {text!r} is neither a known form nor an existing folder; expected {DATA_HELP}."
    )


def _row_masks(masks: Any, height: int, width: int) -> np.ndarray:
    """Masks of a row as (N, H, W) uint8: arrays, nested lists or a list of PIL images."""
    if isinstance(masks, (list, tuple)) and masks and hasattr(masks[0], "convert"):
        array = np.stack([np.asarray(m) for m in masks])  # list of PIL masks
    else:
        array = np.asarray(masks)
    if array.size == 0:
        return np.zeros((0, height, width), dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (height, width):
        raise CLIError(
            f"a data row has masks of shape {array.shape}, expected (N, {height}, {width}) "
            "(one mask per target at the image size)."
        )
    return array.astype(np.uint8, copy=False)


def _normalise_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A saved-dataset row in the collator schema (image, instruction, masks, num_objects)."""
    row = dict(row)
    if "instruction" not in row and "text" in row:
        row["instruction"] = row["text"]  # data_formats.to_hf_dataset rows
    for key in ("image", "instruction"):
        if key not in row or row[key] is None:
            raise CLIError(
                f"data row {index} has no {key!r} column; rows need 'image', 'instruction' "
                f"(or 'text') and 'masks'. Found columns: {sorted(row)}."
            )
    image = row["image"]
    if not hasattr(image, "convert"):
        raise CLIError(f"data row {index}: 'image' is a {type(image).__name__}, not an image.")
    row["image"] = image.convert("RGB")
    width, height = row["image"].size
    row["masks"] = _row_masks(row.get("masks", []), height, width)
    row["num_objects"] = int(row["masks"].shape[0])
    if "family" not in row:
        row["family"] = "_".join(str(row[k]) for k in ("source", "split") if row.get(k)) or "data"
    return row


def load_rows(
    spec: DataSpec,
    *,
    num_slots: int,
    seed: int = 0,
    limit: int | None = None,
    default_count: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows of ``spec`` in the collator schema: ``image`` (PIL RGB), ``instruction``,
    ``masks`` (N, H, W) uint8, ``num_objects``, ``family`` (+ ``response`` when the data has
    one: the synthetic world and datasets saved from it).

    Args:
        spec: the parsed ``--data``.
        num_slots: K of the model (the synthetic world writes K `<REF_POS>` tokens).
        seed: seed of the synthetic world.
        limit: keep the first ``limit`` rows.
        default_count: synthetic examples when the spec gives no count.
        progress: show a progress bar while reading real datasets.
    """
    if limit is not None and limit < 1:
        raise CLIError(f"--limit must be >= 1, got {limit}.")
    if spec.kind == "synthetic":
        from ..data.synthetic import SyntheticWorldConfig, generate_examples

        count = spec.count if spec.count is not None else default_count
        count = min(count, limit) if limit is not None else count
        world = SyntheticWorldConfig(num_slots=num_slots, seed=seed)
        return generate_examples(world, count)
    if spec.kind == "disk":
        import datasets

        try:
            loaded = datasets.load_from_disk(spec.root)
        except FileNotFoundError as error:
            raise CLIError(
                f"--data {spec.text!r}: not a folder written by datasets' save_to_disk ({error})."
            ) from error
        if isinstance(loaded, datasets.DatasetDict):
            raise CLIError(
                f"--data {spec.text!r} holds several splits {sorted(loaded)}; point --data at "
                f"one of them, e.g. {str(Path(spec.root) / sorted(loaded)[0])!r}."
            )
        count = len(loaded) if limit is None else min(limit, len(loaded))
        return [_normalise_row(loaded[i], i) for i in range(count)]
    from ..data import formats as data_formats

    root = Path(spec.root)
    if not root.exists():
        raise CLIError(f"--data {spec.text!r}: the dataset root {str(root)!r} does not exist.")
    if spec.kind == "reasonseg":
        records = data_formats.load_reasonseg(root, spec.split)
    elif spec.kind == "refcoco":
        records = data_formats.load_refcoco(root, spec.dataset, split=spec.split)
    else:
        records = data_formats.load_grefcoco(root, spec.split)
    if limit is not None:
        records = records[:limit]
    rows = []
    for record in _progress(records, "reading data", progress):
        masks = record.masks
        rows.append(
            {
                "image": record.load_image(),
                "instruction": record.text,
                "masks": masks,
                "num_objects": int(masks.shape[0]),
                "family": f"{record.source}_{record.split}",
                "record_id": record.record_id,
            }
        )
    return rows


def _progress(items: Sequence[Any], description: str, enabled: bool) -> Any:
    """``items`` wrapped in a tqdm bar (on stderr) when enabled and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return items
    return tqdm(items, desc=description, unit="batch" if description.startswith("eval") else "it")


def _need_responses(rows: list[dict[str, Any]], spec: DataSpec, what: str) -> None:
    missing = [i for i, row in enumerate(rows) if not row.get("response")]
    if missing:
        raise CLIError(
            f"{what} needs gold responses ('<think> ... </think> <REF_POS> ...') but --data "
            f"{spec.text!r} has none (row {missing[0]}); use 'synthetic[:N]' or a saved dataset "
            "with a 'response' column."
        )


# =========================================================================== model
class LoadedModel(NamedTuple):
    """A model folder opened for the CLI.

    Attributes:
        model: the `SegCompassForReasoningSegmentation` (eval mode, on the device).
        processor: its `SegCompassProcessor`.
        folder: the folder it came from.
    """

    model: Any
    processor: Any
    folder: Path


def _device_of(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CLIError(f"--device {name!r} is not a torch device ({error}).") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available here; use --device cpu.")
    return device


def load_model(folder: str | Path, *, device: str = "auto") -> LoadedModel:
    """Open a SegCompass model folder (``save_pretrained`` / ``export`` output) and its processor.

    The package classes load it (the same code the folder's remote-code copy holds), so no
    code from the folder is executed.

    Raises:
        CLIError: the folder does not exist, has no ``config.json`` or is not a SegCompass
            model, or holds no processor.
    """
    from ..configuration_segcompass import SegCompassConfig
    from ..modeling_segcompass import SegCompassForReasoningSegmentation
    from ..processing_segcompass import SegCompassProcessor

    path = Path(folder)
    if not path.is_dir():
        raise CLIError(f"--model {str(path)!r}: no such folder.")
    if not (path / "config.json").is_file():
        raise CLIError(
            f"--model {str(path)!r} has no config.json: it is not a saved model folder. Save "
            "one with model.save_pretrained(folder) and processor.save_pretrained(folder)."
        )
    config_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if config_type != SegCompassConfig.model_type:
        raise CLIError(
            f"--model {str(path)!r} holds a {config_type!r} model, not a SegCompass one "
            f"(model_type {SegCompassConfig.model_type!r}). Assemble one from backbones with "
            "SegCompassForReasoningSegmentation.from_backbones(vlm=..., sam=...)."
        )
    if not any((path / name).is_file() for name in ("processor_config.json", "tokenizer.json")):
        raise CLIError(
            f"--model {str(path)!r} has no processor (processor_config.json / tokenizer "
            "files): save it next to the weights with processor.save_pretrained(folder)."
        )
    try:
        processor = SegCompassProcessor.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CLIError(
            f"--model {str(path)!r}: could not load its SegCompass processor ({error}); save it "
            "with processor.save_pretrained(folder)."
        ) from error
    model = SegCompassForReasoningSegmentation.from_pretrained(str(path), dtype="float32")
    model = model.to(_device_of(device)).eval()
    model.processor = processor
    logger.info("Loaded %s (%d parameters).", path, sum(p.numel() for p in model.parameters()))
    return LoadedModel(model, processor, path)


def _save_model(model: Any, processor: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    had_processor = getattr(model, "processor", None)
    if had_processor is not None:
        del model.processor  # not a module; keep it out of save_pretrained's way
    try:
        model.save_pretrained(str(folder))
    finally:
        if had_processor is not None:
            model.processor = had_processor
    processor.save_pretrained(str(folder))


def _check_output_dir(path: Path, *, overwrite: bool, what: str = "--output") -> None:
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a file; give a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(
            f"{what} {str(path)!r} is not empty; pass --overwrite to write into it or choose "
            "another folder."
        )


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# =========================================================================== commands
def cmd_demo(args: argparse.Namespace) -> int:
    """`segcompass demo`: the embedded default end to end (`demo.run_demo`)."""
    from ..demo.run import run_demo

    if args.minutes <= 0:
        raise CLIError(f"--minutes must be > 0, got {args.minutes}.")
    summary = run_demo(
        args.output_dir,
        minutes=args.minutes,
        seed=args.seed,
        quick=args.quick,
        threads=args.threads,
        cot_style=args.cot_style,
    )
    text = summary.to_text() if hasattr(summary, "to_text") else json.dumps(summary.to_dict())
    print(text)
    return 0


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
    _check_output_dir(output, overwrite=args.overwrite)
    _positive(args, "steps", "batch_size", "data_batch_size")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {args.max_tokens}.")
    spec = parse_data_spec(args.data)
    _seed(args.seed)
    loaded = load_model(args.model, device=args.device)
    rows = load_rows(
        spec,
        num_slots=loaded.model.config.num_slots,
        seed=args.data_seed,
        limit=args.limit,
        default_count=256,
        progress=not args.no_progress,
    )
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
    _save_model(loaded.model, loaded.processor, output)
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
    _write_json(output / "sae_report.json", summary)
    print(
        f"SAE trained for {args.steps} steps: FVU {report.initial_fvu:.4f} -> {report.fvu:.4f}, "
        f"L0 {report.l0:.1f}, dead {100 * report.dead_fraction:.1f}%."
    )
    print(f"model with the new SAE: {output}  (SAELens-format SAE: {result.sae_path})")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    """`segcompass sft`: `sft.train_sft`, then save the (LoRA-merged) model and processor."""
    from ..training.sft import ModuleLearningRates, merge_lora, sft_training_arguments, train_sft

    output = Path(args.output)
    _positive(args, "steps", "batch_size", "save_steps", "logging_steps")
    resume = _resume_target(args.resume, output)
    if resume is None:
        _check_output_dir(output, overwrite=args.overwrite)
    spec = parse_data_spec(args.data)
    _seed(args.seed)
    loaded = load_model(args.model, device=args.device)
    rows = load_rows(
        spec,
        num_slots=loaded.model.config.num_slots,
        seed=args.data_seed,
        limit=args.limit,
        default_count=max(256, args.steps * args.batch_size),
        progress=not args.no_progress,
    )
    _need_responses(rows, spec, "sft")
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
    _save_model(loaded.model, loaded.processor, output)
    history = result.trainer.state.log_history
    _write_json(output / "training_log.json", history)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    last = f", last logged loss {losses[-1]:.4f}" if losses else ""
    print(f"supervised fine-tuning: {result.trainer.state.global_step} steps{last}.")
    print(f"model saved to {output} (log: {output / 'training_log.json'})")
    return 0


def _grpo_multipliers(value: str) -> dict[str, float] | None:
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


def _resume_target(value: str | None, output: Path) -> str | bool | None:
    """`--resume` of `sft` and `grpo`: None (fresh run), True (last complete checkpoint in --output) or a
    checkpoint path; a missing or incomplete checkpoint is a user error."""
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


def cmd_grpo(args: argparse.Namespace) -> int:
    """`segcompass grpo`: `grpo_trainer.SegCompassGRPOTrainer`, then save model and processor."""
    output = Path(args.output)
    resume = _resume_target(args.resume, output)
    if resume is None:
        _check_output_dir(output, overwrite=args.overwrite)
    _positive(
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
    multipliers = _grpo_multipliers(args.lr_multipliers)
    _seed(args.seed)
    from ..training.grpo_trainer import (
        SegCompassGRPOConfig,
        SegCompassGRPOTrainer,
        build_grpo_dataset,
    )

    spec = parse_data_spec(args.data)
    loaded = load_model(args.model, device=args.device)
    rows = load_rows(
        spec,
        num_slots=loaded.model.config.num_slots,
        seed=args.data_seed,
        limit=args.limit,
        default_count=max(64, args.steps * args.batch_size // args.num_generations),
        progress=not args.no_progress,
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
        report_to=[],
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
    _save_model(loaded.model, loaded.processor, output)
    _write_json(output / "training_log.json", trainer.state.log_history)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    last = f", last logged mean reward {rewards[-1]:.4f}" if rewards else ""
    print(f"GRPO: {trainer.state.global_step} steps{last}.")
    print(f"model saved to {output} (log: {output / 'training_log.json'})")
    return 0


class EvaluationRun(NamedTuple):
    """What `evaluate_rows` returns.

    Attributes:
        metrics: the `metrics.MetricsResult`.
        samples: one dict per row: index, family, iou, pred_empty, no_target, num_masks
            (and text when the model generated it).
    """

    metrics: Any
    samples: list[dict[str, Any]]


def evaluate_rows(
    model: Any,
    processor: Any,
    rows: list[dict[str, Any]],
    *,
    teacher_forced: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    empty_iou: float = 1.0,
    confidence_threshold: float | None = None,
    mask_threshold: float | None = None,
    progress: bool = True,
) -> EvaluationRun:
    """gIoU / cIoU / N-acc / T-acc of ``model`` on ``rows``, per family and overall.

    End to end (default) the model writes its own reasoning (`model.segment`); with
    ``teacher_forced`` the gold ``response`` of each row is fed in one forward and the slots
    with a `<REF_POS>` and a confidence logit >= the threshold are kept (as `segment` does).
    Predictions are compared at each image's original size.
    """
    import torch

    from ..evaluation.metrics import SegmentationMetrics

    config = model.config
    conf_thr = (
        config.slot_confidence_threshold if confidence_threshold is None else confidence_threshold
    )
    mask_thr = config.mask_threshold if mask_threshold is None else mask_threshold
    metrics = SegmentationMetrics(empty_iou=empty_iou)
    samples: list[dict[str, Any]] = []
    starts = list(range(0, len(rows), batch_size))
    model.eval()
    for start in _progress(starts, "eval", progress):
        chunk = rows[start : start + batch_size]
        images = [row["image"] for row in chunk]
        instructions = [row["instruction"] for row in chunk]
        texts: list[str | None] = [None] * len(chunk)
        if teacher_forced:
            enc = processor(images, instructions, responses=[row["response"] for row in chunk])
            inputs = {
                k: enc[k].to(model.device)
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                          "sam_pixel_values")
            }  # fmt: skip
            with torch.no_grad():
                out = model(**inputs, compute_logits=False)
            masks = processor.post_process_masks(
                out.mask_logits.cpu(), enc["original_sizes"], enc["reshaped_input_sizes"],
                threshold=mask_thr,
            )  # fmt: skip
            keep = (out.conf_logits.cpu() >= conf_thr) & out.ref_mask.cpu()  # (B, K)
            predictions = [masks[j][keep[j]].numpy() for j in range(len(chunk))]
        else:
            results = model.segment(
                images, instructions, processor, max_new_tokens=max_new_tokens,
                confidence_threshold=confidence_threshold, mask_threshold=mask_threshold,
            )  # fmt: skip
            predictions = [r.masks.cpu().numpy() for r in results]
            texts = [r.text for r in results]
        for j, row in enumerate(chunk):
            width, height = row["image"].size
            gt = _row_masks(row["masks"], height, width)
            score = metrics.add(predictions[j], gt, family=row.get("family"))
            sample = {
                "index": start + j,
                "family": row.get("family"),
                "iou": score.iou,
                "pred_empty": score.pred_empty,
                "no_target": score.no_target,
                "num_masks": int(predictions[j].shape[0]),
            }
            if texts[j] is not None:
                sample["text"] = texts[j]
            samples.append(sample)
    return EvaluationRun(metrics.compute(), samples)


def cmd_eval(args: argparse.Namespace) -> int:
    """`segcompass eval`: metrics per family, printed as a table and written as JSON."""
    output = Path(args.output)
    if output.is_dir():
        raise CLIError(f"--output {str(output)!r} is a folder; give a file name such as eval.json.")
    _positive(args, "batch_size", "max_new_tokens")
    spec = parse_data_spec(args.data)
    _seed(args.seed)
    loaded = load_model(args.model, device=args.device)
    rows = load_rows(
        spec,
        num_slots=loaded.model.config.num_slots,
        seed=args.data_seed,
        limit=args.limit,
        default_count=64,
        progress=not args.no_progress,
    )
    if not rows:
        raise CLIError(f"--data {args.data!r} holds no example to evaluate.")
    if args.teacher_forced:
        _need_responses(rows, spec, "--teacher-forced")
    start = time.time()
    run = evaluate_rows(
        loaded.model,
        loaded.processor,
        rows,
        teacher_forced=args.teacher_forced,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        empty_iou=float(args.empty_iou),
        confidence_threshold=args.confidence_threshold,
        mask_threshold=args.mask_threshold,
        progress=not args.no_progress,
    )
    table = run.metrics.to_table()
    report = {
        **run.metrics.to_dict(),
        "table": table,
        "model": str(loaded.folder),
        "data": args.data,
        "mode": "teacher_forced" if args.teacher_forced else "end_to_end",
        "num_samples": len(rows),
        "seconds": round(time.time() - start, 2),
        "samples": run.samples,
    }
    _write_json(output, report)
    mode = "teacher-forced (gold reasoning)" if args.teacher_forced else "end to end"
    print(f"{len(rows)} examples of {args.data}, {mode}, metrics in percent:\n")
    print(table)
    print(f"\nwritten to {output}")
    return 0


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--image {str(file)!r}: no such file.")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"--image {str(file)!r} is not an image PIL can read ({error}).") from error


def overlay_masks(image: Any, masks: np.ndarray, slots: Sequence[int], alpha: float = 0.5) -> Any:
    """The image with each mask tinted in its slot's colour (`SLOT_COLOURS`).

    Args:
        image: PIL RGB image of size (W, H).
        masks: (N, H, W) bool.
        slots: the slot index of each mask (picks its colour).
        alpha: tint strength in [0, 1].
    """
    from PIL import Image

    pixels = np.asarray(image.convert("RGB")).astype(np.float32)  # (H, W, 3)
    for mask, slot in zip(masks, slots):
        colour = np.asarray(SLOT_COLOURS[int(slot) % len(SLOT_COLOURS)], dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")


def _chain_of_thought(text: str) -> str:
    if "<think>" not in text:
        return ""
    return text.split("<think>", 1)[1].split("</think>", 1)[0].strip()


def _mask_record(mask: np.ndarray, slot: int, score: float) -> dict[str, Any]:
    from ..data.formats import encode_rle

    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] if xs.size else None
    return {
        "slot": int(slot),
        "score": float(score),
        "area": int(mask.sum()),
        "bbox": bbox,
        "rle": encode_rle(mask),
    }


def cmd_predict(args: argparse.Namespace) -> int:
    """`segcompass predict`: one image + instruction -> mask.png, result.json, report.html."""
    image = _open_image(args.image)
    if not args.instruction.strip():
        raise CLIError("--instruction is empty; say what to segment.")
    _positive(args, "max_new_tokens", "top_concepts")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {str(output)!r} is a file; give a folder.")
    _seed(args.seed)
    loaded = load_model(args.model, device=args.device)
    model, processor = loaded.model, loaded.processor
    (result,) = model.segment(
        image,
        args.instruction,
        processor,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        confidence_threshold=args.confidence_threshold,
        mask_threshold=args.mask_threshold,
        strict_format=not args.no_strict_format,
    )
    output.mkdir(parents=True, exist_ok=True)
    masks = result.masks.cpu().numpy().astype(bool)  # (N, H, W)
    slots = result.slot_indices.cpu().tolist()
    scores = result.scores.cpu().tolist()
    overlay_masks(image, masks, slots).save(output / "mask.png")

    from ..interpret.explain import build_explanation_inputs, explain, write_report

    labels = None
    if (loaded.folder / "concept_labels.json").is_file():
        from ..interpret.labels import load_concept_labels

        labels = load_concept_labels(loaded.folder)
    inputs = build_explanation_inputs(processor, [image], [args.instruction], [result.text])
    inputs = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    (explanation,) = explain(
        model,
        inputs,
        tokenizer=processor.tokenizer,
        concept_labels=labels,
        top_n=args.top_concepts,
        confidence_threshold=args.confidence_threshold,
        mask_threshold=args.mask_threshold,
    )
    index = write_report(
        [explanation], [image], output, title="SegCompass prediction",
        instructions=[args.instruction],
    )  # fmt: skip
    report = output / "report.html"
    index.replace(report)
    data = {
        "image": str(Path(args.image)),
        "instruction": args.instruction,
        "text": result.text,
        "cot": _chain_of_thought(result.text),
        "reason": result.reason,
        "image_size": [image.height, image.width],
        "scores": scores,
        "slot_indices": slots,
        "conf_logits": result.conf_logits.cpu().tolist(),
        "masks": [_mask_record(m, k, s) for m, k, s in zip(masks, slots, scores)],
        "concept_trace": explanation.to_dict(),
        "files": {"overlay": "mask.png", "report": "report.html", "report_image": "image_0.png"},
    }
    _write_json(output / "result.json", data)
    print(f"chain of thought: {_chain_of_thought(result.text) or '(none)'}")
    print(f"completion: {result.text}")
    if result.reason:
        print(f"no mask: {result.reason}")
    else:
        found = ", ".join(f"slot {k} ({s:.2f})" for k, s in zip(slots, scores))
        print(f"{len(slots)} mask(s): {found}")
    print(f"wrote {output / 'mask.png'}, {output / 'result.json'}, {report}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`segcompass export`: a Hub-ready folder (`hub.export`)."""
    from ..serving.hub import export

    output = Path(args.output)
    _check_output_dir(output, overwrite=args.overwrite)
    evaluation = None
    eval_name = args.eval_name
    if args.eval_json:
        path = Path(args.eval_json)
        if not path.is_file():
            raise CLIError(f"--eval-json {str(path)!r}: no such file.")
        try:
            evaluation = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CLIError(f"--eval-json {str(path)!r} is not valid JSON ({error}).") from error
        if not isinstance(evaluation, dict):
            raise CLIError(f"--eval-json {str(path)!r} must hold a JSON object of metrics.")
        if eval_name is None and isinstance(evaluation.get("data"), str):
            eval_name = evaluation["data"]
    loaded = load_model(args.model, device="cpu")
    extra = [loaded.folder / "concept_labels.json"]
    extra = [p for p in extra if p.is_file()] + [Path(p) for p in args.extra_file]
    for path in extra:
        if not path.is_file():
            raise CLIError(f"--extra-file {str(path)!r}: no such file.")
    repo_id = args.repo_id or f"local/{output.resolve().name}"
    model = loaded.model
    del model.processor  # the export saves the processor itself
    result = export(
        model,
        loaded.processor,
        output,
        repo_id=repo_id,
        overwrite=args.overwrite,
        include_serving=not args.no_serving,
        extra_files=extra,
        license=args.license,
        base_models=args.base_model,
        datasets=args.dataset,
        evaluation=evaluation,
        eval_dataset_name=eval_name or "evaluation set",
        toy=args.toy,
    )
    print(f"exported {len(result.files)} files to {result.folder} (repo id {repo_id}):")
    print("  " + ", ".join(result.files))
    print(f"push with: huggingface-cli upload {repo_id} {result.folder}")
    return 0


# =========================================================================== helpers
def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} must be >= 1, got {value}.")


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# =========================================================================== parser
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults (not for required options, flags, or None, which the help words say)
    and keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.required
            or action.default is None
            or action.default is False
            or action.default == []
        ):
            return action.help or ""
        return super()._get_help_string(action)


def _common(*, model: bool = True, progress: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--debug", action="store_true", help="show tracebacks and debug logging on errors"
    )
    if model:
        parent.add_argument(
            "--device",
            default="auto",
            help="torch device: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda:0', ...",
        )
        parent.add_argument("--seed", type=int, default=0, help="random seed (torch, numpy)")
    if progress:
        parent.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parent


def _data_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--data", required=required, default=None if required else "synthetic[:64]",
        help=DATA_HELP,
    )  # fmt: skip
    parser.add_argument(
        "--data-seed", type=int, default=0, help="seed of the synthetic world (--data synthetic)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N examples (default: all)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``segcompass`` (one subparser per command)."""
    from ..data.synthetic import COT_STYLES

    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        description=(
            "SegCompass (arXiv 2605.22658): reasoning segmentation with sparse autoencoders.\n"
            "Run '%(prog)s COMMAND --help' for the options of a command."
        ),
        epilog=(
            "typical flow:\n"
            "  segcompass demo --output-dir demo_output          # everything, tiny, on CPU\n"
            "  segcompass train-sae --model M --data synthetic[:512] --output M-sae\n"
            "  segcompass sft  --model M-sae --data synthetic[:4096] --output M-sft\n"
            "  segcompass grpo --model M-sft --data synthetic[:512] --output M-grpo\n"
            "  segcompass eval --model M-grpo --data synthetic[:240] --output eval.json\n"
            "  segcompass predict --model M-grpo --image x.png --instruction '...' --output pred\n"
            "  segcompass export --model M-grpo --eval-json eval.json --output hub_folder"
        ),
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, helptext: str, parents: list[argparse.ArgumentParser], epilog: str = ""):
        return sub.add_parser(
            name, help=helptext, description=helptext, parents=parents, epilog=epilog or None,
            formatter_class=_HelpFormatter,
        )  # fmt: skip

    # ---- demo
    demo = add(
        "demo",
        "Run the embedded default end to end on CPU: synthetic data, tiny model, SAE "
        "pretraining, supervised warm-up, GRPO, evaluation, interpretability report, "
        "Hub-ready folder (what `make demo` runs).",
        [_common(model=False, progress=False)],
    )
    demo.add_argument("--output-dir", default="demo_output", help="folder for every artefact")
    demo.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget in minutes")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, model and training")
    demo.add_argument(
        "--quick", action="store_true", help="reduced-size smoke run (tiny data, a few steps)"
    )
    demo.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the tiny model's ops are too small to gain from more, "
        "and a second thread competing for a busy core made steps 7-19x slower)",
    )  # fmt: skip
    demo.add_argument(
        "--cot-style", default="scene_first", choices=COT_STYLES,
        help="gold chain of thought of the synthetic world: 'scene_first' (the whole scene "
        "described first, then the reasoning) or 'focused' (straight to the relevant shapes)",
    )  # fmt: skip
    demo.set_defaults(handler=cmd_demo)

    # ---- train-sae
    sae = add(
        "train-sae",
        "Pretrain the sparse autoencoder on the model's hidden states at config.sae_layer, "
        "load it into the model and save the model (+ the SAE in SAELens format under "
        "OUTPUT/sae).",
        [_common()],
    )
    sae.add_argument("--model", required=True, help="model folder (config.json + processor)")
    _data_options(sae)
    sae.add_argument("--output", required=True, help="folder for the model with the new SAE")
    sae.add_argument("--steps", type=int, default=1000, help="SAE optimiser steps")
    sae.add_argument("--batch-size", type=int, default=4096, help="tokens per SAE step")
    sae.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    sae.add_argument(
        "--l1", type=float, default=1.0,
        help="L1 coefficient (relu / jumprelu SAEs; topk needs none)",
    )  # fmt: skip
    sae.add_argument(
        "--max-tokens", type=int, default=None, help="cache at most this many tokens (default: all)"
    )
    sae.add_argument(
        "--data-batch-size", type=int, default=16, help="examples per VLM forward when caching"
    )
    sae.add_argument(
        "--cache-dir", default=None,
        help="keep the activation cache here (default: a temporary folder, deleted after)",
    )  # fmt: skip
    sae.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    sae.set_defaults(handler=cmd_train_sae)

    # ---- sft
    sft = add(
        "sft",
        "Supervised fine-tuning (LM loss on the gold response + segmentation losses) with "
        "transformers.Trainer; atomic checkpoints under OUTPUT/checkpoint-N, the final model "
        "and processor in OUTPUT.",
        [_common()],
        epilog="tiny models from scratch train well with --lr 3e-3 --lr-multipliers uniform.",
    )
    sft.add_argument("--model", required=True, help="model folder (config.json + processor)")
    _data_options(sft)
    sft.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    sft.add_argument("--steps", type=int, default=100, help="optimiser steps (max_steps)")
    sft.add_argument("--batch-size", type=int, default=8, help="examples per device and step")
    sft.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    sft.add_argument(
        "--lr", type=float, default=2e-6, help="base learning rate (paper: 1e-6 to 2e-6)"
    )
    sft.add_argument(
        "--lr-multipliers", choices=("paper", "uniform"), default="paper",
        help="per-module multipliers: 'paper' (codebook/slot mapper x25, prompt encoder x10, "
        "mask decoder x5) or 'uniform' (all x1)",
    )  # fmt: skip
    sft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    sft.add_argument("--warmup-steps", type=int, default=0, help="learning-rate warm-up steps")
    sft.add_argument(
        "--lora", action="store_true",
        help="LoRA on the VLM's attention projections (heads train fully); merged before saving",
    )  # fmt: skip
    sft.add_argument("--lora-r", type=int, default=8, help="LoRA rank (with --lora)")
    sft.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (with --lora)")
    sft.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
        help="continue a stopped run: 'auto' (the default value) takes the last complete "
        "checkpoint in --output, or give a checkpoint folder; pass the same options as before",
    )  # fmt: skip
    sft.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    sft.add_argument("--logging-steps", type=int, default=10, help="log losses every N steps")
    sft.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    sft.set_defaults(handler=cmd_sft)

    # ---- grpo
    grpo = add(
        "grpo",
        "GRPO on the reasoning path with format + mask rewards and the segmentation losses "
        "in the same step (TRL's GRPOTrainer); atomic checkpoints under OUTPUT/checkpoint-N "
        "(--save-steps, resumable with --resume), the final model and processor in OUTPUT.",
        [_common()],
    )
    grpo.add_argument("--model", required=True, help="model folder (config.json + processor)")
    _data_options(grpo)
    grpo.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    grpo.add_argument("--steps", type=int, default=100, help="optimiser steps (max_steps)")
    grpo.add_argument(
        "--batch-size", type=int, default=8,
        help="completions per device and step (a multiple of --num-generations)",
    )  # fmt: skip
    grpo.add_argument("--num-generations", type=int, default=8, help="group size G (paper: 8)")
    grpo.add_argument(
        "--beta", type=float, default=0.0,
        help="KL coefficient (paper: 0.005; > 0 keeps a frozen reference copy of the model)",
    )  # fmt: skip
    grpo.add_argument("--lr", type=float, default=1e-6, help="base learning rate")
    grpo.add_argument(
        "--lr-multipliers", default="paper",
        help="'paper' (codebook/slot_mapper x25, prompt_encoder x10, mask_decoder x5), 'none', "
        "or a JSON object {parameter-name prefix: multiplier}",
    )  # fmt: skip
    grpo.add_argument(
        "--max-completion-length", type=int, default=128, help="generation budget in tokens"
    )
    grpo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    grpo.add_argument("--format-weight", type=float, default=0.3, help="format reward weight")
    grpo.add_argument("--mask-weight", type=float, default=0.7, help="mask reward weight")
    grpo.add_argument(
        "--mask-reward", choices=("multi_object", "single"), default="multi_object",
        help="mask reward: Hungarian mean IoU of kept slots, or the single-object score",
    )  # fmt: skip
    grpo.add_argument("--seg-loss-weight", type=float, default=1.0, help="segmentation loss weight")
    grpo.add_argument("--conf-loss-weight", type=float, default=0.2, help="confidence loss weight")
    grpo.add_argument(
        "--mask-loss-completions", choices=("all", "above_group_mean"), default="all",
        help="completions that carry the segmentation loss: all (the paper), or only those "
        "whose reward beats their group's mean (docs/grpo.md)",
    )  # fmt: skip
    grpo.add_argument(
        "--conf-loss-completions", choices=("all", "not_below_group_mean"), default="all",
        help="completions that carry the confidence loss: all (the paper), or only those whose "
        "reward is not below their group's mean (docs/grpo.md)",
    )  # fmt: skip
    grpo.add_argument(
        "--save-steps", type=int, default=0,
        help="checkpoint every N steps into OUTPUT/checkpoint-N (0: no checkpoints)",
    )  # fmt: skip
    grpo.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
        help="continue a stopped run: 'auto' (the default value) takes the last complete "
        "checkpoint in --output, or give a checkpoint folder; pass the same --model, --data and "
        "options as the stopped run (the KL reference is rebuilt from --model)",
    )  # fmt: skip
    grpo.add_argument("--logging-steps", type=int, default=5, help="log every N steps")
    grpo.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    grpo.set_defaults(handler=cmd_grpo)

    # ---- eval
    ev = add(
        "eval",
        "Evaluate gIoU, cIoU, N-acc and T-acc per family and overall; print the table and "
        "write the numbers (and per-sample IoUs) as JSON.",
        [_common()],
    )
    ev.add_argument("--model", required=True, help="model folder (config.json + processor)")
    _data_options(ev, required=False)
    ev.add_argument("--output", required=True, help="JSON file for the metrics")
    ev.add_argument(
        "--teacher-forced", action="store_true",
        help="feed the gold reasoning (rows with a 'response', e.g. synthetic) instead of "
        "generating it: measures the mask path alone",
    )  # fmt: skip
    ev.add_argument(
        "--empty-iou", type=int, choices=(1, 0), default=1,
        help="IoU of an empty prediction on an empty target: 1 (LISA, the paper) or 0 (Seg-Zero)",
    )  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="generation budget")
    ev.add_argument(
        "--confidence-threshold", type=float, default=None,
        help="keep slots whose confidence logit is >= this (default: config.slot_confidence_threshold; "
        "give negative values as --confidence-threshold=-1)",
    )  # fmt: skip
    ev.add_argument(
        "--mask-threshold", type=float, default=None,
        help="foreground where the mask logit > this (default: config.mask_threshold)",
    )  # fmt: skip
    ev.set_defaults(handler=cmd_eval)

    # ---- predict
    pr = add(
        "predict",
        "Segment one image from an instruction: writes mask.png (the kept masks over the "
        "image, one colour per slot), result.json (completion, scores, masks as COCO RLE, "
        "concept trace) and report.html (+ image_0.png); prints the chain of thought.",
        [_common(progress=False)],
    )
    pr.add_argument("--model", required=True, help="model folder (config.json + processor)")
    pr.add_argument("--image", required=True, help="image file (any format PIL reads)")
    pr.add_argument("--instruction", required=True, help="what to segment, in words")
    pr.add_argument("--output", required=True, help="folder for the three files (created)")
    pr.add_argument("--max-new-tokens", type=int, default=64, help="generation budget")
    pr.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    pr.add_argument(
        "--confidence-threshold", type=float, default=None,
        help="keep slots whose confidence logit is >= this (default: config.slot_confidence_threshold; "
        "give negative values as --confidence-threshold=-1)",
    )  # fmt: skip
    pr.add_argument(
        "--mask-threshold", type=float, default=None,
        help="foreground where the mask logit > this (default: config.mask_threshold)",
    )  # fmt: skip
    pr.add_argument("--top-concepts", type=int, default=5, help="concepts listed per slot")
    pr.add_argument(
        "--no-strict-format", action="store_true",
        help="ground the <REF_POS> tokens of a completion even when its format is broken (no "
        "finished <think>...</think> block, more than K references); by default such a "
        "completion gets no mask and the reason is printed",
    )  # fmt: skip
    pr.set_defaults(handler=cmd_predict)

    # ---- export
    ex = add(
        "export",
        "Write a Hub-ready folder: weights, config, remote code, processor, model card "
        "(README.md), handler.py, app.py, requirements.txt.",
        [_common(model=False, progress=False)],
        epilog="the folder loads with AutoModel.from_pretrained(folder, trust_remote_code=True).",
    )
    ex.add_argument("--model", required=True, help="model folder (config.json + processor)")
    ex.add_argument("--output", required=True, help="export folder (created; must be empty)")
    ex.add_argument(
        "--repo-id", default=None,
        help="Hub id used in the card's snippets and app.py (default: local/<output name>)",
    )  # fmt: skip
    ex.add_argument(
        "--eval-json", default=None, help="metrics JSON written by 'segcompass eval' for the card"
    )
    ex.add_argument(
        "--eval-name", default=None,
        help="name of the evaluation data in the card (default: the --data of the eval JSON)",
    )  # fmt: skip
    ex.add_argument("--license", default="apache-2.0", help="license id in the card")
    ex.add_argument(
        "--base-model", action="append", default=[],
        help="Hub id of a base checkpoint (VLM, SAM, SAE); repeat for several",
    )  # fmt: skip
    ex.add_argument(
        "--dataset", action="append", default=[], help="training dataset id; repeat for several"
    )
    ex.add_argument(
        "--extra-file", action="append", default=[],
        help="another file to copy in (concept_labels.json of the model folder is copied always)",
    )  # fmt: skip
    ex.add_argument(
        "--toy", action="store_true", help="mark the card as a toy model (tiny, synthetic data)"
    )
    ex.add_argument(
        "--no-serving", action="store_true", help="leave out handler.py, app.py, requirements.txt"
    )
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    ex.set_defaults(handler=cmd_export)
    return parser


# =========================================================================== entry point
def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("modeling_segcompass").setLevel(logging.DEBUG if debug else logging.INFO)


#: Exceptions that mean "the input was wrong" (exit 2); library errors say what to fix.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    ValueError,
    TypeError,
    KeyError,
)


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(text).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segcompass`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else USAGE_ERROR
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted.", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as error:  # noqa: BLE001 - the CLI reports, --debug shows the traceback
        if debug:
            traceback.print_exc()
        print(
            f"{PROG} {args.command}: failed: {type(error).__name__}: {_one_line(error)} "
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
