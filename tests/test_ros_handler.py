"""Request handling beneath the node: every failure is success=False with a clear message,
and the next request still works. Requests are real ``ReasonSegment`` request messages
built from srv/ReasonSegment.srv with rosbags."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from ros_testing import FakeSegmenter, colour_image, image_msg, request_msg

from llmseg_ros.config import SegmenterConfig
from llmseg_ros.ros.frames import Frame, FrameBuffer, HeaderData
from llmseg_ros.ros.handler import HandlerSettings, RequestHandler, parse_request

S = 1_000_000_000


def make(
    frames: tuple[int, ...] = (1,),
    *,
    timeout: float = 5.0,
    max_chars: int = 1000,
    capacity: int = 4,
    segmenter: FakeSegmenter | None = None,
) -> tuple[RequestHandler, FrameBuffer, FakeSegmenter]:
    seg = segmenter or FakeSegmenter()
    buffer = FrameBuffer(capacity)
    for i, stamp in enumerate(frames):
        buffer.add(Frame(header=HeaderData(stamp * S, "camera"), rgb=colour_image(seed=i)))
    settings = HandlerSettings(
        max_instruction_chars=max_chars, request_timeout_s=timeout, image_topic="/camera/image"
    )
    return RequestHandler(seg, buffer, settings), buffer, seg


def expected_mask(seed: int = 0) -> np.ndarray:
    return colour_image(seed=seed)[:, :, 0] > 150


def assert_next_request_works(handler: RequestHandler) -> None:
    outcome = handler.handle(request_msg("the red things"))
    assert outcome.success, outcome.message
    assert outcome.result is not None and outcome.result.mask.any()


def test_success_reports_the_frame_scores_and_timings() -> None:
    handler, _, seg = make((1, 2))
    outcome = handler.handle(request_msg("  the red things  ", explain=True, return_overlay=True))
    assert outcome.success and outcome.message.startswith("ok: ")
    assert outcome.instruction == "the red things" and outcome.frame_stamp_ns == 2 * S
    assert outcome.result is not None
    np.testing.assert_array_equal(outcome.result.mask, expected_mask(seed=1))
    assert outcome.selected_scores() == ([0], [pytest.approx(0.9)], [pytest.approx(0.8)])
    assert {"queue_wait", "proposals", "vlm", "selector", "request_total"} <= set(outcome.timings)
    assert outcome.overlay is not None and outcome.overlay.shape == (24, 32, 3)
    assert seg.segment_calls[-1]["explain"] is True and seg.segment_calls[-1]["selection"] is None


def test_no_frame_yet_names_the_topic_and_the_qos() -> None:
    handler, buffer, _ = make(())
    outcome = handler.handle(request_msg("a cup"))
    assert not outcome.success and outcome.result is None and outcome.frame is None
    assert "no image received yet on topic '/camera/image'" in outcome.message
    assert "qos.image.reliability" in outcome.message
    buffer.add(Frame(header=HeaderData(3 * S, "camera"), rgb=colour_image()))
    assert_next_request_works(handler)


@pytest.mark.parametrize("instruction", ["", "   ", "\n\t"])
def test_empty_instruction(instruction: str) -> None:
    handler, _, seg = make()
    outcome = handler.handle(request_msg(instruction))
    assert not outcome.success
    assert outcome.message.startswith("instruction is empty; expected a sentence or phrase")
    assert seg.segment_calls == []
    assert_next_request_works(handler)


def test_over_long_instruction_names_the_limit() -> None:
    handler, _, seg = make(max_chars=10)
    outcome = handler.handle(request_msg("x" * 11))
    assert not outcome.success
    assert (
        outcome.message == "instruction has 11 characters; the limit is 10 (parameter max_instruction_chars)"
    )
    assert seg.segment_calls == []
    assert handler.handle(request_msg("x" * 10)).success


def test_stale_and_unknown_stamps() -> None:
    handler, _, _ = make((10, 11, 12), capacity=3)
    stale = handler.handle(request_msg("a cup", stamp_ns=5 * S))
    assert not stale.success and "is stale: older than every buffered frame" in stale.message
    assert "frame_buffer_size" in stale.message
    future = handler.handle(request_msg("a cup", stamp_ns=20 * S))
    assert not future.success and "newer than the latest buffered frame" in future.message
    between = handler.handle(request_msg("a cup", stamp_ns=11 * S + S // 2))
    assert not between.success and "no buffered frame within 0.01 s" in between.message
    exact = handler.handle(request_msg("a cup", stamp_ns=11 * S))
    assert exact.success and exact.frame_stamp_ns == 11 * S
    near = handler.handle(request_msg("a cup", stamp_ns=10 * S + 3_000_000))  # within stamp_tolerance
    assert near.success and near.frame_stamp_ns == 10 * S


def test_timeout_returns_failure_and_the_handler_stays_usable() -> None:
    handler, _, seg = make(timeout=0.2, segmenter=FakeSegmenter(slow_s=0.6))
    t0 = time.monotonic()
    outcome = handler.handle(request_msg("slow: think hard"))
    elapsed = time.monotonic() - t0
    assert not outcome.success and elapsed < 0.5
    assert outcome.message.startswith(
        "request timed out after 0.2 s (parameter request_timeout) while answering"
    )
    assert "the node keeps serving" in outcome.message
    # A request arriving while the stuck call still holds the model gives up at its own
    # deadline without ever reaching the model.
    calls = len(seg.segment_calls)
    blocked = handler.handle(request_msg("a cup"))
    assert not blocked.success and "while waiting for the model" in blocked.message
    assert seg.idle.wait(2.0)
    assert len(seg.segment_calls) == calls
    assert_next_request_works(handler)


def test_inference_exception_becomes_a_message() -> None:
    handler, _, _ = make()
    outcome = handler.handle(request_msg("explode"))
    assert not outcome.success
    assert outcome.message == "inference failed: RuntimeError: boom: the model ran out of memory"
    assert_next_request_works(handler)


def test_wrong_mask_shape_from_the_segmenter_is_an_inference_failure() -> None:
    handler, _, _ = make(segmenter=FakeSegmenter(wrong_mask_shape=True))
    outcome = handler.handle(request_msg("a cup"))
    assert (
        not outcome.success and "returned a mask of shape (23, 32) for a frame of (24, 32)" in outcome.message
    )


def test_concurrent_requests_are_serialised_and_share_the_frame_features() -> None:
    handler, _, seg = make((1,), segmenter=FakeSegmenter(prepare_s=0.05, slow_s=0.02))
    outcomes = []
    lock = threading.Lock()

    def call(i: int) -> None:
        outcome = handler.handle(request_msg(f"slow {i}" if i % 2 else "explode" if i == 4 else f"cup {i}"))
        with lock:
            outcomes.append((i, outcome))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_index = dict(outcomes)
    assert not by_index[4].success and "boom" in by_index[4].message
    assert all(o.success for i, o in by_index.items() if i != 4)
    assert seg.max_concurrent == 1  # one model call at a time
    assert seg.prepare_calls == 1  # the frame's proposals were computed once
    assert sum("proposals" in o.timings for o in by_index.values()) == 1
    assert_next_request_works(handler)


def test_selection_overrides_are_validated_and_passed_on() -> None:
    handler, _, seg = make()
    bad = handler.handle(request_msg("a cup", selection_strategy="best"))
    assert not bad.success and "selection_strategy 'best' is unknown; expected one of" in bad.message
    for value in (1.5, float("nan")):
        bad = handler.handle(request_msg("a cup", iop_threshold=value))
        assert (
            not bad.success
            and "iop_threshold must be in [0, 1], or negative for the parameter" in bad.message
        )
    ok = handler.handle(request_msg("a cup", selection_strategy="top1_iou"))
    assert ok.success
    selection = seg.segment_calls[-1]["selection"]
    assert (selection.strategy, selection.iop_threshold) == ("top1_iou", 0.5)
    assert handler.handle(request_msg("a cup", iop_threshold=0.25)).success
    selection = seg.segment_calls[-1]["selection"]
    assert (selection.strategy, selection.iop_threshold) == ("iop_threshold", 0.25)


def test_request_image_is_used_instead_of_the_buffer() -> None:
    handler, _, _ = make(())
    rgb = colour_image(seed=5)
    outcome = handler.handle(
        request_msg("a cup", image=image_msg(rgb[:, :, ::-1].copy(), "bgr8", 42 * S, "hand_cam"))
    )
    assert outcome.success and outcome.frame is not None and outcome.frame.from_request
    assert outcome.frame.header == HeaderData(42 * S, "hand_cam") and "the request image" in outcome.message
    assert outcome.result is not None
    np.testing.assert_array_equal(outcome.result.mask, expected_mask(seed=5))
    bad = handler.handle(request_msg("a cup", image=image_msg(np.ones((4, 4), np.float32), "32FC1")))
    assert not bad.success and bad.message.startswith(
        "request image: the colour image has depth encoding '32FC1'"
    )


def test_conversation_follow_ups_stay_on_their_frame() -> None:
    handler, buffer, seg = make((1,), capacity=2)
    first = handler.handle(request_msg("the red things", conversation_id="dishes"))
    assert first.success and first.frame_stamp_ns == 1 * S
    buffer.add(Frame(header=HeaderData(2 * S, "camera"), rgb=colour_image(seed=9)))
    follow = handler.handle(request_msg("and the one left of it?", conversation_id="dishes"))
    assert follow.success and follow.frame_stamp_ns == 1 * S
    assert seg.segment_calls[-1]["conversation_id"] == "dishes"
    other = handler.handle(request_msg("a cup"))
    assert other.frame_stamp_ns == 2 * S
    buffer.add(Frame(header=HeaderData(3 * S, "camera"), rgb=colour_image(seed=3)))  # evicts frame 1
    late = handler.handle(request_msg("and now?", conversation_id="dishes"))
    assert late.success and late.frame_stamp_ns == 3 * S
    assert "no longer buffered, so the latest frame was used" in late.message


def test_malformed_request_objects_do_not_raise() -> None:
    handler, _, _ = make()

    class Partial:
        instruction = "a cup"

    outcome = handler.handle(Partial())
    assert not outcome.success and outcome.message.startswith("malformed request: AttributeError")
    assert_next_request_works(handler)


def test_parse_request_defaults_mean_parameters() -> None:
    parsed = parse_request(
        request_msg(" a cup "), max_instruction_chars=100, default_selection=SegmenterConfig().selection
    )
    assert parsed.instruction == "a cup" and parsed.image is None and parsed.stamp_ns == 0
    assert parsed.selection is None and parsed.conversation_id is None and not parsed.explain


@pytest.mark.slow
def test_end_to_end_with_the_tiny_profile(tiny_config_factory: Any, scene_image: np.ndarray) -> None:
    from llmseg_ros.pipeline import ReasonSegmenter

    segmenter = ReasonSegmenter(tiny_config_factory("llmseg"))
    segmenter.load()
    buffer = FrameBuffer(2)
    buffer.add(Frame(header=HeaderData(1 * S, "camera"), rgb=scene_image))
    handler = RequestHandler(segmenter, buffer, HandlerSettings(request_timeout_s=120.0))
    first = handler.handle(request_msg("where could I throw away these scraps?", return_overlay=True))
    assert first.success, first.message
    assert first.result is not None and first.result.mask.shape == scene_image.shape[:2]
    assert first.result.num_proposals > 0 and first.overlay is not None
    selected, similarity, iop = first.selected_scores()
    assert len(similarity) == len(iop) == len(selected) and all(0.0 <= p <= 1.0 for p in iop)
    second = handler.handle(request_msg("something to sit on", selection_strategy="top1_iou"))
    assert second.success, second.message
    assert second.result is not None and len(second.result.selected) == 1  # top1_iou picks exactly one
    # the frame's proposals were computed once: only the first request paid for them
    prepared_first = set(first.timings) - set(second.timings)
    assert prepared_first, (first.timings, second.timings)
    bad = handler.handle(request_msg(""))
    assert not bad.success
    assert handler.handle(request_msg("a cup")).success


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lisa", "grounded", "vlm_grounding", "vlm_marks"])
def test_every_other_method_through_the_handler(
    tiny_config_factory: Any, scene_image: np.ndarray, method: str
) -> None:
    """The method switch reaches the node's request handling unchanged."""
    from llmseg_ros.pipeline import ReasonSegmenter

    segmenter = ReasonSegmenter(tiny_config_factory(method))
    buffer = FrameBuffer(2)
    buffer.add(Frame(header=HeaderData(1 * S, "camera"), rgb=scene_image))
    handler = RequestHandler(segmenter, buffer, HandlerSettings(request_timeout_s=120.0))
    outcome = handler.handle(request_msg("where could I throw away these scraps?", return_overlay=True))
    assert outcome.success, outcome.message
    assert outcome.result is not None and outcome.result.method == method
    assert outcome.result.mask.shape == scene_image.shape[:2]
    assert 0.0 <= outcome.result.confidence <= 1.0 and outcome.overlay is not None
    assert not handler.handle(request_msg("")).success
    assert handler.handle(request_msg("a cup")).success


