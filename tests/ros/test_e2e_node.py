"""The node as the README starts it: ``ros2 launch llmseg_ros perception.launch.py profile:=tiny``.

One launched node (tiny random models, colour + depth + CameraInfo) serves this module's
tests in order: lifecycle state, parameters, both publisher QoS, the README's service
calls run verbatim from a shell, every response field and output topic, every bad
request over the wire, the lifecycle driven with ``ros2 lifecycle set`` and finally
Ctrl-C.
"""

from __future__ import annotations

import re

import pytest
from harness import E2E, REPO, lifecycle_set, lifecycle_state, ros2, shell, stamps, wait_for_state

from llmseg_ros.ros.params import DESCRIPTIONS

pytestmark = E2E

NODE = "/llmseg_perception"
SERVICE = "/reason_segment"
COLOUR = "/camera/color/image_raw"
DEPTH = "/camera/aligned_depth_to_color/image_raw"
INFO = "/camera/aligned_depth_to_color/camera_info"
CAMERA = {"depth_topic": DEPTH, "info_topic": INFO}
H, W = 48, 64
STARTUP_S = 240.0  # builds nothing (the session built the tiny models), but loads them
README_STAMP_NS = 1_700_000_000_250_000_000  # the stamp in the README's second service call


@pytest.fixture(scope="module")
def node(ros_env, start_process):
    proc = start_process(
        "readme_node",
        ["ros2", "launch", "llmseg_ros", "perception.launch.py", "profile:=tiny", "use_depth:=true"],
    )
    wait_for_state(ros_env, NODE, "active", STARTUP_S, proc)
    return proc


