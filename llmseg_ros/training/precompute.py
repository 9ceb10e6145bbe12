"""Run the proposal stage (and optionally the frozen DINOv2 backbone) over images into a cache.

The run is planned once (the de-duplicated image list, split into shards of
``shard_size`` images, stored in ``cache.json``) and then works shard by shard; a finished
shard is never recomputed, so a crashed or killed run restarts where it stopped. See
:mod:`llmseg_ros.training.cache` for the layout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.config import ProposalConfig
from llmseg_ros.data.io import atomic_write_json, read_rgb
from llmseg_ros.training.cache import (
    MANIFEST_NAME,
    SUMMARY_NAME,
    CacheManifest,
    FeatureSpec,
    encode_record,
    image_key,
    shard_is_finished,
    write_shard,
)
from llmseg_ros.training.config import SOURCE_KINDS, DataSource
from llmseg_ros.types import Proposals

TINY_SAM_IMAGE_SIZE = 64
"""Encoder input side of the tiny SAM of the training scripts' tiny profile (seconds on a CPU)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

ProposalFn = Callable[[np.ndarray], Proposals]
"""(H, W, 3) uint8 RGB → proposals at (H, W)."""
FeatureFn = Callable[[np.ndarray], np.ndarray]
"""(H, W, 3) uint8 RGB → (C, g, g) backbone features (any float dtype; stored float16)."""


@dataclass
class PrecomputeSummary:
    """What a precompute run did.

    Attributes:
        images: images planned in the cache.
        computed: images processed by this run (the rest were in finished shards).
        shards: shards planned; ``shards_skipped`` of them were already finished.
        proposals_per_image: mean K over the images processed by this run (0 if none).
        min_proposals / max_proposals: range of K over those images.
        seconds_per_image: mean wall time per processed image (read + proposals +
            features + encoding), seconds.
        proposal_seconds_per_image: mean time of the proposal stage alone, seconds.
        total_seconds: wall time of this run, seconds.
    """

    images: int
    computed: int
    shards: int
    shards_skipped: int
    proposals_per_image: float
    min_proposals: int
    max_proposals: int
    seconds_per_image: float
    proposal_seconds_per_image: float
    total_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """One human-readable paragraph."""
        return (
            f"{self.images} images in {self.shards} shards ({self.shards_skipped} already done); "
            f"processed {self.computed} images this run: {self.proposals_per_image:.1f} proposals per image "
            f"(min {self.min_proposals}, max {self.max_proposals}), {self.seconds_per_image:.3f} s per image "
            f"({self.proposal_seconds_per_image:.3f} s proposals), {self.total_seconds:.1f} s total"
        )


def list_images(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by extension, case-insensitive), sorted by path.

    Raises:
        ValueError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} is not a directory")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def plan_items(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(key, path) per distinct image, in the order given; duplicates (same bytes) are dropped."""
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in paths:
        key = image_key(path)
        if key not in seen:
            seen.add(key)
            items.append((key, str(path)))
    return items


