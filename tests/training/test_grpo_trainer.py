"""SegCompassGRPOTrainer: mask rewards from the scored completions, mask loss in the policy pass,
exact resume from atomic checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import TrainerCallback
from trl.trainer.utils import RepeatSampler

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.synthetic import SyntheticWorldConfig, generate_examples, iter_texts
from modeling_segcompass.processing_segcompass import SegCompassProcessor, build_prompt
from modeling_segcompass.training.checkpointing import STAGING_PREFIX, is_complete_checkpoint
from modeling_segcompass.training.grpo_trainer import (
    ResumableRepeatSampler,
    SegCompassGRPOConfig,
    SegCompassGRPOTrainer,
    build_grpo_dataset,
    grpo_row,
    module_param_groups,
)
from modeling_segcompass.training.rewards import format_reward, multi_object_mask_reward

REF_BIAS = 3.0  # makes <REF_POS> about 20x likelier when sampling, so some completions have one


@pytest.fixture(scope="module")
def world():
    config = SyntheticWorldConfig(num_slots=3, seed=2)
    tokenizer = build_tiny_tokenizer(list(iter_texts(config, 200)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    examples = generate_examples(config, 8)
    return processor, examples, build_grpo_dataset(examples, processor)


def tiny_model(processor) -> SegCompassForReasoningSegmentation:
    torch.manual_seed(0)
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer))
    return SegCompassForReasoningSegmentation(config)


def grpo_args(tmp_path, **overrides) -> SegCompassGRPOConfig:
    ref = 9  # <REF_POS> in the tiny tokenizer
    kwargs = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 20,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "gradient_checkpointing": False,
        "seed": 0,
        "generation_kwargs": {"sequence_bias": {(ref,): REF_BIAS}},
    }
    kwargs.update(overrides)
    return SegCompassGRPOConfig(**kwargs)


class Recorder:
    """A TRL reward function that records its keywords and rewards completion length.

    Its reward differs within a group, so advantages (and the policy gradient) are non-zero
    even while the untrained model's mask rewards tie.
    """

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, completions, completion_ids, **kwargs):
        self.calls.append({"completions": completions, "completion_ids": completion_ids, **kwargs})
        return [len(ids) / 20.0 for ids in completion_ids]


def forward_on(model, processor, image, instruction, completion_ids):
    """The model's masks for prompt + completion, built with the processor directly."""
    enc = processor(images=[image], instructions=[instruction])
    ids = torch.cat([enc["input_ids"], torch.tensor([completion_ids])], dim=1)
    with torch.no_grad():
        return model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            sam_pixel_values=enc["sam_pixel_values"],
            compute_logits=False,
        )


# --------------------------------------------------------------------------- data rows
def test_grpo_row_puts_masks_on_the_grid_and_asks_for_k_refs(world):
    processor, examples, dataset = world
    multi = next(e for e in examples if e["num_objects"] >= 2)
    row = grpo_row(multi, processor)
    expected = processor.prepare_masks(multi["masks"], multi["masks"].shape[1:])
    assert row["gt_masks"].shape == (3, 64, 64) and row["gt_masks"].dtype == np.uint8
    n = multi["num_objects"]
    np.testing.assert_array_equal(row["gt_masks"][:n], expected.numpy())
    assert not row["gt_masks"][n:].any()  # zero padding up to K
    assert row["num_objects"] == n and row["num_ref"] == 3
    text = row["prompt"][0]["content"][1]["text"]
    assert text == build_prompt(multi["instruction"], 3)
    assert len(dataset) == len(examples)


