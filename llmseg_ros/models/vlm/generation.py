"""Greedy text answers of the ``<SEG>`` VLM ("It is <SEG>. Because …") and their ``<SEG>`` query."""

from __future__ import annotations

import numpy as np
import torch

from llmseg_ros.models.vlm.prefix import PrefixCache, VLMPrefix


class GreedyGenerator:
    """Greedy decoding through a :class:`PrefixCache`, stopping at any of ``eos_ids``.

    ``suppressed_ids`` are never generated (the image placeholder: its embedding row is
    never trained, the image features take its place).
    """

    def __init__(
        self, cache: PrefixCache, seg_token_id: int, eos_ids: set[int], suppressed_ids: set[int] | None = None
    ) -> None:
        self.cache = cache
        self.seg_token_id = seg_token_id
        self.eos_ids = eos_ids
        self.suppressed_ids = sorted(suppressed_ids or ())

    def __call__(
        self,
        image_or_prefix: np.ndarray | VLMPrefix,
        instruction: str,
        *,
        max_new_tokens: int = 64,
        history: list[tuple[str, str]] | None = None,
        is_sentence: bool | None = None,
    ) -> tuple[str, torch.Tensor | None]:
        """Text and ``<SEG>`` query; see :meth:`llmseg_ros.models.vlm.SegVLM.generate`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        fmt, runner = self.cache.fmt, self.cache.runner
        text = fmt.build(instruction, is_sentence=is_sentence, answer=None, history=history)
        inputs = self.cache.inputs(image_or_prefix, text)
        hidden, cache = self.cache.run(inputs, inputs.ids, use_cache=True)
        last = hidden[:, -1]  # (1, h)
        generated: list[int] = []
        seg_state: torch.Tensor | None = None
        for step in range(max_new_tokens):
            logits = runner.lm_head(last)  # (1, vocab)
            if self.suppressed_ids:
                logits[:, self.suppressed_ids] = float("-inf")
            next_id = int(logits.argmax(-1)[0])
            if next_id in self.eos_ids:
                break
            if next_id == self.seg_token_id and seg_state is None:
                seg_state = last[0].float()
            generated.append(next_id)
            if step + 1 < max_new_tokens:
                step_ids = torch.tensor([[next_id]], dtype=torch.long, device=runner.device)
                hidden, cache = runner.hidden(step_ids, past_key_values=cache, use_cache=True)
                last = hidden[:, -1]
        answer = fmt.tokenizer.decode(
            generated, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return answer.strip(), seg_state