def _load_or_create_manifest(
    directory: Path,
    items: list[tuple[str, str]],
    shard_size: int,
    proposals: dict[str, Any],
    spec: Callable[[], FeatureSpec] | None,
) -> CacheManifest:
    """The manifest of ``directory``: created for a new cache, checked against the inputs on resume."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        manifest = CacheManifest(
            items=items, shard_size=shard_size, proposals=proposals, features=None if spec is None else spec()
        )
        atomic_write_json(path, manifest.to_dict())
        return manifest
    manifest = CacheManifest.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    problems = []
    if [k for k, _ in manifest.items] != [k for k, _ in items]:
        problems.append(f"a different image list ({len(manifest.items)} planned, {len(items)} given)")
    if manifest.shard_size != shard_size:
        problems.append(f"shard_size {manifest.shard_size} (asked for {shard_size})")
    if (manifest.features is not None) != (spec is not None):
        problems.append(f"features={manifest.features is not None} (asked for {spec is not None})")
    if manifest.proposals != proposals:
        problems.append(f"proposal settings {manifest.proposals} (asked for {proposals})")
    if problems:
        raise ValueError(
            f"the cache at {directory} was planned with " + "; ".join(problems) + ". "
            "Resume with the same inputs and settings, or write to a new directory."
        )
    return manifest


def _features_array(features: FeatureFn, image: np.ndarray) -> np.ndarray:
    array = np.asarray(features(image), dtype=np.float16)
    if array.ndim != 3:
        raise ValueError(f"backbone features must be (C, g, g), got shape {array.shape}")
    return array


def precompute_cache(
    paths: Sequence[str | Path],
    output_dir: str | Path,
    generate: ProposalFn,
    *,
    features: FeatureFn | None = None,
    feature_model: str = "",
    feature_input_size: int = 0,
    shard_size: int = 32,
    proposal_settings: dict[str, Any] | None = None,
    progress: bool = True,
    max_shards: int | None = None,
) -> PrecomputeSummary:
    """Fill (or finish) a proposal cache for ``paths``.

    Args:
        paths: image files; duplicates (same bytes) are cached once.
        output_dir: cache directory, created if missing; an existing cache is resumed
            (it must have been planned with the same images and settings).
        generate: the proposal stage (for instance ``ProposalGenerator.generate``).
        features: optional backbone (``MaskEmbedder.backbone_features`` moved to numpy).
        feature_model / feature_input_size: recorded in the manifest with the features.
        shard_size: images per shard.
        proposal_settings: JSON-safe description of the proposal stage, stored in the
            manifest and checked on resume.
        progress: show a tqdm progress bar over images.
        max_shards: stop after writing this many shards in this call (for tests and
            time-limited jobs); ``None`` = all.

    Returns:
        The summary, also written to ``summary.json`` when every shard is finished.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not paths:
        raise ValueError("no images to precompute (the path list is empty)")
    if features is not None and (not feature_model or feature_input_size < 1):
        raise ValueError("feature_model and a positive feature_input_size are required with features")
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    settings = dict(proposal_settings or {})
    items = plan_items(paths)
    feature_fn = features

    def probe_spec() -> FeatureSpec:
        # The feature shape is fixed by the backbone (square padded input); probe one image.
        assert feature_fn is not None
        channels, height, width = _features_array(feature_fn, read_rgb(items[0][1])).shape
        return FeatureSpec(
            model=feature_model, input_size=feature_input_size, shape=(channels, height, width)
        )

    manifest = _load_or_create_manifest(
        directory, items, shard_size, settings, None if features is None else probe_spec
    )
    if manifest.features is not None and (
        manifest.features.model != feature_model or manifest.features.input_size != feature_input_size
    ):
        raise ValueError(
            f"the cache at {directory} holds features of {manifest.features.model!r} at "
            f"{manifest.features.input_size} px, asked for {feature_model!r} at {feature_input_size} px"
        )
    with_features = features is not None
    todo = [s for s in range(manifest.num_shards) if not shard_is_finished(directory, s, with_features)]
    skipped = manifest.num_shards - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]

    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(manifest.shard_items(s)) for s in todo),
        desc="proposals",
        unit="img",
        disable=not progress,
    )
    start = time.perf_counter()
    counts: list[int] = []
    image_seconds: list[float] = []
    proposal_seconds: list[float] = []
    try:
        for shard in todo:
            records: list[dict[str, Any]] = []
            shard_features: list[np.ndarray] | None = [] if with_features else None
            for key, name in manifest.shard_items(shard):
                t0 = time.perf_counter()
                image = read_rgb(name)
                t1 = time.perf_counter()
                proposals = generate(image)
                t2 = time.perf_counter()
                if proposals.image_size != image.shape[:2]:
                    raise ValueError(
                        f"proposal stage returned masks of size {proposals.image_size} for image {name} of "
                        f"size {image.shape[:2]}; masks must be at the image's resolution"
                    )
                records.append(encode_record(key, name, proposals, t2 - t1))
                if features is not None and shard_features is not None and manifest.features is not None:
                    array = _features_array(features, image)
                    if array.shape != manifest.features.shape:
                        raise ValueError(
                            f"backbone features of image {name} have shape {array.shape}, the cache's are "
                            f"{manifest.features.shape}"
                        )
                    shard_features.append(array)
                counts.append(len(proposals))
                proposal_seconds.append(t2 - t1)
                image_seconds.append(time.perf_counter() - t0)
                bar.update(1)
            write_shard(directory, shard, records, shard_features)
    finally:
        bar.close()
    summary = PrecomputeSummary(
        images=len(manifest.items),
        computed=len(counts),
        shards=manifest.num_shards,
        shards_skipped=skipped,
        proposals_per_image=float(np.mean(counts)) if counts else 0.0,
        min_proposals=int(min(counts)) if counts else 0,
        max_proposals=int(max(counts)) if counts else 0,
        seconds_per_image=float(np.mean(image_seconds)) if image_seconds else 0.0,
        proposal_seconds_per_image=float(np.mean(proposal_seconds)) if proposal_seconds else 0.0,
        total_seconds=time.perf_counter() - start,
    )
    if all(shard_is_finished(directory, s, with_features) for s in range(manifest.num_shards)):
        atomic_write_json(directory / SUMMARY_NAME, summary.to_dict())
    return summary


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
        device / dtype: where the models run; ``dtype`` is DINOv2's (SAM runs float32).
        shard_size: images per shard; ``max_shards``: stop after this many in this call.
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
    shard_size: int = 32
    max_shards: int | None = None
    profile: str = "custom"
    progress: bool = True

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


