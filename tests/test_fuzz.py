"""Property tests (hypothesis) of rewards, metrics, matching and mask post-processing.

Ranges, symmetry, invariance to the order of objects, and identity cases, on random inputs.
Examples are few and small so that the file stays within a few seconds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_segcompass.evaluation.metrics import giou, mask_iou_stats
from modeling_segcompass.matching import linear_sum_assignment, match_slots
from modeling_segcompass.modeling_segcompass import completion_format_problem
from modeling_segcompass.training.rewards import (
    format_score,
    multi_object_mask_score,
    single_mask_score,
)
from tests.helpers import build_tiny_tokenizer_and_processor

FAST = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
PIECES = ["<think>", "</think>", "<REF_POS>", " ", "a", "red circle", "\n", "Sure.", "w " * 11]


def masks_strategy(max_count: int = 3, side: int = 6, min_count: int = 0):
    """(N, side, side) bool masks built from a seed (fast to shrink)."""
    return st.tuples(st.integers(min_count, max_count), st.integers(0, 2**31 - 1)).map(
        lambda a: np.random.default_rng(a[1]).random((a[0], side, side)) < 0.4
    )


def logits_of(masks: np.ndarray, margin: float = 30.0) -> torch.Tensor:
    """Logits that say exactly `masks` (+margin inside, -margin outside)."""
    return torch.from_numpy(masks.astype(np.float32)) * (2 * margin) - margin


# --------------------------------------------------------------------------- format reward
@FAST
@given(st.lists(st.sampled_from(PIECES), max_size=12), st.integers(1, 4))
def test_segment_grounds_every_completion_the_format_reward_accepts(pieces, num_slots):
    text = "".join(pieces)
    refs = text.count("<REF_POS>")
    problem = completion_format_problem(text, num_slots)
    if 1 <= refs <= num_slots and format_score(text, num_ref=refs) > 0:
        assert problem is None  # what the reward accepts, segment grounds
    if refs == 0 or refs > num_slots or "</think>" not in text:
        assert problem is not None and ("<REF_POS>" in problem or "</think>" in problem)


@FAST
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=10), num_ref=st.integers(1, 3),
       noise=st.text(max_size=20))  # fmt: skip
def test_format_score_is_one_of_three_values_and_zero_when_the_rules_fail(pieces, num_ref, noise):
    text = "".join(pieces) + noise
    score = format_score(text, num_ref)
    assert score in (0.0, 0.9, 1.0)
    if "</think>" not in text or text.count("<REF_POS>") != num_ref:
        assert score == 0.0
    if score > 0:  # a valid format: every reference token after the single thought block
        assert text.find("<REF_POS>") > text.find("</think>") > text.find("<think>")


@FAST
@given(thought=st.text(alphabet="abc xyz.,", min_size=1, max_size=60).filter(str.strip),
       num_ref=st.integers(1, 4))  # fmt: skip
def test_well_formed_completion_scores_1(thought, num_ref):
    assert format_score(f"<think>{thought}</think> " + "<REF_POS>" * num_ref, num_ref) == 1.0


# --------------------------------------------------------------------------- mask rewards
@FAST
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 50.0))
def test_single_mask_score_is_in_unit_range_and_1_for_a_confident_exact_mask(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(7, 9, generator=gen) * scale
    gt = (torch.rand(7, 9, generator=gen) < 0.5).float()
    assert 0.0 <= single_mask_score(pred, gt) <= 1.0
    if gt.any():
        assert single_mask_score(gt * 60 - 30, gt) == pytest.approx(1.0, abs=1e-5)


@FAST
@given(gt=masks_strategy(), pred=masks_strategy(), seed=st.integers(0, 1000))
def test_multi_object_score_range_and_invariance_to_object_order(gt, pred, seed):
    conf = torch.full((pred.shape[0],), 3.0)
    if pred.shape[0] == 0:  # keep K >= 1 slots: one confidently absent
        pred, conf = np.zeros((1, 6, 6), bool), torch.tensor([-3.0])
    logits = logits_of(pred)
    gt_t = torch.from_numpy(gt.astype(np.float32))
    score = multi_object_mask_score(logits, conf, gt_t)
    assert 0.0 <= score <= 1.0
    rng = np.random.default_rng(seed)
    gt_perm = torch.from_numpy(rng.permutation(gt.shape[0]))
    slot_perm = torch.from_numpy(rng.permutation(logits.shape[0]))
    shuffled = multi_object_mask_score(logits[slot_perm], conf[slot_perm], gt_t[gt_perm])
    assert shuffled == pytest.approx(score, abs=1e-9)


@FAST
@given(gt=masks_strategy(min_count=1))
def test_multi_object_score_identity_is_1(gt):
    conf = torch.full((gt.shape[0],), 3.0)
    nonempty = gt.reshape(gt.shape[0], -1).any(1).all()
    score = multi_object_mask_score(logits_of(gt), conf, torch.from_numpy(gt.astype(np.float32)))
    # an empty target has soft IoU 0 with any mask, so only non-empty sets score exactly 1
    assert score == pytest.approx(1.0, abs=1e-5) if nonempty else 0.0 <= score <= 1.0


# --------------------------------------------------------------------------- metrics
@FAST
@given(a=masks_strategy(min_count=1, max_count=1), b=masks_strategy(min_count=1, max_count=1))
def test_iou_is_symmetric_bounded_and_1_on_itself(a, b):
    ab = mask_iou_stats(a[0], b[0].astype(np.uint8), ignore_index=None)
    ba = mask_iou_stats(b[0], a[0].astype(np.uint8), ignore_index=None)
    assert ab == ba
    assert 0 <= ab.intersection <= ab.union
    assert ab.intersection == int((a[0] & b[0]).sum()) and ab.union == int((a[0] | b[0]).sum())
    assert giou([a[0]], [a[0].astype(np.uint8)], ignore_index=None) == 1.0


@FAST
@given(preds=st.lists(masks_strategy(1, 1, 1), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_giou_does_not_depend_on_sample_order(preds, seed):
    refs = [np.roll(p[0], 1, axis=1).astype(np.uint8) for p in preds]
    masks = [p[0] for p in preds]
    order = np.random.default_rng(seed).permutation(len(masks))
    forward = giou(masks, refs, ignore_index=None)
    shuffled = giou([masks[i] for i in order], [refs[i] for i in order], ignore_index=None)
    assert 0.0 <= forward <= 1.0 and shuffled == pytest.approx(forward)


# --------------------------------------------------------------------------- matching
@FAST
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_assignment_is_optimal_and_a_matching(rows, cols, seed):
    cost = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    r, c = linear_sum_assignment(cost)
    assert len(r) == len(c) == min(rows, cols)
    assert len(set(r.tolist())) == len(r) and len(set(c.tolist())) == len(c)
    best = min(
        sum(float(cost[i, j]) for i, j in zip(range(rows), perm))
        if rows <= cols
        else sum(float(cost[i, j]) for i, j in zip(perm, range(cols)))
        for perm in itertools.permutations(range(max(rows, cols)), min(rows, cols))
    )
    assert float(cost[r, c].sum()) == pytest.approx(best, abs=1e-5)


@FAST
@given(gt=masks_strategy(min_count=1, max_count=3), seed=st.integers(0, 99))
def test_match_slots_recovers_a_permutation_of_exact_predictions(gt, seed):
    num = gt.shape[0]
    perm = np.random.default_rng(seed).permutation(num)
    distinct = len({m.tobytes() for m in gt}) == num and gt.reshape(num, -1).any(1).all()
    pred = logits_of(gt[perm])[None]  # slot k predicts target perm[k] exactly
    gt_t = torch.from_numpy(gt.astype(np.float32))[None]
    out = match_slots(pred, gt_t, torch.tensor([num]))
    assignment = out.slot_to_target[0].tolist()
    assert sorted(assignment) == list(range(num))  # every target gets one slot
    if distinct:
        assert assignment == perm.tolist()


# --------------------------------------------------------------------------- post-processing
@pytest.fixture(scope="module")
def processor():
    return build_tiny_tokenizer_and_processor(num_slots=1)[1]


@FAST
@given(height=st.integers(1, 90), width=st.integers(1, 90), value=st.floats(-5, 5),
       threshold=st.floats(-4, 4))  # fmt: skip
def test_post_process_of_constant_logits_is_constant_and_consistent(
    processor, height, width, value, threshold
):
    from modeling_segcompass.sam_frame import resized_longest_side

    reshaped = torch.tensor([resized_longest_side(height, width, processor.sam_image_size)])
    original = torch.tensor([[height, width]])
    logits = torch.full((1, 2, 64, 64), value)
    (soft,) = processor.post_process_masks(logits, original, reshaped, threshold=None)
    (hard,) = processor.post_process_masks(logits, original, reshaped, threshold=threshold)
    assert soft.shape == hard.shape == (2, height, width)
    torch.testing.assert_close(soft, torch.full_like(soft, value))
    assert torch.equal(hard, soft > threshold)


@FAST
@given(seed=st.integers(0, 2**31 - 1), height=st.integers(8, 80), width=st.integers(8, 80))
def test_post_process_commutes_with_slot_order_and_negation(processor, seed, height, width):
    from modeling_segcompass.sam_frame import resized_longest_side

    reshaped = torch.tensor([resized_longest_side(height, width, processor.sam_image_size)])
    original = torch.tensor([[height, width]])
    logits = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    (soft,) = processor.post_process_masks(logits, original, reshaped, threshold=None)
    (flipped,) = processor.post_process_masks(logits.flip(1), original, reshaped, threshold=None)
    (negated,) = processor.post_process_masks(-logits, original, reshaped, threshold=None)
    assert torch.equal(flipped, soft.flip(0))
    torch.testing.assert_close(negated, -soft)  # resizing is linear
