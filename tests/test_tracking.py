"""Tracking logic without models: prompt sampling, the re-query / lost / timeout policy,
the tracker config, the motion sequences, and SAM's dense prompt geometry."""

from __future__ import annotations

import numpy as np
import pytest

from llmseg_ros.config import TrackerConfig
from llmseg_ros.data.motion import MotionConfig, generate_motion_sequence
from llmseg_ros.tracking.models import new_track_id
from llmseg_ros.tracking.policy import NS_PER_S, TrackPolicy
from llmseg_ros.tracking.prompts import expand_box, mask_box, sample_points

MS = 1_000_000


# -- prompts ------------------------------------------------------------------------------
def square_mask(h: int = 60, w: int = 80, box: tuple[int, int, int, int] = (20, 10, 41, 31)) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_mask_box_is_exclusive_and_none_for_empty() -> None:
    assert mask_box(square_mask()).tolist() == [20.0, 10.0, 41.0, 31.0]
    assert mask_box(np.zeros((5, 5), bool)) is None
    with pytest.raises(ValueError, match=r"mask must be an \(H, W\) numpy array"):
        mask_box(np.zeros((2, 5, 5), bool))


def test_expand_box_grows_by_the_margin_and_clips_to_the_image() -> None:
    box = np.array([20.0, 10.0, 40.0, 30.0])
    assert expand_box(box, 0.1, (60, 80)).tolist() == [18.0, 8.0, 42.0, 32.0]
    assert expand_box(box, 0.0, (60, 80)).tolist() == box.tolist()
    assert expand_box(box, 2.0, (60, 80)).tolist() == [0.0, 0.0, 80.0, 60.0]
    with pytest.raises(ValueError, match="margin must be >= 0"):
        expand_box(box, -0.1, (60, 80))


def test_positive_points_lie_inside_the_mask_first_at_its_most_interior_pixel() -> None:
    mask = square_mask()
    box = expand_box(mask_box(mask), 0.1, mask.shape)
    prompt = sample_points(mask, box, 3, 4, np.random.default_rng(0))
    assert prompt.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    pos = prompt.points[prompt.labels == 1]
    assert pos[0].tolist() == [30.5, 20.5]  # centre pixel (30, 20) of the 21 x 21 square
    assert all(mask[int(y), int(x)] for x, y in pos)
    # the others come from the inner half of the mask (distance >= half the maximum)
    assert all(25 <= x <= 36 and 15 <= y <= 26 for x, y in pos[1:])


def test_negative_points_lie_around_the_box_never_inside_it_or_on_the_mask() -> None:
    mask = square_mask()
    box = expand_box(mask_box(mask), 0.1, mask.shape)
    for seed in range(5):
        prompt = sample_points(mask, box, 1, 6, np.random.default_rng(seed))
        neg = prompt.points[prompt.labels == 0]
        assert len(neg) == 6
        for x, y in neg:
            inside_box = box[0] <= x < box[2] and box[1] <= y < box[3]
            assert not inside_box and not mask[int(y), int(x)]
            # within the ring: at most half the box's larger side away from it
            ring = 0.5 * max(box[2] - box[0], box[3] - box[1]) + 1
            assert box[0] - ring <= x <= box[2] + ring and box[1] - ring <= y <= box[3] + ring


def test_point_sampling_is_reproducible_and_handles_edge_cases() -> None:
    mask = square_mask()
    box = expand_box(mask_box(mask), 0.1, mask.shape)
    a = sample_points(mask, box, 3, 4, np.random.default_rng(7))
    b = sample_points(mask, box, 3, 4, np.random.default_rng(7))
    assert np.array_equal(a.points, b.points) and np.array_equal(a.labels, b.labels)
    full = np.ones((20, 30), bool)  # the box covers the image: no room for negatives
    prompt = sample_points(full, np.array([0.0, 0.0, 30.0, 20.0]), 2, 4, np.random.default_rng(0))
    assert prompt.labels.tolist() == [1, 1]
    none = sample_points(mask, box, 0, 0, np.random.default_rng(0))
    assert len(none) == 0 and none.points.shape == (0, 2)
    with pytest.raises(ValueError, match="empty mask"):
        sample_points(np.zeros((5, 5), bool), box, 1, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="point counts must be >= 0"):
        sample_points(mask, box, -1, 1, np.random.default_rng(0))


