"""ReasonSeg metrics: gIoU, cIoU (LISA) and ncIoU (LLM-Seg).

Rules (shared by every function here):

* predictions are (H, W) bool or integer 0/1 arrays; ground truths are (H, W) uint8 with
  0 = background, 1 = target, 255 = ignore; each prediction has its ground truth's shape
  (samples may differ in size);
* per sample, I and U are the pixel counts of prediction ∩ target and prediction ∪ target
  over the pixels whose ground truth is not 255 (ignore pixels count in neither);
* per-sample IoU = I / (U + 1e-5), and 1.0 when U == 0 (empty truth, empty prediction);
* gIoU = mean of the per-sample IoUs;
* cIoU = ΣI / ΣU over the samples; when ΣU == 0 (every truth and every prediction empty)
  cIoU is 1.0, the same convention as the per-sample rule;
* ncIoU = cIoU computed after nearest-neighbour resizing (``cv2.INTER_NEAREST``) of each
  prediction and truth to 1024 × 1024, aspect ratio ignored, so every image weighs the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

IGNORE_VALUE = 255
IOU_EPS = 1e-5
NORMALIZED_SIZE = 1024
METRIC_KEYS = ("giou", "ciou", "nciou")


@dataclass(frozen=True)
class SampleMetrics:
    """Counts and IoU of one sample.

    Attributes:
        index: position of the sample in the evaluation order.
        intersection: foreground pixels in prediction ∩ truth (ignore pixels excluded).
        union: foreground pixels in prediction ∪ truth (ignore pixels excluded).
        iou: per-sample IoU (1.0 when ``union == 0``).
        normalized_intersection: ``intersection`` after resizing both masks to 1024 × 1024.
        normalized_union: ``union`` after resizing both masks to 1024 × 1024.
        height: ground-truth height in pixels.
        width: ground-truth width in pixels.
    """

    index: int
    intersection: int
    union: int
    iou: float
    normalized_intersection: int
    normalized_union: int
    height: int
    width: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_prediction(pred: Any, index: int) -> np.ndarray:
    if not isinstance(pred, np.ndarray):
        raise TypeError(f"prediction {index} must be a numpy array, got {type(pred).__name__}")
    if pred.ndim != 2:
        raise ValueError(f"prediction {index} must be (H, W), got shape {pred.shape}")
    if pred.dtype == bool:
        return pred
    if not np.issubdtype(pred.dtype, np.integer):
        raise TypeError(f"prediction {index} must be bool or integer 0/1, got dtype {pred.dtype}")
    if ((pred != 0) & (pred != 1)).any():
        raise ValueError(
            f"prediction {index} values must be 0 or 1 (or bool), found {np.unique(pred)[:5].tolist()}"
        )
    return pred.astype(bool)


def _as_truth(gt: Any, index: int) -> np.ndarray:
    if not isinstance(gt, np.ndarray):
        raise TypeError(f"ground truth {index} must be a numpy array, got {type(gt).__name__}")
    if gt.ndim != 2:
        raise ValueError(f"ground truth {index} must be (H, W), got shape {gt.shape}")
    if not (gt.dtype == bool or np.issubdtype(gt.dtype, np.integer)):
        raise TypeError(f"ground truth {index} must be integer 0/1/255, got dtype {gt.dtype}")
    gt = gt.astype(np.uint8) if gt.dtype != np.uint8 else gt
    bad = (gt > 1) & (gt != IGNORE_VALUE)
    if bad.any():
        raise ValueError(
            f"ground truth {index} values must be 0, 1 or 255, found {np.unique(gt[bad])[:5].tolist()}"
        )
    return gt


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    valid = gt != IGNORE_VALUE
    p = pred & valid
    g = gt == 1
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def sample_iou(intersection: int, union: int) -> float:
    """Per-sample IoU: ``I / (U + 1e-5)``, and 1.0 when ``U == 0``."""
    if union == 0:
        return 1.0
    return float(intersection / (union + IOU_EPS))


def cumulative_iou(intersection: int, union: int) -> float:
    """ΣI / ΣU, and 1.0 when ΣU == 0 (nothing to find and nothing predicted)."""
    if union == 0:
        return 1.0
    return float(intersection / union)


def resize_nearest(mask: np.ndarray, size: int = NORMALIZED_SIZE) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) uint8 mask to (size, size), aspect ignored."""
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)


