"""Command line: the ``segcompass`` console script (demo, train-sae, sft, grpo, eval, predict,
export, convert-upstream), library side (never copied next to a saved model).

`main` parses the arguments (`parser.build_parser`), runs the command's handler and turns its
errors into exit codes: 0 success; 2 a user error (missing file, bad option, model folder
without config or processor, malformed data), reported as one line on stderr; 1 an unexpected
failure (one line too; ``--debug`` shows the traceback); 130 interrupted. Each command lives
in a module of its group: `train` (train-sae, sft, grpo), `evaluate` (eval), `predict`,
`export`, `convert` (convert-upstream), `demo_command` (demo); `data` reads ``--data`` and
`model_folder` opens ``--model``.
``python -m modeling_segcompass.cli`` runs `main`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from ..training.allocator import keep_freed_memory
from .common import PROG, USAGE_ERROR, CLIError
from .parser import build_parser

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


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("modeling_segcompass").setLevel(logging.DEBUG if debug else logging.INFO)


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
    keep_freed_memory()  # CPU steps reuse their freed memory (training/allocator.py)
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


__all__ = ["USER_ERRORS", "build_parser", "main"]
