"""Tests of modeling_segcompass/losses.py: loss primitives and the matched segmentation loss."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from modeling_segcompass import losses
from modeling_segcompass.losses import (
    SegmentationLossOutput,
    compute_segmentation_loss,
    dice_loss,
    masked_bce_with_logits,
    sigmoid_focal_loss,
)

LOG2 = math.log(2.0)
BIG = 40.0  # sigmoid(40) == 1 and sigmoid(-40) ~ 4e-18 in float32


def test_doctests_pass():
    result = doctest.testmod(losses, extraglobs={"torch": torch})
    assert result.attempted >= 3 and result.failed == 0


# ------------------------------------------------------------------ primitives


def test_dice_hand_values():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    half_right = torch.tensor([[[BIG, -BIG], [-BIG, -BIG]]])
    # inter 1, sum p 1, sum t 2, eps 1: 1 - (2 + 1) / (3 + 1) = 0.25
    assert dice_loss(half_right, target).item() == pytest.approx(0.25, abs=1e-6)
    # p = 0.5 everywhere: inter 1, sum p 2, sum t 2: 1 - 3 / 5 = 0.4
    assert dice_loss(torch.zeros(1, 2, 2), target).item() == pytest.approx(0.4, abs=1e-6)
    # eps = 0 gives the plain Dice: 1 - 2/3.
    assert dice_loss(half_right, target, eps=0.0).item() == pytest.approx(1 / 3, abs=1e-6)
    # Empty target predicted empty: 0 thanks to the smoothing.
    assert dice_loss(torch.full((1, 2, 2), -BIG), torch.zeros(1, 2, 2)).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_dice_valid_mask_excludes_the_missed_pixel():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    logits = torch.tensor([[[BIG, -BIG], [-BIG, -BIG]]])
    valid = torch.tensor([[[True, False], [True, True]]])
    # Only the missed target pixel is ignored: the prediction is then perfect.
    assert dice_loss(logits, target, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_hand_values_and_valid_mask():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    softplus2 = math.log1p(math.exp(2.0))
    assert masked_bce_with_logits(logits, targets).item() == pytest.approx(
        (LOG2 + softplus2) / 2, abs=1e-6
    )
    valid = torch.tensor([[True, False]])
    assert masked_bce_with_logits(logits, targets, valid).item() == pytest.approx(LOG2, abs=1e-6)
    # No valid pixel: defined as 0, not NaN.
    assert masked_bce_with_logits(logits, targets, torch.zeros(1, 2, dtype=torch.bool)).item() == 0


def test_focal_hand_values():
    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    # p_t = 0.5 on both: positive 0.25 * 0.25 * log2, negative 0.75 * 0.25 * log2; mean.
    expected = (0.25 * 0.25 * LOG2 + 0.75 * 0.25 * LOG2) / 2
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    # alpha < 0 disables the class weight; gamma = 0 then reduces to plain BCE.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, generator=generator)
    t = torch.rand(3, 4, 4, generator=generator)
    assert torch.allclose(
        sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0), masked_bce_with_logits(x, t), atol=1e-6
    )
    # Valid mask keeps only the positive pixel.
    valid = torch.tensor([[True, False]])
    assert sigmoid_focal_loss(logits, targets, valid).item() == pytest.approx(
        0.25 * 0.25 * LOG2, abs=1e-6
    )


def test_primitives_are_per_mask():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 5, generator=generator)
    t = (torch.rand(3, 5, 5, generator=generator) > 0.5).float()
    for fn in (dice_loss, masked_bce_with_logits, sigmoid_focal_loss):
        together = fn(x, t)
        assert together.shape == (3,)
        one_by_one = torch.cat([fn(x[i : i + 1], t[i : i + 1]) for i in range(3)])
        assert torch.allclose(together, one_by_one, atol=1e-6)
    # A (1, H, W) valid mask broadcasts over the masks.
    valid = torch.zeros(1, 5, 5, dtype=torch.bool)
    valid[:, :2] = True
    assert torch.allclose(
        masked_bce_with_logits(x, t, valid), masked_bce_with_logits(x[:, :2], t[:, :2]), atol=1e-6
    )


def test_primitive_shape_errors():
    with pytest.raises(ValueError, match="targets"):
        dice_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="valid_mask"):
        sigmoid_focal_loss(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3), torch.ones(3, 2, 2) > 0)


# ------------------------------------------------------------------ compute_segmentation_loss


def _blobs() -> torch.Tensor:
    masks = torch.zeros(3, 8, 8)
    masks[0, :3, :3] = 1
    masks[1, 5:, 5:] = 1
    masks[2, :3, 5:] = 1
    return masks


def _loss(**overrides) -> SegmentationLossOutput:
    return compute_segmentation_loss(**overrides)


def test_hand_computed_single_pixel_grid():
    # B=1, K=1, G=1, 2x2, all logits 0 (p = 0.5), target one pixel.
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    out = compute_segmentation_loss(
        heatmap_logits=torch.zeros(1, 1, 2, 2),
        mask_logits=torch.zeros(1, 1, 2, 2),
        conf_logits=torch.zeros(1, 1),
        gt_masks=gt,
        num_objects=torch.tensor([1]),
        heatmap_bce_weight=1.0,
        heatmap_dice_weight=2.0,
        mask_dice_weight=3.0,
        mask_focal_weight=4.0,
    )
    dice = 1 - (2 * 0.5 + 1) / (2 + 1 + 1)  # = 0.5
    focal = (0.25 * 0.25 * LOG2 + 3 * 0.75 * 0.25 * LOG2) / 4
    assert out.heatmap_bce.item() == pytest.approx(LOG2, abs=1e-6)
    assert out.heatmap_dice.item() == pytest.approx(dice, abs=1e-6)
    assert out.mask_dice.item() == pytest.approx(dice, abs=1e-6)
    assert out.mask_focal.item() == pytest.approx(focal, abs=1e-6)
    assert out.seg_loss.item() == pytest.approx(LOG2 + 2 * dice + 3 * dice + 4 * focal, abs=1e-5)
    assert out.conf_loss.item() == pytest.approx(LOG2, abs=1e-6)
    assert out.conf_targets.tolist() == [[1.0]]
    assert out.mask_iou_mse.item() == 0.0


def test_perfect_prediction_gives_near_zero_loss():
    blobs = _blobs()
    gt = blobs[[2, 0]].unsqueeze(0)  # (1, 2, H, W), real targets blob2 and blob0
    gt = torch.cat([gt, torch.zeros(1, 1, 8, 8)], dim=1)  # padded to G = 3
    logits = ((blobs * 2 - 1) * BIG).unsqueeze(0)  # slot k predicts blob k
    conf = torch.tensor([[BIG, -BIG, BIG]])
    out = _loss(
        heatmap_logits=logits,
        mask_logits=logits.clone(),
        conf_logits=conf,
        gt_masks=gt,
        num_objects=torch.tensor([2]),
    )
    assert out.assignment.slot_to_target.tolist() == [[1, -1, 0]]
    assert out.conf_targets.tolist() == [[1.0, 0.0, 1.0]]
    for value in (out.seg_loss, out.conf_loss, out.heatmap_bce, out.mask_focal):
        assert value.item() < 1e-6
    assert out.heatmap_dice.item() < 1e-6 and out.mask_dice.item() < 1e-6


def test_loss_is_invariant_to_gt_order_and_assignment_follows():
    generator = torch.Generator().manual_seed(5)
    heat = torch.randn(1, 3, 8, 8, generator=generator)
    mask = ((_blobs() * 2 - 1) * 5).unsqueeze(0)
    conf = torch.randn(1, 3, generator=generator)
    gt = _blobs()[:2].unsqueeze(0)
    kwargs = dict(heatmap_logits=heat, mask_logits=mask, conf_logits=conf,
                  num_objects=torch.tensor([2]))  # fmt: skip
    straight = _loss(gt_masks=gt, **kwargs)
    swapped = _loss(gt_masks=gt[:, [1, 0]], **kwargs)
    assert straight.assignment.slot_to_target.tolist() == [[0, 1, -1]]
    assert swapped.assignment.slot_to_target.tolist() == [[1, 0, -1]]
    assert swapped.seg_loss.item() == pytest.approx(straight.seg_loss.item(), abs=1e-6)
    assert swapped.conf_loss.item() == pytest.approx(straight.conf_loss.item(), abs=1e-6)


def test_no_target_sample_has_zero_conf_targets_and_no_seg_contribution():
    generator = torch.Generator().manual_seed(6)
    heat = torch.randn(2, 3, 8, 8, generator=generator, requires_grad=True)
    mask = torch.randn(2, 3, 8, 8, generator=generator)
    conf = torch.randn(2, 3, generator=generator)
    gt = torch.zeros(2, 2, 8, 8)
    gt[0] = _blobs()[:2]
    gt[1] = _blobs()[1:]  # present but ignored: sample 1 says no target
    both = _loss(heatmap_logits=heat, mask_logits=mask, conf_logits=conf, gt_masks=gt,
                 num_objects=torch.tensor([2, 0]))  # fmt: skip
    first = _loss(heatmap_logits=heat[:1], mask_logits=mask[:1], conf_logits=conf[:1],
                  gt_masks=gt[:1], num_objects=torch.tensor([2]))  # fmt: skip
    assert both.conf_targets[1].tolist() == [0.0, 0.0, 0.0]
    assert both.conf_targets[0].sum().item() == 2
    # Seg terms are averaged over matched pairs: the no-target sample adds nothing.
    assert both.seg_loss.item() == pytest.approx(first.seg_loss.item(), abs=1e-6)
    # Its confidences are still pushed to 0.
    expected_conf = F.binary_cross_entropy_with_logits(conf, both.conf_targets)
    assert both.conf_loss.item() == pytest.approx(expected_conf.item(), abs=1e-6)
    both.seg_loss.backward()
    assert heat.grad[1].abs().sum().item() == 0.0
    assert heat.grad[0].abs().sum().item() > 0.0


def test_all_no_target_batch_gives_zero_seg_loss_with_a_graph():
    heat = torch.randn(2, 2, 4, 4, requires_grad=True)
    out = _loss(heatmap_logits=heat, mask_logits=torch.randn(2, 2, 4, 4),
                conf_logits=torch.zeros(2, 2), gt_masks=torch.zeros(2, 1, 4, 4),
                num_objects=torch.tensor([0, 0]))  # fmt: skip
    assert out.seg_loss.item() == 0.0
    assert out.conf_loss.item() == pytest.approx(LOG2, abs=1e-6)
    out.seg_loss.backward()  # must not fail: the loss stays connected to the inputs
    assert heat.grad.abs().sum().item() == 0.0


def test_normalised_by_number_of_matched_pairs():
    generator = torch.Generator().manual_seed(8)
    heat = torch.randn(2, 3, 8, 8, generator=generator)
    mask = torch.randn(2, 3, 8, 8, generator=generator)
    gt = torch.zeros(2, 2, 8, 8)
    gt[0, 0] = _blobs()[0]
    gt[1] = _blobs()[1:]
    out = _loss(heatmap_logits=heat, mask_logits=mask, conf_logits=torch.zeros(2, 3),
                gt_masks=gt, num_objects=torch.tensor([1, 2]))  # fmt: skip
    b, s, t = out.assignment.pairs()
    assert b.numel() == 3
    per_pair = masked_bce_with_logits(heat[b, s], gt[b, t])
    assert out.heatmap_bce.item() == pytest.approx(per_pair.mean().item(), abs=1e-6)
    per_pair_focal = sigmoid_focal_loss(mask[b, s], gt[b, t])
    assert out.mask_focal.item() == pytest.approx(per_pair_focal.mean().item(), abs=1e-6)


def test_valid_mask_changes_the_loss_as_expected():
    gt = torch.zeros(1, 1, 4, 4)
    gt[0, 0, :2, :2] = 1
    heat = torch.full((1, 1, 4, 4), -BIG)
    heat[0, 0, :2, :2] = BIG
    heat[0, 0, :, 3] = BIG  # wrong only in the last column
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[..., 3] = False  # ... which is SAM padding
    kwargs = dict(heatmap_logits=heat, mask_logits=heat.clone(), conf_logits=torch.zeros(1, 1),
                  gt_masks=gt, num_objects=torch.tensor([1]))  # fmt: skip
    unmasked = _loss(**kwargs)
    masked = _loss(valid_mask=valid, **kwargs)
    # Without the mask: 4 of 16 pixels are wrong by 40 nats -> BCE = 40 * 4 / 16 = 10.
    assert unmasked.heatmap_bce.item() == pytest.approx(10.0, abs=1e-4)
    assert unmasked.heatmap_dice.item() == pytest.approx(1 - 9 / 13, abs=1e-5)
    assert masked.heatmap_bce.item() < 1e-6 and masked.heatmap_dice.item() < 1e-6
    assert masked.seg_loss.item() < 1e-5 < unmasked.seg_loss.item()


def test_gradients_reach_heatmap_mask_and_confidence():
    generator = torch.Generator().manual_seed(9)
    heat = torch.randn(1, 3, 8, 8, generator=generator, requires_grad=True)
    mask = torch.randn(1, 3, 8, 8, generator=generator, requires_grad=True)
    conf = torch.randn(1, 3, generator=generator, requires_grad=True)
    out = _loss(heatmap_logits=heat, mask_logits=mask, conf_logits=conf,
                gt_masks=_blobs()[:2].unsqueeze(0), num_objects=torch.tensor([2]))  # fmt: skip
    (out.seg_loss + out.conf_loss).backward()
    matched = out.assignment.matched[0]
    for grad in (heat.grad[0], mask.grad[0]):
        per_slot = grad.abs().flatten(1).sum(1)
        assert (per_slot[matched] > 0).all()
        assert (per_slot[~matched] == 0).all()  # unmatched slots get no mask supervision
    assert (conf.grad.abs() > 0).all()  # every slot gets a confidence target


def test_iou_prediction_loss():
    blobs = _blobs()
    logits = ((blobs * 2 - 1) * BIG).unsqueeze(0)
    iou_pred = torch.tensor([[0.5, 0.9, 0.1]], requires_grad=True)
    out = _loss(heatmap_logits=logits, mask_logits=logits, conf_logits=torch.zeros(1, 3),
                gt_masks=blobs[:1].unsqueeze(0), num_objects=torch.tensor([1]),
                iou_predictions=iou_pred, iou_loss_weight=2.0)  # fmt: skip
    # Slot 0 matches blob 0 perfectly: true IoU 1, prediction 0.5 -> MSE 0.25.
    assert out.mask_iou_mse.item() == pytest.approx(0.25, abs=1e-6)
    assert out.seg_loss.item() == pytest.approx(2.0 * 0.25, abs=1e-5)
    out.seg_loss.backward()
    assert iou_pred.grad.tolist()[0][1:] == [0.0, 0.0]


def test_match_on_heatmap_uses_the_heatmap():
    blobs = _blobs()
    heat = ((blobs[[1, 0, 2]] * 2 - 1) * 10).unsqueeze(0)  # heatmap slot 1 shows blob 0
    mask = ((blobs * 2 - 1) * 10).unsqueeze(0)  # mask slot 0 shows blob 0
    kwargs = dict(heatmap_logits=heat, mask_logits=mask, conf_logits=torch.zeros(1, 3),
                  gt_masks=blobs[:1].unsqueeze(0), num_objects=torch.tensor([1]))  # fmt: skip
    assert _loss(**kwargs).assignment.slot_to_target.tolist() == [[0, -1, -1]]
    upstream = _loss(match_on="heatmap", matching_cost="soft_iou", **kwargs)
    assert upstream.assignment.slot_to_target.tolist() == [[-1, 0, -1]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gt_masks": torch.zeros(1, 2, 16, 16)}, "4E x 4E"),
        ({"num_objects": torch.tensor([4])}, "num_objects"),
        ({"conf_logits": torch.zeros(1, 2)}, "conf_logits"),
        ({"mask_logits": torch.zeros(1, 3, 8, 4)}, "mask_logits"),
        ({"valid_mask": torch.ones(1, 4, 8, dtype=torch.bool)}, "valid_mask"),
        ({"num_objects": torch.tensor([1, 1])}, "num_objects"),
        ({"heatmap_logits": torch.zeros(3, 8, 8)}, "heatmap_logits"),
        ({"match_on": "slots"}, "match_on"),
    ],
)
def test_input_validation(change, message):
    kwargs = dict(heatmap_logits=torch.zeros(1, 3, 8, 8), mask_logits=torch.zeros(1, 3, 8, 8),
                  conf_logits=torch.zeros(1, 3), gt_masks=torch.zeros(1, 4, 8, 8),
                  num_objects=torch.tensor([2]))  # fmt: skip
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        compute_segmentation_loss(**kwargs)
