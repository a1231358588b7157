"""SFT: per-module learning rates, SegCompassTrainer, LoRA on the VLM + merge, train_sft."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.training.sft import (
    MODULE_NAMES,
    ModuleLearningRates,
    SegCompassTrainer,
    apply_lora,
    build_param_groups,
    has_lora,
    lora_target_modules,
    merge_lora,
    module_of_parameter,
    sft_training_arguments,
    train_sft,
)
from tests.helpers import build_tiny_model, make_batch

# SAM's attention has no rotary embedding: its key bias shifts all scores of a query
# equally, so softmax cancels it and its gradient is zero by construction.
NO_GRADIENT = ("k_proj.bias",)


def stack(examples):
    return {key: torch.cat([ex[key] for ex in examples]) for key in examples[0]}


def examples(config, n=4):
    objects = [[1], [2], [0], [3]]
    return [
        make_batch(config, [3], with_targets=True, num_objects=objects[i % 4], seed=i)
        for i in range(n)
    ]


def head_parameter_names(model):
    return {
        n
        for n, p in model.named_parameters()
        if p.requires_grad
        and not n.startswith("vlm.")
        and not (n.startswith("mask_decoder.") and n.endswith(NO_GRADIENT))
    }


# --------------------------------------------------------------------------- multipliers
def test_module_learning_rates_defaults_lie_in_the_published_ranges():
    paper = ModuleLearningRates.paper()
    assert paper == ModuleLearningRates()
    assert 25 <= paper.codebook <= 30 and 25 <= paper.slot_mapper <= 80
    assert paper.prompt_encoder == 10 and 5 <= paper.mask_decoder <= 10
    assert paper.vlm == paper.sae == paper.image_encoder == 1.0
    uniform = ModuleLearningRates.uniform()
    assert all(getattr(uniform, f.name) == 1.0 for f in dataclasses.fields(uniform))
    assert {f.name for f in dataclasses.fields(paper)} >= set(MODULE_NAMES)
    with pytest.raises(ValueError, match="codebook must be a finite number >= 0"):
        ModuleLearningRates(codebook=-1.0)
    with pytest.raises(KeyError, match="No learning-rate multiplier"):
        paper.multiplier("decoder")


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("codebook.slot_queries", "codebook"),
        ("vlm.model.language_model.layers.0.mlp.up_proj.weight", "vlm"),
        ("vlm.model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight", "lora"),
        ("base_model.model.slot_mapper.fuse.weight", "slot_mapper"),
        ("module.sae.W_enc", "sae"),
        ("extra_head.weight", "other"),
    ],
)
def test_module_of_parameter(name, module):
    assert module_of_parameter(name) == module


def test_param_groups_cover_every_trainable_parameter_once_with_its_lr():
    model = build_tiny_model()
    multipliers = ModuleLearningRates(codebook=30.0, slot_mapper=50.0, mask_decoder=7.0, sae=0.0)
    groups = build_param_groups(model, 2e-6, multipliers, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == {n for n in trainable if not n.startswith("sae.")}  # sae: multiplier 0
    assert not any(n.startswith("sae.") for n in seen)
    for group in groups:
        module = group["name"].split(".")[0]
        assert group["lr"] == pytest.approx(2e-6 * multipliers.multiplier(module))
        for param in group["params"]:
            assert module_of_parameter(names[id(param)]) == module
        if group["name"].endswith(".no_decay"):
            assert group["weight_decay"] == 0.0
        else:
            assert group["weight_decay"] == 0.1
            assert not any(
                names[id(p)].endswith(".bias") or "norm" in names[id(p)] for p in group["params"]
            )
    group_of = {names[id(p)]: g["name"] for g in groups for p in g["params"]}
    assert all(group_of[n].endswith(".no_decay") for n in group_of if n.endswith(".bias"))
    layer_norms = [
        f"{m}.weight"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.LayerNorm) and f"{m}.weight" in group_of
    ]
    assert layer_norms and all(group_of[n].endswith(".no_decay") for n in layer_norms)
    assert group_of["codebook.codebook"] == "codebook"
    by_name = {g["name"]: g for g in groups}
    assert by_name["codebook"]["lr"] == pytest.approx(6e-5)
    assert by_name["slot_mapper"]["lr"] == pytest.approx(1e-4)
    # frozen SAM parts (point embeddings) are not in any group
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(seen)


def test_param_groups_reject_bad_arguments():
    model = build_tiny_model()
    with pytest.raises(ValueError, match="base_lr must be a number > 0"):
        build_param_groups(model, 0.0)
    with pytest.raises(TypeError, match="ModuleLearningRates"):
        build_param_groups(model, 1e-3, {"codebook": 2.0})
    zero = ModuleLearningRates(**{f.name: 0.0 for f in dataclasses.fields(ModuleLearningRates)})
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_param_groups(model, 1e-3, zero)


def test_trainer_first_adamw_step_moves_each_module_by_its_own_lr(tmp_path):
    """AdamW's first update is lr * g / (|g| + eps) = lr * sign(g): the step is the group lr."""
    model = build_tiny_model().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = 1e-4
    multipliers = ModuleLearningRates(codebook=25.0, slot_mapper=40.0, prompt_encoder=10.0)
    args = sft_training_arguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=base,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_epsilon=1e-12,  # so that tiny gradients also take the full step
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = SegCompassTrainer(
        model=model,
        args=args,
        train_dataset=examples(model.config),
        data_collator=stack,
        module_learning_rates=multipliers,
    )
    trainer.train()
    assert trainer.model_accepts_loss_kwargs is False
    for prefix, module in (
        ("codebook.codebook", "codebook"),
        ("slot_mapper.", "slot_mapper"),
        ("prompt_encoder.mask_embed", "prompt_encoder"),
        ("vlm.model.language_model.layers.1.mlp", "vlm"),
    ):
        steps = torch.cat(
            [
                (p.detach() - before[n]).abs().flatten()
                for n, p in model.named_parameters()
                if n.startswith(prefix) and p.requires_grad
            ]
        )
        moved = steps[steps > 0]
        assert moved.numel() > 0, prefix
        expected = base * multipliers.multiplier(module)
        assert moved.median().item() == pytest.approx(expected, rel=1e-3), prefix
        assert moved.max().item() <= expected * (1 + 1e-4), prefix


