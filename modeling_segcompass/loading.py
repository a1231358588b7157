"""Loading a SegCompass checkpoint without running or half-loading anything, and saving
folders that load back exactly what was saved.

`SegCompassForReasoningSegmentation.from_pretrained` goes through `load_safely`, which wraps
transformers' own loading; its `save_pretrained` ends with `tidy_saved_folder`.

This file travels with saved models (remote code): it imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: The two layouts of safetensors weights that `save_pretrained` writes: one file, or shards
#: listed by an index.
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
#: Written by `serving.hub.export`: the sha256 of each carried code file, checked on loading.
CODE_CHECKSUMS = "code_checksums.json"


def _shard_files(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if _SHARD.fullmatch(name))


def check_one_weight_set(folder: str | os.PathLike) -> None:
    """Refuse a folder that holds both weight layouts.

    Saving sharded weights into a folder with an older ``model.safetensors`` (or the reverse)
    leaves both, and transformers then loads ``model.safetensors`` whichever is newer.
    """
    folder = os.path.normpath(os.fspath(folder))
    single, index = (os.path.join(folder, name) for name in (SINGLE_WEIGHTS, WEIGHTS_INDEX))
    if not (os.path.isfile(single) and os.path.isfile(index)):
        return
    shards = _shard_files(folder)
    shown = (", ".join(shards[:3]) + (", ..." if len(shards) > 3 else "")) or "none present"
    newer = SINGLE_WEIGHTS if os.path.getmtime(single) > os.path.getmtime(index) else WEIGHTS_INDEX
    raise OSError(
        f"{folder!r} holds two sets of weights: {SINGLE_WEIGHTS}, and {WEIGHTS_INDEX} with the "
        f"shards ({shown}). One is left over from an older save into the same folder "
        f"({newer} is the newer by date), and transformers "
        f"would load {SINGLE_WEIGHTS} whichever it is. Delete the stale set (either "
        f"{SINGLE_WEIGHTS}, or {WEIGHTS_INDEX} and its model-*-of-*.safetensors shards), or "
        "save the model again into an empty folder; SegCompass's save_pretrained, export and "
        "trainer checkpoints remove the other layout for you."
    )


def remove_stale_weights(folder: str | os.PathLike) -> list[str]:
    """After a save into `folder`: delete the weight files of the layout it did not write.

    transformers removes old shards the new save does not overwrite, but neither an old
    ``model.safetensors`` under new shards nor an old index over a new single file. A sharded
    save leaves an index whose shards all exist; a single-file save removed every shard, so
    its stale index lists missing files. Returns the removed names.
    """
    folder = os.fspath(folder)
    single, index = (os.path.join(folder, name) for name in (SINGLE_WEIGHTS, WEIGHTS_INDEX))
    if not (os.path.isfile(single) and os.path.isfile(index)):
        return []
    try:
        with open(index, encoding="utf-8") as f:
            listed = set(json.load(f)["weight_map"].values())
        sharded = bool(listed) and all(os.path.isfile(os.path.join(folder, n)) for n in listed)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        sharded = False  # an unreadable index is not the one this save wrote
    stale = [SINGLE_WEIGHTS] if sharded else [WEIGHTS_INDEX, *_shard_files(folder)]
    for name in stale:
        os.remove(os.path.join(folder, name))
    logger.info("Removed weights of an older save from %s: %s", folder, stale)
    return stale


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def carried_code_files(folder: str | os.PathLike) -> list[str]:
    """The ``*.py`` files of `folder` that are this code's flat modules (the remote code a
    saved model or processor carries), not e.g. an export's ``handler.py`` or ``app.py``."""
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(
        name
        for name in os.listdir(folder)
        if name.endswith(".py")
        and name != "__init__.py"
        and os.path.isfile(os.path.join(here, name))
    )


