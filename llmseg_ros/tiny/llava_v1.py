"""Tiny random checkpoints in the exact layouts the LLM-Seg and LISA authors released.

For the tests of ``llmseg import-weights``: the same key names, dtypes (bfloat16, as
their DeepSpeed bf16 engine / ``torch_dtype=bfloat16`` saved them), file names and
folder structure, at tiny sizes:

* :func:`save_llava_v1_base` — the LLaVA-Lightning-7B-v1 folder the authors pass as
  ``--version``: ``config.json`` (``LlavaLlamaForCausalLM``) and a LLaMA-style tokenizer
  (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no added tokens yet).
* :func:`save_clip_vision` — the ``openai/clip-vit-large-patch14`` stand-in: a CLIP
  vision config and its weights under ``vision_model.*`` as on the hub.
* :func:`save_llmseg_deepspeed` — ``ckpt_model/{latest, global_step50/
  mp_rank_00_model_states.pt, bf16_zero_pp_rank_{0,1}_mp_rank_00_optim_states.pt}``: the
  peft 0.4-wrapped ``LISAForCausalLM`` module state (``base_model.model.…``, LoRA as
  ``lora_A.default``, transformers 4.29's persistent ``inv_freq`` and ``position_ids``
  buffers, SAM under ``model.visual_model``, torch.hub DINOv2 under
  ``model.visual_model_dinov2``, the fusion layers and heads) plus DeepSpeed 0.10's
  bookkeeping entries (``ds_config`` pickled as a ``deepspeed.runtime.config.DeepSpeedConfig``).
* :func:`save_lisa_hf` — ``xinlai/LISA-7B-v1``'s layout: ``config.json``
  (``LISAForCausalLM``), two ``pytorch_model-0000i-of-00002.bin`` shards + index with the
  LoRA merged and without the CLIP tower, the tokenizer with ``[SEG]``, ``<im_start>``,
  ``<im_end>``.

The weights are random (seeded); the tests compare our pipeline on the imported copy with
a step-by-step computation of the authors' forward on these tensors.
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.tiny.bpe import train_byte_level_bpe
from llmseg_ros.tiny.vlm import _CORPUS
from llmseg_ros.utils.atomic import atomic_directory

TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
}
CLIP_IMAGE, CLIP_PATCH = 56, 14  # 4 × 4 = 16 image tokens
BASE_VOCAB = 512
LORA_RANK = 8
FUSION_DIM, FUSION_MLP, IOP_HIDDEN = 256, 2048, 128
GLOBAL_STEP = 50
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
AUTHORS_TOKENS = ("[SEG]", "<im_start>", "<im_end>")
DS_VERSION = "0.10.0"


def _tokenizer() -> Any:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = train_byte_level_bpe(_CORPUS, LLAMA_SPECIALS, BASE_VOCAB)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="right"
    )


def _base_config(vocab: int, text: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **(TEXT if text is None else text),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_vision_select_layer": -2,
        "mm_hidden_size": CLIP["hidden_size"],
        "mm_use_im_start_end": False,
        "use_mm_proj": True,
        "torch_dtype": "float16",
    }


def save_llava_v1_base(directory: str | Path) -> Path:
    """The authors' ``--version`` folder: ``config.json`` + the LLaMA-style tokenizer (atomic)."""
    directory = Path(directory)
    tokenizer = _tokenizer()
    with atomic_directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(_base_config(len(tokenizer)), indent=2) + "\n")
    return directory


