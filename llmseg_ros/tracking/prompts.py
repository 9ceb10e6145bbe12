"""Prompts for carrying a mask to the next frame: a box around it, points in and around it.

All coordinates are pixels of the frame the mask belongs to: boxes XYXY (x to the right,
y down; ``x1``/``y1`` one past the last pixel, like SAM's box prompts), points XY at
pixel centres.

* :func:`mask_box` — the mask's tight box.
* :func:`expand_box` — the box grown by a fraction of its size on every side (room for
  the object's motion between frames), clipped to the image.
* :func:`sample_points` — positive points inside the mask, the first at its most
  interior pixel (largest distance to the background, so it stays on the object when it
  moves a little), the others drawn from the inner half of the mask; negative points
  drawn from a ring just outside the expanded box (never on the mask), where the
  object cannot be unless it moved further than the margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Width of the ring around the expanded box that negative points come from, as a
# fraction of the box's larger side (at least NEGATIVE_RING_MIN_PX pixels).
NEGATIVE_RING_FRACTION = 0.5
NEGATIVE_RING_MIN_PX = 4


@dataclass
class PointPrompt:
    """Point prompts for one mask.

    Attributes:
        points: (P, 2) float32 XY pixel coordinates.
        labels: (P,) int32, 1 = on the object, 0 = background.
    """

    points: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.points.shape[0])


def _check_mask(mask: np.ndarray) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"mask must be an (H, W) numpy array, got {getattr(mask, 'shape', type(mask))}")
    return mask.astype(bool, copy=False)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(4,) float32 XYXY box of the mask's pixels (exclusive right/bottom), ``None`` when empty."""
    mask = _check_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def expand_box(box: np.ndarray, margin: float, image_size: tuple[int, int]) -> np.ndarray:
    """``box`` grown by ``margin`` × its width / height on each side, clipped to the image.

    Args:
        box: (4,) XYXY pixels.
        margin: fraction of the box's width (height) added left and right (top and
            bottom); 0 keeps the box.
        image_size: (H, W) of the frame.
    Returns:
        (4,) float32 XYXY inside [0, W] × [0, H].
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    height, width = image_size
    return np.array(
        [max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(width), x1 + dx), min(float(height), y1 + dy)],
        dtype=np.float32,
    )


def _pick(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct (x, y) pixel centres drawn from the candidates (fewer if there are fewer)."""
    if count <= 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    chosen = rng.choice(ys.size, size=min(count, ys.size), replace=False)
    return np.stack([xs[chosen], ys[chosen]], axis=1).astype(np.float32) + 0.5


def sample_points(
    mask: np.ndarray,
    box: np.ndarray,
    num_positive: int,
    num_negative: int,
    rng: np.random.Generator,
) -> PointPrompt:
    """Positive points inside ``mask`` and negative points outside ``box`` (module docstring).

    Args:
        mask: (H, W) bool, the previous frame's mask (non-empty).
        box: (4,) XYXY pixels, the (expanded) box prompt; negatives lie outside it.
        num_positive: points on the object (the first is the most interior pixel).
        num_negative: background points (fewer when the ring around the box is off the
            image, none when the box covers the whole image).
        rng: source of the random draws.
    Returns:
        PointPrompt with positives first.
    Raises:
        ValueError: empty mask, or negative counts.
    """
    mask = _check_mask(mask)
    if num_positive < 0 or num_negative < 0:
        raise ValueError(f"point counts must be >= 0, got {num_positive} positive, {num_negative} negative")
    if not mask.any():
        raise ValueError("cannot sample prompt points from an empty mask")
    height, width = mask.shape
    positives = np.zeros((0, 2), dtype=np.float32)
    if num_positive:
        # distance of every mask pixel to the background (the image border counts as background)
        padded = np.pad(mask, 1).astype(np.uint8)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
        peak = np.unravel_index(int(np.argmax(dist)), dist.shape)
        first = np.array([[peak[1] + 0.5, peak[0] + 0.5]], dtype=np.float32)
        ys, xs = np.nonzero(dist >= 0.5 * float(dist.max()))
        keep = (ys != peak[0]) | (xs != peak[1])
        positives = np.concatenate([first, _pick(rng, ys[keep], xs[keep], num_positive - 1)])
    negatives = np.zeros((0, 2), dtype=np.float32)
    if num_negative:
        x0, y0, x1, y1 = (float(v) for v in box)
        ring = max(NEGATIVE_RING_MIN_PX, NEGATIVE_RING_FRACTION * max(x1 - x0, y1 - y0))
        outer = np.zeros((height, width), dtype=bool)
        outer[
            max(0, int(np.floor(y0 - ring))) : min(height, int(np.ceil(y1 + ring))),
            max(0, int(np.floor(x0 - ring))) : min(width, int(np.ceil(x1 + ring))),
        ] = True
        outer[
            max(0, int(np.floor(y0))) : min(height, int(np.ceil(y1))),
            max(0, int(np.floor(x0))) : min(width, int(np.ceil(x1))),
        ] = False
        outer &= ~mask
        ys, xs = np.nonzero(outer)
        negatives = _pick(rng, ys, xs, num_negative)
    points = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.concatenate(
        [np.ones(len(positives), dtype=np.int32), np.zeros(len(negatives), dtype=np.int32)]
    )
    return PointPrompt(points=points, labels=labels)
