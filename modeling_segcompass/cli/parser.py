"""The argparse parser of ``segcompass``: one builder per subcommand (its options, help and
handler), shared option groups, and the help formatter."""

from __future__ import annotations

import argparse
from typing import Any

from .common import PROG
from .convert import cmd_convert_upstream
from .data import DATA_HELP
from .demo_command import cmd_demo
from .evaluate import cmd_eval
from .export import cmd_export
from .predict import cmd_predict
from .train import cmd_grpo, cmd_sft, cmd_train_sae


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
    """Options every command shares: --debug, and --device / --seed / --no-progress."""
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
    """--data, --data-seed and --limit of the commands that read data."""
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


def _report_to_option(parser: argparse.ArgumentParser) -> None:
    """--report-to of the Trainer-based commands."""
    parser.add_argument(
        "--report-to", default="none", metavar="NAME[,NAME...]",
        help="send the logged losses, rewards and learning rate to these transformers "
        "integrations while training runs, e.g. 'tensorboard' (event files under "
        "OUTPUT/runs; `pip install tensorboard`); 'all' takes every installed one, 'none' "
        "sends nothing (training_log.json is written either way)",
    )  # fmt: skip


def _add_command(
    subparsers: Any,
    name: str,
    helptext: str,
    parents: list[argparse.ArgumentParser],
    epilog: str = "",
) -> argparse.ArgumentParser:
    """A subcommand whose help line and description are ``helptext``."""
    return subparsers.add_parser(
        name, help=helptext, description=helptext, parents=parents, epilog=epilog or None,
        formatter_class=_HelpFormatter,
    )  # fmt: skip


def _add_demo_parser(subparsers: Any) -> None:
    """The ``demo`` subcommand: its options and handler."""
    from ..data.synthetic import COT_STYLES

    demo = _add_command(
        subparsers,
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
        "and a thread waiting for a core that another process holds slows every step)",
    )  # fmt: skip
    demo.add_argument(
        "--processes", type=int, default=None,
        help="data-parallel CPU processes of the training stages (torch.distributed, gloo, 1 "
        "thread each; same global batch and budget); default: 2 when 2 or more cores are "
        "available, else 1",
    )  # fmt: skip
    demo.add_argument(
        "--cot-style", default="scene_first", choices=COT_STYLES,
        help="gold chain of thought of the synthetic world: 'scene_first' (the whole scene "
        "described first, then the reasoning), 'scene_marked' (the scene with 'is' / 'not' "
        "after each object where the family decides object by object) or 'focused' "
        "(straight to the relevant shapes)",
    )  # fmt: skip
    demo.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE",
        help="override a field of the tiny model's SegCompassConfig (repeatable; VALUE is read "
        "as JSON, else as a string), e.g. --config codebook_dim=64",
    )  # fmt: skip
    demo.set_defaults(handler=cmd_demo)


def _add_train_sae_parser(subparsers: Any) -> None:
    """The ``train-sae`` subcommand: its options and handler."""
    sae = _add_command(
        subparsers,
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


def _add_sft_parser(subparsers: Any) -> None:
    """The ``sft`` subcommand: its options and handler."""
    sft = _add_command(
        subparsers,
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
    _report_to_option(sft)
    sft.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    sft.set_defaults(handler=cmd_sft)


def _add_grpo_parser(subparsers: Any) -> None:
    """The ``grpo`` subcommand: its options and handler."""
    grpo = _add_command(
        subparsers,
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
    _report_to_option(grpo)
    grpo.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    grpo.set_defaults(handler=cmd_grpo)


def _add_eval_parser(subparsers: Any) -> None:
    """The ``eval`` subcommand: its options and handler."""
    ev = _add_command(
        subparsers,
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


def _add_predict_parser(subparsers: Any) -> None:
    """The ``predict`` subcommand: its options and handler."""
    pr = _add_command(
        subparsers,
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


def _add_export_parser(subparsers: Any) -> None:
    """The ``export`` subcommand: its options and handler."""
    ex = _add_command(
        subparsers,
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
        help="Hub id used in the card's snippets and app.py (default: the --output folder)",
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


def _add_convert_upstream_parser(subparsers: Any) -> None:
    """The ``convert-upstream`` subcommand: its options and handler."""
    cv = _add_command(
        subparsers,
        "convert-upstream",
        "Convert a checkpoint of the authors' code (github.com/ZhenyuLU-Heliodore/SegCompass) "
        "into a model folder of this package, built as SegCompassConfig.upstream(...).",
        [_common(model=False, progress=False)],
        epilog="Torch files are read with torch.load(weights_only=True) only: a file holding "
        "anything but a plain dict of tensors (a pickle of arbitrary objects) is refused.\n"
        "The folder loads with AutoModel.from_pretrained(folder, trust_remote_code=True).",
    )  # fmt: skip
    cv.add_argument(
        "checkpoint_dir",
        help="a step folder of upstream's trainer holding refseg_modules.pt (the sae, "
        "query_book, heatmap_head, prompt_encoder and mask_decoder tensors) and llm_hf/ (the "
        "LLM's config, tokenizer, processor and, when saved with save_llm_hf, its weights)",
    )  # fmt: skip
    cv.add_argument(
        "output_dir", help="folder to write the model (safetensors) and its processor to"
    )
    cv.add_argument(
        "--sam", required=True, metavar="PTH",
        help="segment_anything's SAM checkpoint the model was trained with (upstream: "
        "sam_vit_h_4b8939.pth); its ViT becomes the image encoder, the trained prompt encoder "
        "and mask decoder come from refseg_modules.pt",
    )  # fmt: skip
    cv.add_argument(
        "--sae", default=None, metavar="FOLDER",
        help="the SAE as a SAELens folder (cfg.json + sae_weights.safetensors); optional when "
        "refseg_modules.pt holds the sae.* tensors (upstream saves them there), which then win",
    )  # fmt: skip
    cv.add_argument(
        "--base-model", default=None, metavar="FOLDER",
        help="VLM folder (save_pretrained format) giving the LLM weights when llm_hf/ has none, "
        "and the tokenizer / processor files when llm_hf/ lacks them",
    )  # fmt: skip
    cv.add_argument(
        "--base", default=None, choices=("qwen2.5-vl-7b", "llava-1.5-7b", "llava-1.5-13b"),
        help="which upstream preset to build (default: read from the VLM's config.json)",
    )  # fmt: skip
    cv.add_argument(
        "--hook-layer", type=int, default=None, metavar="N",
        help="upstream's worker.sae.hook_layer: the LLM hidden_states index that fed the SAE "
        "(default: the launch scripts' value, 13 for Qwen2.5-VL-7B, 16 for LLaVA-1.5)",
    )  # fmt: skip
    cv.add_argument(
        "--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
        help="dtype of the written weights (upstream trains in bfloat16)",
    )  # fmt: skip
    cv.add_argument("--overwrite", action="store_true", help="write into a non-empty output_dir")
    cv.set_defaults(handler=cmd_convert_upstream)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``segcompass`` (one subparser per command)."""
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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in (
        _add_demo_parser,
        _add_train_sae_parser,
        _add_sft_parser,
        _add_grpo_parser,
        _add_eval_parser,
        _add_predict_parser,
        _add_export_parser,
        _add_convert_upstream_parser,
    ):
        add_parser(subparsers)
    return parser


__all__ = ["build_parser"]