def test_grpo_row_no_target_and_mismatch(world):
    processor, examples, _ = world
    empty = dict(examples[0], masks=np.zeros((0, 64, 64), np.uint8), num_objects=0)
    row = grpo_row(empty, processor)
    assert row["num_objects"] == 0 and not row["gt_masks"].any()
    with pytest.raises(ValueError, match="num_objects=2 but the example has 0"):
        grpo_row(dict(empty, num_objects=2), processor)
    with pytest.raises(KeyError, match="masks"):
        grpo_row({"image": examples[0]["image"], "instruction": "x"}, processor)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seg_loss_weight", -1.0, "seg_loss_weight must be a number >= 0"),
        ("mask_reward", "dice", "mask_reward must be one of"),
        ("mask_loss_completions", "best", "mask_loss_completions must be one of"),
        ("module_lr_multipliers", {"codebook": -2.0}, "must be >= 0"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        grpo_args(tmp_path, **{field: value})


def test_config_defaults_follow_the_paper(tmp_path):
    args = SegCompassGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert args.num_generations == 8
    assert (args.format_reward_weight, args.mask_reward_weight) == (0.3, 0.7)
    assert (args.seg_loss_weight, args.conf_loss_weight) == (1.0, 0.2)
    assert args.mask_loss_in_policy_forward is True
    assert args.mask_loss_completions == "all"


def test_default_rewards_are_format_and_mask_at_paper_weights(world, tmp_path):
    processor, _, dataset = world
    trainer = SegCompassGRPOTrainer(
        model=tiny_model(processor),
        args=grpo_args(tmp_path),
        train_dataset=dataset,
        processing_class=processor,
    )
    assert trainer.reward_funcs == [format_reward, multi_object_mask_reward]
    assert trainer.reward_weights.tolist() == pytest.approx([0.3, 0.7])
    assert trainer.ref_model is None  # beta = 0: no reference model


def test_trainer_refuses_a_plain_tokenizer(world, tmp_path):
    processor, _, dataset = world
    with pytest.raises(TypeError, match="SegCompassProcessor"):
        SegCompassGRPOTrainer(
            model=tiny_model(processor),
            args=grpo_args(tmp_path),
            train_dataset=dataset,
            processing_class=processor.tokenizer,
        )


# --------------------------------------------------------------------------- rewards
def test_rewards_receive_the_masks_of_the_scored_completions(world, tmp_path):
    processor, examples, dataset = world
    model = tiny_model(processor)
    recorder = Recorder()
    trainer = SegCompassGRPOTrainer(
        model=model,
        reward_funcs=[format_reward, multi_object_mask_reward, recorder],
        args=grpo_args(tmp_path, reward_weights=[0.3, 0.7, 1.0]),
        train_dataset=dataset,
        processing_class=processor,
    )
    rows = [dataset[i] for i in (0, 0, 1, 1)]  # two prompts, G = 2
    batch = trainer._generate_and_score_completions(rows)
    (call,) = recorder.calls
    assert len(call["pred_mask_logits"]) == len(call["conf_logits"]) == 4
    assert call["num_ref"] == [3, 3, 3, 3]
    with_mask = 0
    for i, ids in enumerate(call["completion_ids"]):
        source = examples[0] if i < 2 else examples[1]
        direct = forward_on(model, processor, source["image"], source["instruction"], ids)
        refs = ids.count(processor.ref_token_id)
        pred, conf = call["pred_mask_logits"][i], call["conf_logits"][i]
        if refs == 0:
            assert pred is None  # no <REF_POS>: scored as an empty prediction
        else:
            with_mask += 1
            torch.testing.assert_close(pred, direct.mask_logits[0], atol=1e-5, rtol=1e-4)
        grounded = min(refs, 3)
        torch.testing.assert_close(conf[:grounded], direct.conf_logits[0, :grounded])
        assert torch.isneginf(conf[grounded:]).all()  # slots without a token are never kept
        assert torch.equal(
            call["gt_masks"][i], torch.as_tensor(np.asarray(rows[i]["gt_masks"])).float()
        )
        assert call["valid_mask"][i].shape == (64, 64)
    assert with_mask >= 1, "no completion had a <REF_POS>; raise REF_BIAS"
    # the batch carries the mask targets of the same rows, in order (before shuffling)
    assert batch["sam_pixel_values"].shape == (4, 3, 64, 64)
    assert batch["gt_masks"].shape == (4, 3, 64, 64)
    assert batch["num_objects"].tolist() == [rows[i]["num_objects"] for i in range(4)]
    # the prompt TRL rendered is exactly the processor's prompt
    enc = processor(images=[examples[0]["image"]], instructions=[examples[0]["instruction"]])
    prompt = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()]
    assert prompt.tolist() == enc["input_ids"][0].tolist()