class PlainStamp:
    def __init__(self, sec: Any = 0, nanosec: Any = 0) -> None:
        self.sec, self.nanosec = sec, nanosec


class PlainRequest:
    """A request given as "any object with these fields" (not a generated message class)."""

    def __init__(self, **fields: Any) -> None:
        self.instruction: Any = "the red things"
        self.image: Any = None
        self.stamp: Any = PlainStamp()
        self.selection_strategy: Any = ""
        self.iop_threshold: Any = -1.0
        self.return_overlay: Any = False
        self.explain: Any = False
        self.conversation_id: Any = ""
        for name, value in fields.items():
            setattr(self, name, value)


class PlainImage:
    def __init__(
        self, data: Any, height: Any = 1, width: Any = 2, step: Any = 6, encoding: Any = "rgb8"
    ) -> None:
        self.header = type("H", (), {"stamp": PlainStamp(), "frame_id": "cam"})()
        self.height, self.width, self.step, self.encoding = height, width, step, encoding
        self.is_bigendian = 0
        self.data = data


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"image": PlainImage([0, 1, 2, 3, 4, 2**64])}, "request image: image data"),
        (
            {"image": PlainImage([0, 1, 2, 3, 4, 300])},
            "request image: image data must hold bytes in [0, 255], got 300",
        ),
        (
            {"image": PlainImage(b"\0" * 6, height=float("inf"))},
            "request image: Image.height must be an unsigned integer",
        ),
        ({"image": PlainImage(b"\0" * 6, width=2**40)}, "request image: Image.width must be in [0, 2^32)"),
        ({"iop_threshold": 10**400}, "iop_threshold must be a number"),
        ({"iop_threshold": "0.5"}, "iop_threshold must be a number"),
        ({"stamp": PlainStamp(float("inf"), 0)}, "stamp.sec must be an integer"),
        ({"stamp": PlainStamp(2**40, 0)}, "stamp.sec must be a 32-bit signed integer"),
        ({"stamp": PlainStamp(1, 10**9)}, "stamp.nanosec must be in [0, 10^9)"),
        ({"explain": "no"}, "explain must be a bool"),
        ({"return_overlay": 2}, "return_overlay must be a bool"),
        ({"selection_strategy": None}, "selection_strategy must be a string"),
        ({"instruction": b"a cup"}, "instruction must be a string, got bytes"),
        ({"conversation_id": 7}, "conversation_id must be a string, got int"),
    ],
)
def test_every_request_field_is_checked_at_parse_time(fields: dict[str, Any], expected: str) -> None:
    handler, _, seg = make()
    outcome = handler.handle(PlainRequest(**fields))
    assert not outcome.success and outcome.message.startswith(expected), outcome.message
    assert seg.segment_calls == []
    assert handler.handle(PlainRequest()).success  # the same path works with valid fields


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("a cup \ud800", "a lone surrogate U+D800 (not valid UTF-8) at character 6"),
        ("a\x00cup", "the control character U+0000 at character 1"),
        ("a cup\x1b[2J", "the control character U+001B at character 5"),
        ("a \x85 cup", "the control character U+0085 at character 2"),
    ],
)
def test_invalid_text_is_refused_before_the_model(text: str, what: str) -> None:
    handler, _, seg = make()
    outcome = handler.handle(request_msg(text))
    assert not outcome.success
    assert outcome.message.startswith(f"instruction holds {what}; expected text that is valid UTF-8"), (
        outcome.message
    )
    assert seg.segment_calls == []
    bad_id = handler.handle(request_msg("a cup", conversation_id="c\ud83d"))
    assert not bad_id.success and bad_id.message.startswith("conversation_id holds a lone surrogate U+D83D")
    assert handler.handle(request_msg("a cup\twith a tab\nand a new line, ünïcödé and emoji 🍽")).success


