"""Conversation text and tokenisation for the ``<SEG>`` VLM.

:class:`ConversationFormat` turns instructions, earlier turns and a teacher-forced answer
into the model's chat text (the processor's chat template when it has one, else the
LLaVA-1.5 format ``"USER: <image>\\n{question} ASSISTANT: {answer}"``), processes the
image, and tokenises the text with the image placeholder expanded to one token per image
feature, as the processor does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmseg_ros.models.prompts import DEFAULT_ANSWER, SEG_TOKEN, format_instruction

FALLBACK_USER = "USER:"
FALLBACK_ASSISTANT = "ASSISTANT:"


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
    """The chat format and tokenisation of one LLaVA processor.

    Args:
        processor: the checkpoint's processor (image processor + tokenizer).
        device, dtype: where processed pixels go, and their dtype.
    """

    def __init__(self, processor: Any, *, device: torch.device, dtype: torch.dtype) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token: str = processor.image_token
        self.device = device
        self.dtype = dtype
        self._bos_token: str | None = self.tokenizer.bos_token

    def render(self, turns: list[tuple[str, str]], user_text: str, answer: str | None) -> str:
        """Chat text for finished ``turns`` + the ``user_text`` turn, the image in the first turn."""
        texts = [q for q, _ in turns] + [user_text]
        if any(self.image_token in t for t in texts) or any(self.image_token in a for _, a in turns):
            raise ValueError(
                f"instructions and answers must not contain the image token {self.image_token!r}"
            )
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
        answer: str | None = DEFAULT_ANSWER,
        history: list[tuple[str, str]] | None = None,
    ) -> str:
        """The full conversation text, with the (unexpanded) image placeholder.

        Args:
            instruction: the user's instruction; put into the sentence or phrase template
                (:func:`llmseg_ros.models.prompts.format_instruction`).
            is_sentence: template choice; ``None`` → :func:`llmseg_ros.models.prompts.is_sentence`.
            answer: teacher-forced assistant answer appended after the generation prompt;
                ``None`` ends the text at the generation prompt (for generation).
            history: earlier (instruction, answer) turns, oldest first; their
                instructions get the same templates. The image goes in the first turn.
        """
        user_text = format_instruction(instruction, is_sentence)
        if SEG_TOKEN in user_text:
            raise ValueError(f"instruction must not contain {SEG_TOKEN}, got {instruction!r}")
        turns = [(format_instruction(q), a) for q, a in check_history(history)]
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