# --------------------------------------------------------------------------- loss
def scored_batch(trainer, dataset, advantages):
    rows = [dataset[i] for i in (0, 0, 2, 2)]
    batch = trainer._generate_and_score_completions(rows)
    batch["advantages"] = torch.tensor(advantages)
    trainer.current_gradient_accumulation_steps = 1
    return batch


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_zero_mask_weights_give_the_plain_policy_loss(world, tmp_path):
    """With every mask weight 0 the loss (and its gradient) is GRPO's, computed by hand."""
    processor, _, dataset = world
    model = tiny_model(processor).train()
    args = grpo_args(
        tmp_path, seg_loss_weight=0.0, conf_loss_weight=0.0, sae_loss_weight=0.0, temperature=0.7
    )
    trainer = SegCompassGRPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor
    )
    advantages = [1.0, -1.0, 0.5, -0.5]
    batch = scored_batch(trainer, dataset, advantages)
    loss = trainer._compute_loss(model, batch)
    trainer_grads = grads_of(model, loss)

    # By hand: full logits, temperature, log-softmax; ratio exp(logp - logp.detach()) = 1.
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = batch["completion_mask"].float()
    out = model(
        input_ids=ids,
        attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        sam_pixel_values=batch["sam_pixel_values"],
    )
    c = ids.shape[1] - batch["prompt_ids"].shape[1]
    logps = (out.logits[:, -c - 1 : -1] / 0.7).log_softmax(-1)
    logps = logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logps - logps.detach())
    per_token = -ratio * torch.tensor(advantages).unsqueeze(1)
    expected = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(loss, expected)
    hand_grads = grads_of(model, expected)
    assert set(hand_grads) <= set(trainer_grads)
    for name in set(trainer_grads) - set(hand_grads):  # mask path, weighted by 0
        assert not trainer_grads[name].any(), name
    for name, grad in hand_grads.items():
        torch.testing.assert_close(trainer_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for n, g in hand_grads.items() if n.startswith("vlm."))


def test_mask_loss_comes_from_the_policy_forward(world, tmp_path):
    """total = policy + 1.0 seg + 0.2 conf + 0.1 sae, with ONE VLM pass; two passes agree."""
    processor, _, dataset = world
    model = tiny_model(processor).train()
    weights = {"seg_loss_weight": 1.0, "conf_loss_weight": 0.2, "sae_loss_weight": 0.1}
    trainer = SegCompassGRPOTrainer(
        model=model, args=grpo_args(tmp_path, **weights), train_dataset=dataset,
        processing_class=processor,
    )  # fmt: skip
    batch = scored_batch(trainer, dataset, [1.0, -1.0, 0.5, -0.5])
    passes = []
    handle = model.vlm.model.register_forward_hook(lambda *_: passes.append(1))
    try:
        total = trainer._compute_loss(model, batch)
        one_pass_calls = len(passes)
        one_pass_grads = grads_of(model, total)
        passes.clear()
        trainer.args.mask_loss_in_policy_forward = False
        two_pass = trainer._compute_loss(model, batch)
        two_pass_calls = len(passes)
        two_pass_grads = grads_of(model, two_pass)
        trainer.args.seg_loss_weight = trainer.args.conf_loss_weight = 0.0
        trainer.args.sae_loss_weight = 0.0
        policy = trainer._compute_loss(model, batch).detach()
    finally:
        handle.remove()
    assert (one_pass_calls, two_pass_calls) == (1, 2)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
            sam_pixel_values=batch["sam_pixel_values"], gt_masks=batch["gt_masks"],
            num_objects=batch["num_objects"], valid_mask=batch["valid_mask"],
        )  # fmt: skip
    expected = policy + 1.0 * out.seg_loss + 0.2 * out.conf_loss + 0.1 * out.sae_loss
    torch.testing.assert_close(total.detach(), expected.detach())
    torch.testing.assert_close(two_pass.detach(), total.detach())
    for name, grad in one_pass_grads.items():
        torch.testing.assert_close(two_pass_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    # mask-path modules learn from the mask loss
    for prefix in ("sae.", "codebook.", "slot_mapper.", "mask_decoder.", "prompt_encoder."):
        assert any(n.startswith(prefix) and g.abs().sum() > 0 for n, g in one_pass_grads.items())
    metrics = trainer._metrics["train"]
    assert metrics["seg_loss"][0] == pytest.approx(float(out.seg_loss), rel=1e-4)
    assert metrics["mask_loss"][0] == pytest.approx(float(expected - policy), rel=1e-4)
    assert metrics["mask_loss"][2] == 0.0  # all weights 0


def forward_rows(model, batch, rows):
    """A plain no-grad forward (with the mask targets) of the scored batch's `rows` alone;
    every row when `rows` is None."""
    rows = list(range(batch["prompt_ids"].shape[0])) if rows is None else rows
    index = torch.tensor(rows)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)[index]
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)[index]
    patches = batch["pixel_values"].shape[0] // batch["prompt_ids"].shape[0]
    pixels = torch.cat([batch["pixel_values"][r * patches : (r + 1) * patches] for r in rows])
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=attention, pixel_values=pixels,
            image_grid_thw=batch["image_grid_thw"][index],
            sam_pixel_values=batch["sam_pixel_values"][index],
            gt_masks=batch["gt_masks"][index], num_objects=batch["num_objects"][index],
            valid_mask=batch["valid_mask"][index],
        )  # fmt: skip


