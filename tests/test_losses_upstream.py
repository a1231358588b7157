"""Upstream-form segmentation loss: config fields against a re-implementation of upstream's math.

The reference below is written here from reading upstream SegCompass
(github.com/ZhenyuLU-Heliodore/SegCompass, `verl/workers/actor/dp_actor.py`,
`_multiple_seg_loss`): per sample, Hungarian matching of the sigmoid heatmaps to the real
targets with `1 - soft IoU` over the full grid; per matched pair heatmap BCE and focal loss
averaged over the unpadded pixels (denominator + 1e-6), Dice `1 - 2 I / (U + 1e-6)` on the
unpadded pixels; each term the mean over the sample's pairs, no-target samples 0, then the
mean over the batch; confidence BCE over B x K; the Dice / focal coefficients switch at a step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modeling_segcompass import SegCompassConfig
from modeling_segcompass.losses import segmentation_loss_from_config, segmentation_loss_weights
from modeling_segcompass.matching import linear_sum_assignment

#: The loss fields of upstream's launch scripts (scripts/train/*/gref_*.sh, dp_actor.py).
UPSTREAM_LOSS = {
    "heatmap_bce_weight": 1.0,
    "heatmap_dice_weight": 0.8,
    "mask_dice_weight": 0.8,
    "mask_focal_weight": 0.0,
    "iou_loss_weight": 0.0,
    "slot_order_prior": 0.0,
    "loss_schedule_step": 1500,
    "heatmap_dice_weight_after": 2.0,
    "mask_dice_weight_after": 2.0,
    "mask_focal_weight_after": 5.0,
    "loss_normalization": "per_sample",
    "dice_eps": 1e-6,
    "matching_on": "heatmap",
    "matching_cost": "soft_iou",
    "matching_full_grid": True,
}


def reference_dice(prob, target, area):
    """Upstream's `1 - soft_dice` on the unpadded pixels: `1 - 2 I / (U + 1e-6)`."""
    prob, target = prob * area, target * area
    return 1.0 - 2.0 * (prob * target).sum() / (prob.sum() + target.sum() + 1e-6)


def reference_loss(heat, mask, conf, gt, num_objects, valid, step):
    """Upstream's multi-slot loss, written independently (float64)."""
    batch, slots = heat.shape[:2]
    dice_w, focal_w = (0.8, 0.0) if step < 1500 else (2.0, 5.0)
    terms = {"bce": [], "hdice": [], "dice": [], "focal": []}
    conf_target = torch.zeros(batch, slots, dtype=torch.float64)
    for b in range(batch):
        n = int(num_objects[b])
        if n == 0:
            for values in terms.values():
                values.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        area = valid[b].double()
        count = area.sum() + 1e-6
        prob = heat[b].double().sigmoid()
        target = gt[b, :n].double()
        inter = prob.flatten(1) @ target.flatten(1).T
        union = prob.flatten(1).sum(1)[:, None] + target.flatten(1).sum(1)[None] - inter
        rows, cols = linear_sum_assignment(1.0 - inter / union.clamp_min(1e-6))
        conf_target[b, rows] = 1.0
        pair_bce, pair_hdice, pair_dice, pair_focal = [], [], [], []
        for r, c in zip(rows.tolist(), cols.tolist()):
            t = target[c]
            x = heat[b, r].double()
            bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            pair_bce.append((bce * area).sum() / count)

            pair_hdice.append(reference_dice(x.sigmoid(), t, area))
            m = mask[b, r].double()
            pair_dice.append(reference_dice(m.sigmoid(), t, area))
            p = m.sigmoid()
            p_t = p * t + (1 - p) * (1 - t)
            alpha_t = 0.25 * t + 0.75 * (1 - t)
            ce = F.binary_cross_entropy_with_logits(m, t, reduction="none")
            pair_focal.append((alpha_t * (1 - p_t) ** 2 * ce * area).sum() / count)
        for key, values in zip(terms, (pair_bce, pair_hdice, pair_dice, pair_focal)):
            terms[key].append(torch.stack(values).mean())
    mean = {key: torch.stack(values).mean() for key, values in terms.items()}
    seg = mean["bce"] + dice_w * mean["dice"] + focal_w * mean["focal"] + dice_w * mean["hdice"]
    conf_loss = F.binary_cross_entropy_with_logits(conf.double(), conf_target)
    return seg, conf_loss, mean, conf_target


