"""COCO run-length encoding and polygons of binary masks (through ``pycocotools``).

The JSON-safe form is ``{"size": [H, W], "counts": str}``: the compressed COCO string, as
LLM-Seg40K stores ``rle_seg``. Decoding also accepts ``counts`` as bytes or as the
uncompressed list of run lengths (column-major, starting with a run of zeros).

Everything is validated before ``pycocotools`` sees it: the size is capped
(:func:`llmseg_ros.data.checks.check_image_size`), the runs must be non-negative and cover
exactly H*W pixels (pycocotools leaves pixels uninitialised when they cover fewer), and
polygon coordinates must be finite and are clipped to a box around the image
(pycocotools walks the outline at 5x resolution in C ``int``; a huge or NaN coordinate
overflows that and asks for gigabytes or crashes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from llmseg_ros.data.checks import check_image_size, clip_to_image_margin, polygon_points

MAX_OUTLINE_STEPS = 1 << 24
"""Most outline points pycocotools may walk for one polygon (about 16 bytes each)."""

_COMPRESSED_SIZE_OF_A_RUN = 7  # characters: 5 bits each, enough for any count below 2**32


def _mask_api() -> ModuleType:
    try:
        from pycocotools import mask as mask_api
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pycocotools is required to encode/decode COCO RLE masks; install it with `pip install pycocotools`"
        ) from exc
    return mask_api


def rle_size(rle: Mapping[str, Any]) -> tuple[int, int]:
    """The declared ``[height, width]`` of an RLE, validated and capped."""
    size = rle.get("size")
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise ValueError(f"RLE 'size' must be [height, width] of positive ints, got {size!r:.60}")
    return check_image_size(size[0], size[1], "RLE 'size'")


def _string_counts(counts: bytes, pixels: int) -> np.ndarray:
    """Run lengths of a compressed COCO counts string (pycocotools' ``rleFrString``), validated.

    Each value is 5-bit groups in characters ``'0'`` + (0..63), bit 0x20 meaning "more
    groups follow" and bit 0x10 of the last group the sign; from the fourth value on,
    each is stored as the difference to the value two places before.
    """
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ((c < 0) | (c > 63)).any():
        raise ValueError("RLE 'counts' string holds characters outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE 'counts' string ends inside a run length")
    ends = np.flatnonzero(~more)
    if len(ends) > pixels + 1:
        raise ValueError(f"RLE 'counts' string holds {len(ends)} runs for {pixels} pixels")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _COMPRESSED_SIZE_OF_A_RUN:
        raise ValueError("RLE 'counts' string holds a run length too large for any image")
    group = np.arange(c.size) - np.repeat(starts, lengths)  # index of each character within its value
    values = np.add.reduceat((c & 0x1F) << (5 * group), starts)
    values = np.where((c[ends] & 0x10) != 0, values - (1 << (5 * lengths)), values)  # sign extension
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # value m > 2 adds the run two places before it
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _counts_bytes(counts: str | bytes) -> bytes:
    if isinstance(counts, bytes):
        return counts
    try:
        return counts.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError("RLE 'counts' string holds characters outside '0'..'o'") from exc


def _check_runs(runs: np.ndarray, height: int, width: int) -> None:
    if (runs < 0).any():
        raise ValueError("RLE run lengths must be non-negative")
    total = int(runs.sum())
    if total != height * width:
        raise ValueError(f"RLE counts sum to {total}, expected H*W = {height * width}")


def rle_runs(rle: Mapping[str, Any]) -> np.ndarray:
    """The run lengths of a COCO RLE (compressed or not) as int64, checked against its size.

    Raises:
        TypeError: ``rle`` is not a mapping, or ``counts`` is not a str, bytes or list.
        ValueError: bad size, a run that is negative or not an integer, runs that do not
            cover exactly H*W pixels, or a malformed compressed string.
    """
    if not isinstance(rle, Mapping):
        raise TypeError(f"RLE must be a mapping with 'size' and 'counts', got {type(rle).__name__}")
    if "counts" not in rle or "size" not in rle:
        raise ValueError(f"RLE must have 'size' and 'counts' keys, got {sorted(map(str, rle))}")
    height, width = rle_size(rle)
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative ints")
        if len(counts) > height * width + 1:
            raise ValueError(f"uncompressed RLE holds {len(counts)} runs for {height * width} pixels")
        try:
            runs = np.asarray(counts, dtype=np.int64)
        except OverflowError as exc:
            raise ValueError("uncompressed RLE counts must be non-negative ints below 2**63") from exc
    elif isinstance(counts, str | bytes):
        runs = _string_counts(_counts_bytes(counts), height * width)
    else:
        raise TypeError(f"RLE 'counts' must be a str, bytes or list of ints, got {type(counts).__name__}")
    _check_runs(runs, height, width)
    return runs


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a binary mask as compact, JSON-safe COCO RLE.

    Args:
        mask: (H, W) bool, or integer with values 0/1.

    Returns:
        ``{"size": [H, W], "counts": str}``.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D numpy array, got {getattr(mask, 'shape', type(mask).__name__)}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise TypeError(f"mask must be bool or integer 0/1, got dtype {mask.dtype}")
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("mask values must be 0 or 1 for RLE encoding (ignore labels cannot be encoded)")
    encoded = _mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = encoded["counts"]
    return {
        "size": [int(encoded["size"][0]), int(encoded["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
    }


def decode_rle(rle: Mapping[str, Any], *, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode COCO RLE (compressed string / bytes, or uncompressed list counts).

    Args:
        rle: ``{"size": [H, W], "counts": ...}``.
        expected_size: ``(H, W)`` the mask must have (the image's); checked before
            anything is allocated.

    Returns:
        (H, W) uint8 with values 0/1.

    Raises:
        TypeError, ValueError: see :func:`rle_runs`; or a size other than ``expected_size``.
    """
    runs = rle_runs(rle)  # O(len(counts)); nothing of the declared size is allocated yet
    height, width = rle_size(rle)
    if expected_size is not None and (height, width) != tuple(expected_size):
        raise ValueError(f"RLE size {[height, width]} differs from the image's {list(expected_size)}")
    api = _mask_api()
    counts = rle["counts"]
    if isinstance(counts, list):
        compact = api.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    else:
        compact = {"size": [height, width], "counts": _counts_bytes(counts)}
    mask = np.asarray(api.decode(compact), dtype=np.uint8)
    if mask.shape != (height, width):  # pragma: no cover - pycocotools invariant
        raise ValueError(f"decoded RLE has shape {mask.shape}, expected {(height, width)}")
    return np.ascontiguousarray(mask)


def _outline_steps(points: np.ndarray) -> int:
    """Points pycocotools' ``rleFrPoly`` walks for this closed polygon (5x upsampled outline)."""
    scaled = np.trunc(points * 5.0 + 0.5)  # the C (int) cast of 5*x + .5
    step = np.abs(scaled - np.roll(scaled, -1, axis=0)).max(axis=1)
    return int(step.sum()) + len(points)


def mask_from_polygons(polygons: Sequence[Any], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons (each a flat ``[x0, y0, x1, y1, ...]`` list in pixels) as their union.

    Polygons with fewer than 3 points have no area and are skipped. Coordinates must be
    finite; a polygon reaching far outside the image is clipped to a box around it first
    (:func:`llmseg_ros.data.checks.clip_to_image_margin`), others go to pycocotools as given.

    Returns:
        (height, width) bool.

    Raises:
        ValueError: a polygon that is not a flat list of number pairs, a non-finite
            coordinate, an outline too long to rasterise, or a bad size.
    """
    height, width = check_image_size(height, width, "polygon mask")
    kept: list[list[float]] = []
    for k, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or len(polygon) % 2:
            raise ValueError(f"polygon {k} must be a flat list of x, y pairs, got {polygon!r:.60}")
        points = polygon_points(polygon, f"polygon {k}", flat=True)
        points = clip_to_image_margin(points, height, width)
        if len(points) < 3:  # fewer than 3 points (given, or left by clipping) has no area
            continue
        steps = _outline_steps(points)
        if steps > MAX_OUTLINE_STEPS:
            raise ValueError(
                f"polygon {k} has an outline of {steps} steps at pycocotools' resolution "
                f"(limit {MAX_OUTLINE_STEPS}); the polygon is corrupt"
            )
        kept.append(points.reshape(-1).tolist())
    if not kept:
        return np.zeros((height, width), dtype=bool)
    api = _mask_api()
    return np.asarray(api.decode(api.merge(api.frPyObjects(kept, height, width))), dtype=bool)