def test_mask_loss_above_group_mean_counts_only_completions_that_beat_their_group(world, tmp_path):
    """mask_loss_completions='above_group_mean': the segmentation loss is that of a forward
    on the advantage > 0 rows alone (0 with no such row); the confidence loss is every row's."""
    processor, _, dataset = world
    model = tiny_model(processor).train()
    weights = {"seg_loss_weight": 1.0, "conf_loss_weight": 0.2, "sae_loss_weight": 0.0}
    trainer = SegCompassGRPOTrainer(
        model=model,
        args=grpo_args(tmp_path, mask_loss_completions="above_group_mean", **weights),
        train_dataset=dataset, processing_class=processor,
    )  # fmt: skip
    batch = scored_batch(trainer, dataset, [1.0, -1.0, 0.5, -0.5])  # rows 0 and 2 beat their group
    total = trainer._compute_loss(model, batch).detach()
    trainer.args.seg_loss_weight = trainer.args.conf_loss_weight = 0.0
    policy = trainer._compute_loss(model, batch).detach()
    out, every = forward_rows(model, batch, [0, 2]), forward_rows(model, batch, None)
    assert not torch.isclose(out.conf_loss, every.conf_loss)  # the check can tell them apart
    torch.testing.assert_close(total, policy + out.seg_loss + 0.2 * every.conf_loss)
    assert trainer._metrics["train"]["mask_loss_fraction"][0] == 0.5
    # no completion beats its group (all advantages <= 0): only the confidence loss is left
    trainer.args.seg_loss_weight, trainer.args.conf_loss_weight = 1.0, 0.2
    batch["advantages"] = torch.tensor([0.0, -1.0, 0.0, -0.5])
    none_kept = trainer._compute_loss(model, batch).detach()
    trainer.args.seg_loss_weight = trainer.args.conf_loss_weight = 0.0
    plain = trainer._compute_loss(model, batch).detach()
    torch.testing.assert_close(none_kept, plain + 0.2 * every.conf_loss)


def test_conf_loss_not_below_group_mean_drops_only_completions_below_their_group(world, tmp_path):
    """conf_loss_completions='not_below_group_mean': the confidence loss is that of a forward
    on the advantage >= 0 rows (ties stay in), the segmentation loss stays every row's."""
    processor, _, dataset = world
    model = tiny_model(processor).train()
    weights = {"seg_loss_weight": 1.0, "conf_loss_weight": 0.2, "sae_loss_weight": 0.0}
    trainer = SegCompassGRPOTrainer(
        model=model,
        args=grpo_args(tmp_path, conf_loss_completions="not_below_group_mean", **weights),
        train_dataset=dataset, processing_class=processor,
    )  # fmt: skip
    batch = scored_batch(trainer, dataset, [0.0, -1.0, 0.5, -0.5])  # rows 0 (a tie) and 2 stay
    total = trainer._compute_loss(model, batch).detach()
    trainer.args.seg_loss_weight = trainer.args.conf_loss_weight = 0.0
    policy = trainer._compute_loss(model, batch).detach()
    kept, every = forward_rows(model, batch, [0, 2]), forward_rows(model, batch, None)
    assert not torch.isclose(kept.conf_loss, every.conf_loss)  # the check can tell them apart
    torch.testing.assert_close(total, policy + every.seg_loss + 0.2 * kept.conf_loss)
    assert trainer._metrics["train"]["conf_loss_fraction"][0] == 0.5
    # every completion below its group's mean: no confidence loss is left
    trainer.args.seg_loss_weight, trainer.args.conf_loss_weight = 1.0, 0.2
    batch["advantages"] = torch.tensor([-0.1, -1.0, -0.2, -0.5])
    none_kept = trainer._compute_loss(model, batch).detach()
    trainer.args.seg_loss_weight = trainer.args.conf_loss_weight = 0.0
    plain = trainer._compute_loss(model, batch).detach()
    torch.testing.assert_close(none_kept, plain + every.seg_loss)
    with pytest.raises(ValueError, match="conf_loss_completions"):
        grpo_args(tmp_path, conf_loss_completions="best")


