"""Saved folders: every save leaves exactly one weight set, and loading refuses a folder that
holds two (docs/reliability.md, sections "Loading" and "Nothing lost")."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.serving.hub import export
from modeling_segcompass.training.checkpointing import AtomicCheckpointMixin, load_model_weights
from tests.helpers import (
    HIDE_PACKAGE,
    build_tiny_model,
    build_tiny_tokenizer_and_processor,
    make_batch,
)

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


# --------------------------------------------------------------------------- code checksums
CHECKSUMS = "code_checksums.json"
SERVING_SCRIPTS = {"handler.py", "app.py"}  # written by export, not imported by loading


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    folder = tmp_path_factory.mktemp("export") / "model"
    export(model.eval(), processor, folder, repo_id="a/b")
    return folder, model


def copy_export(exported, tmp_path: Path, name: str) -> Path:
    """A copy with a name of its own (remote code is cached per folder name)."""
    target = tmp_path / name
    shutil.copytree(exported[0], target)
    return target


def cut_where_it_still_parses(path: Path, marker: str) -> None:
    """Cut `path` just before `marker`, at a line boundary where it is still valid Python."""
    text = path.read_text()
    cut = text[: text.index(marker)]
    ast.parse(cut)
    path.write_text(cut)


def test_export_records_the_sha256_of_each_carried_code_file(exported):
    folder = exported[0]
    recorded = json.loads((folder / CHECKSUMS).read_text())["sha256"]
    carried = {p.name for p in folder.glob("*.py")} - SERVING_SCRIPTS
    assert set(recorded) == carried and "modeling_segcompass.py" in carried
    for name, digest in recorded.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


REMOTE_LOAD = HIDE_PACKAGE + textwrap.dedent(
    """
    import sys, traceback
    from transformers import AutoModel

    try:
        AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    except OSError as error:
        print("REFUSED", error)
        print("RAISED IN", traceback.extract_tb(error.__traceback__)[-1].filename)
    else:
        print("LOADED")
    """
)


def load_without_the_package(folder: Path) -> str:
    """What `AutoModel.from_pretrained(folder, trust_remote_code=True)` says in a process
    where only the carried files can run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_cut_modeling_file_is_refused_by_name(exported, tmp_path):
    folder = copy_export(exported, tmp_path, "cut_modeling")
    # the cut drops the forward (and all after it); what is left imports fine
    cut_where_it_still_parses(folder / "modeling_segcompass.py", "    # " + "-" * 66 + " forward")
    with pytest.raises(
        OSError, match=r"modeling_segcompass\.py in .* does not match its sha256"
    ) as info:
        SegCompassForReasoningSegmentation.from_pretrained(folder)
    assert "Download the model folder again" in str(info.value)
    assert "modeling_segcompass.serving.hub.export" in str(info.value)
    # remote code runs the carried files only: the check lives in them
    said = load_without_the_package(folder)
    assert "REFUSED modeling_segcompass.py in" in said and "does not match its sha256" in said
    assert "transformers_modules" in said.split("RAISED IN")[1]


def test_cut_processing_file_is_refused_by_name(exported, tmp_path):
    folder = copy_export(exported, tmp_path, "cut_processing")
    cut_where_it_still_parses(folder / "processing_segcompass.py", "    def post_process_masks(")
    with pytest.raises(OSError, match=r"processing_segcompass\.py in .* does not match"):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def test_damaged_checksum_file_is_named(exported, tmp_path):
    folder = copy_export(exported, tmp_path, "damaged_checksums")
    (folder / CHECKSUMS).write_text('{"sha256": {"../x.py": "0"}}')
    with pytest.raises(OSError, match=rf"{CHECKSUMS} in .* is damaged"):
        SegCompassForReasoningSegmentation.from_pretrained(folder)


def test_folders_without_checksums_still_load(exported, tmp_path):
    folder = copy_export(exported, tmp_path, "no_checksums")
    (folder / CHECKSUMS).unlink()  # an older export
    AutoModel.from_pretrained(folder, trust_remote_code=True)
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    plain = tmp_path / "plain"
    exported[1].save_pretrained(plain)
    assert not (plain / CHECKSUMS).exists()
    assert_weights_of(exported[1], plain)


def test_save_into_an_export_refreshes_the_checksums_of_the_files_it_writes(exported, tmp_path):
    folder = copy_export(exported, tmp_path, "resaved")
    # as exported by other code: another modeling file, recorded with its own digest
    modeling = folder / "modeling_segcompass.py"
    modeling.write_text("# another version\n" + modeling.read_text())
    recorded = json.loads((folder / CHECKSUMS).read_text())
    recorded["sha256"]["modeling_segcompass.py"] = hashlib.sha256(modeling.read_bytes()).hexdigest()
    (folder / CHECKSUMS).write_text(json.dumps(recorded))
    exported[1].save_pretrained(folder)  # rewrites the modeling files with this code
    assert_weights_of(exported[1], folder)
    AutoModel.from_pretrained(folder, trust_remote_code=True)
    # a damaged file that the model's save does not write keeps its recorded digest
    cut_where_it_still_parses(folder / "processing_segcompass.py", "    def post_process_masks(")
    exported[1].save_pretrained(folder)
    with pytest.raises(OSError, match=r"processing_segcompass\.py in .* does not match"):
        AutoProcessor.from_pretrained(folder, trust_remote_code=True)
