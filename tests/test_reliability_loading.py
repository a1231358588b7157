"""Safe loading: safetensors only, clear refusals of broken checkpoints, never a half-load.

Each test starts from one real saved tiny model and breaks one thing (docs/reliability.md,
section "Loading").
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass import modeling_segcompass as modeling
from modeling_segcompass.processing_segcompass import SegCompassProcessor
from modeling_segcompass.sparse_autoencoder import SparseAutoencoder
from tests.helpers import (
    build_tiny_model,
    build_tiny_tokenizer_and_processor,
    force_answer,
    make_batch,
)

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


# --------------------------------------------------------------------------- non-finite weights
def _garble_tensors(path: Path, prefix: str) -> list[str]:
    """Overwrite the bytes of every tensor named `prefix...` in place (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    rng = np.random.default_rng(0)
    names = []
    for name, entry in header.items():
        if name.startswith(prefix):
            start, end = (8 + header_size + offset for offset in entry["data_offsets"])
            data[start:end] = rng.bytes(end - start)
            names.append(name)
    path.write_bytes(bytes(data))
    return names


@pytest.fixture(scope="module")
def segment_setup():
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    return model.eval(), processor


def _segment(model, processor):
    image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    return model.segment(
        image, "the red circle", processor, max_new_tokens=8,
        generation_kwargs={"prefix_allowed_tokens_fn": force_answer(2)},
    )  # fmt: skip


def test_garbled_weights_are_named_instead_of_answering_no_object(segment_setup, tmp_path):
    model, processor = segment_setup
    model.save_pretrained(tmp_path)
    garbled = _garble_tensors(tmp_path / WEIGHTS, "slot_mapper.")
    broken = SegCompassForReasoningSegmentation.from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match="contain NaN or Inf") as info:
        _segment(broken, processor)
    message = str(info.value)
    assert "slot_mapper." in message and "corrupted" in message
    assert "torch.isfinite(p).all() for p in model.parameters()" in message
    assert any(name in message for name in garbled)


@pytest.mark.parametrize("forward_checks", [True, False], ids=["cpu-forward", "segment-only"])
def test_nan_weights_are_refused_in_segment_and_forward(segment_setup, monkeypatch, forward_checks):
    model, processor = segment_setup
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.slot_mapper.conf_head[2].weight.fill_(float("nan"))
    if not forward_checks:  # as on an accelerator: forward reads no value, segment still checks
        monkeypatch.setattr(modeling, "values_are_checked", lambda model, input_ids: False)
    with pytest.raises(ValueError, match=r"confidences? .*contain NaN or Inf") as info:
        _segment(broken, processor)
    assert "slot_mapper.conf_head.2.weight" in str(info.value)
    # the healthy model answers as before
    assert _segment(model, processor)[0].conf_logits.isfinite().all()


def test_forward_names_nan_weights_on_cpu(segment_setup):
    model, _ = segment_setup
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.mask_decoder.iou_token.weight.fill_(float("inf"))
    batch = make_batch(broken.config, [1])
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight"):
        broken(**batch)
    model(**batch)  # the healthy one runs


@pytest.mark.parametrize("field", ["mask_threshold", "slot_confidence_threshold"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_thresholds_in_config_json_are_refused(saved, tmp_path, field, value):
    folder = copy_of(saved[0], tmp_path)
    edit_config(folder, lambda c: c.update({field: value}))  # json writes NaN / Infinity
    with pytest.raises(ValueError, match=rf"SegCompassConfig.{field}: expected a finite number"):
        SegCompassForReasoningSegmentation.from_pretrained(folder)


# --------------------------------------------------------------------------- tokenizer and index
@pytest.fixture(scope="module")
def saved_processor(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("processor")
    build_tiny_tokenizer_and_processor(num_slots=3)[1].save_pretrained(folder)
    return folder


@pytest.mark.parametrize("loader", [SegCompassProcessor, AutoProcessor], ids=["class", "auto"])
def test_deleted_tokenizer_json_names_the_file_not_add_tokens(saved_processor, tmp_path, loader):
    folder = copy_of(saved_processor, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(OSError, match=r"has no tokenizer\.json") as info:
        loader.from_pretrained(folder, trust_remote_code=True)
    message = str(info.value)
    assert "Download the model folder again" in message and "save_pretrained" in message
    assert "Do not add the tokens by hand" in message  # ids must match the trained embeddings


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("loader", [SegCompassProcessor, AutoProcessor], ids=["class", "auto"])
def test_truncated_tokenizer_files_are_named(saved_processor, tmp_path, loader, name):
    folder = copy_of(saved_processor, tmp_path)
    _truncate(folder / name)
    with pytest.raises(OSError, match=rf"{name} in .* is not valid JSON") as info:
        loader.from_pretrained(folder, trust_remote_code=True)
    assert str(folder) in str(info.value) and "Download the model folder again" in str(info.value)


def test_truncated_shard_index_is_named(saved, tmp_path):
    folder = tmp_path / "sharded"
    SegCompassForReasoningSegmentation.from_pretrained(saved[0]).save_pretrained(
        folder, max_shard_size="500KB"
    )
    _truncate(folder / "model.safetensors.index.json")
    with pytest.raises(OSError, match=r"model\.safetensors\.index\.json in .* is not valid JSON"):
        SegCompassForReasoningSegmentation.from_pretrained(folder)
