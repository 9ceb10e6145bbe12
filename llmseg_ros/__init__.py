"""llmseg_ros: reasoning segmentation (LLM-Seg) for robots.

The library imports and runs without ROS 2; only :mod:`llmseg_ros.node` needs rclpy.
Heavy modules load lazily: ``from llmseg_ros import ReasonSegmenter`` imports the
pipeline on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmseg_ros.config import ProposalConfig, SegmenterConfig, SelectionConfig
from llmseg_ros.types import FrameFeatures, Proposals, SegmentResult

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmseg_ros.pipeline import ReasonSegmenter

__all__ = [
    "FrameFeatures",
    "ProposalConfig",
    "Proposals",
    "ReasonSegmenter",
    "SegmentResult",
    "SegmenterConfig",
    "SelectionConfig",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "ReasonSegmenter":
        from llmseg_ros.pipeline import ReasonSegmenter

        return ReasonSegmenter
    raise AttributeError(f"module 'llmseg_ros' has no attribute {name!r}")
