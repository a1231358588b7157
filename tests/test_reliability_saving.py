"""Saved folders: every save leaves exactly one weight set, and loading refuses a folder that
holds two (docs/reliability.md, sections "Loading" and "Nothing lost")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.serving.hub import export
from modeling_segcompass.training.checkpointing import AtomicCheckpointMixin, load_model_weights
from tests.helpers import build_tiny_model, build_tiny_tokenizer_and_processor, make_batch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDED = {"max_shard_size": "500KB"}  # the tiny model (1.7 MB) in several shards


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("model.", "model-")))


def assert_one_weight_set(folder: Path, sharded: bool) -> None:
    names = weight_files(folder)
    if sharded:
        assert SINGLE not in names and INDEX in names, names
        assert all(n == INDEX or n.startswith("model-0") for n in names), names
        assert len(names) > 2, names  # the index and at least two shards
    else:
        assert names == [SINGLE], names


def assert_weights_of(model, folder: Path) -> None:
    loaded = SegCompassForReasoningSegmentation.from_pretrained(folder)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.fixture(scope="module")
def old_and_new():
    """Two tiny models with different weights: the old save and the new one."""
    old = build_tiny_model()
    torch.manual_seed(1)
    new = SegCompassForReasoningSegmentation(old.config).eval()
    assert not torch.equal(old.sae.W_enc, new.sae.W_enc)
    return old, new


# --------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize(
    ("old_kwargs", "new_kwargs"),
    [({}, SHARDED), (SHARDED, {})],
    ids=["sharded-over-single", "single-over-sharded"],
)
def test_save_pretrained_over_the_other_layout_leaves_one_weight_set(
    old_and_new, tmp_path, old_kwargs, new_kwargs
):
    old, new = old_and_new
    old.save_pretrained(tmp_path, **old_kwargs)
    new.save_pretrained(tmp_path, **new_kwargs)
    assert_one_weight_set(tmp_path, sharded=bool(new_kwargs))
    assert_weights_of(new, tmp_path)  # never the old weights


def test_folder_with_an_index_and_a_stray_single_file_is_refused(old_and_new, tmp_path):
    old, new = old_and_new
    old.save_pretrained(tmp_path / "single")
    new.save_pretrained(tmp_path / "both", **SHARDED)
    shutil.copy2(tmp_path / "single" / SINGLE, tmp_path / "both" / SINGLE)
    with pytest.raises(OSError, match="two sets of weights") as info:
        SegCompassForReasoningSegmentation.from_pretrained(tmp_path / "both")
    message = str(info.value)
    assert SINGLE in message and INDEX in message and "model-00001-of-" in message
    assert "Delete the stale set" in message and "save_pretrained" in message
    with pytest.raises(OSError, match="two sets of weights"):  # resuming a training run too
        load_model_weights(build_tiny_model(), tmp_path / "both")


# --------------------------------------------------------------------------- other save paths
def test_export_over_an_older_sharded_save_leaves_one_weight_set(tmp_path):
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(1)
    model = SegCompassForReasoningSegmentation(
        SegCompassConfig.tiny(vocab_size=len(tokenizer))
    ).eval()
    stale = SegCompassForReasoningSegmentation(model.config).eval()
    stale.save_pretrained(tmp_path, **SHARDED)
    result = export(model, processor, tmp_path, repo_id="a/b", overwrite=True)
    assert_one_weight_set(tmp_path, sharded=False)
    assert not any(name.startswith("model-0") or name == INDEX for name in result.files)
    assert_weights_of(model, tmp_path)


class CheckpointingTrainer(AtomicCheckpointMixin, Trainer):
    pass


def test_trainer_saves_leave_one_weight_set(old_and_new, tmp_path):
    old, _ = old_and_new
    model = build_tiny_model().train()
    batch = make_batch(model.config, [2], with_targets=True, num_objects=[1])
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=1, save_strategy="steps", save_steps=1,
        per_device_train_batch_size=1, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = CheckpointingTrainer(
        model=model, args=args, train_dataset=[batch], data_collator=lambda rows: rows[0]
    )
    # an older sharded save where the trainer will write, and one where it checkpoints
    old.save_pretrained(tmp_path / "final", **SHARDED)
    old.save_pretrained(tmp_path / "run" / "checkpoint-1", **SHARDED)
    trainer.train()
    assert_one_weight_set(tmp_path / "run" / "checkpoint-1", sharded=False)
    trainer.save_model(str(tmp_path / "final"))
    assert_one_weight_set(tmp_path / "final", sharded=False)
    assert_weights_of(trainer.model.eval(), tmp_path / "final")