def save_clip_vision(directory: str | Path, seed: int = 0) -> Path:
    """A random CLIP vision tower saved as on the hub (``vision_model.*`` keys, CLIP config)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        **CLIP,
        image_size=CLIP_IMAGE,
        patch_size=CLIP_PATCH,
        projection_dim=CLIP["hidden_size"],
        hidden_act="quick_gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _linear(out_f: int, in_f: int, gen: torch.Generator, bias: bool = True) -> dict[str, torch.Tensor]:
    bound = in_f**-0.5
    out = {"weight": (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound}
    if bias:
        out["bias"] = (torch.rand(out_f, generator=gen) * 2 - 1) * bound
    return out


def _norm(dim: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "weight": 1 + 0.1 * torch.randn(dim, generator=gen),
        "bias": 0.1 * torch.randn(dim, generator=gen),
    }


def _put(state: dict[str, torch.Tensor], prefix: str, params: dict[str, torch.Tensor]) -> None:
    state.update({f"{prefix}.{k}": v for k, v in params.items()})


def dinov2_hub_state(dinov2_dir: Path) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model folder's weights (hub file layout, as ``facebook/dinov2-large``)
    in torch.hub's ``dinov2_vitl14`` layout (facebookresearch/dinov2 ``vision_transformer.py``:
    ``blocks.N.attn.qkv`` fused ...)."""
    from safetensors.torch import load_file

    hf = load_file(str(dinov2_dir / "model.safetensors"))
    hub = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "mask_token": hf["embeddings.mask_token"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    blocks = sorted({int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer.")})
    for i in blocks:
        layer = f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            hub[f"blocks.{i}.norm1.{kind}"] = hf[f"{layer}.norm1.{kind}"]
            hub[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf[f"{layer}.attention.attention.{p}.{kind}"] for p in ("query", "key", "value")]
            )
            hub[f"blocks.{i}.attn.proj.{kind}"] = hf[f"{layer}.attention.output.dense.{kind}"]
            hub[f"blocks.{i}.norm2.{kind}"] = hf[f"{layer}.norm2.{kind}"]
            hub[f"blocks.{i}.mlp.fc1.{kind}"] = hf[f"{layer}.mlp.fc1.{kind}"]
            hub[f"blocks.{i}.mlp.fc2.{kind}"] = hf[f"{layer}.mlp.fc2.{kind}"]
        hub[f"blocks.{i}.ls1.gamma"] = hf[f"{layer}.layer_scale1.lambda1"]
        hub[f"blocks.{i}.ls2.gamma"] = hf[f"{layer}.layer_scale2.lambda1"]
    return hub


def authors_module_state(
    kind: str,
    *,
    base_dir: Path,
    clip_dir: Path,
    sam_path: Path,
    dinov2_dir: Path | None = None,
    seed: int = 0,
    text: dict[str, Any] | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """The authors' ``LISAForCausalLM`` state dict (unwrapped names), bfloat16.

    Args:
        kind: ``"llmseg"`` (LoRA unmerged, transformers 4.29 buffers, DINOv2 and the
            fusion heads) or ``"lisa"`` (LoRA merged, fine-tuned SAM mask decoder, no
            CLIP tower, no buffers).
        base_dir: :func:`save_llava_v1_base` folder (its vocabulary size).
        clip_dir: :func:`save_clip_vision` folder (the frozen CLIP copy).
        sam_path: the tiny SAM checkpoint (the frozen SAM copy).
        dinov2_dir: the tiny DINOv2 folder (LLM-Seg only).
        text: LLaMA sizes instead of :data:`TEXT` (larger checkpoints for the memory benchmark).
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind not in ("llmseg", "lisa"):
        raise ValueError(f"kind must be 'llmseg' or 'lisa', got {kind!r}")
    vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"] + len(AUTHORS_TOKENS)
    text = TEXT if text is None else text
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llama = LlamaForCausalLM(
            LlamaConfig(vocab_size=vocab, rms_norm_eps=1e-6, tie_word_embeddings=False, **text)
        )
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = hidden // heads
    for key, value in llama.state_dict().items():
        state[key] = value
        if kind == "llmseg" and key.endswith(("q_proj.weight", "v_proj.weight")):
            module = key[: -len(".weight")]
            state[f"{module}.lora_A.default.weight"] = 0.1 * torch.randn(LORA_RANK, hidden, generator=gen)
            state[f"{module}.lora_B.default.weight"] = 0.1 * torch.randn(hidden, LORA_RANK, generator=gen)
        if kind == "llmseg" and key.endswith("o_proj.weight"):  # transformers 4.29: a persistent buffer
            layer = key[: -len(".o_proj.weight")]
            state[f"{layer}.rotary_emb.inv_freq"] = 1.0 / (
                10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
            )
    clip = load_file(str(clip_dir / "model.safetensors"))
    if kind == "llmseg":  # LISA's release leaves the CLIP tower out
        for key, value in clip.items():
            state[f"model.vision_tower.vision_tower.{key}"] = value
        positions = clip["vision_model.embeddings.position_embedding.weight"].shape[0]
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(
            positions
        )[None]
    _put(state, "model.mm_projector", _linear(hidden, CLIP["hidden_size"], gen))
    sam = torch.load(sam_path, map_location="cpu", weights_only=True)
    for key, value in sam.items():
        if kind == "lisa" and key.startswith("mask_decoder.") and value.is_floating_point():
            value = value + 0.05 * torch.randn(value.shape, generator=gen)  # fine-tuned
        state[f"model.visual_model.{key}"] = value
    out_dim = FUSION_DIM if kind == "llmseg" else int(sam["prompt_encoder.no_mask_embed.weight"].shape[1])
    _put(state, "model.text_hidden_fcs.0.0", _linear(hidden, hidden, gen))
    _put(state, "model.text_hidden_fcs.0.2", _linear(out_dim, hidden, gen))
    if kind == "llmseg":
        assert dinov2_dir is not None
        for key, value in dinov2_hub_state(dinov2_dir).items():
            state[f"model.visual_model_dinov2.{key}"] = value
        dino_hidden = int(state["model.visual_model_dinov2.cls_token"].shape[-1])
        conv = _linear(FUSION_DIM, dino_hidden, gen)
        _put(
            state, "model.lisa_dino_conv", {"weight": conv["weight"][:, :, None, None], "bias": conv["bias"]}
        )
        d = FUSION_DIM
        for i in range(2):
            layer = f"model.lisa_attention_layers.{i}"
            for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    _put(state, f"{layer}.{attn}.{proj}", _linear(d, d, gen))
            for norm in ("norm1", "norm2", "norm3", "norm4"):
                _put(state, f"{layer}.{norm}", _norm(d, gen))
            _put(state, f"{layer}.mlp.lin1", _linear(FUSION_MLP, d, gen))
            _put(state, f"{layer}.mlp.lin2", _linear(d, FUSION_MLP, gen))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _put(state, f"model.lisa_final_attn.{proj}", _linear(d, d, gen))
        _put(state, "model.lisa_norm_final_attn", _norm(d, gen))
        _put(state, "model.lisa_iou_head.0", _linear(IOP_HIDDEN, d, gen))
        _put(state, "model.lisa_iou_head.2", _linear(1, IOP_HIDDEN, gen))
        _put(state, "model.lisa_embedding_head.0", _linear(FUSION_MLP, d, gen))
        _put(state, "model.lisa_embedding_head.2", _linear(d, FUSION_MLP, gen))
    # DeepSpeed's bf16 engine / torch_dtype=bfloat16: every floating tensor in bfloat16.
    return OrderedDict(
        (k, v.to(torch.bfloat16) if v.is_floating_point() else v.clone()) for k, v in state.items()
    )


class _DeepSpeedConfig:
    """Pickled under DeepSpeed's name, as DeepSpeed stores its engine config in checkpoints."""

    def __init__(self) -> None:
        self.train_micro_batch_size_per_gpu = 1
        self.gradient_accumulation_steps = 10
        self.zero_config = {"stage": 2}
        self.bfloat16_enabled = True


@contextlib.contextmanager
def _deepspeed_names() -> Iterator[None]:
    """Make ``deepspeed.runtime.config.DeepSpeedConfig`` resolve to :class:`_DeepSpeedConfig`
    while pickling (DeepSpeed itself is not needed), then restore ``sys.modules``."""
    names = ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.config")
    saved = {name: sys.modules.get(name) for name in names}
    modules = {name: types.ModuleType(name) for name in names}
    modules["deepspeed.runtime.config"].DeepSpeedConfig = _DeepSpeedConfig  # type: ignore[attr-defined]
    original = (_DeepSpeedConfig.__module__, _DeepSpeedConfig.__qualname__)
    _DeepSpeedConfig.__module__, _DeepSpeedConfig.__qualname__ = "deepspeed.runtime.config", "DeepSpeedConfig"
    sys.modules.update(modules)
    try:
        yield
    finally:
        _DeepSpeedConfig.__module__, _DeepSpeedConfig.__qualname__ = original
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _trainable(key: str) -> bool:
    return any(
        part in key
        for part in (
            "lora_",
            "lm_head",
            "embed_tokens",
            "text_hidden_fcs",
            "lisa_attention_layers",
            "lisa_final_attn",
            "lisa_norm_final_attn",
            "lisa_iou_head",
            "lisa_embedding_head",
            "lisa_dino_conv",
        )
    )


def save_llmseg_deepspeed(
    directory: str | Path, *, base_dir: Path, clip_dir: Path, sam_path: Path, dinov2_dir: Path, seed: int = 0
) -> Path:
    """An LLM-Seg release in the authors' DeepSpeed layout (see the module docstring).

    Returns:
        ``directory`` (the ``ckpt_model`` folder).
    """
    state = authors_module_state(
        "llmseg", base_dir=base_dir, clip_dir=clip_dir, sam_path=sam_path, dinov2_dir=dinov2_dir, seed=seed
    )
    module = OrderedDict((f"base_model.model.{k}", v) for k, v in state.items())
    buffers = [k for k in module if k.endswith(("inv_freq", "position_ids"))]
    params = [k for k in module if k not in buffers]
    trainable = [k for k in params if _trainable(k)]
    frozen = [k for k in params if not _trainable(k)]
    tag = f"global_step{GLOBAL_STEP}"
    directory = Path(directory)
    with atomic_directory(directory) as tmp, _deepspeed_names():
        (tmp / tag).mkdir()
        config = _DeepSpeedConfig()
        model_states: dict[str, Any] = {
            "module": module,
            "buffer_names": buffers,
            "optimizer": None,
            "param_shapes": [OrderedDict((k, module[k].shape) for k in trainable)],
            "frozen_param_shapes": OrderedDict((k, module[k].shape) for k in frozen),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict((k, module[k].clone()) for k in frozen),
            "lr_scheduler": {"last_batch_iteration": GLOBAL_STEP - 1, "total_num_steps": 10 * GLOBAL_STEP},
            "data_sampler": None,
            "random_ltd": None,
            "sparse_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": GLOBAL_STEP,
            "global_samples": 10 * GLOBAL_STEP,
            "dp_world_size": 2,
            "mp_world_size": 1,
            "ds_config": config,
            "ds_version": DS_VERSION,
        }
        torch.save(model_states, tmp / tag / "mp_rank_00_model_states.pt")
        flat = torch.cat([module[k].float().flatten() for k in trainable])
        for rank, part in enumerate(flat.chunk(2)):
            optim = {
                "optimizer_state_dict": {
                    "zero_stage": 2,
                    "partition_count": 2,
                    "single_partition_of_fp32_groups": [part.clone()],
                    "ds_version": DS_VERSION,
                },
                "ds_config": config,
                "ds_version": DS_VERSION,
            }
            torch.save(optim, tmp / tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        (tmp / "latest").write_text(tag)
    return directory


def save_lisa_hf(
    directory: str | Path,
    *,
    base_dir: Path,
    clip_dir: Path,
    sam_path: Path,
    seed: int = 0,
    text: dict[str, Any] | None = None,
) -> Path:
    """A LISA release in the authors' Hugging Face layout (see the module docstring);
    ``text``: LLaMA sizes instead of :data:`TEXT`."""
    state = authors_module_state(
        "lisa", base_dir=base_dir, clip_dir=clip_dir, sam_path=sam_path, seed=seed, text=text
    )
    tokenizer = _tokenizer()
    tokenizer.add_tokens(AUTHORS_TOKENS[0])
    tokenizer.add_tokens(list(AUTHORS_TOKENS[1:]), special_tokens=True)
    config = {
        **_base_config(len(tokenizer), text),
        "architectures": ["LISAForCausalLM"],
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "mm_vision_select_feature": "patch",
        "vision_tower": "openai/clip-vit-large-patch14",
        "image_aspect_ratio": "square",
        "train_mask_decoder": True,
        "out_dim": int(state["model.text_hidden_fcs.0.2.weight"].shape[0]),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
    }
    keys = list(state)
    half = len(keys) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[:half],
        "pytorch_model-00002-of-00002.bin": keys[half:],
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        for name, names in shards.items():
            torch.save(OrderedDict((k, state[k]) for k in names), tmp / name)
            weight_map.update({k: name for k in names})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory
