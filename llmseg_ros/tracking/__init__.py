"""Tracked answers: keep an instruction's target up to date on every camera frame.

Between :mod:`llmseg_ros.methods` (which answer one frame) and
:mod:`llmseg_ros.pipeline` (whose ``ReasonSegmenter.track`` starts a track):

* :mod:`~llmseg_ros.tracking.tracker` — :class:`Tracker`, one followed answer
  (per-frame update, confidence, lost flag, re-queries, timeout, id);
* :mod:`~llmseg_ros.tracking.policy` — when to re-query, when the target is lost, when
  the track expires;
* :mod:`~llmseg_ros.tracking.propagators` — carrying the mask to the next frame (SAM on
  the frame's encoding, or SAM 2's video predictor);
* :mod:`~llmseg_ros.tracking.prompts` — box and point prompts from the previous mask;
* :mod:`~llmseg_ros.tracking.frames` — light frames and SAM encodings computed once per frame;
* :mod:`~llmseg_ros.tracking.models` — the models trackers share.
"""

from __future__ import annotations

from llmseg_ros.tracking.frames import as_frame, is_light, light_frame
from llmseg_ros.tracking.models import TrackingModels, new_track_id
from llmseg_ros.tracking.policy import TrackPolicy, TrackState
from llmseg_ros.tracking.tracker import Tracker, TrackStatus

__all__ = [
    "TrackPolicy",
    "TrackState",
    "TrackStatus",
    "Tracker",
    "TrackingModels",
    "as_frame",
    "is_light",
    "light_frame",
    "new_track_id",
]
