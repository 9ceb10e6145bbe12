"""Checks every dataset reader applies before it allocates or rasterises anything.

Annotation files are untrusted input. A declared image size decides how much memory a
mask takes, and polygon coordinates decide how long rasterising takes and how much memory
it needs (OpenCV's polygon fill and pycocotools' outline walk both grow with the extent of
the coordinates; pycocotools converts them to C ``int`` without a range check). So every
reader

* caps declared sizes (:func:`check_image_size`, at most :data:`MAX_IMAGE_PIXELS`),
* reads coordinates as finite float64 arrays (:func:`polygon_points`), and
* clips a polygon that reaches more than :data:`CLIP_MARGIN` pixels outside the image to
  that box around the image (:func:`clip_to_image_margin`). Polygons inside the box are
  returned unchanged, so valid annotations rasterise exactly as they always did.

Every error is a ``ValueError`` whose message starts with ``where`` (the file, the sample,
the annotation), so a reader can pass its location down.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_IMAGE_PIXELS = 1 << 27
"""Largest declared image / mask size in pixels (134 M, e.g. 11585 x 11585; a bool mask is 128 MiB)."""

CLIP_MARGIN = 1 << 16
"""Pixels a polygon may reach outside the image before it is clipped (far beyond any real
annotation's overshoot; small enough that rasterising the clipped outline stays cheap)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def integer_value(value: Any, where: str) -> int:
    """``value`` as an int: an integer, or a float with an integral finite value (JSON ``3.0``).

    Raises:
        ValueError: anything else (booleans, strings, NaN, infinities, fractions).
    """
    if _is_int(value):
        return int(value)
    if _is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{where} must be an integer, got {value!r:.60}")


def check_image_size(height: Any, width: Any, where: str) -> tuple[int, int]:
    """Validate a declared image size before anything of that size is allocated.

    Args:
        height, width: the declared size in pixels (ints, or integral floats).
        where: names the file / record for the message.

    Returns:
        ``(height, width)`` as ints.

    Raises:
        ValueError: a side that is not a positive integer, or more than
            :data:`MAX_IMAGE_PIXELS` pixels in all.
    """
    h = integer_value(height, f"{where}: height")
    w = integer_value(width, f"{where}: width")
    if h < 1 or w < 1:
        raise ValueError(f"{where}: image size must be positive, got {h}x{w}")
    if h * w > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{where}: declared image size {h}x{w} ({h * w} pixels) exceeds the limit of "
            f"{MAX_IMAGE_PIXELS} pixels; the annotation is corrupt or not for this image"
        )
    return h, w


def polygon_points(value: Any, where: str, *, flat: bool = False) -> np.ndarray:
    """Read polygon vertices as a finite (N, 2) float64 array of [x, y] pixels.

    Args:
        value: ``[[x, y], ...]`` (labelme), or ``[x0, y0, x1, y1, ...]`` with ``flat``
            (COCO). Values must be JSON numbers (int or float, not bool or str).
        where: names the polygon for the message.

    Raises:
        ValueError: wrong nesting, a value that is not a number, NaN or an infinity, or
            a number too large for float64.
    """
    expected = "a flat list of x, y numbers" if flat else "a list of [x, y] number pairs"
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where} must be {expected}, got {type(value).__name__}")
    if flat:
        values: list[Any] = list(value)
        if len(values) % 2:
            raise ValueError(f"{where} must be {expected}, got an odd count of {len(values)} values")
    else:
        values = []
        for pair in value:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"{where} must be {expected}, got an element {pair!r:.60}")
            values.extend(pair)
    bad = [v for v in values if not _is_number(v)]
    if bad:
        raise ValueError(f"{where} must hold numbers only, got {bad[0]!r:.60}")
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    except OverflowError as exc:
        raise ValueError(f"{where} holds a number too large for a pixel coordinate") from exc
    if not np.isfinite(array).all():
        raise ValueError(f"{where} must hold finite numbers, got NaN or an infinity")
    return array


def _cut(p: np.ndarray, q: np.ndarray, axis: int, edge: float) -> np.ndarray:
    """Where the segments p→q cross the line ``coordinate[axis] == edge`` (p, q: (N, 2)).

    Computed on halved values, so no intermediate overflows for any finite input.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t = (edge * 0.5 - p[:, axis] * 0.5) / (q[:, axis] * 0.5 - p[:, axis] * 0.5)
    t = np.clip(np.nan_to_num(t), 0.0, 1.0)[:, None]
    out = 2.0 * ((p * 0.5) * (1.0 - t) + (q * 0.5) * t)
    out = np.clip(out, np.minimum(p, q), np.maximum(p, q))  # rounding never leaves the segment's extent
    out[:, axis] = edge
    return out


def clip_polygon(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Clip a closed polygon to an axis-aligned box (Sutherland–Hodgman).

    Args:
        points: (N, 2) float64 [x, y] vertices, finite.
        box: ``(x_min, y_min, x_max, y_max)``; points on the border count as inside.

    Returns:
        (M, 2) float64: the part of the polygon inside the box (M may be 0). For every
        point strictly inside the box the even-odd inside/outside answer is unchanged.
    """
    x_min, y_min, x_max, y_max = box
    out = np.asarray(points, dtype=np.float64)
    for axis, edge, keep_above in ((0, x_min, True), (0, x_max, False), (1, y_min, True), (1, y_max, False)):
        if len(out) == 0:
            break
        inside = out[:, axis] >= edge if keep_above else out[:, axis] <= edge
        prev, prev_inside = np.roll(out, 1, axis=0), np.roll(inside, 1)
        crossing = _cut(prev, out, axis, edge)
        candidates = np.stack([crossing, out], axis=1).reshape(-1, 2)  # per vertex: crossing, then vertex
        keep = np.stack([prev_inside != inside, inside], axis=1).reshape(-1)
        out = candidates[keep]
    return out


def clip_to_image_margin(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """``points`` itself when every vertex lies within :data:`CLIP_MARGIN` of the image,
    else the polygon clipped to that box (see :func:`clip_polygon`).

    Args:
        points: (N, 2) float64 [x, y] pixels, finite.
        height, width: the image size.
    """
    box = (-CLIP_MARGIN, -CLIP_MARGIN, width + CLIP_MARGIN, height + CLIP_MARGIN)
    x, y = points[:, 0], points[:, 1]
    if ((x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])).all():
        return points
    return clip_polygon(points, box)


def check_file_name(name: Any, where: str) -> str:
    """A bare file name: a non-empty string without a folder part, not ``.`` or ``..``.

    Formats that key images by file name (LLM-Seg40K, COCO ``file_name``) join the name
    to an image folder; a name with ``/``, ``\\`` or ``..`` would read outside it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: an image file name must be a non-empty string, got {name!r:.60}")
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"{where}: {name!r:.80} is not a bare file name (no folders, '..' or NUL allowed)")
    return name
