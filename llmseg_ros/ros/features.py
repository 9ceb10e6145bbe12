"""A small thread-safe cache of per-frame features, computed at most once per key."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class FeatureCache(Generic[T]):
    """Least-recently-used map ``key → value`` where each value is computed once.

    Concurrent callers asking for the same key share one computation: the first computes,
    the others wait for its result (or its exception). A failed computation is not
    cached, so a later call tries again.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"feature cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Future[T]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        """True when ``key`` has a finished, successful value."""
        with self._lock:
            future = self._entries.get(key)
        return future is not None and future.done() and future.exception() is None

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> tuple[T, bool]:
        """The value for ``key``, computing it with ``compute()`` if nobody has.

        Returns:
            (value, computed_here): ``computed_here`` is True when this call ran ``compute``.
        """
        with self._lock:
            future = self._entries.get(key)
            owner = future is None
            if future is None:
                future = Future()
                self._entries[key] = future
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        if not owner:
            return future.result(), False
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                if self._entries.get(key) is future:
                    del self._entries[key]
            future.set_exception(exc)
            raise
        future.set_result(value)
        return value, True

    def snapshot(self) -> list[Hashable]:
        """The keys held (finished or still computing), least recently used first."""
        with self._lock:
            return list(self._entries)

    def discard(self, keys: Iterable[Hashable]) -> int:
        """Forget ``keys`` (a computation still running for one finishes, uncached); returns how many were held."""
        removed = 0
        with self._lock:
            for key in keys:
                if self._entries.pop(key, None) is not None:
                    removed += 1
        return removed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
