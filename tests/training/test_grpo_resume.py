"""SegCompassGRPOTrainer resume: a run killed at any point (even while writing a checkpoint)
continues from the last complete checkpoint exactly as the uninterrupted run
(training/grpo_resume.py)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback
from trl.trainer.utils import RepeatSampler

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.training.checkpointing import STAGING_PREFIX, is_complete_checkpoint
from modeling_segcompass.training.grpo_resume import ResumableRepeatSampler
from modeling_segcompass.training.grpo_trainer import SegCompassGRPOTrainer
from modeling_segcompass.training.rewards import format_reward, multi_object_mask_reward
from tests.training import test_grpo_trainer
from tests.training.test_grpo_trainer import grpo_args, tiny_model

world = test_grpo_trainer.world  # the module-scoped fixture: tokenizer, processor, dataset

RESUME_STEPS = 6
# 4 prompts, 2 per generation batch, every generation reused for 2 steps (num_iterations=2):
# 4 steps per epoch, generations at steps 1, 3, 5; checkpoint-3 lies inside a generation batch
# (step 4 trains on the buffered rollouts of step 3), checkpoint-4 ends epoch 0.


class Killed(Exception):
    """Stands for SIGKILL: the run stops, nothing after it runs."""


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after step {self.step}")


class RecordingGRPOTrainer(SegCompassGRPOTrainer):
    """Records, per optimiser step, the sampled completions and every reward function's rewards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts: dict[int, tuple[list[list[int]], torch.Tensor]] = {}

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        step = self.state.global_step + 1
        self.rollouts[step] = ([list(c) for c in completion_ids_list], rewards.detach().clone())
        return rewards


