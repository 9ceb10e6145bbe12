"""Result and feature containers shared by every stage of the pipeline.

Conventions used throughout the package:

* images are ``(H, W, 3) uint8`` RGB numpy arrays;
* masks are ``bool`` arrays at the resolution of the image they belong to;
* boxes are XYXY in pixels of that image (x to the right, y down, inclusive-exclusive
  like ``segment_anything``'s ``batched_mask_to_box``);
* timings are seconds, keyed by stage name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Proposals:
    """Class-agnostic mask proposals for one image, largest area first.

    Attributes:
        masks: (K, H, W) bool, at the resolution of the image given to the generator.
        predicted_iou: (K,) float32, SAM's IoU prediction for each mask.
        stability_score: (K,) float32, SAM's stability score for each mask.
        boxes: (K, 4) float32 XYXY pixel boxes of each mask.
        point_coords: (K, 2) float32 XY pixel coordinates of the point prompt that
            produced each mask (in the input image's pixels).
    """

    masks: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    boxes: np.ndarray
    point_coords: np.ndarray

    def __post_init__(self) -> None:
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (K, H, W), got shape {self.masks.shape}")
        k = self.masks.shape[0]
        for name in ("predicted_iou", "stability_score"):
            value = getattr(self, name)
            if value.shape != (k,):
                raise ValueError(f"{name} must have shape ({k},), got {value.shape}")
        if self.boxes.shape != (k, 4):
            raise ValueError(f"boxes must have shape ({k}, 4), got {self.boxes.shape}")
        if self.point_coords.shape != (k, 2):
            raise ValueError(f"point_coords must have shape ({k}, 2), got {self.point_coords.shape}")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image the masks belong to."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @classmethod
    def empty(cls, height: int, width: int) -> Proposals:
        """No proposals for an image of the given size."""
        return cls(
            masks=np.zeros((0, height, width), dtype=bool),
            predicted_iou=np.zeros((0,), dtype=np.float32),
            stability_score=np.zeros((0,), dtype=np.float32),
            boxes=np.zeros((0, 4), dtype=np.float32),
            point_coords=np.zeros((0, 2), dtype=np.float32),
        )

    def subset(self, indices: np.ndarray | list[int]) -> Proposals:
        """The proposals at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Proposals(
            masks=self.masks[idx],
            predicted_iou=self.predicted_iou[idx],
            stability_score=self.stability_score[idx],
            boxes=self.boxes[idx],
            point_coords=self.point_coords[idx],
        )


@dataclass
class FrameFeatures:
    """Everything computed once per frame and reused for every instruction on it.

    Attributes:
        image: (H, W, 3) uint8 RGB, the frame at its original resolution.
        proposals: mask proposals at the original resolution (may be empty for
            methods that do not use proposals).
        mask_embeddings: (K, 256) float32 torch tensor on the pipeline's device, or
            ``None`` when the method does not use them.
        timings: seconds spent per stage while preparing the frame.
        cache: per-method reusable state (for instance the VLM's key/value cache of
            the image prefix); filled lazily by the method that owns it.
    """

    image: np.ndarray
    proposals: Proposals
    mask_embeddings: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass
class SegmentResult:
    """The answer to one instruction on one frame.

    Attributes:
        mask: (H, W) bool at the frame's resolution; all False means "no such object".
        selected: indices into the frame's proposals that form the mask (empty for
            methods that do not select proposals).
        similarity: (K,) float32, IoU-head cosine similarity per proposal (LLM-Seg).
        iop: (K,) float32 in [0, 1], IoP-head probability per proposal (LLM-Seg).
        confidence: one score in [0, 1] for the returned mask, so a caller can reject
            weak answers (method-specific; see the method's documentation).
        num_proposals: K.
        method: name of the method that produced the result.
        answer: the VLM's text answer when one was generated, else ``None``.
        timings: seconds per stage for this call (frame preparation included when the
            call had to prepare the frame).
        extras: method-specific intermediate results for debugging (phrases, boxes,
            detector scores, reasoning text ...), JSON-serialisable.
        history_turns: earlier turns of the conversation the answer saw (0 without a
            ``conversation_id``).
        dropped_turns: oldest turns of the conversation dropped by this call, to fit the
            VLM's context or the ``max_turns`` cap.
        warnings: human-readable notes on how the answer was produced (turns dropped, a
            prompt longer than the VLM's context ...); empty when nothing is worth saying.
    """

    mask: np.ndarray
    selected: list[int]
    similarity: np.ndarray
    iop: np.ndarray
    confidence: float
    num_proposals: int
    method: str
    answer: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    history_turns: int = 0
    dropped_turns: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())


TRACK_SOURCES = ("start", "propagated", "requery")


@dataclass
class TrackedResult(SegmentResult):
    """One frame's answer of a tracked instruction (``Tracker.update``).

    A :class:`SegmentResult` (so every consumer of answers takes it as is) with the
    tracking state of that frame. For a propagated frame ``selected`` / ``similarity`` /
    ``iop`` are empty and ``num_proposals`` is 0; a re-queried frame carries the full
    method's result.

    Attributes:
        track_id: the track's id.
        frame_index: frames given to the track so far, this one included (the start
            frame is 0).
        stamp_ns: the frame's time stamp in integer nanoseconds.
        source: ``start`` (the answer the track started from), ``propagated`` (the
            previous mask carried to this frame) or ``requery`` (the full method ran on
            this frame).
        requery_reason: why the full method ran (``periodic``, ``low_confidence``,
            ``lost``), else ``None``.
        lost: the target is lost on this frame (see ``TrackerConfig``); ``mask`` is then
            all False.
        lost_reason: why the target is lost, else ``None``.
        weak_frames: consecutive frames, this one included, without a confident mask.
        expired: no confident update for the tracker's ``timeout_s``; the track has
            ended and takes no more frames.
        end_reason: why the track ended (with ``expired``), else ``None``.
    """

    track_id: str = ""
    frame_index: int = 0
    stamp_ns: int = 0
    source: str = "propagated"
    requery_reason: str | None = None
    lost: bool = False
    lost_reason: str | None = None
    weak_frames: int = 0
    expired: bool = False
    end_reason: str | None = None
