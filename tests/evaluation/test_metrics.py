"""Tests of modeling_segcompass.evaluation.metrics and the `evaluate` wrapper, on hand-computed masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_segcompass.evaluation.metrics import (
    IoUStats,
    SegmentationMetrics,
    ciou,
    giou,
    mask_iou_stats,
    segmentation_metrics,
)

METRIC_SCRIPT = Path(__file__).resolve().parents[2] / "examples/evaluate_metric/segcompass_iou.py"


def sample_a() -> tuple[np.ndarray, np.ndarray]:
    """I = 2, U = 4 (IoU 0.5)."""
    pred = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    gt = np.array([[0, 1, 1, 1], [0, 0, 0, 0]], dtype=np.uint8)
    return pred, gt


def sample_b() -> tuple[np.ndarray, np.ndarray]:
    """I = 3, U = 12 (IoU 0.25)."""
    return np.ones((3, 4), dtype=bool), np.eye(3, 4, dtype=np.uint8)


def test_two_samples_giou_and_ciou_hand_computed():
    (pa, ga), (pb, gb) = sample_a(), sample_b()
    assert mask_iou_stats(pa, ga) == IoUStats(2, 4)
    assert mask_iou_stats(pb, gb) == IoUStats(3, 12)
    result = segmentation_metrics([pa, pb], [ga, gb])
    assert result.overall.giou == pytest.approx((0.5 + 0.25) / 2)
    assert result.overall.ciou == pytest.approx(5 / 16)
    assert (result.overall.intersection, result.overall.union, result.overall.n) == (5, 16, 2)
    assert giou([pa, pb], [ga, gb]) == pytest.approx(0.375)
    assert ciou([pa, pb], [ga, gb]) == pytest.approx(0.3125)


def test_ignore_index_pixels_are_excluded_from_both_counts():
    pred = np.ones((2, 2), dtype=bool)
    gt = np.array([[1, 255], [0, 255]], dtype=np.uint8)
    # Right column ignored; left column: I = 1 (top), U = 2.
    assert mask_iou_stats(pred, gt) == IoUStats(1, 2)
    # A prediction that lies only on ignored pixels counts as empty.
    only_ignored = np.array([[0, 1], [0, 1]], dtype=bool)
    score = SegmentationMetrics().add(only_ignored, gt)
    assert score.pred_empty and (score.intersection, score.union) == (0, 1)
    # Another ignore label can be chosen; 255 is then an invalid value.
    gt_7 = np.where(gt == 255, 7, gt).astype(np.uint8)
    assert mask_iou_stats(pred, gt_7, ignore_index=7) == IoUStats(1, 2)
    with pytest.raises(ValueError, match=r"values must be 0, 1 and 7 \(ignore\); got .*255"):
        mask_iou_stats(pred, gt, ignore_index=7)


@pytest.mark.parametrize("empty_iou", [1.0, 0.0])
def test_empty_vs_empty_convention(empty_iou):
    pa, ga = sample_a()
    empty = np.zeros((2, 3), dtype=np.uint8)
    metrics = SegmentationMetrics(empty_iou=empty_iou)
    metrics.add(pa, ga)
    score = metrics.add(empty, empty)
    assert score.iou == empty_iou and not score.no_target
    result = metrics.compute()
    assert result.overall.giou == pytest.approx((0.5 + empty_iou) / 2)
    assert result.overall.ciou == pytest.approx(0.5)  # nothing added to the sums
    # The empty unflagged sample is neither a target nor a no-target sample.
    assert result.overall.t_acc == 1.0 and result.overall.n_acc is None
    assert result.empty_iou == empty_iou
    # A non-empty prediction on an empty unflagged ground truth scores 0 either way.
    assert metrics.add(np.ones((1, 2)), np.zeros((1, 2))).iou == 0.0


def test_no_target_tp_fn_fp_tn_and_accuracies():
    pa, ga = sample_a()
    pb, gb = sample_b()
    h, w = 2, 4
    empty = np.zeros((h, w), dtype=bool)
    three_px = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    target_4px = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=np.uint8)
    metrics = SegmentationMetrics()
    tp = metrics.add(empty, np.zeros((0, h, w), np.uint8))  # K = 0 -> inferred no-target
    fn = metrics.add(three_px, np.zeros((h, w), np.uint8), no_target=True)
    fp = metrics.add(empty, target_4px)
    metrics.add(empty, target_4px, no_target=False)  # a second FP
    tn_a = metrics.add(pa, ga)
    metrics.add(pb, gb)
    assert tp == (0, 0, 1.0, True, True)
    assert fn == (0, 3, 0.0, False, True)  # union grows by the predicted area
    assert fp == (0, 4, 0.0, True, False)
    assert tn_a.iou == 0.5
    overall = metrics.compute().overall
    assert (overall.tp, overall.fn, overall.fp, overall.tn) == (1, 1, 2, 2)
    assert overall.n_acc == pytest.approx(1 / (1 + 1))  # TP / (TP + FN)
    assert overall.t_acc == pytest.approx(2 / (2 + 2))  # TN / (TN + FP)
    assert overall.giou == pytest.approx((1 + 0 + 0 + 0 + 0.5 + 0.25) / 6)
    assert overall.ciou == pytest.approx((0 + 0 + 0 + 0 + 2 + 3) / (0 + 3 + 4 + 4 + 4 + 12))


def test_no_target_from_empty_lists_and_contradictions():
    metrics = SegmentationMetrics()
    assert metrics.add([], []).no_target  # nothing predicted, nothing to find: TP
    assert metrics.add(np.ones((1, 2)), []).no_target
    overall = metrics.compute().overall
    assert (overall.tp, overall.fn, overall.n_acc) == (1, 1, 0.5)
    assert overall.ciou == 0.0  # FN: U = 2, I = 0
    with pytest.raises(ValueError, match="no_target=True but the ground truth has 1 foreground"):
        metrics.add(np.zeros((1, 2)), np.array([[0, 1]]), no_target=True)
    # An empty 2-D mask flagged False is an ordinary sample under empty_iou.
    assert not metrics.add(np.zeros((1, 2)), np.zeros((1, 2)), no_target=False).no_target


def test_per_family_split_and_table():
    pa, ga = sample_a()
    pb, gb = sample_b()
    empty = np.zeros((2, 4), dtype=bool)
    result = segmentation_metrics(
        [pa, empty, pb, pb],
        [ga, np.zeros((0, 2, 4)), gb, gb],
        families=["reasonseg", "grefcoco", "grefcoco", None],
    )
    assert list(result.per_family) == ["reasonseg", "grefcoco"]
    reason, gref = result.per_family["reasonseg"], result.per_family["grefcoco"]
    assert (reason.giou, reason.ciou, reason.n_acc, reason.t_acc, reason.n) == (
        0.5,
        0.5,
        None,
        1.0,
        1,
    )
    assert gref.giou == pytest.approx((1.0 + 0.25) / 2) and gref.ciou == pytest.approx(0.25)
    assert (gref.n_acc, gref.t_acc, gref.n) == (1.0, 1.0, 2)
    # The unlabelled sample counts only in `overall`.
    assert result.overall.n == 4
    assert result.overall.ciou == pytest.approx((2 + 3 + 3) / (4 + 12 + 12))
    assert result.to_table().splitlines() == [
        "| group | gIoU | cIoU | N-acc | T-acc | n |",
        "|---|---|---|---|---|---|",
        "| reasonseg | 50.00 | 50.00 | - | 100.00 | 1 |",
        "| grefcoco | 62.50 | 25.00 | 100.00 | 100.00 | 2 |",
        "| overall | 50.00 | 28.57 | 100.00 | 100.00 | 4 |",
    ]
    assert "| reasonseg | 0.500 | 0.500 | - | 1.000 | 1 |" in result.to_table(
        percent=False, digits=3
    )
    as_dict = result.to_dict()
    assert as_dict["overall"]["gIoU"] == pytest.approx(0.5)
    assert as_dict["per_family"]["grefcoco"]["N-acc"] == 1.0
    assert as_dict["per_family"]["reasonseg"]["intersection"] == 2
    assert as_dict["empty_iou"] == 1.0


def test_multi_object_samples_use_the_union_of_masks():
    pred = np.array([[[1, 0, 0, 0]], [[0, 0, 1, 0]]], dtype=bool)  # (K=2, 1, 4)
    gt = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 1]]], dtype=np.uint8)  # K=3
    # Unions: pred [1,0,1,0], gt [1,1,0,1] -> I = 1, U = 4.
    assert mask_iou_stats(pred, gt) == IoUStats(1, 4)
    assert mask_iou_stats(pred[::-1], gt[::-1]) == IoUStats(1, 4)  # object order is irrelevant
    # torch tensors and lists of tensors give the same counts.
    assert mask_iou_stats(torch.from_numpy(pred), torch.from_numpy(gt)) == IoUStats(1, 4)
    assert mask_iou_stats(list(torch.from_numpy(pred)), list(torch.from_numpy(gt))) == (1, 4)


def test_thresholding_is_explicit():
    gt = np.array([[1, 1, 0]], dtype=np.uint8)
    logits = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"not binary .* Pass threshold=0.0 for mask logits"):
        mask_iou_stats(logits, gt)
    assert mask_iou_stats(logits, gt, threshold=0.0) == IoUStats(1, 3)
    probs = np.array([[0.9, 0.6, 0.2]])
    assert mask_iou_stats(probs, gt, threshold=0.5) == IoUStats(2, 2)
    # Floats that are already 0/1 need no threshold.
    assert mask_iou_stats(np.array([[1.0, 0.0, 0.0]]), gt) == IoUStats(1, 2)


def test_bad_inputs_are_refused_with_clear_messages():
    metrics = SegmentationMetrics()
    metrics.add(*sample_a())
    with pytest.raises(ValueError, match=r"Sample 1: prediction shape \(2, 3\) and ground-truth "):
        metrics.add(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"ground-truth shape \(3, 2\) differ"):
        metrics.add(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"Sample 1: expected the prediction .* \(1, 1, 2, 3\)"):
        metrics.add(np.zeros((1, 1, 2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Sample 1: the ground truth masks could not be stacked"):
        metrics.add(np.zeros((2, 3)), [np.zeros((2, 3)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match=r"ground-truth values must be 0, 1 .*\[0, 2\]"):
        metrics.add(np.zeros((1, 2)), np.array([[0, 2]]))
    with pytest.raises(ValueError, match="'overall' is reserved"):
        metrics.add(*sample_a(), family="overall")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.add_batch([sample_a()[0]] * 2, [sample_a()[1]])
    with pytest.raises(ValueError, match="empty_iou must lie in"):
        SegmentationMetrics(empty_iou=2.0)
    # Refused samples were not counted.
    assert len(metrics) == 1
    with pytest.raises(ValueError, match="No sample was added"):
        SegmentationMetrics().compute()


def test_streaming_matches_a_naive_reference_on_random_masks():
    rng = np.random.default_rng(0)
    preds = [rng.random((5, 6)) > 0.5 for _ in range(20)]
    gts = [(rng.random((5, 6)) > 0.6).astype(np.uint8) for _ in range(20)]
    inter = [int((p & (g == 1)).sum()) for p, g in zip(preds, gts)]
    union = [int((p | (g == 1)).sum()) for p, g in zip(preds, gts)]
    ious = [i / u if u else 1.0 for i, u in zip(inter, union)]
    metrics = SegmentationMetrics()
    for p, g in zip(preds, gts):
        metrics.add(torch.from_numpy(p), g)
    overall = metrics.compute().overall
    assert overall.giou == pytest.approx(sum(ious) / 20)
    assert overall.ciou == pytest.approx(sum(inter) / sum(union))
    metrics.reset()
    assert len(metrics) == 0


def test_evaluate_module_loads_offline_and_matches(monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(str(METRIC_SCRIPT), cache_dir=str(tmp_path), keep_in_memory=True)
    (pa, ga), (pb, gb) = sample_a(), sample_b()
    out = metric.compute(
        predictions=[pa.astype(np.uint8), pb.astype(np.uint8), np.zeros((2, 2), np.uint8)],
        references=[ga, gb, np.zeros((2, 2), np.uint8)],
        families=["a", "b", "b"],
        no_target=[False, False, True],
    )
    assert out["gIoU"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert out["cIoU"] == pytest.approx(5 / 16)
    assert (out["N-acc"], out["T-acc"], out["n"]) == (1.0, 1.0, 3)
    assert out["per_family"]["b"]["gIoU"] == pytest.approx(0.625)
    # Seg-Zero convention through the same interface.
    out = metric.compute(
        predictions=[np.zeros((1, 2), np.uint8)],
        references=[np.zeros((1, 2), np.uint8)],
        empty_iou=0.0,
    )
    assert out["gIoU"] == 0.0 and out["cIoU"] is None
