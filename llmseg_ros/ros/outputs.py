"""What the node publishes for one answered request, as plain data.

From a successful :class:`~llmseg_ros.ros.handler.SegmentationOutcome`: the mono8 mask
and the overlay (colour header), and, when the frame has depth, the masked depth
(depth header, ready for ``depth_image_proc``) and the point cloud of the selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmseg_ros.ros.depth import PointCloudData, depth_to_points, masked_depth, xyz_cloud
from llmseg_ros.ros.frames import HeaderData
from llmseg_ros.ros.handler import SegmentationOutcome
from llmseg_ros.ros.images import ImageData, mask_to_image, numpy_to_image, overlay_bgr


@dataclass
class FrameOutputs:
    """Topic payloads of one answer.

    Attributes:
        header: the colour frame's header (mask, overlay, segmentation).
        mask: mono8, 255 = selected.
        overlay: bgr8 debug image, or ``None`` when not asked for.
        depth_header: the depth image's header (masked depth, camera info, points).
        masked_depth: depth inside the mask, 0 (16UC1) / NaN (32FC1) elsewhere.
        camera_info: the depth image's CameraInfo message, republished unchanged.
        cloud: XYZ float32 points of the selection in the depth camera's optical frame.
        warnings: why a depth output could not be produced.
    """

    header: HeaderData
    mask: ImageData
    overlay: ImageData | None = None
    depth_header: HeaderData | None = None
    masked_depth: ImageData | None = None
    camera_info: Any = None
    cloud: PointCloudData | None = None
    warnings: list[str] = field(default_factory=list)


def build_outputs(outcome: SegmentationOutcome, *, overlay: bool = True, points: bool = True) -> FrameOutputs:
    """Payloads for every output topic of a successful outcome.

    Args:
        outcome: a successful request outcome (``success`` and ``result`` set).
        overlay: also draw the bgr8 overlay (reuses the one drawn for the response).
        points: also build the point cloud when the frame has depth.
    Raises:
        ValueError: the outcome is not a success.
    """
    if not outcome.success or outcome.result is None or outcome.frame is None:
        raise ValueError(
            "outputs exist only for a successful outcome (success=True with a result and a frame)"
        )
    frame, mask = outcome.frame, outcome.result.mask
    out = FrameOutputs(header=frame.header, mask=mask_to_image(mask))
    if overlay:
        bgr = outcome.overlay if outcome.overlay is not None else overlay_bgr(frame.rgb, mask)
        out.overlay = numpy_to_image(bgr, "bgr8")
    if frame.depth is None or frame.depth_encoding is None:
        return out
    out.depth_header = frame.depth_header
    out.camera_info = frame.camera_info
    out.masked_depth = numpy_to_image(
        masked_depth(frame.depth, frame.depth_encoding, mask), frame.depth_encoding
    )
    if points and frame.intrinsics is not None:
        try:
            out.cloud = xyz_cloud(depth_to_points(frame.depth, frame.depth_encoding, frame.intrinsics, mask))
        except ValueError as exc:
            out.warnings.append(f"no point cloud: {exc}")
    return out
