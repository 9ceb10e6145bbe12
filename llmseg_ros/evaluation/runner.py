"""Evaluation runs: one predictor on a split, a report over splits, a comparison of methods.

* :func:`evaluate_split` is the library entry point "evaluate a predictor on a dataset
  split": metrics, per-sample records and the worst samples' overlays, nothing written.
* :func:`run_evaluation` (one model or saved masks over every split → ``report.json`` /
  ``report.md``) and :func:`run_comparison` (several models → ``{split}/comparison.*``)
  are ``training/evaluate.py``'s two modes.

Several processes (``accelerate launch`` / ``torchrun``, see
:mod:`llmseg_ros.utils.distributed`) share the work: each evaluates one contiguous block
of every split with its own model on its own device, and the per-sample records and
worst-sample candidates are gathered, so every metric, breakdown, table and overlay is
the one a single process computes (only timings differ). Rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from llmseg_ros.config import SegmenterConfig
from llmseg_ros.data.sample import Sample
from llmseg_ros.evaluation.datasets import load_split, sample_count
from llmseg_ros.evaluation.predictors import (
    loaded_segmenter,
    model_predictor,
    pred_dir_predictor,
    resolve_config,
    row_config,
    segmenter_predictor,
)
from llmseg_ros.evaluation.report import (
    EvalRecord,
    Predictor,
    WorstSamples,
    evaluate_samples,
    query_type_breakdown,
    summarize_records,
)
from llmseg_ros.evaluation.settings import EvalSettings
from llmseg_ros.evaluation.writers import (
    comparison_dir,
    safe_name,
    write_comparison,
    write_overlays,
    write_report,
)
from llmseg_ros.utils.distributed import World, launched_world, rank_device

__all__ = ["SplitResult", "evaluate_split", "run_comparison", "run_evaluation"]

T = TypeVar("T")


@dataclass
class SplitResult:
    """One predictor's outcome on one split.

    Attributes:
        summary: ``{"n", "giou", "ciou", "nciou", "seconds_per_query"}`` over every
            evaluated sample (see :func:`~llmseg_ros.evaluation.report.summarize_records`).
        records: one record per sample, in the split's order.
        worst: the lowest-IoU samples, worst first (ties: the earlier sample first), each
            with its (H, W, 3) uint8 RGB overlay (green hit, red false positive, blue
            miss, grey ignore).
    """

    summary: dict[str, Any]
    records: list[EvalRecord]
    worst: list[tuple[EvalRecord, np.ndarray]]

    def breakdown(self) -> dict[str, dict[str, Any] | None]:
        """LISA's ``overall`` / ``short`` (phrases) / ``long`` (sentences) summaries."""
        return query_type_breakdown(self.records)


def evaluate_split(
    dataset: Sequence[Sample],
    predict: Predictor,
    *,
    limit: int | None = None,
    timed: bool = True,
    warmup: int = 0,
    overlays: int = 0,
    world: World | None = None,
) -> SplitResult:
    """Run ``predict`` on the first ``limit`` samples of ``dataset`` (all by default) and score it.

    With a ``world`` of several processes, every process calls this with the same
    arguments (its own ``predict``, e.g. a model on its own GPU); each evaluates one
    contiguous block of the samples and all get the same result, equal to a single
    process's (timings aside).

    Args:
        dataset: indexable samples (a dataset reader loads each on indexing).
        predict: sample → (H, W) bool / 0-1 mask at the sample's resolution.
        limit: evaluate at most this many samples (the first ones).
        timed: record each ``predict`` call's wall-clock seconds.
        warmup: untimed ``predict`` calls on the process's first sample before the timed ones.
        overlays: how many lowest-IoU samples to keep with their overlays.
        world: the processes sharing the work (``llmseg_ros.utils.distributed``, e.g.
            ``current_world()`` in a job ``accelerate`` started); ``None``: this one alone.

    Raises:
        ValueError: no samples; a prediction of the wrong shape or values (the message
            names the sample id; with several processes, on every process).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if warmup < 0 or overlays < 0:
        raise ValueError(f"warmup and overlays must be >= 0, got {warmup} and {overlays}")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError("evaluate_split got no samples (the split is empty)")
    world = world or World()
    first = count * world.rank // world.world_size
    stop = count * (world.rank + 1) // world.world_size
    records: list[EvalRecord] = []
    worst = WorstSamples(overlays)
    problem: str | None = None
    try:
        if stop > first:
            for _ in range(warmup):
                predict(dataset[first])
            _, records = evaluate_samples(
                (dataset[i] for i in range(first, stop)), predict, timed=timed, callback=worst, start=first
            )
    except (TypeError, ValueError) as exc:
        if world.world_size == 1:
            raise
        problem = f"{type(exc).__name__}: {exc}"  # shared, so every process stops with it
    parts = world.all_gather((records, worst.worst(), problem))
    problems = [f"rank {rank}: {part[2]}" for rank, part in enumerate(parts) if part[2] is not None]
    if problems:
        raise ValueError("; ".join(problems))
    records = [record for part in parts for record in part[0]]  # blocks in rank order: split order
    # the n lowest (IoU, position): what one process's WorstSamples keeps, in its order
    candidates = [item for part in parts for item in part[1]]
    candidates.sort(key=lambda item: (item[0].iou, item[0].metrics.index))
    return SplitResult(summary=summarize_records(records), records=records, worst=candidates[:overlays])


def _main_first(world: World, build: Callable[[], T]) -> T:
    """``build()`` on rank 0, then on the others (a shared ``--profile-dir`` is written once)."""
    if world.is_main:
        value = build()
        world.barrier()
        return value
    world.barrier()
    return build()


def _on_rank_device(config: SegmenterConfig, world: World) -> SegmenterConfig:
    """``config`` with ``auto`` / ``cuda`` turned into this process's GPU in a job of several."""
    device = rank_device(config.device, world)
    return config if device == config.device else config.replace(device=device)


