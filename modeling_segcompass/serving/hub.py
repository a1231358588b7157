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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard

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

#: Where the serving files live (this folder, next to this module).
SERVING_DIR = Path(__file__).resolve().parent
#: Files of this folder copied into the export under another name (export name -> file).
SERVING_FILES = {"app.py": "space_app.py", "handler.py": "endpoint_handler.py"}
#: What the endpoint / Space installs (``requirements.txt``); gradio comes with the Space SDK.
REQUIREMENTS = ("torch", "transformers>=5.0", "numpy", "pillow")
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
    """

    folder: Path
    files: list[str]
    card: ModelCard


# --------------------------------------------------------------------------- export
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
    repo_id: str,
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
        repo_id: the Hub id it will be pushed to (card snippets, the app's default model).
        include_serving: also write ``handler.py``, ``app.py`` and ``requirements.txt``.
        extra_files: more files to copy in (e.g. ``concept_labels.json``, a training log).
        overwrite: allow a non-empty folder (files with the same names are replaced).
        **card_kwargs: passed to `build_model_card` (license, base_models, datasets,
            evaluation, training, limitations, toy, ...).

    Returns:
        `ExportResult` with the folder, its files and the card.

    Raises:
        FileExistsError: the folder is not empty and ``overwrite`` is False.
        RuntimeError: a remote-code file would import this package (the export would not
            load without it).
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Export folder {str(folder)!r} is not empty; pass overwrite=True or choose an "
            "empty folder."
        )
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
                text = text.replace('DEFAULT_MODEL_ID = ""', f"DEFAULT_MODEL_ID = {repo_id!r}", 1)
            (folder / target).write_text(text, encoding="utf-8")
        (folder / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n", encoding="utf-8")
    for extra in extra_files:
        shutil.copy2(extra, folder / Path(extra).name)
    card = build_model_card(model.config, repo_id=repo_id, **card_kwargs)
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
    return ExportResult(folder=folder, files=files, card=card)


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
