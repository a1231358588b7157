"""Tests of modeling_segcompass/training/rewards.py: format/mask scores, paper reference cases, TRL API."""

import doctest

import numpy as np
import pytest
import torch

from modeling_segcompass.training import rewards
from modeling_segcompass.training.rewards import (
    RewardBreakdown,
    combined_reward,
    completion_text,
    format_reward,
    format_score,
    mask_reward,
    multi_object_mask_reward,
    multi_object_mask_score,
    score_completion,
    segcompass_reward,
    single_mask_score,
)

H = W = 4


def logits_of(probs: torch.Tensor) -> torch.Tensor:
    """Logits whose sigmoid is exactly `probs` (0 -> -inf, 1 -> +inf)."""
    return torch.logit(probs)


def test_doctests_pass():
    result = doctest.testmod(rewards, extraglobs={"torch": torch})
    assert result.attempted >= 10 and result.failed == 0


# ------------------------------------------------------------------ paper reference cases
# The reward of arXiv 2605.22658's training section (4x4 masks, reward with format 0 =
# 0.7 * mask), on the cases of the self-test in upstream SegCompass' scots.py. Predictions
# are given upstream as probabilities; we pass their logits.


def _case_perfect_two():
    gt = torch.zeros(2, H, W)
    gt[0, :2, :2] = 1
    gt[1, 2:, 2:] = 1
    return logits_of(gt.clone()), torch.tensor([1.0, 2.0]), gt, 2


def _case_three_vs_one():
    gt = torch.zeros(1, H, W)
    gt[0, :2, :2] = 1
    pred = torch.zeros(3, H, W)
    pred[0, :2, :2] = 1  # one perfect prediction, two empty extras (kept)
    return logits_of(pred), torch.tensor([1.0, 1.0, 1.0]), gt, 1


def _case_soft_matches():
    gt = torch.zeros(2, H, W)
    gt[0, :2, :2] = 1  # area 4
    gt[1, 3, 3] = 1  # area 1
    pred = torch.zeros(3, H, W)
    pred[0, :2, :2] = 0.6  # soft IoU with gt0: 2.4 / 4 = 0.6
    pred[1, 3, 3] = 0.2  # soft IoU with gt1: 0.2 / 1 = 0.2
    # slot 2 is empty and dropped by its confidence logit 0.1 < 0.5
    return logits_of(pred), torch.tensor([0.9, 0.8, 0.1]), gt, 2


def _case_all_dropped():
    gt = torch.zeros(1, H, W)
    gt[0, :2, :2] = 1
    return logits_of(torch.zeros(2, H, W)), torch.tensor([-1.0, -0.1]), gt, 1


def _case_empty_vs_empty():
    return logits_of(torch.zeros(2, H, W)), torch.tensor([-2.0, -3.0]), torch.zeros(0, H, W), 0


REFERENCE_CASES = [
    (_case_perfect_two, 0.7),
    (_case_three_vs_one, 0.2333),
    (_case_soft_matches, 0.28),
    (_case_all_dropped, 0.0),
    (_case_empty_vs_empty, 0.7),
]


@pytest.mark.parametrize(("build", "expected"), REFERENCE_CASES)
def test_paper_reference_cases(build, expected):
    pred, conf, gt, num_objects = build()
    breakdown = score_completion("", pred, conf, gt, num_objects)
    assert isinstance(breakdown, RewardBreakdown)
    assert breakdown.format == 0.0
    assert breakdown.total == pytest.approx(expected, abs=1e-4)
    # The same numbers through the TRL wrapper (text "" has format 0).
    trl_value = segcompass_reward(
        completions=[""], pred_mask_logits=[pred], conf_logits=[conf], gt_masks=[gt],
        num_objects=[num_objects],
    )  # fmt: skip
    assert trl_value[0] == pytest.approx(expected, abs=1e-4)
    mask_only = multi_object_mask_reward(
        completions=[""], pred_mask_logits=[pred], conf_logits=[conf], gt_masks=[gt],
        num_objects=[num_objects],
    )  # fmt: skip
    assert 0.7 * mask_only[0] == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------ format score


