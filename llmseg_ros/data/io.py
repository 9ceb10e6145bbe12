"""Atomic file writes and mask file reading shared by the dataset readers and writers.

Images are read and written through :mod:`llmseg_ros.imageio` (``(H, W, 3) uint8`` RGB).
Every writer here goes through :func:`atomic_write_bytes`: the data lands in a temporary
file in the destination folder, which then replaces the destination with ``os.replace``,
so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from llmseg_ros.imageio import read_rgb, write_image_atomic

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_rgb",
    "read_single_channel",
    "write_image",
]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    Missing parent folders are created. Returns the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``data`` as JSON (UTF-8, non-ASCII kept) and write it atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


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
