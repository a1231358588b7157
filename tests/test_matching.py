"""Tests of modeling_segcompass/matching.py: assignment (scipy and exact search), costs, slots."""

import doctest
import itertools

import pytest
import torch
import torch.nn.functional as F

from modeling_segcompass import matching
from modeling_segcompass.matching import (
    SlotAssignment,
    linear_sum_assignment,
    match_slots,
    pairwise_bce_cost,
    pairwise_dice_cost,
    pairwise_soft_iou,
)

scipy_available = matching._scipy_linear_sum_assignment is not None


@pytest.fixture
def without_scipy(monkeypatch):
    """Force the exact-search fallback, as on a machine without scipy."""
    monkeypatch.setattr(matching, "_scipy_linear_sum_assignment", None)


def brute_force_min_cost(cost: torch.Tensor) -> float:
    """Reference optimum by enumerating all assignments (independent of the module)."""
    rows, cols = cost.shape
    if rows <= cols:
        return min(
            sum(float(cost[r, c]) for r, c in enumerate(perm))
            for perm in itertools.permutations(range(cols), rows)
        )
    return brute_force_min_cost(cost.T)


def test_doctests_pass():
    result = doctest.testmod(matching, extraglobs={"torch": torch})
    assert result.attempted >= 2 and result.failed == 0


def test_known_assignment_both_backends(monkeypatch):
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    # Optimum: row0->col1 (1), row1->col0 (2), row2->col2 (2) = 5.
    expected = ([0, 1, 2], [1, 0, 2])
    if scipy_available:
        rows, cols = linear_sum_assignment(cost)
        assert (rows.tolist(), cols.tolist()) == expected
    monkeypatch.setattr(matching, "_scipy_linear_sum_assignment", None)
    rows, cols = linear_sum_assignment(cost)
    assert (rows.tolist(), cols.tolist()) == expected
    assert rows.dtype == torch.long and cols.dtype == torch.long


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 4), (1, 6), (6, 1), (8, 8)])
def test_fallback_is_optimal_and_agrees_with_scipy(shape, monkeypatch):
    generator = torch.Generator().manual_seed(sum(shape))
    cost = torch.rand(shape, generator=generator)
    monkeypatch.setattr(matching, "_scipy_linear_sum_assignment", None)
    rows, cols = linear_sum_assignment(cost)
    assert rows.numel() == min(shape)
    assert rows.unique().numel() == rows.numel() and cols.unique().numel() == cols.numel()
    assert torch.all(rows[1:] > rows[:-1]), "rows must be sorted like scipy"
    if shape != (8, 8):  # the brute-force reference is slow in pure Python for 8 x 8
        assert float(cost[rows, cols].sum()) == pytest.approx(brute_force_min_cost(cost), abs=1e-6)
    monkeypatch.undo()
    if scipy_available:
        rows_s, cols_s = linear_sum_assignment(cost)
        assert rows_s.tolist() == rows.tolist() and cols_s.tolist() == cols.tolist()


def test_fallback_refuses_large_problem_and_names_scipy(without_scipy):
    with pytest.raises(ValueError, match="scipy"):
        linear_sum_assignment(torch.rand(9, 9))
    # A wide but shallow problem (4 x 12: 11880 assignments) is still searched exactly.
    cost = torch.rand(4, 12)
    rows, cols = linear_sum_assignment(cost)
    assert float(cost[rows, cols].sum()) == pytest.approx(brute_force_min_cost(cost), abs=1e-6)


@pytest.mark.parametrize("force_fallback", [False, True])
def test_empty_and_invalid_costs(force_fallback, monkeypatch):
    if force_fallback:
        monkeypatch.setattr(matching, "_scipy_linear_sum_assignment", None)
    rows, cols = linear_sum_assignment(torch.zeros(0, 3))
    assert rows.numel() == 0 and cols.numel() == 0
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_sum_assignment(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="2-D"):
        linear_sum_assignment(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        linear_sum_assignment([[1.0, 2.0]])


def test_pairwise_costs_against_per_pair_reference():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, generator=generator)
    targets = (torch.rand(2, 4, 5, generator=generator) > 0.5).float()
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[:, 3:] = False
    probs = torch.sigmoid(logits)
    iou = pairwise_soft_iou(probs, targets, valid)
    dice = pairwise_dice_cost(probs, targets, valid)
    bce = pairwise_bce_cost(logits, targets, valid)
    for k in range(3):
        for g in range(2):
            p, t = probs[k][valid], targets[g][valid]
            inter = (p * t).sum()
            assert iou[k, g] == pytest.approx(float(inter / (p + t - p * t).sum()), abs=1e-5)
            assert dice[k, g] == pytest.approx(
                float(1 - (2 * inter + 1) / (p.sum() + t.sum() + 1)), abs=1e-5
            )
            ref_bce = F.binary_cross_entropy_with_logits(logits[k][valid], t)
            assert bce[k, g] == pytest.approx(float(ref_bce), abs=1e-5)


def test_soft_iou_hand_value():
    # p = [0.6 on a 2x2 block], t = that block: sum(p t) = 2.4, union = 2.4 + 4 - 2.4 = 4.
    probs = torch.zeros(1, 4, 4)
    probs[0, :2, :2] = 0.6
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1.0
    assert pairwise_soft_iou(probs, target).item() == pytest.approx(0.6, abs=1e-6)
    # Two empty masks: union clamped at 1e-6 -> 0 (upstream convention).
    assert pairwise_soft_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == 0.0


def _blobs(height: int = 8, width: int = 8) -> torch.Tensor:
    """Three disjoint rectangles as (3, H, W) float masks."""
    masks = torch.zeros(3, height, width)
    masks[0, :3, :3] = 1
    masks[1, 5:, 5:] = 1
    masks[2, :3, 5:] = 1
    return masks


def test_swapped_targets_swap_the_assignment():
    blobs = _blobs()
    pred = (blobs * 2 - 1) * 10  # slot k predicts blob k
    gt = blobs[[1, 0, 2]].unsqueeze(0)  # GT order: blob1, blob0, blob2
    result = match_slots(pred.unsqueeze(0), gt, torch.tensor([3]))
    assert isinstance(result, SlotAssignment)
    assert result.slot_to_target.tolist() == [[1, 0, 2]]
    assert result.target_to_slot.tolist() == [[1, 0, 2]]
    # The soft-IoU (upstream) cost agrees on such a clear case.
    upstream = match_slots(pred.unsqueeze(0), gt, torch.tensor([3]), cost="soft_iou")
    assert upstream.slot_to_target.tolist() == [[1, 0, 2]]


def test_padding_targets_no_target_and_inverse_consistency():
    blobs = _blobs()
    pred = ((blobs * 2 - 1) * 10).unsqueeze(0).repeat(2, 1, 1, 1)  # (2, 3, H, W)
    gt = torch.zeros(2, 3, 8, 8)
    gt[0, 0] = blobs[2]  # one real target = blob 2, then padding
    gt[1] = blobs  # would match perfectly, but the sample says no target
    result = match_slots(pred, gt, torch.tensor([1, 0]))
    assert result.slot_to_target.tolist() == [[-1, -1, 0], [-1, -1, -1]]
    assert result.target_to_slot.tolist() == [[2, -1, -1], [-1, -1, -1]]
    assert result.matched.tolist() == [[False, False, True], [False, False, False]]
    assert result.num_matched == 1
    pairs = result.pairs()
    assert pairs.batch_index.tolist() == [0]
    assert pairs.slot_index.tolist() == [2] and pairs.target_index.tolist() == [0]


def test_permuting_slots_permutes_the_assignment():
    generator = torch.Generator().manual_seed(7)
    pred = torch.randn(1, 4, 6, 6, generator=generator)
    gt = (torch.rand(1, 3, 6, 6, generator=generator) > 0.5).float()
    num = torch.tensor([3])
    base = match_slots(pred, gt, num).slot_to_target[0]
    perm = torch.tensor([2, 0, 3, 1])
    permuted = match_slots(pred[:, perm], gt, num).slot_to_target[0]
    assert permuted.tolist() == base[perm].tolist()