GOOD = "<think>The red circle is left of the square.</think> Here it is: <REF_POS>"


@pytest.mark.parametrize(
    ("text", "num_ref", "expected"),
    [
        (GOOD, 1, 1.0),
        ("\n  " + GOOD + " trailing words are fine", 1, 1.0),
        ("<think>" + "x" * 2048 + "</think><REF_POS>", 1, 1.0),
        ("<think>" + "x" * 2049 + "</think><REF_POS>", 1, 0.9),
        ("Sure! " + GOOD, 1, 0.9),
        ("<think>t</think> " + "w " * 10 + "<REF_POS>", 1, 1.0),
        ("<think>t</think> " + "w " * 11 + "<REF_POS>", 1, 0.9),
        ("<think>a</think><REF_POS> <REF_POS>", 2, 1.0),
        ("<think>a</think><REF_POS>", 2, 0.0),
        ("<think>a</think><REF_POS><REF_POS>", 1, 0.0),
        ("no thought <REF_POS>", 1, 0.0),
        ("<think>  \n </think><REF_POS>", 1, 0.0),
        ("<think>a</think><think>b</think><REF_POS>", 1, 0.0),
        ("<think>a<think>b</think><REF_POS>", 1, 0.0),
        ("<think>a <REF_POS></think>", 1, 0.0),
        ("<REF_POS><think>a</think>", 1, 0.0),
        ("<think>a<REF_POS>", 1, 0.0),
    ],
)
def test_format_score_cases(text, num_ref, expected):
    assert format_score(text, num_ref) == expected


def test_format_score_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_ref"):
        format_score(GOOD, 0)
    with pytest.raises(TypeError, match="str"):
        format_score(None)


# ------------------------------------------------------------------ single-object score


def _square_gt() -> torch.Tensor:
    gt = torch.zeros(H, W)
    gt[:2, :2] = 1
    return gt


def test_single_mask_hand_values():
    gt = _square_gt()
    perfect = torch.where(gt > 0, 30.0, -30.0)
    assert single_mask_score(perfect, gt) == pytest.approx(1.0, abs=1e-5)
    # p = 0.6 on the target: soft IoU 0.6, Dice 4.8 / 6.4 = 0.75, hard IoU 1.
    probs = gt * 0.6
    assert single_mask_score(logits_of(probs), gt) == pytest.approx(
        0.5 * 0.6 + 0.2 * 0.75 + 0.3 * 1.0, abs=1e-5
    )
    # p = 0.4: soft IoU 0.4, Dice 3.2 / 5.6, hard IoU 0 (below the 0.5 threshold).
    assert single_mask_score(logits_of(gt * 0.4), gt) == pytest.approx(
        0.5 * 0.4 + 0.2 * 3.2 / 5.6, abs=1e-5
    )
    # Empty ground truth: about 0 whatever the prediction (upstream convention).
    assert single_mask_score(torch.full((H, W), -30.0), torch.zeros(H, W)) == pytest.approx(
        0.0, abs=1e-5
    )


def test_single_mask_valid_mask_and_errors():
    gt = _square_gt()
    pred = torch.where(gt > 0, 30.0, -30.0)
    pred[:, 3] = 30.0  # wrong in the last column only
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[:, 3] = False
    assert single_mask_score(pred, gt) < 0.8
    assert single_mask_score(pred, gt, valid) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        single_mask_score(torch.zeros(1, H, W), torch.zeros(H, W))


# ------------------------------------------------------------------ multi-object score