# -- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend": "xmem"}, "backend must be one of"),
        ({"backend": "sam2"}, "sam2_model must name a SAM 2 video model"),
        ({"positive_points": -1}, "positive_points must be an integer >= 0, got -1"),
        ({"requery_every": 2.5}, "requery_every must be an integer >= 0"),
        ({"lost_patience": 0}, "lost_patience must be an integer >= 1, got 0"),
        ({"requery_below": 1.5}, r"requery_below must be in \[0.0, 1.0\], got 1.5"),
        ({"box_margin": -0.1}, "box_margin must be in"),
        ({"timeout_s": 0}, "timeout_s must be > 0 seconds, got 0"),
    ],
)
def test_tracker_config_names_the_bad_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrackerConfig(**fields)  # type: ignore[arg-type]


def test_tracker_config_from_dict() -> None:
    assert TrackerConfig.from_dict({"requery_every": 30}).requery_every == 30
    with pytest.raises(ValueError, match=r"unknown tracker field\(s\) \['every'\]"):
        TrackerConfig.from_dict({"every": 3})


def test_track_ids_are_unique() -> None:
    ids = {new_track_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 12 for i in ids)


# -- policy ---------------------------------------------------------------------------------
def run(policy: TrackPolicy, frames: list[tuple[float, float]], start_ns: int = 0, dt_ns: int = 100 * MS):
    """Feed (confidence, area) frames; returns (state, per-frame (pre, post, lost))."""
    state = policy.start(start_ns)
    log = []
    for i, (confidence, area) in enumerate(frames, start=1):
        policy.begin_frame(state, start_ns + i * dt_ns)
        pre = policy.requery_before(state)
        post = None if pre else policy.requery_after(state, confidence)
        policy.judge(state, confidence=confidence, area_fraction=area, requeried=bool(pre or post))
        log.append((pre, post, state.lost))
    return state, log


def test_periodic_requery_every_n_frames() -> None:
    policy = TrackPolicy(TrackerConfig(requery_every=3, requery_below=0.0), can_requery=True)
    _, log = run(policy, [(0.9, 0.1)] * 7)
    assert [pre for pre, _, _ in log] == [None, None, "periodic", None, None, "periodic", None]


def test_low_confidence_requery_and_never_without_an_instruction() -> None:
    cfg = TrackerConfig(requery_below=0.4, lost_below=0.3)
    _, log = run(TrackPolicy(cfg, can_requery=True), [(0.9, 0.1), (0.35, 0.1), (0.9, 0.1)])
    assert [post for _, post, _ in log] == [None, "low_confidence", None]
    _, log = run(TrackPolicy(cfg, can_requery=False), [(0.9, 0.1), (0.1, 0.1), (0.9, 0.1)])
    assert all(pre is None and post is None for pre, post, _ in log)
    _, log = run(TrackPolicy(TrackerConfig(requery_below=0.0), can_requery=True), [(0.01, 0.1)])
    assert log[0][1] is None  # threshold 0 = never


def test_lost_after_patience_weak_frames_and_recovery() -> None:
    cfg = TrackerConfig(lost_below=0.5, lost_patience=3, requery_below=0.0)
    state, log = run(TrackPolicy(cfg, can_requery=False), [(0.4, 0.1)] * 3 + [(0.8, 0.1)])
    assert [lost for _, _, lost in log] == [False, False, True, False]
    assert state.weak_frames == 0 and state.lost_reason is None
    state, _ = run(TrackPolicy(cfg, can_requery=False), [(0.4, 0.1)] * 3)
    assert state.lost_reason == "confidence below 0.5 for 3 frames"


def test_empty_mask_is_lost_at_once() -> None:
    cfg = TrackerConfig(min_area_fraction=1e-3, requery_below=0.0)
    state, log = run(TrackPolicy(cfg, can_requery=False), [(0.9, 0.1), (0.9, 5e-4)])
    assert [lost for _, _, lost in log] == [False, True]
    assert state.lost_reason is not None and "mask is empty" in state.lost_reason


