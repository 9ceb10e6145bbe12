"""A generic chat VLM back-end (image + text in, text out) through ``transformers``.

Used by the training-free methods (``vlm_grounding``, ``vlm_marks``). Any
``AutoModelForImageTextToText`` chat model works (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen3-VL,
InternVL, Gemma 3 ...); Qwen2.5-VL is loaded as ``Qwen2_5_VLForConditionalGeneration``.
Each model uses its own processor (image processor + tokenizer) and its own chat
template. Decoding is greedy (deterministic).

Coordinate conventions (what numbers a model writes for a box or a point; mapping back in
:mod:`llmseg_ros.models.coords`), decided per model family from ``config.model_type``:

* ``qwen2_5_vl`` → ``absolute_resized``: absolute pixels of the input after the
  processor's ``smart_resize`` (multiples of ``patch_size * merge_size`` within
  ``[min_pixels, max_pixels]``), as Qwen2.5-VL was trained.
* ``llava`` (LLaVA-1.5) → ``relative_0_1``: fractions of the image padded to a square,
  as in LLaVA-1.5's grounding data. The image is padded to a square with the
  processor's mean colour (LLaVA-1.5's ``expand2square``) before the processor sees it,
  so nothing is cropped and ``ChatOutput.content_box`` says where the image lies.
* ``llava_next``, ``llava_onevision`` → ``relative_0_1`` over the whole image.
* everything else (Qwen2-VL, Qwen3-VL, InternVL, ...) → ``normalized_1000`` over the
  whole image, the convention of most recent open VLMs. Override with
  ``ChatVLM.load(..., coordinate_convention=...)`` when a model differs.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmseg_ros.models.coords import CONVENTIONS
from llmseg_ros.utils.imageio import check_rgb_image
from llmseg_ros.weights.directory import WeightsNotFoundError

QUANTIZATION_MODES = ("8bit", "4bit")

# model_type → coordinate convention (see the module docstring).
FAMILY_CONVENTIONS: dict[str, str] = {
    "qwen2_5_vl": "absolute_resized",
    "qwen2_vl": "normalized_1000",
    "qwen3_vl": "normalized_1000",
    "qwen3_vl_moe": "normalized_1000",
    "internvl": "normalized_1000",
    "llava": "relative_0_1",
    "llava_next": "relative_0_1",
    "llava_onevision": "relative_0_1",
}
DEFAULT_CONVENTION = "normalized_1000"
# Families whose images are padded to a square before preprocessing (LLaVA-1.5).
PAD_TO_SQUARE = frozenset({"llava"})


@dataclass(frozen=True)
class ChatOutput:
    """One generated answer.

    Attributes:
        text: the decoded answer (special tokens removed, stripped).
        input_size: (H, W) of the image as the model saw it, after its processor's
            resize (and padding / crop).
        image_size: (H, W) of the original image.
        content_box: XYXY in ``input_size`` pixels where the original image lies inside
            the model's input; ``None`` = the whole input (a plain resize).
    """

    text: str
    input_size: tuple[int, int]
    image_size: tuple[int, int]
    content_box: tuple[float, float, float, float] | None = None


def _looks_like_local_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") != 1


def _not_found(model: str, reason: str) -> WeightsNotFoundError:
    if _looks_like_local_path(model):
        return WeightsNotFoundError(
            f"chat VLM {model!r}: {reason}. Expected a directory holding a transformers image-text-to-text "
            "checkpoint (config.json, weights, processor and tokenizer files), e.g. one written by "
            "`llmseg fetch-weights --vlm Qwen/Qwen2.5-VL-7B-Instruct`, or a hub id like 'owner/name'."
        )
    return WeightsNotFoundError(
        f"chat VLM {model!r}: {reason}. It is not in the local Hugging Face cache and could not be "
        f"downloaded (offline?). On a connected machine run `llmseg fetch-weights --vlm {model}` (or "
        f"`hf download {model}`) and pass the downloaded directory, or unset HF_HUB_OFFLINE."
    )


def _pad_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """LLaVA-1.5's ``expand2square``: centre the image on a square of ``fill``; returns (x, y) offset."""
    h, w = image.shape[:2]
    side = max(h, w)
    if h == w:
        return image, (0, 0)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    ox, oy = (side - w) // 2, (side - h) // 2
    out[oy : oy + h, ox : ox + w] = image
    return out, (ox, oy)