def test_multi_object_identities():
    generator = torch.Generator().manual_seed(4)
    gt = (torch.rand(3, 6, 6, generator=generator) > 0.5).float()
    pred = torch.randn(5, 6, 6, generator=generator) * 3
    conf = torch.tensor([1.0, -1.0, 2.0, 0.7, 0.5])
    base = multi_object_mask_score(pred, conf, gt)
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert multi_object_mask_score(pred[perm], conf[perm], gt) == pytest.approx(base, abs=1e-6)
    # Ground-truth order does not matter either.
    assert multi_object_mask_score(pred, conf, gt[[2, 0, 1]]) == pytest.approx(base, abs=1e-6)
    # Perfect predictions (large logits) -> 1.
    perfect = (gt * 2 - 1) * 30
    assert multi_object_mask_score(perfect, torch.ones(3), gt) == pytest.approx(1.0, abs=1e-5)
    # A missed object counts 0: two perfect of three -> 2/3.
    assert multi_object_mask_score(perfect, torch.tensor([1.0, 1.0, -1.0]), gt) == pytest.approx(
        2 / 3, abs=1e-5
    )


def test_multi_object_threshold_is_on_logits():
    gt = _square_gt().unsqueeze(0)
    pred = torch.where(gt > 0, 30.0, -30.0)
    # Logit 0.4 (probability 0.6) is not kept: the single target is missed.
    assert multi_object_mask_score(pred, torch.tensor([0.4]), gt) == 0.0
    assert multi_object_mask_score(pred, torch.tensor([0.5]), gt) == pytest.approx(1.0, abs=1e-5)
    assert multi_object_mask_score(pred, torch.tensor([0.4]), gt, conf_threshold=0.0) > 0.99


def test_multi_object_shape_errors():
    with pytest.raises(ValueError, match="conf_logits"):
        multi_object_mask_score(torch.zeros(2, H, W), torch.zeros(3), torch.zeros(1, H, W))
    with pytest.raises(ValueError, match="gt"):
        multi_object_mask_score(torch.zeros(2, H, W), torch.zeros(2), torch.zeros(1, H, 3))


def test_combined_reward_weights():
    assert combined_reward(1.0, 1.0) == pytest.approx(1.0)
    assert combined_reward(0.9, 0.0) == pytest.approx(0.27)
    assert combined_reward(1.0, 0.5, format_weight=0.5, mask_weight=0.5) == pytest.approx(0.75)


def test_score_completion_single_object_mode():
    gt = _square_gt()
    pred = torch.where(gt > 0, 30.0, -30.0).unsqueeze(0).repeat(2, 1, 1)  # (K=2, H, W)
    pred[1] = -30.0  # slot 1 is ignored in single-object mode
    out = score_completion(GOOD, pred, None, gt.unsqueeze(0), -1)
    assert out.format == 1.0
    assert out.mask == pytest.approx(1.0, abs=1e-5)
    assert out.total == pytest.approx(1.0, abs=1e-5)
    missing = score_completion(GOOD, None, None, gt, -1)
    assert missing.mask == pytest.approx(0.0, abs=1e-6) and missing.total == pytest.approx(0.3)
    with pytest.raises(ValueError, match="num_objects"):
        score_completion(GOOD, pred, None, gt.unsqueeze(0), 2)


# ------------------------------------------------------------------ TRL wrappers


def test_completion_text_forms():
    message = [{"role": "assistant", "content": GOOD}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": GOOD}]}]
    assert completion_text(message) == GOOD
    assert completion_text(parts) == GOOD
    with pytest.raises(TypeError, match="completion"):
        completion_text(3)


def test_format_reward_wrapper():
    completions = [GOOD, [{"role": "assistant", "content": "Sure. " + GOOD}], "nothing"]
    values = format_reward(completions=completions, prompts=["p"] * 3, completion_ids=[[1]] * 3,
                           trainer_state=None, image=[None] * 3)  # fmt: skip
    assert values == [1.0, 0.9, 0.0]
    two_refs = "<think>a</think><REF_POS><REF_POS>"
    assert format_reward([two_refs, two_refs], num_ref=[2, 1]) == [1.0, 0.0]
    assert format_reward([two_refs], num_ref=2) == [1.0]
    with pytest.raises(ValueError, match="one entry per completion"):
        format_reward([GOOD], num_ref=[1, 1])


def test_mask_reward_wrapper_lists_none_and_missing_keywords():
    gt = _square_gt()
    perfect = torch.where(gt > 0, 30.0, -30.0)
    values = mask_reward(
        completions=["a", "b", "c", "d"],
        pred_mask_logits=[perfect.unsqueeze(0), None, perfect, perfect],
        gt_masks=[gt.unsqueeze(0).tolist(), gt, None, np.asarray(gt)],
    )
    assert values[0] == pytest.approx(1.0, abs=1e-5)  # nested-list dataset column works
    assert values[1] == pytest.approx(0.0, abs=1e-6)  # no mask predicted
    assert values[2] is None  # sample without mask supervision
    assert values[3] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="pred_mask_logits"):
        mask_reward(completions=["a"], gt_masks=[gt])