def test_while_lost_requery_every_lost_requery_every_frames() -> None:
    cfg = TrackerConfig(lost_requery_every=3, requery_below=0.5, requery_every=0)
    policy = TrackPolicy(cfg, can_requery=True)
    state = policy.start(0)
    reasons = []
    for i in range(1, 8):
        policy.begin_frame(state, i)
        pre = policy.requery_before(state)
        post = None if pre else policy.requery_after(state, 0.0)
        reasons.append(pre or post)
        policy.judge(state, confidence=0.0, area_fraction=0.0, requeried=bool(pre or post))  # nothing found
    # frame 1: weak propagation → low-confidence re-query finds nothing → lost; then a
    # retry every 3 frames and no low-confidence re-query while lost
    assert reasons == ["low_confidence", None, None, "lost", None, None, "lost"]
    assert state.lost and state.lost_reason == "the re-query found no target"
    assert state.requeries == 3


def test_a_nonempty_requery_answer_is_confident() -> None:
    policy = TrackPolicy(TrackerConfig(lost_below=0.9), can_requery=True)
    state = policy.start(0)
    policy.begin_frame(state, 5)
    policy.judge(state, confidence=0.2, area_fraction=0.1, requeried=True)
    assert not state.lost and state.last_confident_ns == 5 and state.frames_since_query == 0


def test_timeout_counts_frame_time_since_the_last_confident_frame() -> None:
    cfg = TrackerConfig(timeout_s=1.0, lost_below=0.5, requery_below=0.0)
    policy = TrackPolicy(cfg, can_requery=False)
    # weak frames every 0.3 s: the track expires on the first frame more than 1 s after the start
    state, _ = run(policy, [(0.1, 0.1)] * 3, dt_ns=300 * MS)
    assert state.ended is None
    policy.begin_frame(state, 1200 * MS)
    policy.judge(state, confidence=0.1, area_fraction=0.1, requeried=False)
    assert state.ended is not None and state.ended.startswith("expired: no confident update for 1.20 s")
    with pytest.raises(RuntimeError, match="the track has ended"):
        policy.begin_frame(state, 1300 * MS)
    # without frames, on the caller's clock
    state = policy.start(0)
    assert not policy.check_timeout(state, NS_PER_S)
    assert policy.check_timeout(state, NS_PER_S + 1)


def test_frames_must_come_in_time_order() -> None:
    policy = TrackPolicy(TrackerConfig(), can_requery=False)
    state = policy.start(10)
    policy.begin_frame(state, 10)  # same stamp: allowed
    with pytest.raises(ValueError, match="older than the track's previous frame"):
        policy.begin_frame(state, 9)


# -- motion sequences --------------------------------------------------------------------------
def test_motion_sequence_moves_scales_occludes_and_exits() -> None:
    cfg = MotionConfig(num_frames=32, noise_std=0.0)
    seq = generate_motion_sequence(3, cfg)
    assert len(seq) == 32 and seq.exit_frame is None
    assert all(f.shape == (128, 128, 3) and f.dtype == np.uint8 for f in seq.frames)
    centres = [np.argwhere(m).mean(axis=0) for m in seq.masks]
    assert np.linalg.norm(centres[-1] - centres[0]) > 0.25 * 128  # it travels
    assert max(seq.occluded) > 0.1 and seq.occluded[0] == 0.0  # partly hidden halfway
    assert max(seq.occluded) < 0.8
    first, last = seq.masks[0].sum(), seq.masks[-1].sum()
    assert last > 1.4 * first  # scale 0.85 → 1.2
    assert generate_motion_sequence(3, cfg).frames[5].tobytes() == seq.frames[5].tobytes()
    out = generate_motion_sequence(4, MotionConfig(num_frames=32, exit=True))
    assert out.exit_frame is not None and out.exit_frame < 32
    assert all(not m.any() for m in out.masks[out.exit_frame :])
    assert all(m.any() for m in out.masks[: out.exit_frame])
    with pytest.raises(ValueError, match="occlusion must be"):
        MotionConfig(occlusion=(0.7, 0.2))
