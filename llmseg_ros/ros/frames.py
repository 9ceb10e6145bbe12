"""Camera frames and the buffer of the latest N frames, looked up by header stamp.

Stamps are integer nanoseconds of ROS time (``sec · 10⁹ + nanosec`` of the header).
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmseg_ros.ros.depth import Intrinsics, intrinsics_from_camera_info
from llmseg_ros.ros.images import depth_from_message, rgb_from_message
from llmseg_ros.utils.text import check_text, short_repr

NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time`` (fields ``sec``, ``nanosec``) → integer nanoseconds.

    Raises:
        TypeError: ``sec`` or ``nanosec`` is not an integer.
        ValueError: ``sec`` is outside int32 or ``nanosec`` outside [0, 10⁹).
    """
    values = []
    for name in ("sec", "nanosec"):
        value = getattr(stamp, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(
                f"stamp.{name} must be an integer, got {type(value).__name__} {short_repr(value)}"
            )
        values.append(int(value))
    sec, nanosec = values
    if not -(2**31) <= sec < 2**31:
        raise ValueError(f"stamp.sec must be a 32-bit signed integer, got {short_repr(sec)}")
    if not 0 <= nanosec < NS_PER_S:
        raise ValueError(f"stamp.nanosec must be in [0, 10^9), got {short_repr(nanosec)}")
    return sec * NS_PER_S + nanosec


def ns_to_sec_nanosec(stamp_ns: int) -> tuple[int, int]:
    """Integer nanoseconds → (sec, nanosec) with 0 ≤ nanosec < 10⁹."""
    sec, nanosec = divmod(int(stamp_ns), NS_PER_S)
    return int(sec), int(nanosec)


def format_stamp(stamp_ns: int) -> str:
    """Human-readable ``sec.nanosec`` (e.g. ``1700000000.250000000``)."""
    sec, nanosec = ns_to_sec_nanosec(stamp_ns)
    return f"{sec}.{nanosec:09d}"


@dataclass(frozen=True)
class HeaderData:
    """The fields of a ``std_msgs/Header``: stamp in nanoseconds, frame id."""

    stamp_ns: int
    frame_id: str

    @classmethod
    def from_message(cls, header: Any) -> HeaderData:
        """Read a ``std_msgs/Header``; ``TypeError`` / ``ValueError`` for a bad stamp or frame id."""
        frame_id = check_text(header.frame_id, "header.frame_id", allow_newlines=False)
        return cls(stamp_to_ns(header.stamp), frame_id)


@dataclass
class Frame:
    """One colour frame (optionally with registered depth) ready for the segmenter.

    Attributes:
        header: the colour image's header (copied to every output).
        rgb: (H, W, 3) uint8 RGB.
        depth: (H', W') uint16 millimetres (16UC1) or float32 metres (32FC1), registered
            to the colour image (same field of view), or ``None``.
        depth_encoding: ``16UC1`` or ``32FC1`` when ``depth`` is set.
        depth_header: the depth image's header (copied to the masked depth and points).
        intrinsics: of the depth image, from its CameraInfo.
        camera_info: the CameraInfo message itself, republished next to the masked depth.
        from_request: the frame came in a service request rather than from the topic.
    """

    header: HeaderData
    rgb: np.ndarray
    depth: np.ndarray | None = None
    depth_encoding: str | None = None
    depth_header: HeaderData | None = None
    intrinsics: Intrinsics | None = None
    camera_info: Any = None
    from_request: bool = False
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def stamp_ns(self) -> int:
        return self.header.stamp_ns

    @property
    def key(self) -> tuple[int, str]:
        """The frame's slot in a buffer: (stamp, frame id). Not an identity of its pixels:
        a camera may re-publish a stamp with new pixels (use :attr:`cache_key` for caches)."""
        return (self.header.stamp_ns, self.header.frame_id)

    @property
    def digest(self) -> str:
        """Content digest of the colour pixels (shape and bytes), computed once.

        A frame's arrays must not be modified after it is built (buffers and caches share it).
        """
        if self._digest is None:
            rgb = np.ascontiguousarray(self.rgb)
            h = hashlib.blake2b(digest_size=16)
            h.update(repr((rgb.shape, rgb.dtype.str)).encode())
            h.update(rgb.data)
            self._digest = h.hexdigest()
        return self._digest

    @property
    def cache_key(self) -> tuple[int, str, str]:
        """Identity of the frame for per-frame caches: (stamp, frame id, pixel digest).

        Equal stamps with different pixels (or another resolution) never share an entry;
        the same pixels re-published under the same stamp do.
        """
        return (self.header.stamp_ns, self.header.frame_id, self.digest)

    @property
    def has_depth(self) -> bool:
        return self.depth is not None and self.intrinsics is not None


def frame_from_messages(
    image: Any, depth: Any = None, camera_info: Any = None, *, from_request: bool = False
) -> Frame:
    """Convert synchronised Image (+ depth Image + CameraInfo) messages into a :class:`Frame`.

    Raises:
        ValueError: an unsupported encoding, inconsistent sizes, a bad header or an
            uncalibrated (or non-finite) CameraInfo.
        TypeError: a field of the wrong type.
    """
    rgb = rgb_from_message(image)
    frame = Frame(header=HeaderData.from_message(image.header), rgb=rgb, from_request=from_request)
    if depth is None:
        return frame
    if camera_info is None:
        raise ValueError("a depth image needs its CameraInfo to be used")
    frame.depth = depth_from_message(depth)
    frame.depth_encoding = depth.encoding
    frame.depth_header = HeaderData.from_message(depth.header)
    frame.intrinsics = intrinsics_from_camera_info(camera_info)
    frame.camera_info = camera_info
    return frame


def frame_keeping_colour(image: Any, depth: Any = None, camera_info: Any = None) -> tuple[Frame, str | None]:
    """:func:`frame_from_messages`, keeping the colour image when only the depth side is bad.

    A depth image or CameraInfo that cannot be used (an unsupported encoding, a size that
    does not match, an uncalibrated or non-finite CameraInfo) does not cost the frame its
    mask: the frame is kept without depth (no ``masked_depth`` or ``points`` for it).

    Returns:
        (frame, why its depth was left out, or ``None`` when it was used).
    Raises:
        ValueError, TypeError: the colour image itself cannot be used.
    """
    try:
        return frame_from_messages(image, depth, camera_info), None
    except (ValueError, TypeError) as exc:
        if depth is None:
            raise
        return frame_from_messages(image), str(exc)


class FrameLookupError(LookupError):
    """No buffered frame fits the request (none yet, or a stale / unknown stamp)."""


def nearest_index(sorted_stamps: Sequence[int], stamp_ns: int) -> int | None:
    """Index of the stamp nearest to ``stamp_ns`` in ascending ``sorted_stamps`` (ns).

    On a tie the earlier stamp wins. Returns ``None`` when ``sorted_stamps`` is empty.
    """
    i = bisect.bisect_left(sorted_stamps, stamp_ns)
    candidates = [j for j in (i - 1, i) if 0 <= j < len(sorted_stamps)]
    if not candidates:
        return None
    return min(candidates, key=lambda j: abs(sorted_stamps[j] - stamp_ns))


FrameListener = Callable[[Frame, Frame | None], None]


class FrameBuffer:
    """The latest ``capacity`` frames, sorted by stamp; thread-safe.

    A frame with the stamp of a buffered one replaces it; frames arriving out of order
    are inserted in stamp order; the oldest frames are dropped beyond ``capacity``.
    Listeners (:meth:`add_listener`) hear of every frame that leaves, so caches tied to a
    frame can forget it.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"frame buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._stamps: list[int] = []
        self._frames: list[Frame] = []
        self._lock = threading.Lock()
        self._listeners: list[FrameListener] = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def add_listener(self, listener: FrameListener) -> None:
        """Call ``listener(departed, replacement)`` whenever a frame leaves the buffer.

        ``replacement`` is the new frame with the same stamp when one replaced it, ``None``
        when it was evicted (beyond ``capacity``) or cleared. Called outside the buffer's
        lock, on the thread that added (or cleared); a listener must not raise.
        """
        with self._lock:
            self._listeners.append(listener)

    def add(self, frame: Frame) -> None:
        departed: list[tuple[Frame, Frame | None]] = []
        with self._lock:
            i = bisect.bisect_left(self._stamps, frame.stamp_ns)
            if i < len(self._stamps) and self._stamps[i] == frame.stamp_ns:
                departed.append((self._frames[i], frame))
                self._frames[i] = frame
            else:
                self._stamps.insert(i, frame.stamp_ns)
                self._frames.insert(i, frame)
            while len(self._frames) > self.capacity:
                self._stamps.pop(0)
                departed.append((self._frames.pop(0), None))
            listeners = list(self._listeners)
        self._notify(listeners, departed)

    def _notify(self, listeners: list[FrameListener], departed: list[tuple[Frame, Frame | None]]) -> None:
        for old, new in departed:
            for listener in listeners:
                listener(old, new)

    def latest(self) -> Frame | None:
        with self._lock:
            return self._frames[-1] if self._frames else None

    def stamps(self) -> list[int]:
        with self._lock:
            return list(self._stamps)

    def clear(self) -> None:
        with self._lock:
            departed: list[tuple[Frame, Frame | None]] = [(f, None) for f in self._frames]
            self._stamps.clear()
            self._frames.clear()
            listeners = list(self._listeners)
        self._notify(listeners, departed)

    def get(self, stamp_ns: int, tolerance_ns: int = 0) -> Frame:
        """The buffered frame nearest to ``stamp_ns``, within ``tolerance_ns``.

        Raises:
            FrameLookupError: the buffer is empty, or no frame is within the tolerance;
                the message says whether the stamp is older than the buffer (stale),
                newer than its latest frame, or falls between buffered frames.
        """
        with self._lock:
            stamps = list(self._stamps)
            frames = list(self._frames)
        if not frames:
            raise FrameLookupError("no frame has been received yet")
        best = nearest_index(stamps, stamp_ns)
        assert best is not None  # the buffer is not empty
        if abs(stamps[best] - stamp_ns) <= tolerance_ns:
            return frames[best]
        span = f"the buffer holds {len(stamps)} frame(s) from {format_stamp(stamps[0])} to {format_stamp(stamps[-1])}"
        tol = f"{tolerance_ns / NS_PER_S:g} s"
        if stamp_ns < stamps[0]:
            raise FrameLookupError(
                f"stamp {format_stamp(stamp_ns)} is stale: older than every buffered frame ({span}; "
                f"it keeps the latest {self.capacity}, parameter frame_buffer_size)"
            )
        if stamp_ns > stamps[-1]:
            raise FrameLookupError(
                f"stamp {format_stamp(stamp_ns)} is newer than the latest buffered frame ({span})"
            )
        raise FrameLookupError(
            f"no buffered frame within {tol} of stamp {format_stamp(stamp_ns)} (nearest: "
            f"{format_stamp(stamps[best])}; {span}; parameter stamp_tolerance)"
        )
