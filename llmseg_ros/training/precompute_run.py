"""One ``training/precompute.py`` run: its settings, its images, its models, its job.

:func:`run_precompute` loads SAM's everything mode (and DINOv2) on the process's device,
collects the images of the folders and datasets named in a :class:`PrecomputeConfig`,
joins the ``accelerate launch`` / ``torchrun`` job if there is one and fills the cache
with :func:`~llmseg_ros.training.precompute.precompute_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmseg_ros.config import ProposalConfig
from llmseg_ros.training.claims import DEFAULT_LEASE_SECONDS
from llmseg_ros.training.config import SOURCE_KINDS, DataSource
from llmseg_ros.training.precompute import (
    TINY_SAM_IMAGE_SIZE,
    BatchFeatureFn,
    PrecomputeSummary,
    list_images,
    precompute_cache,
)
from llmseg_ros.utils.distributed import World, launched_world, rank_device

if TYPE_CHECKING:
    import torch

    from llmseg_ros.models.embeddings import MaskEmbedder

ENCODER_DTYPES = ("float32", "float16", "bfloat16")

__all__ = [
    "ENCODER_DTYPES",
    "PrecomputeConfig",
    "collect_image_paths",
    "dinov2_batch_features",
    "run_precompute",
]


@dataclass
class PrecomputeConfig:
    """One precompute run (``training/precompute.py``).

    Attributes:
        output_dir: the cache directory (resumed when it exists).
        images: image folders, searched recursively; and/or
        dataset: ``reasonseg`` / ``llmseg40k`` / ``jsonl`` with ``root`` (ReasonSeg
            folder, LLM-Seg40K JSON file, JSONL file), ``splits`` (ReasonSeg) and
            ``image_root`` (LLM-Seg40K images).
        sam_checkpoint / sam_model_type / proposals: the proposal stage.
        features: also cache the frozen DINOv2 patch features (float16; ~8 MiB per image
            for ViT-L at 896); ``dinov2`` / ``embed_size`` name the backbone.
        device / dtype: where the models run; ``dtype`` is DINOv2's. In a job of several
            processes, ``auto`` / ``cuda`` mean each process's own GPU (``LOCAL_RANK``).
        encoder_dtype: SAM's image encoder under CUDA autocast, ``float16`` /
            ``bfloat16`` (CUDA only; faster, masks no longer bit-identical to float32,
            recorded in the manifest), or ``float32``.
        feature_batch_size: images of a shard per DINOv2 forward pass.
        shard_size: images per shard; ``max_shards``: stop after this many in this call
            (per process).
        lease_seconds: a shard claim not renewed for this long belongs to a dead process
            and is taken over.
        profile: ``tiny`` builds a tiny random SAM (64-px encoder input) and DINOv2
            under ``OUTPUT_DIR/tiny_models`` (mechanics only; the proposals are meaningless).
        progress: tqdm progress bar.
    """

    output_dir: str
    images: list[str] = field(default_factory=list)
    dataset: str | None = None
    root: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])
    image_root: str | None = None
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    features: bool = False
    dinov2: str = "facebook/dinov2-large"
    embed_size: int = 896
    device: str = "auto"
    dtype: str = "auto"
    encoder_dtype: str = "float32"
    feature_batch_size: int = 8
    shard_size: int = 32
    max_shards: int | None = None
    profile: str = "custom"
    progress: bool = True
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    def __post_init__(self) -> None:
        if self.dataset is not None and self.dataset not in SOURCE_KINDS:
            raise ValueError(f"dataset must be one of {list(SOURCE_KINDS)} or None, got {self.dataset!r}")
        if self.dataset is not None and not self.root:
            raise ValueError(f"dataset {self.dataset!r} needs root (its folder or file)")
        if self.dataset is None and not self.images:
            raise ValueError("give image folders (images) and/or a dataset (dataset + root)")
        if self.profile not in ("custom", "tiny"):
            raise ValueError(f"profile must be 'custom' or 'tiny', got {self.profile!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.feature_batch_size < 1:
            raise ValueError(f"feature_batch_size must be >= 1, got {self.feature_batch_size}")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(
                f"encoder_dtype must be one of {list(ENCODER_DTYPES)}, got {self.encoder_dtype!r}"
            )
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {self.lease_seconds}")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError(f"max_shards must be >= 1 or None, got {self.max_shards}")
        if self.profile != "tiny" and self.sam_checkpoint is None:
            raise ValueError("sam_checkpoint is required (or use profile 'tiny')")


def collect_image_paths(config: PrecomputeConfig) -> list[Path]:
    """Every image the run covers: the folders' images, then the dataset's (sample order)."""
    from llmseg_ros.training.datamix import dataset_image_paths, open_source

    paths: list[Path] = []
    for folder in config.images:
        paths.extend(list_images(folder))
    if config.dataset is not None:
        assert config.root is not None
        splits = (
            config.splits
            if config.dataset == "reasonseg"
            else [config.splits[0] if config.splits else "train"]
        )
        for split in splits:
            source = DataSource(
                kind=config.dataset, path=config.root, split=split, image_root=config.image_root
            )
            paths.extend(dataset_image_paths(open_source(source)))
    if not paths:
        raise ValueError("no images found for the precompute run")
    return paths


def dinov2_batch_features(embedder: MaskEmbedder, images: Sequence[np.ndarray]) -> torch.Tensor:
    """Frozen DINOv2 patch tokens of several images in one forward pass.

    The batched form of :meth:`~llmseg_ros.models.embeddings.MaskEmbedder.backbone_features`
    (same preprocessing: each image resized and padded to the square input on its own).

    Args:
        embedder: the loaded embedder.
        images: B (H_i, W_i, 3) uint8 RGB images.

    Returns:
        (B, hidden, g, g) in the backbone's dtype, on its device.
    """
    import torch

    with torch.no_grad():
        pixels = torch.stack([embedder.preprocess(image) for image in images])  # (B, 3, S, S)
        dtype = next(embedder.backbone.parameters()).dtype
        tokens = embedder.backbone(
            pixel_values=pixels.to(dtype)
        ).last_hidden_state  # (B, prefix + g*g, hidden)
        g = embedder.grid_size
        patches = tokens[:, -g * g :]  # drop CLS (+ registers), which come first
        return patches.transpose(1, 2).reshape(len(images), embedder.hidden_size, g, g)


def _tiny_models(config: PrecomputeConfig, *, write: bool) -> tuple[str, str, ProposalConfig, str, int]:
    """The tiny profile's SAM (and DINOv2) under ``OUTPUT_DIR/tiny_models``, written when ``write``.

    Returns (sam checkpoint, SAM type, proposal config, DINOv2 folder, embed size).
    """
    from llmseg_ros.tiny import TINY_EMBED_SIZE, TINY_PROPOSALS
    from llmseg_ros.tiny.sam import save_tiny_sam
    from llmseg_ros.tiny.vision import save_tiny_dinov2

    tiny = Path(config.output_dir) / "tiny_models"
    sam_checkpoint, dinov2 = tiny / "sam_tiny.pth", tiny / "dinov2"
    if write:
        save_tiny_sam(sam_checkpoint, image_size=TINY_SAM_IMAGE_SIZE)
        if config.features:
            save_tiny_dinov2(dinov2)
    if config.features:
        return str(sam_checkpoint), "tiny", TINY_PROPOSALS, str(dinov2), TINY_EMBED_SIZE
    return str(sam_checkpoint), "tiny", TINY_PROPOSALS, config.dinov2, config.embed_size


def run_precompute(config: PrecomputeConfig) -> PrecomputeSummary:
    """Load the proposal stage (and DINOv2) and fill the cache for ``config``.

    Run by every process of an ``accelerate launch`` / ``torchrun`` job, it joins the
    job (:func:`~llmseg_ros.utils.distributed.launched_world`), loads the models on the
    process's own device and shares the shards with the other processes.
    """
    with launched_world() as world:
        return _run(config, world)


def _run(config: PrecomputeConfig, world: World) -> PrecomputeSummary:
    from llmseg_ros.models.proposals import ProposalGenerator
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.utils.device import resolve_device, resolve_dtype

    paths = collect_image_paths(config)
    sam_checkpoint: str | None = config.sam_checkpoint
    sam_type, proposal_config = config.sam_model_type, config.proposals
    dinov2, embed_size = config.dinov2, config.embed_size
    if config.profile == "tiny":
        tiny = _tiny_models(config, write=world.is_main)  # written once, then read by every process
        world.barrier()
        sam_checkpoint, sam_type, proposal_config, dinov2, embed_size = tiny
    device = resolve_device(rank_device(config.device, world))
    sam = build_sam(sam_type, sam_checkpoint, device)
    encoder_dtype = None if config.encoder_dtype == "float32" else config.encoder_dtype
    generator = ProposalGenerator.from_config(sam, proposal_config, encoder_dtype=encoder_dtype)
    features: BatchFeatureFn | None = None
    pos_interpolation = "hub"
    if config.features:
        import torch

        from llmseg_ros.models.embeddings import MaskEmbedder

        embedder = MaskEmbedder.load(
            dinov2, device=device, dtype=resolve_dtype(config.dtype, device), input_size=embed_size
        )

        pos_interpolation = embedder.pos_interpolation

        def features(images: Sequence[np.ndarray]) -> np.ndarray:
            return dinov2_batch_features(embedder, images).to(torch.float16).cpu().numpy()

    settings = {
        **asdict(proposal_config),
        "sam_model_type": sam_type,
        "sam_checkpoint": Path(str(sam_checkpoint)).name,
    }
    if encoder_dtype is not None:  # masks differ from float32's (absent: float32, as before the option)
        settings["encoder_dtype"] = encoder_dtype
    return precompute_cache(
        paths,
        config.output_dir,
        generator.generate,
        batch_features=features,
        feature_batch_size=config.feature_batch_size,
        feature_model=dinov2,
        feature_input_size=embed_size,
        feature_pos_interpolation=pos_interpolation,
        shard_size=config.shard_size,
        proposal_settings=settings,
        progress=config.progress,
        max_shards=config.max_shards,
        world=world,
        lease_seconds=config.lease_seconds,
    )