def random_batch(seed: int, batch: int = 4, slots: int = 3, side: int = 16):
    gen = torch.Generator().manual_seed(seed)
    heat = torch.randn(batch, slots, side, side, generator=gen) * 3
    mask = torch.randn(batch, slots, side, side, generator=gen) * 3
    conf = torch.randn(batch, slots, generator=gen)
    gt = (torch.rand(batch, slots, side, side, generator=gen) > 0.6).float()
    num_objects = torch.randint(0, slots + 1, (batch,), generator=gen)
    num_objects[0] = 0  # a no-target sample counts as zeros
    for b in range(batch):
        gt[b, int(num_objects[b]) :] = 0
    valid = torch.zeros(batch, side, side, dtype=torch.bool)
    for b in range(batch):  # SAM pads right / bottom: the unpadded image is a top-left box
        h, w = torch.randint(side // 2, side + 1, (2,), generator=gen).tolist()
        valid[b, :h, :w] = True
    return heat, mask, conf, gt, num_objects, valid


@pytest.fixture(scope="module")
def upstream_config() -> SegCompassConfig:
    return SegCompassConfig.tiny(**UPSTREAM_LOSS)


@pytest.mark.parametrize("step", [0, 1499, 1500, 4000])
def test_upstream_loss_matches_reference(upstream_config, step):
    worst = 0.0
    for seed in range(12):
        heat, mask, conf, gt, num_objects, valid = random_batch(seed)
        out = segmentation_loss_from_config(
            upstream_config, step, heatmap_logits=heat, mask_logits=mask, conf_logits=conf,
            gt_masks=gt, num_objects=num_objects, valid_mask=valid,
        )  # fmt: skip
        seg, conf_loss, parts, conf_target = reference_loss(
            heat, mask, conf, gt, num_objects, valid, step
        )
        assert torch.equal(out.conf_targets, conf_target.float())  # same matching
        for got, want in (
            (out.seg_loss, seg),
            (out.conf_loss, conf_loss),
            (out.heatmap_bce, parts["bce"]),
            (out.heatmap_dice, parts["hdice"]),
            (out.mask_dice, parts["dice"]),
            (out.mask_focal, parts["focal"]),
        ):
            worst = max(worst, abs(float(got) - float(want)))
    # float32 against float64; the Dice numerator's 1e-6 adds at most 1e-6 / (U + 1e-6)
    assert worst < 2e-5, worst


def test_full_grid_matching_reads_the_padded_area():
    """A heatmap that covers its target only outside the unpadded image wins the full-grid
    matching (upstream) and loses the valid-area matching."""
    side = 8
    gt = torch.zeros(1, 2, side, side)
    gt[0, 0, :, :4] = 1  # target 0: the left half (inside the valid area)
    gt[0, 1, :4, 4:] = 1  # target 1: the top-right quarter
    valid = torch.zeros(1, side, side, dtype=torch.bool)
    valid[0, :, :6] = True  # columns 6, 7 are SAM padding
    heat = torch.full((1, 2, side, side), -20.0)
    heat[0, 0, :, :4] = 20  # slot 0 = target 0
    heat[0, 0, :, 6:] = 20  # ...plus all of the padding
    heat[0, 1, :4, 4:6] = 20  # slot 1 = the valid part of target 1
    heat[0, 1, :, :4] = 3
    args = dict(
        heatmap_logits=heat, mask_logits=heat.clone(), conf_logits=torch.zeros(1, 2),
        gt_masks=gt, num_objects=torch.tensor([2]), valid_mask=valid,
    )  # fmt: skip
    full = segmentation_loss_from_config(SegCompassConfig.tiny(**UPSTREAM_LOSS), 0, **args)
    valid_only = SegCompassConfig.tiny(**{**UPSTREAM_LOSS, "matching_full_grid": False})
    inside = segmentation_loss_from_config(valid_only, 0, **args)
    assert full.assignment.slot_to_target.tolist() != inside.assignment.slot_to_target.tolist()
    heat_np, mask_np, conf_np, gt_np, n_np, valid_np = (
        args["heatmap_logits"], args["mask_logits"], args["conf_logits"], gt,
        args["num_objects"], valid,
    )  # fmt: skip
    _, _, _, conf_target = reference_loss(heat_np, mask_np, conf_np, gt_np, n_np, valid_np, 0)
    assert torch.equal(full.conf_targets, conf_target.float())


def test_per_sample_normalisation_weighs_samples_not_pairs():
    """One sample with one object, one with three: per-sample means weigh the two samples
    alike; the package's pair mean weighs the four pairs alike."""
    heat, mask, conf, gt, _, valid = random_batch(3, batch=2, slots=3)
    num_objects = torch.tensor([1, 3])
    args = dict(
        heatmap_logits=heat, mask_logits=mask, conf_logits=conf, gt_masks=gt,
        num_objects=num_objects, valid_mask=valid,
    )  # fmt: skip
    cfg = SegCompassConfig.tiny(**UPSTREAM_LOSS)
    per_sample = segmentation_loss_from_config(cfg, 0, **args)
    pairs = segmentation_loss_from_config(
        SegCompassConfig.tiny(**{**UPSTREAM_LOSS, "loss_normalization": "pairs"}), 0, **args
    )
    assert not torch.allclose(per_sample.heatmap_bce, pairs.heatmap_bce)
    _, _, parts, _ = reference_loss(heat, mask, conf, gt, num_objects, valid, 0)
    assert abs(float(per_sample.heatmap_bce) - float(parts["bce"])) < 1e-5


def test_schedule_weights_switch_at_the_step(upstream_config):
    before = segmentation_loss_weights(upstream_config, 1499)
    after = segmentation_loss_weights(upstream_config, 1500)
    assert (before["mask_dice_weight"], before["mask_focal_weight"]) == (0.8, 0.0)
    assert (after["mask_dice_weight"], after["mask_focal_weight"]) == (2.0, 5.0)
    assert (before["heatmap_dice_weight"], after["heatmap_dice_weight"]) == (0.8, 2.0)
    assert after["iou_loss_weight"] == 0.0 and after["heatmap_bce_weight"] == 1.0
    plain = SegCompassConfig.tiny()
    assert segmentation_loss_weights(plain, 10**6) == segmentation_loss_weights(plain, 0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("loss_normalization", "batch"),
        ("matching_on", "image"),
        ("matching_cost", "l1"),
        ("mask_dice_weight_after", -1.0),
        ("loss_schedule_step", 1.5),
        ("dice_eps", None),
    ],
)
def test_bad_loss_fields_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SegCompassConfig.tiny(**{field: value})


def test_model_forward_follows_training_step():
    """The forward's seg loss takes the weights of `model.training_step` (set by the trainers)."""
    from tests.helpers import build_tiny_model, make_batch

    model = build_tiny_model(**UPSTREAM_LOSS)
    batch = make_batch(model.config, [2, 1], with_targets=True, num_objects=[2, 1])
    with torch.no_grad():
        early = model(**batch).seg_loss  # no attribute yet: step 0
        model.training_step = 1500
        late = model(**batch).seg_loss
        out = model(**batch)
        want = segmentation_loss_from_config(
            model.config, 1500, heatmap_logits=out.heatmap_logits.float(),
            mask_logits=out.mask_logits.float(), conf_logits=out.conf_logits.float(),
            gt_masks=batch["gt_masks"].float(), num_objects=batch["num_objects"],
            valid_mask=batch["valid_mask"],
        )  # fmt: skip
    assert not torch.allclose(early, late)
    assert torch.allclose(late, want.seg_loss, atol=1e-6)
