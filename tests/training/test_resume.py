"""Resume: a killed run continues exactly; checkpoint writes are atomic (training/checkpointing.py)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

from modeling_segcompass.training.checkpointing import (
    COMPLETE_MARKER,
    STAGING_PREFIX,
    commit_folder,
    is_complete_checkpoint,
    last_complete_checkpoint,
    remove_staging_folders,
)
from modeling_segcompass.training.sft import (
    ModuleLearningRates,
    SegCompassTrainer,
    sft_training_arguments,
)
from tests.helpers import build_tiny_model, make_batch

MAX_STEPS = 6  # 6 examples, batch 2: 3 steps per epoch, so every resume crosses an epoch


class Killed(Exception):
    """Stands for SIGKILL: the run stops mid-way, nothing after it runs."""


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


class RecordingTrainer(SegCompassTrainer):
    """Records (step about to be taken, loss) of every training forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: dict[int, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training:
            self.losses[self.state.global_step + 1] = float(loss.detach())
        return out


def stack(examples):
    return {key: torch.cat([ex[key] for ex in examples]) for key in examples[0]}


def examples():
    config = build_tiny_model().config
    objects = [[1], [2], [0], [3], [1], [2]]
    return [
        make_batch(config, [3], with_targets=True, num_objects=o, seed=i)
        for i, o in enumerate(objects)
    ]


def make_trainer(output_dir, data, callbacks=(), save=True, max_steps=MAX_STEPS):
    # dropout in the codebook: the resumed run must also restore the RNG state to match
    model = build_tiny_model(codebook_dropout=0.1).train()
    args = sft_training_arguments(
        str(output_dir),
        per_device_train_batch_size=2,
        max_steps=max_steps,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        save_strategy="steps" if save else "no",
        save_steps=2,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    return RecordingTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=stack,
        module_learning_rates=ModuleLearningRates(codebook=2.0, slot_mapper=2.0),
        callbacks=list(callbacks),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: losses per step and final parameters."""
    trainer = make_trainer(tmp_path_factory.mktemp("full"), examples(), save=False)
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer.losses, params


def assert_same_continuation(resumed, reference, first_step):
    ref_losses, ref_params = reference
    assert sorted(resumed.losses) == list(range(first_step, MAX_STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(ref_losses[step], abs=1e-6), step
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, ref_params[name], atol=1e-6, rtol=0, msg=name)


def test_killed_run_resumes_with_the_uninterrupted_losses_and_weights(tmp_path, reference):
    data = examples()
    first = make_trainer(tmp_path, data, callbacks=[KillAtStep(3)])
    with pytest.raises(Killed):
        first.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    assert is_complete_checkpoint(tmp_path / "checkpoint-2")
    # up to the kill, the run matched the reference (the runs are deterministic)
    assert sorted(first.losses) == [1, 2, 3]
    assert first.losses[3] == pytest.approx(reference[0][3], abs=1e-6)

    resumed = make_trainer(tmp_path, data)
    resumed.train(resume_from_checkpoint=True)
    assert_same_continuation(resumed, reference, first_step=3)
    assert resumed.state.global_step == MAX_STEPS


def test_crash_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
    tmp_path, reference, monkeypatch
):
    data = examples()
    first = make_trainer(tmp_path, data)
    original = SegCompassTrainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed("killed while writing checkpoint-4")
        return original(self, output_dir)

    monkeypatch.setattr(SegCompassTrainer, "_save_rng_state", crash_at_step_4)
    with pytest.raises(Killed):
        first.train()
    monkeypatch.undo()
    # the half-written checkpoint is only in the staging folder, never under its final name
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-2", f"{STAGING_PREFIX}checkpoint-4"]
    staged = tmp_path / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file()  # weights got written, the rest did not
    assert not (staged / COMPLETE_MARKER).exists()
    # a checkpoint folder a plain Trainer left half-written (no marker) is skipped as well
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"partial")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")

    resumed = make_trainer(tmp_path, data)
    resumed.train(resume_from_checkpoint=True)
    assert_same_continuation(resumed, reference, first_step=3)
    assert not any(n.startswith(STAGING_PREFIX) for n in os.listdir(tmp_path))
    assert is_complete_checkpoint(tmp_path / "checkpoint-4")
    assert is_complete_checkpoint(tmp_path / "checkpoint-6")


def test_resuming_a_finished_run_mid_epoch_trains_no_extra_step(tmp_path):
    data = examples()
    make_trainer(tmp_path, data, max_steps=5).train()  # step 5 lies inside epoch 2
    assert is_complete_checkpoint(tmp_path / "checkpoint-5")  # the end of training saves too
    again = make_trainer(tmp_path, data, max_steps=5)
    out = again.train(resume_from_checkpoint=True)
    assert again.losses == {} and out.global_step == 5 and again.state.global_step == 5
    assert not (tmp_path / "checkpoint-6").exists()


def test_resume_refuses_an_incomplete_checkpoint_path_and_an_empty_folder(tmp_path):
    data = examples()
    (tmp_path / "checkpoint-2").mkdir()
    trainer = make_trainer(tmp_path, data)
    with pytest.raises(ValueError, match="incomplete"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_last_complete_checkpoint_orders_by_step_and_needs_the_marker(tmp_path):
    for step, complete in ((2, True), (10, True), (11, False), (9, True)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # 10 > 9 > 2
    assert last_complete_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoint-11" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path, require_marker=False) == str(
        tmp_path / "checkpoint-11"
    )


def test_commit_folder_replaces_atomically_and_staging_is_cleaned(tmp_path):
    final = tmp_path / "checkpoint-4"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged = tmp_path / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4"
    staged.mkdir(parents=True)
    (staged / "new.txt").write_text("new")
    commit_folder(staged, final)
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert (final / "new.txt").read_text() == "new"
    removed = remove_staging_folders(tmp_path)
    assert removed == [str(tmp_path / f"{STAGING_PREFIX}checkpoint-4")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        commit_folder(tmp_path / "nope", final)


def test_lora_checkpoints_reload_exactly_and_mismatches_fail_loudly(tmp_path):
    from modeling_segcompass.training.checkpointing import load_model_weights
    from modeling_segcompass.training.sft import apply_lora

    trainer = make_trainer(tmp_path, examples())
    apply_lora(trainer.model)
    trainer.train()
    restored = apply_lora(build_tiny_model(codebook_dropout=0.1))
    load_model_weights(restored, tmp_path / "checkpoint-6")
    for (name, param), (other, value) in zip(
        restored.named_parameters(), trainer.model.named_parameters(), strict=True
    ):
        assert name == other and torch.equal(param, value), name
    with pytest.raises(ValueError, match="with/without LoRA"):
        load_model_weights(build_tiny_model(), tmp_path / "checkpoint-6")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model_weights(build_tiny_model(), tmp_path)
