"""sensor_msgs/Image ↔ numpy on real ROS 2 message classes (rosbags), every encoding."""

from __future__ import annotations

import array

import numpy as np
import pytest
from ros_testing import image_msg, msg_type, typestore

from llmseg_ros.ros.images import (
    ENCODINGS,
    depth_from_message,
    image_to_numpy,
    is_empty_image,
    mask_to_image,
    numpy_to_image,
    overlay_bgr,
    rgb_from_message,
    to_rgb,
)

IMAGE = "sensor_msgs/msg/Image"


def sample(encoding: str, height: int = 5, width: int = 7) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, encoding)))
    info = ENCODINGS[encoding]
    shape = (height, width) if info.channels == 1 else (height, width, info.channels)
    if info.dtype is np.float32:
        return rng.uniform(0.1, 10.0, size=shape).astype(np.float32)
    return rng.integers(0, np.iinfo(np.dtype(info.dtype)).max, size=shape, endpoint=True).astype(info.dtype)


def cdr_round_trip(msg: object) -> object:
    store = typestore()
    return store.deserialize_cdr(store.serialize_cdr(msg, IMAGE), IMAGE)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize(("padding", "big_endian"), [(0, False), (3, False), (0, True), (5, True)])
def test_every_encoding_round_trips_through_a_serialized_message(
    encoding: str, padding: int, big_endian: bool
) -> None:
    pixels = sample(encoding)
    msg = cdr_round_trip(image_msg(pixels, encoding, 123, row_padding=padding, is_bigendian=big_endian))
    bpp = ENCODINGS[encoding].bytes_per_pixel
    assert msg.step == 7 * bpp + padding  # type: ignore[attr-defined]
    back = image_to_numpy(msg)
    assert back.dtype == pixels.dtype and back.shape == pixels.shape
    np.testing.assert_array_equal(back, pixels)
    assert back.dtype.byteorder in ("=", "|")  # native, whatever the wire order


def test_big_endian_bytes_are_read_big_endian() -> None:
    pixels = np.array([[0x0102, 0xA0B0]], dtype=np.uint16)
    data = numpy_to_image(pixels, "16UC1", is_bigendian=True)
    assert data.data.tolist() == [0x01, 0x02, 0xA0, 0xB0]
    little = numpy_to_image(pixels, "16UC1")
    assert little.data.tolist() == [0x02, 0x01, 0xB0, 0xA0]
    np.testing.assert_array_equal(image_to_numpy(image_msg(pixels, "16UC1", is_bigendian=True)), pixels)


def test_padding_bytes_are_ignored() -> None:
    pixels = sample("rgb8", 3, 4)
    msg = image_msg(pixels, "rgb8", row_padding=4)
    msg.data.reshape(3, -1)[:, -4:] = 77  # garbage in the padding must not leak into the pixels
    np.testing.assert_array_equal(image_to_numpy(msg), pixels)


@pytest.mark.parametrize("container", [bytes, bytearray, lambda b: array.array("B", b), list])
def test_rclpy_style_data_fields_are_accepted(container: object) -> None:
    pixels = sample("bgr8", 2, 3)
    ref = image_msg(pixels, "bgr8")
    raw = ref.data.tobytes()

    class Msg:  # what rclpy holds: uint8[] as array.array, or bytes/list when set by users
        height, width, encoding, is_bigendian, step = ref.height, ref.width, "bgr8", 0, ref.step
        data = container(raw)  # type: ignore[operator]

    np.testing.assert_array_equal(image_to_numpy(Msg()), pixels)


def test_to_rgb_channel_orders_by_hand() -> None:
    px = np.array([[[10, 20, 30, 40]]], dtype=np.uint8)
    assert to_rgb(px[:, :, :3], "rgb8").tolist() == [[[10, 20, 30]]]
    assert to_rgb(px[:, :, :3], "bgr8").tolist() == [[[30, 20, 10]]]
    assert to_rgb(px, "rgba8").tolist() == [[[10, 20, 30]]]
    assert to_rgb(px, "bgra8").tolist() == [[[30, 20, 10]]]
    assert to_rgb(np.array([[7]], np.uint8), "mono8").tolist() == [[[7, 7, 7]]]
    mono16 = np.array([[0, 257 * 200, 65535, 128]], np.uint16)
    assert to_rgb(mono16, "mono16")[0, :, 0].tolist() == [0, 200, 255, 0]
    for encoding in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"):
        out = to_rgb(sample(encoding), encoding)
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous


def test_rgb_and_depth_from_messages() -> None:
    rgb = sample("rgb8")
    np.testing.assert_array_equal(rgb_from_message(image_msg(rgb[:, :, ::-1].copy(), "bgr8")), rgb)
    depth = sample("16UC1")
    np.testing.assert_array_equal(depth_from_message(image_msg(depth, "16UC1")), depth)
    with pytest.raises(ValueError, match="depth encoding '32FC1'; expected one of"):
        rgb_from_message(image_msg(sample("32FC1"), "32FC1"))
    with pytest.raises(ValueError, match=r"encoding 'rgb8'; expected one of \['16UC1', '32FC1'\]"):
        depth_from_message(image_msg(rgb, "rgb8"))


def test_bad_messages_name_the_problem() -> None:
    msg = image_msg(sample("rgb8", 2, 3), "rgb8")
    msg.encoding = "yuv422"
    with pytest.raises(ValueError, match="unsupported image encoding 'yuv422'"):
        image_to_numpy(msg)
    msg = image_msg(sample("rgb8", 2, 3), "rgb8")
    msg.step = 8
    with pytest.raises(ValueError, match=r"step 8 is smaller than width × bytes per pixel = 3 × 3 = 9"):
        image_to_numpy(msg)
    msg = image_msg(sample("rgb8", 2, 3), "rgb8")
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match="has 17 bytes; expected step × height = 9 × 2 = 18"):
        image_to_numpy(msg)
    msg.height = 0
    with pytest.raises(ValueError, match="image is empty"):
        image_to_numpy(msg)
    with pytest.raises(ValueError, match=r"needs dtype uint16, got uint8"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "16UC1")
    with pytest.raises(ValueError, match=r"needs an array of shape \(H, W, 4\)"):
        numpy_to_image(np.zeros((2, 2, 3), np.uint8), "rgba8")


def test_empty_image_detection() -> None:
    assert is_empty_image(None)
    empty = msg_type(IMAGE)(header=image_msg(sample("mono8"), "mono8").header, height=0, width=0, encoding="",
                            is_bigendian=0, step=0, data=np.zeros(0, np.uint8))  # fmt: skip
    assert is_empty_image(empty)
    assert not is_empty_image(image_msg(sample("mono8"), "mono8"))


def test_mask_and_overlay_images() -> None:
    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:5] = True
    data = mask_to_image(mask)
    assert (data.encoding, data.step, data.height, data.width) == ("mono8", 6, 4, 6)
    assert set(np.unique(data.data).tolist()) == {0, 255}
    np.testing.assert_array_equal(data.data.reshape(4, 6) == 255, mask)
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 2] = 90  # blue in RGB
    bgr = overlay_bgr(rgb, mask)
    assert bgr.shape == (4, 6, 3) and bgr.dtype == np.uint8
    assert bgr[0, 0].tolist() == [90, 0, 0]  # outside the mask: the image, in BGR order
    assert not np.array_equal(bgr[mask], rgb[mask][:, ::-1])  # inside: tinted
