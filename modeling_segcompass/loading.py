"""Loading a SegCompass checkpoint without running or half-loading anything.

`SegCompassForReasoningSegmentation.from_pretrained` goes through `load_safely`, which wraps
transformers' own loading.

This file travels with saved models (remote code): it imports only the standard library.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def load_safely(
    load: Callable[..., Any], pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any
) -> Any:
    """`load` (`PreTrainedModel.from_pretrained`), refusing what could run code or half-load.

    * Weights come from safetensors only (``use_safetensors=True`` by default): a folder
      holding only pickle checkpoints (``*.bin``, ``*.pt``) is refused with a message,
      since unpickling a stranger's file can run code. Pass ``use_safetensors=False``
      explicitly to accept a pickle you trust.
    * A truncated or corrupted safetensors file raises `OSError` naming the checkpoint.
    * A checkpoint that lacks some of the model's tensors raises `ValueError` instead of
      returning a model with randomly initialised parts; pass
      ``allow_missing_weights=True`` to accept that (e.g. a checkpoint of an older layout).
    """

    kwargs.setdefault("use_safetensors", True)
    allow_missing = bool(kwargs.pop("allow_missing_weights", False))
    want_info = bool(kwargs.pop("output_loading_info", False))
    source = os.fspath(pretrained_model_name_or_path)
    folder = os.path.join(source, kwargs.get("subfolder") or "")
    if kwargs["use_safetensors"] and os.path.isdir(folder):
        files = sorted(os.listdir(folder))
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise OSError(
                f"{folder!r} holds only pickle checkpoints {pickles} and no *.safetensors "
                "file. SegCompass loads weights from safetensors only, because unpickling a "
                "file can run arbitrary code. Convert it where you trust the file, e.g. "
                "`model = SegCompassForReasoningSegmentation.from_pretrained(path, "
                "use_safetensors=False); model.save_pretrained(new_path)`."
            )
    try:
        model, info = load(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
    except Exception as error:
        if type(error).__name__ != "SafetensorError":  # safetensors' Rust-side error
            raise
        raise OSError(
            f"Could not read the safetensors weights of {source!r}: the file is truncated or "
            f"corrupted ({error}). Download or save the checkpoint again."
        ) from error
    missing = list(info.get("missing_keys") or [])
    if missing and not allow_missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"The checkpoint {source!r} lacks {len(missing)} of the model's tensors ({shown}); "
            "refusing to return a half-loaded model. Check that the weights file is complete "
            "and matches config.json, or pass allow_missing_weights=True to initialise the "
            "missing tensors randomly."
        )
    return (model, info) if want_info else model


__all__ = ["load_safely"]
