"""The ``--data`` option: its forms (`DATA_HELP`), parsing (`parse_data_spec`) and the rows it
names (`load_rows`), in the collator schema.

These functions raise ValueError (a malformed value or data) and FileNotFoundError (a missing
folder), with messages that name the fix; `read_rows` is the commands' call, which turns any
other OSError of reading the data into a one-line user error.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.rows import row_masks
from .common import CLIError

DATA_HELP = (
    "data: 'synthetic[:N]' (N examples of the synthetic world, seeded by --data-seed), "
    "'reasonseg:ROOT:SPLIT', 'refcoco:ROOT:DATASET:SPLIT' (DATASET refcoco|refcoco+|refcocog), "
    "'grefcoco:ROOT:SPLIT', or a folder written by datasets' save_to_disk (one split)"
)


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
        ValueError: an unknown form, a bad count or a missing part.
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
            raise ValueError(
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
                raise ValueError(f"--data {text!r}: expected the form {form!r}.")
            if kind == "refcoco":
                root, dataset, split = pieces
                if dataset not in ("refcoco", "refcoco+", "refcocog"):
                    raise ValueError(
                        f"--data {text!r}: DATASET must be refcoco, refcoco+ or refcocog, got "
                        f"{dataset!r}."
                    )
                return DataSpec(kind, root=root, dataset=dataset, split=split, text=text)
            root, split = pieces
            return DataSpec(kind, root=root, split=split, text=text)
    path = Path(value)
    if path.is_dir():
        return DataSpec("disk", root=str(path), text=text)
    raise ValueError(
        f"--data {text!r} is neither a known form nor an existing folder; expected {DATA_HELP}."
    )


def normalise_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A saved-dataset row in the collator schema (image, instruction, masks, num_objects).

    Raises:
        ValueError: the row has no image or instruction, or masks of the wrong shape.
    """
    row = dict(row)
    if "instruction" not in row and "text" in row:
        row["instruction"] = row["text"]  # data_formats.to_hf_dataset rows
    for key in ("image", "instruction"):
        if key not in row or row[key] is None:
            raise ValueError(
                f"data row {index} has no {key!r} column; rows need 'image', 'instruction' "
                f"(or 'text') and 'masks'. Found columns: {sorted(row)}."
            )
    image = row["image"]
    if not hasattr(image, "convert"):
        raise ValueError(f"data row {index}: 'image' is a {type(image).__name__}, not an image.")
    row["image"] = image.convert("RGB")
    width, height = row["image"].size
    row["masks"] = row_masks(row.get("masks", []), height, width)
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

    Raises:
        ValueError: a bad ``limit``, a saved dataset with several splits or malformed rows.
        FileNotFoundError: the dataset root does not exist.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}.")
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
            raise ValueError(
                f"--data {spec.text!r}: not a folder written by datasets' save_to_disk ({error})."
            ) from error
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(
                f"--data {spec.text!r} holds several splits {sorted(loaded)}; point --data at "
                f"one of them, e.g. {str(Path(spec.root) / sorted(loaded)[0])!r}."
            )
        count = len(loaded) if limit is None else min(limit, len(loaded))
        return [normalise_row(loaded[i], i) for i in range(count)]
    from tqdm.auto import tqdm

    from ..data import formats as data_formats

    root = Path(spec.root)
    if not root.exists():
        raise FileNotFoundError(
            f"--data {spec.text!r}: the dataset root {str(root)!r} does not exist."
        )
    if spec.kind == "reasonseg":
        records = data_formats.load_reasonseg(root, spec.split)
    elif spec.kind == "refcoco":
        records = data_formats.load_refcoco(root, spec.dataset, split=spec.split)
    else:
        records = data_formats.load_grefcoco(root, spec.split)
    if limit is not None:
        records = records[:limit]
    rows = []
    for record in tqdm(records, desc="reading data", unit="it", disable=not progress):
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


def read_rows(
    args: argparse.Namespace, spec: DataSpec, *, num_slots: int, default_count: int
) -> list[dict[str, Any]]:
    """`load_rows` with a command's ``--data-seed``, ``--limit`` and ``--no-progress``.

    Raises:
        CLIError: the data could not be read (an unreadable file under the root).
    """
    try:
        return load_rows(
            spec,
            num_slots=num_slots,
            seed=args.data_seed,
            limit=args.limit,
            default_count=default_count,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError):
        raise  # their messages already name --data and the fix
    except OSError as error:
        raise CLIError(f"--data {spec.text!r}: could not read the data ({error}).") from error


def need_responses(rows: list[dict[str, Any]], spec: DataSpec, what: str) -> None:
    """Refuse rows without a gold ``response`` (`what` names the command or option).

    Raises:
        ValueError: a row has no response.
    """
    missing = [i for i, row in enumerate(rows) if not row.get("response")]
    if missing:
        raise ValueError(
            f"{what} needs gold responses ('<think> ... </think> <REF_POS> ...') but --data "
            f"{spec.text!r} has none (row {missing[0]}); use 'synthetic[:N]' or a saved dataset "
            "with a 'response' column."
        )


__all__ = [
    "DATA_HELP",
    "DataSpec",
    "load_rows",
    "need_responses",
    "normalise_row",
    "parse_data_spec",
    "read_rows",
]
