"""interpret/edits.py: the measures of how far an edit moved a slot, by hand."""

from __future__ import annotations

import pytest
import torch

from modeling_segcompass.interpret.edits import _changes, _soft_iou
from modeling_segcompass.modeling_segcompass import SegCompassOutput


def _soft_iou_by_hand(p, q):
    return float(torch.minimum(p, q).sum() / torch.maximum(p, q).sum())


def test_change_measures_match_hand_computed_values():
    """The continuous measures on a 2 x 2 grid, by hand."""
    before = SegCompassOutput(
        mask_logits=torch.tensor([[[[-1.0, 2.0], [-30.0, 0.5]]]]),
        heatmap_logits=torch.zeros(1, 1, 2, 2),
        conf_logits=torch.zeros(1, 1),
    )
    after = torch.tensor([[[[-2.0, 3.0], [-20.0, -0.5]]]])
    valid = torch.tensor([[[True, True], [True, False]]])  # the last pixel is padding
    moved = _changes(before, after, torch.ones(1, 1, 2, 2), torch.zeros(1, 1), [0], valid, 0.0)
    # binary: {(0,1)} before and after on the valid area -> IoU 1
    assert float(moved["mask_change"]) == 0.0
    assert float(moved["mask_logit_change"]) == pytest.approx((1 + 1 + 10) / 3)
    p = torch.sigmoid(torch.tensor([-1.0, 2.0, -30.0], dtype=torch.float64))
    q = torch.sigmoid(torch.tensor([-2.0, 3.0, -20.0], dtype=torch.float64))
    assert float(moved["soft_mask_change"]) == pytest.approx(1 - _soft_iou_by_hand(p, q), rel=1e-5)
    assert float(moved["prob_change"]) == pytest.approx(float((p - q).abs().mean()), rel=1e-5)
    assert float(moved["heatmap_change"]) == pytest.approx(1.0)
    # soft IoU of 0/1 maps is the binary IoU
    a, b = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(_soft_iou(a, b, torch.ones(2, 2, dtype=torch.bool))) == pytest.approx(1 / 3)
