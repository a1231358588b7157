"""A model's SAE written as a SAELens folder with a complete ``cfg.json``.

SAELens names the point an SAE reads with TransformerLens hook names: the output of decoder
layer ``L`` (``hidden_states[L + 1]``, what ``config.sae_layer = L`` feeds the SAE) is
``blocks.L.hook_resid_post``. SAELens 6 reads ``hook_name`` / ``hook_layer`` from the
config's ``metadata``, older releases from its top level; both are written, so either
loads the folder knowing where the SAE belongs.

Library side (not remote code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..sae_lens_format import SAE_CFG_FILENAME


def sae_lens_hook_name(layer: int) -> str:
    """The TransformerLens hook name of decoder layer ``layer``'s output."""
    return f"blocks.{int(layer)}.hook_resid_post"


def save_sae_lens(
    sae: nn.Module, folder: str | os.PathLike, *, layer: int, model_name: str | None = None
) -> Path:
    """Write ``sae`` (a `SparseAutoencoder`) to ``folder`` in SAELens format.

    Args:
        sae: the SAE, as it is now.
        folder: the output folder (created; an SAE already there is replaced).
        layer: the decoder layer whose output the SAE reads (``config.sae_layer``).
        model_name: the model the SAE belongs to, recorded as SAELens's ``model_name``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    hook_name = sae_lens_hook_name(layer)
    sae.save(folder, hook_name=hook_name, hook_layer=int(layer))
    cfg_path = folder / SAE_CFG_FILENAME
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["hook_name"], cfg["hook_layer"] = hook_name, int(layer)
    if model_name:
        cfg["model_name"] = cfg["metadata"]["model_name"] = model_name
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return folder


def export_model_sae(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model.sae`` as it is now (after any fine-tuning) in SAELens format, hooked at
    ``model.config.sae_layer``."""
    return save_sae_lens(model.sae, folder, layer=model.config.sae_layer)


__all__ = ["export_model_sae", "sae_lens_hook_name", "save_sae_lens"]
