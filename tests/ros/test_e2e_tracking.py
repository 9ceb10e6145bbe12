"""Live tracks through the real ROS 2 runtime: ``reason_segment`` with ``track: true``,
per-frame outputs with each frame's header, ``stop_track``, ``track_timeout`` and two
tracks at once, on a node of its own (namespace ``/tracking``, tiny models, depth)."""

from __future__ import annotations

import itertools
import time

import pytest
from harness import E2E, lifecycle_set, stamps, wait_for_state

pytestmark = E2E

NS = "/tracking"
NODE = f"{NS}/llmseg_perception"
SERVICE, STOP = f"{NS}/reason_segment", f"{NS}/stop_track"
COLOUR, DEPTH, INFO = f"{NS}/image", f"{NS}/depth", f"{NS}/camera_info"
CAMERA = {"depth_topic": DEPTH, "info_topic": INFO}
H, W = 48, 64
TRACK_TIMEOUT_S = 4.0
OUTPUTS = {
    "mask": ["Image", f"{NS}/mask"],
    "segmentation": ["Segmentation", f"{NS}/segmentation"],
    "masked_depth": ["Image", f"{NS}/masked_depth"],
    "points": ["PointCloud2", f"{NS}/points"],
    "overlay": ["Image", f"{NS}/overlay"],
}
# First stamp of each batch of frames: increasing, 1 s apart (a batch spans < 1 s). The gap
# stays well below TRACK_TIMEOUT_S: a camera whose stamps jump further ends its tracks.
SECONDS = itertools.count(1_700_001_000, 1)


@pytest.fixture(scope="module")
def node(ros_env, start_process, peer):
    proc = start_process(
        "tracking_node",
        [
            "ros2",
            "run",
            "llmseg_ros",
            "perception_node",
            "--ros-args",
            "-r",
            f"__ns:={NS}",
            "-p",
            "profile:=tiny",
            "-p",
            "use_depth:=true",
            "-p",
            f"track_timeout:={TRACK_TIMEOUT_S}",
            "-p",
            "max_tracks:=2",
        ],
    )
    proc.wait_for_output(r"created; waiting for the lifecycle 'configure' transition", timeout=120)
    lifecycle_set(ros_env, NODE, "configure", timeout=240)
    lifecycle_set(ros_env, NODE, "activate")
    wait_for_state(ros_env, NODE, "active", 60, proc)
    listening = peer("listen", topics=OUTPUTS)
    assert all(listening.values()), listening
    return proc


def frames(peer, count: int = 4) -> list[int]:
    """Publish ``count`` frames (colour + depth + info), 0.1 s apart in stamp and in time."""
    sent = stamps(next(SECONDS), count)
    matched = peer.publish(COLOUR, sent, size=[H, W], period_s=0.1, **CAMERA)
    assert matched == {"image": 1, "depth": 1, "info": 1}, matched
    return sent


