"""GRPO + mask loss for a saved SegCompass model; the entry point of `train_paper_recipe.sh`.

    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml \
        examples/accelerate/train_grpo.py --model_path ckpt/segcompass-sft \
        --dataset_path data/grefcoco_train --output_dir runs/grpo [SegCompassGRPOConfig flags]

`--model_path`: a folder written by `model.save_pretrained` + `processor.save_pretrained`
(e.g. after SAE pretraining and the supervised warm-up). `--dataset_path`: a
`datasets.load_from_disk` folder whose rows have `image`, `instruction` (or `text`, as
`data.formats.to_hf_dataset` writes) and `masks` ((N, H, W) at the image size, N = 0 for
no-target), e.g. the synthetic world's `build_dataset` or the RefCOCO/gRefCOCO loaders'.
Every `SegCompassGRPOConfig` / `GRPOConfig` / `TrainingArguments` field is a flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_from_disk
from transformers import AutoModel, AutoProcessor, HfArgumentParser

from modeling_segcompass.training.grpo_trainer import (
    SegCompassGRPOConfig,
    SegCompassGRPOTrainer,
    grpo_row,
)


@dataclass
class ScriptArguments:
    model_path: str = field(metadata={"help": "Saved SegCompass model + processor folder."})
    dataset_path: str = field(metadata={"help": "`datasets.load_from_disk` folder of examples."})
    max_samples: int | None = field(default=None, metadata={"help": "Use the first N rows only."})


def main() -> None:
    script, args = HfArgumentParser(
        (ScriptArguments, SegCompassGRPOConfig)
    ).parse_args_into_dataclasses()
    processor = AutoProcessor.from_pretrained(script.model_path, trust_remote_code=True)
    model = AutoModel.from_pretrained(script.model_path, trust_remote_code=True, dtype="auto")
    raw = load_from_disk(script.dataset_path)
    if script.max_samples is not None:
        raw = raw.select(range(min(script.max_samples, len(raw))))
    if "instruction" not in raw.column_names and "text" in raw.column_names:
        raw = raw.rename_column("text", "instruction")
    keep = ["prompt", "image", "gt_masks", "num_objects", "num_ref"]
    dataset = raw.map(
        lambda row: grpo_row(row, processor),
        remove_columns=[c for c in raw.column_names if c not in keep],
    )
    trainer = SegCompassGRPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    processor.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
