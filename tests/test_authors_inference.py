"""Inference as the LLM-Seg authors ran it, when the weights' manifest says so: SAM's input
truncated (not rounded) when downscaling, proposals pooled at SAM's resolution, the
teacher-forced answer of the weights' prompt format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from llmseg_ros.config import ProposalConfig
from llmseg_ros.models.proposals import (
    ProposalGenerator,
    downscaled_shape,
    masks_at_sam_resolution,
    resize_masks_nearest,
)


def _authors_shape(h: int, w: int, long_side: int = 1024) -> tuple[int, int]:
    """prepare_datasets/prepare_ReasonSeg.py preprocess_images."""
    if max(w, h) > long_side:
        scale = long_side / max(w, h)
        return int(h * scale), int(w * scale)
    return h, w


@pytest.mark.parametrize(
    "size", [(1500, 2000), (3024, 4032), (1080, 1920), (2249, 3000), (1000, 1001), (700, 800)]
)
def test_truncated_downscale_is_the_authors(size: tuple[int, int]) -> None:
    h, w = size
    assert downscaled_shape(h, w, 1024, "truncate") == _authors_shape(h, w)
    rounded = downscaled_shape(h, w, 1024)
    assert max(rounded) == min(1024, max(h, w))  # SAM's rounding always fills the long side


def test_truncation_and_rounding_differ_on_most_large_sizes() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1025, 5000, size=(400, 2))
    differ = sum(
        downscaled_shape(int(h), int(w), 1024, "truncate") != downscaled_shape(int(h), int(w), 1024)
        for h, w in sizes
    )
    assert differ > 100  # the issue measured 58 %


def test_generator_runs_sam_on_the_truncated_image(tiny_profile_dir: Path) -> None:
    """With downscale_rounding="truncate" the proposals are SAM's masks of the authors' input."""
    from segment_anything import SamAutomaticMaskGenerator

    from llmseg_ros.models.sam import build_sam

    sam = build_sam("tiny", tiny_profile_dir / "sam_tiny.pth")
    image = np.random.default_rng(1).integers(0, 256, (150, 209, 3), dtype=np.uint8)
    kwargs = {"points_per_side": 4, "pred_iou_thresh": -1e4, "stability_score_thresh": 0.0}
    generator = ProposalGenerator(
        sam, max_long_side=100, implementation="reference", downscale_rounding="truncate", **kwargs
    )
    assert generator.sam_input_shape(150, 209) == (71, 100)  # rounding gives (72, 100)
    proposals = generator.generate(image)
    small = cv2.resize(image, (100, 71), interpolation=cv2.INTER_AREA)
    records = sorted(
        SamAutomaticMaskGenerator(sam, **kwargs).generate(small), key=lambda r: r["area"], reverse=True
    )
    expected = np.stack([r["segmentation"] for r in records[: generator.config.max_proposals]])
    np.testing.assert_array_equal(masks_at_sam_resolution(proposals.masks, (71, 100)), expected)
    with pytest.raises(ValueError, match="downscale_rounding must be one of"):
        ProposalGenerator(sam, downscale_rounding="floor")


@pytest.mark.parametrize(
    "sizes",
    [((71, 100), (150, 209)), ((768, 1024), (1536, 2048)), ((1023, 767), (3000, 2249)), ((5, 7), (5, 7))],
)
def test_sam_resolution_masks_invert_the_nearest_upscaling(sizes) -> None:
    small, large = sizes
    masks = np.random.default_rng(2).random((3, *small)) > 0.5
    np.testing.assert_array_equal(masks_at_sam_resolution(resize_masks_nearest(masks, large), small), masks)


def test_llmseg_pools_where_the_manifest_says(tiny_config_factory, tmp_path: Path) -> None:
    """mask_pooling "sam": the mask embeddings are pooled from SAM's own masks, not their upscaled copies."""
    from llmseg_ros.pipeline import ReasonSegmenter
    from llmseg_ros.weights.directory import MANIFEST_NAME

    proposals = ProposalConfig(
        points_per_side=4,
        pred_iou_thresh=-1e4,
        stability_score_thresh=0.0,
        max_proposals=20,
        max_long_side=100,
    )
    config = tiny_config_factory("llmseg").replace(proposals=proposals)
    authors = tmp_path / "weights"
    shutil.copytree(config.weights_dir, authors)
    manifest = json.loads((authors / MANIFEST_NAME).read_text())
    manifest.update(mask_pooling="sam", sam_downscale="truncate")
    (authors / MANIFEST_NAME).write_text(json.dumps(manifest))
    image = np.random.default_rng(3).integers(0, 256, (150, 209, 3), dtype=np.uint8)

    theirs = ReasonSegmenter(config.replace(weights_dir=str(authors)))
    method = theirs.method
    assert method.mask_pooling == "sam" and method.proposal_generator.downscale_rounding == "truncate"  # type: ignore[attr-defined]
    frame = theirs.prepare(image)
    small = masks_at_sam_resolution(frame.proposals.masks, (71, 100))
    with torch.inference_mode():
        expected = method.mask_embedder(image, small)  # type: ignore[attr-defined]
        at_input = method.mask_embedder(image, frame.proposals.masks)  # type: ignore[attr-defined]
    torch.testing.assert_close(frame.mask_embeddings, expected)
    assert not torch.allclose(
        frame.mask_embeddings, at_input, atol=1e-4
    )  # pooling at the frame's size differs


def test_the_manifest_answer_is_the_teacher_forced_one(tiny_config_factory, tmp_path: Path) -> None:
    """Every weights directory is queried with the answer it was trained with (manifest "prompt")."""
    from llmseg_ros.pipeline import ReasonSegmenter
    from llmseg_ros.weights.directory import MANIFEST_NAME

    config = tiny_config_factory("llmseg")
    other = tmp_path / "weights"
    shutil.copytree(config.weights_dir, other)
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["prompt"] = {
        "conversation": "llava15",
        "instruction": "authors",
        "answer": "Sure, <SEG>.",
        "seg_token": "<SEG>",
    }
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    seg = ReasonSegmenter(config.replace(weights_dir=str(other)))
    vlm = seg.method.vlm  # type: ignore[attr-defined]
    assert vlm.prompt.answer == "Sure, <SEG>." and vlm.prompt.instruction == "authors"
    image = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frame = seg.prepare(image)
    result = seg.segment(frame, "where is the mug", is_sentence=True)
    query = vlm.seg_hidden(image, "where is the mug", is_sentence=True, answer="Sure, <SEG>.")
    with torch.inference_mode():
        projected = seg.method.projection(query[None])  # type: ignore[attr-defined]
        similarity, _ = seg.method.selector.score(frame.mask_embeddings, projected[0])  # type: ignore[attr-defined]
    np.testing.assert_allclose(result.similarity, similarity.numpy(), rtol=1e-5, atol=1e-5)
    assert "where is the mug Please output" in vlm.build_conversation("where is the mug", is_sentence=True)
