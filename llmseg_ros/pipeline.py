"""The public entry point: :class:`ReasonSegmenter`.

    >>> seg = ReasonSegmenter(SegmenterConfig(sam_checkpoint="sam_vit_h_4b8939.pth", weights_dir="weights/"))
    >>> frame = seg.prepare(rgb)                         # proposals + embeddings, once per frame
    >>> result = seg.segment(frame, "something I could stand on to reach the shelf")
    >>> result.mask.shape, result.selected, result.timings

``prepare`` does the instruction-independent work once per frame; every ``segment`` call
on the same ``FrameFeatures`` reuses it (and the VLM's key/value cache of the image
prefix). ``segment`` also accepts a raw image and prepares it first.

Follow-ups (``conversation_id``) see the earlier turns on the same frame, within the caps
of ``config.conversation`` and the VLM's context (:mod:`llmseg_ros.conversations`); the
result says when turns were dropped (``SegmentResult.dropped_turns`` and ``warnings``).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from llmseg_ros.config import PromptFormat, SegmenterConfig, SelectionConfig, TrackerConfig
from llmseg_ros.conversations import (
    FRAME_KEY,
    ConversationStore,
    FittedHistory,
    PromptCounter,
    Turn,
    fit_history,
    frame_key,
    prompt_counter,
)
from llmseg_ros.methods import SegmentationMethod, SegmentRequest, build_method
from llmseg_ros.models.components import Components
from llmseg_ros.models.prompts import DEFAULT_ANSWER
from llmseg_ros.types import FrameFeatures, SegmentResult
from llmseg_ros.utils.imageio import check_rgb_image
from llmseg_ros.utils.text import check_text

__all__ = ["FRAME_KEY", "ReasonSegmenter"]

if TYPE_CHECKING:
    from llmseg_ros.tracking import Tracker, TrackingModels


class ReasonSegmenter:
    """Image + implicit instruction → mask, with the method chosen by ``config.method``.

    Thread safety: ``prepare`` and ``segment`` may be called from several threads; models
    load once (under a lock) and frames carry their own caches.
    """

    def __init__(self, config: SegmenterConfig, *, max_conversations: int | None = None) -> None:
        """Args:
        config: what to load and how to answer.
        max_conversations: overrides ``config.conversation.max_conversations``.
        """
        if max_conversations is not None:
            config = config.replace(
                conversation=dataclasses.replace(config.conversation, max_conversations=max_conversations)
            )
        self.config = config
        self.components = Components(config)
        self._method: SegmentationMethod | None = None
        self._counter: PromptCounter | None = None
        self._lock = threading.RLock()
        self._conversations = ConversationStore(config.conversation)
        self._tracking: TrackingModels | None = None

    # -- lifecycle -------------------------------------------------------------------
    @property
    def method(self) -> SegmentationMethod:
        """The loaded method (loads every model it needs on first access)."""
        with self._lock:
            if self._method is None:
                self._method = build_method(self.components)
                self._counter = prompt_counter(self._method)
            return self._method

    def load(self) -> None:
        """Load every model now (e.g. in a lifecycle node's configure transition)."""
        _ = self.method

    def close(self) -> None:
        """Free every model (and cached GPU memory); a later call loads them again."""
        with self._lock:
            self._method = None
            self._counter = None
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
        frame_key(frame)
        return frame

    # -- per instruction ---------------------------------------------------------------
    def validate_instruction(self, instruction: object) -> str:
        """The stripped instruction, or ``TypeError`` / ``ValueError`` saying what is wrong
        (not a string, empty, too long, not valid UTF-8 or holding control characters)."""
        text = check_text(instruction, "instruction").strip()
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
                earlier turns (at most ``config.conversation.max_turns``, fewer when the
                prompt would not fit the VLM's context: the oldest are dropped and the
                result says so); a new frame starts the conversation afresh.
            is_sentence: force the sentence (True) or phrase (False) prompt.
        Returns:
            SegmentResult with the mask at the frame's resolution.
        Raises:
            TypeError, ValueError: an invalid instruction or conversation id (not a
                string, empty or too long, not valid UTF-8, control characters).
        """
        text = self.validate_instruction(instruction)
        conversation = self._conversations.check_id(conversation_id)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        if isinstance(frame_or_image, FrameFeatures):
            frame = frame_or_image
        else:
            frame = self.prepare(frame_or_image)
            timings.update(frame.timings)
        method = self.method
        history = self._conversations.history(conversation, frame) if conversation is not None else []
        request = SegmentRequest(
            instruction=text, selection=selection, explain=explain, history=history, is_sentence=is_sentence
        )
        t_fit = time.perf_counter()
        fitted = fit_history(self._counter, frame, request)
        if fitted.tokens is not None:
            timings["prompt_fit"] = time.perf_counter() - t_fit
        request.history = fitted.history
        result = method.segment(frame, request)
        result.history_turns = len(fitted.history)
        result.warnings.extend(fitted.notes)
        if conversation is not None:
            answer = result.answer or self._teacher_answer()
            forgotten = self._conversations.remember(conversation, frame, [*fitted.history, (text, answer)])
            result.dropped_turns = fitted.dropped + forgotten
            result.warnings.extend(self._dropped_notes(conversation, fitted.dropped, forgotten, fitted))
        timings.update(result.timings)
        timings["total"] = time.perf_counter() - t0
        result.timings = timings
        return result

    def _teacher_answer(self) -> str:
        """The answer a turn without a text answer is remembered with: the one the weights were taught."""
        prompt = getattr(getattr(self.method, "vlm", None), "prompt", None)
        return prompt.answer if isinstance(prompt, PromptFormat) else DEFAULT_ANSWER

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
    def conversation_history(self, conversation_id: str, frame: FrameFeatures) -> list[Turn]:
        """The (instruction, answer) turns a follow-up on ``frame`` would see, oldest first."""
        conversation = self._conversations.check_id(conversation_id)
        return self._conversations.history(conversation, frame) if conversation is not None else []

    def _dropped_notes(
        self, conversation: str, for_context: int, forgotten: int, fitted: FittedHistory
    ) -> list[str]:
        notes = []
        if for_context:
            notes.append(
                f"conversation '{conversation}': dropped the {for_context} oldest turn(s) so the prompt fits the "
                f"VLM's context ({fitted.tokens} of {fitted.context_tokens} tokens)"
            )
        if forgotten:
            notes.append(
                f"conversation '{conversation}': forgot its {forgotten} oldest turn(s); it keeps the latest "
                f"{self.config.conversation.max_turns} (conversation.max_turns)"
            )
        return notes

    def describe(self) -> dict[str, Any]:
        """What is configured and loaded (for logs and the CLI)."""
        return {
            "method": self.config.method,
            "profile": self.config.profile,
            "device": str(self.components.device),
            "dtype": str(self.components.dtype).replace("torch.", ""),
            "loaded": self.components.loaded,
        }
