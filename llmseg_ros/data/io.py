"""File reading and writing shared by the dataset readers and writers.

Images are read and written through :mod:`llmseg_ros.utils.imageio` (``(H, W, 3) uint8`` RGB).
The atomic writers of :mod:`llmseg_ros.utils.atomic` are re-exported here: the data lands in a
temporary file in the destination folder, which then replaces the destination with
``os.replace``, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from llmseg_ros.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from llmseg_ros.utils.imageio import read_rgb, write_image_atomic

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "parse_json",
    "read_json",
    "read_rgb",
    "read_single_channel",
    "write_image",
]


def write_image(path: str | Path, array: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB image or an (H, W) uint8 mask atomically; format from the extension."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, 3) uint8, got shape {array.shape} dtype {array.dtype}")
    return write_image_atomic(path, array)


def read_single_channel(path: str | Path) -> np.ndarray:
    """Read a single-channel mask file unchanged as (H, W) uint8 (uint16 for 16-bit PNGs).

    Raises:
        ValueError: the file is missing, undecodable, or has more than one channel.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mask {path} does not exist or is not a file")
    data = np.fromfile(str(path), dtype=np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ValueError(f"mask {path} could not be decoded (expected a PNG file)")
    if mask.ndim != 2:
        raise ValueError(f"mask {path} must have a single channel, got shape {mask.shape}")
    return mask


def parse_json(text: str | bytes, where: str) -> Any:
    """Parse JSON text; ``ValueError`` starting with ``where`` when it is invalid or nested too deeply."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text: {exc}") from exc
    except RecursionError as exc:
        raise ValueError(f"{where}: JSON nested too deeply to read") from exc


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Read and parse a UTF-8 JSON file; ``ValueError`` naming ``what`` and the file on any failure."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from exc
    return parse_json(raw, f"{what} {path}")