def start(peer, on: int, **fields) -> dict:
    """Start a track on the frame stamped ``on`` (waiting, up to 20 s, for the node to have it:
    a track started on an older frame would miss the frames in between)."""
    deadline = time.monotonic() + 20.0
    while True:
        response = peer.call(
            SERVICE,
            instruction="the red part",
            selection_strategy="top1_iou",
            track=True,
            stamp_ns=on,
            **fields,
        )
        if "no buffered frame" not in response["message"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert response["success"], response["message"]
    assert response["track_id"], response
    return response


def stop(peer, **fields) -> dict:
    return peer.call(STOP, service_type="StopTrack", **fields)


def track_messages(peer, track_id: str, *, until_stamp: int | None = None, state: str | None = None) -> list:
    """The ``segmentation`` messages of one track, waiting (20 s) for ``until_stamp`` or ``state``."""
    deadline = time.monotonic() + 20.0
    while True:
        got = peer("received", keys=["segmentation"], timeout_s=0.5)["segmentation"]
        mine = [m for m in got if m["track_id"] == track_id]
        done = (until_stamp is None or any(m["stamp_ns"] == until_stamp for m in mine)) and (
            state is None or any(m["track_state"] == state for m in mine)
        )
        if done or time.monotonic() > deadline:
            return mine
        time.sleep(0.2)


def test_track_publishes_every_output_with_each_frames_header_and_stops(node, peer) -> None:
    first = frames(peer, 2)
    peer("clear")
    r = start(peer, first[-1], track_id="dishes")
    assert r["track_id"] == "dishes" and r["frame_stamp_ns"] == first[-1]
    sent = frames(peer)
    mine = track_messages(peer, "dishes", until_stamp=sent[-1])
    assert mine[0]["track_state"] == "started" and mine[0]["stamp_ns"] == first[-1]
    answered = [m["stamp_ns"] for m in mine[1:]]
    # every frame after the start answered once, newest last; a frame may only be skipped
    # for a newer one (the newest waiting frame wins)
    assert answered and answered[-1] == sent[-1] and set(answered) <= set(sent), (answered, sent)
    assert answered == sorted(set(answered))
    assert all(
        m["track_state"] in ("tracking", "lost") and m["frame_id"] == "test_color_optical" for m in mine[1:]
    )
    assert all(m["mask"]["height"] == H and m["mask"]["stamp_ns"] == m["stamp_ns"] for m in mine[1:])
    got = peer("received", keys=list(OUTPUTS), timeout_s=5.0)
    for key in ("mask", "masked_depth", "points", "overlay"):
        stamps_seen = {m["stamp_ns"] for m in got[key]}
        assert set(answered) <= stamps_seen, (key, answered, sorted(stamps_seen))
        assert all(m["frame_id"] == "test_color_optical" for m in got[key]), key

    stopped = stop(peer, track_id="dishes")
    assert stopped == {
        "answered": True,
        "success": True,
        "message": "stopped track 'dishes'",
        "stopped": ["dishes"],
    }
    ended = track_messages(peer, "dishes", state="ended")[-1]
    assert ended["track_reason"] == "stopped: stopped by request" and ended["stamp_ns"] == sent[-1]
    assert ended["mask"]["width"] == 0
    assert "track dishes ('the red part') ended: stopped: stopped by request" in node.output()
    peer("clear")
    frames(peer, 2)
    time.sleep(1.0)  # frames after the stop are not answered for the stopped track
    assert not [
        m for m in peer("received", keys=["segmentation"], timeout_s=0.5)["segmentation"] if m["track_id"]
    ]


def test_two_tracks_at_once_each_with_its_id(node, peer) -> None:
    latest = frames(peer, 1)[-1]
    peer("clear")
    a = start(peer, latest)["track_id"]
    assert start(peer, latest, track_id="box")["track_id"] == "box"
    assert a != "box" and len(a) == 12
    third = peer.call(SERVICE, instruction="the blue part", track=True)
    assert (
        not third["success"]
        and "2 tracks are alive, the limit is 2 (parameter max_tracks)" in third["message"]
    )
    sent = frames(peer)
    for track_id in (a, "box"):
        mine = track_messages(peer, track_id, until_stamp=sent[-1])
        assert mine[-1]["stamp_ns"] == sent[-1] and mine[-1]["track_state"] in ("tracking", "lost"), mine[-1]
    stopped = stop(peer, all=True)
    assert stopped["success"] and sorted(stopped["stopped"]) == sorted([a, "box"])
    for track_id in (a, "box"):
        assert track_messages(peer, track_id, state="ended")[-1]["track_state"] == "ended"
    assert stop(peer, all=True)["message"] == "no track was alive"


def test_track_ends_after_track_timeout_without_frames(node, peer) -> None:
    latest = frames(peer, 1)[-1]
    peer("clear")
    track_id = start(peer, latest, track_id="timeout")["track_id"]
    t0 = time.monotonic()
    ended = track_messages(peer, track_id, state="ended")
    assert ended and ended[-1]["track_state"] == "ended", ended
    assert ended[-1]["track_reason"].startswith("expired"), ended[-1]
    assert time.monotonic() - t0 >= TRACK_TIMEOUT_S - 1.5  # not before its timeout (the start took some)
    node.wait_for_output(r"track timeout \('the red part'\) ended: expired", timeout=5)
    assert not stop(peer, track_id=track_id)["success"]


def test_bad_track_requests_are_answered_clearly(node, peer, ros_env) -> None:
    frames(peer, 1)
    unknown = stop(peer, track_id="nope")
    assert not unknown["success"] and "no live track has id 'nope'" in unknown["message"]
    neither = stop(peer)
    assert not neither["success"] and "exactly one of track_id" in neither["message"]
    empty = peer.call(
        SERVICE, instruction="the red part", selection_strategy="iop_threshold", iop_threshold=1.0, track=True
    )
    assert not empty["success"] and "nothing to track: the answer is empty" in empty["message"]
    no_track = peer.call(SERVICE, instruction="the red part", track_id="x")
    assert not no_track["success"] and "track_id 'x' is set but track is false" in no_track["message"]
    with_image = peer.call(SERVICE, instruction="the red part", track=True, image={"size": [H, W]})
    assert not with_image["success"] and "cannot start on a request image" in with_image["message"]

    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "deactivate")
    inactive = peer.call(SERVICE, instruction="the red part", track=True)
    assert not inactive["success"] and "node is not active" in inactive["message"]
    assert not stop(peer, all=True)["success"]
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "activate", timeout=240)
    assert "Traceback" not in node.output()
