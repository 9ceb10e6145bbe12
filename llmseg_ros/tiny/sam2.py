"""A tiny random SAM 2 video model (transformers ``Sam2VideoModel``) for tests.

Same design as the released SAM 2.1 checkpoints (Hiera backbone with an FPN neck, prompt
encoder, two-way mask decoder, memory attention, memory encoder, object pointers) at
widths that run a streamed frame in well under a second on a CPU. Its masks are
meaningless; it exists so the ``sam2`` tracker backend loads and runs through the same
code as a real checkpoint. The memory attention reads 64-channel memories (fixed in
transformers), and object pointers are split into 64-channel tokens, so the model width
is a multiple of 64 larger than 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmseg_ros.utils.atomic import atomic_directory

TINY_SAM2_IMAGE_SIZE = 128
TINY_SAM2_WIDTH = 128
TINY_SAM2_STAGE_DIMS = [16, 32, 64, 128]


def tiny_sam2_video_config(image_size: int = TINY_SAM2_IMAGE_SIZE) -> Any:
    """The tiny ``Sam2VideoConfig`` (input ``image_size`` pixels square, a multiple of 32)."""
    from transformers import Sam2VideoConfig

    if image_size < 64 or image_size % 32 != 0:
        raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {image_size}")
    s, width, dims = image_size, TINY_SAM2_WIDTH, TINY_SAM2_STAGE_DIMS
    return Sam2VideoConfig(
        image_size=s,
        vision_config={
            "backbone_config": {
                "model_type": "sam2_hiera_det_model",
                "hidden_size": dims[0],
                "num_attention_heads": 1,
                "image_size": [s, s],
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": dims,
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "window_size_per_stage": [8, 4, 8, 4],
                "global_attention_blocks": [3],
                "window_positional_embedding_background_size": [4, 4],
            },
            "backbone_channel_list": dims[::-1],
            "backbone_feature_sizes": [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
            "fpn_hidden_size": width,
        },
        prompt_encoder_config={
            "hidden_size": width,
            "image_size": s,
            "patch_size": 16,
            "mask_input_channels": 4,
        },
        mask_decoder_config={
            "hidden_size": width,
            "mlp_dim": 128,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
        memory_attention_hidden_size=width,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_attention_rope_feat_sizes=[s // 16, s // 16],
        memory_encoder_hidden_size=width,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width,
        memory_fuser_intermediate_dim=64,
        num_maskmem=3,
        max_object_pointers_in_encoder=4,
    )


def save_sam2_video(directory: str | Path, config: Any, seed: int = 0) -> Path:
    """Write a random ``Sam2VideoModel`` of ``config`` and its processor to ``directory``
    (atomically); load it back with ``Sam2VideoPredictor.load(directory)``."""
    from transformers import Sam2VideoModel, Sam2VideoProcessor
    from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    directory = Path(directory).expanduser()
    image_size = int(config.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2VideoModel(config).eval()
    size = {"height": image_size, "width": image_size}
    processor = Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(
            size=size, mask_size={"height": image_size // 4, "width": image_size // 4}
        ),
        video_processor=Sam2VideoVideoProcessor(size=size),
        target_size=image_size,
    )
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return directory


def save_tiny_sam2_video(
    directory: str | Path, seed: int = 0, image_size: int = TINY_SAM2_IMAGE_SIZE
) -> Path:
    """Write the tiny random SAM 2 video model and its processor to ``directory``.

    Load it back with ``llmseg_ros.models.sam2_video.Sam2VideoPredictor.load(directory)``
    or ``TrackerConfig(backend="sam2", sam2_model=directory)``.
    """
    return save_sam2_video(directory, tiny_sam2_video_config(image_size), seed)
