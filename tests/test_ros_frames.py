"""Frames from messages, the frame buffer (lookup by stamp) and the per-frame feature cache."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ros_testing import camera_info_msg, colour_image, image_msg

from llmseg_ros.ros.features import FeatureCache
from llmseg_ros.ros.frames import (
    Frame,
    FrameBuffer,
    FrameLookupError,
    HeaderData,
    format_stamp,
    frame_from_messages,
    nearest_index,
    ns_to_sec_nanosec,
)

S = 1_000_000_000


def frame(stamp_ns: int) -> Frame:
    return Frame(header=HeaderData(stamp_ns, "cam"), rgb=np.zeros((2, 2, 3), np.uint8))


def test_stamp_helpers() -> None:
    assert ns_to_sec_nanosec(1_700_000_000_000_000_123) == (1_700_000_000, 123)
    assert format_stamp(5 * S + 250_000_000) == "5.250000000"


def test_frame_from_messages_with_depth() -> None:
    rgb = colour_image(12, 16)
    depth = np.full((12, 16), 1234, np.uint16)
    out = frame_from_messages(
        image_msg(rgb[:, :, ::-1].copy(), "bgr8", 7 * S, "color"),
        image_msg(depth, "16UC1", 7 * S + 1000, "depth"),
        camera_info_msg((10.0, 10.0, 8.0, 6.0), 16, 12, 7 * S + 1000, "depth"),
    )
    np.testing.assert_array_equal(out.rgb, rgb)
    assert out.header == HeaderData(7 * S, "color") and out.depth_header == HeaderData(7 * S + 1000, "depth")
    assert out.depth_encoding == "16UC1" and out.intrinsics is not None and out.intrinsics.fx == 10.0
    assert out.has_depth and out.key == (7 * S, "color")
    with pytest.raises(ValueError, match="a depth image needs its CameraInfo"):
        frame_from_messages(image_msg(rgb, "rgb8"), image_msg(depth, "16UC1"))


def test_buffer_keeps_the_latest_n_in_stamp_order() -> None:
    buffer = FrameBuffer(3)
    assert buffer.latest() is None
    for stamp in (5, 1, 3, 4, 2):  # out of order
        buffer.add(frame(stamp * S))
    assert buffer.stamps() == [3 * S, 4 * S, 5 * S] and len(buffer) == 3
    latest = buffer.latest()
    assert latest is not None and latest.stamp_ns == 5 * S
    replacement = frame(4 * S)
    buffer.add(replacement)
    assert buffer.get(4 * S) is replacement and len(buffer) == 3


@pytest.mark.parametrize(
    ("stamps", "stamp", "expected"),
    [
        ([], 5, None),
        ([10], 0, 0),
        ([10], 99, 0),
        ([10, 20, 30], 14, 0),
        ([10, 20, 30], 16, 1),
        ([10, 20, 30], 15, 0),  # a tie goes to the earlier stamp
        ([10, 20, 30], 20, 1),
        ([10, 20, 30], 31, 2),
    ],
)
def test_nearest_index(stamps: list[int], stamp: int, expected: int | None) -> None:
    assert nearest_index(stamps, stamp) == expected


def test_buffer_lookup_with_tolerance_and_clear_errors() -> None:
    buffer = FrameBuffer(3)
    with pytest.raises(FrameLookupError, match="no frame has been received yet"):
        buffer.get(1 * S)
    for stamp in (10, 11, 12):
        buffer.add(frame(stamp * S))
    assert buffer.get(11 * S + 4_000_000, tolerance_ns=5_000_000).stamp_ns == 11 * S
    with pytest.raises(
        FrameLookupError, match=r"stamp 9\.000000000 is stale: older than every buffered frame"
    ):
        buffer.get(9 * S, tolerance_ns=5_000_000)
    with pytest.raises(FrameLookupError, match="frame_buffer_size"):
        buffer.get(9 * S)
    with pytest.raises(FrameLookupError, match="newer than the latest buffered frame"):
        buffer.get(13 * S)
    with pytest.raises(FrameLookupError, match=r"no buffered frame within 0\.001 s of stamp 11\.500000000"):
        buffer.get(11 * S + S // 2, tolerance_ns=1_000_000)
    buffer.clear()
    assert buffer.latest() is None
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        FrameBuffer(0)


def test_feature_cache_computes_once_under_concurrency() -> None:
    cache: FeatureCache[int] = FeatureCache(2)
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        time.sleep(0.05)
        return 42

    results: list[tuple[int, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(results) == [(42, False)] * 5 + [(42, True)]
    assert "k" in cache


def test_feature_cache_does_not_keep_failures_and_evicts_lru() -> None:
    cache: FeatureCache[str] = FeatureCache(2)

    def fail() -> str:
        raise RuntimeError("oom")

    with pytest.raises(RuntimeError, match="oom"):
        cache.get_or_compute("a", fail)
    assert "a" not in cache and len(cache) == 0
    assert cache.get_or_compute("a", lambda: "A") == ("A", True)
    cache.get_or_compute("b", lambda: "B")
    cache.get_or_compute("a", lambda: "unused")  # touch a: b becomes least recently used
    cache.get_or_compute("c", lambda: "C")
    assert "a" in cache and "c" in cache and "b" not in cache
