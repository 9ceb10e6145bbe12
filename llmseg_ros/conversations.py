"""Follow-up conversations: which earlier turns a request sees, within bounds.

:class:`ConversationStore` keeps the (instruction, answer) turns of each conversation id,
tied to the frame they were asked about, with caps on the number of conversations, the
turns kept per conversation and the length of an id (:class:`~llmseg_ros.config.ConversationConfig`).

:func:`fit_history` keeps a request's prompt within the VLM's context: it counts the
prompt's tokens the way the method will build it (through the VLM's public API: the
``<SEG>`` VLM's conversation text and expanded token ids, or the chat VLM's processor)
and drops the oldest turns until the prompt plus the tokens the method may generate fit.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llmseg_ros.config import ConversationConfig
from llmseg_ros.methods.base import SegmentationMethod, SegmentRequest
from llmseg_ros.types import FrameFeatures
from llmseg_ros.utils.text import check_text

if TYPE_CHECKING:
    from llmseg_ros.models.chat_vlm import ChatVLM
    from llmseg_ros.models.vlm import SegVLM

FRAME_KEY = "frame_key"
Turn = tuple[str, str]


def frame_key(frame: FrameFeatures) -> str:
    """The identity of a prepared frame for conversations (set once, kept in its cache)."""
    key: str = frame.cache.setdefault(FRAME_KEY, uuid.uuid4().hex)
    return key


class ConversationStore:
    """Turns per conversation id, on one frame each; thread-safe.

    A follow-up on another frame starts the conversation afresh. At most
    ``config.max_conversations`` conversations are kept (least recently used forgotten)
    and at most ``config.max_turns`` turns per conversation (oldest forgotten).
    """

    def __init__(self, config: ConversationConfig) -> None:
        self.config = config
        self._entries: OrderedDict[str, tuple[str, list[Turn]]] = OrderedDict()
        self._lock = threading.Lock()

    def check_id(self, conversation_id: object) -> str | None:
        """The stripped id (``None`` for none or an empty one); ``TypeError`` / ``ValueError`` if invalid.

        An id must be a string of at most ``config.max_id_chars`` characters, valid UTF-8,
        without control characters.
        """
        if conversation_id is None:
            return None
        text = check_text(conversation_id, "conversation_id", allow_newlines=False).strip()
        if len(text) > self.config.max_id_chars:
            raise ValueError(
                f"conversation_id has {len(text)} characters; the limit is {self.config.max_id_chars} "
                "(conversation.max_id_chars)"
            )
        return text or None

    def history(self, conversation_id: str, frame: FrameFeatures) -> list[Turn]:
        """Earlier turns of ``conversation_id`` on ``frame``, oldest first ([] on another frame)."""
        key = frame_key(frame)
        with self._lock:
            entry = self._entries.get(conversation_id)
            if entry is None or entry[0] != key:
                return []
            return list(entry[1])

    def remember(self, conversation_id: str, frame: FrameFeatures, turns: list[Turn]) -> int:
        """Store ``turns`` (oldest first) as the conversation on ``frame``.

        Returns:
            How many of the oldest turns were dropped to respect ``config.max_turns``.
        """
        key = frame_key(frame)
        dropped = max(0, len(turns) - self.config.max_turns)
        kept = list(turns[dropped:])
        with self._lock:
            self._entries[conversation_id] = (key, kept)
            self._entries.move_to_end(conversation_id)
            while len(self._entries) > self.config.max_conversations:
                self._entries.popitem(last=False)
        return dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# -- prompt length ----------------------------------------------------------------------
class PromptCounter(Protocol):
    """Counts the tokens a method's VLM call needs for a request.

    Attributes:
        context_tokens: the VLM's context length (tokens), or ``None`` when unknown.
    """

    context_tokens: int | None

    def count(self, frame: FrameFeatures, request: SegmentRequest) -> int | None:
        """Prompt tokens (image tokens expanded) plus the most tokens the call may generate;
        ``None`` when the method makes no VLM call with the history for this frame."""
        ...


def context_length(model_config: Any, tokenizer: Any) -> int | None:
    """The smaller of the language model's ``max_position_embeddings`` and the tokenizer's
    ``model_max_length`` (ignored when it is the "unlimited" sentinel); ``None`` if neither."""
    text_config = getattr(model_config, "text_config", None) or model_config
    limits = []
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_length, int) and 0 < max_length < 10**7:
        limits.append(max_length)
    return min(limits) if limits else None


class SegVLMPrompt:
    """Prompt length of the ``<SEG>`` VLM methods (llmseg, lisa).

    The teacher-forced conversation (the answer of the weights' prompt format) with the
    image tokens expanded; with ``explain`` also the tokens :meth:`SegVLM.generate` may add.
    """

    def __init__(self, vlm: SegVLM) -> None:
        self.vlm = vlm
        self.answer = vlm.prompt.answer
        self.context_tokens = context_length(vlm.model.config, vlm.tokenizer)
        self.generated_tokens = int(inspect.signature(vlm.generate).parameters["max_new_tokens"].default)

    def count(self, frame: FrameFeatures, request: SegmentRequest) -> int | None:
        text = self.vlm.build_conversation(
            request.instruction, is_sentence=request.is_sentence, answer=self.answer, history=request.history
        )
        tokens = len(self.vlm.expanded_input_ids(text, frame.image))
        return tokens + (self.generated_tokens if request.explain else 0)


UserTurn = Callable[[FrameFeatures, str], "tuple[np.ndarray, str] | None"]


class ChatVLMPrompt:
    """Prompt length of the chat-VLM methods (grounded, vlm_grounding, vlm_marks).

    Args:
        chat_vlm: the method's chat VLM.
        user_turn: the (image, user text) the method sends for an instruction on a frame,
            or ``None`` when it sends nothing.
        max_new_tokens: the method's generation budget.
    """

    def __init__(self, chat_vlm: ChatVLM, user_turn: UserTurn, max_new_tokens: int) -> None:
        self.chat_vlm = chat_vlm
        self.user_turn = user_turn
        self.max_new_tokens = int(max_new_tokens)
        self.context_tokens = context_length(chat_vlm.model.config, chat_vlm.processor.tokenizer)

    def count(self, frame: FrameFeatures, request: SegmentRequest) -> int | None:
        from PIL import Image

        turn = self.user_turn(frame, request.instruction)
        if turn is None:
            return None
        image, prompt = turn
        messages: list[dict[str, Any]] = []
        for i, (user, assistant) in enumerate([*request.history, (prompt, None)]):
            content: list[dict[str, Any]] = [{"type": "image"}] if i == 0 else []
            content.append({"type": "text", "text": user})
            messages.append({"role": "user", "content": content})
            if assistant is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
        processor = self.chat_vlm.processor
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(images=[Image.fromarray(image)], text=[text], return_tensors="pt")
        return int(inputs["input_ids"].shape[1]) + self.max_new_tokens


def prompt_counter(method: SegmentationMethod) -> PromptCounter | None:
    """The prompt counter of a loaded method, or ``None`` for a method without a VLM conversation."""
    target: Any = method
    if method.name in ("llmseg", "lisa"):
        return SegVLMPrompt(target.vlm)
    if method.name == "grounded":
        from llmseg_ros.methods.grounded import grounding_prompt as grounded_prompt

        return ChatVLMPrompt(
            target.chat_vlm, lambda frame, text: (frame.image, grounded_prompt(text)), target.max_new_tokens
        )
    if method.name == "vlm_grounding":
        from llmseg_ros.methods.vlm_grounding import grounding_prompt

        convention = target.chat_vlm.coordinate_convention
        return ChatVLMPrompt(
            target.chat_vlm,
            lambda frame, text: (frame.image, grounding_prompt(text, convention)),
            target.max_new_tokens,
        )
    if method.name == "vlm_marks":
        from llmseg_ros.methods.vlm_marks import MARKS_IMAGE_KEY, MARKS_LAYOUT_KEY, marks_prompt

        def marks_turn(frame: FrameFeatures, text: str) -> tuple[np.ndarray, str] | None:
            if MARKS_LAYOUT_KEY not in frame.cache:
                frame.cache.update(target.render(frame.image, frame.proposals))
            count = len(frame.cache[MARKS_LAYOUT_KEY].placements)
            return (frame.cache[MARKS_IMAGE_KEY], marks_prompt(text, count)) if count else None

        return ChatVLMPrompt(target.chat_vlm, marks_turn, target.max_new_tokens)
    return None


@dataclass
class FittedHistory:
    """The history a request keeps.

    Attributes:
        history: the turns kept, oldest first.
        dropped: oldest turns dropped so the prompt fits the context.
        tokens: prompt tokens (plus generation budget) with ``history``; ``None`` = not counted.
        context_tokens: the VLM's context; ``None`` = unknown.
    """

    history: list[Turn]
    dropped: int = 0
    tokens: int | None = None
    context_tokens: int | None = None
    notes: list[str] = field(default_factory=list)


def fit_history(
    counter: PromptCounter | None, frame: FrameFeatures, request: SegmentRequest
) -> FittedHistory:
    """Drop the oldest turns of ``request.history`` until its prompt fits the VLM's context.

    Counts only when there is history to drop (a request without history costs nothing).
    When even no history does not fit, the request still runs and a note says so.
    """
    history = list(request.history)
    if counter is None or not history or counter.context_tokens is None:
        return FittedHistory(history)
    limit = counter.context_tokens
    dropped = 0
    while True:
        tokens = counter.count(frame, dataclasses.replace(request, history=history))
        if tokens is None:
            return FittedHistory(list(request.history))
        if tokens <= limit or not history:
            break
        history.pop(0)
        dropped += 1
    fitted = FittedHistory(history, dropped, tokens, limit)
    if tokens > limit:
        fitted.notes.append(
            f"the prompt needs {tokens} tokens, more than the VLM's context of {limit}, even without earlier "
            "turns; the answer may be unreliable (shorten the instruction)"
        )
    return fitted
