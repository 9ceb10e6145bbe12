"""Local text LLM (transformers causal LM) behind the :class:`~llmseg_ros.datagen.llm.ChatClient` interface."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from llmseg_ros.datagen.config import LLMConfig
from llmseg_ros.datagen.llm import ChatResult, Messages


class TransformersChatClient:
    """A local causal LM behind the :class:`ChatClient` interface (one generation at a time).

    Args:
        model_path: hub id or directory of an ``AutoModelForCausalLM`` and its tokenizer.
        max_new_tokens: generation budget.
        temperature: ``None`` or 0 → greedy decoding; otherwise sampling at this temperature.
        device, dtype: as in :func:`llmseg_ros.utils.device.resolve_device` / ``resolve_dtype``.

    Token usage is counted from the tokenised prompt and the generated ids. Without a chat
    template the messages are joined as ``role: content`` lines ending in ``assistant:``.
    """

    def __init__(
        self,
        model_path: str,
        *,
        max_new_tokens: int = 1024,
        temperature: float | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmseg_ros.utils.device import resolve_device, resolve_dtype

        self._torch = torch
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype, self.device))
        self.model = model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: LLMConfig) -> TransformersChatClient:
        if config.local_model is None:
            raise ValueError("LLMConfig.local_model must name a model for the local backend")
        return cls(
            config.local_model,
            max_new_tokens=config.max_tokens,
            temperature=config.temperature,
            device=config.device,
            dtype=config.dtype,
        )

    def _prompt_ids(self, messages: Messages) -> Any:
        chat = [dict(m) for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding
                ids = ids["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
            ids = self.tokenizer(text)["input_ids"]
        return self._torch.tensor([list(ids)], dtype=self._torch.long, device=self.device)

    def complete(self, messages: Messages) -> ChatResult:
        """Generate one reply; ``prompt_tokens`` = prompt length, ``completion_tokens`` = new ids."""
        if not messages:
            raise ValueError("messages must hold at least one {'role', 'content'} mapping")
        input_ids = self._prompt_ids(messages)  # (1, T) long
        sample = self.temperature is not None and self.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sample}
        if sample:
            kwargs["temperature"] = self.temperature
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        with self._lock, self._torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=self._torch.ones_like(input_ids),
                pad_token_id=pad_id,
                **kwargs,
            )
        new_ids = output[0, input_ids.shape[1] :]  # (N,) generated ids only
        text = str(self.tokenizer.decode(new_ids, skip_special_tokens=True))
        return ChatResult(text.strip(), int(input_ids.shape[1]), int(new_ids.shape[0]), 1)
