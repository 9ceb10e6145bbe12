"""``sensor_msgs/Image`` ↔ numpy, written against the message's fields.

Works with any object that has the fields of ``sensor_msgs/msg/Image`` (``height``,
``width``, ``encoding``, ``is_bigendian``, ``step``, ``data``): rclpy messages on a robot
(``data`` is an ``array.array('B')``), the message classes of ``rosbags`` (``data`` is a
numpy ``uint8`` array), or plain bytes. No ROS import.

Conventions: colour arrays are (H, W, C) in the encoding's channel order; single-channel
arrays are (H, W). Rows may be padded (``step`` > width × bytes per pixel) and multi-byte
pixels may be big-endian (``is_bigendian``); the arrays returned here are always packed
and in native byte order.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmseg_ros.utils.text import short_repr


@dataclass(frozen=True)
class EncodingInfo:
    """Pixel layout of one ``sensor_msgs/Image`` encoding."""

    dtype: type[np.generic]
    channels: int

    @property
    def bytes_per_pixel(self) -> int:
        return int(np.dtype(self.dtype).itemsize) * self.channels


ENCODINGS: dict[str, EncodingInfo] = {
    "rgb8": EncodingInfo(np.uint8, 3),
    "bgr8": EncodingInfo(np.uint8, 3),
    "rgba8": EncodingInfo(np.uint8, 4),
    "bgra8": EncodingInfo(np.uint8, 4),
    "mono8": EncodingInfo(np.uint8, 1),
    "mono16": EncodingInfo(np.uint16, 1),
    "16UC1": EncodingInfo(np.uint16, 1),
    "32FC1": EncodingInfo(np.float32, 1),
}
COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16")
DEPTH_ENCODINGS = ("16UC1", "32FC1")


@dataclass
class ImageData:
    """The fields of a ``sensor_msgs/Image`` without its header.

    Attributes:
        height, width: pixels.
        encoding: one of ``ENCODINGS``.
        is_bigendian: byte order of multi-byte pixels in ``data``.
        step: bytes per row (≥ width × bytes per pixel).
        data: (step × height,) uint8.
    """

    height: int
    width: int
    encoding: str
    is_bigendian: bool
    step: int
    data: np.ndarray


def encoding_info(encoding: str) -> EncodingInfo:
    """Layout of ``encoding``; ``ValueError`` listing the supported ones otherwise."""
    if not isinstance(encoding, str):
        raise TypeError(
            f"image encoding must be a string, got {type(encoding).__name__} {short_repr(encoding)}"
        )
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ValueError(
            f"unsupported image encoding {short_repr(encoding)}; expected one of {list(ENCODINGS)}"
        ) from None


def uint_field(msg: Any, name: str, what: str = "Image", bits: int = 32) -> int:
    """An unsigned integer field of a message (``uint32`` height, width, step ...), checked.

    Raises:
        TypeError: the field is not an integer (``bool`` included).
        ValueError: it is outside ``[0, 2**bits)``.
    """
    value = getattr(msg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{what}.{name} must be an unsigned integer, got {type(value).__name__} {short_repr(value)}"
        )
    if not 0 <= int(value) < 2**bits:
        raise ValueError(f"{what}.{name} must be in [0, 2^{bits}), got {short_repr(int(value))}")
    return int(value)


def message_bytes(data: Any) -> np.ndarray:
    """The ``data`` field of a message as a flat uint8 array (no copy when possible).

    Accepts numpy uint8 arrays, ``bytes``/``bytearray``, byte ``memoryview`` and
    ``array.array('B')`` (rclpy's ``uint8[]``), and lists/tuples of ints in [0, 255].

    Raises:
        TypeError: another container, or one holding something other than bytes.
        ValueError: a list/tuple holding values outside [0, 255] (never wrapped around).
    """
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"image data must hold uint8 bytes, got a numpy array of dtype {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, (memoryview, array.array)):
        code = data.format if isinstance(data, memoryview) else data.typecode
        if code not in ("B", "b", "c"):
            raise TypeError(f"image data must hold bytes, got a {type(data).__name__} of type code {code!r}")
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, (list, tuple)):
        try:
            values = np.asarray(data)
        except (ValueError, OverflowError):
            values = np.asarray(data, dtype=object).reshape(-1)
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise TypeError(
                "image data given as a list must be flat and hold integers in [0, 255], got "
                f"{short_repr(data)}"
            )
        if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
            bad = values[(values < 0) | (values > 255)][0]
            raise ValueError(f"image data must hold bytes in [0, 255], got {short_repr(int(bad))}")
        return values.astype(np.uint8)
    raise TypeError(
        f"image data must be bytes, array.array, a numpy uint8 array or a list, got {type(data).__name__}"
    )


def is_empty_image(msg: Any) -> bool:
    """True when an Image message carries no pixels (the "not set" value of a field).

    Raises:
        TypeError, ValueError: ``height`` / ``width`` are not unsigned 32-bit integers or
            ``data`` has no length.
    """
    if msg is None:
        return True
    if uint_field(msg, "height") == 0 or uint_field(msg, "width") == 0:
        return True
    try:
        return len(msg.data) == 0
    except TypeError:
        raise TypeError(f"Image.data must be a sequence of bytes, got {type(msg.data).__name__}") from None


def image_to_numpy(msg: Any) -> np.ndarray:
    """Pixels of an Image message as a packed, native-byte-order array.

    Returns:
        (H, W) for one channel (uint8, uint16 or float32 by encoding), else (H, W, C)
        uint8 in the encoding's channel order. Always a new array (never a view of the
        message buffer).
    Raises:
        ValueError: unsupported encoding, empty image, ``step`` too small or too little data.
    """
    info = encoding_info(msg.encoding)
    height, width, step = uint_field(msg, "height"), uint_field(msg, "width"), uint_field(msg, "step")
    if not isinstance(msg.is_bigendian, (bool, int, np.integer)) or not 0 <= int(msg.is_bigendian) <= 255:
        raise TypeError(f"Image.is_bigendian must be a uint8 (0 or 1), got {short_repr(msg.is_bigendian)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image is empty: height={height}, width={width}")
    row_bytes = width * info.bytes_per_pixel
    if step < row_bytes:
        raise ValueError(
            f"image step {step} is smaller than width × bytes per pixel = {width} × {info.bytes_per_pixel}"
            f" = {row_bytes} for encoding {msg.encoding!r}"
        )
    needed = step * height  # checked against the data before anything is allocated
    buf = message_bytes(msg.data)
    if buf.size < needed:
        raise ValueError(
            f"image data has {buf.size} bytes; expected step × height = {step} × {height} = {needed}"
        )
    rows = np.ascontiguousarray(buf[:needed].reshape(height, step)[:, :row_bytes])
    wire = np.dtype(info.dtype).newbyteorder(">" if bool(msg.is_bigendian) else "<")
    pixels = rows.view(wire).astype(info.dtype)  # native byte order, owns its memory
    if info.channels == 1:
        return pixels.reshape(height, width)
    return pixels.reshape(height, width, info.channels)


def numpy_to_image(
    pixels: np.ndarray, encoding: str, *, is_bigendian: bool = False, row_padding: int = 0
) -> ImageData:
    """Pack an array into the fields of an Image message.

    Args:
        pixels: (H, W) or (H, W, C) with the dtype and channel count of ``encoding``
            (e.g. uint8 (H, W, 3) for ``bgr8``, float32 (H, W) for ``32FC1``).
        encoding: one of ``ENCODINGS``.
        is_bigendian: write multi-byte pixels big-endian.
        row_padding: extra zero bytes at the end of every row (``step`` grows by it).
    Raises:
        ValueError: the array does not match the encoding.
    """
    info = encoding_info(encoding)
    if row_padding < 0:
        raise ValueError(f"row_padding must be >= 0, got {row_padding}")
    if pixels.ndim == 3 and info.channels == 1 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    expected_ndim = 2 if info.channels == 1 else 3
    if pixels.ndim != expected_ndim or (info.channels > 1 and pixels.shape[2] != info.channels):
        want = "(H, W)" if info.channels == 1 else f"(H, W, {info.channels})"
        raise ValueError(f"encoding {encoding!r} needs an array of shape {want}, got {pixels.shape}")
    if pixels.dtype != np.dtype(info.dtype):
        raise ValueError(f"encoding {encoding!r} needs dtype {np.dtype(info.dtype)}, got {pixels.dtype}")
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    if height == 0 or width == 0:
        raise ValueError(f"cannot encode an empty image of shape {pixels.shape}")
    wire = np.dtype(info.dtype).newbyteorder(">" if is_bigendian else "<")
    packed = np.ascontiguousarray(pixels, dtype=wire).view(np.uint8).reshape(height, -1)
    if row_padding:
        packed = np.concatenate([packed, np.zeros((height, row_padding), dtype=np.uint8)], axis=1)
    return ImageData(
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=bool(is_bigendian),
        step=int(packed.shape[1]),
        data=packed.reshape(-1),
    )


def to_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """Convert a colour/mono array to (H, W, 3) uint8 RGB for the segmenter.

    ``mono16`` is scaled to 8 bits by rounding ``value / 257``. Depth encodings are
    rejected: they are not pictures of the scene's colours.
    """
    if encoding not in COLOUR_ENCODINGS:
        raise ValueError(
            f"encoding {encoding!r} is not a colour encoding; the colour image must be one of {list(COLOUR_ENCODINGS)}"
        )
    if encoding == "rgb8":
        out = pixels
    elif encoding == "bgr8":
        out = pixels[:, :, ::-1]
    elif encoding == "rgba8":
        out = pixels[:, :, :3]
    elif encoding == "bgra8":
        out = pixels[:, :, 2::-1]
    elif encoding == "mono8":
        out = np.repeat(pixels[:, :, None], 3, axis=2)
    else:  # mono16
        eight = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
        out = np.repeat(eight[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def rgb_from_message(msg: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a colour Image message (any of ``COLOUR_ENCODINGS``)."""
    encoding = msg.encoding
    encoding_info(encoding)
    if encoding in DEPTH_ENCODINGS:
        raise ValueError(
            f"the colour image has depth encoding {encoding!r}; expected one of {list(COLOUR_ENCODINGS)}"
        )
    return to_rgb(image_to_numpy(msg), encoding)


def depth_from_message(msg: Any) -> np.ndarray:
    """(H, W) depth from a depth Image message: uint16 millimetres (16UC1) or float32 metres (32FC1)."""
    encoding = msg.encoding
    if not isinstance(encoding, str):
        encoding_info(encoding)  # raises the TypeError
    if encoding not in DEPTH_ENCODINGS:
        raise ValueError(
            f"the depth image has encoding {short_repr(encoding)}; expected one of {list(DEPTH_ENCODINGS)}"
            " (16UC1 millimetres or 32FC1 metres)"
        )
    return image_to_numpy(msg)


def mask_to_image(mask: np.ndarray) -> ImageData:
    """(H, W) bool mask → mono8 image fields, 255 = selected, 0 = not."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    from llmseg_ros.utils.imageio import mask_to_mono8

    return numpy_to_image(mask_to_mono8(mask.astype(bool)), "mono8")


def overlay_bgr(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Debug overlay of ``mask`` on ``rgb``: (H, W, 3) uint8 in BGR order (for ``bgr8``)."""
    from llmseg_ros.utils.imageio import render_overlay

    return np.ascontiguousarray(render_overlay(rgb, mask.astype(bool))[:, :, ::-1])