def run_precompute(config: PrecomputeConfig) -> PrecomputeSummary:
    """Load the proposal stage (and DINOv2) and fill the cache for ``config``."""
    import torch

    from llmseg_ros.models.proposals import ProposalGenerator
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.utils.device import resolve_device, resolve_dtype

    paths = collect_image_paths(config)
    sam_checkpoint, sam_type, proposal_config = config.sam_checkpoint, config.sam_model_type, config.proposals
    dinov2, embed_size = config.dinov2, config.embed_size
    if config.profile == "tiny":
        from llmseg_ros.tiny import TINY_EMBED_SIZE, TINY_PROPOSALS
        from llmseg_ros.tiny.sam import save_tiny_sam
        from llmseg_ros.tiny.vision import save_tiny_dinov2

        tiny = Path(config.output_dir) / "tiny_models"
        sam_checkpoint = str(save_tiny_sam(tiny / "sam_tiny.pth", image_size=TINY_SAM_IMAGE_SIZE))
        sam_type, proposal_config = "tiny", TINY_PROPOSALS
        if config.features:
            dinov2, embed_size = str(save_tiny_dinov2(tiny / "dinov2")), TINY_EMBED_SIZE
    device = resolve_device(config.device)
    sam = build_sam(sam_type, sam_checkpoint, device)
    generator = ProposalGenerator.from_config(sam, proposal_config)
    features: FeatureFn | None = None
    if config.features:
        from llmseg_ros.models.embeddings import MaskEmbedder

        embedder = MaskEmbedder.load(
            dinov2, device=device, dtype=resolve_dtype(config.dtype, device), input_size=embed_size
        )

        def features(image: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return embedder.backbone_features(image).to(torch.float16).cpu().numpy()

    settings = {
        **asdict(proposal_config),
        "sam_model_type": sam_type,
        "sam_checkpoint": Path(str(sam_checkpoint)).name,
    }
    return precompute_cache(
        paths,
        config.output_dir,
        generator.generate,
        features=features,
        feature_model=dinov2,
        feature_input_size=embed_size,
        shard_size=config.shard_size,
        proposal_settings=settings,
        progress=config.progress,
        max_shards=config.max_shards,
    )
