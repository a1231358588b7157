"""LoRA round trips through PEFT's own loader: adapters and trained heads come back exactly."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_segcompass import SegCompassForReasoningSegmentation
from modeling_segcompass.training.lora import (
    HEAD_MODULES,
    apply_lora,
    default_lora_config,
    lora_target_modules,
    save_lora_adapter,
)
from tests.helpers import build_tiny_model, make_batch

OUTPUTS = ("logits", "heatmap_logits", "conf_logits", "mask_logits", "iou_scores")


@torch.no_grad()
def perturb_trainable(model: torch.nn.Module) -> set[str]:
    """Stand-in for training: move every trainable parameter; returns their names."""
    generator = torch.Generator().manual_seed(1)
    names = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
            names.add(name)
    return names


def assert_same_outputs(a, b):
    for field in OUTPUTS:
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    build_tiny_model().save_pretrained(folder)
    return folder


def fresh_base(folder):
    return SegCompassForReasoningSegmentation.from_pretrained(folder).eval()


def test_peft_model_with_the_default_config_saves_and_restores_the_trained_heads(
    base_folder, tmp_path
):
    base = fresh_base(base_folder)
    peft_model = get_peft_model(base, default_lora_config(base, r=4, lora_alpha=8))
    trained = perturb_trainable(peft_model)
    # the heads train next to the adapters (not only the adapters)
    for head in ("sae", "codebook", "slot_mapper", "prompt_encoder", "mask_decoder"):
        assert any(f".{head}." in f".{name}" for name in trained), head
    peft_model.save_pretrained(tmp_path / "adapter")

    batch = make_batch(base.config, [1, 2])
    restored = PeftModel.from_pretrained(fresh_base(base_folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_same_outputs(peft_model.eval()(**batch), restored(**batch))
        # and the heads really moved: the untouched base gives other masks
        untouched = fresh_base(base_folder)(**batch)
    assert not torch.equal(untouched.mask_logits, restored(**batch).mask_logits)


def test_injected_lora_saves_a_peft_folder_that_restores_the_model_exactly(base_folder, tmp_path):
    # the base weights equal those in `base_folder`; built in memory, as a training run holds
    # them (weights read straight from a file can sit at addresses whose alignment changes
    # the float summation order of some CPU kernels, in the last bit)
    model = build_tiny_model()
    apply_lora(model, default_lora_config(model))
    perturb_trainable(model)
    heads = save_lora_adapter(model, tmp_path / "adapter")
    assert set(heads) == {h for h in HEAD_MODULES if getattr(model, h) is not None}
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == heads
    assert all(name.startswith("vlm.") for name in saved["target_modules"])

    batch = make_batch(model.config, [1, 2])
    restored = PeftModel.from_pretrained(fresh_base(base_folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model.eval()(**batch)
        assert_same_outputs(expected, restored(**batch))
        # merging the restored PeftModel gives a plain model with the trained heads
        merged = restored.merge_and_unload()
        assert isinstance(merged, SegCompassForReasoningSegmentation)
        out = merged(**batch)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mask_logits, expected.mask_logits, atol=1e-5, rtol=1e-5)


def test_save_lora_adapter_names_the_fix_for_a_model_without_adapters(tmp_path):
    model = build_tiny_model()
    targets = lora_target_modules(model)
    with pytest.raises(ValueError, match="apply_lora"):
        save_lora_adapter(model, tmp_path / "a")
    apply_lora(model, LoraConfig(r=2, target_modules=targets))
    with pytest.raises(ValueError, match="not heads of this model"):
        save_lora_adapter(model, tmp_path / "a", heads=["vlm"])
    wrapped = get_peft_model(build_tiny_model(), LoraConfig(r=2, target_modules=targets))
    with pytest.raises(TypeError, match="save_pretrained"):
        save_lora_adapter(wrapped, tmp_path / "b")


def test_apply_lora_takes_heads_in_modules_to_save_and_refuses_vlm_modules():
    model = build_tiny_model()
    config = default_lora_config(model)
    assert set(config.modules_to_save) == {h for h in HEAD_MODULES if getattr(model, h) is not None}
    with pytest.raises(ValueError, match="may name only the heads"):
        apply_lora(model, LoraConfig(r=2, target_modules=config.target_modules, modules_to_save=["lm_head"]))  # fmt: skip
    apply_lora(model, config)
    assert config.modules_to_save  # the caller's config is left as it was
    heads = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vlm.")}
    assert any(n.startswith("sae.") for n in heads)


def test_setup_py_asks_for_a_peft_that_round_trips_the_heads():
    """peft 0.18 / 0.19 fail the round trip above (a head called with keyword arguments);
    0.17 does not import under transformers 5."""
    import importlib.metadata
    import re
    from pathlib import Path

    from packaging.requirements import Requirement

    setup_text = (Path(__file__).parents[2] / "setup.py").read_text()
    (line,) = re.findall(r'"(peft[^"]*)"', setup_text)
    requirement = Requirement(line)
    assert not requirement.specifier.contains("0.19.1")
    assert requirement.specifier.contains("0.20.0")
    assert requirement.specifier.contains(importlib.metadata.version("peft"))


def test_a_folder_saved_with_lora_injected_names_the_fix_when_loaded(tmp_path):
    model = build_tiny_model()
    apply_lora(model, default_lora_config(model))
    model.save_pretrained(tmp_path)  # what a Trainer checkpoint holds: resumable as it is
    with pytest.raises(ValueError, match=r"LoRA adapters injected.*merge_lora.*save_lora_adapter"):
        SegCompassForReasoningSegmentation.from_pretrained(tmp_path)
