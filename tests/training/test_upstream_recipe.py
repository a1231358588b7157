"""The authors' optimisation recipe: module rates, OneCycle schedule, freezing, GRPO preset,
format rule on the full grid, all against re-implementations written here from reading
upstream SegCompass (github.com/ZhenyuLU-Heliodore/SegCompass: verl/workers/fsdp_workers.py,
verl/utils/reward_score/rseg_cot.py, scripts/train/*/gref_*_n8.sh, scripts/initial.yaml)."""

from __future__ import annotations

import random
import re
import types

import pytest
import torch

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation, losses
from modeling_segcompass.answer_format import upstream_format_score
from modeling_segcompass.training.grpo_trainer import SegCompassGRPOConfig, SegCompassGRPOTrainer
from modeling_segcompass.training.rewards import upstream_format_reward
from modeling_segcompass.training.sft import (
    ModuleLearningRates,
    SegCompassTrainer,
    build_param_groups,
    sft_training_arguments,
)
from modeling_segcompass.training.upstream_recipe import (
    UPSTREAM_BASE_LR,
    freeze_like_upstream,
    one_cycle_cosine_factor,
    one_cycle_cosine_scheduler,
)
from tests.helpers import build_tiny_config, build_tiny_model, make_batch
from tests.training.test_grpo_trainer import Recorder, grpo_args, world  # noqa: F401 (fixture)


def five_layer_model(sae_layer: int = 1) -> SegCompassForReasoningSegmentation:
    config = build_tiny_config(sae_layer=sae_layer)
    config.vlm_config.text_config.num_hidden_layers = 5
    config.vlm_config.text_config.layer_types = ["full_attention"] * 5
    torch.manual_seed(0)
    return SegCompassForReasoningSegmentation(config)


# --------------------------------------------------------------------------- learning rates
def test_upstream_multipliers_and_groups():
    rates = ModuleLearningRates.upstream()
    assert (rates.vlm, rates.codebook, rates.slot_mapper) == (1.0, 30.0, 25.0)
    assert (rates.prompt_encoder, rates.mask_decoder) == (10.0, 5.0)
    assert rates.sae == rates.image_encoder == 0.0  # frozen: SAE during RL, cached SAM embeddings
    model = five_layer_model()
    groups = build_param_groups(model, UPSTREAM_BASE_LR, rates, 0.01)
    lrs = {g["name"].split(".")[0]: g["lr"] for g in groups}
    assert lrs["codebook"] == pytest.approx(30 * 1.6e-6)
    assert lrs["slot_mapper"] == pytest.approx(25 * 1.6e-6)
    assert lrs["prompt_encoder"] == pytest.approx(10 * 1.6e-6)
    assert lrs["mask_decoder"] == pytest.approx(5 * 1.6e-6)
    assert lrs["vlm"] == pytest.approx(1.6e-6)
    assert "sae" not in lrs and "image_encoder" not in lrs


@pytest.mark.parametrize("total", [1, 7, 300])
def test_one_cycle_factor_matches_torch_one_cycle_with_upstream_settings(total):
    """Upstream builds torch's OneCycleLR(total_steps=T + 1, pct_start=0, div_factor=1,
    anneal 'cos', final_div_factor=6.7) and steps it after every update."""
    param = torch.nn.Parameter(torch.zeros(1))
    peaks = [1.6e-6 * 30, 1.6e-6]
    opt = torch.optim.AdamW([{"params": [param], "lr": peaks[0]}, {"params": [], "lr": peaks[1]}])
    upstream = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peaks, total_steps=total + 1, pct_start=0.0, anneal_strategy="cos",
        div_factor=1.0, final_div_factor=6.7, cycle_momentum=False,
    )  # fmt: skip
    param2 = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.AdamW([{"params": [param2], "lr": peaks[0]}, {"params": [], "lr": peaks[1]}])
    ours = one_cycle_cosine_scheduler(opt2, total)
    worst = 0.0
    for step in range(total):
        for g_up, g_ours in zip(opt.param_groups, opt2.param_groups):
            worst = max(worst, abs(g_up["lr"] - g_ours["lr"]) / g_up["max_lr"])
        assert one_cycle_cosine_factor(step, total) * peaks[1] == pytest.approx(
            opt.param_groups[1]["lr"], rel=1e-9
        )
        opt.step(), opt2.step()
        upstream.step(), ours.step()
    assert worst < 1e-12, worst  # relative to the peak


