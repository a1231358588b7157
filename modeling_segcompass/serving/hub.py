"""Hub export: one call writes a complete, self-contained model folder; `push_to_hub` uploads it.

The folder holds everything a user without this package needs (remote code,
pipeline, Space and endpoint files):

* ``model.safetensors`` + ``config.json`` (with ``auto_map`` and ``custom_pipelines``) and
  the remote-code modeling files, so `AutoModel.from_pretrained(..., trust_remote_code=True)`
  and ``pipeline(model=..., trust_remote_code=True)`` work;
* the processor (``processor_config.json``, tokenizer, image processor, and
  ``processing_segcompass.py``) registered for `AutoProcessor`;
* ``pipeline_segcompass.py`` (the `ReasoningSegmentationPipeline`);
* ``README.md``: the model card (`serving.model_card`: metadata, usage that runs, training
  recipe, evaluation, limitations, interpretability, citation);
* ``handler.py`` (Inference Endpoints), ``app.py`` (a Gradio Space) and ``requirements.txt``:
  the Hub widget cannot run custom code, so these are the ways to serve it.

Library side: uses huggingface_hub; never imported by the remote-code files.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import HfApi, ModelCard
from PIL import Image

from ..loading import write_code_checksums
from ..pipeline_segcompass import TASK, ReasoningSegmentationPipeline, register_pipeline
from .model_card import (
    CARD_TAGS,
    CITATION,
    DEFAULT_INSTRUCTION,
    EvaluationReport,
    build_model_card,
    extract_python_blocks,
    lower_level_snippet,
    usage_snippet,
)

logger = logging.getLogger(__name__)

#: The example image of an export (the card's snippets open it, ``app.py`` offers it).
EXAMPLE_FILE = "example.png"
#: Where the serving files live (this folder, next to this module).
SERVING_DIR = Path(__file__).resolve().parent
#: Files of this folder copied into the export under another name (export name -> file).
SERVING_FILES = {"app.py": "space_app.py", "handler.py": "endpoint_handler.py"}
#: What the endpoint / Space installs (``requirements.txt``): the ranges of this package's own
#: core requirements in setup.py (a test keeps them equal); gradio comes with the Space SDK.
REQUIREMENTS = (
    "torch>=2.6",
    "transformers>=5.23,<6",
    "huggingface-hub>=1.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10",
)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_REQUIRED_FILES = (
    "config.json",
    "README.md",
    "processor_config.json",
    "configuration_segcompass.py",
    "modeling_segcompass.py",
    "processing_segcompass.py",
    "pipeline_segcompass.py",
)


@dataclass
class ExportResult:
    """What `export` wrote.

    Attributes:
        folder: the export folder.
        files: file names in it (sorted).
        card: the model card (also written as ``README.md``).
        repo_id: the Hub id the card names (None: the card loads the model from `folder`).
    """

    folder: Path
    files: list[str]
    card: ModelCard
    repo_id: str | None = None


# --------------------------------------------------------------------------- export
def _drawn_example() -> Any:
    """The placeholder example image: a red square on white, 64 x 64."""
    image = Image.new("RGB", (64, 64), "white")
    image.paste((220, 30, 30), (16, 16, 40, 40))
    return image


def _example_and_card_kwargs(
    example: Any, card_kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Check ``export(example=...)``; return its RGB image and the card arguments it sets."""
    if example is None:
        note = (
            f"The example image (`{EXAMPLE_FILE}`) is drawn: no example was chosen when this "
            "model was exported, so the model may find nothing in it."
        )
        return _drawn_example(), {
            "example_image": EXAMPLE_FILE, "example_note": note, **card_kwargs
        }  # fmt: skip
    if not isinstance(example, (tuple, list)) or len(example) != 2:
        raise ValueError(
            "export(example=...): expected a pair (image, instruction), e.g. "
            f"example=(sample['image'], sample['instruction']), got {type(example).__name__}"
            + (f" of length {len(example)}" if isinstance(example, (tuple, list)) else "")
            + "."
        )
    image, instruction = example
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(
            f"export(example=...): the instruction must be a non-empty str, got {instruction!r}."
        )
    given = card_kwargs.get("instruction")
    if given is not None and given != instruction:
        raise ValueError(
            f"export: instruction={given!r} and example=(..., {instruction!r}) disagree; give "
            "the instruction in example only."
        )
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))
        ):
            raise ValueError(
                "export(example=...): expected a uint8 image array of shape (H, W), (H, W, 3) "
                f"or (H, W, 4), got {image.dtype} {tuple(image.shape)}."
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            "export(example=...): expected the image as a PIL image, a uint8 array or a file "
            f"path, got {type(image).__name__}."
        )
    note = (
        f"The example (`{EXAMPLE_FILE}` and its instruction) is the one chosen when this model "
        "was exported."
    )
    return image.convert("RGB"), {
        "example_note": note,
        **card_kwargs,
        "instruction": instruction.strip(),
        "example_image": EXAMPLE_FILE,
    }


def _space_app_text(text: str, model_id: str, card_kwargs: Mapping[str, Any]) -> str:
    """``space_app.py`` with the export's model id, example instruction and generation budget."""
    values: dict[str, Any] = {
        "DEFAULT_MODEL_ID": model_id,
        "EXAMPLE_INSTRUCTION": card_kwargs.get("instruction", DEFAULT_INSTRUCTION),
    }
    if card_kwargs.get("max_new_tokens") is not None:
        values["DEFAULT_MAX_NEW_TOKENS"] = int(card_kwargs["max_new_tokens"])
    for name, value in values.items():
        pattern = re.compile(rf"^{name} = .*$", flags=re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            raise RuntimeError(f"space_app.py must assign {name} once; this is a bug.")
        line = f"{name} = {value!r}"
        text = pattern.sub(lambda _, line=line: line, text, count=1)
    return text


def _remote_imports_package(folder: Path) -> list[str]:
    bad = []
    for path in folder.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from|import)\s+modeling_segcompass\b", text, flags=re.MULTILINE):
            bad.append(path.name)
    return bad