def even_token_share(completion_ids, **kwargs):
    """A reward that differs within groups, so the sampled tokens drive the policy gradient."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def resume_trainer(processor, dataset, output_dir, save_steps=None, callbacks=()):
    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer), codebook_dropout=0.1)
    args = grpo_args(
        output_dir,
        max_steps=RESUME_STEPS,
        num_iterations=2,
        beta=0.05,  # KL to a frozen copy of the initial model: resumed runs rebuild the same one
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        module_lr_multipliers={"codebook": 2.0},
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        reward_weights=[0.3, 0.7, 1.0],
    )
    return RecordingGRPOTrainer(
        model=SegCompassForReasoningSegmentation(config),
        reward_funcs=[format_reward, multi_object_mask_reward, even_token_share],
        args=args,
        train_dataset=dataset.select(range(4)),
        processing_class=processor,
        callbacks=list(callbacks),
    )


def step_logs(trainer):
    """{step: logged metrics} without the wall-clock ones."""
    return {
        h["step"]: {k: v for k, v in h.items() if "time" not in k and k != "step"}
        for h in trainer.state.log_history
        if "loss" in h
    }


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    processor, _, dataset = world
    trainer = resume_trainer(processor, dataset, tmp_path_factory.mktemp("grpo-full"))
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return step_logs(trainer), trainer.rollouts, params


def assert_same_logs(logs, ref_logs, steps):
    """Same metrics at every step: loss, rewards, KL, entropy, grad norm, learning rate, ..."""
    assert sorted(logs) == list(steps)
    for step, entry in logs.items():
        assert entry.keys() == ref_logs[step].keys(), step
        for key, value in entry.items():
            assert value == pytest.approx(ref_logs[step][key], rel=1e-5, abs=1e-7), (step, key)


def assert_same_continuation(resumed, reference, first_step):
    ref_logs, ref_rollouts, ref_params = reference
    # steps before `first_step` come from the checkpoint's log history, the others were run
    assert_same_logs(step_logs(resumed), ref_logs, range(1, RESUME_STEPS + 1))
    assert resumed.state.global_step == RESUME_STEPS
    # the same prompts, the same sampled tokens, the same rewards of every function
    generated = [s for s in ref_rollouts if s >= first_step]
    assert sorted(resumed.rollouts) == generated and generated
    for step in generated:
        assert resumed.rollouts[step][0] == ref_rollouts[step][0], step
        torch.testing.assert_close(resumed.rollouts[step][1], ref_rollouts[step][1], atol=0, rtol=0)
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, ref_params[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resume_inside_a_generation_batch_after_a_crash_while_writing(
    world, uninterrupted, tmp_path, monkeypatch
):
    """Killed while writing checkpoint-6: resume from checkpoint-3 reproduces steps 4-6."""
    processor, _, dataset = world
    first = resume_trainer(processor, dataset, tmp_path, save_steps=3)
    original = SegCompassGRPOTrainer._save_rng_state

    def crash_at_step_6(self, output_dir):
        if self.state.global_step == 6:
            raise Killed("killed while writing checkpoint-6")
        return original(self, output_dir)

    monkeypatch.setattr(SegCompassGRPOTrainer, "_save_rng_state", crash_at_step_6)
    with pytest.raises(Killed):
        first.train()
    monkeypatch.undo()
    # checkpointing does not change the run: it matches the run without checkpoints
    assert_same_logs(step_logs(first), uninterrupted[0], range(1, RESUME_STEPS + 1))
    folders = sorted(n for n in os.listdir(tmp_path) if (tmp_path / n).is_dir())
    assert folders == ["checkpoint-3", f"{STAGING_PREFIX}checkpoint-6"]
    checkpoint = tmp_path / "checkpoint-3"
    assert is_complete_checkpoint(checkpoint)
    assert (checkpoint / "grpo_state.pt").is_file()
    state = torch.load(checkpoint / "grpo_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["buffered_inputs"]) == 1  # step 4 reuses it
    # a checkpoint folder left half-written by a plain Trainer (no marker) is skipped too
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"partial")

    resumed = resume_trainer(processor, dataset, tmp_path, save_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert_same_continuation(resumed, uninterrupted, first_step=4)
    assert not any(n.startswith(STAGING_PREFIX) for n in os.listdir(tmp_path))
    assert is_complete_checkpoint(tmp_path / "checkpoint-6")


def test_resume_at_an_epoch_boundary_restores_the_vlm_and_the_data_order(
    world, uninterrupted, tmp_path
):
    """Killed after step 5, resumed from checkpoint-4 (end of epoch 0) by path."""
    processor, _, dataset = world
    first = resume_trainer(processor, dataset, tmp_path, save_steps=4, callbacks=[KillAfterStep(5)])
    with pytest.raises(Killed):
        first.train()
    checkpoint = tmp_path / "checkpoint-4"
    assert is_complete_checkpoint(checkpoint)

    resumed = resume_trainer(processor, dataset, tmp_path, save_steps=4)
    initial_vlm = resumed.model.vlm.lm_head.weight.detach().clone()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not torch.equal(resumed.model.vlm.lm_head.weight, initial_vlm)
    assert_same_continuation(resumed, uninterrupted, first_step=5)
    # epoch 1 shuffles the prompts differently from epoch 0 (the sampler's epoch was restored)
    ref_rollouts = uninterrupted[1]
    assert ref_rollouts[5][0] != ref_rollouts[1][0]


def test_resumable_sampler_yields_trls_order_for_every_epoch():
    trl_sampler = RepeatSampler(range(7), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5)
    ours = ResumableRepeatSampler(
        range(7), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5
    )
    epochs = [list(trl_sampler) for _ in range(4)]
    assert [list(ours) for _ in range(4)] == epochs  # counting passes, like TRL
    assert len({tuple(e) for e in epochs}) > 1
    fresh = ResumableRepeatSampler(
        range(7), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5
    )
    fresh.set_epoch(3)
    assert list(fresh) == epochs[3]  # a resumed trainer's sampler jumps to its epoch
    assert epochs[0][:4] == [epochs[0][0]] * 2 + [epochs[0][2]] * 2
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        fresh.set_epoch(-1)


def test_a_moving_reference_policy_is_checkpointed_and_restored(world, tmp_path):
    """sync_ref_model mixes the policy into the reference every step: resume restores it."""
    processor, _, dataset = world

    def trainer(callbacks=()):
        args = grpo_args(
            tmp_path, max_steps=2, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1,
            ref_model_mixup_alpha=0.5, save_strategy="steps", save_steps=1,
        )  # fmt: skip
        return SegCompassGRPOTrainer(
            model=tiny_model(processor), args=args, train_dataset=dataset,
            processing_class=processor, callbacks=list(callbacks),
        )  # fmt: skip

    first = trainer()
    first.train()
    assert (tmp_path / "checkpoint-1" / "ref_model" / "model.safetensors").is_file()
    resumed = trainer()
    initial = {n: p.clone() for n, p in resumed.ref_model.named_parameters()}
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    moved = [n for n, p in resumed.ref_model.named_parameters() if not torch.equal(p, initial[n])]
    assert any(n.startswith("vlm.") for n in moved)
    for (name, ref), other in zip(
        resumed.ref_model.named_parameters(), first.ref_model.parameters(), strict=True
    ):
        torch.testing.assert_close(ref, other, atol=1e-6, rtol=1e-5, msg=name)
