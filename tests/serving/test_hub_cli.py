"""`segcompass export`: what it prints for pushing works with the installed huggingface_hub,
and without --repo-id the folder is named instead of a made-up repo id."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.cli import main
from tests.helpers import build_tiny_tokenizer_and_processor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _installed_hf() -> str:
    """The `hf` command of the huggingface_hub installed next to this interpreter."""
    found = shutil.which("hf", path=os.path.dirname(sys.executable)) or shutil.which("hf")
    assert found, "the installed huggingface_hub has no `hf` command"
    return found


def test_export_prints_an_upload_command_the_installed_cli_accepts(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "hub"
    code = main(["export", "--model", str(model_dir), "--output", str(out_dir),
                 "--repo-id", "me/tiny"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.startswith("push with:")]
    command = shlex.split(line.removeprefix("push with:"))
    assert command[:4] == ["hf", "upload", "me/tiny", str(out_dir)]
    # the installed CLI knows the command and its arguments (--help: nothing is uploaded)
    done = subprocess.run(
        [_installed_hf(), *command[1:], "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REPO_ID" in done.stdout and "LOCAL_PATH" in done.stdout


def test_export_without_a_repo_id_names_the_folder_not_a_made_up_repo(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "hub"
    code = main(["export", "--model", str(model_dir), "--output", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0
    folder = str(out_dir.resolve())
    for name in ("README.md", "app.py"):
        text = (out_dir / name).read_text()
        assert "local/" not in text and folder in text, name
    assert "--repo-id NAME" in out and "hf upload NAME" in out