def write_code_checksums(folder: str | os.PathLike, digests: dict[str, str] | None = None) -> str:
    """Write :data:`CODE_CHECKSUMS`: the sha256 of every carried code file in `folder` (or
    the given `digests`, file name -> hex digest).

    A code file cut short can still be valid Python: it imports, and fails only where the
    missing part is needed (e.g. the first forward). The checksums let loading refuse it.
    Returns the file's path.
    """
    folder = os.fspath(folder)
    if digests is None:
        digests = {n: _sha256(os.path.join(folder, n)) for n in carried_code_files(folder)}
    path = os.path.join(folder, CODE_CHECKSUMS)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"sha256": digests}, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def _recorded_checksums(folder: str) -> dict[str, str]:
    path = os.path.join(folder, CODE_CHECKSUMS)
    try:
        with open(path, encoding="utf-8") as f:
            digests = json.load(f)["sha256"]
        if not all(
            isinstance(k, str) and isinstance(v, str) and os.path.basename(k) == k
            for k, v in digests.items()
        ):
            raise ValueError("expected {'sha256': {file name: hex digest}}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise OSError(
            f"{CODE_CHECKSUMS} in {folder!r} is damaged ({error}). Download the model folder "
            "again, or export it again with `modeling_segcompass.serving.hub.export`."
        ) from error
    return digests


def verify_code_checksums(path: Any, subfolder: str | None = None) -> None:
    """Refuse a local folder whose carried code files differ from :data:`CODE_CHECKSUMS`.

    Folders without that file (plain `save_pretrained`, older exports) and Hub ids pass.
    """
    folder = _local_folder(path, subfolder)
    if folder is None or not os.path.isfile(os.path.join(folder, CODE_CHECKSUMS)):
        return
    for name, expected in sorted(_recorded_checksums(folder).items()):
        file = os.path.join(folder, name)
        found = _sha256(file) if os.path.isfile(file) else None
        if found != expected:
            problem = (
                "is missing"
                if found is None
                else f"does not match its sha256 (recorded {expected[:12]}..., found "
                f"{found[:12]}...): it is cut short or altered, and cut code can still "
                "import and fail later"
            )
            raise OSError(
                f"{name} in {folder!r} {problem}. Download the model folder again, or export "
                "it again with `modeling_segcompass.serving.hub.export`. If you changed the "
                f"code on purpose, delete {CODE_CHECKSUMS}."
            )


