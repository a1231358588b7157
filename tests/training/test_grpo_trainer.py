"""SegCompassGRPOTrainer: mask rewards from the scored completions, mask loss in the policy pass,
exact resume from atomic checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
from modeling_segcompass.data.synthetic import SyntheticWorldConfig, generate_examples, iter_texts
from modeling_segcompass.processing_segcompass import SegCompassProcessor, build_prompt
from modeling_segcompass.training.grpo_data import with_array_masks
from modeling_segcompass.training.grpo_trainer import (
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


def test_dataset_hands_the_masks_back_as_arrays_and_the_trainer_formats_a_plain_dataset(
    world, tmp_path
):
    from datasets import Dataset

    processor, examples, dataset = world
    rows = dataset.__getitems__([0, 1])  # the batch form the trainer's data loader fetches
    for i, row in enumerate(rows):
        assert isinstance(row["gt_masks"], np.ndarray)  # not G*M*M nested Python ints
        np.testing.assert_array_equal(row["gt_masks"], grpo_row(examples[i], processor)["gt_masks"])
        assert row["prompt"][0]["role"] == "user" and row["num_ref"] == 3
    # a user's own Dataset.from_list (no format) gets the same reading inside the trainer
    plain = Dataset.from_list([grpo_row(ex, processor) for ex in examples])
    assert isinstance(plain[0]["gt_masks"], list)
    trainer = SegCompassGRPOTrainer(
        model=tiny_model(processor),
        args=grpo_args(tmp_path),
        train_dataset=plain,
        eval_dataset=plain,
        processing_class=processor,
    )
    for formatted in (trainer.train_dataset, trainer.eval_dataset):
        assert isinstance(formatted[0]["gt_masks"], np.ndarray)
    # a format the caller chose is kept
    assert with_array_masks(plain.with_format("torch")).format["type"] == "torch"


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


def test_the_config_and_the_resume_parts_import_from_their_old_paths():
    import modeling_segcompass
    from modeling_segcompass.training import grpo_config, grpo_data, grpo_resume, grpo_trainer

    assert grpo_trainer.SegCompassGRPOConfig is grpo_config.SegCompassGRPOConfig
    assert modeling_segcompass.SegCompassGRPOConfig is grpo_config.SegCompassGRPOConfig
    assert grpo_trainer.ResumableRepeatSampler is grpo_resume.ResumableRepeatSampler
    assert grpo_trainer.grpo_row is grpo_data.grpo_row
    assert grpo_trainer.GRPO_STATE_NAME == "grpo_state"


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
        # the format reward reads the answer parsed from the ids: <REF_POS> counted by id
        assert call["answer"][i].num_ref == refs
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
    assert trainer._policy_forward is None  # the capture lives for one loss call only
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