def sample_metrics(pred: np.ndarray, gt: np.ndarray, index: int = 0) -> SampleMetrics:
    """Counts and IoU of one prediction against its ground truth.

    Args:
        pred: (H, W) bool or integer 0/1.
        gt: (H, W) integer 0/1/255, same shape as ``pred``.
        index: the sample's position, used in error messages and the record.

    Raises:
        ValueError: shapes differ (the message names ``index`` and both shapes) or values
            are outside the allowed sets.
    """
    p = _as_prediction(pred, index)
    g = _as_truth(gt, index)
    if p.shape != g.shape:
        raise ValueError(
            f"sample {index}: prediction shape {p.shape} does not match ground-truth shape {g.shape}"
        )
    intersection, union = _counts(p, g)
    n_intersection, n_union = _counts(resize_nearest(p.astype(np.uint8)).astype(bool), resize_nearest(g))
    return SampleMetrics(
        index=index,
        intersection=intersection,
        union=union,
        iou=sample_iou(intersection, union),
        normalized_intersection=n_intersection,
        normalized_union=n_union,
        height=int(g.shape[0]),
        width=int(g.shape[1]),
    )


def summarize(records: Sequence[SampleMetrics]) -> dict[str, float]:
    """gIoU, cIoU and ncIoU of a set of per-sample records (any subset of an evaluation).

    Raises:
        ValueError: ``records`` is empty (the mean of no IoUs is undefined).
    """
    if len(records) == 0:
        raise ValueError("cannot summarise an empty set of samples")
    return {
        "giou": float(np.mean([r.iou for r in records])),
        "ciou": cumulative_iou(sum(r.intersection for r in records), sum(r.union for r in records)),
        "nciou": cumulative_iou(
            sum(r.normalized_intersection for r in records), sum(r.normalized_union for r in records)
        ),
    }


class MetricAccumulator:
    """Adds samples one at a time; ``summary()`` gives the split's metrics.

    Example::

        acc = MetricAccumulator()
        for pred, gt in pairs:
            record = acc.add(pred, gt)
        print(acc.summary())  # {"giou": ..., "ciou": ..., "nciou": ...}
    """

    def __init__(self) -> None:
        self.records: list[SampleMetrics] = []

    def __len__(self) -> int:
        return len(self.records)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> SampleMetrics:
        """Score one sample (see :func:`sample_metrics`) and keep its record."""
        record = sample_metrics(pred, gt, index=len(self.records))
        self.records.append(record)
        return record

    def summary(self) -> dict[str, float]:
        """gIoU, cIoU, ncIoU over every sample added so far.

        Raises:
            RuntimeError: no sample was added yet.
        """
        if not self.records:
            raise RuntimeError("MetricAccumulator.summary() called before any sample was added")
        return summarize(self.records)


def reasonseg_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict[str, float]:
    """gIoU, cIoU and ncIoU of paired predictions and ground truths (rules in the module docstring).

    Args:
        preds: N arrays (H_i, W_i), bool or 0/1.
        gts: N arrays (H_i, W_i), values 0/1/255.

    Returns:
        ``{"giou": float, "ciou": float, "nciou": float}``, each in [0, 1].

    Raises:
        ValueError: the lists differ in length or are empty, a prediction's shape differs
            from its truth's (the message names the index and both shapes), or values
            fall outside the allowed sets.
    """
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions but {len(gts)} ground truths")
    if len(preds) == 0:
        raise ValueError("reasonseg_metrics needs at least one sample")
    accumulator = MetricAccumulator()
    for pred, gt in zip(preds, gts, strict=True):
        accumulator.add(pred, gt)
    return accumulator.summary()
