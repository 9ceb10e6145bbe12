"""The authors' base VLM (LLaVA v1) as a transformers ``LlavaForConditionalGeneration``.

LLaVA v1 (LLaVA-Lightning-7B-v1 under LLM-Seg and LISA-7B; LLaVA on Llama-2-13B under
LISA-13B) is LLaMA + CLIP ViT-L/14 at 224 px + one linear projector, reading the patch
tokens (CLS dropped) of CLIP's penultimate layer. transformers' LLaVA classes express it
with configuration only:

* ``vision_feature_layer = mm_vision_select_layer`` (-2), ``vision_feature_select_strategy
  = "default"`` (patch tokens only);
* the projector is ``linear_1 → act → linear_2``: ``linear_1`` holds the authors'
  ``mm_projector``, ``projector_hidden_act = "linear"`` (the identity) and ``linear_2`` is
  the identity matrix with zero bias, so the projector computes exactly the authors'
  single ``Linear`` (multiplying by 1 and adding 0 is exact in every float format);
* the tokenizer is the checkpoint's (``[SEG]``, ``<im_start>``, ``<im_end>`` after the
  LLaMA vocabulary) plus an ``<image>`` placeholder after them, whose embedding and LM-head
  rows are zero and never used: the image features take its place and generation never
  emits it;
* the image processor is CLIP's (resize the short side to 224, centre crop, OpenAI
  mean / std).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.weights.sources import TensorSource, read_json_object

IMAGE_TOKEN = "<image>"
AUTHORS_TOKENS = ("[SEG]", "<im_start>", "<im_end>")
CLIP_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


@dataclass
class BaseVLMSpec:
    """Everything that defines the converted VLM besides its tensors.

    Attributes:
        text: ``LlamaConfig`` arguments.
        vision: ``CLIPVisionConfig`` arguments.
        select_layer: CLIP hidden state the authors read (``mm_vision_select_layer``).
        source_rows: rows of the authors' embeddings (LLaMA vocabulary + 3 added tokens).
    """

    text: dict[str, Any]
    vision: dict[str, Any]
    select_layer: int
    source_rows: int

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def image_token_id(self) -> int:
        """The ``<image>`` placeholder: one row after the authors' vocabulary."""
        return self.source_rows

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])