def test_multi_object_wrapper_uses_num_objects_and_none_predictions():
    gt = torch.zeros(3, H, W)  # padded to G = 3
    gt[0, :2, :2] = 1
    gt[1, 2:, 2:] = 1
    perfect = torch.where(gt[:2] > 0, 30.0, -30.0)
    conf = torch.tensor([2.0, 2.0])
    values = multi_object_mask_reward(
        completions=["a", "b", "c", "d"],
        pred_mask_logits=[perfect, perfect, None, None],
        conf_logits=[conf, conf, None, None],
        gt_masks=[gt, gt, gt, torch.zeros(3, H, W)],
        num_objects=[2, 1, 2, 0],
    )
    assert values[0] == pytest.approx(1.0, abs=1e-5)  # padding target ignored
    assert values[1] == pytest.approx(0.5, abs=1e-5)  # one extra kept mask
    assert values[2] == 0.0  # nothing predicted, targets exist
    assert values[3] == 1.0  # nothing predicted, no target: correct
    with pytest.raises(ValueError, match="conf_logits"):
        multi_object_mask_reward(completions=["a"], pred_mask_logits=[perfect], gt_masks=[gt],
                                 num_objects=[2])  # fmt: skip


def test_segcompass_reward_combines_format_and_mask():
    gt = _square_gt().unsqueeze(0)
    perfect = torch.where(gt > 0, 30.0, -30.0)
    values = segcompass_reward(
        completions=[[{"role": "assistant", "content": GOOD}], "Sure. " + GOOD, GOOD],
        pred_mask_logits=[perfect, perfect, perfect],
        conf_logits=[torch.tensor([1.0])] * 3,
        gt_masks=[gt, gt, gt],
        num_objects=[1, 1, -1],
    )
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert values[1] == pytest.approx(0.3 * 0.9 + 0.7, abs=1e-5)
    assert values[2] == pytest.approx(1.0, abs=1e-5)  # single-object mode, perfect


def test_format_rewards_score_the_answer_parsed_from_ids_not_text_that_spells_it():
    from modeling_segcompass.answer_format import AnswerTokenIds, parse_answer_ids

    ids = AnswerTokenIds(ref=9, think_start=7, think_end=8)
    spelled = {(60,): "<think>", (61,): " red ", (62,): "</think>", (63,): "<REF_POS>"}

    def decode(run):
        return "".join(spelled.get((t,), "w") for t in run)

    # <think> red </think> by id, then ordinary tokens that decode to "<REF_POS>"
    fake = parse_answer_ids([7, 61, 8, 63], ids, decode)
    real = parse_answer_ids([7, 61, 8, 9], ids, decode)
    text = "<think> red </think><REF_POS>"
    assert fake.text == real.text == text
    assert format_reward([text, text]) == [1.0, 1.0]  # text alone cannot tell them apart
    assert format_reward([text, text], answer=[fake, real]) == [0.0, 1.0]
    gt = torch.zeros(1, 4, 4)
    gt[0, :2] = 1
    pred = torch.full((1, 4, 4), -20.0)
    pred[0, :2] = 20.0
    scores = segcompass_reward(
        [text, text],
        pred_mask_logits=[pred, pred],
        conf_logits=[torch.tensor([5.0]), torch.tensor([5.0])],
        gt_masks=[gt, gt],
        answer=[fake, real],
    )
    assert scores[1] - scores[0] == pytest.approx(0.3)  # the format part only