def test_freeze_like_upstream_trains_the_layers_after_the_hook_and_the_heads():
    model = five_layer_model(sae_layer=1)  # SAE input = hidden_states[2] = upstream hook_layer 2
    summary = freeze_like_upstream(model)
    assert summary["first_trainable_layer"] == 3  # upstream unfreezes layers[hook_layer + 1:]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vlm = {n for n in trainable if n.startswith("vlm.")}
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in vlm}
    assert layers == {3, 4} and all(".layers." in n for n in vlm)  # no embeddings/norm/lm_head
    heads = {n.split(".")[0] for n in trainable} - {"vlm"}
    assert heads == {"codebook", "slot_mapper", "prompt_encoder", "mask_decoder"}
    assert summary["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    freeze_like_upstream(model, train_sae=True)
    assert all(p.requires_grad for p in model.sae.parameters())


def test_sft_trainer_sets_the_step_for_the_loss_schedule_and_runs_one_cycle(tmp_path, monkeypatch):
    seen = []
    weights = losses.segmentation_loss_weights

    def spy(config, step=None):
        seen.append(step)
        return weights(config, step)

    monkeypatch.setattr(losses, "segmentation_loss_weights", spy)
    model = build_tiny_model(loss_schedule_step=2, mask_focal_weight_after=5.0).train()
    rows = [
        make_batch(model.config, [3], with_targets=True, num_objects=[1], seed=i) for i in range(3)
    ]
    args = sft_training_arguments(
        str(tmp_path), per_device_train_batch_size=1, max_steps=3, learning_rate=1e-3,
        save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = SegCompassTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=lambda ex: {k: torch.cat([e[k] for e in ex]) for k in ex[0]},
        module_learning_rates=ModuleLearningRates.uniform(),
        one_cycle_final_div_factor=6.7,
    )
    trainer.train()
    assert seen == [0, 1, 2]  # the Trainer's global_step before each update
    assert model.training_step == 2
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * one_cycle_cosine_factor(3, 3))  # the schedule's end


# --------------------------------------------------------------------------- GRPO preset
def test_grpo_upstream_preset(tmp_path):
    args = SegCompassGRPOConfig.upstream(str(tmp_path), use_cpu=True, bf16=False)
    assert (args.num_generations, args.epsilon, args.temperature) == (8, 0.2, 1.0)
    assert args.beta == 0.2  # the launch scripts' kl_loss_coef (the yaml's 5e-3 is overridden)
    assert args.loss_type == "bnpo"  # token mean over the micro-batch, as verl's masked_mean
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (1.6e-6, 0.01, 1.0)
    assert args.one_cycle_final_div_factor == 6.7
    assert (args.seg_loss_weight, args.conf_loss_weight, args.sae_loss_weight) == (0.3, 0.2, 0.0)
    assert args.format_reward_rule == "upstream" and args.reward_on_full_grid
    rates = ModuleLearningRates.upstream()
    for prefix, value in args.module_lr_multipliers.items():
        assert getattr(rates, prefix) == value
    assert SegCompassGRPOConfig.upstream(str(tmp_path), use_cpu=True, beta=5e-3).beta == 5e-3
    with pytest.raises(ValueError, match="format_reward_rule"):
        SegCompassGRPOConfig.upstream(str(tmp_path), use_cpu=True, format_reward_rule="x")
    with pytest.raises(ValueError, match="one_cycle_final_div_factor"):
        SegCompassGRPOConfig.upstream(str(tmp_path), use_cpu=True, one_cycle_final_div_factor=0.5)


