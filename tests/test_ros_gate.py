"""ModelGate / GatedSegmenter: the node frees its models only when no model call runs."""

from __future__ import annotations

import threading

import pytest
from ros_testing import FakeSegmenter, colour_image, request_msg

from llmseg_ros.ros.frames import Frame, FrameBuffer, HeaderData
from llmseg_ros.ros.gate import GatedSegmenter, ModelGate, ModelsUnavailable
from llmseg_ros.ros.handler import HandlerSettings, RequestHandler

S = 1_000_000_000


def test_gate_is_closed_until_opened_and_refuses_with_the_reason() -> None:
    gate = ModelGate()
    with pytest.raises(ModelsUnavailable, match="the models are not loaded"):
        gate.enter()
    gate.open()
    gate.enter()
    assert gate.running == 1
    gate.exit()
    assert gate.running == 0 and gate.close("deactivated", timeout=0.0)
    with pytest.raises(ModelsUnavailable, match="deactivated"):
        gate.enter()
    with pytest.raises(RuntimeError, match="without a matching enter"):
        gate.exit()


def test_close_waits_for_the_running_call_and_refuses_new_ones() -> None:
    gate = ModelGate()
    gate.open()
    gate.enter()  # a model call in progress
    closed = threading.Event()
    results: list[bool] = []

    def close() -> None:
        results.append(gate.close("shutting down"))
        closed.set()

    closer = threading.Thread(target=close)
    closer.start()
    assert not closed.wait(0.2)  # still waiting for the call
    with pytest.raises(ModelsUnavailable, match="shutting down"):
        gate.enter()  # new calls are refused while it waits
    gate.exit()  # the call ends
    assert closed.wait(10.0) and results == [True]
    closer.join()


def test_close_with_a_timeout_reports_a_call_still_running() -> None:
    gate = ModelGate()
    gate.open()
    gate.enter()
    assert gate.close("deactivated", timeout=0.05) is False
    gate.exit()
    assert gate.close("deactivated", timeout=0.0) is True


def test_gated_segmenter_passes_calls_through_and_holds_the_gate_during_them() -> None:
    seg = FakeSegmenter(slow_s=0.5)
    gate = ModelGate()
    gated = GatedSegmenter(seg, gate)
    assert gated.config is seg.config
    gate.open()
    features = gated.prepare(colour_image())
    assert seg.prepare_calls == 1 and gate.running == 0
    started = threading.Event()
    original = seg.segment

    def segment(*args, **kwargs):
        started.set()
        return original(*args, **kwargs)

    seg.segment = segment  # type: ignore[method-assign]
    worker = threading.Thread(target=gated.segment, args=(features, "slow cup"))
    worker.start()
    assert started.wait(10.0)
    assert gate.running == 1
    assert gate.close("deactivated") is True  # returns once the slow call is over
    assert seg.idle.is_set() and gate.running == 0
    worker.join()
    with pytest.raises(ModelsUnavailable, match="deactivated"):
        gated.segment(features, "a cup")


def test_handler_answers_a_request_that_arrives_after_the_gate_closed() -> None:
    gate = ModelGate()
    buffer = FrameBuffer(4)
    handler = RequestHandler(GatedSegmenter(FakeSegmenter(), gate), buffer, HandlerSettings())
    buffer.add(Frame(header=HeaderData(3 * S, "camera"), rgb=colour_image()))
    gate.open()
    assert handler.handle(request_msg("the red things")).success
    gate.close("the node was deactivated before this request's model call started")
    outcome = handler.handle(request_msg("the red things"))
    assert not outcome.success
    assert outcome.message == (
        "inference failed: ModelsUnavailable: the node was deactivated before this request's model call started"
    )
