"""gIoU / cIoU / ncIoU on hand-computed cases and against a LISA-style reference."""

from __future__ import annotations

import numpy as np
import pytest

from llmseg_ros.evaluation.metrics import (
    IOU_EPS,
    MetricAccumulator,
    reasonseg_metrics,
    sample_metrics,
    summarize,
)

# 2 x 4 sample with an ignore column: I = 2, U = 4 (6 if the ignore column counted)
GT_A = np.array([[1, 1, 255, 0], [0, 1, 255, 0]], dtype=np.uint8)
PRED_A = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], dtype=np.uint8)
# 3 x 3 sample: truth is the first row, prediction the first column: I = 1, U = 5
GT_B = np.zeros((3, 3), dtype=np.uint8)
GT_B[0, :] = 1
PRED_B = np.zeros((3, 3), dtype=bool)
PRED_B[:, 0] = True


def test_ignore_pixels_leave_intersection_and_union() -> None:
    record = sample_metrics(PRED_A, GT_A)
    assert (record.intersection, record.union) == (2, 4)
    assert record.iou == pytest.approx(2 / (4 + IOU_EPS), abs=0)
    assert (record.height, record.width) == (2, 4)


def test_empty_truth_scores_one_with_empty_prediction_and_zero_otherwise() -> None:
    gt = np.zeros((4, 5), dtype=np.uint8)
    empty = sample_metrics(np.zeros((4, 5), dtype=bool), gt)
    assert (empty.intersection, empty.union, empty.iou) == (0, 0, 1.0)
    wrong = np.zeros((4, 5), dtype=bool)
    wrong[1, 1:4] = True
    spurious = sample_metrics(wrong, gt)
    assert (spurious.intersection, spurious.union, spurious.iou) == (0, 3, 0.0)
    # a prediction only on ignore pixels is no error either
    gt_ignore = np.zeros((4, 5), dtype=np.uint8)
    gt_ignore[1, 1:4] = 255
    assert sample_metrics(wrong, gt_ignore).iou == 1.0


def test_split_metrics_with_images_of_different_sizes() -> None:
    metrics = reasonseg_metrics([PRED_A, PRED_B], [GT_A, GT_B])
    assert metrics["giou"] == pytest.approx((2 / (4 + IOU_EPS) + 1 / (5 + IOU_EPS)) / 2, rel=1e-12)
    assert metrics["ciou"] == pytest.approx(3 / 9, rel=1e-12)
    assert set(metrics) == {"giou", "ciou", "nciou"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_all_empty_split_is_perfect() -> None:
    gts = [np.zeros((2, 3), np.uint8), np.full((5, 4), 255, np.uint8)]
    preds = [np.zeros((2, 3), bool), np.ones((5, 4), bool)]
    assert reasonseg_metrics(preds, gts) == {"giou": 1.0, "ciou": 1.0, "nciou": 1.0}


def test_nciou_weighs_every_image_equally() -> None:
    # 2 x 2 image (each pixel becomes a 512 x 512 block): I = 1, U = 2
    gt_small = np.array([[1, 0], [0, 0]], np.uint8)
    pred_small = np.array([[1, 1], [0, 0]], bool)
    # 4 x 4 image (256 x 256 blocks), perfect: I = U = 16
    gt_big = np.ones((4, 4), np.uint8)
    pred_big = np.ones((4, 4), bool)
    metrics = reasonseg_metrics([pred_small, pred_big], [gt_small, gt_big])
    assert metrics["ciou"] == pytest.approx(17 / 18)
    # normalised: I = 512² + 1024², U = 2·512² + 1024²  → 5/6
    assert metrics["nciou"] == pytest.approx(5 / 6)
    assert metrics["giou"] == pytest.approx((1 / (2 + IOU_EPS) + 16 / (16 + IOU_EPS)) / 2)


def test_nciou_uses_floor_nearest_neighbour_mapping() -> None:
    # 3 rows → 1024: cv2.INTER_NEAREST maps output row y to input row floor(y * 3 / 1024),
    # so input row 0 covers 342 output rows and rows 1, 2 cover 341 each.
    gt = np.array([[1], [0], [0]], np.uint8)
    pred = np.array([[1], [1], [0]], bool)
    record = sample_metrics(pred, gt)
    assert (record.normalized_intersection, record.normalized_union) == (342 * 1024, 683 * 1024)
    # ignore pixels survive the resize
    gt_ignore = np.array([[1], [255], [0]], np.uint8)
    record = sample_metrics(pred, gt_ignore)
    assert (record.normalized_intersection, record.normalized_union) == (342 * 1024, 342 * 1024)


def test_mismatched_shapes_name_index_and_both_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"sample 1: prediction shape \(3, 2\) does not match ground-truth shape \(3, 3\)"
    ):
        reasonseg_metrics([PRED_A, np.zeros((3, 2), bool)], [GT_A, GT_B])


@pytest.mark.parametrize(
    ("preds", "gts", "message"),
    [
        ([np.full((2, 2), 2, np.uint8)], [np.zeros((2, 2), np.uint8)], "prediction 0 values must be 0 or 1"),
        (
            [np.zeros((2, 2), bool)],
            [np.full((2, 2), 7, np.uint8)],
            r"ground truth 0 values must be 0, 1 or 255, found \[7\]",
        ),
        (
            [np.zeros((2, 2), np.float32)],
            [np.zeros((2, 2), np.uint8)],
            "prediction 0 must be bool or integer",
        ),
        ([np.zeros((2, 2, 1), bool)], [np.zeros((2, 2), np.uint8)], r"prediction 0 must be \(H, W\)"),
        ([np.zeros((2, 2), bool)], [], "got 1 predictions but 0 ground truths"),
        ([], [], "at least one sample"),
    ],
)
def test_bad_inputs_are_rejected(preds: list, gts: list, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        reasonseg_metrics(preds, gts)


def test_accumulator_matches_batch_function_and_guards_empty_summary() -> None:
    acc = MetricAccumulator()
    with pytest.raises(RuntimeError, match="before any sample"):
        acc.summary()
    first = acc.add(PRED_A, GT_A)
    second = acc.add(PRED_B, GT_B)
    assert (first.index, second.index) == (0, 1)
    assert (second.intersection, second.union) == (1, 5)
    assert len(acc) == 2
    assert acc.summary() == reasonseg_metrics([PRED_A, PRED_B], [GT_A, GT_B])
    assert summarize(acc.records) == acc.summary()
    assert first.to_dict()["union"] == 4


def _reference(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float]:
    """LISA's intersectionAndUnion (2 classes, ignore 255) in plain numpy."""
    ious, inter_sum, union_sum = [], 0, 0
    for pred, gt in zip(preds, gts):
        output = pred.astype(np.int64).copy()
        target = gt.astype(np.int64)
        output[target == 255] = 255
        matched = output[output == target]
        area_i = np.histogram(matched, bins=2, range=(0, 1))[0]
        area_o = np.histogram(output, bins=2, range=(0, 1))[0]
        area_t = np.histogram(target, bins=2, range=(0, 1))[0]
        area_u = area_o + area_t - area_i
        iou = area_i / (area_u + 1e-5)
        iou[area_u == 0] = 1.0
        ious.append(iou[1])
        inter_sum += area_i[1]
        union_sum += area_u[1]
    return float(np.mean(ious)), float(inter_sum / union_sum)


def test_agrees_with_reference_implementation_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(12):
        h, w = rng.integers(5, 40, size=2)
        gt = (rng.random((h, w)) < 0.4).astype(np.uint8)
        gt[rng.random((h, w)) < 0.1] = 255
        preds.append(rng.random((h, w)) < 0.5)
        gts.append(gt)
    gts[3][:] = 0
    preds[3][:] = False  # one empty/empty sample
    giou, ciou = _reference(preds, gts)
    metrics = reasonseg_metrics(preds, gts)
    assert metrics["giou"] == pytest.approx(giou, rel=1e-12)
    assert metrics["ciou"] == pytest.approx(ciou, rel=1e-12)
