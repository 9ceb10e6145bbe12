"""Proposal cache: exact round trip, sharding, crash-safe resume, the real proposal stage, the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from precompute_testing import REPO, fake_features, fake_proposals, fill_fake, write_images

from llmseg_ros.data.io import read_rgb, write_image
from llmseg_ros.training.cache import (
    MANIFEST_NAME,
    CacheManifest,
    CacheSet,
    ProposalCache,
    decode_record,
    encode_record,
    image_key,
    shard_path,
)
from llmseg_ros.training.precompute import plan_items, precompute_cache
from llmseg_ros.training.precompute_run import PrecomputeConfig, collect_image_paths
from llmseg_ros.types import Proposals


def assert_same_proposals(a: Proposals, b: Proposals) -> None:
    np.testing.assert_array_equal(a.masks, b.masks)
    for name in ("predicted_iou", "stability_score", "boxes", "point_coords"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(b, name).dtype == np.float32


def test_record_round_trip_is_exact() -> None:
    rng = np.random.default_rng(1)
    proposals = Proposals(
        masks=rng.random((3, 7, 9)) > 0.5,
        predicted_iou=rng.random(3).astype(np.float32),
        stability_score=rng.random(3).astype(np.float32),
        boxes=(rng.random((3, 4)) * 9).astype(np.float32),
        point_coords=(rng.random((3, 2)) * 7).astype(np.float32),
    )
    record = json.loads(json.dumps(encode_record("k", "name.png", proposals, 0.25)))
    assert record["masks"][0]["size"] == [7, 9]
    assert_same_proposals(proposals, decode_record(record))
    empty = decode_record(encode_record("e", "e.png", Proposals.empty(5, 6), 0.0))
    assert empty.masks.shape == (0, 5, 6)


def test_cache_round_trip_shards_dedup_and_summary(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 5, duplicate_of=1)
    out = tmp_path / "cache"
    summary = fill_fake(paths, out, shard_size=2)
    assert summary.images == 5  # the copy has the same bytes: cached once
    assert (summary.computed, summary.shards, summary.shards_skipped) == (5, 3, 0)
    counts = [len(fake_proposals(read_rgb(p))) for p in paths[:5]]
    assert summary.proposals_per_image == pytest.approx(np.mean(counts))
    assert (summary.min_proposals, summary.max_proposals) == (min(counts), max(counts))
    assert summary.seconds_per_image > 0
    assert json.loads((out / "summary.json").read_text())["images"] == 5
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "00000.jsonl",
        "00000.npz",
        "00001.jsonl",
        "00001.npz",
        "00002.jsonl",
        "00002.npz",
    ]

    cache = ProposalCache(out)
    assert cache.is_complete and len(cache) == 5 and cache.has_features
    assert cache.manifest.features is not None and cache.manifest.features.shape == (4, 2, 2)
    for path in paths:
        frame = cache.lookup(path)
        image = read_rgb(path)
        assert frame.key == image_key(path)
        assert_same_proposals(fake_proposals(image), frame.proposals)
        assert frame.features is not None and frame.features.dtype == np.float16
        np.testing.assert_array_equal(frame.features, fake_features(image).astype(np.float16))
    assert cache.lookup(paths[0], with_features=False).features is None
    assert cache.lookup(paths[-1]).name == str(paths[1])  # the duplicate resolves to the first copy


class Crash(RuntimeError):
    pass


def test_crash_leaves_no_partial_shard_and_resume_finishes_the_rest(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 7)
    out = tmp_path / "cache"
    calls: list[int] = []

    def crashing(image: np.ndarray) -> Proposals:
        calls.append(1)
        if len(calls) == 4:  # dies on the 2nd image of shard 1
            raise Crash("simulated crash")
        return fake_proposals(image)

    with pytest.raises(Crash):
        precompute_cache(paths, out, crashing, shard_size=3, progress=False)
    assert shard_path(out, 0, ".jsonl").is_file()
    assert not shard_path(out, 1, ".jsonl").exists()
    assert not list((out / "shards").glob(".*"))  # no temporary files left behind
    assert not (out / "summary.json").exists()
    partial = ProposalCache(out)
    assert len(partial) == 3 and not partial.is_complete
    with pytest.raises(KeyError, match="not in the proposal cache"):
        partial.lookup(paths[4])

    resumed: list[int] = []

    def counting(image: np.ndarray) -> Proposals:
        resumed.append(1)
        return fake_proposals(image)

    summary = precompute_cache(paths, out, counting, shard_size=3, progress=False)
    assert len(resumed) == 4 and summary.computed == 4 and summary.shards_skipped == 1

    reference = tmp_path / "reference"
    precompute_cache(paths, reference, fake_proposals, shard_size=3, progress=False)
    for shard in range(3):
        assert shard_path(out, shard, ".jsonl").read_bytes().count(b"\n") == shard_path(
            reference, shard, ".jsonl"
        ).read_bytes().count(b"\n")
    a, b = ProposalCache(out), ProposalCache(reference)
    for key in b:
        assert_same_proposals(b.get(key).proposals, a.get(key).proposals)


def test_max_shards_and_resume_checks(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 4)
    out = tmp_path / "cache"
    first = precompute_cache(paths, out, fake_proposals, shard_size=2, progress=False, max_shards=1)
    assert (first.computed, first.shards) == (2, 2)
    assert len(ProposalCache(out)) == 2
    with pytest.raises(ValueError, match="different image list"):
        precompute_cache(paths[:3], out, fake_proposals, shard_size=2, progress=False)
    with pytest.raises(ValueError, match="shard_size 2"):
        precompute_cache(paths, out, fake_proposals, shard_size=3, progress=False)
    with pytest.raises(ValueError, match="features=False"):
        precompute_cache(
            paths,
            out,
            fake_proposals,
            features=fake_features,
            feature_model="f",
            feature_input_size=1,
            shard_size=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="proposal settings"):
        precompute_cache(paths, out, fake_proposals, shard_size=2, progress=False, proposal_settings={"x": 1})
    second = precompute_cache(paths, out, fake_proposals, shard_size=2, progress=False)
    assert (second.computed, second.shards_skipped) == (2, 1)
    assert ProposalCache(out).is_complete


def test_bad_inputs_and_corrupt_shard(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 2)
    with pytest.raises(ValueError, match="path list is empty"):
        precompute_cache([], tmp_path / "c0", fake_proposals)
    with pytest.raises(ValueError, match="cannot read image file"):
        plan_items([tmp_path / "missing.png"])

    def wrong_size(image: np.ndarray) -> Proposals:
        return Proposals.empty(image.shape[0] + 1, image.shape[1])

    with pytest.raises(ValueError, match="must be at the image's resolution"):
        precompute_cache(paths, tmp_path / "c1", wrong_size, progress=False)
    with pytest.raises(FileNotFoundError, match="no proposal cache"):
        ProposalCache(tmp_path / "nothing")

    out = tmp_path / "c2"
    precompute_cache(paths, out, fake_proposals, shard_size=2, progress=False)
    shard = shard_path(out, 0, ".jsonl")
    shard.write_text(shard.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="has 1 records, expected 2"):
        ProposalCache(out).lookup(paths[0])


def test_cache_set_searches_every_cache(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 3)
    precompute_cache(paths[:2], tmp_path / "a", fake_proposals, progress=False)
    precompute_cache(paths[2:], tmp_path / "b", fake_proposals, progress=False)
    caches = CacheSet([ProposalCache(tmp_path / "a"), ProposalCache(tmp_path / "b")])
    assert caches.lookup(paths[2]).key == image_key(paths[2])
    other = write_image(tmp_path / "other.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(KeyError, match="in none of the proposal caches"):
        caches.lookup(other)


def test_dataset_inputs_and_config_validation(tmp_path: Path) -> None:
    from llmseg_ros.data.synthetic import write_synthetic_dataset

    files = write_synthetic_dataset(tmp_path / "syn", {"train": 3}, questions=2)
    config = PrecomputeConfig(
        output_dir=str(tmp_path / "c"), dataset="jsonl", root=str(files["train"]), profile="tiny"
    )
    paths = collect_image_paths(config)
    assert len(paths) == 6 and len(plan_items(paths)) == 3  # two questions per scene, one image
    reason = PrecomputeConfig(
        output_dir=str(tmp_path / "c"),
        dataset="reasonseg",
        root=str(tmp_path / "syn" / "reasonseg"),
        profile="tiny",
    )
    assert len(collect_image_paths(reason)) == 6  # ReasonSeg layout: one JPEG per question
    with pytest.raises(ValueError, match="give image folders"):
        PrecomputeConfig(output_dir="x", profile="tiny")
    with pytest.raises(ValueError, match="sam_checkpoint is required"):
        PrecomputeConfig(output_dir="x", images=["y"])
    with pytest.raises(ValueError, match="needs root"):
        PrecomputeConfig(output_dir="x", dataset="jsonl", profile="tiny")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"training_{name}", REPO / "training" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_with_the_real_tiny_proposal_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """training/precompute.py --profile tiny: tiny SAM + tiny DINOv2 through the real loaders."""
    import torch

    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.proposals import ProposalGenerator
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.tiny import TINY_EMBED_SIZE, TINY_PROPOSALS

    folder = tmp_path / "images"
    write_image(folder / "a.png", np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    write_image(
        folder / "sub" / "b.jpg", np.random.default_rng(4).integers(0, 256, (48, 32, 3), dtype=np.uint8)
    )
    out = tmp_path / "cache"
    script = _load_script("precompute")
    argv = (
        f"--images {folder} --out {out} --profile tiny --features --device cpu --shard-size 1 --no-progress"
    )
    summary = script.main(argv.split())
    assert summary.images == 2 and summary.shards == 2
    assert "2 images in 2 shards" in capsys.readouterr().out

    cache = ProposalCache(out)
    sam = build_sam("tiny", out / "tiny_models" / "sam_tiny.pth", "cpu")
    generator = ProposalGenerator.from_config(sam, TINY_PROPOSALS)
    embedder = MaskEmbedder.load(str(out / "tiny_models" / "dinov2"), input_size=TINY_EMBED_SIZE)
    for path in (folder / "a.png", folder / "sub" / "b.jpg"):
        image = read_rgb(path)
        frame = cache.lookup(path)
        assert_same_proposals(generator.generate(image), frame.proposals)
        with torch.no_grad():
            expected = embedder.backbone_features(image).to(torch.float16).numpy()
        assert frame.features is not None
        np.testing.assert_array_equal(frame.features, expected)
    assert cache.manifest.proposals["sam_model_type"] == "tiny"
    assert cache.manifest.proposals["max_proposals"] == TINY_PROPOSALS.max_proposals
    again = script.main(argv.split())
    assert again.computed == 0 and again.shards_skipped == 2


def test_features_record_their_position_embedding_resampling(tmp_path: Path) -> None:
    """A cache's features say how DINOv2's position embeddings were resampled; features made
    another way are refused on resume, and a cache.json from before the choice reads as
    ``transformers`` (what every backbone used then)."""
    paths = write_images(tmp_path / "images", 2)
    out = tmp_path / "cache"
    common = dict(
        features=fake_features, feature_model="f", feature_input_size=1, shard_size=2, progress=False
    )
    precompute_cache(paths, out, fake_proposals, feature_pos_interpolation="transformers", **common)
    assert ProposalCache(out).manifest.features.pos_interpolation == "transformers"
    with pytest.raises(
        ValueError, match=r"position embeddings: transformers\), asked for 'f' at 1 px \(hub\)"
    ):
        precompute_cache(paths, out, fake_proposals, **common)  # the default: hub

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["features"]["pos_interpolation"]
    assert CacheManifest.from_dict(manifest).features.pos_interpolation == "transformers"
    manifest["features"]["pos_interpolation"] = "bilinear"
    with pytest.raises(ValueError, match=r"pos_interpolation must be one of \['hub', 'transformers'\]"):
        CacheManifest.from_dict(manifest)


def test_training_refuses_features_made_with_another_resampling(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from llmseg_ros.training.trainer import Trainer

    paths = write_images(tmp_path / "images", 2)
    out = tmp_path / "cache"
    precompute_cache(
        paths,
        out,
        fake_proposals,
        features=fake_features,
        feature_model="f",
        feature_input_size=1,
        feature_pos_interpolation="transformers",
        shard_size=2,
        progress=False,
    )
    shape = ProposalCache(out).manifest.features.shape
    trainer = SimpleNamespace(
        config=SimpleNamespace(sources=[SimpleNamespace(name="s")], embed_size=1, dinov2="f"),
        mix=SimpleNamespace(caches=[CacheSet([ProposalCache(out)])]),
    )

    def modules(pos_interpolation: str) -> SimpleNamespace:
        embedder = SimpleNamespace(
            hidden_size=shape[0], grid_size=shape[1], pos_interpolation=pos_interpolation
        )
        return SimpleNamespace(embedder=embedder)

    Trainer._check_feature_caches(trainer, modules("transformers"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'transformers' position-embedding resampling, but training"):
        Trainer._check_feature_caches(trainer, modules("hub"))  # type: ignore[arg-type]
