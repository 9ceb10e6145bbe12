"""Conversation text and tokenisation for the ``<SEG>`` VLM.

Two formats, chosen by the weights' :class:`~llmseg_ros.config.PromptFormat`:

* ``llava15`` (:class:`ConversationFormat`): the processor's chat template when it has
  one, else the LLaVA-1.5 format ``"USER: <image>\\n{question} ASSISTANT: {answer}"``; the
  text is tokenised in one piece with the image placeholder expanded to one token per
  image feature, as the processor does. Our own training uses it.
* ``llava_v1`` (:class:`LlavaV1Format`): the LLM-Seg / LISA authors' ``llava_v1`` template
  (``model/llava/conversation.py``: their system prompt, ``USER: `` / ``ASSISTANT: `` turns
  separated by ``" "`` and ``"</s>"``, the image as ``<im_start><image><im_end>\\n `` at the
  start of the first turn) tokenised as their ``tokenizer_image_token`` did with their
  tokenizer: the text split at the image, each piece tokenised on its own (BOS once), the
  image expanded to one token per image feature between them.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import numpy as np
import torch

from llmseg_ros.config import PromptFormat
from llmseg_ros.models.prompts import format_instruction

FALLBACK_USER = "USER:"
FALLBACK_ASSISTANT = "ASSISTANT:"

# The authors' ``conv_llava_v1`` (LLM-Seg and LISA ``model/llava/conversation.py``).
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_V1_ROLES = ("USER", "ASSISTANT")
LLAVA_V1_SEPS = (" ", "</s>")
# Their image layout (``use_mm_start_end=True``): ``<im_start><image><im_end>``.
IM_START = "<im_start>"
IM_END = "<im_end>"


class PromptAnswer(enum.Enum):
    """``DEFAULT``: the teacher-forced answer of the VLM's :class:`~llmseg_ros.config.PromptFormat`."""

    DEFAULT = "default"


def check_image(image: Any) -> np.ndarray:
    """``image`` if it is an (H, W, 3) uint8 array; else a TypeError / ValueError saying why not."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return image


def check_history(history: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """Earlier turns as a list of (instruction, answer) pairs of str (``None`` = no turns)."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise TypeError(
            f"history must be a list of (instruction, answer) pairs, got {type(history).__name__}"
        )
    pairs: list[tuple[str, str]] = []
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise TypeError(f"history[{i}] must be an (instruction, answer) pair of str, got {turn!r}")
        pairs.append((turn[0], turn[1]))
    return pairs


