"""Frames for tracking: light frames (image only) and SAM's image encoding, computed once.

A tracked update needs only SAM's image encoding of the new frame, not the full
per-frame work of a method (proposals, DINOv2, the VLM's prefix). :func:`light_frame`
wraps a raw image in a :class:`FrameFeatures` that holds nothing yet;
:func:`sam_encoding` returns the frame's SAM encoding — the one the method's ``prepare``
already computed when the frame is fully prepared (``llmseg`` keeps its proposal stage's
encoding, ``lisa`` / ``grounded`` / ``vlm_grounding`` theirs), else it encodes the image
once and caches it in the frame, so every track on the same frame shares one encoding.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from llmseg_ros.methods.common import SAM_KEY
from llmseg_ros.methods.vlm_grounding import SAM_CACHE_KEY as VLM_GROUNDING_SAM_KEY
from llmseg_ros.types import FrameFeatures, Proposals
from llmseg_ros.utils.imageio import check_rgb_image

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.models.sam_prompting import SamImageEncoding

LIGHT_FRAME_KEY = "light_frame"
ENCODING_KEYS = (SAM_KEY, VLM_GROUNDING_SAM_KEY)
_LOCK_KEY = "sam_encoding_lock"
_CREATE_LOCK = threading.Lock()


def light_frame(image: np.ndarray) -> FrameFeatures:
    """A frame with no per-frame work done yet (no proposals); tracking encodes it on demand.

    Args:
        image: (H, W, 3) uint8 RGB.
    """
    check_rgb_image(image)
    height, width = int(image.shape[0]), int(image.shape[1])
    return FrameFeatures(
        image=np.ascontiguousarray(image),
        proposals=Proposals.empty(height, width),
        cache={LIGHT_FRAME_KEY: True},
    )


def is_light(frame: FrameFeatures) -> bool:
    """True for frames made by :func:`light_frame` (a full query must prepare the image first)."""
    return bool(frame.cache.get(LIGHT_FRAME_KEY, False))


def as_frame(frame_or_image: FrameFeatures | np.ndarray) -> FrameFeatures:
    """A prepared frame as is; a raw image as a :func:`light_frame`."""
    if isinstance(frame_or_image, FrameFeatures):
        return frame_or_image
    if isinstance(frame_or_image, np.ndarray):
        return light_frame(frame_or_image)
    raise TypeError(
        f"frame must be FrameFeatures or an (H, W, 3) uint8 numpy array, got {type(frame_or_image).__name__}"
    )


def cached_encoding(frame: FrameFeatures) -> SamImageEncoding | None:
    """The SAM encoding a method or an earlier track left in ``frame``, if any."""
    for key in ENCODING_KEYS:
        encoding: SamImageEncoding | None = frame.cache.get(key)
        if encoding is not None:
            return encoding
    return None


def _frame_lock(frame: FrameFeatures) -> threading.Lock:
    with _CREATE_LOCK:
        lock: threading.Lock | None = frame.cache.get(_LOCK_KEY)
        if lock is None:
            lock = threading.Lock()
            frame.cache[_LOCK_KEY] = lock
        return lock


def sam_encoding(sam: Sam, frame: FrameFeatures, timings: dict[str, float]) -> SamImageEncoding:
    """SAM's encoding of ``frame``: the cached one, or computed now (once per frame, thread-safe).

    Adds ``sam_encoder`` (s) to ``timings`` when this call ran the encoder.
    """
    encoding = cached_encoding(frame)
    if encoding is not None:
        return encoding
    from llmseg_ros.methods.common import sync
    from llmseg_ros.models.sam_prompting import encode_image

    with _frame_lock(frame):
        encoding = cached_encoding(frame)
        if encoding is None:
            t0 = time.perf_counter()
            encoding = encode_image(sam, frame.image)
            sync(encoding.embedding.device)
            timings["sam_encoder"] = time.perf_counter() - t0
            frame.cache[SAM_KEY] = encoding
    return encoding