def test_over_long_conversation_id_is_refused_with_its_parameter() -> None:
    handler, _, seg = make()
    outcome = handler.handle(request_msg("a cup", conversation_id="c" * (1 << 20)))
    assert not outcome.success and outcome.conversation_id == ""  # the megabyte is not echoed back
    assert outcome.message == (
        "conversation_id has 1048576 characters; the limit is 128 (parameter conversation.max_id_chars)"
    )
    assert seg.segment_calls == []
    assert handler.handle(request_msg("a cup", conversation_id="c" * 128)).success


class NotingSegmenter(FakeSegmenter):
    """Says that it dropped conversation turns, as ReasonSegmenter does."""

    def segment(self, *args: Any, **kwargs: Any) -> Any:
        result = super().segment(*args, **kwargs)
        result.dropped_turns = 2
        result.warnings.append(
            "conversation 'c': dropped the 2 oldest turn(s) so the prompt fits the VLM's context"
        )
        return result


def test_dropped_conversation_turns_are_said_in_the_response_message() -> None:
    handler, _, _ = make(segmenter=NotingSegmenter())
    outcome = handler.handle(request_msg("and the next one?", conversation_id="c"))
    assert outcome.success and outcome.message.startswith("ok: ")
    assert outcome.message.endswith(
        "; conversation 'c': dropped the 2 oldest turn(s) so the prompt fits the VLM's context"
    )
