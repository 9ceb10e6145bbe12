"""Masked depth and PointCloud2 construction, checked point-by-point against the pinhole model."""

from __future__ import annotations

import numpy as np
import pytest
from ros_testing import camera_info_msg, msg_type, typestore

from llmseg_ros.ros.bag_replay import message_types
from llmseg_ros.ros.depth import (
    Intrinsics,
    cloud_to_xyz,
    depth_to_points,
    intrinsics_from_camera_info,
    masked_depth,
    resize_mask_nearest,
    xyz_cloud,
)
from llmseg_ros.ros.frames import HeaderData
from llmseg_ros.ros.messages import MessageBuilder, NumpyArrays

FX, FY, CX, CY = 50.0, 40.0, 9.5, 5.0
K = Intrinsics(FX, FY, CX, CY, width=20, height=12)


def synthetic_depth_mm() -> np.ndarray:
    """A tilted plane in millimetres with holes (0 = no reading)."""
    v, u = np.mgrid[0:12, 0:20]
    depth = (1000 + 10 * u + 25 * v).astype(np.uint16)
    depth[3, 4] = 0
    depth[7, 11] = 0
    return depth


def pinhole_reference(depth_m: np.ndarray, mask: np.ndarray) -> list[tuple[float, float, float]]:
    """Independent per-pixel loop: x = (u - cx) z / fx, y = (v - cy) z / fy."""
    points = []
    for v in range(depth_m.shape[0]):
        for u in range(depth_m.shape[1]):
            z = float(depth_m[v, u])
            if mask[v, u] and np.isfinite(z) and z > 0:
                points.append(((u - CX) * z / FX, (v - CY) * z / FY, z))
    return points


def test_points_match_the_pinhole_model_point_by_point_16uc1() -> None:
    depth = synthetic_depth_mm()
    mask = np.zeros((12, 20), bool)
    mask[2:9, 3:15] = True
    points = depth_to_points(depth, "16UC1", K, mask)
    expected = pinhole_reference(depth.astype(np.float64) / 1000.0, mask)
    assert points.dtype == np.float32 and points.shape == (len(expected), 3)
    assert len(expected) == 7 * 12 - 2  # the two holes inside the mask are dropped
    for got, want in zip(points, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_points_32fc1_drop_nan_zero_negative_and_inf() -> None:
    depth = synthetic_depth_mm().astype(np.float32) / 1000.0
    depth[0, 0], depth[0, 1], depth[0, 2], depth[0, 3] = np.nan, 0.0, -1.0, np.inf
    mask = np.ones((12, 20), bool)
    points = depth_to_points(depth, "32FC1", K, mask)
    expected = pinhole_reference(depth.astype(np.float64), mask)
    assert len(expected) == 240 - 4 - 2
    np.testing.assert_allclose(points, np.array(expected), rtol=1e-6, atol=1e-6)
    # corner pixel (u=19, v=11) by hand
    z = depth[11, 19]
    np.testing.assert_allclose(points[-1], [(19 - CX) * z / FX, (11 - CY) * z / FY, z], rtol=1e-6)


def test_masked_depth_fills_no_reading_outside_the_mask() -> None:
    mask = np.zeros((12, 20), bool)
    mask[4:6, 5:8] = True
    depth = synthetic_depth_mm()
    out = masked_depth(depth, "16UC1", mask)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[mask], depth[mask])
    assert (out[~mask] == 0).all()
    metres = depth.astype(np.float32) / 1000.0
    out32 = masked_depth(metres, "32FC1", mask)
    assert out32.dtype == np.float32
    np.testing.assert_array_equal(out32[mask], metres[mask])
    assert np.isnan(out32[~mask]).all()


def test_mask_is_resized_nearest_to_a_registered_depth_of_another_size() -> None:
    mask = np.zeros((24, 40), bool)
    mask[:, :20] = True  # left half at colour resolution
    small = resize_mask_nearest(mask, (12, 20))
    assert small.shape == (12, 20) and small[:, :10].all() and not small[:, 10:].any()
    out = masked_depth(synthetic_depth_mm(), "16UC1", mask)
    assert (out[:, 10:] == 0).all() and (out[:, :10] > 0).sum() == 12 * 10 - 1  # hole at (3, 4)


def test_intrinsics_from_camera_info_and_errors() -> None:
    info = camera_info_msg((FX, FY, CX, CY), 20, 12)
    assert intrinsics_from_camera_info(info) == K
    info.k = np.zeros(9)
    with pytest.raises(ValueError, match="expected positive focal lengths"):
        intrinsics_from_camera_info(info)
    with pytest.raises(ValueError, match="CameraInfo is for 20×12 pixels but the depth image is 10×12"):
        depth_to_points(np.ones((12, 10), np.uint16), "16UC1", K)
    with pytest.raises(ValueError, match=r"16UC1 depth must be \(H, W\) uint16"):
        depth_to_points(np.ones((12, 20), np.float32), "16UC1", K)
    with pytest.raises(ValueError, match="depth encoding must be one of"):
        masked_depth(np.ones((2, 2), np.uint16), "mono16", np.ones((2, 2), bool))


