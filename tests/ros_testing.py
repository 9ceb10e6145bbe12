"""Shared helpers of the ROS-layer tests: rosbags message factories and fake segmenters.

Messages are real ROS 2 message classes from ``rosbags`` (Humble definitions), so the
code under test reads the same fields it reads on a robot.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.config import SegmenterConfig, SelectionConfig
from llmseg_ros.ros.frames import NS_PER_S
from llmseg_ros.ros.images import numpy_to_image
from llmseg_ros.types import FrameFeatures, Proposals, SegmentResult

REPO = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def typestore() -> Any:
    """Humble typestore + our msg/Segmentation.msg and srv/*.srv (from the repository files)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    store.register(
        get_types_from_msg((REPO / "msg" / "Segmentation.msg").read_text(), "llmseg_ros/msg/Segmentation")
    )
    for service in ("ReasonSegment", "StopTrack"):
        request, response = (REPO / "srv" / f"{service}.srv").read_text().split("\n---\n")
        store.register(get_types_from_msg(request, f"llmseg_ros/srv/{service}_Request"))
        store.register(get_types_from_msg(response, f"llmseg_ros/srv/{service}_Response"))
    return store


def msg_type(name: str) -> Any:
    """A message class by (possibly srv-normalised) type name, e.g. ``ReasonSegment_Request``."""
    types = typestore().types
    if name in types:
        return types[name]
    matches = [t for key, t in types.items() if key.endswith("/" + name)]
    assert len(matches) == 1, f"{name}: {[k for k in types if k.endswith(name)]}"
    return matches[0]


def header(stamp_ns: int, frame_id: str = "camera_color_optical_frame") -> Any:
    time_cls, header_cls = msg_type("builtin_interfaces/msg/Time"), msg_type("std_msgs/msg/Header")
    return header_cls(
        stamp=time_cls(sec=stamp_ns // NS_PER_S, nanosec=stamp_ns % NS_PER_S), frame_id=frame_id
    )


def image_msg(
    pixels: np.ndarray,
    encoding: str,
    stamp_ns: int = 0,
    frame_id: str = "camera_color_optical_frame",
    *,
    row_padding: int = 0,
    is_bigendian: bool = False,
) -> Any:
    """A rosbags ``sensor_msgs/msg/Image`` holding ``pixels``."""
    data = numpy_to_image(pixels, encoding, is_bigendian=is_bigendian, row_padding=row_padding)
    return msg_type("sensor_msgs/msg/Image")(
        header=header(stamp_ns, frame_id),
        height=data.height,
        width=data.width,
        encoding=encoding,
        is_bigendian=int(is_bigendian),
        step=data.step,
        data=data.data,
    )


def empty_image_msg() -> Any:
    return msg_type("sensor_msgs/msg/Image")(
        header=header(0, ""),
        height=0,
        width=0,
        encoding="",
        is_bigendian=0,
        step=0,
        data=np.zeros(0, np.uint8),
    )


def camera_info_msg(
    k: tuple[float, float, float, float],
    width: int,
    height: int,
    stamp_ns: int = 0,
    frame_id: str = "camera_depth_optical_frame",
) -> Any:
    """CameraInfo with fx, fy, cx, cy = ``k``."""
    fx, fy, cx, cy = k
    cls = msg_type("sensor_msgs/msg/CameraInfo")
    roi = msg_type("sensor_msgs/msg/RegionOfInterest")(
        x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
    )
    return cls(
        header=header(stamp_ns, frame_id),
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=np.array([fx, 0, cx, 0, fy, cy, 0, 0, 1], dtype=np.float64),
        r=np.eye(3).reshape(-1),
        p=np.array([fx, 0, cx, 0, 0, fy, cy, 0, 0, 0, 1, 0], dtype=np.float64),
        binning_x=0,
        binning_y=0,
        roi=roi,
    )


def request_msg(instruction: str, **fields: Any) -> Any:
    """A rosbags ``ReasonSegment`` request built from srv/ReasonSegment.srv (defaults = the srv's "unset" values)."""
    values: dict[str, Any] = {
        "instruction": instruction,
        "image": empty_image_msg(),
        "stamp": msg_type("builtin_interfaces/msg/Time")(sec=0, nanosec=0),
        "selection_strategy": "",
        "iop_threshold": -1.0,
        "return_overlay": False,
        "explain": False,
        "conversation_id": "",
        "track": False,
        "track_id": "",
    }
    if "stamp_ns" in fields:
        stamp_ns = fields.pop("stamp_ns")
        values["stamp"] = msg_type("builtin_interfaces/msg/Time")(
            sec=stamp_ns // NS_PER_S, nanosec=stamp_ns % NS_PER_S
        )
    values.update(fields)
    return msg_type("ReasonSegment_Request")(**values)


def colour_image(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB whose red channel is bright in the left half (what FakeSegmenter selects)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 100, size=(height, width, 3), dtype=np.uint8)
    rgb[:, : width // 2, 0] = 200
    return rgb


class FakeSegmenter:
    """Deterministic stand-in for ``ReasonSegmenter`` with the same call signatures.

    Two proposals: red-bright pixels (index 0) and the rest (index 1). ``segment`` selects
    proposal 0. Instructions starting with ``slow`` sleep ``slow_s``; ``explode`` raises.
    Records calls and the largest number of concurrent model calls.
    """

    def __init__(
        self,
        *,
        prepare_s: float = 0.0,
        slow_s: float = 0.5,
        config: SegmenterConfig | None = None,
        wrong_mask_shape: bool = False,
    ) -> None:
        self.config = config or SegmenterConfig()
        self.prepare_s = prepare_s
        self.slow_s = slow_s
        self.wrong_mask_shape = wrong_mask_shape
        self.prepare_calls = 0
        self.segment_calls: list[dict[str, Any]] = []
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()

    def _enter(self) -> None:
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
            self.idle.clear()

    def _exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.idle.set()

    def prepare(self, image: np.ndarray) -> FrameFeatures:
        self._enter()
        try:
            time.sleep(self.prepare_s)
            with self._lock:
                self.prepare_calls += 1
            red = image[:, :, 0] > 150
            masks = np.stack([red, ~red])
            proposals = Proposals(
                masks=masks,
                predicted_iou=np.ones(2, np.float32),
                stability_score=np.ones(2, np.float32),
                boxes=np.zeros((2, 4), np.float32),
                point_coords=np.zeros((2, 2), np.float32),
            )
            return FrameFeatures(image=image, proposals=proposals, timings={"proposals": self.prepare_s})
        finally:
            self._exit()

    def segment(
        self,
        frame_or_image: FrameFeatures | np.ndarray,
        instruction: str,
        *,
        selection: SelectionConfig | None = None,
        explain: bool = False,
        conversation_id: str | None = None,
    ) -> SegmentResult:
        self._enter()
        try:
            frame = (
                frame_or_image if isinstance(frame_or_image, FrameFeatures) else self.prepare(frame_or_image)
            )
            self.segment_calls.append(
                {
                    "instruction": instruction,
                    "selection": selection,
                    "explain": explain,
                    "conversation_id": conversation_id,
                    "frame": frame,
                }
            )
            if instruction.startswith("slow"):
                time.sleep(self.slow_s)
            if instruction == "explode":
                raise RuntimeError("boom: the model ran out of memory")
            mask = frame.proposals.masks[0]
            if self.wrong_mask_shape:
                mask = mask[:-1]
            return SegmentResult(
                mask=mask.copy(),
                selected=[0],
                similarity=np.array([0.9, -0.2], np.float32),
                iop=np.array([0.8, 0.1], np.float32),
                confidence=0.8,
                num_proposals=2,
                method="fake",
                answer="It is the red part." if explain else None,
                timings={"vlm": 0.001, "selector": 0.0005},
            )
        finally:
            self._exit()