def _int(config: dict[str, Any], name: str, source: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {name!r} must be a positive integer, got {value!r}")
    return value


def text_config(base: dict[str, Any], tensors: TensorSource, prefix: str, source: str) -> dict[str, Any]:
    """``LlamaConfig`` arguments from the authors' ``config.json``, checked against the tensors."""
    hidden = _int(base, "hidden_size", source)
    heads = _int(base, "num_attention_heads", source)
    layers = _int(base, "num_hidden_layers", source)
    intermediate = _int(base, "intermediate_size", source)
    kv_heads = _int(base, "num_key_value_heads", source, heads)
    eps = base.get("rms_norm_eps", 1e-6)
    theta = base.get("rope_theta", 10000.0)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ValueError(f"{source}: 'rms_norm_eps' must be a small positive number, got {eps!r}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"{source}: 'rope_theta' must be a positive number, got {theta!r}")
    embed = f"{prefix}model.embed_tokens.weight"
    if embed not in tensors:
        raise ValueError(f"the checkpoint has no {embed!r} (the LLaMA token embeddings)")
    rows, width = tensors.shape(embed)
    found_layers = {
        int(m.group(1)) for k in tensors if (m := re.match(rf"{re.escape(prefix)}model\.layers\.(\d+)\.", k))
    }
    checks = [
        (width == hidden, f"embeddings are {width} wide but hidden_size is {hidden}"),
        (
            found_layers == set(range(layers)),
            f"the checkpoint has layers {sorted(found_layers)[:4]}… ({len(found_layers)}) but num_hidden_layers is {layers}",
        ),
        (hidden % heads == 0, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"),
    ]
    gate = f"{prefix}model.layers.0.mlp.gate_proj.weight"
    if gate in tensors:
        checks.append(
            (
                tensors.shape(gate) == (intermediate, hidden),
                f"{gate} is {tensors.shape(gate)}, expected ({intermediate}, {hidden})",
            )
        )
    for ok, problem in checks:
        if not ok:
            raise ValueError(f"{source} does not describe this checkpoint: {problem}")
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(eps),
        "rope_theta": float(theta),
        "max_position_embeddings": _int(base, "max_position_embeddings", source, 2048),
        "hidden_act": "silu",
        "vocab_size": rows + 1,  # + the <image> placeholder
        "tie_word_embeddings": False,
        "source_rows": rows,
    }


def vision_config(tensors: TensorSource, prefix: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """``CLIPVisionConfig`` arguments: ``given`` (a CLIP folder's config), else read off the
    tensors with ViT-L/14's constants (64-wide heads, quick GELU, LayerNorm eps 1e-5; refused
    for any other tower)."""

    def shape(name: str) -> tuple[int, ...]:
        key = f"{prefix}{name}"
        if key not in tensors:
            raise ValueError(f"the CLIP vision tower has no {key!r}")
        return tensors.shape(key)

    hidden = shape("embeddings.class_embedding")[0]
    patch = shape("embeddings.patch_embedding.weight")[-1]
    positions = shape("embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"CLIP has {positions} position embeddings; expected 1 + a square number")
    layers = len(
        {m.group(1) for k in tensors if (m := re.match(rf"{re.escape(prefix)}encoder\.layers\.(\d+)\.", k))}
    )
    derived = {
        "hidden_size": hidden,
        "intermediate_size": shape("encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
    }
    if given is None:
        vit_l14 = {"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14}
        if any(derived[k] != v for k, v in vit_l14.items()):
            raise ValueError(
                "the CLIP vision tower is not ViT-L/14 (hidden 1024, 24 layers, patch 14): its head count cannot be "
                "read off the tensors; pass --vision-tower, the CLIP folder it was built from"
            )
        return derived
    merged: dict[str, Any] = {
        **derived,
        **{
            k: given[k]
            for k in ("num_attention_heads", "hidden_act", "layer_norm_eps", "projection_dim")
            if k in given
        },
    }
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size"):
        if name in given and given[name] != derived[name]:
            raise ValueError(
                f"the CLIP config says {name}={given[name]!r} but the tensors give {derived[name]!r}"
            )
    return merged


def clip_config_from_folder(folder: Path) -> dict[str, Any]:
    """The vision part of a CLIP folder's ``config.json`` (a ``CLIPConfig`` or ``CLIPVisionConfig``)."""
    config = read_json_object(folder / "config.json")
    if config.get("model_type") == "clip":
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise ValueError(f"{folder / 'config.json'}: a CLIP config without a 'vision_config' object")
        return vision
    if config.get("model_type") != "clip_vision_model":
        raise ValueError(
            f"{folder / 'config.json'}: expected a CLIP model (model_type 'clip' or 'clip_vision_model'), "
            f"got {config.get('model_type')!r}"
        )
    return config


def llava_config(spec: BaseVLMSpec, tokenizer: Any) -> Any:
    """The ``LlavaConfig`` of the converted VLM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = {k: v for k, v in spec.text.items() if k != "source_rows"}
    text_config = LlamaConfig(
        **text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**spec.vision),
        text_config=text_config,
        image_token_index=spec.image_token_id,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        vision_feature_layer=spec.select_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="linear",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """Native parameter names and shapes of a ``LlavaForConditionalGeneration`` (built on the
    meta device: no memory)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def prepare_tokenizer(folder: Path, source_rows: int, *, add_authors_tokens: bool) -> Any:
    """The checkpoint's tokenizer with the authors' added tokens checked and ``<image>`` added.

    Args:
        folder: a folder with the LLaMA tokenizer files (the authors' ``--version`` folder
            for LLM-Seg, the checkpoint itself for LISA).
        source_rows: rows of the checkpoint's embeddings.
        add_authors_tokens: add ``[SEG]`` then ``<im_start>``, ``<im_end>`` as the
            authors' training script did (LLM-Seg: the base tokenizer lacks them).
    Raises:
        ValueError: the token ids do not fit the checkpoint's embedding rows.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load the tokenizer in {folder} ({exc}); a LLaMA tokenizer.model needs "
            "`pip install sentencepiece protobuf` to be read"
        ) from None
    vocab = tokenizer.get_vocab()
    if add_authors_tokens:
        present = [t for t in AUTHORS_TOKENS if t in vocab]
        if present:
            raise ValueError(
                f"the base tokenizer in {folder} already holds {present}; expected the plain LLaMA one"
            )
        tokenizer.add_tokens([AUTHORS_TOKENS[0]])  # a plain added token, as in the authors' script
        tokenizer.add_tokens(list(AUTHORS_TOKENS[1:]), special_tokens=True)
        vocab = tokenizer.get_vocab()
    missing = [t for t in AUTHORS_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer in {folder} lacks the authors' tokens {missing}")
    if len(tokenizer) != source_rows:
        raise ValueError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens with [SEG], <im_start> and <im_end>, but the "
            f"checkpoint's embeddings have {source_rows} rows: not the tokenizer it was trained with"
        )
    if IMAGE_TOKEN in vocab:
        raise ValueError(f"the tokenizer in {folder} already holds {IMAGE_TOKEN!r}")
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != source_rows:
        raise ValueError(f"{IMAGE_TOKEN} did not get id {source_rows}")
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # the authors' padding
    return tokenizer


def llava_processor(tokenizer: Any, spec: BaseVLMSpec) -> Any:
    """CLIP's image processor (short side, centre crop, OpenAI mean / std) + the tokenizer."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = spec.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        image_token=IMAGE_TOKEN,
    )
