"""A track's bookkeeping: when to re-query, when the target is lost, when the track expires.

Pure logic on numbers (no models), driven by :class:`llmseg_ros.tracking.tracker.Tracker`
once per frame; the rules are :class:`llmseg_ros.config.TrackerConfig`'s:

* before propagating: a *periodic* re-query when ``requery_every`` frames have passed
  since the last full answer, or a *lost* re-query every ``lost_requery_every`` frames
  while the target is lost;
* after propagating: a *low_confidence* re-query when the confidence is below
  ``requery_below`` (not while lost: lost tracks retry at their own pace);
* judging a frame: a propagated frame is *weak* when its confidence is below
  ``lost_below`` or its mask is (almost) empty; the target is lost at once when the mask
  is empty and after ``lost_patience`` weak frames in a row otherwise; a confident frame
  recovers it. A re-query's non-empty answer is confident; an empty one loses the target.
* the track expires when ``timeout_s`` of frame time passes without a confident frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmseg_ros.config import TrackerConfig

NS_PER_S = 1_000_000_000
REQUERY_REASONS = ("periodic", "low_confidence", "lost")


@dataclass
class TrackState:
    """Where a track stands after its latest frame.

    Attributes:
        frame_index: frames seen, the start frame being 0.
        frames_since_query: frames since the last full answer (start or re-query).
        weak_frames: consecutive weak frames up to the latest one.
        lost: the target is lost.
        lost_reason: why, while lost.
        last_stamp_ns: stamp of the latest frame.
        last_confident_ns: stamp of the latest confident frame.
        requeries: full re-queries run so far.
        ended: why the track ended (expired or stopped), else ``None``.
    """

    frame_index: int = 0
    frames_since_query: int = 0
    weak_frames: int = 0
    lost: bool = False
    lost_reason: str | None = None
    last_stamp_ns: int = 0
    last_confident_ns: int = 0
    requeries: int = 0
    ended: str | None = None


class TrackPolicy:
    """The rules of :class:`TrackerConfig` applied to a :class:`TrackState` (module docstring).

    Args:
        config: the thresholds.
        can_requery: whether the track has an instruction to re-query with; without
            one every re-query rule is off.
    """

    def __init__(self, config: TrackerConfig, can_requery: bool) -> None:
        self.config = config
        self.can_requery = can_requery

    def start(self, stamp_ns: int) -> TrackState:
        """The state right after the start frame (its answer counts as confident)."""
        return TrackState(last_stamp_ns=stamp_ns, last_confident_ns=stamp_ns)

    def begin_frame(self, state: TrackState, stamp_ns: int) -> None:
        """Count a new frame.

        Raises:
            RuntimeError: the track has ended.
            ValueError: ``stamp_ns`` is older than the previous frame's.
        """
        if state.ended is not None:
            raise RuntimeError(f"the track has ended ({state.ended}); start a new one")
        if stamp_ns < state.last_stamp_ns:
            raise ValueError(
                f"frame stamp {stamp_ns} ns is older than the track's previous frame ({state.last_stamp_ns} ns); "
                "give frames in time order"
            )
        state.frame_index += 1
        state.frames_since_query += 1
        state.last_stamp_ns = stamp_ns

    def requery_before(self, state: TrackState) -> str | None:
        """``periodic`` / ``lost`` when the full method should answer this frame instead of propagation."""
        cfg = self.config
        if not self.can_requery:
            return None
        if state.lost:
            if cfg.lost_requery_every and state.frames_since_query >= cfg.lost_requery_every:
                return "lost"
            return None
        if cfg.requery_every and state.frames_since_query >= cfg.requery_every:
            return "periodic"
        return None

    def requery_after(self, state: TrackState, confidence: float) -> str | None:
        """``low_confidence`` when a propagated frame is too weak to keep (not while lost)."""
        if self.can_requery and not state.lost and confidence < self.config.requery_below:
            return "low_confidence"
        return None

    def is_empty(self, area_fraction: float) -> bool:
        """A mask covering less than ``min_area_fraction`` of the image counts as empty."""
        return area_fraction <= 0.0 or area_fraction < self.config.min_area_fraction

    def judge(self, state: TrackState, *, confidence: float, area_fraction: float, requeried: bool) -> None:
        """Update weak / lost / confident bookkeeping and the timeout with this frame's answer.

        Args:
            confidence: the frame's confidence in [0, 1].
            area_fraction: the mask's share of the image in [0, 1].
            requeried: the answer came from the full method.
        """
        cfg = self.config
        empty = self.is_empty(area_fraction)
        if requeried:
            state.requeries += 1
            state.frames_since_query = 0
            weak = empty
        else:
            weak = empty or confidence < cfg.lost_below
        state.weak_frames = state.weak_frames + 1 if weak else 0
        if not weak:
            state.lost, state.lost_reason = False, None
            state.last_confident_ns = state.last_stamp_ns
        elif empty:
            state.lost = True
            state.lost_reason = (
                "the re-query found no target"
                if requeried
                else "the mask is empty (the target left or is hidden)"
            )
        elif state.weak_frames >= cfg.lost_patience:
            state.lost = True
            state.lost_reason = f"confidence below {cfg.lost_below} for {state.weak_frames} frames"
        self.check_timeout(state, state.last_stamp_ns)

    def check_timeout(self, state: TrackState, now_ns: int) -> bool:
        """End the track when ``timeout_s`` passed since its last confident frame; True when ended."""
        if state.ended is None and now_ns - state.last_confident_ns > self.config.timeout_s * NS_PER_S:
            seconds = (now_ns - state.last_confident_ns) / NS_PER_S
            state.ended = (
                f"expired: no confident update for {seconds:.2f} s (timeout_s={self.config.timeout_s})"
            )
        return state.ended is not None
