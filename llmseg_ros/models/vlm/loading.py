"""Loading a LLaVA checkpoint for :class:`~llmseg_ros.models.vlm.SegVLM`.

Resolves the source (local directory or hub id), loads model and processor (optionally
quantised), adds ``<SEG>`` to the vocabulary, and applies or creates the LoRA adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.config import LoraSettings
from llmseg_ros.models.prompts import SEG_TOKEN
from llmseg_ros.utils.atomic import atomic_directory
from llmseg_ros.utils.hub import download_command

DEFAULT_VLM = "llava-hf/llava-1.5-7b-hf"
ADAPTER_META_NAME = "segvlm.json"
QUANTIZATION_MODES = ("8bit", "4bit")
# Modules kept in full precision when the language model is quantised.
UNQUANTIZED_MODULES = ["vision_tower", "multi_modal_projector", "lm_head"]


def looks_like_path(value: str) -> bool:
    """Hub ids are ``owner/name``; anything absolute, dotted, home-relative or deeper is a path."""
    return value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") != 1


def quantization_config(quantization: str, device: torch.device, dtype: torch.dtype) -> Any:
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


def language_lora_pattern(target_modules: tuple[str, ...]) -> str:
    """peft ``target_modules`` regex: the named projections inside the language model only."""
    names = "|".join(sorted(set(target_modules)))
    return rf"(?:.*\.)?language_model\.(?:.*\.)?(?:{names})"


def check_adapter_dir(adapter_dir: str | Path | None) -> Path | None:
    """The adapter directory as a path, refused when it holds no ``adapter_config.json``."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"VLM adapter directory {path} has no adapter_config.json; expected a directory "
            "written by SegVLM.save_adapter (part of the trained weights, see training/train.py)"
        )
    return path


def resolve_source(model: str | Path) -> str:
    """A local checkpoint directory (checked) or a hub id, as a string for ``from_pretrained``."""
    source = str(model)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"VLM directory {local} has no config.json; expected a LlavaForConditionalGeneration "
                "checkpoint written by save_pretrained (model, tokenizer and processor files)"
            )
        return str(local)
    if looks_like_path(source):
        raise FileNotFoundError(
            f"VLM directory {source} does not exist; pass a LlavaForConditionalGeneration checkpoint "
            f"directory or a hub id such as {DEFAULT_VLM!r} (download it with `llmseg fetch-weights` "
            f"or `{download_command(DEFAULT_VLM)}`)"
        )
    return source


def load_llava(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quant_config: Any = None,
    image_backend: str | None = None,
) -> tuple[Any, Any]:
    """``LlavaForConditionalGeneration`` and its processor from ``source`` (checked to be LLaVA).

    ``image_backend``: ``"pil"`` loads the image processor that resizes with PIL, as
    transformers' CLIP image processor did when the LLM-Seg / LISA authors trained (the
    default, torchvision-based one differs slightly); ``None`` = transformers' default.
    """
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    kwargs_processor: dict[str, Any] = {} if image_backend is None else {"backend": image_backend}
    try:
        config = AutoConfig.from_pretrained(source)
        processor = AutoProcessor.from_pretrained(source, **kwargs_processor)
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
        raise ValueError(f"VLM {source!r} has no image processor + tokenizer processor ({type(processor)})")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant_config is not None:
        kwargs.update(quantization_config=quant_config, device_map={"": str(device)})
    llava: Any = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    if quant_config is None:
        llava.to(device)
    return llava, processor


def add_seg_token(llava: Any, tokenizer: Any, seg_token: str = SEG_TOKEN) -> int:
    """Add ``seg_token`` (if absent) as one special token; grow / initialise its embedding rows.

    Imported checkpoints already hold theirs (``[SEG]``, a trained row); its id is read
    back from the vocabulary, never from a re-tokenisation.
    """
    vocab_before = len(tokenizer)
    if seg_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([seg_token], special_tokens=True)
    seg_id = int(tokenizer.convert_tokens_to_ids(seg_token))
    encoded = tokenizer.encode(seg_token, add_special_tokens=False)
    if encoded != [seg_id]:
        raise RuntimeError(f"{seg_token} must tokenize to the single id {seg_id}, got {encoded}")
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


def fresh_lora(llava: Any, lora: LoraSettings) -> Any:
    """A new peft LoRA on the language model's projections; embeddings and LM head fully trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=language_lora_pattern(lora.target_modules),
        modules_to_save=["embed_tokens", "lm_head"],
        bias="none",
    )
    return get_peft_model(llava, config)


def apply_adapter(llava: Any, adapter_dir: Path, seg_token_id: int, trainable: bool) -> Any:
    """Load a saved adapter onto ``llava``, refusing one saved for another ``<SEG>`` id / vocabulary."""
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


def save_adapter(model: Any, directory: str | Path, meta: dict[str, Any]) -> None:
    """Write the peft adapter of ``model`` and ``meta`` (``segvlm.json``) atomically."""
    if not hasattr(model, "peft_config"):
        raise RuntimeError("no adapter to save: load the VLM with trainable=True or an adapter_dir")
    with atomic_directory(directory) as tmp:
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        (tmp / ADAPTER_META_NAME).write_text(
            json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
