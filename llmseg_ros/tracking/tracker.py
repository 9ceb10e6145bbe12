"""A tracked answer: one instruction's target followed from frame to frame.

    >>> tracker = seg.track(frame, result, instruction="something to stand on")
    >>> for image, stamp_ns in camera:
    ...     answer = tracker.update(image, stamp_ns=stamp_ns)   # TrackedResult
    ...     if answer.expired:
    ...         break
    ...     if not answer.lost:
    ...         use(answer.mask, answer.confidence)

Each :meth:`Tracker.update` does exactly one of two things on the new frame: propagate
the previous mask (a :class:`~llmseg_ros.tracking.propagators.Propagator`, a fraction of
a full query) or, when the re-query policy asks for it, run the full method again (the
``requery`` callable the pipeline gives); the rules are in
:mod:`llmseg_ros.tracking.policy`. The result is a
:class:`~llmseg_ros.types.TrackedResult` (a ``SegmentResult`` with the tracking state).

Thread safety: updates of one tracker are serialised (one frame at a time, in stamp
order); :meth:`Tracker.status`, :meth:`Tracker.stop` and :meth:`Tracker.check_timeout`
may be called from any thread at any time and never wait for a running update.
Different trackers update in parallel (they share models, not state).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from llmseg_ros.config import TrackerConfig
from llmseg_ros.methods.common import proposal_free_result
from llmseg_ros.tracking.frames import as_frame
from llmseg_ros.tracking.policy import TrackPolicy, TrackState
from llmseg_ros.tracking.propagators import Propagator
from llmseg_ros.types import FrameFeatures, SegmentResult, TrackedResult

RequeryFn = Callable[[FrameFeatures], SegmentResult]


@dataclass(frozen=True)
class TrackStatus:
    """A snapshot of a track (for a planner's or the node's bookkeeping).

    Attributes:
        track_id: the track's id.
        instruction: the instruction it answers (``None`` when started without one).
        frame_index: frames seen (the start frame is 0).
        lost / lost_reason: whether the target is lost on the latest frame, and why.
        confidence: the latest frame's confidence.
        last_stamp_ns / last_confident_ns: stamps of the latest and latest confident frames.
        requeries: full re-queries run.
        ended: why the track ended (``expired: …`` or ``stopped: …``), else ``None``.
    """

    track_id: str
    instruction: str | None
    frame_index: int
    lost: bool
    lost_reason: str | None
    confidence: float
    last_stamp_ns: int
    last_confident_ns: int
    requeries: int
    ended: str | None

    @property
    def alive(self) -> bool:
        return self.ended is None


def _now_ns() -> int:
    return time.monotonic_ns()


class Tracker:
    """Follows one answer's target over frames (module docstring).

    Build it with :meth:`llmseg_ros.pipeline.ReasonSegmenter.track`.

    Args:
        track_id: the track's id.
        propagator: the per-track propagation state (already built, not yet reset).
        frame: the frame ``result`` answers.
        result: the answer to follow; its mask must not be empty.
        config: thresholds and policy.
        instruction: the instruction behind ``result``; needed for re-queries.
        requery: runs the full method on a frame (given when ``instruction`` is).
        stamp_ns: the start frame's stamp (ns); ``None`` = now on a monotonic clock
            (then leave every update's stamp to the clock too).
    Raises:
        ValueError: empty ``result`` mask, or a mask that does not fit the frame.
    """

    def __init__(
        self,
        track_id: str,
        propagator: Propagator,
        frame: FrameFeatures,
        result: SegmentResult,
        config: TrackerConfig,
        *,
        instruction: str | None = None,
        requery: RequeryFn | None = None,
        stamp_ns: int | None = None,
    ) -> None:
        if not isinstance(result, SegmentResult):
            raise TypeError(f"result must be a SegmentResult, got {type(result).__name__}")
        mask = np.asarray(result.mask)
        if mask.shape != frame.image_size:
            raise ValueError(
                f"result mask has shape {mask.shape} but the frame is {frame.image_size} (H, W); "
                "start a track on the frame the answer belongs to"
            )
        if not mask.any():
            raise ValueError("cannot track an empty answer (the result's mask selects no pixel)")
        if (instruction is None) != (requery is None):
            raise ValueError("instruction and requery must be given together (re-queries need both)")
        self.track_id = track_id
        self.config = config
        self.instruction = instruction
        self.method = result.method
        self._propagator = propagator
        self._requery = requery
        self._policy = TrackPolicy(config, can_requery=requery is not None)
        self._update_lock = threading.Lock()
        self._status_lock = threading.Lock()
        start_ns = _now_ns() if stamp_ns is None else int(stamp_ns)
        timings: dict[str, float] = {}
        propagator.reset(frame, mask.astype(bool), timings)
        self._state = self._policy.start(start_ns)
        self._confidence = float(result.confidence)
        self.start_result = self._tracked(
            result,
            self._state,
            source="start",
            requery_reason=None,
            extra_timings={**result.timings, **timings},
        )

    # -- status ------------------------------------------------------------------------
    def status(self) -> TrackStatus:
        """The track's state after its latest completed frame (never waits for an update)."""
        with self._status_lock:
            s = self._state
            return TrackStatus(
                track_id=self.track_id,
                instruction=self.instruction,
                frame_index=s.frame_index,
                lost=s.lost,
                lost_reason=s.lost_reason,
                confidence=self._confidence,
                last_stamp_ns=s.last_stamp_ns,
                last_confident_ns=s.last_confident_ns,
                requeries=s.requeries,
                ended=s.ended,
            )

    @property
    def alive(self) -> bool:
        with self._status_lock:
            return self._state.ended is None

    def stop(self, reason: str = "stopped by the caller") -> None:
        """End the track; later updates raise ``RuntimeError``. Stopping twice keeps the first reason."""
        with self._status_lock:
            if self._state.ended is None:
                self._state.ended = f"stopped: {reason}"

    def check_timeout(self, now_ns: int | None = None) -> bool:
        """End the track if no confident frame came for ``timeout_s`` up to ``now_ns``
        (default: the monotonic clock; give frame-time stamps if the updates did).

        Returns:
            True when the track has ended (now or before).
        """
        with self._status_lock:
            return self._policy.check_timeout(self._state, _now_ns() if now_ns is None else int(now_ns))

    # -- per frame -----------------------------------------------------------------------
    def update(self, frame: FrameFeatures | np.ndarray, *, stamp_ns: int | None = None) -> TrackedResult:
        """The target on a new frame.

        Args:
            frame: the new frame: an (H, W, 3) uint8 RGB image (only SAM's encoder runs
                on it), or a prepared ``FrameFeatures`` (its SAM encoding is reused).
            stamp_ns: the frame's stamp (ns), not older than the previous frame's;
                ``None`` = now on a monotonic clock.
        Returns:
            TrackedResult for this frame (``expired`` set on the frame the track times out).
        Raises:
            RuntimeError: the track has ended (expired or stopped).
            ValueError, TypeError: a bad frame, another resolution, or an older stamp.
        """
        frame = as_frame(frame)
        with self._update_lock:
            stamp = _now_ns() if stamp_ns is None else int(stamp_ns)  # clock read in update order
            t0 = time.perf_counter()
            with self._status_lock:
                state = replace(self._state)
            self._policy.begin_frame(state, stamp)
            timings: dict[str, float] = {}
            reason = self._policy.requery_before(state)
            answer: SegmentResult | None = None
            if reason is None:
                propagated = self._propagator.step(frame, timings)
                if not math.isfinite(propagated.confidence):
                    propagated.confidence = 0.0
                reason = self._policy.requery_after(state, propagated.confidence)
                if reason is None:
                    answer = proposal_free_result(
                        f"{self._propagator.backend}_track",
                        propagated.mask,
                        propagated.confidence,
                        answer=None,
                        timings={},
                        extras=dict(propagated.scores),
                    )
            requeried = answer is None
            if answer is None:
                assert self._requery is not None
                answer = self._requery(frame)
                timings.update({f"requery_{k}": v for k, v in answer.timings.items()})
                if answer.mask.any():
                    self._propagator.reset(frame, answer.mask, timings)
                else:  # the method says the target is not there: stop carrying the old mask
                    self._propagator.clear()
            mask = np.asarray(answer.mask, dtype=bool)
            area = float(mask.mean()) if mask.size else 0.0
            if not math.isfinite(answer.confidence):  # never let a NaN score pass as "not weak"
                answer.confidence = 0.0
            self._policy.judge(state, confidence=answer.confidence, area_fraction=area, requeried=requeried)
            timings["total"] = time.perf_counter() - t0
            with self._status_lock:
                stopped = self._state.ended
                if stopped is not None:
                    state.ended = stopped  # stopped while this frame ran: keep the stop
                self._state = state
                self._confidence = float(answer.confidence)
            return self._tracked(
                answer,
                state,
                source="requery" if requeried else "propagated",
                requery_reason=reason,
                extra_timings=timings,
            )

    def _tracked(
        self,
        answer: SegmentResult,
        state: TrackState,
        *,
        source: str,
        requery_reason: str | None,
        extra_timings: dict[str, float],
    ) -> TrackedResult:
        """``answer`` with ``state``'s tracking fields (a lost target's mask is empty)."""
        mask = np.asarray(answer.mask, dtype=bool)
        if state.lost:
            mask = np.zeros_like(mask)
        return TrackedResult(
            mask=mask,
            selected=list(answer.selected),
            similarity=answer.similarity,
            iop=answer.iop,
            confidence=float(answer.confidence),
            num_proposals=answer.num_proposals,
            method=answer.method,
            answer=answer.answer,
            timings=dict(extra_timings),
            extras=dict(answer.extras),
            track_id=self.track_id,
            frame_index=state.frame_index,
            stamp_ns=state.last_stamp_ns,
            source=source,
            requery_reason=requery_reason,
            lost=state.lost,
            lost_reason=state.lost_reason,
            weak_frames=state.weak_frames,
            expired=state.ended is not None and state.ended.startswith("expired"),
            end_reason=state.ended,
        )