def refresh_code_checksums(folder: str | os.PathLike) -> None:
    """Update an existing :data:`CODE_CHECKSUMS` for the code files a save just wrote.

    A file identical to this code's own copy gets its current digest (a save into an exported
    folder rewrites the code files); any other entry is kept, so a damaged file still fails.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, CODE_CHECKSUMS)):
        return
    try:
        digests = _recorded_checksums(folder)
    except OSError:
        digests = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for name in carried_code_files(folder):
        digest = _sha256(os.path.join(folder, name))
        if digest == _sha256(os.path.join(here, name)):
            digests[name] = digest
    write_code_checksums(folder, digests)


def tidy_saved_folder(folder: str | os.PathLike, is_main_process: bool = True) -> None:
    """What `save_pretrained` does after transformers' save: one weight set in the folder,
    and code checksums (if the folder has them) that match the code files just written."""
    if is_main_process and os.path.isdir(folder):
        remove_stale_weights(folder)
        refresh_code_checksums(folder)


def _local_folder(path: Any, subfolder: str | None = None) -> str | None:
    """The local folder `path` (+ `subfolder`) names, or None (a Hub id, not a path)."""
    try:
        folder = os.path.join(os.fspath(path), subfolder or "")
    except TypeError:
        return None
    return os.path.normpath(folder) if os.path.isdir(folder) else None


def broken_json_error(folder: str) -> OSError | None:
    """An `OSError` naming the first ``*.json`` file of `folder` that does not parse (a
    download or copy cut short), or None when every one parses."""
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
            return OSError(
                f"{name} in {folder!r} is not valid JSON: the file is cut short or corrupted "
                f"({error}). Download the model folder again, or write it again with "
                "`save_pretrained`."
            )
    return None


def load_processor_safely(load: Callable[..., Any], path: Any, *args: Any, **kwargs: Any) -> Any:
    """`load` (`ProcessorMixin.from_pretrained`), naming the damaged file of a local folder.

    Code files that differ from the folder's :data:`CODE_CHECKSUMS` are refused first
    (`verify_code_checksums`). A cut ``tokenizer.json`` (or any JSON file) raises `OSError`
    naming it instead of a bare `JSONDecodeError`. Without ``tokenizer.json`` the tokenizer
    is built without SegCompass's tokens and the processor fails on ``<REF_POS>``: the error
    says the file is missing, since adding the tokens by hand would give them ids the model
    was not trained with.
    """
    verify_code_checksums(path, kwargs.get("subfolder"))
    try:
        return load(path, *args, **kwargs)
    except (OSError, ValueError) as error:
        folder = _local_folder(path, kwargs.get("subfolder"))
        if folder is None:
            raise
        named = broken_json_error(folder)
        if named is not None:
            raise named from error
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise FileNotFoundError(
                f"{folder!r} has no tokenizer.json: the tokenizer loaded without it lacks "
                "SegCompass's tokens (<REF_POS>, <think>, </think>). Download the model folder "
                "again, or save the processor into it with `processor.save_pretrained(folder)`. "
                "Do not add the tokens by hand with `add_tokens`: their ids must be the ones "
                "the model was trained with."
            ) from error
        raise


def load_safely(
    load: Callable[..., Any], pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any
) -> Any:
    """`load` (`PreTrainedModel.from_pretrained`), refusing what could run code or half-load.

    * Weights come from safetensors only (``use_safetensors=True`` by default): a folder
      holding only pickle checkpoints (``*.bin``, ``*.pt``) is refused with a message,
      since unpickling a stranger's file can run code. Pass ``use_safetensors=False``
      explicitly to accept a pickle you trust.
    * A truncated or corrupted safetensors file raises `OSError` naming the checkpoint.
    * A folder that holds both ``model.safetensors`` and a shard index raises `OSError`
      (`check_one_weight_set`): one of them is stale.
    * A JSON file cut short (e.g. the shard index) raises `OSError` naming it.
    * A carried code file that differs from the folder's :data:`CODE_CHECKSUMS` (written by
      `serving.hub.export`) raises `OSError` naming it (`verify_code_checksums`).
    * A checkpoint that lacks some of the model's tensors raises `ValueError` instead of
      returning a model with randomly initialised parts; pass
      ``allow_missing_weights=True`` to accept that (e.g. a checkpoint of an older layout).
    """

    kwargs.setdefault("use_safetensors", True)
    allow_missing = bool(kwargs.pop("allow_missing_weights", False))
    want_info = bool(kwargs.pop("output_loading_info", False))
    source = os.fspath(pretrained_model_name_or_path)
    folder = os.path.join(source, kwargs.get("subfolder") or "")
    if os.path.isdir(folder):
        check_one_weight_set(folder)
        verify_code_checksums(folder)
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
        folder_found = _local_folder(folder)
        if isinstance(error, json.JSONDecodeError) and folder_found is not None:
            named = broken_json_error(folder_found)  # e.g. a cut model.safetensors.index.json
            if named is not None:
                raise named from error
        if type(error).__name__ != "SafetensorError":  # safetensors' Rust-side error
            raise
        raise OSError(
            f"Could not read the safetensors weights of {source!r}: the file is truncated or "
            f"corrupted ({error}). Download or save the checkpoint again."
        ) from error
    missing = list(info.get("missing_keys") or [])
    adapters = [
        k for k in info.get("unexpected_keys") or [] if ".lora_" in k or ".base_layer." in k
    ]
    if missing and adapters and not allow_missing:
        raise ValueError(
            f"The checkpoint {source!r} was saved with LoRA adapters injected ({len(adapters)} "
            f"tensors such as {adapters[0]!r}), so its names are not the model's. Load it into "
            "a model with the same adapters (the Trainer's resume does), or save the model "
            "again after `merge_lora(model)` (a plain model) or with "
            "`save_lora_adapter(model, folder)` (for `PeftModel.from_pretrained`); both are in "
            "modeling_segcompass.training.lora."
        )
    if missing and not allow_missing:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"The checkpoint {source!r} lacks {len(missing)} of the model's tensors ({shown}); "
            "refusing to return a half-loaded model. Check that the weights file is complete "
            "and matches config.json, or pass allow_missing_weights=True to initialise the "
            "missing tensors randomly."
        )
    return (model, info) if want_info else model


__all__ = [
    "SINGLE_WEIGHTS",
    "WEIGHTS_INDEX",
    "CODE_CHECKSUMS",
    "broken_json_error",
    "carried_code_files",
    "check_one_weight_set",
    "load_processor_safely",
    "load_safely",
    "refresh_code_checksums",
    "remove_stale_weights",
    "tidy_saved_folder",
    "verify_code_checksums",
    "write_code_checksums",
]
