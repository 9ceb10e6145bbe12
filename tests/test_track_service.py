"""Tracks as the node drives them, without ROS (``llmseg_ros.ros.track_service``): the request
fields, start / step / stop / timeout messages with their headers and states, the model
call around every tracker update, and tracks in the bag-replay schedule."""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from ros_testing import empty_image_msg, image_msg
from tracking_helpers import answer, box_mask, frame_at

from llmseg_ros.config import TrackerConfig
from llmseg_ros.ros.frames import Frame, HeaderData
from llmseg_ros.ros.gate import ModelGate, ModelsUnavailable
from llmseg_ros.ros.handler import RequestError, SegmentationOutcome
from llmseg_ros.ros.schedule import ReplaySchedule
from llmseg_ros.ros.track_service import (
    LOST,
    STARTED,
    TRACKING,
    LiveTracks,
    ModelCall,
    TrackRequest,
    parse_stop_request,
    parse_track_request,
)

MS = 1_000_000
# Frame stamps far from the node's clock (a recording, or a camera on another clock).
T0 = 100 * 1_000_000_000
CLOCK = 1_800_000_000 * 1_000_000_000


def outcome_on(frame: Frame, mask: np.ndarray, instruction: str = "the red circle") -> SegmentationOutcome:
    return SegmentationOutcome(
        True, "ok: answered", instruction=instruction, frame=frame, result=answer(mask)
    )


def request(**fields: object) -> SimpleNamespace:
    values: dict[str, object] = {"track": False, "track_id": "", "image": empty_image_msg()}
    values.update(fields)
    return SimpleNamespace(**values)


def test_track_request_fields_are_checked() -> None:
    assert parse_track_request(request()) == TrackRequest(False, None)
    assert parse_track_request(SimpleNamespace()) == TrackRequest(False, None)  # a request without the fields
    assert parse_track_request(request(track=True, track_id=" dishes ")) == TrackRequest(True, "dishes")
    cases = [
        (request(track_id="x"), "track_id 'x' is set but track is false"),
        (request(track=True, track_id="two words"), "must not contain whitespace"),
        (request(track=True, track_id="x" * 65), "track_id has 65 characters; the limit is 64"),
        (request(track=True, track_id="a\x07"), "control character U+0007"),
        (request(track=1), "track must be a bool, got int 1"),
        (
            request(track=True, image=image_msg(np.zeros((4, 4, 3), np.uint8), "rgb8")),
            "cannot start on a request image",
        ),
    ]
    for req, message in cases:
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_track_request(req)
    assert parse_stop_request(SimpleNamespace(track_id="a", all=False)) == "a"
    assert parse_stop_request(SimpleNamespace(track_id="", all=True)) is None
    for track_id, every, said in (("", False, "neither"), ("a", True, "both track_id 'a' and all: true")):
        with pytest.raises(RequestError, match=f"give exactly one of track_id .*{said}"):
            parse_stop_request(SimpleNamespace(track_id=track_id, all=every))


def test_start_step_and_stop_publish_states_with_the_frames_headers(tracking_segmenter, scene_image) -> None:
    live = LiveTracks(tracking_segmenter, TrackerConfig(timeout_s=100.0), max_tracks=2)
    first = frame_at(scene_image, T0)
    started = live.start(
        outcome_on(first, box_mask(scene_image, (15, 25, 45, 55))), TrackRequest(True, "circle")
    )
    assert (started.track_id, started.track_state, started.success) == ("circle", STARTED, True)
    assert started.message == "ok: answered; tracking as 'circle'"
    other = live.start(
        outcome_on(first, box_mask(scene_image, (60, 20, 100, 60)), "the green box"), TrackRequest(True, None)
    )
    assert len(other.track_id) == 12 and live.tracks.ids() == ["circle", other.track_id]
    with pytest.raises(RequestError, match=r"already in use by a live track"):
        live.check_start(TrackRequest(True, "circle"))
    with pytest.raises(RequestError, match=r"2 tracks are alive, the limit is 2 \(parameter max_tracks\)"):
        live.check_start(TrackRequest(True, None))

    messages = live.step(frame_at(scene_image, T0 + 100 * MS))
    assert [m.outcome.track_id for m in messages] == ["circle", other.track_id]
    for m in messages:
        assert m.has_frame and not m.ended and m.header == HeaderData(T0 + 100 * MS, "camera_optical")
        assert m.outcome.track_state in (TRACKING, LOST) and m.outcome.result is not None
        assert m.outcome.result.mask.shape == scene_image.shape[:2]
    assert messages[1].outcome.instruction == "the green box"
    assert live.step(frame_at(scene_image, T0 + 50 * MS)) == []  # older than the tracks' latest frame

    stop = live.stop("circle")
    assert (stop.success, stop.message, stop.stopped) == (True, "stopped track 'circle'", ["circle"])
    (end,) = stop.messages
    assert not end.has_frame and end.ended and end.header == HeaderData(T0 + 100 * MS, "camera_optical")
    assert end.outcome.track_reason == "stopped: stopped by request"
    assert end.log_line() == "track circle ('the red circle') ended: stopped: stopped by request"
    unknown = live.stop("circle")
    assert not unknown.success and unknown.message == (
        f"no live track has id 'circle' (it never existed, or it ended already); live tracks: ['{other.track_id}']"
    )
    every = live.stop(None, "the node was deactivated")
    assert every.stopped == [other.track_id] and every.messages[0].outcome.track_reason.endswith(
        "deactivated"
    )
    assert live.stop(None).message == "no track was alive" and len(live) == 0


