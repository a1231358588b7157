"""A saved folder loads with trust_remote_code in a process where the package cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import HIDE_PACKAGE, build_tiny_model, make_batch

# Files a saved model must carry (the modeling file and, recursively, its flat siblings).
REMOTE_FILES = {
    "configuration_segcompass.py",
    "config_presets.py",
    "modeling_segcompass.py",
    "sparse_autoencoder.py",
    "query_codebook.py",
    "slot_mapper.py",
    "vlm_states.py",
    "conv_image_encoder.py",
    "losses.py",
    "matching.py",
    "mask_decoding.py",
    "answer_format.py",
    "input_checks.py",
    "loading.py",
    "precision.py",
    "sae_lens_format.py",
    "pipeline_segcompass.py",  # model.segment runs the pipeline's segment
}

SCRIPT = HIDE_PACKAGE + textwrap.dedent(
    """
    import json, sys
    import torch

    from transformers import AutoModel

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(folder + "/batch.pt")
    with torch.no_grad():
        out = model(**batch)
    print(json.dumps({
        "class": type(model).__name__,
        "module": type(model).__module__,
        "mask_sum": float(out.mask_logits.double().sum()),
        "conf": out.conf_logits.tolist(),
    }))
    """
)


@pytest.mark.slow
def test_saved_folder_carries_remote_code_and_loads_without_the_package(tmp_path):
    model = build_tiny_model()
    model.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.glob("*.py")}
    # exactly these: a library module (e.g. assembly/backbones.py) must not be carried along
    assert saved == REMOTE_FILES, saved ^ REMOTE_FILES
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModel"] == "modeling_segcompass.SegCompassForReasoningSegmentation"
    )
    # remote files import only torch/transformers and flat siblings
    for name in saved:
        text = (tmp_path / name).read_text()
        assert "import modeling_segcompass" not in text and "from modeling_segcompass" not in text
        assert "from .." not in text

    batch = make_batch(model.config, [2])
    torch.save(batch, tmp_path / "batch.pt")  # test-made tensors only
    with torch.no_grad():
        expected = model(**batch)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "SegCompassForReasoningSegmentation"
    assert report["module"].startswith("transformers_modules.")
    # the same float32 numbers up to summation order, which depends on the torch thread count
    # of each process (measured: 3.3e-6 on a sum of -216.8, 1.5e-8 relative)
    assert report["mask_sum"] == pytest.approx(float(expected.mask_logits.double().sum()), rel=1e-6)
    torch.testing.assert_close(torch.tensor(report["conf"]), expected.conf_logits)
