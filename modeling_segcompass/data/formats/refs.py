"""Reading the refer-API files safely: refs (``.p`` pickles through an unpickler that refuses
every global, or the same list as ``.json``) and the COCO ``instances.json``."""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import DatasetFormatError, UnsafePickleError, _read_json

logger = logging.getLogger(__name__)


class _RefusingUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global, so no class or function can be loaded."""

    def __init__(self, file: io.BufferedIOBase, path: Path, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(self._path, f"{module}.{name}")


def _safe_unpickle(path: Path) -> Any:
    # Python 2 pickles (the original refs) store ``str`` as bytes; try UTF-8 then latin-1.
    for encoding in ("utf-8", "latin-1"):
        try:
            with path.open("rb") as handle:
                return _RefusingUnpickler(handle, path, encoding).load()
        except UnicodeDecodeError:
            continue
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as error:
            raise DatasetFormatError(
                path, None, f"is not a readable refs pickle ({type(error).__name__}: {error})"
            ) from error
    raise DatasetFormatError(path, None, "has strings that are neither UTF-8 nor latin-1")


def read_refs(path: str | Path) -> list[dict[str, Any]]:
    """Read a refer-style refs file (``.p`` pickle or ``.json``) safely.

    Pickles are read with an unpickler whose ``find_class`` refuses every global, so a file
    carrying a ``__reduce__`` payload raises :class:`UnsafePickleError` without running it.

    Returns:
        The list of ref dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs file {path} does not exist")
    if path.suffix == ".json":
        try:
            refs = _read_json(path)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(path, None, f"is not valid JSON ({error})") from error
    else:
        refs = _safe_unpickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DatasetFormatError(
            path, None, f"expected a list of ref dicts, got {type(refs).__name__}"
        )
    return refs


def convert_refs_pickle_to_json(
    path: str | Path, out_path: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Convert a ``refs(<splitBy>).p`` pickle to JSON once, with the safe unpickler.

    Args:
        path: the pickle file.
        out_path: where to write; defaults to the same name with ``.json``. The loaders prefer
            this JSON when it sits next to the pickle.
        overwrite: replace an existing output file.

    Returns:
        The path of the JSON file.
    """
    path = Path(path)
    out = Path(out_path) if out_path is not None else path.with_suffix(".json")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    refs = read_refs(path)
    out.write_text(json.dumps(refs, ensure_ascii=False), encoding="utf-8")
    logger.info("Converted %d refs from %s to %s", len(refs), path, out)
    return out


def _find_refs_file(directory: Path, stem: str) -> Path:
    """Prefer ``<stem>.json`` (safe and fast) and fall back to ``<stem>.p``."""
    for suffix in (".json", ".p"):
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"found neither {directory / (stem + '.json')} nor {directory / (stem + '.p')}; "
        "check root= (it should contain the dataset folder) and split_by="
    )


@dataclass(frozen=True)
class _Instances:
    path: Path
    images: dict[int, dict[str, Any]]
    annotations: dict[int, dict[str, Any]]


def _read_instances(path: Path) -> _Instances:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations {path} do not exist; check root=")
    try:
        data = _read_json(path)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(path, None, f"is not valid JSON ({error})") from error
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetFormatError(
            path, None, "expected a COCO dict with 'images' and 'annotations' lists"
        )
    try:
        images = {int(image["id"]): image for image in data["images"]}
        annotations = {int(ann["id"]): ann for ann in data["annotations"]}
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetFormatError(
            path,
            None,
            "expected 'images' and 'annotations' to be lists of dicts with an integer 'id' "
            f"({type(error).__name__}: {error})",
        ) from error
    return _Instances(path, images, annotations)
