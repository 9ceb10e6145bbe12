"""Live tracks beneath the node: several tracked answers kept up to date on every frame.

:class:`TrackSet` holds the node's trackers (``ReasonSegmenter.track``) by id: start
one from a service answer, stop one or all, update every live one on a new frame
(:meth:`TrackSet.step`, sharing one SAM encoding per frame), and end tracks that time out
(on their frames' stamps, or on the node's clock when frames stop coming,
:meth:`TrackSet.expire`). A track whose update fails ends with the error as its reason;
the others keep going.

:class:`TrackWorker` runs the steps on one background thread with the newest frame
winning: at most one frame runs and one waits, a newer frame replaces the waiting one
(:class:`~llmseg_ros.ros.precompute.BackgroundPrecomputer`). With the node's model lock
(``model_lock``) each tracker's update holds the lock on its own, so a service request
waits for at most one update, never for a whole frame of tracks.

Nothing here imports ROS; the node converts :class:`TrackStep` into messages.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from llmseg_ros.config import TrackerConfig
from llmseg_ros.ros.frames import Frame
from llmseg_ros.ros.precompute import BackgroundPrecomputer, PrecomputeStats
from llmseg_ros.tracking import Tracker, TrackStatus, light_frame, new_track_id
from llmseg_ros.types import FrameFeatures, SegmentResult, TrackedResult


class TrackStarter(Protocol):
    """What :class:`TrackSet` needs from :class:`llmseg_ros.pipeline.ReasonSegmenter`."""

    def track(
        self,
        frame_or_image: FrameFeatures | np.ndarray,
        result: SegmentResult,
        *,
        instruction: str | None = None,
        config: TrackerConfig | None = None,
        track_id: str | None = None,
        stamp_ns: int | None = None,
    ) -> Tracker: ...


@dataclass
class TrackUpdate:
    """One track's answer on one frame (publish it with the frame's header)."""

    track_id: str
    instruction: str | None
    result: TrackedResult


@dataclass
class TrackEnd:
    """A track that ended, and why (``expired: …``, ``stopped: …`` or ``failed: …``)."""

    track_id: str
    instruction: str | None
    reason: str


@dataclass
class TrackStep:
    """Everything one frame did to the live tracks.

    Attributes:
        frame: the frame (its header goes on every output).
        updates: the answer of each track that took the frame, in start order.
        ended: tracks that ended on this frame (expired or failed); they are removed.
    """

    frame: Frame
    updates: list[TrackUpdate] = field(default_factory=list)
    ended: list[TrackEnd] = field(default_factory=list)


class TrackSet:
    """The live tracks of one node, by id (module docstring). Thread-safe.

    Args:
        segmenter: starts trackers (``ReasonSegmenter``).
        max_tracks: how many tracks may be alive at once (>= 1).
        model_lock: held around every model call (start and each tracker's update);
            ``None`` = no lock.
    """

    def __init__(
        self,
        segmenter: TrackStarter,
        *,
        max_tracks: int = 8,
        model_lock: AbstractContextManager[object] | None = None,
    ) -> None:
        if max_tracks < 1:
            raise ValueError(f"max_tracks must be >= 1, got {max_tracks}")
        self.segmenter = segmenter
        self.max_tracks = max_tracks
        self._model_lock: AbstractContextManager[object] = (
            model_lock if model_lock is not None else nullcontext()
        )
        self._tracks: OrderedDict[str, Tracker] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tracks)

    def ids(self) -> list[str]:
        """Ids of the live tracks, oldest first."""
        with self._lock:
            return list(self._tracks)

    def statuses(self) -> list[TrackStatus]:
        """A status snapshot of every live track, oldest first."""
        with self._lock:
            trackers = list(self._tracks.values())
        return [t.status() for t in trackers]

    def start(
        self,
        frame: Frame,
        result: SegmentResult,
        *,
        instruction: str | None = None,
        config: TrackerConfig | None = None,
        track_id: str | None = None,
        features: FrameFeatures | None = None,
    ) -> TrackUpdate:
        """Start tracking ``result`` (the answer on ``frame``).

        Args:
            features: ``frame``'s prepared features when the caller has them (their SAM
                encoding is reused), else the raw image is used.
        Returns:
            The start answer (``result.source == "start"``).
        Raises:
            ValueError: too many live tracks, an id already in use, or an answer that
                cannot be tracked (empty mask, wrong size).
        """
        track_id = track_id or new_track_id()
        with self._lock:
            if track_id in self._tracks:
                raise ValueError(f"track id {track_id!r} is already in use; stop it first or choose another")
            if len(self._tracks) >= self.max_tracks:
                raise ValueError(
                    f"{len(self._tracks)} tracks are alive, the limit is {self.max_tracks}; stop one first"
                )
        with self._model_lock:
            tracker = self.segmenter.track(
                features if features is not None else frame.rgb,
                result,
                instruction=instruction,
                config=config,
                track_id=track_id,
                stamp_ns=frame.stamp_ns,
            )
        with self._lock:
            if track_id in self._tracks:  # started concurrently under the same id
                raise ValueError(f"track id {track_id!r} is already in use; stop it first or choose another")
            if len(self._tracks) >= self.max_tracks:
                raise ValueError(f"{len(self._tracks)} tracks are alive, the limit is {self.max_tracks}")
            self._tracks[track_id] = tracker
        return TrackUpdate(track_id, tracker.instruction, tracker.start_result)

    def stop(self, track_id: str, reason: str = "stopped by request") -> TrackEnd | None:
        """Stop one track; ``None`` when no live track has that id."""
        with self._lock:
            tracker = self._tracks.pop(track_id, None)
        if tracker is None:
            return None
        tracker.stop(reason)
        return TrackEnd(track_id, tracker.instruction, tracker.status().ended or f"stopped: {reason}")

    def stop_all(self, reason: str = "stopped by request") -> list[TrackEnd]:
        """Stop every live track."""
        return [end for end in (self.stop(i, reason) for i in self.ids()) if end is not None]

    def expire(self, now_ns: int) -> list[TrackEnd]:
        """End the tracks without a confident frame for their ``timeout_s`` up to ``now_ns``
        (the node's clock, when frames stop coming)."""
        return self.expire_at({track_id: now_ns for track_id in self.ids()})

    def expire_at(self, times: Mapping[str, int]) -> list[TrackEnd]:
        """Like :meth:`expire` with a time per track (track id → now in ns; others are left alone)."""
        with self._lock:
            trackers = [(i, t) for i, t in self._tracks.items() if i in times]
        ended: list[TrackEnd] = []
        for track_id, tracker in trackers:
            if tracker.check_timeout(times[track_id]):
                ended.append(self._remove(track_id, tracker, tracker.status().ended or "expired"))
        return ended

    def step(self, frame: Frame, features: FrameFeatures | None = None) -> TrackStep:
        """Update every live track on ``frame`` (one SAM encoding shared by all of them).

        Args:
            features: ``frame``'s prepared features when the caller has them.
        """
        shared = features if features is not None else light_frame(frame.rgb)
        step = TrackStep(frame=frame)
        with self._lock:
            trackers = list(self._tracks.items())
        for track_id, tracker in trackers:
            if not tracker.alive:
                continue  # stopped since the snapshot
            if tracker.status().last_stamp_ns >= frame.stamp_ns:
                continue  # not newer than the track's latest frame (e.g. it started on a newer one)
            try:
                with self._model_lock:
                    result = tracker.update(shared, stamp_ns=frame.stamp_ns)
            except Exception as exc:  # one failing track must not stop the others
                with self._lock:
                    if self._tracks.get(track_id) is not tracker:
                        continue  # stopped (and reported) while this frame ran
                tracker.stop(f"failed: {type(exc).__name__}: {exc}")
                step.ended.append(self._remove(track_id, tracker, f"failed: {type(exc).__name__}: {exc}"))
                continue
            step.updates.append(TrackUpdate(track_id, tracker.instruction, result))
            if result.expired:
                step.ended.append(self._remove(track_id, tracker, result.end_reason or "expired"))
        return step

    def _remove(self, track_id: str, tracker: Tracker, reason: str) -> TrackEnd:
        with self._lock:
            if self._tracks.get(track_id) is tracker:
                del self._tracks[track_id]
        return TrackEnd(track_id, tracker.instruction, reason)


class TrackWorker:
    """Runs :meth:`TrackSet.step` on new frames in the background, the newest frame winning.

    Args:
        tracks: the live tracks.
        on_step: receives each frame's :class:`TrackStep` (e.g. to publish it); runs on
            the worker thread.
        on_error: receives the frame and the exception when ``on_step`` raises.
        name: thread name.
    """

    def __init__(
        self,
        tracks: TrackSet,
        on_step: Callable[[TrackStep], None],
        on_error: Callable[[Frame, BaseException], None] | None = None,
        name: str = "llmseg-tracks",
    ) -> None:
        self.tracks = tracks
        self._on_step = on_step
        self._runner = BackgroundPrecomputer(self._work, on_error=on_error, name=name)

    def _work(self, frame: Frame) -> None:
        if len(self.tracks):
            self._on_step(self.tracks.step(frame))

    def submit(self, frame: Frame) -> bool:
        """Offer a new frame; False when no track is alive, or the frame is not newer
        than one already offered (see ``BackgroundPrecomputer.submit``)."""
        if not len(self.tracks):
            return False
        return self._runner.submit(frame)

    def stats(self) -> PrecomputeStats:
        """Frames processed, skipped (replaced by a newer one) and ignored so far."""
        return self._runner.stats()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._runner.wait_idle(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drop the waiting frame, let the running one finish (up to ``timeout``), stop."""
        self._runner.close(timeout)