def test_an_empty_answer_is_not_tracked(tracking_segmenter, scene_image) -> None:
    live = LiveTracks(tracking_segmenter, TrackerConfig())
    empty = outcome_on(frame_at(scene_image, T0), np.zeros(scene_image.shape[:2], bool))
    with pytest.raises(RequestError, match="nothing to track: the answer is empty"):
        live.start(empty, TrackRequest(True, None))
    assert len(live) == 0


def test_tracks_time_out_on_frame_time_extrapolated_by_the_clock(tracking_segmenter, scene_image) -> None:
    live = LiveTracks(tracking_segmenter, TrackerConfig(timeout_s=1.0))
    frame = frame_at(scene_image, T0)
    live.observe(frame, CLOCK)
    live.start(outcome_on(frame, box_mask(scene_image, (15, 25, 45, 55))), TrackRequest(True, "a"))
    assert live.expire(CLOCK + 900 * MS) == []  # the clock is far from the stamps: only elapsed time counts
    live.observe(frame_at(scene_image, T0 - 5 * MS), CLOCK + 950 * MS)  # an older frame moves nothing
    (end,) = live.expire(CLOCK + 1001 * MS)
    assert end.ended and end.outcome.track_reason.startswith("expired") and end.header.stamp_ns == T0
    assert len(live) == 0 and live.expire(CLOCK + 5000 * MS) == []
    # a track started (on the clock) long after the latest frame lives its timeout from its start
    live.start(
        outcome_on(frame, box_mask(scene_image, (15, 25, 45, 55))),
        TrackRequest(True, "b"),
        now_ns=CLOCK + 9000 * MS,
    )
    assert live.expire(CLOCK + 9900 * MS) == []
    (end,) = live.expire(CLOCK + 10_001 * MS)
    assert end.outcome.track_id == "b" and end.outcome.track_reason.startswith("expired")


def test_a_frame_that_times_a_track_out_publishes_it_as_ended(tracking_segmenter, scene_image) -> None:
    config = TrackerConfig(timeout_s=0.5, lost_below=1.0, requery_below=0.0)  # no frame is confident
    live = LiveTracks(tracking_segmenter, config)
    live.start(
        outcome_on(frame_at(scene_image, T0), box_mask(scene_image, (15, 25, 45, 55))),
        TrackRequest(True, "a"),
    )
    (message,) = live.step(frame_at(scene_image, T0 + 600 * MS))
    assert message.has_frame and message.ended and message.outcome.track_reason.startswith("expired")
    assert len(live) == 0


def test_model_call_takes_the_lock_then_the_gate_and_releases_both() -> None:
    lock, gate = threading.Lock(), ModelGate()
    call = ModelCall(lock, gate)
    with pytest.raises(ModelsUnavailable, match="the models are not loaded"), call:
        pass
    assert not lock.locked()  # released when the gate refused
    gate.open()
    with call:
        assert lock.locked() and gate.running == 1
    assert not lock.locked() and gate.running == 0


def test_replay_schedule_starts_tracks() -> None:
    plan = ReplaySchedule.from_mapping(yaml.safe_load("instruction: a cup\ntrack: true\ntrack_timeout: 2"))
    assert plan.plan([10, 20, 30]) == ({0: "a cup"}, []) and plan.track_plan([10, 20, 30]) == {
        0: "instruction"
    }
    assert plan.track_timeout_s == 2.0
    timed = ReplaySchedule.from_mapping(
        {
            "at": [
                {"stamp_ns": 20, "instruction": "a cup", "track": True, "track_id": "cup"},
                {"stamp_ns": 30, "instruction": "a plate", "track": True},
                {"stamp_ns": 40, "instruction": "a fork"},
            ],
            "tolerance": 0,
        }
    )
    assert timed.track_plan([10, 20, 30, 40]) == {1: "cup", 2: "at1"}
    assert timed.plan([10, 20, 30, 40])[0] == {1: "a cup", 2: "a plate", 3: "a fork"}
    bad = [
        ("instruction: a\ntrack: true\nevery_n: 2", "remove every_n"),
        ("at: [{stamp: 1, instruction: a, track: yes please}]", r"at\[0\].track must be true or false"),
        ("at: [{stamp: 1, instruction: a, track_id: b}]", r"at\[0\].track_id must be a name"),
        (
            "instruction: a\ntrack: true\ntrack_timeout: 0",
            "track_timeout must be a finite number of seconds > 0",
        ),
        (
            "at: [{stamp: 1, instruction: a, track: true, track_id: x}, {stamp: 2, instruction: b, track: true, track_id: x}]",
            r"track ids must be unique, got \['x'\]",
        ),
    ]
    for text, message in bad:
        with pytest.raises(ValueError, match=message):
            ReplaySchedule.from_mapping(yaml.safe_load(text))