class ConversationFormat:
    """The LLaVA-1.5 chat format and tokenisation of one LLaVA processor (``llava15``).

    Args:
        processor: the checkpoint's processor (image processor + tokenizer).
        device, dtype: where processed pixels go, and their dtype.
        prompt: instruction wording, teacher-forced answer and segmentation token
            (default: ours, :class:`~llmseg_ros.config.PromptFormat`).
    """

    name = "llava15"

    def __init__(
        self, processor: Any, *, device: torch.device, dtype: torch.dtype, prompt: PromptFormat | None = None
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        self.device = device
        self.dtype = dtype
        self.prompt = prompt if prompt is not None else PromptFormat()
        if self.prompt.conversation != self.name:
            raise ValueError(
                f"{type(self).__name__} renders the {self.name!r} conversation, got a prompt format "
                f"for {self.prompt.conversation!r}; use conversation_format()"
            )
        self.seg_token = self.prompt.seg_token
        self._bos_token: str | None = self.tokenizer.bos_token

    def _check_texts(self, turns: list[tuple[str, str]], texts: list[str]) -> None:
        if any(self.image_token in t for t in texts) or any(self.image_token in a for _, a in turns):
            raise ValueError(
                f"instructions and answers must not contain the image token {self.image_token!r}"
            )

    def render(self, turns: list[tuple[str, str]], user_text: str, answer: str | None) -> str:
        """Chat text for finished ``turns`` + the ``user_text`` turn, the image in the first turn."""
        texts = [q for q, _ in turns] + [user_text]
        self._check_texts(turns, texts)
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages: list[dict[str, Any]] = []
            for i, text in enumerate(texts):
                content: list[dict[str, str]] = [{"type": "image"}] if i == 0 else []
                content.append({"type": "text", "text": text})
                messages.append({"role": "user", "content": content})
                if i < len(turns):
                    messages.append({"role": "assistant", "content": [{"type": "text", "text": turns[i][1]}]})
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            parts = []
            for i, text in enumerate(texts):
                image = f"{self.image_token}\n" if i == 0 else ""
                parts.append(f"{FALLBACK_USER} {image}{text}")
                parts.append(f"{FALLBACK_ASSISTANT} {turns[i][1]}" if i < len(turns) else FALLBACK_ASSISTANT)
            prompt = " ".join(parts)
        if prompt.count(self.image_token) != 1:
            raise RuntimeError(
                f"the conversation must hold the image token {self.image_token!r} exactly once, got {prompt!r}"
            )
        return prompt if answer is None else f"{prompt} {answer}"

    def build(
        self,
        instruction: str,
        *,
        is_sentence: bool | None = None,
        answer: str | PromptAnswer | None = PromptAnswer.DEFAULT,
        history: list[tuple[str, str]] | None = None,
    ) -> str:
        """The full conversation text, with the (unexpanded) image placeholder.

        Args:
            instruction: the user's instruction; put into the sentence or phrase template
                in the prompt format's style (:func:`llmseg_ros.models.prompts.format_instruction`).
            is_sentence: template choice; ``None`` → :func:`llmseg_ros.models.prompts.is_sentence`.
            answer: teacher-forced assistant answer appended after the generation prompt
                (default: the prompt format's answer); ``None`` ends the text at the
                generation prompt (for generation).
            history: earlier (instruction, answer) turns, oldest first; their
                instructions get the same templates. The image goes in the first turn.
        """
        style = self.prompt.instruction
        user_text = format_instruction(instruction, is_sentence, style=style)
        if self.seg_token in user_text:
            raise ValueError(f"instruction must not contain {self.seg_token}, got {instruction!r}")
        turns = [(format_instruction(q, style=style), a) for q, a in check_history(history)]
        if isinstance(answer, PromptAnswer):
            answer = self.prompt.answer
        return self.render(turns, user_text, answer)

    def image_inputs(self, image: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
        """Processed pixels (1, 3, h, w), other image tensors, and the expanded placeholder text."""
        processed = self.processor.image_processor(
            images=[image], return_tensors="pt", input_data_format="channels_last"
        )
        image_text = self.processor.replace_image_token(processed, image_idx=0)
        pixel_values = processed["pixel_values"].to(self.device, self.dtype)
        extra = {
            k: v.to(self.device)
            for k, v in processed.items()
            if k != "pixel_values" and isinstance(v, torch.Tensor)
        }
        return pixel_values, extra, image_text

    def encode(self, text: str, image_text: str, *, offsets: bool = False) -> tuple[Any, str]:
        """Token ids of ``text`` with the image placeholder expanded, and the expanded text."""
        expanded = text.replace(self.image_token, image_text, 1)
        add_special = not (self._bos_token and expanded.startswith(self._bos_token))
        return self.tokenizer(
            expanded, add_special_tokens=add_special, return_offsets_mapping=offsets
        ), expanded

    def input_ids(self, text: str, image_text: str) -> list[int]:
        """Token ids of ``text`` with the image placeholder expanded."""
        return list(self.encode(text, image_text)[0]["input_ids"])


class LlavaV1Format(ConversationFormat):
    """The authors' ``llava_v1`` conversation and tokenisation (see the module docstring).

    Text for one instruction (answer ``[SEG].``, the authors' validation)::

        {system} USER: <im_start><image><im_end>\\n {instruction} Please output segmentation mask. ASSISTANT: [SEG].</s>

    Tokenisation (their ``tokenizer_image_token`` with their slow LLaMA tokenizer): the
    text is cut at the image placeholder; each piece is cut at the tokenizer's added and
    special tokens; whitespace next to an added token (the segmentation token,
    ``<im_start>``, ``<im_end>``) is removed, as their tokenizer did for tokens added with
    ``add_tokens`` (none for ``</s>``); every remaining text piece is encoded on its own;
    BOS starts the sequence once and the image placeholder becomes one token per image
    feature.
    """

    name = "llava_v1"

    def __init__(
        self, processor: Any, *, device: torch.device, dtype: torch.dtype, prompt: PromptFormat | None = None
    ) -> None:
        super().__init__(processor, device=device, dtype=dtype, prompt=prompt)
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END, self.seg_token) if t not in vocab]
        if missing:
            raise ValueError(
                f"the llava_v1 format needs the tokens {missing} in the vocabulary (the authors' "
                "<im_start>/<im_end> and segmentation token); import the checkpoint with `llmseg import-weights`"
            )
        self._image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        self._stripping = (self.seg_token, IM_START, IM_END)
        special = [self.tokenizer.bos_token, self.tokenizer.eos_token, self.tokenizer.unk_token]
        keep = [t for t in special if t and t in vocab]
        split_tokens = sorted({*self._stripping, *keep}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in split_tokens) + ")")

    def render(self, turns: list[tuple[str, str]], user_text: str, answer: str | None) -> str:
        """``llava_v1`` text: system prompt, then ``USER: … ASSISTANT: …</s>`` turns (the image first)."""
        texts = [q for q, _ in turns] + [user_text]
        self._check_texts(turns, texts)
        for text in [*texts, *(a for _, a in turns)]:
            if IM_START in text or IM_END in text:
                raise ValueError(
                    f"instructions and answers must not contain {IM_START} or {IM_END}, got {text!r}"
                )
        user, assistant = LLAVA_V1_ROLES
        text = LLAVA_V1_SYSTEM + LLAVA_V1_SEPS[0]
        for i, question in enumerate(texts):
            if i == 0:
                question = f"{IM_START}{self.image_token}{IM_END}\n {question}"
            text += f"{user}: {question}{LLAVA_V1_SEPS[0]}"
            reply = turns[i][1] if i < len(turns) else answer
            text += f"{assistant}: {reply}{LLAVA_V1_SEPS[1]}" if reply else f"{assistant}:"
        return text

    def _piece_ids(self, text: str) -> list[int]:
        """Ids of one piece of text (no BOS), tokenised as the authors' tokenizer did."""
        parts = self._split.split(text)  # text, token, text, token, ..., text
        for i in range(1, len(parts), 2):
            if parts[i] in self._stripping:
                parts[i - 1] = parts[i - 1].rstrip()
                parts[i + 1] = parts[i + 1].lstrip()
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(int(self.tokenizer.convert_tokens_to_ids(part)))
            elif part:
                ids.extend(self.tokenizer.encode(part, add_special_tokens=False))
        return ids

    def input_ids(self, text: str, image_text: str) -> list[int]:
        """Token ids of ``text``: BOS, the piece before the image, the image tokens, the rest."""
        if text.count(self.image_token) != 1:
            raise RuntimeError(
                f"the conversation must hold the image token {self.image_token!r} exactly once"
            )
        before, _, after = text.partition(self.image_token)
        bos = [] if self.tokenizer.bos_token_id is None else [int(self.tokenizer.bos_token_id)]
        n_image = image_text.count(self.image_token)
        return bos + self._piece_ids(before) + [self._image_token_id] * n_image + self._piece_ids(after)

    def encode(self, text: str, image_text: str, *, offsets: bool = False) -> tuple[Any, str]:
        """Not available: the ``llava_v1`` format is tokenised piece by piece (use :meth:`input_ids`)."""
        raise ValueError(
            "the llava_v1 conversation (imported authors' checkpoints) is for inference; training "
            "uses the llava15 format"
        )


def conversation_format(
    processor: Any, *, device: torch.device, dtype: torch.dtype, prompt: PromptFormat | None = None
) -> ConversationFormat:
    """The :class:`ConversationFormat` (``llava15``) or :class:`LlavaV1Format` of ``prompt``."""
    prompt = prompt if prompt is not None else PromptFormat()
    cls = LlavaV1Format if prompt.conversation == LlavaV1Format.name else ConversationFormat
    return cls(processor, device=device, dtype=dtype, prompt=prompt)
