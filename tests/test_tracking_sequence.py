"""Acceptance: a tracked answer follows a synthetic moving object and notices it leave.

Sequences from :mod:`llmseg_ros.data.motion` (the project's synthetic scene code): the
target translates, grows and turns over 40 frames while an occluder passes in front of it;
in the exit sequences it leaves through the image border. SAM is the tiny architecture
trained for a few minutes of CPU time on other sequences of the same generator
(``tests/shape_sam.py``), saved under the test's tmp path and loaded through the real
builder; the track starts from the first frame's ground truth (any ``SegmentResult``)
with the default ``TrackerConfig``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from tracking_helpers import answer

from llmseg_ros.config import SegmenterConfig
from llmseg_ros.data.motion import MotionConfig, generate_motion_sequence
from llmseg_ros.pipeline import ReasonSegmenter

pytestmark = pytest.mark.slow

SEQUENCE_SEEDS = (0, 1, 2)
EXIT_SEEDS = (0, 1, 2)
FRAMES = 40
FRAME_NS = 33_000_000  # 30 Hz
TARGET_RADIUS = 0.24
MIN_MEAN_IOU = 0.8
LOST_WITHIN = 3  # frames after the target has left the image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def shape_segmenter(tmp_path_factory):
    from shape_sam import train_shape_sam

    path = tmp_path_factory.mktemp("shape_sam") / "sam_tiny_shapes.pth"
    start = time.perf_counter()
    train_shape_sam(path)
    print(f"\ntiny SAM trained on synthetic shapes in {time.perf_counter() - start:.0f} s")
    seg = ReasonSegmenter(SegmenterConfig(sam_checkpoint=str(path), sam_model_type="tiny", device="cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's small operations run fastest on one thread
    yield seg
    torch.set_num_threads(threads)
    seg.close()


def track_sequence(
    seg: ReasonSegmenter, seed: int, *, exit: bool
) -> tuple[list, list[np.ndarray], int | None]:
    sequence = generate_motion_sequence(
        seed, MotionConfig(num_frames=FRAMES, target_radius=TARGET_RADIUS, exit=exit)
    )
    tracker = seg.track(sequence.frames[0], answer(sequence.masks[0], "ground_truth", 1.0), stamp_ns=0)
    results = [tracker.update(sequence.frames[t], stamp_ns=t * FRAME_NS) for t in range(1, FRAMES)]
    return results, sequence.masks[1:], sequence.exit_frame


def test_tracked_mask_follows_a_moving_scaling_occluded_object(shape_segmenter) -> None:
    ious: list[float] = []
    for seed in SEQUENCE_SEEDS:
        sequence = generate_motion_sequence(
            seed, MotionConfig(num_frames=FRAMES, target_radius=TARGET_RADIUS)
        )
        assert max(sequence.occluded) > 0.1  # the occluder really hides part of the target
        results, truths, _ = track_sequence(shape_segmenter, seed, exit=False)
        per_frame = [iou(r.mask, m) for r, m in zip(results, truths)]
        print(f"seed {seed}: mean IoU {np.mean(per_frame):.3f}, min {np.min(per_frame):.3f}")
        assert not any(r.lost for r in results), "the target was reported lost while in view"
        assert all(r.source == "propagated" and 0.0 <= r.confidence <= 1.0 for r in results)
        ious += per_frame
    print(f"mean IoU over {len(ious)} frames: {np.mean(ious):.3f}")
    assert np.mean(ious) >= MIN_MEAN_IOU


def test_lost_is_set_within_a_few_frames_after_the_object_leaves(shape_segmenter) -> None:
    for seed in EXIT_SEEDS:
        results, truths, exit_frame = track_sequence(shape_segmenter, seed, exit=True)
        assert exit_frame is not None
        gone = exit_frame - 1  # index into results (they start at frame 1)
        lost = [r.lost for r in results]
        first_lost = lost.index(True) if True in lost else None
        print(
            f"seed {seed}: left the image at frame {exit_frame}, lost from frame {first_lost and first_lost + 1}"
        )
        assert first_lost is not None and first_lost <= gone + LOST_WITHIN
        assert all(lost[gone + LOST_WITHIN :]), "the target came back after it left"
        assert not any(r.mask.any() for r in results[gone + LOST_WITHIN :])
        # no false alarm while at least half of the target is in view
        full = max(int(m.sum()) for m in truths)
        assert not any(r.lost for r, m in zip(results, truths) if m.sum() >= 0.5 * full)
