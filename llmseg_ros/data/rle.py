"""COCO run-length encoding of binary masks (through ``pycocotools``).

The JSON-safe form is ``{"size": [H, W], "counts": str}``: the compressed COCO string, as
LLM-Seg40K stores ``rle_seg``. Decoding also accepts ``counts`` as bytes or as the
uncompressed list of run lengths (column-major, starting with a run of zeros).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np


def _mask_api() -> ModuleType:
    try:
        from pycocotools import mask as mask_api
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pycocotools is required to encode/decode COCO RLE masks; install it with `pip install pycocotools`"
        ) from exc
    return mask_api


def _check_size(rle: Mapping[str, Any]) -> tuple[int, int]:
    size = rle.get("size")
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise ValueError(f"RLE 'size' must be [height, width] of non-negative ints, got {size!r}")
    return int(size[0]), int(size[1])


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


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO RLE (compressed string / bytes, or uncompressed list counts).

    Returns:
        (H, W) uint8 with values 0/1.
    """
    if not isinstance(rle, Mapping):
        raise TypeError(f"RLE must be a mapping with 'size' and 'counts', got {type(rle).__name__}")
    if "counts" not in rle:
        raise ValueError(f"RLE must have 'size' and 'counts' keys, got {sorted(rle)}")
    height, width = _check_size(rle)
    counts = rle["counts"]
    api = _mask_api()
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative ints")
        if sum(counts) != height * width:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {height * width}")
        compact = api.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(counts, str | bytes):
        compact = {
            "size": [height, width],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    else:
        raise TypeError(f"RLE 'counts' must be a str, bytes or list of ints, got {type(counts).__name__}")
    mask = np.asarray(api.decode(compact), dtype=np.uint8)
    if mask.shape != (height, width):  # pragma: no cover - pycocotools invariant
        raise ValueError(f"decoded RLE has shape {mask.shape}, expected {(height, width)}")
    return np.ascontiguousarray(mask)
