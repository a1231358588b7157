"""What every dataset loader shares: the format errors, the ignore value of masks, and
small reading helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

IGNORE_INDEX = 255
"""Mask value of ReasonSeg ``ignore`` regions; evaluation excludes these pixels (LISA)."""

OnError = Literal["raise", "skip"]
"""What a loader does with a malformed record: raise on it, or skip it and list it."""


# ----------------------------------------------------------------------------- errors


class DatasetFormatError(ValueError):
    """A record (or file) does not follow the expected on-disk format.

    Attributes:
        path: the file the problem was found in.
        record_id: the id of the offending record (``None`` for file-level problems).
        problem: what was expected and what was found.
    """

    def __init__(self, path: str | Path, record_id: str | None, problem: str) -> None:
        self.path = str(path)
        self.record_id = record_id
        self.problem = problem
        where = f"{path}" if record_id is None else f"{path}: record {record_id!r}"
        super().__init__(f"{where}: {problem}")


class UnsafePickleError(DatasetFormatError):
    """A pickle asked to load a global (class or function); it was refused, nothing ran."""

    def __init__(self, path: str | Path, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(
            path,
            None,
            f"refused to load the global {global_name!r} from this pickle. A refs file holds "
            "only lists, dicts, strings and numbers, so this file was tampered with or is not "
            "a refs file; nothing from it was executed. Use a refs file from the original "
            "release, or the same refs saved as JSON (see convert_refs_pickle_to_json).",
        )


# ----------------------------------------------------------------------------- helpers


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json(path: Path) -> Any:
    """Read JSON as UTF-8 (BOM allowed), retrying cp1252 like LISA does."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    return json.loads(text)
