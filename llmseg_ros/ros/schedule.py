"""Which instruction applies to which frame of a recording (``llmseg replay-bag``).

The instructions file (YAML or JSON)::

    instruction: "where can I put the dirty dishes?"   # for every frame (or every N-th)
    every_n: 5                     # optional: every 5th colour frame, starting with the first
    at:                            # optional: instructions at given header stamps
      - stamp: 1700000000.25       #   seconds (number, or "sec.nanosec" string) ...
        instruction: "the red mug"
      - stamp_ns: 1700000001000000000   # ... or integer nanoseconds
        instruction: "a cup"
    tolerance: 0.02                # seconds between an `at` stamp and its nearest frame
    selection: {strategy: iop_threshold, iop_threshold: 0.5}   # optional override
    explain: false                 # optional: also generate the VLM's answer
    track: false                   # optional: ask `instruction` on the first frame only and
                                   #   track its answer on every later frame
    track_timeout: 5.0             # optional: seconds (of frame time) a track lives without a
                                   #   confident update

An ``at`` entry applies to the colour frame whose header stamp is nearest, within the
tolerance, and wins over ``instruction`` on that frame. An ``at`` entry with
``track: true`` (and optionally ``track_id: name``; default ``at<index>``) starts a track
on its frame, answered on every later frame like the node's ``track: true`` requests (the
top-level ``track`` uses the id ``instruction``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmseg_ros.config import SELECTION_STRATEGIES
from llmseg_ros.ros.frames import NS_PER_S, nearest_index
from llmseg_ros.utils.configfile import load_config_file


@dataclass
class TimedInstruction:
    """An instruction for the colour frame whose header stamp is nearest to ``stamp_ns``.

    Attributes:
        track: start a track from the answer (followed on every later frame).
        track_id: the track's id (``None`` = ``at<index>``).
    """

    stamp_ns: int
    instruction: str
    track: bool = False
    track_id: str | None = None


@dataclass
class ReplaySchedule:
    """Which instruction applies to which colour frame.

    Attributes:
        instruction: applied to every ``every_n``-th colour frame (indices 0, N, 2N, ...);
            ``None`` = only the ``at`` entries.
        every_n: period of ``instruction`` in colour frames (1 = every frame).
        at: instructions at given header stamps (they win over ``instruction``).
        tolerance_ns: how far an ``at`` stamp may be from its nearest frame.
        selection_strategy: strategy override ("" = the config's).
        iop_threshold: threshold override (negative = the config's).
        explain: also generate the VLM's text answer.
        track: ask ``instruction`` on the first frame only and track its answer.
        track_timeout_s: seconds of frame time a track lives without a confident update.
    """

    instruction: str | None = None
    every_n: int = 1
    at: list[TimedInstruction] = field(default_factory=list)
    tolerance_ns: int = 20_000_000
    selection_strategy: str = ""
    iop_threshold: float = -1.0
    explain: bool = False
    track: bool = False
    track_timeout_s: float = 5.0

    KEYS = ("instruction", "every_n", "at", "tolerance", "selection", "explain", "track", "track_timeout")
    TOP_TRACK_ID = "instruction"

    def __post_init__(self) -> None:
        if self.instruction is not None and (
            not isinstance(self.instruction, str) or not self.instruction.strip()
        ):
            raise ValueError(f"instruction must be a non-empty string, got {self.instruction!r}")
        if self.instruction is None and not self.at:
            raise ValueError(
                "the instructions file must give `instruction` (per frame / every_n) and/or `at` entries"
            )
        if isinstance(self.every_n, bool) or not isinstance(self.every_n, int) or self.every_n < 1:
            raise ValueError(f"every_n must be an integer >= 1, got {self.every_n!r}")
        if (
            isinstance(self.tolerance_ns, bool)
            or not isinstance(self.tolerance_ns, int)
            or self.tolerance_ns < 0
        ):
            raise ValueError(f"tolerance must be >= 0 seconds, got {self.tolerance_ns!r} ns")
        if self.selection_strategy and self.selection_strategy not in SELECTION_STRATEGIES:
            raise ValueError(
                f"selection.strategy must be one of {list(SELECTION_STRATEGIES)}, got {self.selection_strategy!r}"
            )
        if self.track and (self.instruction is None or self.every_n != 1):
            raise ValueError(
                "track: true needs `instruction` (asked on the first frame, then tracked) and no every_n"
            )
        finite_seconds(self.track_timeout_s, "track_timeout", positive=True)
        ids = [self.track_ids_of(i, e) for i, e in enumerate(self.at) if e.track]
        if self.track:
            ids.append(self.TOP_TRACK_ID)
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"track ids must be unique, got {duplicated} more than once")
        if not math.isfinite(self.iop_threshold) or self.iop_threshold > 1.0:
            raise ValueError(
                f"selection.iop_threshold must be a number in [0, 1] (or absent), got {self.iop_threshold}"
            )

    @classmethod
    def from_mapping(cls, data: Any) -> ReplaySchedule:
        """Build from the parsed instructions file; ``ValueError`` names any bad key or value."""
        if not isinstance(data, dict):
            raise ValueError(f"the instructions file must hold a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the instructions file; expected some of {list(cls.KEYS)}"
            )
        entries = data.get("at") or []
        if not isinstance(entries, list):
            raise ValueError(f"at must be a list of {{stamp, instruction}} mappings, got {entries!r:.80}")
        at = [_timed_instruction(i, entry) for i, entry in enumerate(entries)]
        tolerance = finite_seconds(data.get("tolerance", 0.02), "tolerance")
        selection = data.get("selection") or {}
        if not isinstance(selection, dict) or set(selection) - {"strategy", "iop_threshold"}:
            raise ValueError(
                f"selection must be a mapping with strategy and/or iop_threshold, got {selection!r}"
            )
        strategy = selection.get("strategy", "")
        if not isinstance(strategy, str):
            raise ValueError(f"selection.strategy must be a string, got {strategy!r}")
        threshold = selection.get("iop_threshold", -1.0)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
            or ("iop_threshold" in selection and not 0.0 <= threshold <= 1.0)
        ):
            raise ValueError(f"selection.iop_threshold must be a number in [0, 1], got {threshold!r}")
        explain, track = data.get("explain", False), data.get("track", False)
        for name, flag in (("explain", explain), ("track", track)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        if track and "every_n" in data:
            raise ValueError("track: true asks `instruction` on the first frame only; remove every_n")
        return cls(
            instruction=data.get("instruction"),
            every_n=data.get("every_n", 1),
            at=at,
            tolerance_ns=round(float(tolerance) * NS_PER_S),
            selection_strategy=strategy,
            iop_threshold=float(threshold),
            explain=explain,
            track=track,
            track_timeout_s=finite_seconds(data.get("track_timeout", 5.0), "track_timeout", positive=True),
        )

    @staticmethod
    def track_ids_of(index: int, entry: TimedInstruction) -> str:
        """The track id of ``at[index]`` (its ``track_id``, else ``at<index>``)."""
        return entry.track_id or f"at{index}"

    @classmethod
    def from_file(cls, path: str | Path) -> ReplaySchedule:
        """Read a ``.json`` file as JSON, anything else as YAML (errors name the file and line)."""
        return load_config_file(path, what="the instructions file").build(cls.from_mapping)

    def plan(self, stamps: list[int]) -> tuple[dict[int, str], list[TimedInstruction]]:
        """Instruction per colour-frame index for frames with header ``stamps`` (bag order).

        Returns:
            ({frame index: instruction}, ``at`` entries with no frame within the tolerance).
        """
        plan: dict[int, str] = {}
        if self.instruction is not None:
            for i in range(0, min(len(stamps), 1) if self.track else len(stamps), self.every_n):
                plan[i] = self.instruction.strip()
        order = sorted(range(len(stamps)), key=lambda i: stamps[i])
        sorted_stamps = [stamps[i] for i in order]
        unmatched: list[TimedInstruction] = []
        for entry in self.at:
            best = nearest_index(sorted_stamps, entry.stamp_ns)
            if best is None or abs(sorted_stamps[best] - entry.stamp_ns) > self.tolerance_ns:
                unmatched.append(entry)
                continue
            plan[order[best]] = entry.instruction.strip()
        return plan, unmatched

    def track_plan(self, stamps: list[int]) -> dict[int, str]:
        """Frame index → id of the track that starts there (the frame's instruction answered first)."""
        starts: dict[int, str] = {}
        if self.track and stamps:
            starts[0] = self.TOP_TRACK_ID
        order = sorted(range(len(stamps)), key=lambda i: stamps[i])
        sorted_stamps = [stamps[i] for i in order]
        for index, entry in enumerate(self.at):
            best = nearest_index(sorted_stamps, entry.stamp_ns)
            if best is None or abs(sorted_stamps[best] - entry.stamp_ns) > self.tolerance_ns:
                continue
            frame = order[best]
            if entry.track:
                starts[frame] = self.track_ids_of(index, entry)
            else:
                starts.pop(frame, None)  # a later plain entry on the same frame wins, as in plan()
        return starts


def finite_seconds(value: Any, name: str, *, positive: bool = False) -> float:
    """``value`` as seconds: a finite int or float, >= 0 (> 0 with ``positive``); else a ``ValueError`` naming ``name``."""
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name} must be a finite number of seconds {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return float(value)


def _timed_instruction(index: int, entry: Any) -> TimedInstruction:
    where = f"at[{index}]"
    if not isinstance(entry, dict) or set(entry) - {"stamp", "stamp_ns", "instruction", "track", "track_id"}:
        raise ValueError(
            f"{where} must be a mapping with stamp (or stamp_ns) and instruction (and optionally track, "
            f"track_id), got {entry!r}"
        )
    instruction = entry.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}.instruction must be a non-empty string, got {instruction!r}")
    track, track_id = entry.get("track", False), entry.get("track_id")
    if not isinstance(track, bool):
        raise ValueError(f"{where}.track must be true or false, got {track!r}")
    if track_id is not None and (
        not track
        or not isinstance(track_id, str)
        or not track_id.strip()
        or any(c.isspace() for c in track_id)
    ):
        raise ValueError(
            f"{where}.track_id must be a name without whitespace, with track: true; got {track_id!r}"
        )
    if ("stamp" in entry) == ("stamp_ns" in entry):
        raise ValueError(f"{where} needs exactly one of stamp (seconds) or stamp_ns (integer nanoseconds)")
    if "stamp_ns" in entry:
        value = entry["stamp_ns"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}.stamp_ns must be a non-negative integer, got {value!r}")
        return TimedInstruction(value, instruction, track, track_id)
    return TimedInstruction(_seconds_to_ns(where, entry["stamp"]), instruction, track, track_id)


def _seconds_to_ns(where: str, value: Any) -> int:
    if isinstance(value, str):
        sec, _, frac = value.strip().partition(".")
        if not sec.isdigit() or (frac and not frac.isdigit()) or len(frac) > 9:
            raise ValueError(f"{where}.stamp string must look like 'sec.nanosec', got {value!r}")
        return int(sec) * NS_PER_S + int(frac.ljust(9, "0") or 0)
    finite_seconds(value, f"{where}.stamp")
    return round(float(value) * NS_PER_S) if isinstance(value, float) else int(value) * NS_PER_S
