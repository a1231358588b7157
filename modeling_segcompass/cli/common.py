"""What every ``segcompass`` command shares: the user-error type, option checks, output folders
and JSON files, seeding.

Exit codes of the command line: 0 success; 2 a user error (missing file, bad option, model
folder without config or processor, malformed data), reported as one line on stderr; 1 an
unexpected failure (one line too; ``--debug`` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PROG = "segcompass"
#: Exit code of a user error (argparse uses 2 for its own usage errors too).
USAGE_ERROR = 2


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2, no traceback."""


def check_output_dir(path: Path, *, overwrite: bool, what: str = "--output") -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"{what} {str(path)!r} is a file; give a folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(
            f"{what} {str(path)!r} is not empty; pass --overwrite to write into it or choose "
            "another folder."
        )


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (arrays as lists, paths and the rest as strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse an option among ``names`` whose value is below 1 (None passes)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} must be >= 1, got {value}.")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (`transformers.set_seed`)."""
    from transformers import set_seed

    set_seed(seed)


__all__ = [
    "PROG",
    "USAGE_ERROR",
    "CLIError",
    "check_output_dir",
    "require_positive",
    "seed_everything",
    "write_json",
]
