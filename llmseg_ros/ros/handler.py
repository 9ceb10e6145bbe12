"""Service request handling beneath the node: validation, frame choice, timeout, result.

:class:`RequestHandler` reads a ``ReasonSegment`` request by its fields (an rclpy request,
a ``rosbags`` message or any object with the same attributes) and returns a plain
:class:`SegmentationOutcome` that the node copies into the response and the topics. It
never raises for a bad request: every failure is ``success=False`` with a message saying
what was wrong and what was expected, and the handler keeps serving.

Inference runs on a worker thread with a deadline (``request_timeout_s``); one lock
serialises every model call (requests and background precompute), so concurrent requests
are safe and a request that times out never blocks the caller.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from llmseg_ros.config import SELECTION_STRATEGIES, ConversationConfig, SegmenterConfig, SelectionConfig
from llmseg_ros.ros.features import FeatureCache
from llmseg_ros.ros.frames import (
    NS_PER_S,
    Frame,
    FrameBuffer,
    FrameLookupError,
    format_stamp,
    frame_from_messages,
)
from llmseg_ros.ros.frames import stamp_to_ns as _stamp_to_ns
from llmseg_ros.ros.images import is_empty_image, overlay_bgr
from llmseg_ros.types import FrameFeatures, SegmentResult
from llmseg_ros.utils.text import check_text, short_repr


class Segmenter(Protocol):
    """What the handler needs from :class:`llmseg_ros.pipeline.ReasonSegmenter`."""

    config: SegmenterConfig

    def prepare(self, image: np.ndarray) -> FrameFeatures: ...

    def segment(
        self,
        frame_or_image: FrameFeatures | np.ndarray,
        instruction: str,
        *,
        selection: SelectionConfig | None = None,
        explain: bool = False,
        conversation_id: str | None = None,
    ) -> SegmentResult: ...


class RequestError(ValueError):
    """A request that cannot be served as asked (its message goes into the response)."""


@dataclass
class HandlerSettings:
    """Limits of the request handler (ROS parameters of the node).

    Attributes:
        max_instruction_chars: longest instruction accepted (characters).
        request_timeout_s: deadline of one request, waiting for the model included (s).
        stamp_tolerance_s: how far a requested stamp may be from a buffered frame's (s).
        image_topic: name of the colour topic, for messages.
        max_conversations: conversations whose frame is remembered for follow-ups.
        max_conversation_id_chars: longest ``conversation_id`` accepted (characters).
    """

    max_instruction_chars: int = 1000
    request_timeout_s: float = 60.0
    stamp_tolerance_s: float = 0.01
    image_topic: str = "image"
    max_conversations: int = ConversationConfig.max_conversations
    max_conversation_id_chars: int = ConversationConfig.max_id_chars

    def __post_init__(self) -> None:
        if self.max_instruction_chars < 1:
            raise ValueError(f"max_instruction_chars must be >= 1, got {self.max_instruction_chars}")
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise ValueError(
                f"request_timeout must be a finite number of seconds > 0, got {self.request_timeout_s}"
            )
        if not (self.stamp_tolerance_s >= 0 and math.isfinite(self.stamp_tolerance_s)):
            raise ValueError(f"stamp_tolerance must be >= 0 seconds, got {self.stamp_tolerance_s}")
        if self.max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {self.max_conversations}")
        if self.max_conversation_id_chars < 1:
            raise ValueError(f"max_conversation_id_chars must be >= 1, got {self.max_conversation_id_chars}")


@dataclass
class ParsedRequest:
    """A validated request.

    Attributes:
        instruction: stripped, non-empty, within the length limit.
        image: the request's own frame, or ``None`` to use a buffered one.
        stamp_ns: stamp of the buffered frame to use; 0 = latest.
        selection: selection override, or ``None`` for the configured one.
    """

    instruction: str
    image: Frame | None = None
    stamp_ns: int = 0
    selection: SelectionConfig | None = None
    return_overlay: bool = False
    explain: bool = False
    conversation_id: str | None = None


@dataclass
class SegmentationOutcome:
    """The plain result of one request, copied by the node into messages.

    Attributes:
        success: the mask is an answer (possibly empty).
        message: human-readable outcome or reason of failure.
        frame: the frame that was segmented (``None`` when none was chosen).
        result: the segmenter's result on success.
        overlay: (H, W, 3) uint8 BGR debug overlay when the request asked for one.
        timings: seconds per stage (frame preparation when done for this request, the
            segmenter's stages, ``queue_wait`` for the model, ``request_total``).
        track_id: the track this answer belongs to ("" = a one-shot answer).
        track_state: ``started`` / ``tracking`` / ``lost`` / ``ended`` ("" = one-shot);
            see :mod:`llmseg_ros.ros.track_service`.
        track_reason: why the target is lost or the track ended, else "".
    """

    success: bool
    message: str
    instruction: str = ""
    conversation_id: str = ""
    frame: Frame | None = None
    result: SegmentResult | None = None
    overlay: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    track_id: str = ""
    track_state: str = ""
    track_reason: str = ""

    @property
    def frame_stamp_ns(self) -> int:
        return self.frame.stamp_ns if self.frame is not None else 0

    def selected_scores(self) -> tuple[list[int], list[float], list[float]]:
        """(selected indices, their similarity, their IoP); a score list is empty when the method has none."""
        if self.result is None:
            return [], [], []
        selected = [int(i) for i in self.result.selected]
        return selected, _pick(self.result.similarity, selected), _pick(self.result.iop, selected)


def _pick(scores: np.ndarray, indices: list[int]) -> list[float]:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not indices or values.size <= max(indices):
        return []
    return [float(values[i]) for i in indices]


def _flag(request: Any, name: str) -> bool:
    value = getattr(request, name)
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise RequestError(f"{name} must be a bool, got {type(value).__name__} {short_repr(value)}")


def _text_field(request: Any, name: str, **limits: Any) -> str:
    try:
        return check_text(getattr(request, name), name, **limits)
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc)) from None


def _iop_threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(
            f"iop_threshold must be a number in [0, 1], or negative for the parameter; got "
            f"{type(value).__name__} {short_repr(value)}"
        )
    try:
        threshold = float(value)
    except OverflowError:
        raise RequestError(
            f"iop_threshold must be a number in [0, 1], or negative for the parameter; got {short_repr(value)}"
        ) from None
    if math.isnan(threshold) or threshold > 1.0:
        raise RequestError(f"iop_threshold must be in [0, 1], or negative for the parameter; got {threshold}")
    return threshold


def parse_request(
    request: Any,
    *,
    max_instruction_chars: int,
    default_selection: SelectionConfig,
    max_conversation_id_chars: int = ConversationConfig.max_id_chars,
) -> ParsedRequest:
    """Validate every field of a ``ReasonSegment`` request (type, range, text) before any work.

    Raises:
        RequestError: empty, over-long or invalid instruction (not valid UTF-8, control
            characters), bad strategy / threshold override, a stamp or flag of the wrong
            type or range, an over-long or invalid conversation id, or an unreadable
            request image.
        AttributeError: the request lacks a field.
    """
    instruction = _text_field(request, "instruction")
    text = instruction.strip()
    if not text:
        raise RequestError(
            "instruction is empty; expected a sentence or phrase naming the target, "
            "e.g. 'where can I put the dirty dishes?'"
        )
    if len(text) > max_instruction_chars:
        raise RequestError(
            f"instruction has {len(text)} characters; the limit is {max_instruction_chars} "
            "(parameter max_instruction_chars)"
        )
    strategy = _text_field(request, "selection_strategy").strip()
    if strategy and strategy not in SELECTION_STRATEGIES:
        raise RequestError(
            f"selection_strategy {short_repr(strategy)} is unknown; expected one of {list(SELECTION_STRATEGIES)} "
            "or empty for the parameter"
        )
    threshold = _iop_threshold(request.iop_threshold)
    selection = None
    if strategy or threshold >= 0.0:
        selection = SelectionConfig(
            strategy=strategy or default_selection.strategy,
            iop_threshold=threshold if threshold >= 0.0 else default_selection.iop_threshold,
            top_k=default_selection.top_k,
        )
    conversation_id = request.conversation_id
    if isinstance(conversation_id, str) and len(conversation_id.strip()) > max_conversation_id_chars:
        raise RequestError(
            f"conversation_id has {len(conversation_id.strip())} characters; the limit is "
            f"{max_conversation_id_chars} (parameter conversation.max_id_chars)"
        )
    conversation = _text_field(request, "conversation_id", allow_newlines=False).strip()
    try:
        stamp_ns = _stamp_to_ns(request.stamp)
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc)) from None
    return_overlay, explain = _flag(request, "return_overlay"), _flag(request, "explain")
    image = None
    try:
        if not is_empty_image(request.image):
            image = frame_from_messages(request.image, from_request=True)
    except (ValueError, TypeError, AttributeError) as exc:  # AttributeError: not an Image at all
        raise RequestError(f"request image: {exc}") from None
    return ParsedRequest(
        instruction=text,
        image=image,
        stamp_ns=stamp_ns,
        selection=selection,
        return_overlay=return_overlay,
        explain=explain,
        conversation_id=conversation or None,
    )


class _Abandoned(Exception):
    """The request's deadline passed before the model was free; nothing was computed."""


@dataclass
class _Job:
    parsed: ParsedRequest
    frame: Frame
    deadline: float
    stage: str = "waiting to start"
    cancelled: bool = False
    result: SegmentResult | None = None
    overlay: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RequestHandler:
    """Serves ``ReasonSegment`` requests against a segmenter and a frame buffer.

    Args:
        segmenter: loaded :class:`~llmseg_ros.pipeline.ReasonSegmenter` (or anything
            with its ``prepare`` / ``segment`` / ``config``).
        buffer: the frames received on the colour topic.
        settings: limits; ``max_instruction_chars`` defaults to the segmenter config's.
    """

    def __init__(
        self, segmenter: Segmenter, buffer: FrameBuffer, settings: HandlerSettings | None = None
    ) -> None:
        self.segmenter = segmenter
        self.buffer = buffer
        self.settings = settings or HandlerSettings(
            max_instruction_chars=segmenter.config.max_instruction_chars,
            max_conversations=segmenter.config.conversation.max_conversations,
            max_conversation_id_chars=segmenter.config.conversation.max_id_chars,
        )
        self._model_lock = threading.Lock()
        self._features: FeatureCache[FrameFeatures] = FeatureCache(buffer.capacity + 1)
        # conversation id → (stamp, cache key) of the frame it is about
        self._conversations: OrderedDict[str, tuple[int, tuple[int, str, str]]] = OrderedDict()
        self._conv_lock = threading.Lock()
        buffer.add_listener(self._frame_left)

    @property
    def model_lock(self) -> threading.Lock:
        """The lock held around every model call (share it with other model users, e.g. tracks)."""
        return self._model_lock

    # -- per frame ---------------------------------------------------------------------
    def features_for(self, frame: Frame) -> tuple[FrameFeatures, bool]:
        """The frame's prepared features, computed once (under the model lock) and cached.

        Returns:
            (features, computed_now).
        """
        with self._model_lock:
            return self._cached_features(frame)

    def has_features(self, frame: Frame) -> bool:
        """True when features computed from exactly this frame's pixels are cached."""
        return frame.cache_key in self._features

    def clear(self) -> None:
        """Forget cached features and conversations (e.g. when the models are unloaded)."""
        self._features.clear()
        with self._conv_lock:
            self._conversations.clear()

    def _cached_features(self, frame: Frame) -> tuple[FrameFeatures, bool]:
        # Keyed by the frame's pixels, not only its stamp: a re-published stamp with new
        # pixels (or a new resolution) never gets the features of the frame it replaced.
        return self._features.get_or_compute(frame.cache_key, lambda: self.segmenter.prepare(frame.rgb))

    def _frame_left(self, old: Frame, new: Frame | None) -> None:
        """Buffer listener: forget the features of a frame that was replaced or dropped."""
        stale = [key for key in self._features.snapshot() if isinstance(key, tuple) and key[:2] == old.key]
        if stale and new is not None:
            keep = new.cache_key  # the same pixels re-published keep their features
            stale = [key for key in stale if key != keep]
        self._features.discard(stale)

    # -- per request -------------------------------------------------------------------
    def handle(self, request: Any) -> SegmentationOutcome:
        """Serve one request; never raises for a bad request, a timeout or a model error."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        instruction = _echo(getattr(request, "instruction", ""), self.settings.max_instruction_chars)
        conversation = _echo(getattr(request, "conversation_id", ""), self.settings.max_conversation_id_chars)
        try:
            parsed = parse_request(
                request,
                max_instruction_chars=self.settings.max_instruction_chars,
                default_selection=self.segmenter.config.selection,
                max_conversation_id_chars=self.settings.max_conversation_id_chars,
            )
            frame, note = self._choose_frame(parsed)
        except RequestError as exc:
            return SegmentationOutcome(False, str(exc), instruction, conversation)
        except (AttributeError, TypeError, ValueError) as exc:
            return SegmentationOutcome(
                False, f"malformed request: {type(exc).__name__}: {exc}", instruction, conversation
            )
        job = _Job(parsed=parsed, frame=frame, deadline=deadline)
        worker = threading.Thread(target=self._run, args=(job,), name="llmseg-request", daemon=True)
        worker.start()
        finished = job.done.wait(timeout=max(0.0, deadline - time.monotonic()))
        outcome = SegmentationOutcome(False, "", parsed.instruction, parsed.conversation_id or "", frame)
        if not finished or isinstance(job.error, _Abandoned):
            job.cancelled = True
            outcome.message = (
                f"request timed out after {self.settings.request_timeout_s:g} s (parameter request_timeout) "
                f"while {job.stage}; the node keeps serving: retry, or raise request_timeout"
            )
            return outcome
        if job.error is not None:
            outcome.message = f"inference failed: {type(job.error).__name__}: {job.error}"
            return outcome
        result = job.result
        assert result is not None
        outcome.success = True
        outcome.result = result
        outcome.overlay = job.overlay
        outcome.timings = dict(job.timings)
        outcome.timings["request_total"] = time.perf_counter() - t0
        if parsed.conversation_id is not None and not frame.from_request:
            self._remember_conversation(parsed.conversation_id, frame)
        outcome.message = _success_message(result, frame, note)
        return outcome

    def _choose_frame(self, parsed: ParsedRequest) -> tuple[Frame, str]:
        if parsed.image is not None:
            return parsed.image, ""
        tolerance_ns = round(self.settings.stamp_tolerance_s * NS_PER_S)
        if parsed.stamp_ns:
            try:
                return self.buffer.get(parsed.stamp_ns, tolerance_ns), ""
            except FrameLookupError as exc:
                raise RequestError(str(exc)) from exc
        latest = self.buffer.latest()
        if latest is None:
            raise RequestError(
                f"no image received yet on topic '{self.settings.image_topic}'; check the camera topic remapping "
                "and that the image QoS (parameter qos.image.reliability) is compatible with the camera's publisher"
            )
        if parsed.conversation_id is not None:
            with self._conv_lock:
                remembered = self._conversations.get(parsed.conversation_id)
            if remembered is not None:
                stamp, key = remembered
                try:
                    frame = self.buffer.get(stamp, 0)
                except FrameLookupError:
                    return latest, (
                        f"; the frame of conversation '{parsed.conversation_id}' ({format_stamp(stamp)}) is no longer "
                        "buffered, so the latest frame was used and the conversation restarts"
                    )
                if frame.cache_key != key:
                    return frame, (
                        f"; the frame of conversation '{parsed.conversation_id}' ({format_stamp(stamp)}) was replaced "
                        "by a new image with the same stamp, so the conversation restarts on it"
                    )
                return frame, ""
        return latest, ""

    def _remember_conversation(self, conversation_id: str, frame: Frame) -> None:
        with self._conv_lock:
            self._conversations[conversation_id] = (frame.stamp_ns, frame.cache_key)
            self._conversations.move_to_end(conversation_id)
            while len(self._conversations) > self.settings.max_conversations:
                self._conversations.popitem(last=False)

    def _run(self, job: _Job) -> None:
        try:
            self._infer(job)
        except BaseException as exc:
            job.error = exc
        finally:
            job.done.set()

    def _infer(self, job: _Job) -> None:
        parsed, frame = job.parsed, job.frame
        t_wait = time.perf_counter()
        job.stage = "waiting for the model (busy with another request or the background precompute)"
        if not self._model_lock.acquire(timeout=max(0.0, job.deadline - time.monotonic())):
            raise _Abandoned()
        try:
            job.timings["queue_wait"] = time.perf_counter() - t_wait
            if job.cancelled:
                raise _Abandoned()
            job.stage = "preparing the frame (proposals and embeddings)"
            if frame.from_request:
                features, computed = self.segmenter.prepare(frame.rgb), True
            else:
                features, computed = self._cached_features(frame)
            if computed:
                job.timings.update(features.timings)
            if job.cancelled:
                raise _Abandoned()
            job.stage = "answering the instruction"
            result = self.segmenter.segment(
                features,
                parsed.instruction,
                selection=parsed.selection,
                explain=parsed.explain,
                conversation_id=parsed.conversation_id,
            )
        finally:
            self._model_lock.release()
        if result.mask.shape != frame.rgb.shape[:2]:
            raise RuntimeError(
                f"the segmenter returned a mask of shape {result.mask.shape} for a frame of {frame.rgb.shape[:2]}"
            )
        job.timings.update(result.timings)
        if parsed.return_overlay:
            job.stage = "drawing the overlay"
            job.overlay = overlay_bgr(frame.rgb, result.mask)
        job.result = result


def _echo(value: object, max_chars: int) -> str:
    """A request's text field as given when it is valid text within its limit, else ``""``."""
    try:
        return check_text(value, "text", max_chars=max_chars)
    except (TypeError, ValueError):
        return ""


def _success_message(result: SegmentResult, frame: Frame, note: str) -> str:
    pixels = int(np.count_nonzero(result.mask))
    source = "the request image" if frame.from_request else f"frame {format_stamp(frame.stamp_ns)}"
    if pixels == 0:
        what = f"no region matched the instruction (empty mask; {result.num_proposals} proposals)"
    else:
        what = f"{pixels} pixels selected"
        if result.selected:
            what += f" ({len(result.selected)} of {result.num_proposals} proposals)"
        what += f", confidence {result.confidence:.2f}"
    warnings = "".join(f"; {w}" for w in result.warnings)
    return f"ok: {what}; method {result.method}, {source}{note}{warnings}"