def run_evaluation(settings: EvalSettings, world: World | None = None) -> dict[str, Any]:
    """Evaluate every split, write ``report.json`` / ``report.md`` (and overlays) to ``settings.out``.

    Args:
        settings: the run.
        world: the processes sharing the work; ``None`` joins the job the launcher
            started, if any (:func:`~llmseg_ros.utils.distributed.launched_world`).

    Returns the report (the content of ``report.json``, on every process; rank 0 writes it).
    """
    if world is None:
        with launched_world() as joined:
            return run_evaluation(settings, joined)
    datasets = {split: load_split(settings, split) for split in settings.splits}
    report: dict[str, Any] = {
        "dataset": settings.dataset,
        "root": str(settings.root),
        "mode": settings.mode,
        "pred_dir": str(settings.pred_dir) if settings.pred_dir is not None else None,
        "limit": settings.limit,
        "config": None,
        "strategy": settings.strategy,
        "splits": {},
        "missing_predictions": {},
        "overlays": {},
        "samples": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    model_predict: Predictor | None = None
    with contextlib.ExitStack() as stack:
        if settings.pred_dir is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmseg-eval-")))
            config = _main_first(world, lambda: resolve_config(settings, scratch))
            report["config"] = config.to_dict()
            model_predict = model_predictor(
                _on_rank_device(config, world), override_selection=settings.strategy is not None
            )
        for split, dataset in datasets.items():
            count = sample_count(dataset, split, settings.limit)
            warmup = 0
            if model_predict is not None:
                predict = model_predict
                if split == settings.splits[0]:  # warm up once, before the first timed call
                    warmup = settings.warmup
            else:
                assert settings.pred_dir is not None
                split_dir = settings.pred_dir / split
                directory = (
                    split_dir if len(settings.splits) > 1 and split_dir.is_dir() else settings.pred_dir
                )
                ids = dataset.sample_ids[:count]
                predict, missing = pred_dir_predictor(directory, ids, allow_missing=settings.allow_missing)
                report["missing_predictions"][split] = missing
            result = evaluate_split(
                dataset,
                predict,
                limit=count,
                timed=model_predict is not None,
                warmup=warmup,
                overlays=settings.overlays,
                world=world,
            )
            if settings.dataset == "reasonseg":
                report["splits"][split] = result.breakdown()
            else:
                report["splits"][split] = {"overall": result.summary}
            report["samples"][split] = [r.to_dict() for r in result.records]
            report["overlays"][split] = write_overlays(
                result.worst, settings.out, safe_name(split), write=world.is_main
            )
    if world.is_main:
        write_report(report, settings.out)
    return report


def run_comparison(settings: EvalSettings, world: World | None = None) -> dict[str, dict[str, Any]]:
    """Run every ``--compare`` row on the same samples; write one comparison per split.

    Rows run in order; each row's segmenter loads once, evaluates every split (after
    ``settings.warmup`` untimed calls on the first sample) and is closed before the next
    row. After each row, ``{out}/{split}/comparison.json`` / ``comparison.md`` are
    rewritten atomically (see :func:`~llmseg_ros.evaluation.writers.comparison_markdown`),
    so a failure keeps the rows already done (``pending`` lists the others).

    Args:
        settings: the run (``settings.compare`` names the rows).
        world: the processes sharing the work; ``None`` joins the launcher's job, if any.

    Returns:
        split → comparison (the content of its ``comparison.json``; rank 0 writes it).
    """
    if not settings.compare:
        raise ValueError("run_comparison needs at least one --compare row")
    if world is None:
        with launched_world() as joined:
            return run_comparison(settings, joined)
    folders = {split: comparison_dir(settings.out, split) for split in settings.splits}
    if len(set(folders.values())) != len(folders):
        raise ValueError(f"splits {list(settings.splits)} share a folder name once made file-safe")
    datasets = {split: load_split(settings, split) for split in settings.splits}
    counts = {split: sample_count(dataset, split, settings.limit) for split, dataset in datasets.items()}
    names = [row.name for row in settings.compare]
    comparisons: dict[str, dict[str, Any]] = {
        split: {
            "title": f"Methods comparison: {settings.dataset} / {split}",
            "dataset": settings.dataset,
            "root": str(settings.root),
            "split": split,
            "n": counts[split],
            "limit": settings.limit,
            "rows": names,
            "pending": list(names),
            "configs": {},
            "methods": {},
            "breakdown": {},
            "samples": {},
            "overlays": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for split in settings.splits
    }
    with tempfile.TemporaryDirectory(prefix="llmseg-compare-") as scratch:
        # resolve every row first: a bad config fails before any model loads
        configs = _main_first(
            world, lambda: [row_config(settings, row, Path(scratch)) for row in settings.compare]
        )
        for row, (config, override_selection) in zip(settings.compare, configs, strict=True):
            with loaded_segmenter(_on_rank_device(config, world)) as segmenter:
                predict = segmenter_predictor(segmenter, override_selection=override_selection)
                for index, (split, dataset) in enumerate(datasets.items()):
                    result = evaluate_split(
                        dataset,
                        predict,
                        limit=counts[split],
                        warmup=settings.warmup if index == 0 else 0,  # untimed: load models, warm caches
                        overlays=settings.overlays,
                        world=world,
                    )
                    folder = folders[split]
                    _add_row(comparisons[split], row.name, config, result, settings.dataset)
                    comparisons[split]["overlays"][row.name] = write_overlays(
                        result.worst, folder, row.name, write=world.is_main
                    )
                    comparisons[split]["pending"].remove(row.name)
                    if world.is_main:
                        write_comparison(comparisons[split], folder)
    return comparisons


def _add_row(
    comparison: dict[str, Any], name: str, config: SegmenterConfig, result: SplitResult, dataset: str
) -> None:
    comparison["configs"][name] = config.to_dict()
    comparison["methods"][name] = result.summary
    if dataset == "reasonseg":
        comparison["breakdown"][name] = result.breakdown()
    comparison["samples"][name] = [
        {"id": r.sample_id, "iou": r.iou, "seconds": r.seconds} for r in result.records
    ]
