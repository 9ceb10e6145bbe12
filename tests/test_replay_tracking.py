"""``llmseg replay-bag`` with tracks: an instructions file with ``track: true`` answers the
recording frame by frame offline, with every output topic and the track's id and state."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ros_testing import FakeSegmenter
from test_bag_replay import TOPICS, colour_stamp, read_bag, write_bag

from llmseg_ros.config import TrackerConfig
from llmseg_ros.ros.bag_replay import replay_bag
from llmseg_ros.ros.frames import stamp_to_ns
from llmseg_ros.ros.images import image_to_numpy
from llmseg_ros.ros.schedule import ReplaySchedule


class TrackingFake(FakeSegmenter):
    """FakeSegmenter's answers (the red half), followed by the real tiny pipeline's tracker."""

    def __init__(self, segmenter: Any) -> None:
        super().__init__()
        self.track = segmenter.track


def replay(tmp_path: Path, text: str, segmenter: Any, frames: int = 6) -> tuple[Any, dict[str, list]]:
    bag = write_bag(tmp_path / "in", "sqlite3", frames=frames)
    logs: list[str] = []
    schedule = ReplaySchedule.from_mapping(yaml.safe_load(text))
    summary = replay_bag(bag, tmp_path / "out", schedule, segmenter, TOPICS, progress=False, log=logs.append)
    return summary, read_bag(tmp_path / "out")


@pytest.mark.slow
def test_a_tracked_instruction_is_answered_on_every_later_frame(tmp_path: Path, tracking_segmenter) -> None:
    summary, out = replay(
        tmp_path,
        "instruction: the red things\ntrack: true\ntrack_timeout: 100",
        TrackingFake(tracking_segmenter),
    )
    assert (summary.processed, summary.tracked, summary.failed) == (1, 5, 0)
    segs = [m for _, m, _ in out["/llmseg/segmentation"]]
    assert [stamp_to_ns(m.header.stamp) for m in segs] == [colour_stamp(i) for i in range(6)]
    assert {m.track_id for m in segs} == {"instruction"} and segs[0].track_state == "started"
    assert all(m.track_state in ("tracking", "lost") and m.instruction == "the red things" for m in segs[1:])
    for topic in ("/llmseg/mask", "/llmseg/overlay", "/llmseg/masked_depth", "/llmseg/points"):
        assert len(out[topic]) == 6, topic
    masks = [m for _, m, _ in out["/llmseg/mask"]]
    assert [stamp_to_ns(m.header.stamp) for m in masks] == [colour_stamp(i) for i in range(6)]
    assert all(m.header.frame_id == "color_optical" and m.encoding == "mono8" for m in masks)
    for seg, mask in zip(segs, masks):  # the segmentation message carries the same mask
        np.testing.assert_array_equal(image_to_numpy(seg.mask), image_to_numpy(mask))
    depth = [stamp_to_ns(m.header.stamp) for _, m, _ in out["/llmseg/masked_depth"]]
    assert depth == [colour_stamp(i) + 2_000_000 for i in range(6)]  # each frame's own depth header


def test_tracks_start_at_stamps_and_end_on_their_timeout(tmp_path: Path, tracking_segmenter) -> None:
    def unconfident(*args: Any, config: TrackerConfig, **kwargs: Any) -> Any:
        # no propagated frame counts as confident, so the track times out on frame time
        return tracking_segmenter.track(
            *args, config=dataclasses.replace(config, lost_below=1.0, requery_below=0.0), **kwargs
        )

    segmenter = TrackingFake(tracking_segmenter)
    segmenter.track = unconfident
    text = f"""
at:
  - {{stamp_ns: {colour_stamp(1)}, instruction: the red things, track: true, track_id: red}}
  - {{stamp_ns: {colour_stamp(2)}, instruction: the left half}}
track_timeout: 0.25
"""
    summary, out = replay(tmp_path, text, segmenter)
    assert (summary.processed, summary.tracked, summary.failed) == (2, 3, 0)
    segs = [
        (stamp_to_ns(m.header.stamp), m.track_id, m.track_state) for _, m, _ in out["/llmseg/segmentation"]
    ]
    # frame 1 starts the track; frame 2 answers the track, then the plain instruction;
    # 0.3 s after the start (frame 4) the track expires: answered, marked ended, then no more
    assert segs == [
        (colour_stamp(1), "red", "started"),
        (colour_stamp(2), "red", "tracking"),  # weak, not yet lost (lost_patience 3)
        (colour_stamp(2), "", ""),
        (colour_stamp(3), "red", "tracking"),
        (colour_stamp(4), "red", "ended"),
    ]
    last = [m for _, m, _ in out["/llmseg/segmentation"]][-1]
    assert last.track_reason.startswith("expired: no confident update for 0.30 s")
    assert any(
        line.startswith("frame 4 (") and "track red ('the red things') ended: expired" in line
        for line in summary.messages
    )
    assert len(out["/llmseg/mask"]) == 5


@pytest.mark.parametrize("text", ["instruction: a\ntrack: true"])
def test_a_segmenter_that_cannot_track_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(
        ValueError, match="the segmenter \\(FakeSegmenter\\) cannot track; remove track: true"
    ):
        replay(tmp_path, text, FakeSegmenter())
