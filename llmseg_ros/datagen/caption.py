"""Image descriptions for the annotator prompt (LLM-Seg paper, section 4.2.2).

Two sources share :class:`CaptionSource`: :class:`VLMCaptioner` asks a local
image-text-to-text chat model (LLaVA-1.5 in the paper) for a description of at most ten
sentences, one image per single-turn conversation; :class:`PrecomputedCaptions` reads a
JSON object ``{image file name: description}`` made elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from llmseg_ros.data.io import read_json
from llmseg_ros.datagen.config import CAPTION_PROMPT, CaptionConfig


class CaptionSource(Protocol):
    """Gives the description of one image, by file name (and path when there are images)."""

    def caption(self, file_name: str, image_path: Path | None) -> str: ...


def load_captions(path: str | Path) -> dict[str, str]:
    """Read ``{file name: description}`` from a JSON file; ``ValueError`` on anything else."""
    path = Path(path)
    data = read_json(path, "captions file")
    if not isinstance(data, dict):
        raise ValueError(
            f"captions file {path} must hold a JSON object of file name → text, got {type(data).__name__}"
        )
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"captions file {path}: entries {bad[:5]} are not non-empty strings")
    return {str(k): v.strip() for k, v in data.items()}


class PrecomputedCaptions:
    """Descriptions looked up by image file name."""

    def __init__(self, captions: Mapping[str, str]) -> None:
        self.captions = dict(captions)

    @classmethod
    def from_file(cls, path: str | Path) -> PrecomputedCaptions:
        return cls(load_captions(path))

    def missing(self, file_names: list[str]) -> list[str]:
        """The names among ``file_names`` that have no description."""
        return [name for name in file_names if name not in self.captions]

    def caption(self, file_name: str, image_path: Path | None = None) -> str:
        try:
            return self.captions[file_name]
        except KeyError:
            raise ValueError(f"no precomputed caption for image {file_name!r}") from None


class VLMCaptioner:
    """Describe images with a local VLM through transformers (one image per call, serialised).

    Args:
        model_path: hub id or directory holding the model and its processor.
        prompt: the user instruction sent with the image.
        max_new_tokens: generation budget.
        device, dtype: as in :func:`llmseg_ros.utils.device.resolve_device` / ``resolve_dtype``.

    The model is loaded as ``AutoModelForImageTextToText`` (``LlavaForConditionalGeneration``
    when the auto class does not know the config). Decoding is greedy. When the processor
    has no chat template, LLaVA-1.5's ``USER: <image>\\n… ASSISTANT:`` layout is used.
    """

    def __init__(
        self,
        model_path: str,
        *,
        prompt: str = CAPTION_PROMPT,
        max_new_tokens: int = 256,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

        from llmseg_ros.utils.device import resolve_device, resolve_dtype

        self._torch = torch
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(model_path)
        model: Any
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=self.dtype)
        except (ValueError, KeyError):
            model = LlavaForConditionalGeneration.from_pretrained(model_path, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: CaptionConfig) -> VLMCaptioner:
        if config.model is None:
            raise ValueError("CaptionConfig.model must name a VLM to caption with")
        return cls(
            config.model,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            device=config.device,
            dtype=config.dtype,
        )

    def _prompt_text(self) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}
            ]
            return str(self.processor.apply_chat_template(messages, add_generation_prompt=True))
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"USER: {image_token}\n{self.prompt} ASSISTANT:"

    def describe(self, image: Any) -> str:
        """Describe one image.

        Args:
            image: ``PIL.Image.Image`` or ``(H, W, 3)`` uint8 RGB array.

        Returns:
            The generated description, special tokens removed, whitespace stripped.
        """
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
        inputs = self.processor(
            images=[image.convert("RGB")], text=[self._prompt_text()], return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with self._lock, self._torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_ids = output[0, inputs["input_ids"].shape[1] :]  # (N,) generated ids only
        return str(self.processor.decode(new_ids, skip_special_tokens=True)).strip()

    def caption(self, file_name: str, image_path: Path | None) -> str:
        """Load ``image_path`` (any PIL-readable file) and describe it."""
        from PIL import Image

        if image_path is None:
            raise ValueError(f"captioning {file_name!r} with a VLM needs the image file; none was given")
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB")
        except OSError as exc:
            raise ValueError(f"cannot read image {image_path}: {exc}") from exc
        return self.describe(image)


def build_caption_source(config: CaptionConfig) -> PrecomputedCaptions | VLMCaptioner:
    """Precomputed captions when ``captions_path`` is set, else the VLM."""
    if config.captions_path is not None:
        return PrecomputedCaptions.from_file(config.captions_path)
    return VLMCaptioner.from_config(config)
