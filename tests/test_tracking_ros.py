"""Live tracks beneath the node (``llmseg_ros.ros.tracks``): several tracks at once with
ids, stop one or all, timeouts on frame stamps and on the node's clock, a failing track
that does not stop the others, the model lock, and the newest-frame-wins worker."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from tracking_helpers import answer, box_mask, frame_at

from llmseg_ros.config import TrackerConfig
from llmseg_ros.ros.tracks import TrackSet, TrackStep, TrackWorker

MS = 1_000_000


class CountingLock:
    """A lock that counts how often it was taken."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.taken = 0

    def __enter__(self) -> CountingLock:
        self.lock.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


@pytest.fixture
def seg(tracking_segmenter):
    """The tiny llmseg pipeline of ``conftest.py`` (shared by the module's tests)."""
    return tracking_segmenter


def test_two_tracks_update_on_every_frame_with_ids_and_stop(seg, scene_image) -> None:
    lock = CountingLock()
    tracks = TrackSet(seg, max_tracks=2, model_lock=lock)
    first = tracks.start(frame_at(scene_image, 0), answer(box_mask(scene_image, (15, 25, 45, 55))))
    second = tracks.start(
        frame_at(scene_image, 0),
        answer(box_mask(scene_image, (60, 20, 100, 60))),
        instruction="the green box",
        track_id="box",
    )
    assert second.track_id == "box" and second.instruction == "the green box"
    assert first.result.source == "start" and tracks.ids() == [first.track_id, "box"]
    assert lock.taken == 2
    step = tracks.step(frame_at(scene_image, 100 * MS))
    assert [u.track_id for u in step.updates] == [first.track_id, "box"] and not step.ended
    assert all(u.result.stamp_ns == 100 * MS and u.result.frame_index == 1 for u in step.updates)
    assert step.frame.header.frame_id == "camera_optical"
    assert lock.taken == 4  # one lock per tracker update, not one per frame
    assert [s.track_id for s in tracks.statuses()] == [first.track_id, "box"]

    with pytest.raises(ValueError, match="2 tracks are alive, the limit is 2"):
        tracks.start(frame_at(scene_image, 0), answer(box_mask(scene_image, (0, 0, 10, 10))))
    ended = tracks.stop("box", "the planner is done")
    assert ended is not None and ended.reason == "stopped: the planner is done"
    assert tracks.stop("box") is None and tracks.ids() == [first.track_id]
    with pytest.raises(ValueError, match="already in use"):
        tracks.start(
            frame_at(scene_image, 0), answer(box_mask(scene_image, (0, 0, 10, 10))), track_id=first.track_id
        )
    with pytest.raises(ValueError, match="cannot track an empty answer"):
        tracks.start(frame_at(scene_image, 0), answer(np.zeros(scene_image.shape[:2], bool)))
    assert [e.track_id for e in tracks.stop_all()] == [first.track_id] and len(tracks) == 0
    assert tracks.step(frame_at(scene_image, 200 * MS)).updates == []


def test_tracks_expire_on_frame_stamps_and_on_the_clock(seg, scene_image) -> None:
    config = TrackerConfig(timeout_s=0.5, lost_below=1.0, requery_below=0.0)  # no frame is confident
    tracks = TrackSet(seg)
    a = tracks.start(frame_at(scene_image, 0), answer(box_mask(scene_image, (15, 25, 45, 55))), config=config)
    step = tracks.step(frame_at(scene_image, 600 * MS))
    assert step.updates[0].result.expired
    assert [e.track_id for e in step.ended] == [a.track_id] and step.ended[0].reason.startswith("expired")
    assert len(tracks) == 0
    b = tracks.start(frame_at(scene_image, 0), answer(box_mask(scene_image, (15, 25, 45, 55))), config=config)
    assert tracks.expire(400 * MS) == []
    ended = tracks.expire(501 * MS)
    assert [e.track_id for e in ended] == [b.track_id] and len(tracks) == 0


def test_a_failing_track_ends_alone(seg, scene_image) -> None:
    tracks = TrackSet(seg)
    small = np.ascontiguousarray(scene_image[:48, :64])
    good = tracks.start(frame_at(scene_image, 0), answer(box_mask(scene_image, (15, 25, 45, 55))))
    bad = tracks.start(frame_at(small, 0), answer(box_mask(small, (5, 5, 20, 20))))
    step = tracks.step(frame_at(scene_image, 1))
    assert [u.track_id for u in step.updates] == [good.track_id]
    assert [e.track_id for e in step.ended] == [bad.track_id]
    assert (
        step.ended[0].reason.startswith("failed: ValueError") and "camera resolution" in step.ended[0].reason
    )
    assert tracks.ids() == [good.track_id]


def test_worker_keeps_one_pending_frame_and_the_newest_wins(seg, scene_image) -> None:
    tracks = TrackSet(seg)
    steps: list[TrackStep] = []
    running, release = threading.Event(), threading.Event()

    def on_step(step: TrackStep) -> None:
        running.set()
        release.wait(timeout=60)
        steps.append(step)

    worker = TrackWorker(tracks, on_step)
    try:
        assert not worker.submit(frame_at(scene_image, 1))  # no track alive: nothing to do
        tracks.start(frame_at(scene_image, 0), answer(box_mask(scene_image, (15, 25, 45, 55))))
        assert worker.submit(frame_at(scene_image, 10))
        assert running.wait(timeout=60)  # frame 10 runs and blocks in on_step
        for stamp in (20, 30, 40):
            assert worker.submit(frame_at(scene_image, stamp))
        assert not worker.submit(frame_at(scene_image, 35))  # older than the newest offered
        release.set()
        assert worker.wait_idle(timeout=120)
        assert [s.frame.stamp_ns for s in steps] == [10, 40]
        stats = worker.stats()
        assert stats.processed == [10, 40] and stats.skipped == 2 and stats.ignored == 1
    finally:
        release.set()
        worker.close(timeout=60)
