"""Model folders of the command line: open one (`load_model`) and save one (`save_model`).

A model folder is what ``save_pretrained`` (or ``segcompass export``) writes: ``config.json``
and the weights, with the processor's files next to them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from .common import CLIError

logger = logging.getLogger(__name__)

#: Files a folder needs to be a SegCompass model.
MODEL_FILES = ("config.json",)


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


def device_of(name: str) -> Any:
    """The torch device of ``--device`` ('auto': CUDA when available, else CPU)."""
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
    model = model.to(device_of(device)).eval()
    model.processor = processor
    logger.info("Loaded %s (%d parameters).", path, sum(p.numel() for p in model.parameters()))
    return LoadedModel(model, processor, path)


def save_model(model: Any, processor: Any, folder: Path) -> None:
    """Save the model and its processor into one folder (created)."""
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


__all__ = ["MODEL_FILES", "LoadedModel", "device_of", "load_model", "save_model"]