def test_valid_mask_excludes_padding_from_the_cost():
    # Slot 0 matches GT0 inside the valid area but slot 1 matches it better only through
    # pixels in the padded area; with the valid mask the inside decides.
    gt = torch.zeros(1, 1, 4, 4)
    gt[0, 0, :2, :2] = 1
    gt[0, 0, :, 3] = 1  # ground truth also "in" the padding column
    pred = torch.full((1, 2, 4, 4), -10.0)
    pred[0, 0, :2, :2] = 10.0  # right inside the valid area
    pred[0, 1, :, 3] = 10.0  # right only in the padding column
    pred[0, 1, 0, 0] = 10.0
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[..., 3] = False
    with_valid = match_slots(pred, gt, torch.tensor([1]), valid)
    assert with_valid.slot_to_target.tolist() == [[0, -1]]
    # Without the valid mask the padding column makes slot 1 competitive; the cost changes.
    cost_all = pairwise_dice_cost(torch.sigmoid(pred[0]), gt[0])
    cost_valid = pairwise_dice_cost(torch.sigmoid(pred[0]), gt[0], valid[0])
    assert not torch.allclose(cost_all, cost_valid)


def test_matching_is_gradient_free_and_same_without_scipy(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    pred = torch.randn(2, 4, 5, 5, generator=generator, requires_grad=True)
    gt = (torch.rand(2, 3, 5, 5, generator=generator) > 0.5).float()
    num = torch.tensor([3, 2])
    with_scipy = match_slots(pred, gt, num)
    assert not with_scipy.slot_to_target.requires_grad
    monkeypatch.setattr(matching, "_scipy_linear_sum_assignment", None)
    fallback = match_slots(pred, gt, num)
    assert torch.equal(with_scipy.slot_to_target, fallback.slot_to_target)
    assert torch.equal(with_scipy.target_to_slot, fallback.target_to_slot)
    assert (fallback.slot_to_target >= 0).sum(dim=1).tolist() == [3, 2]


@pytest.mark.parametrize(
    ("num_objects", "gt_shape", "message"),
    [
        (torch.tensor([4]), (1, 4, 4, 4), "<= K=3"),
        (torch.tensor([3]), (1, 2, 4, 4), r"\[0, G=2\]"),
        (torch.tensor([-1]), (1, 2, 4, 4), r"\[0, G=2\]"),
        (torch.tensor([1.0]), (1, 2, 4, 4), "integer"),
        (torch.tensor([1, 1]), (1, 2, 4, 4), "num_objects"),
        (torch.tensor([1]), (1, 2, 5, 4), "gt_masks"),
    ],
)
def test_match_slots_input_errors(num_objects, gt_shape, message):
    with pytest.raises(ValueError, match=message):
        match_slots(torch.zeros(1, 3, 4, 4), torch.zeros(gt_shape), num_objects)


def test_match_slots_rejects_bad_valid_mask_and_cost():
    with pytest.raises(ValueError, match="valid_mask"):
        match_slots(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), torch.tensor([1]),
                    torch.ones(1, 3, 4, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match="dice_bce"):
        match_slots(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), torch.tensor([1]),
                    cost="l1")  # fmt: skip


def test_order_prior_breaks_ties_towards_slot_j_for_target_j():
    # every slot predicts the same mask: pure matching is arbitrary, the prior is not
    gt = torch.zeros(1, 3, 4, 4)
    gt[0, 0, :2] = 1
    gt[0, 1, 2:] = 1
    pred = torch.zeros(1, 3, 4, 4).expand(1, 3, 4, 4).clone()
    assignment = match_slots(pred, gt, torch.tensor([2]), order_prior=1.0)
    assert assignment.slot_to_target.tolist() == [[0, 1, -1]]
    # a clearly better slot still wins over the prior when the prior is small
    better = pred.clone()
    better[0, 2] = -20.0
    better[0, 2, :2] = 20.0
    assignment = match_slots(better, gt, torch.tensor([1]), order_prior=0.01)
    assert assignment.slot_to_target.tolist() == [[-1, -1, 0]]