# --------------------------------------------------------------------------- training
def test_grpo_steps_change_every_trainable_parameter(world, tmp_path):
    processor, _, dataset = world
    model = tiny_model(processor)
    recorder = Recorder()
    trainer = SegCompassGRPOTrainer(
        model=model,
        reward_funcs=[format_reward, multi_object_mask_reward, recorder],
        args=grpo_args(tmp_path, max_steps=3, reward_weights=[0.3, 0.7, 1.0]),
        train_dataset=dataset,
        processing_class=processor,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    # SAM's attention key bias shifts every score of a query equally: zero gradient by design.
    exempt = {n for n in before if n.startswith("mask_decoder.") and n.endswith("k_proj.bias")}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    unchanged = [
        n for n in trainable if n not in exempt and torch.equal(model.get_parameter(n), before[n])
    ]
    assert not unchanged, f"parameters that did not learn: {unchanged}"
    for prefix in ("vlm.", "sae.", "codebook.", "slot_mapper.", "mask_decoder.", "image_encoder."):
        assert any(n.startswith(prefix) for n in trainable)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[name]), name
    assert len(recorder.calls) == 3
    assert all(len(c["pred_mask_logits"]) == 4 for c in recorder.calls)
    logs = [h for h in trainer.state.log_history if "mask_loss" in h]
    assert len(logs) == 3 and all(np.isfinite(h["mask_loss"]) and h["mask_loss"] > 0 for h in logs)
    assert all("rewards/multi_object_mask_reward/mean" in h for h in logs)


def test_beta_uses_a_frozen_copy_as_reference(world, tmp_path):
    processor, _, dataset = world
    model = tiny_model(processor)
    trainer = SegCompassGRPOTrainer(
        model=model,
        reward_funcs=[format_reward, multi_object_mask_reward, Recorder()],
        args=grpo_args(tmp_path, beta=0.1, max_steps=2, reward_weights=[0.3, 0.7, 1.0]),
        train_dataset=dataset,
        processing_class=processor,
    )
    ref = trainer.ref_model
    assert ref is not None and ref is not model and trainer.beta == 0.1
    assert not any(p.requires_grad for p in ref.parameters())
    initial = {n: p.clone() for n, p in ref.named_parameters()}
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 2
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # reference == policy before the first update
    assert kl[1] > 0.0  # the policy moved away from the frozen reference
    assert all(torch.equal(p, initial[n]) for n, p in ref.named_parameters())
    assert not torch.equal(model.vlm.lm_head.weight, ref.vlm.lm_head.weight)


# --------------------------------------------------------------------------- optimiser
def test_module_param_groups_longest_prefix_wins(world):
    processor, _, _ = world
    model = tiny_model(processor)
    groups = module_param_groups(
        model, 1e-3, {"codebook": 25.0, "slot_mapper": 10.0, "slot_mapper.conf_head": 2.0}
    )
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable parameter exactly once
    for name in trainable:
        lr = lr_of[id(named[name])]
        if name.startswith("codebook."):
            assert lr == pytest.approx(0.025)
        elif name.startswith("slot_mapper.conf_head."):
            assert lr == pytest.approx(0.002)
        elif name.startswith("slot_mapper."):
            assert lr == pytest.approx(0.01)
        else:
            assert lr == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"\['codebok'\] match no trainable parameter"):
        module_param_groups(model, 1e-3, {"codebok": 2.0})


def test_trainer_optimizer_uses_module_multipliers(world, tmp_path):
    processor, _, dataset = world
    args = grpo_args(tmp_path, module_lr_multipliers={"mask_decoder": 5.0}, learning_rate=2e-4)
    trainer = SegCompassGRPOTrainer(
        model=tiny_model(processor), args=args, train_dataset=dataset, processing_class=processor
    )
    optimizer = trainer.create_optimizer()
    rates = sorted({g["lr"] for g in optimizer.param_groups})
    assert rates == pytest.approx([2e-4, 1e-3])


# --------------------------------------------------------------------------- resume
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
