"""The LLaVA-style VLM that answers with a ``<SEG>`` token (LLM-Seg / LISA).

:class:`SegVLM` wraps a transformers ``LlavaForConditionalGeneration`` and its processor
and writes only the ``<SEG>`` glue:

* ``<SEG>`` is added to the tokenizer as a special token (its id is read back from the
  added token, never from a re-tokenisation that Llama tokenizers may split, LISA#55) and
  the embeddings grow when the vocabulary needs a new row;
* the query of a request is the last-layer hidden state at the position that *predicts*
  ``<SEG>`` in one teacher-forced pass over ``"<prompt> ASSISTANT: It is <SEG>."`` — no
  generation (LISA#71). Positions are counted in the expanded sequence, where the
  processor has replaced the image placeholder by one token per image feature;
* the shared prefix of every request on a frame (everything up to and including the image
  tokens) is run once (:meth:`SegVLM.encode_prefix`) and its key/value cache reused, so a
  new instruction on the same frame only runs its own few tokens;
* training: LoRA (peft) on the language model's attention projections, with the
  token embeddings and the LM head fully trainable; :meth:`SegVLM.training_forward`
  returns the answer-token LM loss and the ``<SEG>`` hidden states.

Conversations follow the processor's chat template when it has one, else the LLaVA-1.5
format ``"USER: <image>\\n{question} ASSISTANT: {answer}"``.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmseg_ros.config import LoraSettings
from llmseg_ros.models.prompts import DEFAULT_ANSWER, SEG_TOKEN, format_instruction
from llmseg_ros.utils.atomic import atomic_directory
from llmseg_ros.utils.hub import download_command

DEFAULT_VLM = "llava-hf/llava-1.5-7b-hf"
ADAPTER_META_NAME = "segvlm.json"
QUANTIZATION_MODES = ("8bit", "4bit")
# Modules kept in full precision when the language model is quantised.
UNQUANTIZED_MODULES = ["vision_tower", "multi_modal_projector", "lm_head"]
FALLBACK_USER = "USER:"
FALLBACK_ASSISTANT = "ASSISTANT:"
IGNORE_INDEX = -100


@dataclass
class VLMPrefix:
    """The instruction-independent start of every conversation on one frame.

    Attributes:
        past_key_values: the language model's key/value cache (a transformers ``Cache``)
            after the prefix; never mutated by :class:`SegVLM` (each use works on a copy).
        prefix_length: number of tokens in the prefix (BOS, chat-format text, the
            expanded image tokens).
        input_ids: (prefix_length,) int64 on CPU, the prefix tokens.
        pixel_values: (1, 3, h, w) processed image on the model's device, model dtype.
        image_size: (H, W) of the original image in pixels.
        image_text: the expanded image placeholder (what the processor puts in place of
            the single image token in the text).
        extra_image_inputs: other tensors the image processor returned for the model
            (for example ``image_sizes``); empty for CLIP processors.
    """

    past_key_values: Any
    prefix_length: int
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    image_text: str
    extra_image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    owner_id: int = 0


def _looks_like_path(value: str) -> bool:
    """Hub ids are ``owner/name``; anything absolute, dotted, home-relative or deeper is a path."""
    return value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") != 1


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    return image


def _check_history(history: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
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


def _quantization_config(quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A ``BitsAndBytesConfig`` for the language model (vision tower, projector, LM head kept)."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantization must be None or one of {list(QUANTIZATION_MODES)}, got {quantization!r}"
        )
    if device.type != "cuda":
        raise ValueError(
            f"quantization={quantization!r} needs a CUDA device (bitsandbytes), got device {str(device)!r}; "
            "use quantization=None on CPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=UNQUANTIZED_MODULES,
    )


def _language_lora_pattern(target_modules: tuple[str, ...]) -> str:
    """peft ``target_modules`` regex: the named projections inside the language model only."""
    names = "|".join(sorted(set(target_modules)))
    return rf"(?:.*\.)?language_model\.(?:.*\.)?(?:{names})"


class SegVLM:
    """LLaVA + ``<SEG>``: hidden-state queries, text answers and training passes.

    Build it with :meth:`load`. Attributes:
        model: the ``LlavaForConditionalGeneration`` (a peft ``PeftModel`` around it when
            an adapter is loaded or training).
        processor: the checkpoint's processor (image processor + tokenizer).
        tokenizer: ``processor.tokenizer`` (holding ``<SEG>``).
        seg_token_id: id of the added ``<SEG>`` token.
        hidden_size: width of the language model's hidden states.
        device, dtype: where the model runs and its compute dtype.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        seg_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        source: str,
    ) -> None:
        self.model: Any = model
        self.processor: Any = processor
        self.tokenizer = processor.tokenizer
        self.seg_token_id = int(seg_token_id)
        self.device = device
        self.dtype = dtype
        self.source = source
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._llava: Any = base
        # transformers 5.x renamed the key/value cache argument and output field
        # `past_key_values` to `cache`; use whichever this model's forward takes.
        forward_params = inspect.signature(base.model.forward).parameters
        self._cache_name = "cache" if "cache" in forward_params else "past_key_values"
        config = base.config
        self.hidden_size = int(config.text_config.hidden_size)
        self.image_token_id = int(config.image_token_id)
        self.image_token: str = processor.image_token
        self._bos_token: str | None = self.tokenizer.bos_token
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, (list, tuple)):
            eos.update(int(e) for e in gen_eos)
        self._eos_ids = {int(e) for e in eos if e is not None}

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path = DEFAULT_VLM,
        *,
        device: torch.device,
        dtype: torch.dtype,
        adapter_dir: str | Path | None = None,
        lora: LoraSettings | None = None,
        trainable: bool = False,
        quantization: str | None = None,
    ) -> SegVLM:
        """Load a LLaVA checkpoint (local directory or hub id) and prepare ``<SEG>``.

        Args:
            model: directory written by ``save_pretrained`` or a hub id such as
                ``llava-hf/llava-1.5-7b-hf`` (resolved through the local hub cache when
                offline).
            device: where to run.
            dtype: compute dtype (float32 / float16 / bfloat16).
            adapter_dir: a directory written by :meth:`save_adapter`; applied on load.
            lora: LoRA settings for a fresh adapter when ``trainable`` and no
                ``adapter_dir`` (default :class:`LoraSettings`).
            trainable: prepare for training: a fresh LoRA (or the loaded adapter made
                trainable) with the embeddings and LM head fully trainable, train mode.
                Otherwise every weight is frozen and the model is in eval mode.
            quantization: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA only);
                the vision tower, projector and LM head stay unquantised.

        Raises:
            FileNotFoundError: the model or adapter could not be found (the message says
                what was looked for and how to get it).
            ValueError: bad option (quantization on CPU, not a LLaVA checkpoint, adapter
                made for another base vocabulary).
        """
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        device = torch.device(device)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if lora is not None and not isinstance(lora, LoraSettings):
            raise TypeError(f"lora must be a LoraSettings, got {type(lora).__name__}")
        quant_config = None if quantization is None else _quantization_config(quantization, device, dtype)
        adapter_path = None if adapter_dir is None else Path(adapter_dir).expanduser()
        if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"VLM adapter directory {adapter_path} has no adapter_config.json; expected a directory "
                "written by SegVLM.save_adapter (part of the trained weights, see training/train.py)"
            )

        source = str(model)
        local = Path(source).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise FileNotFoundError(
                    f"VLM directory {local} has no config.json; expected a LlavaForConditionalGeneration "
                    "checkpoint written by save_pretrained (model, tokenizer and processor files)"
                )
            source = str(local)
        elif _looks_like_path(source):
            raise FileNotFoundError(
                f"VLM directory {source} does not exist; pass a LlavaForConditionalGeneration checkpoint "
                f"directory or a hub id such as {DEFAULT_VLM!r} (download it with `llmseg fetch-weights` "
                f"or `{download_command(DEFAULT_VLM)}`)"
            )
        try:
            config = AutoConfig.from_pretrained(source)
            processor = AutoProcessor.from_pretrained(source)
        except OSError as exc:
            raise FileNotFoundError(
                f"could not load the VLM {source!r} from the Hugging Face hub or its local cache "
                f"(offline mode: {os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}. Download it on a connected "
                f"machine with `llmseg fetch-weights` or `{download_command(source)}`, or pass a "
                "local checkpoint directory"
            ) from exc
        architectures = getattr(config, "architectures", None) or []
        if config.model_type != "llava" and "LlavaForConditionalGeneration" not in architectures:
            raise ValueError(
                f"VLM {source!r} is a {config.model_type!r} model ({architectures}); expected a "
                "LlavaForConditionalGeneration checkpoint"
            )
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ValueError(
                f"VLM {source!r} has no image processor + tokenizer processor ({type(processor)})"
            )

        kwargs: dict[str, Any] = {"dtype": dtype}
        if quant_config is not None:
            kwargs.update(quantization_config=quant_config, device_map={"": str(device)})
        llava: Any = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        if quant_config is None:
            llava.to(device)
        seg_token_id = cls._add_seg_token(llava, processor.tokenizer)

        net: Any = llava
        if adapter_path is not None:
            net = cls._apply_adapter(llava, adapter_path, seg_token_id, trainable)
        elif trainable:
            net = cls._fresh_lora(llava, lora or LoraSettings())
        else:
            for param in llava.parameters():
                param.requires_grad_(False)
        net.train(trainable)
        return cls(net, processor, seg_token_id=seg_token_id, device=device, dtype=dtype, source=source)

    @staticmethod
    def _add_seg_token(llava: Any, tokenizer: Any) -> int:
        """Add ``<SEG>`` (if absent) as one special token; grow / initialise its embedding rows."""
        vocab_before = len(tokenizer)
        if SEG_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([SEG_TOKEN], special_tokens=True)
        seg_id = int(tokenizer.convert_tokens_to_ids(SEG_TOKEN))
        encoded = tokenizer.encode(SEG_TOKEN, add_special_tokens=False)
        if encoded != [seg_id]:
            raise RuntimeError(f"{SEG_TOKEN} must tokenize to the single id {seg_id}, got {encoded}")
        added = len(tokenizer) > vocab_before
        rows = llava.get_input_embeddings().weight.shape[0]
        if seg_id >= rows:
            llava.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if added:
            # Deterministic start: the new row is the mean of the tokenizer's existing rows.
            with torch.no_grad():
                for emb in (llava.get_input_embeddings().weight, llava.get_output_embeddings().weight):
                    emb[seg_id] = emb[:vocab_before].float().mean(0).to(emb.dtype)
        return seg_id

    @staticmethod
    def _fresh_lora(llava: Any, lora: LoraSettings) -> Any:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_language_lora_pattern(lora.target_modules),
            modules_to_save=["embed_tokens", "lm_head"],
            bias="none",
        )
        return get_peft_model(llava, config)

    @staticmethod
    def _apply_adapter(llava: Any, adapter_dir: Path, seg_token_id: int, trainable: bool) -> Any:
        from peft import PeftModel

        meta_path = adapter_dir / ADAPTER_META_NAME
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            rows = int(llava.get_input_embeddings().weight.shape[0])
            if meta.get("seg_token_id") != seg_token_id or meta.get("vocab_rows") != rows:
                raise ValueError(
                    f"adapter {adapter_dir} was saved for a base VLM with <SEG> id {meta.get('seg_token_id')} "
                    f"and {meta.get('vocab_rows')} embedding rows ({meta.get('base_model')!r}); this base has "
                    f"<SEG> id {seg_token_id} and {rows} rows"
                )
        return PeftModel.from_pretrained(llava, str(adapter_dir), is_trainable=trainable)

    def save_adapter(self, directory: str | Path) -> None:
        """Write the peft adapter (LoRA + embeddings + LM head) and its metadata atomically.

        The directory is written under a temporary sibling name and renamed into place
        (replacing an existing one). :meth:`load` with ``adapter_dir=directory`` restores
        the exact weights.
        """
        if not hasattr(self.model, "peft_config"):
            raise RuntimeError("no adapter to save: load the VLM with trainable=True or an adapter_dir")
        with atomic_directory(directory) as tmp:
            self.model.save_pretrained(str(tmp), save_embedding_layers=False)
            meta = {
                "seg_token": SEG_TOKEN,
                "seg_token_id": self.seg_token_id,
                "vocab_rows": int(self._llava.get_input_embeddings().weight.shape[0]),
                "hidden_size": self.hidden_size,
                "base_model": self.source,
            }
            (tmp / ADAPTER_META_NAME).write_text(
                json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )

    # -- conversation text -------------------------------------------------------------
    def _render(self, turns: list[tuple[str, str]], user_text: str, answer: str | None) -> str:
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

    def build_conversation(
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
                ``None`` ends the text at the generation prompt (for :meth:`generate`).
            history: earlier (instruction, answer) turns, oldest first; their
                instructions get the same templates. The image goes in the first turn.
        """
        user_text = format_instruction(instruction, is_sentence)
        if SEG_TOKEN in user_text:
            raise ValueError(f"instruction must not contain {SEG_TOKEN}, got {instruction!r}")
        turns = [(format_instruction(q), a) for q, a in _check_history(history)]
        return self._render(turns, user_text, answer)

    # -- tokenisation --------------------------------------------------------------------
    def _image_inputs(self, image: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
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

    def _encode(self, text: str, image_text: str, *, offsets: bool = False) -> tuple[Any, str]:
        """Token ids of ``text`` with the image placeholder expanded, as the processor does."""
        expanded = text.replace(self.image_token, image_text, 1)
        add_special = not (self._bos_token and expanded.startswith(self._bos_token))
        return self.tokenizer(
            expanded, add_special_tokens=add_special, return_offsets_mapping=offsets
        ), expanded

    def expanded_input_ids(self, text: str, image: np.ndarray) -> list[int]:
        """Token ids of a conversation text for ``image`` (the image placeholder expanded)."""
        _, _, image_text = self._image_inputs(_check_image(image))
        encoding, _ = self._encode(text, image_text)
        return list(encoding["input_ids"])

    # -- forward helpers -----------------------------------------------------------------
    def _hidden(
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
        kwargs[self._cache_name] = past_key_values
        out = self._llava.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs
        )
        return out.last_hidden_state, getattr(out, self._cache_name)

    def _prompt_ids(
        self, prefix: VLMPrefix | None, image: np.ndarray | None, text: str
    ) -> tuple[list[int], VLMPrefix | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Ids of the full text, with the prefix checked, or the image inputs for an uncached pass."""
        if prefix is not None:
            if prefix.owner_id != id(self):
                raise ValueError(
                    "this VLMPrefix was encoded by another SegVLM; call encode_prefix on this one"
                )
            encoding, _ = self._encode(text, prefix.image_text)
            ids = list(encoding["input_ids"])
            if ids[: prefix.prefix_length] != prefix.input_ids.tolist():
                raise RuntimeError(
                    "the conversation does not start with the cached prefix tokens; the chat template puts "
                    "instruction-dependent text before the image, so the prefix cache cannot be used"
                )
            return ids, prefix, None, {}
        assert image is not None
        pixel_values, extra, image_text = self._image_inputs(image)
        encoding, _ = self._encode(text, image_text)
        return list(encoding["input_ids"]), None, pixel_values, extra

    def _split(self, image_or_prefix: np.ndarray | VLMPrefix) -> tuple[np.ndarray | None, VLMPrefix | None]:
        if isinstance(image_or_prefix, VLMPrefix):
            return None, image_or_prefix
        return _check_image(image_or_prefix), None

    def _run_prompt(
        self,
        ids: list[int],
        prefix: VLMPrefix | None,
        pixel_values: torch.Tensor | None,
        extra: dict[str, torch.Tensor],
        *,
        use_cache: bool,
    ) -> tuple[torch.Tensor, Any, int]:
        """Run ``ids`` (the prefix part from the cache if given); hidden (1, S', h), cache, offset."""
        if prefix is not None:
            cache = copy.deepcopy(prefix.past_key_values)
            suffix = torch.tensor([ids[prefix.prefix_length :]], dtype=torch.long, device=self.device)
            hidden, cache = self._hidden(suffix, past_key_values=cache, use_cache=True)
            return hidden, cache, prefix.prefix_length
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        hidden, cache = self._hidden(
            input_ids, pixel_values=pixel_values, extra_image_inputs=extra, use_cache=use_cache
        )
        return hidden, cache, 0

    # -- inference -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prefix(self, image: np.ndarray) -> VLMPrefix:
        """Run the model once on the conversation start up to the end of the image tokens.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            A :class:`VLMPrefix` reusable by :meth:`seg_hidden` and :meth:`generate` for
            any number of instructions on this image.
        """
        image = _check_image(image)
        pixel_values, extra, image_text = self._image_inputs(image)
        # Two probe conversations: the prefix is what they share, and must hold the image.
        ids, other = (
            list(self._encode(self._render([], probe, None), image_text)[0]["input_ids"]) for probe in "ab"
        )
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
        input_ids = torch.tensor([ids[:length]], dtype=torch.long, device=self.device)
        _, cache = self._hidden(
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
            owner_id=id(self),
        )

    @torch.inference_mode()
    def seg_hidden(
        self,
        image_or_prefix: np.ndarray | VLMPrefix,
        instruction: str,
        *,
        is_sentence: bool | None = None,
        history: list[tuple[str, str]] | None = None,
        answer: str = DEFAULT_ANSWER,
    ) -> torch.Tensor:
        """The ``<SEG>`` query of one instruction: one teacher-forced pass, no generation.

        Args:
            image_or_prefix: (H, W, 3) uint8 RGB image, or its :class:`VLMPrefix` (only
                the instruction and answer tokens are run then; the prefix is not changed).
            instruction: the user's instruction (templated, see :meth:`build_conversation`).
            is_sentence: template choice; ``None`` = guessed.
            history: earlier (instruction, answer) turns, oldest first.
            answer: the teacher-forced answer; must contain ``<SEG>`` exactly once.

        Returns:
            (hidden_size,) float32 on the model's device: the last-layer hidden state at
            the position just before ``<SEG>`` in the expanded sequence (the position whose
            next-token prediction is ``<SEG>``).
        """
        if not isinstance(answer, str) or answer.count(SEG_TOKEN) != 1:
            raise ValueError(f"answer must contain {SEG_TOKEN} exactly once, got {answer!r}")
        image, prefix = self._split(image_or_prefix)
        text = self.build_conversation(instruction, is_sentence=is_sentence, answer=answer, history=history)
        ids, prefix, pixel_values, extra = self._prompt_ids(prefix, image, text)
        seg_pos = len(ids) - 1 - ids[::-1].index(self.seg_token_id)  # the answer's <SEG> is the last one
        start = prefix.prefix_length if prefix is not None else 0
        if seg_pos - 1 < start:
            raise RuntimeError(
                f"{SEG_TOKEN} at position {seg_pos} lies inside the cached prefix ({start} tokens)"
            )
        # Tokens from <SEG> on cannot influence the state that predicts it (causal attention).
        hidden, _, offset = self._run_prompt(ids[:seg_pos], prefix, pixel_values, extra, use_cache=False)
        return hidden[0, seg_pos - 1 - offset].float()

    @torch.inference_mode()
    def generate(
        self,
        image_or_prefix: np.ndarray | VLMPrefix,
        instruction: str,
        *,
        max_new_tokens: int = 64,
        history: list[tuple[str, str]] | None = None,
        is_sentence: bool | None = None,
    ) -> tuple[str, torch.Tensor | None]:
        """Greedy text answer (e.g. "It is <SEG>. Because …") and its ``<SEG>`` query.

        Args:
            image_or_prefix: (H, W, 3) uint8 RGB image or its :class:`VLMPrefix`.
            instruction: the user's instruction (templated as in :meth:`build_conversation`).
            max_new_tokens: most tokens generated (>= 1); stops earlier at end-of-sequence.
            history: earlier (instruction, answer) turns, oldest first.
            is_sentence: template choice; ``None`` = guessed.

        Returns:
            The generated text (stripped; ``<SEG>`` kept, end-of-sequence dropped) and the
            (hidden_size,) float32 hidden state that predicted the first generated
            ``<SEG>``, or ``None`` when no ``<SEG>`` was generated.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        image, prefix = self._split(image_or_prefix)
        text = self.build_conversation(instruction, is_sentence=is_sentence, answer=None, history=history)
        ids, prefix, pixel_values, extra = self._prompt_ids(prefix, image, text)
        hidden, cache, _ = self._run_prompt(ids, prefix, pixel_values, extra, use_cache=True)
        last = hidden[:, -1]  # (1, h)
        lm_head = self._llava.get_output_embeddings()
        generated: list[int] = []
        seg_state: torch.Tensor | None = None
        for step in range(max_new_tokens):
            next_id = int(lm_head(last).argmax(-1)[0])
            if next_id in self._eos_ids:
                break
            if next_id == self.seg_token_id and seg_state is None:
                seg_state = last[0].float()
            generated.append(next_id)
            if step + 1 < max_new_tokens:
                step_ids = torch.tensor([[next_id]], dtype=torch.long, device=self.device)
                hidden, cache = self._hidden(step_ids, past_key_values=cache, use_cache=True)
                last = hidden[:, -1]
        answer = self.tokenizer.decode(
            generated, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return answer.strip(), seg_state

    # -- training ------------------------------------------------------------------------
    def training_forward(
        self, images: list[np.ndarray], conversations: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched teacher-forced pass for training.

        Args:
            images: N (H, W, 3) uint8 RGB images (sizes may differ).
            conversations: N (user text, assistant answer) pairs. The user text is used as
                is (template it with :func:`llmseg_ros.models.prompts.training_question`); the
                answer may hold ``<SEG>`` tokens (usually one; none for plain VQA).

        Returns:
            ``loss``: scalar, mean token cross-entropy over the answer tokens and the
            end-of-sequence token after each answer (prompt and padding excluded);
            ``seg_hidden``: (M, hidden_size) float32, the hidden state predicting each
            ``<SEG>`` of the answers, in batch order; ``batch_index``: (M,) int64, the
            sample each row belongs to.
        """
        if len(images) != len(conversations) or not images:
            raise ValueError(
                f"images and conversations must be non-empty and of equal length, got {len(images)} and "
                f"{len(conversations)}"
            )
        eos_id = self.tokenizer.eos_token_id
        if eos_id is None:
            raise RuntimeError("the tokenizer has no eos token; cannot terminate training answers")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        pixels: list[torch.Tensor] = []
        for i, (image, pair) in enumerate(zip(images, conversations)):
            if not (
                isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
            ):
                raise TypeError(f"conversations[{i}] must be a (user text, answer) pair of str, got {pair!r}")
            user_text, answer = pair[0].strip(), pair[1].strip()
            if not user_text or not answer:
                raise ValueError(f"conversations[{i}] has an empty user text or answer: {pair!r}")
            if SEG_TOKEN in user_text:
                raise ValueError(f"conversations[{i}]: the user text must not contain {SEG_TOKEN}")
            pixel_values, _, image_text = self._image_inputs(_check_image(image))
            prompt = self._render([], user_text, None)
            encoding, expanded = self._encode(f"{prompt} {answer}", image_text, offsets=True)
            answer_start = len(expanded) - len(answer) - 1  # the space before the answer
            ids = [*encoding["input_ids"], eos_id]
            label = [
                tok if start >= answer_start and end > start else IGNORE_INDEX
                for tok, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"])
            ]
            label.append(eos_id)
            if all(t == IGNORE_INDEX for t in label[:-1]):
                raise RuntimeError(f"conversations[{i}]: no answer token found after the prompt")
            rows.append(ids)
            labels.append(label)
            pixels.append(pixel_values)
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        target = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, label) in enumerate(zip(rows, labels)):  # right padding
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
            target[b, : len(label)] = torch.tensor(label)
        input_ids, attention, target = (t.to(self.device) for t in (input_ids, attention, target))
        hidden, _ = self._hidden(input_ids, pixel_values=torch.cat(pixels), attention_mask=attention)

        # LM loss: hidden at t predicts target t + 1; only answer positions get logits.
        next_target = target[:, 1:]
        keep = next_target != IGNORE_INDEX  # (N, S-1)
        logits = self._llava.get_output_embeddings()(hidden[:, :-1][keep])  # (T, vocab)
        loss = F.cross_entropy(logits.float(), next_target[keep])

        seg_mask = (input_ids == self.seg_token_id) & (target != IGNORE_INDEX)  # <SEG> in the answers
        batch_index, seg_pos = seg_mask.nonzero(as_tuple=True)
        seg_states = hidden[batch_index, seg_pos - 1].float()
        return loss, seg_states, batch_index
