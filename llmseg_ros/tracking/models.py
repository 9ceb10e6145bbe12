"""The models a pipeline's trackers share, and the propagator each new track gets.

``sam`` tracks use the pipeline's own SAM (:meth:`Components.sam`, loaded once for every
method). ``sam2`` tracks use a SAM 2 video predictor, loaded on the first track that
names its weights and kept (one per weights path) until :meth:`TrackingModels.release`.
"""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING

from llmseg_ros.config import TrackerConfig
from llmseg_ros.tracking.propagators import Propagator, Sam2Propagator, SamPropagator

if TYPE_CHECKING:
    from llmseg_ros.models.components import Components
    from llmseg_ros.models.sam2_video import Sam2VideoPredictor


def new_track_id() -> str:
    """A fresh, unique track id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


class TrackingModels:
    """Propagators for new tracks on the models of one pipeline (module docstring)."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self._sam2: dict[str, Sam2VideoPredictor] = {}
        self._lock = threading.Lock()

    def sam2_predictor(self, name_or_path: str) -> Sam2VideoPredictor:
        """The SAM 2 video predictor for ``name_or_path``, loaded on first use."""
        with self._lock:
            predictor = self._sam2.get(name_or_path)
            if predictor is None:
                from llmseg_ros.models.sam2_video import Sam2VideoPredictor

                predictor = Sam2VideoPredictor.load(
                    name_or_path, device=self.components.device, dtype=self.components.dtype
                )
                self._sam2[name_or_path] = predictor
            return predictor

    def propagator(self, config: TrackerConfig) -> Propagator:
        """A fresh propagator for one track with ``config.backend``."""
        if config.backend == "sam2":
            assert config.sam2_model is not None  # TrackerConfig checks it
            return Sam2Propagator(self.sam2_predictor(config.sam2_model))
        return SamPropagator(self.components.sam(), config)

    def release(self) -> None:
        """Drop the SAM 2 predictors (the pipeline's SAM is released with its components)."""
        with self._lock:
            self._sam2.clear()
