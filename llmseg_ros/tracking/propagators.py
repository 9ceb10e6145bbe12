"""Carrying a track's mask to the next frame: the ``sam`` and ``sam2`` propagators.

A propagator holds one track's per-frame state. :meth:`Propagator.reset` (re)starts it
from a mask on a frame (the answer the track starts from, or a re-query's answer);
:meth:`Propagator.step` returns the mask on the next frame with a confidence in [0, 1].

* :class:`SamPropagator` — the pipeline's SAM on the frame's image encoding (shared with
  the method's proposal stage when the frame was prepared), prompted with the previous
  mask's expanded box, points inside and around it, and the previous low-resolution
  logits (see :mod:`llmseg_ros.tracking.prompts`, :mod:`llmseg_ros.models.sam_tracking`).
  Confidence: SAM's predicted IoU (clipped to [0, 1]) times the stability score.
* :class:`Sam2Propagator` — SAM 2's video predictor with its memory bank
  (:mod:`llmseg_ros.models.sam2_video`). Confidence: SAM 2's object-presence
  probability (sigmoid of its object score logit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from llmseg_ros.config import TrackerConfig
from llmseg_ros.methods.common import sync
from llmseg_ros.tracking.frames import sam_encoding
from llmseg_ros.tracking.prompts import expand_box, mask_box, sample_points
from llmseg_ros.types import FrameFeatures

if TYPE_CHECKING:
    import torch
    from segment_anything.modeling import Sam

    from llmseg_ros.models.sam2_video import Sam2VideoPredictor, Sam2VideoState


@dataclass
class Propagation:
    """The mask on one new frame.

    Attributes:
        mask: (H, W) bool at the frame's resolution.
        confidence: in [0, 1] (see the module docstring per propagator).
        scores: the numbers behind the confidence (JSON-serialisable).
    """

    mask: np.ndarray
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)


class Propagator(Protocol):
    """One track's propagation state (module docstring)."""

    backend: str

    def reset(self, frame: FrameFeatures, mask: np.ndarray, timings: dict[str, float]) -> None:
        """Start again from ``mask`` ((H, W) bool) on ``frame``."""
        ...

    def clear(self) -> None:
        """Forget the target: ``step`` returns empty masks until the next ``reset``."""
        ...

    def step(self, frame: FrameFeatures, timings: dict[str, float]) -> Propagation:
        """The mask on ``frame``, the frame after the previous one; adds stage seconds to ``timings``."""
        ...


def _empty(size: tuple[int, int]) -> Propagation:
    return Propagation(np.zeros(size, dtype=bool), 0.0, {})


def _check_size(frame: FrameFeatures, mask: np.ndarray) -> None:
    if frame.image_size != mask.shape:
        raise ValueError(
            f"frame is {frame.image_size[0]}x{frame.image_size[1]} (H x W) but the track's mask is "
            f"{mask.shape[0]}x{mask.shape[1]}; a track follows frames of one camera resolution"
        )


class SamPropagator:
    """SAM prompted with the previous mask (module docstring).

    Args:
        sam: the pipeline's SAM.
        config: prompt counts and box margin (``positive_points``, ``negative_points``,
            ``box_margin``) and the sampling ``seed``.
    """

    backend = "sam"

    def __init__(self, sam: Sam, config: TrackerConfig) -> None:
        self.sam = sam
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self._mask: np.ndarray | None = None
        self._low_res: torch.Tensor | None = None

    def reset(self, frame: FrameFeatures, mask: np.ndarray, timings: dict[str, float]) -> None:
        _check_size(frame, mask)
        self._mask = mask.astype(bool, copy=True)
        self._low_res = None  # rebuilt from the binary mask on the next frame's encoding

    def clear(self) -> None:
        if self._mask is not None:
            self._mask = np.zeros_like(self._mask)
        self._low_res = None

    def step(self, frame: FrameFeatures, timings: dict[str, float]) -> Propagation:
        from llmseg_ros.models.sam_tracking import mask_prompt_from_mask, propagate_mask

        if self._mask is None:
            raise RuntimeError("SamPropagator.step called before reset")
        _check_size(frame, self._mask)
        encoding = sam_encoding(self.sam, frame, timings)
        t0 = time.perf_counter()
        tight = mask_box(self._mask)
        if tight is None:  # nothing to carry: the target is gone until a re-query finds it
            return _empty(frame.image_size)
        box = expand_box(tight, self.config.box_margin, frame.image_size)
        prompt = sample_points(
            self._mask, box, self.config.positive_points, self.config.negative_points, self._rng
        )
        mask_input = self._low_res
        if mask_input is None:
            mask_input = mask_prompt_from_mask(self.sam, encoding, self._mask)
        result = propagate_mask(
            self.sam,
            encoding,
            box=box,
            points=prompt.points,
            point_labels=prompt.labels,
            mask_input=mask_input,
        )
        sync(encoding.embedding.device)
        timings["propagate"] = time.perf_counter() - t0
        self._mask, self._low_res = result.mask, result.low_res
        confidence = float(np.clip(result.predicted_iou, 0.0, 1.0)) * result.stability
        return Propagation(
            result.mask,
            confidence,
            {"predicted_iou": result.predicted_iou, "stability": result.stability},
        )


class Sam2Propagator:
    """SAM 2's video predictor on one track (module docstring)."""

    backend = "sam2"

    def __init__(self, predictor: Sam2VideoPredictor) -> None:
        self.predictor = predictor
        self._state: Sam2VideoState | None = None
        self._size: tuple[int, int] | None = None

    def reset(self, frame: FrameFeatures, mask: np.ndarray, timings: dict[str, float]) -> None:
        _check_size(frame, mask)
        t0 = time.perf_counter()
        self._state = self.predictor.start(frame.image, mask)
        self._size = frame.image_size
        timings["sam2_start"] = time.perf_counter() - t0

    def clear(self) -> None:
        self._state = None

    def step(self, frame: FrameFeatures, timings: dict[str, float]) -> Propagation:
        if self._size is None:
            raise RuntimeError("Sam2Propagator.step called before reset")
        _check_size(frame, np.empty(self._size, dtype=bool))
        if self._state is None:
            return _empty(frame.image_size)
        t0 = time.perf_counter()
        mask, object_score = self.predictor.step(self._state, frame.image)
        timings["propagate"] = time.perf_counter() - t0
        presence = float(1.0 / (1.0 + np.exp(-object_score)))
        return Propagation(mask, presence, {"object_score_logit": object_score})
