"""Mapping boxes and points from a VLM's coordinate convention back to image pixels.

A chat VLM answers in its own coordinates. Three conventions are supported
(:data:`CONVENTIONS`); all use x to the right and y down, origin at the top-left:

* ``absolute_resized`` — absolute pixels of the image *as the model saw it* after its
  processor's resize (Qwen2.5-VL: ``smart_resize`` to multiples of
  ``patch_size * merge_size`` within ``[min_pixels, max_pixels]``).
* ``normalized_1000`` — integers in ``[0, 1000]`` over the model's input (Qwen2-VL,
  Qwen3-VL, InternVL, most recent open VLMs).
* ``relative_0_1`` — fractions in ``[0, 1]`` over the model's input (LLaVA-1.5's
  grounding data, 3 decimals).

Mapping is two steps: model coordinates → pixels of the model's input
(``input_size``, (H, W)), then input pixels → original image pixels through the
``content_box`` (XYXY in input pixels, the rectangle the original image occupies in
the input; the whole input when the processor only resized, a sub-rectangle when the
image was padded to a square first). Results are XYXY float32 pixels of the original
image, clipped to it; boxes that are degenerate after clipping are dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CONVENTIONS = ("absolute_resized", "normalized_1000", "relative_0_1")

# Qwen2-VL / Qwen2.5-VL image processor defaults (transformers, the released checkpoints).
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = QWEN_PATCH_SIZE * QWEN_MERGE_SIZE,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """(H, W) a Qwen2-VL-family processor resizes an image of (height, width) to.

    The rule of the released processors: both sides become multiples of ``factor``
    (= ``patch_size * merge_size``), the area stays within ``[min_pixels, max_pixels]``
    and the aspect ratio is kept as closely as possible (Python's round-half-to-even
    for the nearest multiple, floor when shrinking, ceil when growing).

    Raises:
        ValueError: non-positive sizes or factor, or an aspect ratio above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got ({height}, {width})")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be at most 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return int(h_bar), int(w_bar)


def _size_entry(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def processor_resize_rules(image_processor: Any) -> tuple[int, int, int]:
    """(factor, min_pixels, max_pixels) of a Qwen2-VL-family image processor.

    Reads ``patch_size``, ``merge_size`` and the pixel bounds, which transformers keeps in
    ``size`` (``shortest_edge`` = min_pixels, ``longest_edge`` = max_pixels) or, in older
    versions, in ``min_pixels`` / ``max_pixels`` attributes.
    """
    patch = int(getattr(image_processor, "patch_size", QWEN_PATCH_SIZE) or QWEN_PATCH_SIZE)
    merge = int(getattr(image_processor, "merge_size", QWEN_MERGE_SIZE) or QWEN_MERGE_SIZE)
    size = getattr(image_processor, "size", None)
    min_pixels = getattr(image_processor, "min_pixels", None) or _size_entry(size, "shortest_edge")
    max_pixels = getattr(image_processor, "max_pixels", None) or _size_entry(size, "longest_edge")
    return (
        patch * merge,
        int(min_pixels) if min_pixels else QWEN_MIN_PIXELS,
        int(max_pixels) if max_pixels else QWEN_MAX_PIXELS,
    )


def qwen_input_size(height: int, width: int, image_processor: Any) -> tuple[int, int]:
    """(H, W) the given Qwen2-VL-family image processor resizes (height, width) to."""
    factor, min_pixels, max_pixels = processor_resize_rules(image_processor)
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"coordinate convention must be one of {list(CONVENTIONS)}, got {convention!r}")


def _check_size(name: str, size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"{name} must be (H, W) with positive sides, got {size!r}")
    return int(size[0]), int(size[1])


