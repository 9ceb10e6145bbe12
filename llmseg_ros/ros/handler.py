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

from llmseg_ros.config import SELECTION_STRATEGIES, SegmenterConfig, SelectionConfig
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
    """

    max_instruction_chars: int = 1000
    request_timeout_s: float = 60.0
    stamp_tolerance_s: float = 0.01
    image_topic: str = "image"
    max_conversations: int = 64

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
    """

    success: bool
    message: str
    instruction: str = ""
    conversation_id: str = ""
    frame: Frame | None = None
    result: SegmentResult | None = None
    overlay: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

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


def parse_request(
    request: Any, *, max_instruction_chars: int, default_selection: SelectionConfig
) -> ParsedRequest:
    """Validate the fields of a ``ReasonSegment`` request.

    Raises:
        RequestError: empty or over-long instruction, bad strategy / threshold override,
            or an unreadable request image.
    """
    instruction = request.instruction
    if not isinstance(instruction, str):
        raise RequestError(f"instruction must be a string, got {type(instruction).__name__}")
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
    strategy = str(request.selection_strategy).strip()
    if strategy and strategy not in SELECTION_STRATEGIES:
        raise RequestError(
            f"selection_strategy {strategy!r} is unknown; expected one of {list(SELECTION_STRATEGIES)} "
            "or empty for the parameter"
        )
    threshold = float(request.iop_threshold)
    if math.isnan(threshold) or threshold > 1.0:
        raise RequestError(f"iop_threshold must be in [0, 1], or negative for the parameter; got {threshold}")
    selection = None
    if strategy or threshold >= 0.0:
        selection = SelectionConfig(
            strategy=strategy or default_selection.strategy,
            iop_threshold=threshold if threshold >= 0.0 else default_selection.iop_threshold,
            top_k=default_selection.top_k,
        )
    image = None
    if not is_empty_image(request.image):
        try:
            image = frame_from_messages(request.image, from_request=True)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"request image: {exc}") from exc
    conversation = str(request.conversation_id).strip()
    return ParsedRequest(
        instruction=text,
        image=image,
        stamp_ns=_stamp_to_ns(request.stamp),
        selection=selection,
        return_overlay=bool(request.return_overlay),
        explain=bool(request.explain),
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
            max_instruction_chars=segmenter.config.max_instruction_chars
        )
        self._model_lock = threading.Lock()
        self._features: FeatureCache[FrameFeatures] = FeatureCache(buffer.capacity + 1)
        self._conversations: OrderedDict[str, int] = OrderedDict()
        self._conv_lock = threading.Lock()

    # -- per frame ---------------------------------------------------------------------
    def features_for(self, frame: Frame) -> tuple[FrameFeatures, bool]:
        """The frame's prepared features, computed once (under the model lock) and cached.

        Returns:
            (features, computed_now).
        """
        with self._model_lock:
            return self._cached_features(frame)

    def has_features(self, frame: Frame) -> bool:
        return frame.key in self._features

    def clear(self) -> None:
        """Forget cached features and conversations (e.g. when the models are unloaded)."""
        self._features.clear()
        with self._conv_lock:
            self._conversations.clear()

    def _cached_features(self, frame: Frame) -> tuple[FrameFeatures, bool]:
        return self._features.get_or_compute(frame.key, lambda: self.segmenter.prepare(frame.rgb))

    # -- per request -------------------------------------------------------------------
    def handle(self, request: Any) -> SegmentationOutcome:
        """Serve one request; never raises for a bad request, a timeout or a model error."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        instruction = str(getattr(request, "instruction", ""))
        conversation = str(getattr(request, "conversation_id", ""))
        try:
            parsed = parse_request(
                request,
                max_instruction_chars=self.settings.max_instruction_chars,
                default_selection=self.segmenter.config.selection,
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
            self._remember_conversation(parsed.conversation_id, frame.stamp_ns)
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
                stamp = self._conversations.get(parsed.conversation_id)
            if stamp is not None:
                try:
                    return self.buffer.get(stamp, 0), ""
                except FrameLookupError:
                    return latest, (
                        f"; the frame of conversation '{parsed.conversation_id}' ({format_stamp(stamp)}) is no longer "
                        "buffered, so the latest frame was used and the conversation restarts"
                    )
        return latest, ""

    def _remember_conversation(self, conversation_id: str, stamp_ns: int) -> None:
        with self._conv_lock:
            self._conversations[conversation_id] = stamp_ns
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
    return f"ok: {what}; method {result.method}, {source}{note}"
