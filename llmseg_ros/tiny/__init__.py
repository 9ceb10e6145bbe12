"""Tiny random models of the real architectures, saved to disk and loaded back through
the same code as real weights.

They exist so that tests, CI and ``llmseg segment --profile tiny`` exercise every line of
the pipeline on any machine, with no downloads. Their outputs are meaningless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.config import METHODS, ProposalConfig, SegmenterConfig
from llmseg_ros.utils.atomic import atomic_directory

TINY_PROFILE_VERSION = 3
MARKER = "tiny_profile.json"
TINY_BANNER = (
    "*** TINY PROFILE: tiny RANDOM models stand in for SAM, DINOv2 and the VLM. ***\n"
    "*** The mask shows the mechanics of the pipeline, not a meaningful answer. ***"
)


def default_cache_dir() -> Path:
    """Where tiny models are kept: $LLMSEG_CACHE, else $XDG_CACHE_HOME/llmseg_ros, else ~/.cache/llmseg_ros."""
    if os.environ.get("LLMSEG_CACHE"):
        return Path(os.environ["LLMSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmseg_ros"


TINY_EMBED_SIZE = 112

# Random SAM weights rarely pass the reference score filters, so the tiny profile keeps
# every mask the decoder proposes (up to max_proposals) to exercise the whole pipeline.
TINY_PROPOSALS = ProposalConfig(
    points_per_side=4,
    points_per_batch=64,
    pred_iou_thresh=-1e4,
    stability_score_thresh=0.0,
    box_nms_thresh=0.7,
    max_proposals=20,
)


def _build_trained_weights(directory: Path, seed: int) -> None:
    """Random (untrained) heads + LoRA adapters in the real weights format, for both
    trained methods: ``weights/`` (llmseg) and ``weights_lisa/`` (lisa)."""
    from llmseg_ros.config import LoraSettings
    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.heads import LisaMaskHead, TextProjection
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.models.selector import ProposalSelector
    from llmseg_ros.models.vlm import SegVLM
    from llmseg_ros.weights.directory import WeightsManifest, save_weights

    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    lora = LoraSettings()
    llava_dir, dinov2_dir = directory / "llava", directory / "dinov2"
    vlm = SegVLM.load(str(llava_dir), device=cpu, dtype=torch.float32, lora=lora, trainable=True)
    common: dict[str, Any] = {
        "base_vlm": str(llava_dir),
        "hidden_size": vlm.hidden_size,
        "sam_model_type": "tiny",
        "lora": {
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": list(lora.target_modules),
        },
        "extra": {"profile": "tiny", "seed": seed, "note": "random weights, not trained"},
    }
    embedder = MaskEmbedder.load(str(dinov2_dir), device=cpu, dtype=torch.float32, input_size=TINY_EMBED_SIZE)
    save_weights(
        directory / "weights",
        WeightsManifest(
            method="llmseg",
            dinov2=str(dinov2_dir),
            embed_size=TINY_EMBED_SIZE,
            dinov2_pos_interpolation=embedder.pos_interpolation,
            **common,
        ),
        {
            "projection": TextProjection(vlm.hidden_size),
            "selector": ProposalSelector(),
            "mask_proj": embedder.proj,
        },
        vlm=vlm,
    )
    head = LisaMaskHead(build_sam("tiny", directory / "sam_tiny.pth", cpu), vlm.hidden_size)
    save_weights(
        directory / "weights_lisa",
        WeightsManifest(method="lisa", **common),
        {"projection": head.projection, "mask_decoder": head.mask_decoder},
        vlm=vlm,
    )


def _write_profile(directory: Path, seed: int) -> None:
    from llmseg_ros.tiny.detector import save_tiny_grounding_dino
    from llmseg_ros.tiny.qwen import save_tiny_qwen2_5_vl
    from llmseg_ros.tiny.sam import save_tiny_sam
    from llmseg_ros.tiny.vision import save_tiny_dinov2
    from llmseg_ros.tiny.vlm import save_tiny_llava

    save_tiny_sam(directory / "sam_tiny.pth", seed=seed)
    save_tiny_dinov2(directory / "dinov2", seed=seed)
    save_tiny_llava(directory / "llava", seed=seed)
    save_tiny_qwen2_5_vl(directory / "qwen2_5_vl", seed=seed)
    save_tiny_grounding_dino(directory / "grounding_dino", seed=seed)
    _build_trained_weights(directory, seed)
    with open(directory / MARKER, "w", encoding="utf-8") as fh:
        json.dump({"version": TINY_PROFILE_VERSION, "seed": seed}, fh)


def _profile_is_complete(directory: Path, seed: int) -> bool:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return data == {"version": TINY_PROFILE_VERSION, "seed": seed}


def build_tiny_profile(directory: str | Path, *, method: str = "llmseg", seed: int = 0) -> SegmenterConfig:
    """Create (once) and describe the tiny random models of every method.

    The models are written to a temporary sibling and renamed into ``directory``, so an
    interrupted build is never mistaken for a complete one. Later calls reuse them.

    Args:
        directory: where the tiny models live.
        method: which method the returned config selects.
        seed: random seed of the weights.
    Returns:
        A config whose every path points into ``directory`` (CPU, float32).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    directory = Path(directory).expanduser()
    if not _profile_is_complete(directory, seed):
        with atomic_directory(directory) as tmp:
            _write_profile(tmp, seed)
    vlm_dir = directory / ("qwen2_5_vl" if method in ("vlm_grounding", "vlm_marks") else "llava")
    return SegmenterConfig(
        method=method,
        sam_checkpoint=str(directory / "sam_tiny.pth"),
        sam_model_type="tiny",
        dinov2=str(directory / "dinov2"),
        vlm=str(vlm_dir),
        weights_dir=str(directory / ("weights_lisa" if method == "lisa" else "weights")),
        detector=str(directory / "grounding_dino"),
        device="cpu",
        dtype="float32",
        embed_size=TINY_EMBED_SIZE,
        proposals=TINY_PROPOSALS,
        profile="tiny",
    )
