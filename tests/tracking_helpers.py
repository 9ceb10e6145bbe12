"""Helpers shared by the tracking tests."""

from __future__ import annotations

import numpy as np

from llmseg_ros.methods.common import proposal_free_result
from llmseg_ros.types import SegmentResult


def answer(mask: np.ndarray, method: str = "test", confidence: float = 0.9) -> SegmentResult:
    """Any method's answer with this mask (a track can start from any ``SegmentResult``)."""
    return proposal_free_result(method, mask, confidence, answer=None, timings={}, extras={})
