"""Shared set-up of the training tests: tiny base models, synthetic scenes and an oracle cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from llmseg_ros.data.jsonl import read_jsonl_records
from llmseg_ros.data.sample import Sample
from llmseg_ros.data.synthetic import SyntheticConfig, generate_split, write_synthetic_dataset
from llmseg_ros.methods.llmseg import LLMSegMethod
from llmseg_ros.tiny import TINY_EMBED_SIZE, TINY_PROPOSALS
from llmseg_ros.training.cache import ProposalCache
from llmseg_ros.training.config import DataSource, TrainConfig
from llmseg_ros.training.modules import build_tiny_models
from llmseg_ros.training.oracle import OracleProposals, pixel_key
from llmseg_ros.training.precompute import precompute_cache
from llmseg_ros.types import Proposals

SYNTHETIC = SyntheticConfig(image_size=64, min_objects=2, max_objects=3, families=("colour", "shape"))


def build_setup(root: Path, splits: dict[str, int], *, questions: int = 1) -> dict[str, object]:
    """Tiny models in ``root/models``; synthetic scenes per split (JSONL + ReasonSeg layout,
    ``questions`` per scene) with an oracle proposal cache with features per split."""
    from llmseg_ros.models.embeddings import MaskEmbedder

    models = build_tiny_models(root / "models")
    files = write_synthetic_dataset(root / "data", splits, seed=1, config=SYNTHETIC, questions=questions)
    embedder = MaskEmbedder.load(models["dinov2"], input_size=TINY_EMBED_SIZE)
    setup: dict[str, object] = {"root": root, "models": models, "data": root / "data"}
    for split, count in splits.items():
        scenes = generate_split(split, count, seed=1, config=SYNTHETIC, questions=questions)
        paths = sorted({str(r.image_path) for r in read_jsonl_records(files[split])})
        precompute_cache(
            paths,
            root / f"cache_{split}",
            OracleProposals(scenes),
            features=lambda image: embedder.backbone_features(image).numpy(),
            feature_model=models["dinov2"],
            feature_input_size=TINY_EMBED_SIZE,
            progress=False,
        )
        setup[split] = str(files[split])
        setup[f"cache_{split}"] = str(root / f"cache_{split}")
    # the fixture keys of the older tests
    setup["cache"] = setup.get("cache_train")
    return setup


def make_config(setup: dict[str, object], output: Path, **changes: object) -> TrainConfig:
    """A 4-step CPU run on the training split (one question per draw unless changed)."""
    models = setup["models"]
    assert isinstance(models, dict)
    base = TrainConfig(
        sources=[
            DataSource(
                kind="jsonl",
                path=str(setup["train"]),
                cache=str(setup["cache_train"]),
                name="synthetic",
                questions=1,
            )
        ],
        vlm=models["vlm"],
        dinov2=models["dinov2"],
        embed_size=TINY_EMBED_SIZE,
        sam_checkpoint=models["sam_checkpoint"],
        sam_model_type="tiny",
        proposals=TINY_PROPOSALS,
        lr=1e-3,
        warmup_steps=1,
        max_steps=4,
        grad_accum=2,
        checkpoint_every=2,
        log_every=1,
        output_dir=str(output),
        device="cpu",
        seed=3,
    )
    return dataclasses.replace(base, **changes)


class CachedProposals:
    """A proposal "generator" for the inference method: the cached proposals of known images."""

    def __init__(self, cache: ProposalCache, samples: list[Sample]) -> None:
        self._by_pixels = {}
        for sample in samples:
            assert sample.image_path is not None
            self._by_pixels[pixel_key(sample.image)] = cache.lookup(
                sample.image_path, with_features=False
            ).proposals

    def generate(self, image: np.ndarray) -> Proposals:
        return self._by_pixels[pixel_key(image)]

    def generate_with_encoding(self, image: np.ndarray) -> tuple[Proposals, None]:
        """The cached proposals; no SAM encoding (the cache keeps none)."""
        return self.generate(image), None


def method_from_weights(
    weights_dir: Path, models: dict[str, str], generator: CachedProposals, embed_size: int = TINY_EMBED_SIZE
) -> LLMSegMethod:
    """The inference method (LLMSegMethod) on exported weights, as the pipeline builds it."""
    from llmseg_ros.config import SegmenterConfig
    from llmseg_ros.models.components import Components
    from llmseg_ros.models.heads import TextProjection
    from llmseg_ros.models.selector import ProposalSelector

    components = Components(
        SegmenterConfig(
            sam_checkpoint=models["sam_checkpoint"],
            sam_model_type="tiny",
            dinov2=models["dinov2"],
            vlm=models["vlm"],
            weights_dir=str(weights_dir),
            device="cpu",
            dtype="float32",
            embed_size=embed_size,
        )
    )
    weights = components.trained_weights()
    projection = TextProjection(weights.manifest.hidden_size)
    projection.load_state_dict(weights.state_dicts["projection"])
    selector = ProposalSelector()
    selector.load_state_dict(weights.state_dicts["selector"])
    return LLMSegMethod(generator, components.mask_embedder(), components.seg_vlm(), projection, selector)  # type: ignore[arg-type]
