"""Masked depth and ``sensor_msgs/PointCloud2`` construction, without ROS.

Geometry follows ROS's camera conventions (REP 103 / ``depth_image_proc``): the optical
frame has x right, y down, z forward; pixel (u, v) is column u, row v with integer
coordinates at pixel centres; the pinhole model maps a depth z at (u, v) to
``x = (u - cx) · z / fx``, ``y = (v - cy) · z / fy``. Depth is ``16UC1`` millimetres
(0 = no reading) or ``32FC1`` metres (NaN or 0 = no reading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmseg_ros.ros.images import DEPTH_ENCODINGS, message_bytes, uint_field

POINTFIELD_FLOAT32 = 7  # sensor_msgs/PointField.FLOAT32
_POINTFIELD_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
MILLIMETRE = 0.001


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels (from ``CameraInfo.k``), for an image of ``width`` × ``height``."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        values = {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy}
        if not all(isinstance(v, (int, float, np.floating, np.integer)) for v in values.values()):
            raise TypeError(f"intrinsics must be numbers, got {values}")
        bad = [f"{name}={float(v)}" for name, v in values.items() if not np.isfinite(v)]
        if bad:
            raise ValueError(f"intrinsics must be finite numbers, got {', '.join(bad)}")
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError(f"focal lengths must be finite and > 0, got fx={self.fx}, fy={self.fy}")
        if not all(isinstance(v, (int, np.integer)) and v >= 0 for v in (self.width, self.height)):
            raise ValueError(f"image size must be integers >= 0, got {self.width}×{self.height}")


def intrinsics_from_camera_info(info: Any) -> Intrinsics:
    """Read fx, fy, cx, cy from ``CameraInfo.k`` (3×3 row-major) and the image size.

    Raises:
        ValueError: ``k`` does not hold 9 numbers, one of them is not finite, its focal
            lengths are not positive (an uncalibrated camera publishes zeros), or the
            size is not two unsigned 32-bit integers.
    """
    try:
        k = np.asarray(info.k, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"CameraInfo.k must hold 9 numbers (3×3 row-major): {exc}") from None
    if k.size != 9:
        raise ValueError(f"CameraInfo.k must hold 9 numbers (3×3 row-major), got {k.size}")
    bad = np.flatnonzero(~np.isfinite(k))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"CameraInfo.k[{i}] is {float(k[i])}; every entry must be finite "
            "(k = [fx, 0, cx, 0, fy, cy, 0, 0, 1], pixels)"
        )
    if not (k[0] > 0 and k[4] > 0):
        raise ValueError(
            f"CameraInfo.k has fx={k[0]}, fy={k[4]}; expected positive focal lengths (is the camera calibrated?)"
        )
    return Intrinsics(
        fx=float(k[0]),
        fy=float(k[4]),
        cx=float(k[2]),
        cy=float(k[5]),
        width=uint_field(info, "width", "CameraInfo"),
        height=uint_field(info, "height", "CameraInfo"),
    )


def resize_mask_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) bool mask to ``shape`` (same field of view)."""
    h, w = mask.shape
    out_h, out_w = shape
    if (h, w) == (out_h, out_w):
        return mask.astype(bool, copy=False)
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return mask.astype(bool, copy=False)[rows[:, None], cols[None, :]]


def masked_depth(depth: np.ndarray, encoding: str, mask: np.ndarray) -> np.ndarray:
    """Depth where ``mask`` is set, "no reading" elsewhere (0 for 16UC1, NaN for 32FC1).

    Args:
        depth: (H, W) uint16 millimetres (16UC1) or float32 metres (32FC1).
        encoding: ``16UC1`` or ``32FC1``.
        mask: (h, w) bool; resized nearest-neighbour to (H, W) when the depth image is
            registered to the colour camera at another resolution.
    Returns:
        (H, W) array with the dtype of ``depth``.
    """
    _check_depth(depth, encoding)
    keep = resize_mask_nearest(mask, (depth.shape[0], depth.shape[1]))
    fill = 0 if encoding == "16UC1" else np.nan
    return np.where(keep, depth, np.asarray(fill, dtype=depth.dtype)).astype(depth.dtype)