def test_grpo_trainer_builds_the_one_cycle_scheduler(tmp_path):
    args = SegCompassGRPOConfig.upstream(str(tmp_path), use_cpu=True, bf16=False)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    fake = types.SimpleNamespace(args=args, lr_scheduler=None, optimizer=optimizer)
    scheduler = SegCompassGRPOTrainer.create_scheduler(fake, 10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(one_cycle_cosine_factor(0, 10))


def test_upstream_grpo_step_scores_the_full_grid_and_keeps_the_frozen_parts(world, tmp_path):  # noqa: F811
    processor, _, dataset = world
    config = SegCompassConfig.tiny(vocab_size=len(processor.tokenizer))
    config.vlm_config.text_config.num_hidden_layers = 3
    config.vlm_config.text_config.layer_types = ["full_attention"] * 3
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(config)
    freeze_like_upstream(model)  # sae_layer 0: decoder layer 2 trains
    recorder = Recorder()
    tiny = grpo_args(tmp_path, max_steps=1).to_dict()
    keep = ("use_cpu", "bf16", "report_to", "per_device_train_batch_size", "max_completion_length",
            "max_steps", "logging_steps", "save_strategy", "gradient_checkpointing", "seed",
            "generation_kwargs")  # fmt: skip
    args = SegCompassGRPOConfig.upstream(
        str(tmp_path), num_generations=2, learning_rate=1e-3, **{k: tiny[k] for k in keep}
    )
    trainer = SegCompassGRPOTrainer(
        model=model,
        reward_funcs=[upstream_format_reward, recorder],
        args=args,
        train_dataset=dataset,
        processing_class=processor,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    (call,) = recorder.calls
    assert all(v is None for v in call["valid_mask"])  # rewards on the full grid
    assert model.training_step == 0  # the loss schedule saw the first update as step 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[name]), name
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert any(n.startswith("codebook.") for n in moved)
    assert any(".layers.2." in n for n in moved)
    # the first update ran at the one-cycle rate of step 0, the scheduler now at step 1
    lrs = {g["lr"] for g in trainer.optimizer.param_groups}
    assert min(lrs) == pytest.approx(1e-3 * one_cycle_cosine_factor(1, 1))


# --------------------------------------------------------------------------- format rule
def reference_format(tokens: str) -> float:
    """The rule of rseg_cot.format_reward, re-written here with regular expressions."""
    blocks = list(re.finditer(r"<think>(.*?)</think>", tokens, flags=re.DOTALL))
    if len(blocks) != 1 or not re.search(r"\S", blocks[0].group(1)):
        return 0.0
    if tokens.count("<REF_POS>") != 1 or tokens.find("<REF_POS>") < blocks[0].end():
        return 0.0
    ref = tokens.find("<REF_POS>")
    penalised = (
        len(blocks[0].group(1)) > 2048
        or re.search(r"\S", tokens[: blocks[0].start()]) is not None
        or len(tokens[blocks[0].end() : ref].split()) > 10
    )
    return 0.9 if penalised else 1.0


DOCUMENTED = [
    ("<think>red circle</think> <REF_POS>", 1.0),
    ("<think>red circle</think> the red one <REF_POS>", 1.0),
    ("Sure. <think>red circle</think><REF_POS>", 0.9),
    ("<think>" + "x" * 2049 + "</think><REF_POS>", 0.9),
    ("<think>a</think> one two three four five six seven eight nine ten eleven <REF_POS>", 0.9),
    ("<think>a</think><REF_POS> trailing text is free", 1.0),
    ("<think> </think><REF_POS>", 0.0),
    ("<think>a</think>", 0.0),
    ("<think>a</think><REF_POS><REF_POS>", 0.0),  # K > 1 slots: upstream still wants one
    ("<REF_POS><think>a</think>", 0.0),
    ("<think>a<REF_POS></think>", 0.0),
    ("<think>a</think><think>b</think><REF_POS>", 0.0),
    ("<think>a<think>b</think><REF_POS>", 1.0),  # one non-greedy block holding a stray tag
    ("<think>a</think></think><REF_POS>", 1.0),  # the stray close is text between
    ("no tags at all", 0.0),
]


@pytest.mark.parametrize("text, score", DOCUMENTED)
def test_upstream_format_documented_cases(text, score):
    assert reference_format(text) == score
    assert upstream_format_score(text) == score


def test_upstream_format_random_completions():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<REF_POS>", " ", "a", "red circle", "\n", "x" * 700,
              " w" * 6, "Sure."]  # fmt: skip
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += [
        f"<think>{rng.choice(pieces)}</think>{rng.choice(pieces)}<REF_POS>" for _ in range(300)
    ]
    diffs = [t for t in texts if upstream_format_score(t) != reference_format(t)]
    assert not diffs, diffs[:5]
    assert upstream_format_reward(texts[:4]) == [reference_format(t) for t in texts[:4]]
