"""Predictors for the evaluation loop: saved mask files, or a :class:`~llmseg_ros.pipeline.ReasonSegmenter`.

A predictor maps a :class:`~llmseg_ros.data.sample.Sample` to an (H, W) bool mask at the
sample's resolution (see :mod:`llmseg_ros.evaluation.report`). The pipeline is imported
only when a model is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.config import SegmenterConfig, SelectionConfig
from llmseg_ros.data.io import read_single_channel
from llmseg_ros.data.sample import Sample
from llmseg_ros.evaluation.report import Predictor
from llmseg_ros.evaluation.settings import CompareRow, EvalSettings

__all__ = [
    "loaded_segmenter",
    "model_predictor",
    "pred_dir_predictor",
    "resolve_config",
    "row_config",
    "segmenter_predictor",
]


def pred_dir_predictor(
    directory: Path, sample_ids: Sequence[str], *, allow_missing: bool = False
) -> tuple[Predictor, list[str]]:
    """Predictor reading ``{directory}/{sample id}.png`` (``> 0`` foreground).

    Returns the predictor and the ids without a file. Missing files raise ``ValueError``
    unless ``allow_missing``, in which case they predict an empty mask.
    """
    if not directory.is_dir():
        raise ValueError(f"prediction folder {directory} does not exist")
    missing = [i for i in sample_ids if not (directory / f"{i}.png").is_file()]
    if missing and not allow_missing:
        shown = ", ".join(f"{i}.png" for i in missing[:5])
        raise ValueError(
            f"{len(missing)} of {len(sample_ids)} predictions missing in {directory} (e.g. {shown}); "
            "pass --allow-missing to score them as empty masks"
        )
    missing_set = set(missing)

    def predict(sample: Sample) -> np.ndarray:
        if sample.image_id in missing_set:
            return np.zeros(sample.mask.shape, dtype=bool)
        return read_single_channel(directory / f"{sample.image_id}.png") > 0

    return predict, missing


def resolve_config(settings: EvalSettings, scratch: Path, method: str | None = None) -> SegmenterConfig:
    """The model config named by ``settings`` (``--profile`` / ``--config`` / ``--weights`` + overrides).

    Args:
        scratch: a folder that lives as long as the evaluation (holds the ``--profile``
            models when no ``profile_dir`` is given).
        method: the method to select, overriding ``settings.method`` (a ``--compare`` row).
    """
    method = method if method is not None else settings.method
    if settings.profile == "tiny":
        from llmseg_ros.tiny import build_tiny_profile

        profile_dir = settings.profile_dir if settings.profile_dir is not None else scratch / "tiny"
        # the profile picks the models that fit the method (e.g. a different VLM for vlm_*)
        config = build_tiny_profile(profile_dir, method=method or "llmseg")
    else:
        config = (
            SegmenterConfig.from_file(settings.config_file) if settings.config_file else SegmenterConfig()
        )
        if settings.weights is not None:
            config = config.replace(weights_dir=str(settings.weights))
        if method is not None:
            config = config.replace(method=method)
    if settings.device is not None:
        config = config.replace(device=settings.device)
    if settings.strategy is not None:
        config = config.replace(selection=SelectionConfig(strategy=settings.strategy))
    return config


def row_config(settings: EvalSettings, row: CompareRow, scratch: Path) -> tuple[SegmenterConfig, bool]:
    """The config of one ``--compare`` row, and whether its selection overrides every call.

    ``NAME=CONFIG`` rows use their file with only ``--device`` applied; ``NAME`` rows use
    :func:`resolve_config` with ``method = NAME`` (``--weights`` / ``--strategy`` apply).
    """
    if row.config is None:
        return resolve_config(settings, scratch, method=row.name), settings.strategy is not None
    config = row.config
    if settings.device is not None:
        config = config.replace(device=settings.device)
    return config, False


def model_predictor(config: SegmenterConfig, *, override_selection: bool = False) -> Predictor:
    """Build a :class:`llmseg_ros.pipeline.ReasonSegmenter` and wrap it as a predictor.

    Args:
        config: the segmenter's config.
        override_selection: also pass ``config.selection`` to every ``segment`` call.
    """
    from llmseg_ros.pipeline import ReasonSegmenter

    return segmenter_predictor(ReasonSegmenter(config), override_selection=override_selection)


@contextlib.contextmanager
def loaded_segmenter(config: SegmenterConfig) -> Iterator[Any]:
    """A :class:`llmseg_ros.pipeline.ReasonSegmenter` (models load on first use), closed on exit."""
    from llmseg_ros.pipeline import ReasonSegmenter

    segmenter = ReasonSegmenter(config)
    try:
        yield segmenter
    finally:
        segmenter.close()


def segmenter_predictor(segmenter: Any, *, override_selection: bool = False) -> Predictor:
    """Wrap a segmenter as a predictor: sample → (H, W) bool mask at the sample's resolution.

    Args:
        segmenter: a :class:`llmseg_ros.pipeline.ReasonSegmenter`.
        override_selection: also pass ``segmenter.config.selection`` to every ``segment`` call.
    """
    selection = segmenter.config.selection if override_selection else None

    def predict(sample: Sample) -> np.ndarray:
        result = segmenter.segment(
            sample.image, sample.instruction, selection=selection, is_sentence=sample.is_sentence
        )
        return np.asarray(result.mask)

    return predict
