"""Build ROS messages from the plain data of this package, for any message implementation.

The message classes are injected (:class:`MessageTypes`) and so is the representation of
primitive arrays (:class:`ArrayAdapter`): rclpy wants ``array.array`` for ``uint8[]`` /
``int32[]`` / ``float32[]`` / ``float64[]`` sequences (its fast path), ``rosbags`` wants
numpy arrays. Every message is created with keyword arguments, which both accept.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llmseg_ros.ros.depth import PointCloudData
from llmseg_ros.ros.frames import HeaderData, ns_to_sec_nanosec
from llmseg_ros.ros.handler import SegmentationOutcome
from llmseg_ros.ros.images import ImageData


class ArrayAdapter(Protocol):
    """Converts values into the field type a message implementation expects."""

    def uint8(self, data: np.ndarray) -> Any: ...

    def int32(self, values: list[int]) -> Any: ...

    def float32(self, values: list[float]) -> Any: ...

    def float64(self, values: list[float]) -> Any: ...


class NumpyArrays:
    """Primitive arrays as numpy arrays (``rosbags`` message classes)."""

    def uint8(self, data: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)

    def int32(self, values: list[int]) -> np.ndarray:
        return np.asarray(values, dtype=np.int32)

    def float32(self, values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)

    def float64(self, values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)


class PythonArrays:
    """Primitive arrays as ``array.array`` (rclpy's fast path for sequence fields)."""

    def uint8(self, data: np.ndarray) -> array.array[int]:
        return array.array("B", np.ascontiguousarray(data, dtype=np.uint8).tobytes())

    def int32(self, values: list[int]) -> array.array[int]:
        return array.array("i", np.asarray(values, dtype=np.int32).tobytes())

    def float32(self, values: list[float]) -> array.array[float]:
        return array.array("f", np.asarray(values, dtype=np.float32).tobytes())

    def float64(self, values: list[float]) -> array.array[float]:
        return array.array("d", np.asarray(values, dtype=np.float64).tobytes())


@dataclass(frozen=True)
class MessageTypes:
    """The message classes to build (``std_msgs/Header``, ``builtin_interfaces/Time``, ...).

    ``response`` is the ``ReasonSegment`` service response class (optional: only the
    node and the tests build responses).
    """

    header: Any
    time: Any
    image: Any
    point_field: Any
    point_cloud: Any
    segmentation: Any
    response: Any = None


class MessageBuilder:
    """Creates messages of :class:`MessageTypes` from this package's plain data."""

    def __init__(self, types: MessageTypes, arrays: ArrayAdapter) -> None:
        self.types = types
        self.arrays = arrays

    def time(self, stamp_ns: int) -> Any:
        sec, nanosec = ns_to_sec_nanosec(stamp_ns)
        return self.types.time(sec=sec, nanosec=nanosec)

    def header(self, header: HeaderData) -> Any:
        return self.types.header(stamp=self.time(header.stamp_ns), frame_id=header.frame_id)

    def image(self, data: ImageData | None, header: HeaderData | None) -> Any:
        """An Image message; ``data=None`` gives the empty image (0 × 0, no encoding)."""
        h = self.header(header if header is not None else HeaderData(0, ""))
        if data is None:
            return self.types.image(
                header=h,
                height=0,
                width=0,
                encoding="",
                is_bigendian=0,
                step=0,
                data=self.arrays.uint8(np.zeros(0, dtype=np.uint8)),
            )
        return self.types.image(
            header=h,
            height=int(data.height),
            width=int(data.width),
            encoding=data.encoding,
            is_bigendian=int(bool(data.is_bigendian)),
            step=int(data.step),
            data=self.arrays.uint8(data.data),
        )

    def point_cloud(self, cloud: PointCloudData, header: HeaderData) -> Any:
        fields = [
            self.types.point_field(
                name=f.name, offset=int(f.offset), datatype=int(f.datatype), count=int(f.count)
            )
            for f in cloud.fields
        ]
        return self.types.point_cloud(
            header=self.header(header),
            height=int(cloud.height),
            width=int(cloud.width),
            fields=fields,
            is_bigendian=bool(cloud.is_bigendian),
            point_step=int(cloud.point_step),
            row_step=int(cloud.row_step),
            data=self.arrays.uint8(cloud.data),
            is_dense=bool(cloud.is_dense),
        )

    def _result_fields(self, outcome: SegmentationOutcome) -> dict[str, Any]:
        selected, similarity, iop = outcome.selected_scores()
        result = outcome.result
        return {
            "selected": self.arrays.int32(selected),
            "selected_similarity": self.arrays.float32(similarity),
            "selected_iop": self.arrays.float32(iop),
            "num_proposals": int(result.num_proposals) if result is not None else 0,
            "confidence": float(result.confidence) if result is not None else 0.0,
            "method": result.method if result is not None else "",
            "answer": (result.answer or "") if result is not None else "",
            "stage_names": list(outcome.timings),
            "stage_seconds": self.arrays.float64([float(v) for v in outcome.timings.values()]),
        }

    def segmentation(
        self, outcome: SegmentationOutcome, mask: ImageData | None, header: HeaderData | None = None
    ) -> Any:
        """The ``llmseg_ros/msg/Segmentation`` of a successful outcome.

        Args:
            mask: the mono8 mask, or ``None`` for an empty image (a track's end without a frame).
            header: the colour header; ``None`` = the outcome frame's.
        """
        if header is None:
            if outcome.frame is None:
                raise ValueError("a Segmentation message needs the outcome's frame or a header")
            header = outcome.frame.header
        return self.types.segmentation(
            header=self.header(header),
            instruction=outcome.instruction,
            conversation_id=outcome.conversation_id,
            mask=self.image(mask, header),
            track_id=outcome.track_id,
            track_state=outcome.track_state,
            track_reason=outcome.track_reason,
            **self._result_fields(outcome),
        )

    def response(
        self, outcome: SegmentationOutcome, mask: ImageData | None, overlay: ImageData | None
    ) -> Any:
        """The ``ReasonSegment`` response (empty mask / overlay when not given)."""
        if self.types.response is None:
            raise ValueError("MessageTypes.response is not set; cannot build a ReasonSegment response")
        header = outcome.frame.header if outcome.frame is not None else None
        return self.types.response(
            success=bool(outcome.success),
            message=outcome.message,
            mask=self.image(mask, header),
            frame_stamp=self.time(outcome.frame_stamp_ns),
            overlay=self.image(overlay, header if overlay is not None else None),
            track_id=outcome.track_id,
            **self._result_fields(outcome),
        )
