"""The demo's last check: load the exported Hub-ready folder with AutoModel(...,
trust_remote_code=True) in a fresh process where the package cannot be imported (what a Hub
user has), segment one image there, and save the predicted mask over the image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_RELOAD_SCRIPT = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_segcompass" or name.startswith("modeling_segcompass."):
            raise ImportError("the package is deliberately hidden: this is what a Hub user has")

sys.meta_path.insert(0, Block())
import numpy as np
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, image_path, instruction, max_new_tokens = sys.argv[1:5]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
(result,) = model.segment(Image.open(image_path), instruction, processor,
                          max_new_tokens=int(max_new_tokens))
mask = result.masks.numpy().any(0) if len(result.masks) else np.zeros(Image.open(image_path).size[::-1], bool)
print(json.dumps({"class_module": type(model).__module__, "instruction": instruction,
                  "text": result.text, "num_masks": int(len(result.masks)),
                  "reason": result.reason, "mask": mask.tolist()}))
"""


def reload_in_fresh_process(
    folder: Path, image_path: Path, instruction: str, max_new_tokens: int
) -> dict[str, Any]:
    """Load the exported folder with AutoModel(trust_remote_code=True) where the package
    cannot be imported, and segment one image there."""
    import os
    import subprocess
    import sys

    # The child runs in `folder` (so the package in the caller's working directory cannot be
    # imported from there), so relative paths must be made absolute first: a relative folder
    # name that names no folder from the child's directory is taken for a Hub repo id.
    folder, image_path = Path(folder).resolve(), Path(image_path).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"demo: {folder} holds no config.json; export the model there before reloading it."
        )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(folder), str(image_path), instruction,
         str(max_new_tokens)],
        cwd=str(folder), env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(
            "demo: reloading the exported folder in a fresh process failed:\n" + done.stderr[-3000:]
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_overlay(image: Any, mask: np.ndarray, path: Path) -> None:
    """Image with the predicted mask tinted red, upscaled x4 for viewing."""
    from PIL import Image

    array = np.asarray(image.convert("RGB")).astype(np.float32)
    tint = np.array([255.0, 0.0, 0.0])
    array[mask] = 0.5 * array[mask] + 0.5 * tint
    picture = Image.fromarray(array.clip(0, 255).astype(np.uint8))
    picture.resize((picture.width * 4, picture.height * 4), Image.NEAREST).save(path)


__all__ = ["reload_in_fresh_process", "save_overlay"]