def test_point_cloud_message_round_trip_through_cdr() -> None:
    points = depth_to_points(synthetic_depth_mm(), "16UC1", K, np.ones((12, 20), bool))
    cloud = xyz_cloud(points)
    assert (cloud.height, cloud.width, cloud.point_step, cloud.row_step) == (
        1,
        len(points),
        12,
        12 * len(points),
    )
    assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
        ("x", 0, 7, 1),
        ("y", 4, 7, 1),
        ("z", 8, 7, 1),
    ]
    store = typestore()
    builder = MessageBuilder(message_types(store), NumpyArrays())
    msg = builder.point_cloud(cloud, HeaderData(1_700_000_000_123_456_789, "camera_depth_optical_frame"))
    name = "sensor_msgs/msg/PointCloud2"
    back = store.deserialize_cdr(store.serialize_cdr(msg, name), name)
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert back.header.frame_id == "camera_depth_optical_frame" and back.is_dense and not back.is_bigendian
    np.testing.assert_array_equal(cloud_to_xyz(back), points.astype(np.float64))


def test_cloud_reader_handles_big_endian_and_padded_points() -> None:
    pts = np.array([[1.5, -2.0, 3.25], [0.0, 4.0, -1.0]])
    rec = np.zeros(2, dtype=[("pad", ">f4"), ("x", ">f4"), ("y", ">f4"), ("z", ">f4"), ("i", ">f4")])
    rec["x"], rec["y"], rec["z"] = pts.T
    field = msg_type("sensor_msgs/msg/PointField")
    msg = msg_type("sensor_msgs/msg/PointCloud2")(
        header=msg_type("std_msgs/msg/Header")(
            stamp=msg_type("builtin_interfaces/msg/Time")(sec=0, nanosec=0), frame_id="f"
        ),
        height=1,
        width=2,
        fields=[field(name=n, offset=o, datatype=7, count=1) for n, o in (("x", 4), ("y", 8), ("z", 12))],
        is_bigendian=True,
        point_step=20,
        row_step=40,
        data=rec.view(np.uint8).copy(),
        is_dense=True,
    )
    np.testing.assert_array_equal(cloud_to_xyz(msg), pts)
    msg.fields = msg.fields[:2]
    with pytest.raises(ValueError, match=r"no field\(s\) \['z'\]"):
        cloud_to_xyz(msg)


@pytest.mark.parametrize(
    ("index", "value"),
    [(2, np.nan), (5, np.inf), (2, -np.inf), (0, np.nan), (4, np.inf), (8, np.nan), (1, np.inf)],
)
def test_camera_info_with_a_non_finite_k_entry_is_refused(index: int, value: float) -> None:
    info = camera_info_msg((FX, FY, CX, CY), 20, 12)
    info.k = info.k.copy()
    info.k[index] = value
    with pytest.raises(ValueError, match=rf"CameraInfo.k\[{index}\] is {value}; every entry must be finite"):
        intrinsics_from_camera_info(info)
    with pytest.raises(ValueError, match="cx=nan"):
        Intrinsics(FX, FY, float("nan"), CY, width=20, height=12)


def test_a_frame_with_non_finite_intrinsics_is_refused_before_anything_is_published() -> None:
    from ros_testing import colour_image, image_msg

    from llmseg_ros.ros.frames import frame_from_messages

    info = camera_info_msg((FX, FY, float("nan"), float("inf")), 20, 12)
    with pytest.raises(ValueError, match=r"CameraInfo\.k"):
        frame_from_messages(
            image_msg(colour_image(12, 20), "rgb8"), image_msg(synthetic_depth_mm(), "16UC1"), info
        )


def test_a_bad_camera_info_costs_the_frame_its_depth_not_its_mask() -> None:
    from ros_testing import colour_image, image_msg

    from llmseg_ros.ros.frames import frame_keeping_colour

    colour, depth = image_msg(colour_image(12, 20), "rgb8"), image_msg(synthetic_depth_mm(), "16UC1")
    bad = camera_info_msg((FX, FY, float("nan"), CY), 20, 12)
    frame, problem = frame_keeping_colour(colour, depth, bad)
    assert frame.rgb.shape == (12, 20, 3) and frame.depth is None and frame.intrinsics is None
    assert problem is not None and "CameraInfo.k" in problem
    frame, problem = frame_keeping_colour(colour, depth, camera_info_msg((FX, FY, CX, CY), 20, 12))
    assert problem is None and frame.depth is not None and frame.intrinsics is not None
    with pytest.raises(ValueError, match="encoding"):  # the colour image itself is still checked
        frame_keeping_colour(image_msg(colour_image(12, 20), "yuv422_yuy2_bad"), depth, bad)


def test_cloud_is_dense_only_when_every_point_is_finite() -> None:
    # finite but extreme intrinsics overflow float32: those points are dropped, never published
    extreme = Intrinsics(FX, 1e-300, CX, CY, width=20, height=12)
    points = depth_to_points(synthetic_depth_mm(), "16UC1", extreme)
    assert np.isfinite(points).all()
    assert len(points) == 20 and (points[:, 1] == 0).all()  # only row v == cy stays finite
    assert xyz_cloud(points).is_dense
    mixed = np.array([[0.0, 1.0, 2.0], [np.nan, 1.0, 2.0], [0.5, np.inf, 1.0]], np.float32)
    cloud = xyz_cloud(mixed)
    assert not cloud.is_dense and cloud.width == 3  # points are kept as given, flagged honestly
    assert xyz_cloud(np.zeros((0, 3), np.float32)).is_dense
