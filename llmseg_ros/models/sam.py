"""SAM builders: one registry for the official sizes and the tiny test model.

``build_sam`` builds the architecture with ``segment_anything``'s own builders (``vit_h``,
``vit_l``, ``vit_b``) or from ``segment_anything``'s modeling classes (``tiny``, a small
random model of the same design used by tests and the tiny profile), loads the
checkpoint, moves the model to the device and freezes it (eval mode, no gradients).

Official checkpoints come from ``SAM_CHECKPOINT_URLS`` (``llmseg fetch-weights``
downloads them). The tiny model's checkpoint is written by
``llmseg_ros.tiny.sam.save_tiny_sam``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

SAM_RELEASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

# Official checkpoints (segment-anything README, "Model Checkpoints").
SAM_CHECKPOINT_URLS: dict[str, str] = {
    "vit_h": SAM_RELEASE_URL + "sam_vit_h_4b8939.pth",
    "vit_l": SAM_RELEASE_URL + "sam_vit_l_0b3195.pth",
    "vit_b": SAM_RELEASE_URL + "sam_vit_b_01ec64.pth",
}
# File name of each official checkpoint (the last part of its URL).
SAM_CHECKPOINT_FILES: dict[str, str] = {
    name: url.rsplit("/", 1)[-1] for name, url in SAM_CHECKPOINT_URLS.items()
}

SAM_PATCH_SIZE = 16
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# The tiny model: SAM's design (ViT with windowed attention and relative positions,
# prompt encoder, two-way transformer mask decoder with 3 multimask outputs) at widths
# small enough to run everything mode at 1024 x 1024 on a laptop CPU in seconds. It has
# no global-attention block: at 1024 one such block (4096 x 4096 attention) would cost
# more than the rest of the model.
TINY_SAM_ARCH: dict[str, int] = {
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_window_size": 14,
    "prompt_embed_dim": 32,
    "mask_in_chans": 4,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
}
TINY_SAM_GLOBAL_ATTN_INDEXES: tuple[int, ...] = ()
TINY_SAM_DEFAULT_IMAGE_SIZE = 1024

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")


def build_tiny_sam_architecture(image_size: int = TINY_SAM_DEFAULT_IMAGE_SIZE) -> Sam:
    """The tiny SAM with PyTorch's default (random) initialisation, in eval mode.

    Args:
        image_size: side of the square encoder input in pixels (a multiple of 16); the
            low-resolution masks are ``image_size / 4`` pixels wide, like SAM's 256 at 1024.
    """
    if image_size < SAM_PATCH_SIZE or image_size % SAM_PATCH_SIZE != 0:
        raise ValueError(f"image_size must be a positive multiple of {SAM_PATCH_SIZE}, got {image_size}")
    arch = TINY_SAM_ARCH
    embedding_size = image_size // SAM_PATCH_SIZE
    dim = arch["prompt_embed_dim"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=SAM_PATCH_SIZE,
            embed_dim=arch["encoder_embed_dim"],
            depth=arch["encoder_depth"],
            num_heads=arch["encoder_num_heads"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=TINY_SAM_GLOBAL_ATTN_INDEXES,
            window_size=arch["encoder_window_size"],
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=arch["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=arch["decoder_mlp_dim"],
                num_heads=arch["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch["iou_head_hidden_dim"],
        ),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


_BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": sam_model_registry["vit_h"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_b": sam_model_registry["vit_b"],
    "tiny": build_tiny_sam_architecture,
}


def _missing_checkpoint_message(model_type: str, path: Path) -> str:
    if model_type == "tiny":
        how = "create it with llmseg_ros.tiny.sam.save_tiny_sam(path) (or build the tiny profile)"
    else:
        how = (
            f"download it with `llmseg fetch-weights --sam-model-type {model_type}` "
            f"or from {SAM_CHECKPOINT_URLS[model_type]}"
        )
    return f"SAM {model_type} checkpoint not found: looked for {path}; {how}"


def _tiny_image_size(state_dict: dict[str, torch.Tensor], path: Path) -> int:
    """The tiny model's input size, read from its absolute position embedding."""
    pos_embed = state_dict.get("image_encoder.pos_embed")
    if pos_embed is None or pos_embed.ndim != 4:
        raise ValueError(f"{path} is not a tiny SAM checkpoint: no image_encoder.pos_embed (1, S, S, C)")
    return int(pos_embed.shape[1]) * SAM_PATCH_SIZE


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from llmseg_ros.weights.torch_files import read_torch_file

    state = read_torch_file(path)  # ValueError for damaged files and pickled code, never runs it
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a SAM state dict (got {type(state).__name__})")
    return state


@torch.no_grad()
def build_sam(model_type: str, checkpoint: str | Path | None, device: torch.device | str = "cpu") -> Sam:
    """Build a SAM model, load its weights and freeze it.

    Args:
        model_type: ``vit_h`` | ``vit_l`` | ``vit_b`` (official sizes, input 1024 x 1024)
            or ``tiny`` (test model; its input size is read from the checkpoint, 1024
            when there is none).
        checkpoint: path of a ``.pth`` state dict (the official files, or one written by
            ``save_tiny_sam``); ``None`` keeps random weights (benchmarks, tests).
        device: where the model lives.
    Returns:
        The model in eval mode with ``requires_grad`` off on every parameter.
    Raises:
        ValueError: unknown ``model_type``, or a checkpoint that does not fit it.
        FileNotFoundError: ``checkpoint`` does not exist; the message says how to get it.
    """
    if model_type not in _BUILDERS:
        raise ValueError(f"model_type must be one of {list(SAM_MODEL_TYPES)}, got {model_type!r}")
    if checkpoint is None:
        sam = _BUILDERS[model_type]()
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_checkpoint_message(model_type, path))
        state_dict = _read_state_dict(path)
        if model_type == "tiny":
            sam = build_tiny_sam_architecture(_tiny_image_size(state_dict, path))
        else:
            sam = _BUILDERS[model_type]()
        try:
            sam.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {path} does not fit SAM {model_type}: {exc}") from exc
    sam.eval()
    sam.requires_grad_(False)
    return sam.to(torch.device(device))
