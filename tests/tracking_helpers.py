"""Helpers shared by the tracking tests."""

from __future__ import annotations

import numpy as np

from llmseg_ros.methods.common import proposal_free_result
from llmseg_ros.ros.frames import Frame, HeaderData
from llmseg_ros.types import SegmentResult


def answer(mask: np.ndarray, method: str = "test", confidence: float = 0.9) -> SegmentResult:
    """Any method's answer with this mask (a track can start from any ``SegmentResult``)."""
    return proposal_free_result(method, mask, confidence, answer=None, timings={}, extras={})


def frame_at(image: np.ndarray, stamp_ns: int) -> Frame:
    """A camera frame of ``image`` with header stamp ``stamp_ns`` (frame id ``camera_optical``)."""
    return Frame(header=HeaderData(stamp_ns, "camera_optical"), rgb=image)


def box_mask(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) bool mask of ``image``'s size, True inside ``box`` (x0, y0, x1, y1, exclusive ends)."""
    x0, y0, x1, y1 = box
    mask = np.zeros(image.shape[:2], bool)
    mask[y0:y1, x0:x1] = True
    return mask
