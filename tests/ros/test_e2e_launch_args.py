"""Launch arguments: namespace, topic remapping, per-input QoS, precompute, request_timeout.

    ros2 launch llmseg_ros perception.launch.py profile:=tiny namespace:=robot1 \
        image_topic:=/robot1_camera/image image_reliability:=reliable precompute:=true request_timeout:=90
"""

from __future__ import annotations

import time

import pytest
from harness import E2E, ros2, stamps, wait_for_state

pytestmark = E2E

NODE = "/robot1/llmseg_perception"
SERVICE = "/robot1/reason_segment"
COLOUR = "/robot1_camera/image"


@pytest.fixture(scope="module")
def node(ros_env, start_process):
    proc = start_process(
        "robot1_node",
        [
            "ros2",
            "launch",
            "llmseg_ros",
            "perception.launch.py",
            "profile:=tiny",
            "namespace:=robot1",
            f"image_topic:={COLOUR}",
            "image_reliability:=reliable",
            "precompute:=true",
            "request_timeout:=90",
        ],
    )
    wait_for_state(ros_env, NODE, "active", 240.0, proc)
    return proc


def test_arguments_set_their_parameters(node, ros_env) -> None:
    for name, expected in (
        ("qos.image.reliability", "String value is: reliable"),
        ("precompute", "Boolean value is: True"),
        ("request_timeout", "Double value is: 90.0"),
        ("use_depth", "Boolean value is: False"),  # not given: the params file's value
    ):
        result = ros2(ros_env, "param", "get", NODE, name, "--no-daemon", "--spin-time", "2")
        assert expected in result.stdout, (name, result.stdout)
    assert f"image '{COLOUR}': reliable, keep_last 5, volatile" in node.output()


def test_namespace_moves_the_service_and_remapping_the_camera_topic(node, peer) -> None:
    response = peer.call(SERVICE, instruction="the red part")
    assert not response["success"]
    assert f"no image received yet on topic '{COLOUR}'" in response["message"]


def test_reliable_image_subscription_ignores_a_best_effort_camera(node, peer) -> None:
    matched = peer.publish(COLOUR, stamps(1_700_000_200.0, 3), reliability="best_effort", wait_match_s=2.0)
    assert matched == {"image": 0}
    response = peer.call(SERVICE, instruction="the red part")
    assert not response["success"] and "no image received yet" in response["message"]


def test_precomputed_frame_is_answered_without_computing_proposals(node, peer) -> None:
    peer("listen", topics={"mask": ["Image", "/robot1/mask"]})
    sent = stamps(1_700_000_300.0, 1)
    assert peer.publish(COLOUR, sent, reliability="reliable") == {"image": 1}
    time.sleep(3.0)  # the background precompute of the new frame starts at once
    response = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
    assert response["success"], response["message"]
    assert response["frame_stamp_ns"] == sent[0]
    assert "proposals" not in response["stage_names"], response["stage_names"]
    got = peer("received", keys=["mask"])
    assert got["mask"] and got["mask"][-1]["stamp_ns"] == sent[0]
