"""Background precompute with a slow fake stage: never two frames at once, never a frame
older than the newest one it skipped to, bounded (never queues behind the camera)."""

from __future__ import annotations

import threading
import time

import numpy as np
from ros_testing import FakeSegmenter, colour_image, request_msg

from llmseg_ros.ros.frames import Frame, FrameBuffer, HeaderData
from llmseg_ros.ros.handler import HandlerSettings, RequestHandler
from llmseg_ros.ros.precompute import BackgroundPrecomputer

S = 1_000_000_000


def frame(stamp: int) -> Frame:
    return Frame(header=HeaderData(stamp, "cam"), rgb=np.zeros((2, 2, 3), np.uint8))


class SlowStage:
    """Records what runs, and when, while taking ``seconds`` per frame."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: list[int] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def __call__(self, f: Frame) -> None:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.started.append(f.stamp_ns)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1


def test_camera_faster_than_the_stage_skips_to_the_newest_frame() -> None:
    stage = SlowStage(0.05)
    worker = BackgroundPrecomputer(stage)
    submitted = []
    for stamp in range(1, 41):  # a 200 Hz camera against a 20 Hz stage
        assert worker.submit(frame(stamp))
        submitted.append(stamp)
        time.sleep(0.005)
    assert worker.wait_idle(5.0)
    stats = worker.stats()
    worker.close()
    assert stage.max_active == 1  # never two frames at once
    assert stats.processed == stage.started
    assert all(a < b for a, b in zip(stats.processed, stats.processed[1:]))  # never older than one skipped to
    assert stats.processed[-1] == submitted[-1]  # the newest frame is always processed
    assert len(stats.processed) < len(submitted) / 2  # bounded: most frames were skipped, not queued
    assert stats.skipped == len(submitted) - len(stats.processed)
    assert stats.errors == 0 and stats.ignored == 0


def test_frames_older_than_the_newest_submitted_are_ignored() -> None:
    gate = threading.Event()
    started: list[int] = []

    def blocked(f: Frame) -> None:
        started.append(f.stamp_ns)
        gate.wait(5.0)

    worker = BackgroundPrecomputer(blocked)
    assert worker.submit(frame(10))
    deadline = time.monotonic() + 2.0
    while not started and time.monotonic() < deadline:
        time.sleep(0.005)
    assert worker.submit(frame(30))  # pending
    assert not worker.submit(frame(20))  # older than the newest submitted: ignored
    assert not worker.submit(frame(30))  # same stamp again: ignored
    assert worker.submit(frame(40))  # replaces 30
    gate.set()
    assert worker.wait_idle(5.0)
    stats = worker.stats()
    worker.close()
    assert stats.processed == [10, 40]
    assert (stats.skipped, stats.ignored) == (1, 2)
    assert not worker.submit(frame(50))  # closed


def test_errors_are_reported_and_the_worker_keeps_going() -> None:
    errors: list[tuple[int, str]] = []

    def stage(f: Frame) -> None:
        if f.stamp_ns == 2:
            raise RuntimeError("CUDA out of memory")

    worker = BackgroundPrecomputer(stage, on_error=lambda f, exc: errors.append((f.stamp_ns, str(exc))))
    for stamp in (1, 2, 3):
        worker.submit(frame(stamp))
        assert worker.wait_idle(2.0)
    stats = worker.stats()
    worker.close()
    assert stats.processed == [1, 2, 3] and stats.errors == 1
    assert stats.last_error == "2: RuntimeError: CUDA out of memory" and errors == [(2, "CUDA out of memory")]


def test_requests_reuse_precomputed_features() -> None:
    seg = FakeSegmenter(prepare_s=0.05)
    buffer = FrameBuffer(4)
    handler = RequestHandler(seg, buffer, HandlerSettings(request_timeout_s=5.0))
    worker = BackgroundPrecomputer(handler.features_for)
    latest = None
    for i in range(1, 6):
        latest = Frame(header=HeaderData(i * S, "cam"), rgb=colour_image(seed=i))
        buffer.add(latest)
        worker.submit(latest)
    assert worker.wait_idle(5.0)
    processed = worker.stats().processed
    worker.close()
    assert latest is not None and handler.has_features(latest)
    assert seg.prepare_calls == len(processed) and seg.max_concurrent == 1
    outcome = handler.handle(request_msg("the red things"))
    assert outcome.success and outcome.frame_stamp_ns == 5 * S
    assert seg.prepare_calls == len(processed)  # no new proposal computation for the request
    assert "proposals" not in outcome.timings