# --------------------------------------------------------------------------- LoRA
def test_lora_targets_only_the_language_model_attention():
    model = build_tiny_model()
    names = lora_target_modules(model)
    assert len(names) == 2 * 4  # 2 layers x q/k/v/o
    assert all(".language_model.layers." in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ValueError, match="no nn.Linear named"):
        lora_target_modules(model, projections=("query_key_value",))


def test_lora_sft_trains_adapters_and_heads_not_the_vlm_and_merges_exactly(tmp_path):
    model = build_tiny_model()
    config = model.config
    data = examples(config)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(model)))
    assert has_lora(model) and isinstance(model, SegCompassForReasoningSegmentation)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable if n.startswith("vlm."))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = sft_training_arguments(
        str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=3e-3,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    result = train_sft(
        model,
        data,
        args=args,
        data_collator=stack,
        module_learning_rates=ModuleLearningRates.uniform(),
    )
    assert result.train_output.global_step == 3
    logged = [e for e in result.trainer.state.log_history if "loss" in e]
    assert {"lm_loss", "seg_loss", "conf_loss"} <= set(logged[0])
    unchanged_heads = [
        n for n in head_parameter_names(model) if torch.equal(model.get_parameter(n), before[n])
    ]
    assert not unchanged_heads
    lora_params = [n for n in trainable if ".lora_" in n]
    assert len(lora_params) == 2 * 8
    assert all(not torch.equal(model.get_parameter(n), before[n]) for n in lora_params)
    for name, param in model.named_parameters():
        if name.startswith("vlm.") and ".lora_" not in name:
            assert torch.equal(param, before[name]), name

    model.eval()
    batch = stack(data[:2])
    with torch.no_grad():
        lora_out = model(**batch)
    merged = merge_lora(model)
    assert merged is model and not has_lora(merged)
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    with torch.no_grad():
        merged_out = merged(**batch)
    for field in ("logits", "heatmap_logits", "mask_logits", "conf_logits"):
        torch.testing.assert_close(
            getattr(merged_out, field), getattr(lora_out, field), atol=1e-5, rtol=1e-5
        )
    # the loss goes through discrete steps (top-k selection, Hungarian matching) that a
    # 1e-7 change of the merged weights can flip on a tie: compare it loosely
    torch.testing.assert_close(merged_out.loss, lora_out.loss, atol=1e-3, rtol=1e-3)
    merged.save_pretrained(tmp_path / "export")
    reloaded = SegCompassForReasoningSegmentation.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        reloaded_out = reloaded(**batch)
    torch.testing.assert_close(reloaded_out.logits, merged_out.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        reloaded_out.mask_logits, merged_out.mask_logits, atol=1e-6, rtol=1e-6
    )


def test_apply_lora_refuses_vlm_modules_to_save_and_double_injection():
    model = build_tiny_model()
    targets = lora_target_modules(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        apply_lora(model, LoraConfig(r=2, target_modules=targets, modules_to_save=["lm_head"]))
    apply_lora(model, LoraConfig(r=2, target_modules=targets))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(r=2, target_modules=targets))
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        apply_lora(build_tiny_model(), {"r": 2})


# --------------------------------------------------------------------------- end to end
def test_train_sft_with_processor_and_synthetic_rows_lowers_the_loss(tmp_path):
    from modeling_segcompass.assembly.tokenizer_builder import build_tiny_tokenizer
    from modeling_segcompass.data.synthetic import (
        SyntheticWorldConfig,
        generate_examples,
        iter_texts,
    )
    from modeling_segcompass.processing_segcompass import SegCompassProcessor

    world = SyntheticWorldConfig(num_slots=3, seed=1)
    tokenizer = build_tiny_tokenizer(list(iter_texts(world, 64)), vocab_size=400)
    processor = SegCompassProcessor.tiny(tokenizer, num_slots=3)
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    rows = generate_examples(world, 4)
    args = sft_training_arguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=3e-3,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    result = train_sft(
        model,
        rows,
        processor=processor,
        args=args,
        eval_dataset=rows,
        module_learning_rates=ModuleLearningRates.uniform(),
    )
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert result.eval_metrics["eval_loss"] < losses[0]
    with pytest.raises(ValueError, match="needs `processor=`"):
        train_sft(model, rows, args=args)
