"""The public entry point: :class:`ReasonSegmenter`.

    >>> seg = ReasonSegmenter(SegmenterConfig(sam_checkpoint="sam_vit_h_4b8939.pth", weights_dir="weights/"))
    >>> frame = seg.prepare(rgb)                         # proposals + embeddings, once per frame
    >>> result = seg.segment(frame, "something I could stand on to reach the shelf")
    >>> result.mask.shape, result.selected, result.timings

``prepare`` does the instruction-independent work once per frame; every ``segment`` call
on the same ``FrameFeatures`` reuses it (and the VLM's key/value cache of the image
prefix). ``segment`` also accepts a raw image and prepares it first.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from llmseg_ros.config import SegmenterConfig, SelectionConfig, TrackerConfig
from llmseg_ros.methods import SegmentationMethod, SegmentRequest, build_method
from llmseg_ros.models.components import Components
from llmseg_ros.types import FrameFeatures, SegmentResult
from llmseg_ros.utils.imageio import check_rgb_image

if TYPE_CHECKING:
    from llmseg_ros.tracking import Tracker, TrackingModels

FRAME_KEY = "frame_key"
DEFAULT_ANSWER = "It is <SEG>."


class ReasonSegmenter:
    """Image + implicit instruction → mask, with the method chosen by ``config.method``.

    Thread safety: ``prepare`` and ``segment`` may be called from several threads; models
    load once (under a lock) and frames carry their own caches.
    """

    def __init__(self, config: SegmenterConfig, *, max_conversations: int = 64) -> None:
        self.config = config
        self.components = Components(config)
        self._method: SegmentationMethod | None = None
        self._lock = threading.RLock()
        self._conversations: OrderedDict[str, tuple[str, list[tuple[str, str]]]] = OrderedDict()
        self._max_conversations = max_conversations
        self._tracking: TrackingModels | None = None

    # -- lifecycle -------------------------------------------------------------------
    @property
    def method(self) -> SegmentationMethod:
        """The loaded method (loads every model it needs on first access)."""
        with self._lock:
            if self._method is None:
                self._method = build_method(self.components)
            return self._method

    def load(self) -> None:
        """Load every model now (e.g. in a lifecycle node's configure transition)."""
        _ = self.method

    def close(self) -> None:
        """Free every model (and cached GPU memory); a later call loads them again."""
        with self._lock:
            self._method = None
            self._conversations.clear()
            if self._tracking is not None:
                self._tracking.release()
            self.components.release()

    @property
    def is_loaded(self) -> bool:
        return self._method is not None

    # -- per frame -------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> FrameFeatures:
        """Instruction-independent features of one frame.

        Args:
            image: (H, W, 3) uint8 RGB.
        Returns:
            FrameFeatures to pass to :meth:`segment`, reusable for any number of
            instructions.
        """
        check_rgb_image(image)
        frame = self.method.prepare(np.ascontiguousarray(image))
        frame.cache[FRAME_KEY] = uuid.uuid4().hex
        return frame

    # -- per instruction ---------------------------------------------------------------
    def validate_instruction(self, instruction: object) -> str:
        """The stripped instruction, or ``ValueError`` saying what is wrong."""
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        text = instruction.strip()
        if not text:
            raise ValueError("instruction is empty; expected a sentence or phrase describing the target")
        if len(text) > self.config.max_instruction_chars:
            raise ValueError(
                f"instruction is {len(text)} characters long; the limit is {self.config.max_instruction_chars}"
            )
        return text

    def segment(
        self,
        frame_or_image: FrameFeatures | np.ndarray,
        instruction: str,
        *,
        selection: SelectionConfig | None = None,
        explain: bool = False,
        conversation_id: str | None = None,
        is_sentence: bool | None = None,
    ) -> SegmentResult:
        """Answer one instruction.

        Args:
            frame_or_image: a prepared frame, or an (H, W, 3) uint8 RGB image (prepared
                here; its preparation time is included in the result's timings).
            instruction: the (implicit) instruction.
            selection: override of the configured selection strategy / threshold.
            explain: also return the VLM's text answer.
            conversation_id: follow-ups with the same id on the same frame see the
                earlier turns; a new frame starts the conversation afresh.
            is_sentence: force the sentence (True) or phrase (False) prompt.
        Returns:
            SegmentResult with the mask at the frame's resolution.
        """
        text = self.validate_instruction(instruction)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if isinstance(frame_or_image, FrameFeatures):
            frame = frame_or_image
        else:
            frame = self.prepare(frame_or_image)
            timings.update(frame.timings)
        history = self._history(conversation_id, frame)
        request = SegmentRequest(
            instruction=text, selection=selection, explain=explain, history=history, is_sentence=is_sentence
        )
        result = self.method.segment(frame, request)
        if conversation_id is not None:
            self._remember(conversation_id, frame, text, result.answer or DEFAULT_ANSWER)
        timings.update(result.timings)
        timings["total"] = time.perf_counter() - t0
        result.timings = timings
        return result

    # -- tracking ----------------------------------------------------------------------------
    def track(
        self,
        frame_or_image: FrameFeatures | np.ndarray,
        result: SegmentResult,
        *,
        instruction: str | None = None,
        config: TrackerConfig | None = None,
        track_id: str | None = None,
        stamp_ns: int | None = None,
    ) -> Tracker:
        """Start following ``result``'s target on later frames (``Tracker.update``).

        Args:
            frame_or_image: the frame ``result`` answers (prepared, or the raw image).
            result: any method's answer on that frame, with a non-empty mask.
            instruction: the instruction behind ``result``; with it the tracker re-runs
                the full method when ``config``'s re-query policy asks, without it never.
            config: propagation backend, re-query policy, lost and timeout rules.
            track_id: the track's id (default: a fresh unique one).
            stamp_ns: the frame's stamp in ns (default: a monotonic clock; then leave
                every update's stamp to the clock too).
        Returns:
            A :class:`~llmseg_ros.tracking.Tracker`; its ``start_result`` is the answer
            the track starts from.
        Raises:
            ValueError: an empty answer, a mask that does not fit the frame, or a bad
                instruction.
            TypeError: ``config`` is not a TrackerConfig, or the frame is neither
                FrameFeatures nor an image.
        """
        from llmseg_ros.tracking import Tracker, TrackingModels, as_frame, is_light, new_track_id

        cfg = config if config is not None else TrackerConfig()
        if not isinstance(cfg, TrackerConfig):
            raise TypeError(f"config must be a TrackerConfig, got {type(cfg).__name__}")
        frame = as_frame(frame_or_image)
        requery = None
        text: str | None = None
        if instruction is not None:
            text = query_text = self.validate_instruction(instruction)

            def requery(new_frame: FrameFeatures) -> SegmentResult:
                return self.segment(new_frame.image if is_light(new_frame) else new_frame, query_text)

        with self._lock:
            if self._tracking is None:
                self._tracking = TrackingModels(self.components)
            tracking = self._tracking
        return Tracker(
            track_id or new_track_id(),
            tracking.propagator(cfg),
            frame,
            result,
            cfg,
            instruction=text,
            requery=requery,
            stamp_ns=stamp_ns,
        )

    # -- conversations -------------------------------------------------------------------
    def _history(self, conversation_id: str | None, frame: FrameFeatures) -> list[tuple[str, str]]:
        if conversation_id is None:
            return []
        with self._lock:
            entry = self._conversations.get(conversation_id)
            if entry is None or entry[0] != frame.cache.get(FRAME_KEY):
                return []
            return list(entry[1])

    def _remember(self, conversation_id: str, frame: FrameFeatures, instruction: str, answer: str) -> None:
        key = frame.cache.setdefault(FRAME_KEY, uuid.uuid4().hex)
        with self._lock:
            entry = self._conversations.get(conversation_id)
            turns = list(entry[1]) if entry is not None and entry[0] == key else []
            turns.append((instruction, answer))
            self._conversations[conversation_id] = (key, turns)
            self._conversations.move_to_end(conversation_id)
            while len(self._conversations) > self._max_conversations:
                self._conversations.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        """What is configured and loaded (for logs and the CLI)."""
        return {
            "method": self.config.method,
            "profile": self.config.profile,
            "device": str(self.components.device),
            "dtype": str(self.components.dtype).replace("torch.", ""),
            "loaded": self.components.loaded,
        }
