"""The Qwen2.5-VL vision tower with equal-length windows batched into one attention call
gives transformers' per-window numbers, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
from modeling_segcompass.vlm_states import _runs, batch_vision_windows


def per_window_copy(model: SegCompassForReasoningSegmentation):
    """A copy of the model's vision tower with transformers' own attention class back."""
    tower = copy.deepcopy(model.vlm.model.visual)
    for module in tower.modules():
        if isinstance(module, qwen.Qwen2_5_VLVisionAttention):
            module.__class__ = qwen.Qwen2_5_VLVisionAttention
    return tower


def tower_output(tower, pixel_values, grid_thw):
    out = tower(pixel_values, grid_thw=grid_thw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize(
    "grids",
    [
        [[1, 8, 8]] * 3,  # the tiny default's images: every window the same length
        [[1, 8, 8], [1, 6, 10], [1, 4, 4]],  # edge windows shorter: runs of several lengths
    ],
)
def test_batched_windows_equal_transformers_per_window_attention(grids):
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=64)).train()
    attentions = [m for m in model.vlm.modules() if isinstance(m, qwen.Qwen2_5_VLVisionAttention)]
    assert attentions and all(
        type(m).__name__ == "WindowBatchedVisionAttention" for m in attentions
    )
    reference = per_window_copy(model)
    thw = torch.tensor(grids)
    patch_dim = 3 * 2 * 8 * 8  # channels x temporal patch x patch x patch
    pixels = torch.randn(int(thw.prod(-1).sum()), patch_dim)
    got = tower_output(model.vlm.model.visual, pixels, thw)
    want = tower_output(reference, pixels, thw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    weight = torch.randn_like(want)
    grads = torch.autograd.grad((got * weight).sum(), list(model.vlm.model.visual.parameters()))
    ref_grads = torch.autograd.grad((want * weight).sum(), list(reference.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_runs_group_consecutive_equal_lengths_and_drop_empty_windows():
    assert _runs([4, 4, 4, 2, 0, 2, 4]) == [(4, 3), (2, 2), (4, 1)]
    assert _runs([]) == []


def test_other_attention_implementations_keep_transformers_forward():
    torch.manual_seed(0)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=64)).eval()
    tower = model.vlm.model.visual
    tower.config._attn_implementation = "eager"
    reference = per_window_copy(model)
    thw = torch.tensor([[1, 6, 10]])
    pixels = torch.randn(60, 3 * 2 * 8 * 8)
    with torch.no_grad():  # bitwise: eager attention, not the batched sdpa call
        assert torch.equal(tower_output(tower, pixels, thw), tower_output(reference, pixels, thw))
    assert batch_vision_windows(torch.nn.Linear(2, 2)) == 0  # not a Qwen2.5-VL: unchanged
