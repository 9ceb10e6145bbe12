"""Tracks as a planner drives them through the node: start with a request, stop, report.

Beneath the node (and the bag replay), without ROS: :class:`LiveTracks` turns a
``ReasonSegment`` request with ``track: true`` into a live track
(:class:`~llmseg_ros.ros.tracks.TrackSet`), a ``StopTrack`` request into stopped tracks,
and every frame the tracks take (:class:`~llmseg_ros.ros.tracks.TrackStep`) or every
timeout on the node's clock into :class:`TrackMessage` s: the outcome the node publishes
on ``mask``, ``segmentation``, ``masked_depth``, ``points`` and ``overlay`` with the
frame's header, or, for a track that ended without a frame (stopped, or expired while no
frame came), a ``segmentation`` message saying why with the header of the track's last
frame.

Track states on the ``segmentation`` topic: ``started`` (the answer the track started
from), ``tracking``, ``lost`` (the target is not on this frame: empty mask, the track goes
on) and ``ended`` (with the reason: ``expired: …``, ``stopped: …`` or ``failed: …``).
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from llmseg_ros.config import TrackerConfig
from llmseg_ros.ros.frames import Frame, HeaderData
from llmseg_ros.ros.handler import RequestError, SegmentationOutcome
from llmseg_ros.ros.images import is_empty_image
from llmseg_ros.ros.tracks import TrackEnd, TrackSet, TrackStarter, TrackStep
from llmseg_ros.types import FrameFeatures
from llmseg_ros.utils.text import check_text, short_repr

MAX_TRACK_ID_CHARS = 64
STARTED, TRACKING, LOST, ENDED = "started", "tracking", "lost", "ended"


class Gate(Protocol):
    """What :class:`ModelCall` needs from :class:`~llmseg_ros.ros.gate.ModelGate`."""

    def enter(self) -> None: ...

    def exit(self) -> None: ...


class ModelCall:
    """One model call of a tracker: the node's model lock, then its gate (re-usable context manager).

    Args:
        lock: serialises every model call (the request handler's ``model_lock``).
        gate: refuses calls while the models are freed (``ModelGate``); ``None`` = none.
    """

    def __init__(self, lock: AbstractContextManager[Any], gate: Gate | None = None) -> None:
        self.lock = lock
        self.gate = gate

    def __enter__(self) -> ModelCall:
        self.lock.__enter__()
        if self.gate is not None:
            try:
                self.gate.enter()
            except BaseException:
                self.lock.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.gate is not None:
                self.gate.exit()
        finally:
            self.lock.__exit__(None, None, None)


@dataclass(frozen=True)
class TrackRequest:
    """The tracking fields of a ``ReasonSegment`` request.

    Attributes:
        track: start a track from the answer.
        track_id: the id asked for, or ``None`` for one the node chooses.
    """

    track: bool = False
    track_id: str | None = None


def _track_id(value: Any, name: str) -> str:
    try:
        text = check_text(value, name, max_chars=MAX_TRACK_ID_CHARS, allow_newlines=False).strip()
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc)) from None
    if any(c.isspace() for c in text):
        raise RequestError(f"{name} must not contain whitespace, got {short_repr(text)}")
    return text


def parse_track_request(request: Any) -> TrackRequest:
    """The tracking fields of a ``ReasonSegment`` request (absent fields = no track).

    Raises:
        RequestError: ``track`` is not a bool, a bad ``track_id`` (not text, over
            ``MAX_TRACK_ID_CHARS`` characters, whitespace), ``track_id`` without
            ``track``, or ``track`` with a request ``image`` (tracks follow the camera).
    """
    track = getattr(request, "track", False)
    if not isinstance(track, (bool, np.bool_)):
        raise RequestError(f"track must be a bool, got {type(track).__name__} {short_repr(track)}")
    track_id = _track_id(getattr(request, "track_id", ""), "track_id")
    if track_id and not track:
        raise RequestError(
            f"track_id {track_id!r} is set but track is false; set track: true to start a track "
            "(or leave track_id empty)"
        )
    if track and not is_empty_image(getattr(request, "image", None)):
        raise RequestError(
            "track follows the frames of the image topic, so it cannot start on a request image; "
            "leave `image` empty to track the latest (or `stamp`'s) camera frame"
        )
    return TrackRequest(bool(track), track_id or None)


def parse_stop_request(request: Any) -> str | None:
    """The track a ``StopTrack`` request names, or ``None`` for all of them.

    Raises:
        RequestError: neither or both of ``track_id`` and ``all``, or a bad ``track_id``.
    """
    every = getattr(request, "all", False)
    if not isinstance(every, (bool, np.bool_)):
        raise RequestError(f"all must be a bool, got {type(every).__name__} {short_repr(every)}")
    track_id = _track_id(getattr(request, "track_id", ""), "track_id")
    if bool(every) == bool(track_id):
        raise RequestError(
            "give exactly one of track_id (the id the ReasonSegment response returned) or all: true; got "
            + (f"both track_id {track_id!r} and all: true" if every else "neither")
        )
    return None if every else track_id


@dataclass
class TrackMessage:
    """What to publish for one track on one event.

    Attributes:
        outcome: a successful outcome with the track fields set; ``result`` and ``frame``
            are ``None`` for an end without a frame (then only ``segmentation`` is
            published, with ``header`` and an empty mask).
        header: the colour header of the message (the frame's, or the track's last one).
    """

    outcome: SegmentationOutcome
    header: HeaderData

    @property
    def has_frame(self) -> bool:
        """Publish every output topic (a frame answer), not only ``segmentation``."""
        return self.outcome.frame is not None and self.outcome.result is not None

    @property
    def ended(self) -> bool:
        return self.outcome.track_state == ENDED

    def log_line(self) -> str:
        """The node's log line for an end (``track <id> (<instruction>) ended: <reason>``)."""
        o = self.outcome
        what = f" ({o.instruction!r})" if o.instruction else ""
        return f"track {o.track_id}{what} ended: {o.track_reason}"


@dataclass
class StopOutcome:
    """The answer to a ``StopTrack`` request, and the end messages to publish."""

    success: bool
    message: str
    stopped: list[str]
    messages: list[TrackMessage]


class LiveTracks:
    """The live tracks of a node: start from requests, stop, step frames, time out (module docstring).

    Thread-safe (the service, the frame worker and the timer call it concurrently).

    Args:
        segmenter: starts trackers (``ReasonSegmenter``).
        config: tracker settings of every track (``timeout_s`` = the node's ``track_timeout``).
        max_tracks: tracks alive at once.
        model_call: held around every model call (:class:`ModelCall`); ``None`` = none.
    """

    def __init__(
        self,
        segmenter: TrackStarter,
        config: TrackerConfig,
        *,
        max_tracks: int = 4,
        model_call: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.config = config
        self.tracks = TrackSet(segmenter, max_tracks=max_tracks, model_lock=model_call)
        self._lock = threading.Lock()
        self._headers: dict[str, HeaderData] = {}
        self._instructions: dict[str, str] = {}
        # The latest frame seen: (its stamp, the node's clock when it came), for timeouts
        # while no frame comes (frame time extrapolated by the node's clock); per track,
        # (start frame stamp, the node's clock at the start), so that a track started on
        # an old frame still lives its timeout from the start.
        self._last_frame: tuple[int, int] | None = None
        self._anchors: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.tracks)

    # -- start / stop ------------------------------------------------------------------
    def check_start(self, request: TrackRequest) -> None:
        """Refuse a track that cannot start before any model runs (limit, id in use)."""
        ids = self.tracks.ids()
        if request.track_id is not None and request.track_id in ids:
            raise RequestError(
                f"track_id {request.track_id!r} is already in use by a live track; stop it first "
                "(stop_track) or choose another"
            )
        if len(ids) >= self.tracks.max_tracks:
            raise RequestError(
                f"{len(ids)} tracks are alive, the limit is {self.tracks.max_tracks} (parameter max_tracks); "
                f"stop one first (stop_track); live tracks: {ids}"
            )

    def start(
        self,
        outcome: SegmentationOutcome,
        request: TrackRequest,
        features: FrameFeatures | None = None,
        *,
        now_ns: int | None = None,
    ) -> SegmentationOutcome:
        """Start a track from a successful answer; returns the outcome with the track fields set.

        Args:
            features: the frame's prepared features, when cached (their SAM encoding is reused).
            now_ns: the node's clock at the start; the timeout on the clock (:meth:`expire`)
                then counts from it at the earliest. ``None``: only frame stamps count.

        Raises:
            RequestError: the answer is empty (nothing to track), or the track cannot
                start (limit, id in use, a mask that does not fit the frame).
        """
        if not outcome.success or outcome.result is None or outcome.frame is None:
            raise ValueError("a track starts only from a successful outcome with a result and a frame")
        if not np.asarray(outcome.result.mask).any():
            raise RequestError(
                "nothing to track: the answer is empty (no region matched the instruction); "
                "ask again with another instruction or on another frame"
            )
        try:
            started = self.tracks.start(
                outcome.frame,
                outcome.result,
                instruction=outcome.instruction or None,
                config=self.config,
                track_id=request.track_id,
                features=features,
            )
        except ValueError as exc:
            raise RequestError(f"the track could not start: {exc}") from None
        with self._lock:
            self._headers[started.track_id] = outcome.frame.header
            self._instructions[started.track_id] = outcome.instruction
            if now_ns is not None:
                self._anchors[started.track_id] = (outcome.frame.stamp_ns, now_ns)
        out = replace(outcome, track_id=started.track_id, track_state=STARTED, track_reason="")
        out.message += f"; tracking as '{started.track_id}'"
        return out

    def stop(self, track_id: str | None, reason: str = "stopped by request") -> StopOutcome:
        """Stop one track (``track_id``) or all (``None``)."""
        if track_id is None:
            ends = self.tracks.stop_all(reason)
            stopped = [e.track_id for e in ends]
            message = f"stopped {len(stopped)} track(s): {stopped}" if stopped else "no track was alive"
            return StopOutcome(True, message, stopped, self._end_messages(ends))
        end = self.tracks.stop(track_id, reason)
        if end is None:
            return StopOutcome(
                False,
                f"no live track has id {track_id!r} (it never existed, or it ended already); "
                f"live tracks: {self.tracks.ids()}",
                [],
                [],
            )
        return StopOutcome(True, f"stopped track {track_id!r}", [track_id], self._end_messages([end]))

    # -- frames and time -----------------------------------------------------------------
    def observe(self, frame: Frame, now_ns: int) -> None:
        """A new camera frame came at ``now_ns`` on the node's clock (for :meth:`expire`)."""
        with self._lock:
            if self._last_frame is None or frame.stamp_ns >= self._last_frame[0]:
                self._last_frame = (frame.stamp_ns, now_ns)

    def frame_time(self, now_ns: int, track_id: str | None = None) -> int | None:
        """The frame stamp a frame coming at ``now_ns`` would carry: the latest frame's stamp
        plus the clock time since it came (or, for ``track_id``, since the track started
        when that is later); ``None`` before any frame."""
        with self._lock:
            anchors = [a for a in (self._last_frame, self._anchors.get(track_id or "")) if a is not None]
        if not anchors:
            return None
        stamp, seen = max(anchors, key=lambda a: a[1])
        return stamp + max(0, now_ns - seen)

    def expire(self, now_ns: int) -> list[TrackMessage]:
        """End the tracks without a confident update for ``timeout_s`` of frame time up to ``now_ns``
        (the node's clock; frame time is extrapolated from the latest frame or the track's
        start, so stamps need not match the node's clock)."""
        times = {}
        for track_id in self.tracks.ids():
            frame_now = self.frame_time(now_ns, track_id)
            if frame_now is not None:
                times[track_id] = frame_now
        return self._end_messages(self.tracks.expire_at(times)) if times else []

    def step(self, frame: Frame) -> list[TrackMessage]:
        """Update every live track on ``frame`` (synchronously); the messages to publish."""
        return self.messages(self.tracks.step(frame))

    def messages(self, step: TrackStep) -> list[TrackMessage]:
        """The messages of one frame's :class:`TrackStep` (updates first, then ends without an update)."""
        out: list[TrackMessage] = []
        header = step.frame.header
        updated = set()
        for update in step.updates:
            r = update.result
            if r.expired:
                state, reason = ENDED, r.end_reason or "expired"
            elif r.lost:
                state, reason = LOST, r.lost_reason or "lost"
            else:
                state, reason = TRACKING, ""
            updated.add(update.track_id)
            with self._lock:
                self._headers[update.track_id] = header
            outcome = SegmentationOutcome(
                True,
                "",
                instruction=update.instruction or "",
                frame=step.frame,
                result=r,
                timings=dict(r.timings),
                track_id=update.track_id,
                track_state=state,
                track_reason=reason,
            )
            out.append(TrackMessage(outcome, header))
            if state == ENDED:
                self._forget(update.track_id)
        for end in step.ended:
            if end.track_id in updated:
                continue
            with self._lock:
                self._headers[end.track_id] = header
            out.extend(self._end_messages([end]))
        return out

    def close(self, reason: str) -> list[TrackMessage]:
        """Stop every track (e.g. the node is deactivated); the end messages."""
        return self.stop(None, reason).messages

    def _end_messages(self, ends: list[TrackEnd]) -> list[TrackMessage]:
        out = []
        for end in ends:
            with self._lock:
                header = self._headers.get(end.track_id, HeaderData(0, ""))
                instruction = self._instructions.get(end.track_id, end.instruction or "")
            outcome = SegmentationOutcome(
                True,
                "",
                instruction=instruction,
                track_id=end.track_id,
                track_state=ENDED,
                track_reason=end.reason,
            )
            out.append(TrackMessage(outcome, header))
            self._forget(end.track_id)
        return out

    def _forget(self, track_id: str) -> None:
        with self._lock:
            self._headers.pop(track_id, None)
            self._instructions.pop(track_id, None)
            self._anchors.pop(track_id, None)
