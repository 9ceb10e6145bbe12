"""Image validation, reading, atomic writing and the debug overlay."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from llmseg_ros.utils.atomic import atomic_write_bytes

OVERLAY_COLOUR_RGB = (255, 64, 32)


def check_rgb_image(image: object, name: str = "image") -> np.ndarray:
    """Return ``image`` if it is an (H, W, 3) uint8 array, else raise naming what was received."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {image.shape}")
    return image


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        ValueError: the file does not exist or is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {path} does not exist or is not a file")
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ValueError(f"image {path} could not be decoded (expected a PNG/JPEG/BMP/TIFF image file)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_image_atomic(path: str | Path, image: np.ndarray, *, rgb: bool = True) -> Path:
    """Encode ``image`` by the path's extension and write it atomically.

    Args:
        path: destination (.png, .jpg, ...).
        image: (H, W) uint8/uint16 or (H, W, 3) uint8; RGB order when ``rgb``.
    """
    path = Path(path)
    ext = path.suffix.lower() or ".png"
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if (rgb and image.ndim == 3) else image
    ok, buf = cv2.imencode(ext, out)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as {ext!r} for {path}")
    return atomic_write_bytes(path, buf.tobytes())


def mask_to_mono8(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool → (H, W) uint8 with 255 where selected."""
    return np.where(mask, 255, 0).astype(np.uint8)


def render_overlay(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OVERLAY_COLOUR_RGB, alpha: float = 0.5
) -> np.ndarray:
    """Blend ``mask`` over ``image`` and outline it.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    out = image.copy()
    if mask.any():
        tint = np.array(colour, dtype=np.float32)
        out[mask] = (out[mask].astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, thickness=max(1, round(min(mask.shape) / 300)))
    return out
