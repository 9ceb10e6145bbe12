"""The ``<SEG>`` query of an instruction: one teacher-forced pass, no generation (LISA#71).

The query is the last-layer hidden state at the position that *predicts* ``<SEG>`` in the
teacher-forced conversation. Positions are counted in the expanded sequence, where the
processor has replaced the image placeholder by one token per image feature.
"""

from __future__ import annotations

import numpy as np
import torch

from llmseg_ros.models.vlm.prefix import PrefixCache, VLMPrefix


class SegQuery:
    """Computes ``<SEG>`` queries through a :class:`PrefixCache`."""

    def __init__(self, cache: PrefixCache, seg_token_id: int) -> None:
        self.cache = cache
        self.seg_token_id = seg_token_id

    def __call__(
        self,
        image_or_prefix: np.ndarray | VLMPrefix,
        instruction: str,
        *,
        is_sentence: bool | None = None,
        history: list[tuple[str, str]] | None = None,
        answer: str | None = None,
    ) -> torch.Tensor:
        """(hidden_size,) float32 query; see :meth:`llmseg_ros.models.vlm.SegVLM.seg_hidden`."""
        fmt = self.cache.fmt
        seg_token = fmt.seg_token
        if answer is None:
            answer = fmt.prompt.answer
        if not isinstance(answer, str) or answer.count(seg_token) != 1:
            raise ValueError(f"answer must contain {seg_token} exactly once, got {answer!r}")
        text = fmt.build(instruction, is_sentence=is_sentence, answer=answer, history=history)
        inputs = self.cache.inputs(image_or_prefix, text)
        ids = inputs.ids
        seg_pos = len(ids) - 1 - ids[::-1].index(self.seg_token_id)  # the answer's <SEG> is the last one
        if seg_pos - 1 < inputs.start:
            raise RuntimeError(
                f"{seg_token} at position {seg_pos} lies inside the cached prefix ({inputs.start} tokens)"
            )
        # Tokens from <SEG> on cannot influence the state that predicts it (causal attention).
        hidden, _ = self.cache.run(inputs, ids[:seg_pos], use_cache=False)
        return hidden[0, seg_pos - 1 - inputs.start].float()