def export(
    model: Any,
    processor: Any,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    example: tuple[Any, str] | None = None,
    include_serving: bool = True,
    extra_files: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    **card_kwargs: Any,
) -> ExportResult:
    """Write a complete Hub-ready folder for ``model`` + ``processor``.

    Args:
        model: a `SegCompassForReasoningSegmentation`.
        processor: its `SegCompassProcessor`.
        folder: where to write (created; must be empty unless ``overwrite``).
        repo_id: the Hub id it will be pushed to. The card's snippets, its serving
            instructions and ``app.py`` load the model from there; None: from this folder
            (its absolute path), so that they run before anything is pushed.
        example: ``(image, instruction)`` shown as the model's example: written as
            ``example.png``, opened by the card's snippets and offered by ``app.py``. Pick
            one the model gets right (e.g. a held-out sample it segments). Image: PIL, a
            uint8 array or a file path. None: a drawn image with a placeholder instruction,
            which the card marks as such.
        include_serving: also write ``handler.py``, ``app.py`` and ``requirements.txt``.
        extra_files: more files to copy in (e.g. ``concept_labels.json``, a training log).
        overwrite: allow a non-empty folder (files with the same names are replaced).
        **card_kwargs: passed to `build_model_card` (license, base_models, datasets,
            evaluation, training, limitations, toy, ...).

    Returns:
        `ExportResult` with the folder, its files and the card.

    Raises:
        FileExistsError: the folder is not empty and ``overwrite`` is False.
        ValueError / TypeError: ``example`` is not an (image, instruction) pair.
        RuntimeError: a remote-code file would import this package (the export would not
            load without it).
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Export folder {str(folder)!r} is not empty; pass overwrite=True or choose an "
            "empty folder."
        )
    model_id = repo_id or str(folder.resolve())
    example_image, card_kwargs = _example_and_card_kwargs(example, card_kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    register_pipeline()
    # Saving through the pipeline records `custom_pipelines` in config.json and copies
    # pipeline_segcompass.py; it saves the model (safetensors) and its remote code too.
    pipe = ReasoningSegmentationPipeline(
        model=model, processor=processor, task=TASK, device=model.device
    )
    pipe.save_pretrained(folder)
    # The pipeline saves tokenizer and image processor separately; AutoProcessor needs the
    # processor itself (processor_config.json with auto_map + processing_segcompass.py).
    processor.save_pretrained(folder)
    if include_serving:
        for target, source in SERVING_FILES.items():
            text = (SERVING_DIR / source).read_text(encoding="utf-8")
            if source == "space_app.py":
                text = _space_app_text(text, model_id, card_kwargs)
            (folder / target).write_text(text, encoding="utf-8")
        (folder / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n", encoding="utf-8")
    for extra in extra_files:
        shutil.copy2(extra, folder / Path(extra).name)
    example_image.save(folder / EXAMPLE_FILE)
    card = build_model_card(model.config, repo_id=model_id, **card_kwargs)
    card.save(folder / "README.md")

    bad = _remote_imports_package(folder)
    if bad:
        raise RuntimeError(
            f"Exported files {bad} import `modeling_segcompass`; users without the package "
            "could not load them. Remote-code files may only use flat relative imports."
        )
    missing = [f for f in _REQUIRED_FILES if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        missing.append("model.safetensors")
    if missing:
        raise RuntimeError(f"The export in {str(folder)!r} lacks {missing}; this is a bug.")
    # the sha256 of each carried code file: loading refuses one cut short (it may still import)
    write_code_checksums(folder)
    files = sorted(p.name for p in folder.iterdir())
    logger.info("Exported SegCompass to %s (%d files).", folder, len(files))
    return ExportResult(folder=folder, files=files, card=card, repo_id=repo_id)


def upload_command(folder: str | os.PathLike, repo_id: str) -> str:
    """The shell command that uploads an `export` folder to ``repo_id`` with the Hub's CLI.

    ``hf upload REPO_ID FOLDER`` (the ``hf`` command of huggingface_hub >= 1.0, which creates
    the repo when needed and puts the folder's files at its root), quoted for a POSIX shell.
    `push_to_hub` does the same from Python.
    """
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))}"


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload SegCompass model",
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create the model repo (if needed) and upload an `export` folder to it.

    Returns the `huggingface_hub` commit info (its ``commit_url`` / ``pr_url``).

    Raises:
        FileNotFoundError: ``folder`` is not a complete export (run `export` first).
    """
    folder = Path(folder)
    missing = [f for f in ("config.json", "README.md") if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        raise FileNotFoundError(
            f"{str(folder)!r} is not an export folder (missing {missing or ['the folder']}); "
            "write it with modeling_segcompass.serving.hub.export(model, processor, folder, repo_id=...)."
        )
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


# The card's names stay importable from here (`serving.model_card` holds them).
__all__ = [
    "CARD_TAGS",
    "CITATION",
    "DEFAULT_INSTRUCTION",
    "EvaluationReport",
    "ExportResult",
    "build_model_card",
    "export",
    "extract_python_blocks",
    "lower_level_snippet",
    "push_to_hub",
    "upload_command",
    "usage_snippet",
]
