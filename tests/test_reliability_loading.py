"""Safe loading: safetensors only, clear refusals of broken checkpoints, never a half-load.

Each test starts from one real saved tiny model and breaks one thing (docs/reliability.md,
section "Loading").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modeling_segcompass import SegCompassForReasoningSegmentation
from modeling_segcompass.sparse_autoencoder import SparseAutoencoder
from tests.helpers import build_tiny_model

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("saved")
    model = build_tiny_model()
    model.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def copy_of(saved_folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(saved_folder, target)
    return target


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# --------------------------------------------------------------------------- pickles
def test_pickle_only_folder_is_refused_and_never_unpickled(saved, tmp_path, monkeypatch):
    folder = copy_of(saved[0], tmp_path)
    torch.save(load_file(folder / WEIGHTS), folder / "pytorch_model.bin")
    (folder / WEIGHTS).unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", no_unpickling)
        for loader in (SegCompassForReasoningSegmentation, AutoModel):
            with pytest.raises(OSError, match=r"only pickle checkpoints \['pytorch_model.bin'\]"):
                loader.from_pretrained(folder)
    # an explicit opt-in for a trusted file still works, and gives the same weights
    model = SegCompassForReasoningSegmentation.from_pretrained(folder, use_safetensors=False)
    for key, value in saved[1].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_safetensors_is_preferred_when_both_exist(saved, tmp_path, monkeypatch):
    folder = copy_of(saved[0], tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    model = SegCompassForReasoningSegmentation.from_pretrained(folder)
    assert torch.equal(model.sae.W_enc, saved[1]["sae.W_enc"])


# --------------------------------------------------------------------------- broken weights
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (_truncate, "incomplete metadata"),
        (_corrupt_header, "invalid UTF-8"),
        (lambda path: path.write_bytes(b""), "header too small"),
    ],
    ids=["cut-in-half", "corrupted-header", "empty-file"],
)
def test_damaged_safetensors_gives_a_clear_error(saved, tmp_path, damage, detail):
    folder = copy_of(saved[0], tmp_path)
    damage(folder / WEIGHTS)
    with pytest.raises(OSError, match=rf"truncated or corrupted \(.*{detail}") as info:
        SegCompassForReasoningSegmentation.from_pretrained(folder)
    assert str(folder) in str(info.value) and "save the checkpoint again" in str(info.value)


def test_checkpoint_missing_tensors_is_refused_not_half_loaded(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    state = load_file(folder / WEIGHTS)
    dropped = sorted(k for k in state if k.startswith("slot_mapper."))
    save_file({k: v for k, v in state.items() if k not in dropped}, folder / WEIGHTS)
    with pytest.raises(ValueError, match=rf"lacks {len(dropped)} of the model's tensors"):
        SegCompassForReasoningSegmentation.from_pretrained(folder)
    # the explicit escape hatch loads every present tensor exactly
    model, info = SegCompassForReasoningSegmentation.from_pretrained(
        folder, allow_missing_weights=True, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == dropped
    assert torch.equal(model.codebook.codebook, saved[1]["codebook.codebook"])


# --------------------------------------------------------------------------- broken config
@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda c: c.update(num_slots="3"), ValueError, "num_slots: expected a positive integer, got '3'"),
        (lambda c: c.update(d_sae=512.0), ValueError, "d_sae: expected a positive integer, got 512.0"),
        (lambda c: c.update(activation_threshold="x"), ValueError, "activation_threshold: expected a number"),
        (lambda c: c.update(sae_k="16"), ValueError, "sae_k: expected an integer, got '16'"),
        (lambda c: c.update(sae_architecture=3), ValueError, "sae_architecture: expected one of"),
        (lambda c: c.update(vlm_config=[1, 2]), TypeError, "vlm_config: expected a dict"),
        (lambda c: c.pop("vlm_config"), ValueError, r"lacks \['vlm_config'\]"),
        (lambda c: c.pop("sam_config"), ValueError, r"lacks \['sam_config'\]"),
    ],
    ids=["str-int", "float-int", "str-float", "str-k", "int-enum", "list-subconfig",
         "no-vlm-config", "no-sam-config"],
)  # fmt: skip
def test_bad_config_fields_are_refused_by_name(saved, tmp_path, edit, error, message):
    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, edit)
    with pytest.raises(error, match=message):
        SegCompassForReasoningSegmentation.from_pretrained(folder)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.pop("d_sae"),  # falls back to the class default 65536
        lambda c: c["vlm_config"]["text_config"].update(hidden_size=32),
    ],
    ids=["missing-field-default-does-not-fit", "hidden-size-changed"],
)
def test_config_that_does_not_fit_the_weights_is_refused(saved, tmp_path, edit):
    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, edit)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        SegCompassForReasoningSegmentation.from_pretrained(folder)


def test_unparsable_config_json_is_refused(saved, tmp_path):
    folder = copy_of(saved[0], tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="config.json"):
        SegCompassForReasoningSegmentation.from_pretrained(folder)


# --------------------------------------------------------------------------- SAE folders
def test_damaged_sae_folder_gives_a_clear_error(tmp_path):
    sae = SparseAutoencoder(d_in=8, d_sae=16, architecture="topk", k=2)
    sae.save(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    _truncate(weights)
    with pytest.raises(OSError, match="sae_weights.safetensors: the safetensors file is truncated"):
        SparseAutoencoder.load(tmp_path / "sae")
    sae.save(tmp_path / "sae2")
    (tmp_path / "sae2" / "cfg.json").write_text("{broken")
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        SparseAutoencoder.load(tmp_path / "sae2")
