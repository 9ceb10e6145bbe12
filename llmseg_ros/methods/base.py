"""The interface every segmentation method implements.

A method turns a frame (prepared once) and an instruction into a :class:`SegmentResult`.
Models are shared through :class:`llmseg_ros.models.components.Components`, which loads each
one lazily and at most once, so switching methods never loads a model twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from llmseg_ros.config import SelectionConfig
from llmseg_ros.types import FrameFeatures, SegmentResult


@dataclass
class SegmentRequest:
    """One instruction on one frame.

    Attributes:
        instruction: the user's (possibly implicit) instruction, already validated
            (non-empty, within the configured length).
        selection: selection override for proposal-based methods; ``None`` = config's.
        explain: also generate the VLM's text answer (``SegmentResult.answer``).
        history: earlier (instruction, answer) turns of the same conversation on this
            frame, oldest first; the method puts them before the new instruction.
        is_sentence: whether the instruction is a sentence (True) or a phrase
            (False); ``None`` lets the method decide (``prompts.is_sentence``).
    """

    instruction: str
    selection: SelectionConfig | None = None
    explain: bool = False
    history: list[tuple[str, str]] = field(default_factory=list)
    is_sentence: bool | None = None


@runtime_checkable
class SegmentationMethod(Protocol):
    """What :class:`llmseg_ros.pipeline.ReasonSegmenter` calls."""

    name: str

    def prepare(self, image: np.ndarray) -> FrameFeatures:
        """Per-frame work that does not depend on the instruction.

        Args:
            image: (H, W, 3) uint8 RGB.
        """
        ...

    def segment(self, frame: FrameFeatures, request: SegmentRequest) -> SegmentResult:
        """Answer one instruction on a prepared frame."""
        ...
