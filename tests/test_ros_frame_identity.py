"""Cached per-frame features belong to the exact pixels they were computed from: a frame
re-published with a stamp and frame id already buffered (new pixels, or a new resolution)
is answered from its own pixels, through the handler, the background precompute and the
bag replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from ros_testing import FakeSegmenter, colour_image, image_msg, request_msg

from llmseg_ros.ros.bag_replay import replay_bag
from llmseg_ros.ros.frames import Frame, FrameBuffer, HeaderData
from llmseg_ros.ros.handler import HandlerSettings, RequestHandler
from llmseg_ros.ros.images import image_to_numpy
from llmseg_ros.ros.precompute import BackgroundPrecomputer
from llmseg_ros.ros.schedule import ReplaySchedule

S = 1_000_000_000


def red_right_half(height: int = 24, width: int = 32) -> np.ndarray:
    """The mirror image of ``colour_image``: bright red in the right half."""
    return np.ascontiguousarray(colour_image(height, width, seed=7)[:, ::-1])


def frame(stamp_ns: int, rgb: np.ndarray, frame_id: str = "camera") -> Frame:
    return Frame(header=HeaderData(stamp_ns, frame_id), rgb=rgb)


def handler_for(buffer: FrameBuffer, seg: FakeSegmenter) -> RequestHandler:
    return RequestHandler(seg, buffer, HandlerSettings(request_timeout_s=5.0))


def test_frame_identity_follows_the_pixels() -> None:
    a, b = colour_image(seed=1), red_right_half()
    assert frame(S, a).cache_key == frame(S, a.copy()).cache_key  # same content: same identity
    assert frame(S, a).cache_key != frame(S, b).cache_key  # new pixels
    assert frame(S, a).cache_key != frame(S, colour_image(30, 40, seed=1)).cache_key  # new resolution
    assert frame(S, a).cache_key != frame(S, a, "other").cache_key
    flat = np.zeros((2, 6, 3), np.uint8)
    assert frame(S, flat).cache_key != frame(S, flat.reshape(6, 2, 3)).cache_key  # same bytes, other shape


def test_republished_frame_with_new_pixels_gets_its_own_mask() -> None:
    buffer = FrameBuffer(4)
    seg = FakeSegmenter()
    handler = handler_for(buffer, seg)
    buffer.add(frame(5 * S, colour_image(seed=1)))
    first = handler.handle(request_msg("the red things", stamp_ns=5 * S))
    assert first.success and first.result is not None
    np.testing.assert_array_equal(first.result.mask, colour_image(seed=1)[:, :, 0] > 150)

    replacement = red_right_half()
    buffer.add(frame(5 * S, replacement))  # same stamp and frame id, new pixels
    second = handler.handle(request_msg("the red things", stamp_ns=5 * S))
    assert second.success and second.result is not None
    np.testing.assert_array_equal(second.result.mask, replacement[:, :, 0] > 150)
    assert seg.prepare_calls == 2
    latest = handler.handle(request_msg("the red things"))  # the latest frame is the replacement too
    assert latest.result is not None
    np.testing.assert_array_equal(latest.result.mask, replacement[:, :, 0] > 150)


def test_republished_frame_with_a_new_resolution_is_answered_at_that_resolution() -> None:
    buffer = FrameBuffer(2)
    handler = handler_for(buffer, FakeSegmenter())
    buffer.add(frame(5 * S, colour_image(24, 32, seed=1)))
    assert handler.handle(request_msg("the red things")).success
    bigger = colour_image(30, 40, seed=2)
    buffer.add(frame(5 * S, bigger))
    outcome = handler.handle(request_msg("the red things"))
    assert outcome.success, outcome.message
    assert outcome.result is not None and outcome.result.mask.shape == (30, 40)
    np.testing.assert_array_equal(outcome.result.mask, bigger[:, :, 0] > 150)


def test_replacing_or_evicting_a_frame_drops_its_features_and_identical_content_shares_them() -> None:
    buffer = FrameBuffer(2)
    seg = FakeSegmenter()
    handler = handler_for(buffer, seg)
    old = frame(1 * S, colour_image(seed=1))
    buffer.add(old)
    handler.features_for(old)
    assert handler.has_features(old)
    same = frame(1 * S, colour_image(seed=1))  # the same pixels re-sent: features still valid
    buffer.add(same)
    assert handler.has_features(same) and seg.prepare_calls == 1
    new = frame(1 * S, red_right_half())
    buffer.add(new)
    assert not handler.has_features(old) and not handler.has_features(new)
    handler.features_for(new)
    buffer.add(frame(2 * S, colour_image(seed=2)))
    buffer.add(frame(3 * S, colour_image(seed=3)))  # evicts the frame at 1 s
    assert not handler.has_features(new)


def test_precompute_takes_a_same_stamp_frame_with_new_pixels() -> None:
    seg = FakeSegmenter()
    buffer = FrameBuffer(4)
    handler = handler_for(buffer, seg)
    worker = BackgroundPrecomputer(handler.features_for)
    try:
        first = frame(1 * S, colour_image(seed=1))
        buffer.add(first)
        assert worker.submit(first)
        assert worker.wait_idle(5.0)
        assert not worker.submit(frame(1 * S, colour_image(seed=1)))  # same pixels again: nothing to do
        replacement = frame(1 * S, red_right_half())
        buffer.add(replacement)
        assert worker.submit(replacement)
        assert worker.wait_idle(5.0)
        assert handler.has_features(replacement) and seg.prepare_calls == 2
    finally:
        worker.close()
    outcome = handler.handle(request_msg("the red things", stamp_ns=1 * S))
    assert outcome.result is not None and "proposals" not in outcome.timings
    np.testing.assert_array_equal(outcome.result.mask, replacement.rgb[:, :, 0] > 150)


def test_bag_whose_frames_share_one_stamp_answers_each_frame_from_its_pixels(tmp_path: Path) -> None:
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    stamp = 100 * S
    images = [colour_image(seed=0), red_right_half(), colour_image(30, 40, seed=2), red_right_half(30, 40)]
    with Writer(tmp_path / "in", version=8, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/camera/image", "sensor_msgs/msg/Image", typestore=store)
        for i, rgb in enumerate(images):
            msg = image_msg(rgb, "rgb8", stamp, "color_optical")  # every frame carries frame 0's stamp
            writer.write(conn, stamp + i * S // 10, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
    schedule = ReplaySchedule.from_mapping(yaml.safe_load("instruction: the red things"))
    summary = replay_bag(
        tmp_path / "in", tmp_path / "out", schedule, FakeSegmenter(), progress=False, log=print
    )
    assert (summary.frames, summary.processed, summary.failed) == (4, 4, 0), summary.messages
    with AnyReader([tmp_path / "out"]) as reader:
        masks = [
            image_to_numpy(reader.deserialize(raw, c.msgtype)) == 255
            for c, _, raw in reader.messages(
                connections=[c for c in reader.connections if c.topic == "/llmseg/mask"]
            )
        ]
    assert len(masks) == 4
    for mask, rgb in zip(masks, images):
        np.testing.assert_array_equal(mask, rgb[:, :, 0] > 150)
