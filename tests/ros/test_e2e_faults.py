"""Faults over the wire: slow, failing and malformed model calls, a poisoned frame, a failing
transition, and lifecycle changes or Ctrl-C while a request is in the model.

The node is the real one with a test double of its model class (tests/ros/faulty_node.py:
the real tiny models, slowed down or failing on request), started like ``ros2 run`` and
driven through ``ros2 lifecycle``. Its first model load takes ``LOAD_DELAY_S`` longer.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from faulty_node import FREED_MARKER, SLOW_MARKER
from harness import (
    E2E,
    FAULTY_NODE,
    lifecycle_set,
    lifecycle_state,
    ros2,
    stamps,
)

pytestmark = E2E
NODE = "/faulty/llmseg_faulty"
SERVICE = "/faulty/reason_segment"
COLOUR = "/faulty/image"
REQUEST_TIMEOUT_S = 8.0
LOAD_DELAY_S = 12.0


def start_faulty_node(start_process, number: int = 1):
    return start_process(
        f"faulty_node_{number}",
        [
            sys.executable,
            str(FAULTY_NODE),
            "--ros-args",
            "-r",
            "__node:=llmseg_faulty",
            "-r",
            "__ns:=/faulty",
            "-r",
            f"image:={COLOUR}",
            "-p",
            "profile:=tiny",
            "-p",
            "precompute:=true",
            "-p",
            f"request_timeout:={REQUEST_TIMEOUT_S}",
        ],
        LLMSEG_TEST_LOAD_DELAY=str(LOAD_DELAY_S),
    )


FRAME_SECONDS = itertools.count(1_700_000_000)  # header stamps of the published frames, increasing


def ready_frame(peer) -> None:
    """Publish a new frame and wait until a request on it is served (its proposals are computed)."""
    peer.publish(COLOUR, stamps(next(FRAME_SECONDS), 1))
    deadline = time.monotonic() + 120.0
    while True:
        response = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
        if response["success"] or time.monotonic() > deadline:
            break
    assert response["success"], response["message"]


@pytest.fixture(scope="module")
def running(start_process):
    """The fault-injection node of this module (``running[0]``), restarted if a test ended it."""
    return [start_faulty_node(start_process)]


@pytest.fixture
def node(running, start_process, ros_env, peer):
    """The fault-injection node, ``active`` with a served frame, whatever an earlier test left
    (a node that exited or stopped answering is replaced by a new one)."""
    changed, silent, state = False, 0, ""
    deadline = time.monotonic() + 300.0
    while time.monotonic() < deadline:
        proc = running[0]
        if proc.proc.poll() is not None or silent >= 3:
            proc.stop()
            running[0] = start_faulty_node(start_process, len(running) + 1)
            running.append(running[0])
            running[0].wait_for_output(
                r"created; waiting for the lifecycle 'configure' transition", timeout=120
            )
            changed, silent = True, 0
            continue
        state = lifecycle_state(ros_env, NODE)
        # Asked twice: an rclpy executor re-raises a callback's exception only when the next
        # callback wakes it, so a node that is about to die still answers once.
        if state == "active" and lifecycle_state(ros_env, NODE) == "active" and proc.proc.poll() is None:
            break
        changed = True
        silent = silent + 1 if state.startswith("<") else 0
        if state == "unconfigured":
            lifecycle_set(ros_env, NODE, "configure", timeout=240)
        elif state == "inactive":
            lifecycle_set(ros_env, NODE, "activate")
        else:
            time.sleep(0.5)
    assert state == "active", running[0].output()[-4000:]
    if changed:
        ready_frame(peer)
    return running[0]


def test_lifecycle_and_parameter_services_answer_while_the_models_load(running, ros_env) -> None:
    node = running[0]
    node.wait_for_output(r"created; waiting for the lifecycle 'configure' transition", timeout=120)
    configure = subprocess.Popen(
        ["ros2", "lifecycle", "set", NODE, "configure", "--no-daemon"],
        env=ros_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        node.wait_for_output(r"TINY PROFILE", timeout=60)  # the model load (LOAD_DELAY_S longer) starts
        assert lifecycle_state(ros_env, NODE, timeout=LOAD_DELAY_S / 2) == "configuring"
        param = ros2(
            ros_env, "param", "get", NODE, "request_timeout", "--no-daemon", timeout=LOAD_DELAY_S / 2
        )
        assert f"Double value is: {REQUEST_TIMEOUT_S}" in param.stdout, param.stdout
        output, _ = configure.communicate(timeout=240)
    finally:
        configure.kill()
    assert "Transitioning successful" in output, output
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "activate")


def test_poisoned_frame_is_logged_and_the_node_keeps_serving(node, peer) -> None:
    mark = len(node.output())
    peer.publish(COLOUR, stamps(next(FRAME_SECONDS), 1), frame_id="poison")
    node.wait_for_output(
        r"dropped a frame after an unexpected RuntimeError: injected fault in the frame conversion",
        30,
        start=mark,
    )
    time.sleep(1.0)
    assert node.proc.poll() is None, node.output()[mark:]
    ready_frame(peer)


def test_slow_model_times_out_and_the_next_request_is_served(node, peer) -> None:
    slow = peer.call(SERVICE, instruction=f"slow {REQUEST_TIMEOUT_S + 2} where is the cup")
    assert not slow["success"]
    assert f"request timed out after {REQUEST_TIMEOUT_S:g} s (parameter request_timeout)" in slow["message"]
    after = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
    assert after["success"], after["message"]


def test_model_error_is_answered_and_the_next_request_is_served(node, peer) -> None:
    failed = peer.call(SERVICE, instruction="fail now")
    assert not failed["success"]
    assert "inference failed: RuntimeError: injected model failure" in failed["message"]
    after = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
    assert after["success"], after["message"]


def test_unexpected_exception_in_the_service_callback_is_answered(node, peer) -> None:
    bad = peer.call(SERVICE, instruction="malformed result please", selection_strategy="top1_iou")
    assert not bad["success"] and "internal error while answering" in bad["message"], bad["message"]
    assert node.proc.poll() is None
    node.wait_for_output(r"reason_segment: unexpected \w+", timeout=10)
    after = peer.call(SERVICE, instruction="the red part", selection_strategy="top1_iou")
    assert after["success"], after["message"]


def test_deactivate_waits_for_the_request_in_the_model(node, peer, ros_env) -> None:
    mark = len(node.output())
    call = peer.call_async(SERVICE, instruction="slow 3 the red part", selection_strategy="top1_iou")
    node.wait_for_output(SLOW_MARKER, timeout=30, start=mark)
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "deactivate")
    in_flight = peer.result(call)
    assert in_flight["answered"] and in_flight["success"], in_flight["message"]
    assert FREED_MARKER not in node.output()
    node.wait_for_output(r"inactive: models freed", timeout=10, start=mark)
    refused = peer.call(SERVICE, instruction="the cup")
    assert not refused["success"] and "node is not active" in refused["message"]
    assert "Transitioning successful" in lifecycle_set(ros_env, NODE, "activate")
    ready_frame(peer)


def test_failing_transition_is_logged(node, peer, ros_env) -> None:
    armed = peer.call(SERVICE, instruction="arm close failure", selection_strategy="top1_iou")
    assert armed["success"], armed["message"]
    assert "Transitioning failed" in lifecycle_set(ros_env, NODE, "deactivate")
    node.wait_for_output(
        r"deactivate failed: RuntimeError: injected failure while freeing the models\nTraceback", timeout=10
    )
    assert node.proc.poll() is None
    assert lifecycle_state(ros_env, NODE) == "unconfigured"  # error processing cleaned up


def test_ctrl_c_during_a_request_exits_0_after_the_model_call(node, peer) -> None:
    ready_frame(peer)
    mark = len(node.output())
    assert FREED_MARKER not in node.output()
    peer.call_async(SERVICE, instruction="slow 3 the red part", selection_strategy="top1_iou")
    node.wait_for_output(SLOW_MARKER, timeout=30, start=mark)
    node.interrupt()
    code = node.wait(timeout=60)
    out = node.output()
    assert code == 0, out[-4000:]
    assert FREED_MARKER not in out
    assert "Traceback" not in out[mark:], out[mark:]
