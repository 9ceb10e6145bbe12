"""Background per-frame precomputation that never queues behind the camera.

Frames arrive faster than the proposal stage runs. The worker keeps at most one frame
running and at most one pending (the newest submitted); a newer frame replaces the
pending one, and a frame older than the newest one submitted so far is ignored (so is the
same stamp again with the same pixels; the same stamp with new pixels is a new frame). So
it never processes a frame older than one it skipped to, and never two frames at once.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmseg_ros.ros.frames import Frame


@dataclass
class PrecomputeStats:
    """What the worker did so far.

    Attributes:
        processed: stamps (ns) of the frames it processed, in processing order (the
            latest 1000).
        skipped: pending frames replaced by a newer one before they started.
        ignored: submitted frames older than the newest submitted before them, or that
            frame again (same stamp, frame id and pixels).
        errors: frames whose work raised.
        last_error: ``"<stamp>: <Type>: <message>"`` of the latest failure.
    """

    processed: list[int] = field(default_factory=list)
    skipped: int = 0
    ignored: int = 0
    errors: int = 0
    last_error: str | None = None


class BackgroundPrecomputer:
    """Runs ``work(frame)`` for new frames on one background thread.

    Args:
        work: the per-frame job (e.g. compute and cache the frame's features). Its
            exceptions are counted and passed to ``on_error``; the worker keeps going.
        on_error: called with the frame and the exception (e.g. to log it).
        name: thread name.
    """

    def __init__(
        self,
        work: Callable[[Frame], object],
        on_error: Callable[[Frame, BaseException], None] | None = None,
        name: str = "llmseg-precompute",
    ) -> None:
        self._work = work
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: Frame | None = None
        self._running: Frame | None = None
        self._newest: Frame | None = None
        self._closed = False
        self._processed: deque[int] = deque(maxlen=1000)
        self._stats = PrecomputeStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, frame: Frame) -> bool:
        """Offer a new frame; returns False when it is ignored (older, the same frame again, or closed)."""
        with self._cond:
            if self._closed:
                return False
            newest = self._newest
        # A re-published stamp is a new frame only when its pixels differ (digest outside the lock).
        if newest is not None and (
            frame.stamp_ns < newest.stamp_ns
            or (frame.stamp_ns == newest.stamp_ns and frame.cache_key == newest.cache_key)
        ):
            with self._cond:
                self._stats.ignored += 1
            return False
        with self._cond:
            if self._closed:
                return False
            if self._newest is not None and frame.stamp_ns < self._newest.stamp_ns:
                self._stats.ignored += 1  # a newer frame was submitted meanwhile
                return False
            self._newest = frame
            if self._pending is not None:
                self._stats.skipped += 1
            self._pending = frame
            self._cond.notify_all()
            return True

    def stats(self) -> PrecomputeStats:
        with self._cond:
            return PrecomputeStats(
                processed=list(self._processed),
                skipped=self._stats.skipped,
                ignored=self._stats.ignored,
                errors=self._stats.errors,
                last_error=self._stats.last_error,
            )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is running or pending; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and self._running is None, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Drop the pending frame, let the running one finish (up to ``timeout``), stop."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                frame = self._pending
                assert frame is not None
                self._pending = None
                self._running = frame
            try:
                self._work(frame)
            except Exception as exc:
                with self._cond:
                    self._stats.errors += 1
                    self._stats.last_error = f"{frame.stamp_ns}: {type(exc).__name__}: {exc}"
                if self._on_error is not None:
                    try:
                        self._on_error(frame, exc)
                    except Exception as report_exc:  # a broken logger must not stop the worker
                        with self._cond:
                            self._stats.last_error = (
                                f"{self._stats.last_error} (and on_error raised {type(report_exc).__name__})"
                            )
            finally:
                with self._cond:
                    self._processed.append(frame.stamp_ns)
                    self._running = None
                    self._cond.notify_all()
