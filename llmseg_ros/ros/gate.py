"""The node's models are freed only when no model call is running (deactivate, cleanup, Ctrl-C).

:class:`ModelGate` counts the model calls in progress. ``close()`` stops new calls and
waits for the running ones before the caller frees the models, so no request ever sees
its models freed under it (a half-freed model would fail, or worse, be loaded again on
first use after the node was told to release the GPU). :class:`GatedSegmenter` is the
segmenter as the request handler and the background precompute see it: every
``prepare`` / ``segment`` passes through the gate. No ROS import.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from llmseg_ros.config import SegmenterConfig, SelectionConfig
from llmseg_ros.types import FrameFeatures, SegmentResult


class ModelsUnavailable(RuntimeError):
    """A model call arrived while the models are being freed or are freed."""


class ModelGate:
    """Lets model calls in while open; :meth:`close` refuses new ones and waits for the running ones.

    Thread-safe. The gate starts closed; :meth:`open` once the models are loaded.
    """

    def __init__(self, reason: str = "the models are not loaded") -> None:
        self._cond = threading.Condition()
        self._open = False
        self._running = 0
        self._reason = reason

    @property
    def running(self) -> int:
        """Model calls in progress."""
        with self._cond:
            return self._running

    def open(self) -> None:
        """Accept model calls (the models are loaded)."""
        with self._cond:
            self._open = True

    def close(self, reason: str, timeout: float | None = None) -> bool:
        """Refuse new calls (with ``reason``) and wait until no call is running.

        Args:
            reason: why calls are refused; the message of :class:`ModelsUnavailable`.
            timeout: seconds to wait for the running calls; ``None`` = as long as they take.
        Returns:
            ``True`` when no call is running any more (the models may be freed), ``False``
            when the wait timed out (a call still uses them).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._open = False
            self._reason = reason
            while self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def enter(self) -> None:
        """Start a model call; raises :class:`ModelsUnavailable` while the gate is closed."""
        with self._cond:
            if not self._open:
                raise ModelsUnavailable(self._reason)
            self._running += 1

    def exit(self) -> None:
        """End a model call started with :meth:`enter`."""
        with self._cond:
            if self._running <= 0:
                raise RuntimeError("ModelGate.exit() without a matching enter()")
            self._running -= 1
            if not self._running:
                self._cond.notify_all()


class GatedSegmenter:
    """A segmenter whose ``prepare`` / ``segment`` calls pass through a :class:`ModelGate`.

    Args:
        segmenter: a :class:`~llmseg_ros.pipeline.ReasonSegmenter` (or anything with its
            ``config``, ``prepare`` and ``segment``).
        gate: shared with whoever frees the models.
    """

    def __init__(self, segmenter: Any, gate: ModelGate) -> None:
        self.segmenter = segmenter
        self.gate = gate
        self.config: SegmenterConfig = segmenter.config

    def prepare(self, image: np.ndarray) -> FrameFeatures:
        """See :meth:`llmseg_ros.pipeline.ReasonSegmenter.prepare`; (H, W, 3) uint8 RGB in."""
        self.gate.enter()
        try:
            features: FrameFeatures = self.segmenter.prepare(image)
            return features
        finally:
            self.gate.exit()

    def segment(
        self,
        frame_or_image: FrameFeatures | np.ndarray,
        instruction: str,
        *,
        selection: SelectionConfig | None = None,
        explain: bool = False,
        conversation_id: str | None = None,
    ) -> SegmentResult:
        """See :meth:`llmseg_ros.pipeline.ReasonSegmenter.segment`."""
        self.gate.enter()
        try:
            result: SegmentResult = self.segmenter.segment(
                frame_or_image,
                instruction,
                selection=selection,
                explain=explain,
                conversation_id=conversation_id,
            )
            return result
        finally:
            self.gate.exit()