def model_to_input_pixels(xy: np.ndarray, convention: str, input_size: tuple[int, int]) -> np.ndarray:
    """Model coordinates → pixels of the model's input.

    Args:
        xy: (..., 2k) float array of interleaved x, y values (boxes XYXY or points XY).
        convention: one of :data:`CONVENTIONS`.
        input_size: (H, W) of the model's input.
    Returns:
        float64 array of the same shape, in input pixels.
    """
    _check_convention(convention)
    h_in, w_in = _check_size("input_size", input_size)
    values = np.asarray(xy, dtype=np.float64)
    if values.shape[-1] % 2 != 0:
        raise ValueError(
            f"coordinates must have an even last dimension (x, y pairs), got shape {values.shape}"
        )
    if convention == "absolute_resized":
        return values.copy()
    unit = 1000.0 if convention == "normalized_1000" else 1.0
    scale = np.tile(np.array([w_in / unit, h_in / unit]), values.shape[-1] // 2)
    return values * scale


def input_to_image_pixels(
    xy: np.ndarray,
    *,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    content_box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Pixels of the model's input → pixels of the original image (no clipping).

    Args:
        xy: (..., 2k) interleaved x, y in input pixels.
        input_size: (H, W) of the model's input.
        image_size: (H, W) of the original image.
        content_box: XYXY in input pixels where the original image lies (``None`` = the
            whole input, i.e. a plain resize).
    """
    h_in, w_in = _check_size("input_size", input_size)
    h, w = _check_size("image_size", image_size)
    x0, y0, x1, y1 = (0.0, 0.0, float(w_in), float(h_in)) if content_box is None else map(float, content_box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"content_box must be XYXY with x1 > x0 and y1 > y0, got {content_box!r}")
    values = np.asarray(xy, dtype=np.float64)
    pairs = values.shape[-1] // 2
    offset = np.tile(np.array([x0, y0]), pairs)
    scale = np.tile(np.array([w / (x1 - x0), h / (y1 - y0)]), pairs)
    return (values - offset) * scale


def _model_to_image_pixels(
    values: np.ndarray,
    width: int,
    convention: str,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    content_box: tuple[float, float, float, float] | None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """(N, width) model coordinates (any array of N * width numbers) → float64 original pixels.

    Returns:
        (N, width) float64 pixels of the original image (not clipped) and its (H, W).
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1, width) if np.size(values) else np.zeros((0, width))
    size = _check_size("image_size", image_size)
    pixels = input_to_image_pixels(
        model_to_input_pixels(arr, convention, input_size),
        input_size=input_size,
        image_size=image_size,
        content_box=content_box,
    )
    return pixels, size


def map_boxes(
    boxes: np.ndarray,
    *,
    convention: str,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    content_box: tuple[float, float, float, float] | None = None,
    min_size: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in the model's convention → XYXY pixels of the original image.

    Corners are reordered (x1 <= x2, y1 <= y2), boxes are clipped to ``[0, W] x [0, H]``
    and dropped when not finite or narrower / shorter than ``min_size`` pixels after
    clipping (for instance a box entirely outside the image).

    Args:
        boxes: (N, 4) XYXY in the model's convention.
        convention, input_size, content_box: see :func:`model_to_input_pixels` and
            :func:`input_to_image_pixels`.
        image_size: (H, W) of the original image.
        min_size: smallest kept width and height, in original pixels.
    Returns:
        (M, 4) float32 boxes and (M,) int64 indices of the kept input boxes.
    """
    pixels, (h, w) = _model_to_image_pixels(boxes, 4, convention, input_size, image_size, content_box)
    x1 = np.clip(np.minimum(pixels[:, 0], pixels[:, 2]), 0, w)
    x2 = np.clip(np.maximum(pixels[:, 0], pixels[:, 2]), 0, w)
    y1 = np.clip(np.minimum(pixels[:, 1], pixels[:, 3]), 0, h)
    y2 = np.clip(np.maximum(pixels[:, 1], pixels[:, 3]), 0, h)
    out = np.stack([x1, y1, x2, y2], axis=1)
    finite = np.isfinite(pixels).all(axis=1)
    keep = np.flatnonzero(finite & (x2 - x1 >= min_size) & (y2 - y1 >= min_size))
    return out[keep].astype(np.float32), keep.astype(np.int64)


def map_points(
    points: np.ndarray,
    *,
    convention: str,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    content_box: tuple[float, float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Points in the model's convention → XY pixels of the original image.

    Points that land outside ``[0, W] x [0, H]`` (or are not finite) are dropped rather
    than clipped: a clipped point would prompt SAM on an unrelated border pixel.

    Args:
        points: (N, 2) XY in the model's convention.
    Returns:
        (M, 2) float32 points and (M,) int64 indices of the kept input points.
    """
    pixels, (h, w) = _model_to_image_pixels(points, 2, convention, input_size, image_size, content_box)
    inside = (
        np.isfinite(pixels).all(axis=1)
        & (pixels[:, 0] >= 0)
        & (pixels[:, 0] <= w)
        & (pixels[:, 1] >= 0)
        & (pixels[:, 1] <= h)
    )
    keep = np.flatnonzero(inside)
    # Points within half a pixel of the far border are pulled onto the last pixel's centre.
    out = np.minimum(pixels[keep], np.array([w - 0.5, h - 0.5]))
    return out.astype(np.float32), keep.astype(np.int64)
