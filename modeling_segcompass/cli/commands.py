"""The command line's public names gathered in one module, for scripts that import them from
here (``from modeling_segcompass.cli.commands import load_model``): the entry point, the
parser, the command handlers, and the helpers to read ``--data`` and open ``--model``."""

from ..evaluation.rows import EvaluationRun, evaluate_rows
from . import USER_ERRORS, main
from .common import PROG, USAGE_ERROR, CLIError
from .convert import cmd_convert_upstream
from .data import DATA_HELP, DataSpec, load_rows, parse_data_spec
from .demo_command import cmd_demo
from .evaluate import cmd_eval
from .export import cmd_export
from .model_folder import MODEL_FILES, LoadedModel, load_model
from .parser import build_parser
from .predict import SLOT_COLOURS, cmd_predict, overlay_masks
from .train import GRPO_PAPER_MULTIPLIERS, cmd_grpo, cmd_sft, cmd_train_sae

__all__ = [
    "DATA_HELP",
    "GRPO_PAPER_MULTIPLIERS",
    "MODEL_FILES",
    "PROG",
    "SLOT_COLOURS",
    "USAGE_ERROR",
    "USER_ERRORS",
    "CLIError",
    "DataSpec",
    "EvaluationRun",
    "LoadedModel",
    "build_parser",
    "cmd_convert_upstream",
    "cmd_demo",
    "cmd_eval",
    "cmd_export",
    "cmd_grpo",
    "cmd_predict",
    "cmd_sft",
    "cmd_train_sae",
    "evaluate_rows",
    "load_model",
    "load_rows",
    "main",
    "overlay_masks",
    "parse_data_spec",
]
