"""Forward passes of the ``<SEG>`` VLM, and the per-frame image-prefix cache.

The shared start of every conversation on a frame (everything up to and including the
image tokens) is run once (:meth:`PrefixCache.encode`) and its key/value cache reused,
so a new instruction on the same frame only runs its own few tokens.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmseg_ros.models.vlm.conversation import ConversationFormat, check_image


@dataclass
class VLMPrefix:
    """The instruction-independent start of every conversation on one frame.

    Attributes:
        past_key_values: the language model's key/value cache (a transformers ``Cache``)
            after the prefix; never mutated (each use works on a copy).
        prefix_length: number of tokens in the prefix (BOS, chat-format text, the
            expanded image tokens).
        input_ids: (prefix_length,) int64 on CPU, the prefix tokens.
        pixel_values: (1, 3, h, w) processed image on the model's device, model dtype.
        image_size: (H, W) of the original image in pixels.
        image_text: the expanded image placeholder (what the processor puts in place of
            the single image token in the text).
        extra_image_inputs: other tensors the image processor returned for the model
            (for example ``image_sizes``); empty for CLIP processors.
        owner_id: identity of the VLM that encoded it (a prefix is only valid there).
    """

    past_key_values: Any
    prefix_length: int
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    image_text: str
    extra_image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    owner_id: int = 0


class LlavaRunner:
    """Last-layer hidden states of a ``LlavaForConditionalGeneration`` over token ids."""

    def __init__(self, llava: Any, device: torch.device) -> None:
        self.llava = llava
        self.device = device
        # transformers 5.x renamed the key/value cache argument and output field
        # `past_key_values` to `cache`; use whichever this model's forward takes.
        forward_params = inspect.signature(llava.model.forward).parameters
        self.cache_name = "cache" if "cache" in forward_params else "past_key_values"

    @property
    def lm_head(self) -> Any:
        return self.llava.get_output_embeddings()

    def hidden(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        extra_image_inputs: dict[str, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Last-layer hidden states (B, S, hidden) in model dtype, and the cache."""
        kwargs: dict[str, Any] = dict(extra_image_inputs or {})
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        kwargs[self.cache_name] = past_key_values
        out = self.llava.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs
        )
        return out.last_hidden_state, getattr(out, self.cache_name)


@dataclass
class PromptInputs:
    """A conversation ready to run: its token ids and either a prefix or the image inputs."""

    ids: list[int]
    prefix: VLMPrefix | None
    pixel_values: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def start(self) -> int:
        """Tokens already in the cache (the prefix length, or 0 for an uncached pass)."""
        return self.prefix.prefix_length if self.prefix is not None else 0


class PrefixCache:
    """Encodes frame prefixes and runs conversations from them (or uncached from the image).

    Args:
        fmt: the conversation format.
        runner: the model's forward passes.
        owner_id: identity stamped on every prefix; prefixes of other owners are refused.
    """

    def __init__(self, fmt: ConversationFormat, runner: LlavaRunner, owner_id: int) -> None:
        self.fmt = fmt
        self.runner = runner
        self.owner_id = owner_id
        self.image_token_id = int(runner.llava.config.image_token_id)

    def encode(self, image: np.ndarray) -> VLMPrefix:
        """Run the conversation start up to the end of the image tokens; (H, W, 3) uint8 RGB in."""
        image = check_image(image)
        pixel_values, extra, image_text = self.fmt.image_inputs(image)
        # Two probe conversations: the prefix is what they share, and must hold the image.
        ids, other = (self.fmt.input_ids(self.fmt.render([], probe, None), image_text) for probe in "ab")
        image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if not image_positions:
            raise RuntimeError(f"the processed conversation holds no image token (id {self.image_token_id})")
        length = image_positions[-1] + 1
        shared = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
        if shared < length:
            raise RuntimeError(
                "the chat template puts instruction text before the image, so no instruction-independent "
                "prefix holds the image; call seg_hidden / generate with the image instead of a prefix"
            )
        input_ids = torch.tensor([ids[:length]], dtype=torch.long, device=self.runner.device)
        _, cache = self.runner.hidden(
            input_ids, pixel_values=pixel_values, extra_image_inputs=extra, use_cache=True
        )
        return VLMPrefix(
            past_key_values=cache,
            prefix_length=length,
            input_ids=torch.tensor(ids[:length], dtype=torch.long),
            pixel_values=pixel_values,
            image_size=(int(image.shape[0]), int(image.shape[1])),
            image_text=image_text,
            extra_image_inputs=extra,
            owner_id=self.owner_id,
        )

    def inputs(self, image_or_prefix: np.ndarray | VLMPrefix, text: str) -> PromptInputs:
        """Ids of the full ``text``, with the prefix checked, or the image inputs for an uncached pass."""
        if isinstance(image_or_prefix, VLMPrefix):
            prefix = image_or_prefix
            if prefix.owner_id != self.owner_id:
                raise ValueError(
                    "this VLMPrefix was encoded by another SegVLM; call encode_prefix on this one"
                )
            ids = self.fmt.input_ids(text, prefix.image_text)
            if ids[: prefix.prefix_length] != prefix.input_ids.tolist():
                raise RuntimeError(
                    "the conversation does not start with the cached prefix tokens; the chat template puts "
                    "instruction-dependent text before the image, so the prefix cache cannot be used"
                )
            return PromptInputs(ids, prefix)
        pixel_values, extra, image_text = self.fmt.image_inputs(check_image(image_or_prefix))
        return PromptInputs(self.fmt.input_ids(text, image_text), None, pixel_values, extra)

    def run(self, inputs: PromptInputs, ids: list[int], *, use_cache: bool) -> tuple[torch.Tensor, Any]:
        """Run ``ids`` (a prefix of ``inputs.ids``; its cached part from the prefix's cache).

        Returns:
            hidden states (1, len(ids) - inputs.start, hidden) of the tokens run, and the cache.
        """
        prefix = inputs.prefix
        if prefix is not None:
            cache = copy.deepcopy(prefix.past_key_values)
            suffix = torch.tensor([ids[prefix.prefix_length :]], dtype=torch.long, device=self.runner.device)
            return self.runner.hidden(suffix, past_key_values=cache, use_cache=True)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.runner.device)
        return self.runner.hidden(
            input_ids, pixel_values=inputs.pixel_values, extra_image_inputs=inputs.extra, use_cache=use_cache
        )
