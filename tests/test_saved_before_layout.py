"""A folder saved with the flat layout of the first release still loads and gives its numbers.

`tests/fixtures/saved_before_layout/` was written by `save_pretrained` of a very small model
with the package as it was before the library moved into rooms (config.json and
model.safetensors as saved), with a batch and that code's outputs on it
(`check_batch.safetensors`, pixels stored in float16 and fed as float32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_segcompass import SegCompassForReasoningSegmentation

FOLDER = Path(__file__).parent / "fixtures" / "saved_before_layout"


def test_old_folder_loads_and_reproduces_its_outputs():
    model = SegCompassForReasoningSegmentation.from_pretrained(FOLDER).eval()
    assert model.config.ref_token_id == 9 and model.config.sae_k == 8
    saved = load_file(FOLDER / "check_batch.safetensors")
    expected = {k: saved.pop(k) for k in ("expected_mask_logits", "expected_conf_logits")}
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in saved.items()}
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.mask_logits, expected["expected_mask_logits"])
    torch.testing.assert_close(out.conf_logits, expected["expected_conf_logits"])
