"""ReasonSegmenter.track on the tiny profile: per-frame updates, encoding reuse, re-queries,
timeouts, errors, threads, and the SAM 2 backend loaded from a tiny checkpoint on disk.

The tiny models are random, so these tests check mechanics, not mask quality (that is
``test_tracking_sequence.py``'s job, with a briefly trained SAM)."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from tracking_helpers import answer

from llmseg_ros.config import TrackerConfig
from llmseg_ros.methods.common import SAM_KEY
from llmseg_ros.models.sam_prompting import encode_image
from llmseg_ros.tracking import light_frame
from llmseg_ros.types import TrackedResult

MS = 1_000_000


def circle_mask(image: np.ndarray) -> np.ndarray:
    """The red circle of the ``scene_image`` fixture."""
    return (image[..., 0] > 200) & (image[..., 1] < 60)


def shifted(image: np.ndarray, dx: int) -> np.ndarray:
    return np.ascontiguousarray(np.roll(image, dx, axis=1))


@pytest.fixture
def seg(tracking_segmenter):
    """The tiny llmseg pipeline of ``conftest.py`` (shared by the module's tests)."""
    return tracking_segmenter


def test_track_any_answer_and_update_every_frame(seg, scene_image) -> None:
    tracker = seg.track(scene_image, answer(circle_mask(scene_image)), stamp_ns=0)
    start = tracker.start_result
    assert isinstance(start, TrackedResult) and start.source == "start" and start.frame_index == 0
    assert start.track_id == tracker.track_id and len(tracker.track_id) == 12
    assert start.method == "test" and start.mask.sum() == circle_mask(scene_image).sum()
    for i in range(1, 4):
        result = tracker.update(shifted(scene_image, 2 * i), stamp_ns=i * 100 * MS)
        assert isinstance(result, TrackedResult)
        assert result.mask.shape == scene_image.shape[:2] and result.mask.dtype == bool
        assert (result.frame_index, result.stamp_ns, result.source) == (i, i * 100 * MS, "propagated")
        assert result.method == "sam_track" and result.requery_reason is None
        assert 0.0 <= result.confidence <= 1.0
        assert {"predicted_iou", "stability"} <= set(result.extras)
        assert {"sam_encoder", "propagate", "total"} <= set(result.timings)  # raw image: encoded here
        assert result.lost == (result.lost_reason is not None)
        if result.lost:
            assert not result.mask.any()
    status = tracker.status()
    assert status.frame_index == 3 and status.last_stamp_ns == 300 * MS and status.alive
    other = seg.track(scene_image, answer(circle_mask(scene_image)))
    assert other.track_id != tracker.track_id


def test_the_proposal_stage_encoding_is_reused_and_shared(seg, scene_image) -> None:
    frame = seg.prepare(scene_image)
    cached = frame.cache[SAM_KEY]  # the llmseg method keeps its proposal stage's encoding
    reference = encode_image(seg.components.sam(), scene_image)
    torch.testing.assert_close(cached.embedding, reference.embedding)
    assert (cached.input_size, cached.original_size) == (reference.input_size, reference.original_size)

    tracker = seg.track(frame, answer(circle_mask(scene_image)), stamp_ns=0)
    result = tracker.update(seg.prepare(shifted(scene_image, 3)), stamp_ns=1)
    assert "sam_encoder" not in result.timings and "propagate" in result.timings

    # two tracks on one raw frame: the first encodes it, the second reuses the encoding
    a = seg.track(scene_image, answer(circle_mask(scene_image)), stamp_ns=0)
    b = seg.track(scene_image, answer(circle_mask(scene_image)), stamp_ns=0)
    shared = light_frame(shifted(scene_image, 3))
    assert "sam_encoder" in a.update(shared, stamp_ns=1).timings
    assert "sam_encoder" not in b.update(shared, stamp_ns=1).timings
    torch.testing.assert_close(
        shared.cache[SAM_KEY].embedding, encode_image(seg.components.sam(), shared.image).embedding
    )


def test_periodic_requery_runs_the_full_method(seg, scene_image) -> None:
    config = TrackerConfig(requery_every=2, requery_below=0.0, lost_requery_every=0)
    tracker = seg.track(
        scene_image, answer(circle_mask(scene_image)), instruction="the red ball", config=config, stamp_ns=0
    )
    assert tracker.instruction == "the red ball"
    first = tracker.update(scene_image, stamp_ns=1)
    second = tracker.update(scene_image, stamp_ns=2)
    assert first.source == "propagated"
    assert second.source == "requery" and second.requery_reason == "periodic"
    assert second.method == "llmseg" and second.num_proposals > 0
    assert {"requery_proposals", "requery_vlm", "requery_total"} <= set(second.timings)
    direct = seg.segment(scene_image, "the red ball")
    if direct.mask.any():  # the tiny random model may answer "nothing"
        np.testing.assert_array_equal(second.mask, direct.mask)
        assert not second.lost
    else:
        assert second.lost and second.lost_reason == "the re-query found no target"
    assert tracker.status().requeries == 1


def test_a_track_expires_after_timeout_without_a_confident_frame(seg, scene_image) -> None:
    config = TrackerConfig(timeout_s=0.5, lost_below=1.0, requery_below=0.0)  # no frame is confident
    tracker = seg.track(scene_image, answer(circle_mask(scene_image)), config=config, stamp_ns=0)
    assert not tracker.update(scene_image, stamp_ns=300 * MS).expired
    last = tracker.update(scene_image, stamp_ns=600 * MS)
    assert last.expired and last.end_reason is not None and last.end_reason.startswith("expired")
    assert not tracker.alive
    with pytest.raises(RuntimeError, match="the track has ended"):
        tracker.update(scene_image, stamp_ns=700 * MS)
    idle = seg.track(scene_image, answer(circle_mask(scene_image)), config=config, stamp_ns=0)
    assert not idle.check_timeout(400 * MS) and idle.check_timeout(501 * MS)


def test_bad_input_is_reported(seg, scene_image) -> None:
    mask = circle_mask(scene_image)
    with pytest.raises(ValueError, match="cannot track an empty answer"):
        seg.track(scene_image, answer(np.zeros_like(mask)))
    with pytest.raises(ValueError, match="start a track on the frame the answer belongs to"):
        seg.track(scene_image, answer(mask[:10]))
    with pytest.raises(TypeError, match="config must be a TrackerConfig"):
        seg.track(scene_image, answer(mask), config={"requery_every": 3})
    with pytest.raises(ValueError, match="instruction is empty"):
        seg.track(scene_image, answer(mask), instruction="  ")
    with pytest.raises(TypeError, match="frame must be FrameFeatures or an"):
        seg.track([1, 2], answer(mask))
    tracker = seg.track(scene_image, answer(mask), stamp_ns=10)
    with pytest.raises(ValueError, match="a track follows frames of one camera resolution"):
        tracker.update(scene_image[:50], stamp_ns=11)
    with pytest.raises(ValueError, match="older than the track's previous frame"):
        tracker.update(scene_image, stamp_ns=9)
    with pytest.raises(ValueError, match=r"image must be \(H, W, 3\) uint8 RGB"):
        tracker.update(scene_image[..., 0], stamp_ns=12)
    tracker.stop("the planner is done")
    assert tracker.status().ended == "stopped: the planner is done"
    with pytest.raises(RuntimeError, match="stopped: the planner is done"):
        tracker.update(scene_image, stamp_ns=13)


def test_updates_of_one_tracker_are_serialised_across_threads(seg, scene_image) -> None:
    tracker = seg.track(scene_image, answer(circle_mask(scene_image)))
    results: list[TrackedResult] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(2):
                results.append(tracker.update(scene_image))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.frame_index for r in results) == [1, 2, 3, 4, 5, 6]
    by_index = sorted(results, key=lambda r: r.frame_index)
    assert all(a.stamp_ns <= b.stamp_ns for a, b in itertools.pairwise(by_index))


