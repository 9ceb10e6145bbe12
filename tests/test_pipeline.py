"""End-to-end ReasonSegmenter on the tiny profile, for every method, plus the weights
round trip and per-frame reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmseg_ros.config import SelectionConfig
from llmseg_ros.pipeline import ReasonSegmenter
from llmseg_ros.types import FrameFeatures, SegmentResult

ALL_METHODS = ["llmseg", "lisa", "grounded", "vlm_grounding", "vlm_marks"]


def _check_result(result: SegmentResult, image: np.ndarray, method: str) -> None:
    assert result.method == method
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    assert 0.0 <= result.confidence <= 1.0
    assert result.timings["total"] > 0
    for index in result.selected:
        assert 0 <= index < result.num_proposals


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_end_to_end(tiny_config_factory, scene_image, method: str) -> None:
    seg = ReasonSegmenter(tiny_config_factory(method))
    frame = seg.prepare(scene_image)
    result = seg.segment(frame, "something round I could roll across the floor")
    _check_result(result, scene_image, method)
    # a raw image is prepared on the fly and includes the preparation timings
    direct = seg.segment(scene_image, "something round I could roll across the floor")
    np.testing.assert_array_equal(direct.mask, result.mask)
    assert set(frame.timings) <= set(direct.timings)
    seg.close()
    assert not seg.is_loaded and seg.components.loaded == []


@pytest.mark.parametrize("method", ["llmseg", "lisa", "grounded"])
def test_square_and_tiny_frames(tiny_config_factory, method: str) -> None:
    """Square frames and frames of 3 pixels or less on a side (ambiguous for image
    processors that guess the channel axis) give a mask of the frame's size."""
    seg = ReasonSegmenter(tiny_config_factory(method))
    for shape in ((64, 64, 3), (3, 3, 3), (4, 8, 3), (2, 9, 3), (1, 1, 3)):
        image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
        _check_result(seg.segment(image, "the red thing"), image, method)
    seg.close()


def test_llmseg_scores_and_strategies(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg"))
    frame = seg.prepare(scene_image)
    k = len(frame.proposals)
    assert k > 0
    assert frame.mask_embeddings.shape == (k, 256)
    base = seg.segment(frame, "the red ball")
    assert base.similarity.shape == (k,) and base.iop.shape == (k,)
    assert ((base.iop >= 0) & (base.iop <= 1)).all()
    assert ((base.similarity >= -1 - 1e-5) & (base.similarity <= 1 + 1e-5)).all()
    # the union of the selected proposals is the mask
    expected = np.zeros(scene_image.shape[:2], bool)
    for i in base.selected:
        expected |= frame.proposals.masks[i]
    np.testing.assert_array_equal(base.mask, expected)
    top1 = seg.segment(frame, "the red ball", selection=SelectionConfig(strategy="top1_iou"))
    assert top1.selected == [int(np.argmax(top1.similarity))]
    nothing = seg.segment(frame, "the red ball", selection=SelectionConfig(iop_threshold=1.0))
    assert nothing.selected == [] and not nothing.mask.any()
    assert nothing.confidence == pytest.approx(1.0 - nothing.iop.max())


def test_frame_reuse_and_prefix_cache(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg"))
    frame = seg.prepare(scene_image)
    first = seg.segment(frame, "where could I put the dirty dishes?")
    assert "vlm_prefix" in first.timings  # the first instruction encodes the image prefix
    second = seg.segment(frame, "where could I put the dirty dishes?")
    assert "vlm_prefix" not in second.timings  # later ones reuse it
    np.testing.assert_allclose(second.similarity, first.similarity, atol=1e-5)
    np.testing.assert_allclose(second.iop, first.iop, atol=1e-5)
    # the cached path agrees with a fresh frame (no cache) on the same image
    fresh = seg.segment(scene_image, "where could I put the dirty dishes?")
    np.testing.assert_allclose(fresh.iop, first.iop, atol=1e-5)


def test_weights_round_trip_reproduces_outputs(tiny_config_factory, scene_image, tmp_path) -> None:
    """Save the loaded heads + adapter with save_weights, load them back: same outputs."""
    from llmseg_ros.weights.directory import load_weights, save_weights

    config = tiny_config_factory("llmseg")
    seg = ReasonSegmenter(config)
    method = seg.method
    frame = seg.prepare(scene_image)
    before = seg.segment(frame, "the green box")
    loaded = load_weights(config.weights_dir)
    # perturb the heads so the round trip is not trivially the tiny profile's files
    torch.manual_seed(1)
    with torch.no_grad():
        for p in method.selector.parameters():  # type: ignore[attr-defined]
            p.add_(0.05 * torch.randn_like(p))
    changed = seg.segment(frame, "the green box")
    assert not np.allclose(changed.iop, before.iop)
    save_weights(
        tmp_path / "w",
        loaded.manifest,
        {
            "projection": method.projection,  # type: ignore[attr-defined]
            "selector": method.selector,  # type: ignore[attr-defined]
            "mask_proj": method.mask_embedder.proj,  # type: ignore[attr-defined]
        },
        vlm=method.vlm,  # type: ignore[attr-defined]
    )
    reloaded = ReasonSegmenter(config.replace(weights_dir=str(tmp_path / "w")))
    again = reloaded.segment(reloaded.prepare(scene_image), "the green box")
    np.testing.assert_array_equal(again.similarity, changed.similarity)
    np.testing.assert_array_equal(again.iop, changed.iop)
    np.testing.assert_array_equal(again.mask, changed.mask)


def test_bad_requests(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg").replace(max_instruction_chars=20))
    with pytest.raises(ValueError, match="instruction is empty"):
        seg.segment(scene_image, "   ")
    with pytest.raises(ValueError, match="is 25 characters long; the limit is 20"):
        seg.segment(scene_image, "x" * 25)
    with pytest.raises(TypeError, match="instruction must be a string"):
        seg.segment(scene_image, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\) uint8 RGB, got shape \(4, 4\)"):
        seg.prepare(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="must be a numpy array"):
        seg.prepare([[1, 2, 3]])  # type: ignore[arg-type]
    # still serving after bad requests
    assert isinstance(seg.prepare(scene_image), FrameFeatures)


def test_conversation_carries_turns_on_the_same_frame(tiny_config_factory, scene_image) -> None:
    seg = ReasonSegmenter(tiny_config_factory("llmseg"))
    frame = seg.prepare(scene_image)
    seg.segment(frame, "which object is red?", conversation_id="c1")
    assert seg._history("c1", frame) == [("which object is red?", "It is <SEG>.")]
    follow = seg.segment(frame, "the one on the left", conversation_id="c1", explain=True)
    assert follow.answer is not None
    assert [t[0] for t in seg._history("c1", frame)] == ["which object is red?", "the one on the left"]
    # a new frame starts afresh
    other = seg.prepare(scene_image)
    assert seg._history("c1", other) == []
