"""Shared by tests/test_evaluate_distributed.py and its worker processes: a ReasonSeg fixture
with saved predictions (IoU ties included), and a deterministic stand-in for the segmenter."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from llmseg_ros.data.reasonseg import ReasonSegDataset
from llmseg_ros.data.synthetic import SyntheticConfig, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SCENES = SyntheticConfig(image_size=64, min_objects=2, max_objects=3)


def load_evaluate_script() -> types.ModuleType:
    """``training/evaluate.py`` as a module (training/ is not a package)."""
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "training" / "evaluate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def write_fixture(directory: Path) -> dict[str, Path]:
    """ReasonSeg val (5 samples) and test (3), and ``preds/{split}/{id}.png`` for each sample.

    val predictions, in sample order: the truth, empty, the truth shifted 3 px, empty,
    empty — three samples at IoU 0 (a tie the overlays' cut falls into).
    """
    write_synthetic_dataset(directory / "synthetic", {"val": 5, "test": 3}, seed=11, config=SCENES)
    root = directory / "synthetic" / "reasonseg"
    preds = directory / "preds"
    for split in ("val", "test"):
        (preds / split).mkdir(parents=True)
        for index, sample in enumerate(ReasonSegDataset(root, split)):
            truth = sample.mask == 1
            kind = index % 5
            pred = truth if kind == 0 else np.roll(truth, 3, axis=1) if kind == 2 else np.zeros_like(truth)
            assert cv2.imwrite(str(preds / split / f"{sample.image_id}.png"), pred.astype(np.uint8) * 255)
    return {"root": root, "preds": preds}


class RuleSegmenter:
    """Stands in for llmseg_ros.pipeline.ReasonSegmenter: a colour rule per method, no model."""

    THRESHOLDS: ClassVar[dict[str, int]] = {"llmseg": 100, "lisa": 160, "grounded": 60}

    def __init__(self, config: Any) -> None:
        self.config = config

    def segment(self, image: np.ndarray, instruction: str, *, selection: Any = None, is_sentence: Any = None):
        level = self.THRESHOLDS.get(self.config.method, 128) + len(instruction) % 7
        return types.SimpleNamespace(mask=image[..., 1].astype(int) > level)

    def close(self) -> None:
        pass


def rule_pipeline() -> types.ModuleType:
    """A stand-in ``llmseg_ros.pipeline`` module whose ``ReasonSegmenter`` is :class:`RuleSegmenter`."""
    fake = types.ModuleType("llmseg_ros.pipeline")
    fake.ReasonSegmenter = RuleSegmenter  # type: ignore[attr-defined]
    return fake