def readme_service_calls(service: str = "/reason_segment") -> list[str]:
    """The README's ``ros2 service call <service>`` commands (continuation lines joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.startswith(f"ros2 service call {service} ")]


def test_launch_reaches_active_and_logs_every_input_qos(node) -> None:
    out = node.output()
    for name, topic in (("image", COLOUR), ("depth", DEPTH), ("camera_info", INFO)):
        assert f"{name} '{topic}': best_effort, keep_last 5, volatile" in out, out[-3000:]
    assert "Traceback" not in out


def test_request_before_any_frame_says_so(node, peer) -> None:
    response = peer.call(SERVICE, instruction="where can I put the dirty dishes?")
    assert not response["success"]
    assert f"no image received yet on topic '{COLOUR}'" in response["message"]


def test_param_describe_shows_every_description(node, ros_env) -> None:
    result = ros2(
        ros_env, "param", "describe", NODE, *DESCRIPTIONS, "--no-daemon", "--spin-time", "2", timeout=60
    )
    assert result.returncode == 0, result.stdout
    described = dict(re.findall(r"Parameter name: (\S+)\n(?:.*\n)*?\s+Description: (.*)", result.stdout))
    assert described == DESCRIPTIONS


def test_frames_from_sensor_data_and_reliable_publishers_are_used(node, peer) -> None:
    for reliability, first_s in (("best_effort", 1_699_999_990.0), ("reliable", 1_699_999_995.0)):
        sent = stamps(first_s, 3)
        matched = peer.publish(COLOUR, sent, reliability=reliability, size=[H, W], **CAMERA)
        assert matched == {"image": 1, "depth": 1, "info": 1}, (reliability, matched)
        response = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
        assert response["success"], (reliability, response["message"])
        assert response["frame_stamp_ns"] in sent, reliability


def test_readme_service_calls_run_verbatim(node, peer, ros_env) -> None:
    commands = readme_service_calls()
    stops = readme_service_calls("/stop_track")
    assert len(commands) == 4 and len(stops) == 2, (commands, stops)
    peer.publish(COLOUR, [README_STAMP_NS], size=[H, W], **CAMERA)
    for command in commands:  # the 4th starts track 'dishes'
        result = shell(ros_env, command, timeout=240)
        assert result.returncode == 0, (command, result.stdout)
        assert "response:" in result.stdout and "success=True" in result.stdout, (command, result.stdout)
    assert "track_id='dishes'" in result.stdout
    # No frame comes, so the track may time out (track_timeout, 5 s) before a slow CLI call
    # arrives: then the stop by id says so; either way the track has ended.
    by_id = shell(ros_env, stops[0], timeout=60).stdout
    assert "stopped=['dishes']" in by_id or "it ended already" in by_id, by_id
    node.wait_for_output(
        r"track dishes \('where can I put the dirty dishes\?'\) ended: (stopped|expired)", 10
    )
    every = shell(ros_env, stops[1], timeout=60).stdout
    assert "success=True" in every and "stopped=[]" in every, every


def test_response_fields_and_every_output_topic(node, peer) -> None:
    peer(
        "listen",
        topics={
            "mask": ["Image", "/mask"],
            "segmentation": ["Segmentation", "/segmentation"],
            "masked_depth": ["Image", "/masked_depth"],
            "camera_info": ["CameraInfo", "/masked_depth/camera_info"],
            "points": ["PointCloud2", "/points"],
            "overlay": ["Image", "/overlay"],
        },
    )
    peer("clear")
    instruction = "where can I put the dirty dishes?"
    r = peer.call(SERVICE, instruction=instruction, selection_strategy="top1_iou", return_overlay=True)
    assert r["success"], r["message"]
    assert r["frame_stamp_ns"] == README_STAMP_NS
    mask = r["mask"]
    assert (mask["height"], mask["width"], mask["encoding"], mask["step"]) == (H, W, "mono8", W)
    assert (mask["stamp_ns"], mask["frame_id"]) == (README_STAMP_NS, "test_color_optical")
    assert set(mask["values"]) <= {0, 255} and mask["selected"] > 0
    assert len(r["selected"]) == 1 and 0 <= r["selected"][0] < r["num_proposals"]
    assert len(r["selected_similarity"]) == len(r["selected_iop"]) == 1
    assert r["method"] == "llmseg" and r["answer"] == "" and 0.0 <= r["confidence"] <= 1.0
    assert len(r["stage_names"]) == len(r["stage_seconds"]) > 0 and min(r["stage_seconds"]) >= 0.0
    assert "request_total" in r["stage_names"]
    overlay = r["overlay"]
    assert (overlay["height"], overlay["width"], overlay["encoding"], overlay["stamp_ns"]) == (
        H,
        W,
        "bgr8",
        README_STAMP_NS,
    )

    got = peer("received", keys=["mask", "segmentation", "masked_depth", "camera_info", "points", "overlay"])
    assert all(got.values()), {k: len(v) for k, v in got.items()}
    last = {key: values[-1] for key, values in got.items()}
    for key, summary in last.items():
        assert (summary["stamp_ns"], summary["frame_id"]) == (README_STAMP_NS, "test_color_optical"), key
    assert last["mask"]["selected"] == mask["selected"] and last["mask"]["encoding"] == "mono8"
    seg = last["segmentation"]
    assert (
        seg["instruction"] == instruction and seg["selected"] == r["selected"] and seg["method"] == "llmseg"
    )
    assert seg["mask"]["selected"] == mask["selected"]
    depth = last["masked_depth"]
    assert (depth["height"], depth["width"], depth["encoding"]) == (H, W, "16UC1")
    with_depth = last["mask"]["selected_with_depth"]  # selected pixels the camera has depth for
    assert depth["nonzero"] == with_depth and set(depth["values"]) <= {0, 1500}
    assert last["camera_info"]["k"] == [50.0, 0.0, W / 2 - 0.5, 0.0, 50.0, H / 2 - 0.5, 0.0, 0.0, 1.0]
    points = last["points"]
    assert points["fields"] == [["x", 0, 7, 1], ["y", 4, 7, 1], ["z", 8, 7, 1]]
    assert (points["height"], points["width"], points["point_step"]) == (1, with_depth, 12)
    assert points["finite"] and points["z_range"] == pytest.approx([1.5, 1.5])
    assert (last["overlay"]["encoding"], last["overlay"]["height"], last["overlay"]["width"]) == (
        "bgr8",
        H,
        W,
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"instruction": "   "}, "instruction is empty"),
        ({"instruction": "x" * 1001}, "instruction has 1001 characters; the limit is 1000"),
        ({"instruction": "the cup", "stamp_ns": 1_000_000_000}, "stamp 1.000000000"),
        ({"instruction": "the cup", "selection_strategy": "best"}, "selection_strategy 'best' is unknown"),
        ({"instruction": "the cup", "iop_threshold": 1.5}, "iop_threshold must be in [0, 1]"),
    ],
    ids=["empty", "too_long", "stamp_not_buffered", "unknown_strategy", "threshold_above_1"],
)
def test_bad_request_is_answered_and_the_next_one_served(node, peer, fields, expected) -> None:
    bad = peer.call(SERVICE, **fields)
    assert not bad["success"] and expected in bad["message"], bad["message"]
    assert bad["mask"]["height"] == 0
    good = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
    assert good["success"], good["message"]


def test_lifecycle_through_ros2_lifecycle_set(node, peer, ros_env) -> None:
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "deactivate")
    assert lifecycle_state(ros_env, NODE) == "inactive"
    node.wait_for_output(r"inactive: models freed", timeout=10)
    inactive = peer.call(SERVICE, instruction="the cup")
    assert not inactive["success"]
    assert f"node is not active; activate it with: ros2 lifecycle set {NODE} activate" in inactive["message"]

    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "activate")
    peer.publish(COLOUR, stamps(1_700_000_100.0, 2), size=[H, W], **CAMERA)
    again = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
    assert again["success"], again["message"]

    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "deactivate")
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "cleanup")
    assert lifecycle_state(ros_env, NODE) == "unconfigured"
    node.wait_for_output(r"cleaned up", timeout=10)
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "shutdown")
    assert lifecycle_state(ros_env, NODE) == "finalized"


def test_ctrl_c_ends_launch_and_node_with_exit_code_0(node) -> None:
    node.interrupt()
    code = node.wait(timeout=60)
    out = node.output()
    assert code == 0, out[-4000:]
    assert re.search(r"\[perception_node-1\]: process has finished cleanly", out), out[-4000:]
    assert "Traceback" not in out