class ChatVLM:
    """A loaded chat VLM; build it with :meth:`load`.

    Attributes:
        model: the transformers model (eval mode, frozen).
        processor: its processor (image processor, tokenizer, chat template).
        family: ``config.model_type`` of the checkpoint.
        device: where inputs are placed.
        dtype: floating dtype of the image inputs.
        name: the path or hub id it was loaded from.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        family: str,
        device: torch.device,
        dtype: torch.dtype,
        coordinate_convention: str | None = None,
        name: str = "",
    ) -> None:
        convention = coordinate_convention or FAMILY_CONVENTIONS.get(family, DEFAULT_CONVENTION)
        if convention not in CONVENTIONS:
            raise ValueError(f"coordinate_convention must be one of {list(CONVENTIONS)}, got {convention!r}")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(
                f"chat VLM {name or family!r} has no chat template; expected a chat (instruction-tuned) "
                "checkpoint whose processor ships one"
            )
        self.model = model
        self.processor = processor
        self.family = family
        self.device = device
        self.dtype = dtype
        self.name = name
        self._convention = convention
        self._lock = threading.Lock()

    # -- loading ----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        quantization: str | None = None,
        coordinate_convention: str | None = None,
    ) -> ChatVLM:
        """Load a chat VLM once (local directory or hub id).

        Args:
            model: a local checkpoint directory or a hub id (``owner/name``).
            device: target device.
            dtype: weight / activation dtype (float16 / bfloat16 on GPU, float32 on CPU).
            quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA only).
            coordinate_convention: override of the family's convention (see the module
                docstring).
        Raises:
            WeightsNotFoundError: the directory does not exist, or the hub id is neither
                cached nor downloadable; the message says how to get it.
            ValueError: unknown quantization, quantization off CUDA, a model type that is
                not an image-text-to-text model, or a checkpoint without a chat template.
            ImportError: quantization requested but bitsandbytes is not installed.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a non-empty path or hub id, got {model!r}")
        if quantization is not None and quantization not in QUANTIZATION_MODES:
            raise ValueError(
                f"quantization must be None or one of {list(QUANTIZATION_MODES)}, got {quantization!r}"
            )
        if quantization is not None and device.type != "cuda":
            raise ValueError(f"{quantization} quantization needs a CUDA device (bitsandbytes), got {device}")
        source = model
        local = Path(model).expanduser()
        if local.exists():
            source = str(local)
            if not (local / "config.json").is_file():
                raise _not_found(model, f"{local} has no config.json")
        elif _looks_like_local_path(model):
            raise _not_found(model, "no such directory")
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError as exc:
            raise _not_found(model, f"cannot read its config ({exc.__class__.__name__})") from exc
        family = str(config.model_type)

        kwargs: dict[str, Any] = {"dtype": dtype}
        if quantization is not None:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError(
                    f"{quantization} quantization needs bitsandbytes: `pip install bitsandbytes`"
                )
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_8bit=True)
                if quantization == "8bit"
                else BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
                )
            )
            kwargs["device_map"] = {"": device.index if device.index is not None else 0}
        net: Any
        try:
            if family == "qwen2_5_vl":
                from transformers import Qwen2_5_VLForConditionalGeneration

                net = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, **kwargs)
            else:
                try:
                    net = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
                except ValueError as exc:
                    raise ValueError(
                        f"chat VLM {model!r} has model type {family!r}, which transformers does not load as "
                        "an image-text-to-text model; expected e.g. qwen2_5_vl, qwen2_vl, llava, llava_next"
                    ) from exc
            processor = AutoProcessor.from_pretrained(source)
        except OSError as exc:
            raise _not_found(model, f"cannot read its weights or processor ({exc})") from exc
        if quantization is None:
            net = net.to(device)
        net.eval()
        net.requires_grad_(False)
        return cls(
            net,
            processor,
            family=family,
            device=device,
            dtype=dtype,
            coordinate_convention=coordinate_convention,
            name=model,
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def coordinate_convention(self) -> str:
        """How the model writes coordinates (one of ``coords.CONVENTIONS``; module docstring)."""
        return self._convention

    @property
    def pads_to_square(self) -> bool:
        """Whether images are padded to a square before the processor (LLaVA-1.5)."""
        return self.family in PAD_TO_SQUARE

    # -- generation -----------------------------------------------------------------------
    def _messages(self, prompt: str, history: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Chat turns with the image in the first user turn."""
        messages: list[dict[str, Any]] = []
        turns = [*history, (prompt, None)]
        for i, (user, assistant) in enumerate(turns):
            content: list[dict[str, Any]] = [{"type": "image"}] if i == 0 else []
            content.append({"type": "text", "text": user})
            messages.append({"role": "user", "content": content})
            if assistant is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
        return messages

    def _model_image(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
        if not self.pads_to_square:
            return image, None
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        fill = tuple(round(float(m) * 255) for m in mean)
        padded, offset = _pad_to_square(image, (fill[0], fill[1], fill[2]))
        return padded, offset

    def _input_size(self, inputs: Any, fallback: tuple[int, int]) -> tuple[int, int]:
        grid = inputs.get("image_grid_thw")
        if grid is not None:  # Qwen2-VL family: grid of patch_size pixels
            patch = int(getattr(self.processor.image_processor, "patch_size", 14))
            return int(grid[0][1]) * patch, int(grid[0][2]) * patch
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.ndim >= 4:
            return int(pixels.shape[-2]), int(pixels.shape[-1])
        return fallback

    def generate(
        self,
        image: np.ndarray,
        prompt: str,
        *,
        max_new_tokens: int = 256,
        history: list[tuple[str, str]] | None = None,
    ) -> ChatOutput:
        """Greedy answer to ``prompt`` about ``image``.

        Args:
            image: (H, W, 3) uint8 RGB.
            prompt: the user turn.
            max_new_tokens: generation budget.
            history: earlier (user, assistant) turns, oldest first; the image goes with the
                first user turn.
        Returns:
            ChatOutput with the text and the geometry of the model's input.
        """
        check_rgb_image(image)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        turns = list(history or [])
        for turn in turns:
            if not (isinstance(turn, tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise TypeError(f"history must be a list of (user, assistant) string pairs, got {turn!r}")
        from PIL import Image

        h, w = int(image.shape[0]), int(image.shape[1])
        model_image, offset = self._model_image(image)
        text = self.processor.apply_chat_template(
            self._messages(prompt, turns), tokenize=False, add_generation_prompt=True
        )
        inputs = self.processor(images=[Image.fromarray(model_image)], text=[text], return_tensors="pt")
        inputs = {
            k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in inputs.items()
        }
        input_size = self._input_size(inputs, (h, w))
        content_box = None
        if offset is not None:
            side = max(h, w)
            sx, sy = input_size[1] / side, input_size[0] / side
            content_box = (offset[0] * sx, offset[1] * sy, (offset[0] + w) * sx, (offset[1] + h) * sy)
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        return ChatOutput(text=answer, input_size=input_size, image_size=(h, w), content_box=content_box)
