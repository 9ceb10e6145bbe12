"""Evaluation loop shared by the evaluation runs (:mod:`llmseg_ros.evaluation.runner`),
the methods comparison and the benchmarks.

A *predictor* is any callable that maps a :class:`~llmseg_ros.data.sample.Sample` to an
(H, W) bool (or 0/1) mask at the sample's resolution. :func:`evaluate_samples` runs one
predictor over samples and scores it with :mod:`llmseg_ros.evaluation.metrics`;
:func:`compare_methods` runs several on the same samples and writes one table
(gIoU / cIoU / ncIoU / seconds per query, LLM-Seg Table 1 style).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.io import atomic_write_json, atomic_write_text
from llmseg_ros.data.sample import IGNORE_VALUE, Sample
from llmseg_ros.evaluation.metrics import SampleMetrics, sample_metrics, summarize

Predictor = Callable[[Sample], np.ndarray]
SampleCallback = Callable[[Sample, np.ndarray, "EvalRecord"], None]


@dataclass(frozen=True)
class EvalRecord:
    """Outcome of one sample.

    Attributes:
        sample_id: the sample's ``image_id``.
        source: the reader that produced the sample.
        is_sentence: sentence / phrase flag of the instruction (``None`` if unknown).
        instruction: the instruction given to the predictor.
        metrics: I, U, IoU (and their 1024 × 1024 counterparts) of the prediction.
        seconds: wall-clock seconds of the predictor call, ``None`` when not timed.
    """

    sample_id: str
    source: str
    is_sentence: bool | None
    instruction: str
    metrics: SampleMetrics
    seconds: float | None

    @property
    def iou(self) -> float:
        return self.metrics.iou

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.sample_id,
            "source": self.source,
            "is_sentence": self.is_sentence,
            "instruction": self.instruction,
            "intersection": self.metrics.intersection,
            "union": self.metrics.union,
            "iou": self.metrics.iou,
            "normalized_intersection": self.metrics.normalized_intersection,
            "normalized_union": self.metrics.normalized_union,
            "height": self.metrics.height,
            "width": self.metrics.width,
            "seconds": self.seconds,
        }


def summarize_records(records: Sequence[EvalRecord]) -> dict[str, Any]:
    """``{"n", "giou", "ciou", "nciou", "seconds_per_query"}`` of a set of records.

    ``seconds_per_query`` is the mean predictor time, ``None`` when the records were not
    timed. Raises ``ValueError`` on an empty set.
    """
    summary: dict[str, Any] = {"n": len(records), **summarize([r.metrics for r in records])}
    times = [r.seconds for r in records if r.seconds is not None]
    summary["seconds_per_query"] = float(np.mean(times)) if times and len(times) == len(records) else None
    return summary


def query_type_breakdown(records: Sequence[EvalRecord]) -> dict[str, dict[str, Any] | None]:
    """LISA Table 1 breakdown: ``overall``, ``short`` (phrases) and ``long`` (sentences).

    A subset with no samples maps to ``None``; records with unknown ``is_sentence`` only
    count in ``overall``.
    """
    short = [r for r in records if r.is_sentence is False]
    long = [r for r in records if r.is_sentence is True]
    return {
        "overall": summarize_records(records) if records else None,
        "short": summarize_records(short) if short else None,
        "long": summarize_records(long) if long else None,
    }


def evaluate_samples(
    samples: Iterable[Sample],
    predict: Predictor,
    *,
    timed: bool = True,
    callback: SampleCallback | None = None,
    start: int = 0,
) -> tuple[dict[str, Any], list[EvalRecord]]:
    """Run ``predict`` on every sample and score it.

    Args:
        samples: the samples, consumed once, in order.
        predict: sample → (H, W) bool / 0-1 mask at the sample's resolution.
        timed: record the wall-clock time of each ``predict`` call.
        callback: called with (sample, prediction as bool, record) after each sample, for
            example to keep the worst samples for overlays (:class:`WorstSamples`).
        start: position of the first sample in the whole split (records' ``metrics.index``
            count from it; one process of several evaluates a block of the split).

    Returns:
        ``(summary, records)``: :func:`summarize_records` of all samples, and one
        :class:`EvalRecord` per sample in order.

    Raises:
        ValueError: no samples, or a prediction of the wrong shape or values (the message
            names the sample id).
        TypeError: a prediction that is not a numpy array of bool / integers.
    """
    records: list[EvalRecord] = []
    for index, sample in enumerate(samples):
        began = time.perf_counter()
        prediction = predict(sample)
        seconds = time.perf_counter() - began if timed else None
        try:
            metrics = sample_metrics(prediction, sample.mask, index=start + index)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"sample {sample.image_id!r}: {exc}") from exc
        record = EvalRecord(
            sample_id=sample.image_id,
            source=sample.source,
            is_sentence=sample.is_sentence,
            instruction=sample.instruction,
            metrics=metrics,
            seconds=seconds,
        )
        records.append(record)
        if callback is not None:
            callback(sample, np.asarray(prediction).astype(bool), record)
    if not records:
        raise ValueError("evaluate_samples got no samples")
    return summarize_records(records), records


# -- overlays -------------------------------------------------------------------------


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour-code a prediction against the truth on top of the image.

    Green: predicted and true; red: predicted, not true (false positive); blue: true, not
    predicted (miss); grey: ignore pixels.

    Args:
        image: (H, W, 3) uint8 RGB.
        prediction: (H, W) bool.
        truth: (H, W) uint8 0/1/255.
        alpha: weight of the colour over the image.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if prediction.shape != image.shape[:2] or truth.shape != image.shape[:2]:
        raise ValueError(
            f"overlay needs image {image.shape[:2]}, prediction {prediction.shape} and truth {truth.shape} to match"
        )
    out = image.astype(np.float32)
    ignore = truth == IGNORE_VALUE
    target = truth == 1
    pred = prediction.astype(bool) & ~ignore
    for region, colour in (
        (pred & target, (0, 200, 0)),
        (pred & ~target, (230, 0, 0)),
        (~pred & target, (0, 80, 255)),
        (ignore, (128, 128, 128)),
    ):
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(colour, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class WorstSamples:
    """Callback for :func:`evaluate_samples` that keeps the ``n`` lowest-IoU samples.

    Ties keep the earlier sample. ``worst()`` lists (record, overlay image) from worst up.
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self._heap: list[tuple[float, int, EvalRecord, np.ndarray]] = []
        self._count = 0

    def __call__(self, sample: Sample, prediction: np.ndarray, record: EvalRecord) -> None:
        if self.n == 0:
            return
        # max-heap on IoU (then on arrival order) through negation: the root is the best kept one
        key = (-record.iou, -self._count)
        self._count += 1
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, (*key, record, overlay(sample.image, prediction, sample.mask)))
        elif key > self._heap[0][:2]:
            heapq.heapreplace(self._heap, (*key, record, overlay(sample.image, prediction, sample.mask)))

    def worst(self) -> list[tuple[EvalRecord, np.ndarray]]:
        ordered = sorted(self._heap, key=lambda item: (-item[0], -item[1]))
        return [(record, image) for _, _, record, image in ordered]


# -- comparison table -----------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}"


def _secs(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(rows: Sequence[tuple[str, Mapping[str, Any]]], first_column: str = "Method") -> str:
    """Markdown table of summaries: name | n | gIoU | cIoU | ncIoU | s/query (IoUs in percent)."""
    lines = [
        f"| {first_column} | n | gIoU | cIoU | ncIoU | s/query |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, summary in rows:
        lines.append(
            f"| {name} | {summary['n']} | {_pct(summary['giou'])} | {_pct(summary['ciou'])} | "
            f"{_pct(summary['nciou'])} | {_secs(summary.get('seconds_per_query'))} |"
        )
    return "\n".join(lines) + "\n"


def compare_methods(
    samples: Sequence[Sample],
    predictors: Mapping[str, Predictor],
    *,
    out_dir: str | Path | None = None,
    title: str = "Methods comparison",
) -> dict[str, dict[str, Any]]:
    """Run several predictors on the same samples; optionally write one comparison table.

    Args:
        samples: indexable samples (datasets load lazily, so each predictor re-reads them).
        predictors: name → predictor, in table order.
        out_dir: when given, ``comparison.json`` (summaries and per-sample IoUs) and
            ``comparison.md`` (table) are written there atomically.
        title: heading of the Markdown file.

    Returns:
        name → summary (see :func:`summarize_records`).
    """
    if not predictors:
        raise ValueError("compare_methods needs at least one predictor")
    summaries: dict[str, dict[str, Any]] = {}
    per_sample: dict[str, list[dict[str, Any]]] = {}
    for name, predict in predictors.items():
        summary, records = evaluate_samples((samples[i] for i in range(len(samples))), predict)
        summaries[name] = summary
        per_sample[name] = [{"id": r.sample_id, "iou": r.iou, "seconds": r.seconds} for r in records]
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "comparison.json", {"methods": summaries, "samples": per_sample})
        table = markdown_table(list(summaries.items()))
        atomic_write_text(
            out / "comparison.md",
            f"# {title}\n\n{len(samples)} samples; IoUs in percent; seconds per query include frame preparation.\n\n{table}",
        )
    return summaries
