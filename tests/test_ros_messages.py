"""Outputs and message construction: the ReasonSegment response and the Segmentation message
built from an outcome serialise with the real definitions in srv/ and msg/ (rosbags CDR)."""

from __future__ import annotations

import array
from typing import Any

import numpy as np
import pytest
from ros_testing import (
    FakeSegmenter,
    camera_info_msg,
    colour_image,
    image_msg,
    msg_type,
    request_msg,
    typestore,
)

from llmseg_ros.ros.bag_replay import message_types
from llmseg_ros.ros.depth import cloud_to_xyz, depth_to_points
from llmseg_ros.ros.frames import FrameBuffer, frame_from_messages
from llmseg_ros.ros.handler import HandlerSettings, RequestHandler, SegmentationOutcome
from llmseg_ros.ros.images import image_to_numpy
from llmseg_ros.ros.messages import MessageBuilder, MessageTypes, NumpyArrays, PythonArrays
from llmseg_ros.ros.outputs import build_outputs

S = 1_000_000_000


def builder() -> MessageBuilder:
    types = message_types(typestore())
    types = MessageTypes(**{**types.__dict__, "response": msg_type("ReasonSegment_Response")})
    return MessageBuilder(types, NumpyArrays())


def cdr(msg: Any) -> Any:
    store = typestore()
    name = msg.__msgtype__
    return store.deserialize_cdr(store.serialize_cdr(msg, name), name)


def answered(with_depth: bool = True, overlay: bool = False) -> SegmentationOutcome:
    rgb = colour_image(24, 32)
    depth = np.full((24, 32), 1500, np.uint16)
    depth[0, 0] = 0
    frame = frame_from_messages(
        image_msg(rgb, "rgb8", 5 * S + 7, "color_optical"),
        image_msg(depth, "16UC1", 5 * S + 9, "depth_optical") if with_depth else None,
        camera_info_msg((30.0, 30.0, 15.5, 11.5), 32, 24, 5 * S + 9, "depth_optical") if with_depth else None,
    )
    buffer = FrameBuffer(2)
    buffer.add(frame)
    handler = RequestHandler(FakeSegmenter(), buffer, HandlerSettings(request_timeout_s=5.0))
    outcome = handler.handle(request_msg("the red things", return_overlay=overlay, conversation_id="c1"))
    assert outcome.success, outcome.message
    return outcome


def test_outputs_of_a_frame_with_depth() -> None:
    outcome = answered()
    out = build_outputs(outcome)
    assert outcome.result is not None
    mask = outcome.result.mask
    assert out.header.frame_id == "color_optical" and out.depth_header is not None
    assert out.depth_header.frame_id == "depth_optical" and out.depth_header.stamp_ns == 5 * S + 9
    assert out.mask.encoding == "mono8" and out.overlay is not None and out.overlay.encoding == "bgr8"
    assert out.masked_depth is not None and out.masked_depth.encoding == "16UC1"
    assert out.camera_info is outcome.frame.camera_info  # type: ignore[union-attr]
    assert out.cloud is not None and out.cloud.width == int(mask.sum()) - 1  # (0, 0) has no reading
    frame = outcome.frame
    assert frame is not None and frame.depth is not None and frame.intrinsics is not None
    np.testing.assert_array_equal(
        out.cloud.points, depth_to_points(frame.depth, "16UC1", frame.intrinsics, mask)
    )
    no_overlay = build_outputs(outcome, overlay=False, points=False)
    assert no_overlay.overlay is None and no_overlay.cloud is None and no_overlay.masked_depth is not None
    assert build_outputs(answered(with_depth=False)).masked_depth is None
    with pytest.raises(ValueError, match="outputs exist only for a successful outcome"):
        build_outputs(SegmentationOutcome(False, "nope"))


def test_response_serialises_with_the_srv_definition() -> None:
    outcome = answered(overlay=True)
    out = build_outputs(outcome)
    response = cdr(builder().response(outcome, out.mask, out.overlay))
    assert response.success and response.message.startswith("ok: ")
    mask_msg = response.mask
    assert (mask_msg.header.stamp.sec, mask_msg.header.stamp.nanosec, mask_msg.header.frame_id) == (
        5,
        7,
        "color_optical",
    )
    assert outcome.result is not None
    np.testing.assert_array_equal(image_to_numpy(mask_msg) == 255, outcome.result.mask)
    assert (response.frame_stamp.sec, response.frame_stamp.nanosec) == (5, 7)
    assert response.selected.tolist() == [0] and response.num_proposals == 2
    np.testing.assert_allclose(response.selected_similarity, [0.9])
    np.testing.assert_allclose(response.selected_iop, [0.8])
    assert response.confidence == pytest.approx(0.8) and response.method == "fake"
    assert list(response.stage_names) == list(outcome.timings)
    np.testing.assert_allclose(response.stage_seconds, list(outcome.timings.values()))
    assert response.overlay.encoding == "bgr8" and response.overlay.width == 32


def test_failure_response_has_empty_images() -> None:
    response = cdr(builder().response(SegmentationOutcome(False, "instruction is empty"), None, None))
    assert not response.success and response.message == "instruction is empty"
    assert response.mask.width == 0 and len(response.mask.data) == 0
    assert response.overlay.width == 0 and response.selected.size == 0
    assert (response.frame_stamp.sec, response.frame_stamp.nanosec) == (0, 0)


def test_segmentation_message_and_point_cloud_serialise() -> None:
    outcome = answered()
    out = build_outputs(outcome)
    b = builder()
    seg = cdr(b.segmentation(outcome, out.mask))
    assert seg.header.frame_id == "color_optical" and seg.instruction == "the red things"
    assert seg.conversation_id == "c1" and seg.mask.encoding == "mono8"
    assert out.cloud is not None and out.depth_header is not None
    cloud = cdr(b.point_cloud(out.cloud, out.depth_header))
    assert cloud.header.frame_id == "depth_optical"
    np.testing.assert_array_equal(cloud_to_xyz(cloud), out.cloud.points.astype(np.float64))
    depth = cdr(b.image(out.masked_depth, out.depth_header))
    assert (image_to_numpy(depth)[~outcome.result.mask] == 0).all()  # type: ignore[union-attr]


def test_python_arrays_use_rclpy_typecodes() -> None:
    arrays = PythonArrays()
    assert arrays.uint8(np.array([1, 2, 255], np.uint8)) == array.array("B", [1, 2, 255])
    assert arrays.int32([3, -1]).typecode == "i" and arrays.int32([3, -1]).tolist() == [3, -1]
    assert arrays.float32([0.5]).typecode == "f" and arrays.float32([0.5]).tolist() == [0.5]
    assert arrays.float64([0.25, 1.0]).typecode == "d" and arrays.float64([]).tolist() == []