def test_sam2_backend_from_a_checkpoint_on_disk(seg, scene_image, tmp_path) -> None:
    from llmseg_ros.models.sam2_video import Sam2VideoPredictor
    from llmseg_ros.tiny.sam2 import save_tiny_sam2_video

    directory = save_tiny_sam2_video(tmp_path / "sam2")
    config = TrackerConfig(backend="sam2", sam2_model=str(directory))
    tracker = seg.track(scene_image, answer(circle_mask(scene_image)), config=config, stamp_ns=0)
    assert "sam2_start" in tracker.start_result.timings
    for i in range(1, 4):
        result = tracker.update(shifted(scene_image, i), stamp_ns=i)
        assert result.method == "sam2_track" and result.source == "propagated"
        assert result.mask.shape == scene_image.shape[:2] and 0.0 <= result.confidence <= 1.0
        assert "object_score_logit" in result.extras
    # the same predictor serves every sam2 track of the pipeline
    predictor = seg._tracking.sam2_predictor(str(directory))
    assert seg.track(scene_image, answer(circle_mask(scene_image)), config=config) is not None
    assert seg._tracking.sam2_predictor(str(directory)) is predictor

    # memory stays bounded on a long stream
    state = predictor.start(scene_image, circle_mask(scene_image))
    for _ in range(predictor.keep_frames + 3):
        predictor.step(state, scene_image)
    assert len(state.session.processed_frames) == 1
    assert len(state.session.output_dict_per_obj[0]["non_cond_frame_outputs"]) <= predictor.keep_frames + 1

    with pytest.raises(ValueError, match="cannot load a SAM 2 video model from"):
        Sam2VideoPredictor.load(str(tmp_path / "absent"))
