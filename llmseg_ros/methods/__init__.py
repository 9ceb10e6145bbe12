"""Segmentation methods behind one switch (``SegmenterConfig.method``).

Each builder takes :class:`llmseg_ros.models.components.Components` and returns an object that
implements :class:`llmseg_ros.methods.base.SegmentationMethod`. Imports are lazy so that
choosing one method never imports another's dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmseg_ros.methods.base import SegmentationMethod, SegmentRequest

if TYPE_CHECKING:
    from llmseg_ros.models.components import Components

__all__ = ["SegmentRequest", "SegmentationMethod", "build_method"]


def _llmseg(components: Components) -> SegmentationMethod:
    from llmseg_ros.methods.llmseg import LLMSegMethod

    return LLMSegMethod.from_components(components)


def _lisa(components: Components) -> SegmentationMethod:
    from llmseg_ros.methods.lisa import LisaMethod

    return LisaMethod.from_components(components)


def _grounded(components: Components) -> SegmentationMethod:
    from llmseg_ros.methods.grounded import GroundedMethod

    return GroundedMethod.from_components(components)


def _vlm_grounding(components: Components) -> SegmentationMethod:
    from llmseg_ros.methods.vlm_grounding import VLMGroundingMethod

    return VLMGroundingMethod(components.chat_vlm(), components.sam())


def _vlm_marks(components: Components) -> SegmentationMethod:
    from llmseg_ros.methods.vlm_marks import VLMMarksMethod

    return VLMMarksMethod(components.chat_vlm(), components.proposal_generator())


_BUILDERS: dict[str, Callable[[Components], SegmentationMethod]] = {
    "llmseg": _llmseg,
    "lisa": _lisa,
    "grounded": _grounded,
    "vlm_grounding": _vlm_grounding,
    "vlm_marks": _vlm_marks,
}


def build_method(components: Components) -> SegmentationMethod:
    """Build the method named by ``components.config.method`` on those components."""
    name = components.config.method
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is not available; expected one of {sorted(_BUILDERS)}") from None
    return builder(components)