def depth_to_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W) float32 metres with NaN where there is no reading (0, negative, NaN or inf)."""
    _check_depth(depth, encoding)
    metres = (
        depth.astype(np.float32) * np.float32(MILLIMETRE) if encoding == "16UC1" else depth.astype(np.float32)
    )
    return np.where(np.isfinite(metres) & (metres > 0), metres, np.float32(np.nan)).astype(np.float32)


def depth_to_points(
    depth: np.ndarray, encoding: str, intrinsics: Intrinsics, mask: np.ndarray | None = None
) -> np.ndarray:
    """Back-project valid depth pixels (optionally only inside ``mask``) to 3-D points.

    Args:
        depth: (H, W) uint16 millimetres (16UC1) or float32 metres (32FC1).
        encoding: ``16UC1`` or ``32FC1``.
        intrinsics: of the depth image; its size must match (H, W) unless it is 0 × 0.
        mask: optional (h, w) bool selection (resized nearest-neighbour to (H, W)).
    Returns:
        (N, 3) float32 XYZ in metres in the camera optical frame, row-major pixel order;
        pixels without a valid reading are dropped, and so are points whose coordinates
        are not finite in float32 (extreme intrinsics or depth): every point is finite.
    """
    metres = depth_to_metres(depth, encoding)
    h, w = metres.shape
    if (intrinsics.width, intrinsics.height) not in ((0, 0), (w, h)):
        raise ValueError(
            f"CameraInfo is for {intrinsics.width}×{intrinsics.height} pixels but the depth image is {w}×{h};"
            " publish the CameraInfo of the (registered) depth image"
        )
    valid = np.isfinite(metres)
    if mask is not None:
        valid &= resize_mask_nearest(mask, (h, w))
    v, u = np.nonzero(valid)
    z = metres[v, u].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing points are dropped below
        x = (u.astype(np.float64) - intrinsics.cx) * z / intrinsics.fx
        y = (v.astype(np.float64) - intrinsics.cy) * z / intrinsics.fy
        points = np.stack([x, y, z], axis=1).astype(np.float32)
    return points[np.isfinite(points).all(axis=1)]


@dataclass
class PointFieldData:
    """The fields of a ``sensor_msgs/PointField``."""

    name: str
    offset: int
    datatype: int
    count: int = 1


@dataclass
class PointCloudData:
    """The fields of a ``sensor_msgs/PointCloud2`` without its header (unorganised: height 1).

    ``is_dense`` is True only when every point is finite (no NaN / inf coordinate).
    """

    height: int
    width: int
    fields: list[PointFieldData]
    is_bigendian: bool
    point_step: int
    row_step: int
    data: np.ndarray
    is_dense: bool = True
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.float32), repr=False)


def xyz_cloud(points: np.ndarray) -> PointCloudData:
    """Pack (N, 3) XYZ metres into an unorganised PointCloud2 (x, y, z float32, little-endian, 12 bytes/point).

    Points are kept as given; ``is_dense`` says whether they are all finite.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got shape {points.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        packed = np.ascontiguousarray(points, dtype="<f4")
    n = int(packed.shape[0])
    return PointCloudData(
        height=1,
        width=n,
        fields=[PointFieldData(name, 4 * i, POINTFIELD_FLOAT32, 1) for i, name in enumerate(("x", "y", "z"))],
        is_bigendian=False,
        point_step=12,
        row_step=12 * n,
        data=packed.view(np.uint8).reshape(-1),
        is_dense=bool(np.isfinite(packed).all()),
        points=packed.astype(np.float32),
    )


def cloud_to_xyz(msg: Any) -> np.ndarray:
    """Read x, y, z of every point of a PointCloud2 (any layout, either byte order).

    Returns:
        (height × width, 3) float64.
    """
    offsets: dict[str, tuple[int, str]] = {}
    for fld in msg.fields:
        if int(fld.datatype) not in _POINTFIELD_DTYPES:
            raise ValueError(f"PointField {fld.name!r} has unknown datatype {fld.datatype}")
        offsets[str(fld.name)] = (int(fld.offset), _POINTFIELD_DTYPES[int(fld.datatype)])
    missing = [name for name in ("x", "y", "z") if name not in offsets]
    if missing:
        raise ValueError(f"PointCloud2 has no field(s) {missing}; fields are {list(offsets)}")
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    buf = message_bytes(msg.data)
    if buf.size < row_step * height:
        raise ValueError(
            f"PointCloud2 data has {buf.size} bytes; expected row_step × height = {row_step * height}"
        )
    order = ">" if bool(msg.is_bigendian) else "<"
    rows = buf[: row_step * height].reshape(height, row_step)[:, : point_step * width]
    points = np.ascontiguousarray(rows).reshape(height * width, point_step)
    out = np.empty((height * width, 3), dtype=np.float64)
    for i, name in enumerate(("x", "y", "z")):
        offset, code = offsets[name]
        size = np.dtype(code).itemsize
        out[:, i] = np.ascontiguousarray(points[:, offset : offset + size]).view(order + code)[:, 0]
    return out


def _check_depth(depth: np.ndarray, encoding: str) -> None:
    if encoding not in DEPTH_ENCODINGS:
        raise ValueError(f"depth encoding must be one of {list(DEPTH_ENCODINGS)}, got {encoding!r}")
    want = np.uint16 if encoding == "16UC1" else np.float32
    if depth.ndim != 2 or depth.dtype != want:
        raise ValueError(
            f"{encoding} depth must be (H, W) {np.dtype(want)}, got shape {depth.shape} {depth.dtype}"
        )
