"""Property-based checks of the ROS-free request path (hypothesis, derandomized).

Arbitrary field values, sizes and encodings never raise out of ``RequestHandler.handle``
(they give ``success=False`` with a message) nor anything but the documented
``ValueError`` / ``TypeError`` out of the message conversions; a small message declaring a
huge size is refused before anything of that size is allocated; and no published point
cloud holds a non-finite point while flagged dense.
"""

from __future__ import annotations

import array
import contextlib
import tracemalloc
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ros_testing import FakeSegmenter, colour_image

from llmseg_ros.ros.depth import Intrinsics, depth_to_points, intrinsics_from_camera_info, xyz_cloud
from llmseg_ros.ros.frames import Frame, FrameBuffer, HeaderData, frame_from_messages, stamp_to_ns
from llmseg_ros.ros.handler import HandlerSettings, RequestHandler, SegmentationOutcome
from llmseg_ros.ros.images import ENCODINGS, depth_from_message, image_to_numpy, rgb_from_message
from llmseg_ros.ros.outputs import build_outputs
from llmseg_ros.types import SegmentResult

S = 1_000_000_000
CHECKS = {"derandomize": True, "deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

# -- strategies ------------------------------------------------------------------------
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.lists(st.integers(-300, 300), max_size=6),
    st.builds(object),
)
TEXTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["the red things", "", "   ", "a \ud800 cup", "a\x00b", "\x1b[2J", "x" * 1200, "ok\n\tfine"]
    ),
)
SIZES = st.one_of(st.integers(0, 6), st.integers(0, 2**33), st.sampled_from([2**32 - 1, 2**31]))


def byte_data(max_size: int = 200) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.binary(max_size=max_size),
        st.binary(max_size=max_size).map(bytearray),
        st.binary(max_size=max_size).map(lambda b: np.frombuffer(b, np.uint8).copy()),
        st.binary(max_size=max_size).map(lambda b: array.array("B", b)),
        st.lists(st.integers(-2, 300), max_size=max_size),
        st.lists(st.integers(0, 3), max_size=8).map(lambda v: array.array("i", v)),
        st.lists(st.floats(), max_size=8).map(lambda v: np.asarray(v, np.float64)),
        JUNK,
    )


@st.composite
def headers(draw: st.DrawFn) -> Any:
    stamp = SimpleNamespace(
        sec=draw(st.one_of(st.integers(0, 2**31 - 1), JUNK)),
        nanosec=draw(st.one_of(st.integers(0, 10**9 - 1), JUNK)),
    )
    return SimpleNamespace(stamp=stamp, frame_id=draw(st.one_of(st.sampled_from(["cam", ""]), TEXTS, JUNK)))


@st.composite
def images(draw: st.DrawFn, encodings: list[str] | None = None, max_data: int = 200) -> Any:
    """Image messages with arbitrary fields, or consistent small ones (so both paths are exercised)."""
    encoding = draw(st.one_of(st.sampled_from(encodings or list(ENCODINGS)), JUNK, st.text(max_size=8)))
    header = draw(
        st.one_of(
            headers(), st.just(SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0), frame_id="cam"))
        )
    )
    if draw(st.booleans()) and isinstance(encoding, str) and encoding in ENCODINGS:
        h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        step = w * ENCODINGS[encoding].bytes_per_pixel + draw(st.integers(0, 3))
        data = draw(st.binary(min_size=step * h, max_size=step * h))
        bigendian = draw(st.sampled_from([0, 1]))
        return SimpleNamespace(
            header=header, height=h, width=w, encoding=encoding, is_bigendian=bigendian, step=step, data=data
        )
    return SimpleNamespace(
        header=header,
        height=draw(st.one_of(SIZES, JUNK)),
        width=draw(st.one_of(SIZES, JUNK)),
        encoding=encoding,
        is_bigendian=draw(st.one_of(st.sampled_from([0, 1, True, 2, 256, -1]), JUNK)),
        step=draw(st.one_of(SIZES, JUNK)),
        data=draw(byte_data(max_data)),
    )


@st.composite
def camera_infos(draw: st.DrawFn) -> Any:
    finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False)
    any_float = st.floats(allow_nan=True, allow_infinity=True)
    k = draw(
        st.one_of(
            st.tuples(
                st.floats(1e-3, 1e4),
                finite,
                any_float,
                finite,
                st.floats(1e-3, 1e4),
                any_float,
                finite,
                finite,
                finite,
            ).map(list),
            st.lists(any_float, min_size=9, max_size=9),
            st.lists(st.one_of(any_float, st.integers(-(2**1100), 2**1100)), max_size=12),
            JUNK,
        )
    )
    return SimpleNamespace(k=k, width=draw(st.one_of(SIZES, JUNK)), height=draw(st.one_of(SIZES, JUNK)))


# -- the request handler -------------------------------------------------------------------
def handler() -> tuple[RequestHandler, FakeSegmenter]:
    seg = FakeSegmenter()
    buffer = FrameBuffer(2)
    buffer.add(Frame(header=HeaderData(1 * S, "camera"), rgb=colour_image()))
    return RequestHandler(seg, buffer, HandlerSettings(request_timeout_s=10.0)), seg


@st.composite
def requests(draw: st.DrawFn) -> Any:
    valid = {
        "instruction": st.just("the red things"),
        "image": st.none(),
        "stamp": st.just(SimpleNamespace(sec=0, nanosec=0)),
        "selection_strategy": st.just(""),
        "iop_threshold": st.just(-1.0),
        "return_overlay": st.just(False),
        "explain": st.just(False),
        "conversation_id": st.just(""),
    }
    anything = {
        "instruction": TEXTS,
        "image": images(encodings=["rgb8", "bgr8", "mono8", "mono16", "rgba8", "32FC1"]),
        "stamp": headers().map(lambda h: h.stamp),
        "selection_strategy": st.one_of(st.sampled_from(["top1_iou", "best", " iop_threshold "]), TEXTS),
        "iop_threshold": st.one_of(
            st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**1100), 2**1100)
        ),
        "return_overlay": st.one_of(st.booleans(), st.integers(-2, 3)),
        "explain": st.one_of(st.booleans(), st.integers(-2, 3)),
        "conversation_id": st.one_of(TEXTS, st.sampled_from(["c" * 129, "c" * 128])),
    }
    fields = {name: draw(strategy) for name, strategy in valid.items()}
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=3, unique=True)):
        choice = draw(st.sampled_from(["anything", "anything", "junk", "missing"]))
        if choice == "missing":
            del fields[name]
        else:
            fields[name] = draw(anything[name] if choice == "anything" else JUNK)
    return SimpleNamespace(**fields)


@settings(max_examples=150, **CHECKS)
@given(requests())
def test_handle_never_raises_and_every_failure_says_why(request: Any) -> None:
    h, _ = handler()
    outcome = h.handle(request)
    assert isinstance(outcome, SegmentationOutcome)
    assert outcome.message
    if outcome.success:
        assert outcome.message.startswith("ok: ") and outcome.result is not None and outcome.frame is not None
        assert outcome.result.mask.shape == outcome.frame.rgb.shape[:2]
        assert isinstance(request.instruction, str) and outcome.instruction == request.instruction.strip()
    else:
        assert outcome.result is None and not outcome.message.startswith("ok")
        assert "inference failed" not in outcome.message, outcome.message  # bad input never reaches the model
        assert isinstance(outcome.instruction, str) and len(outcome.instruction) <= 1000


# -- image, depth and CameraInfo conversions ---------------------------------------------------
@settings(max_examples=200, **CHECKS)
@given(images())
def test_image_conversions_raise_only_the_documented_errors(msg: Any) -> None:
    for convert in (image_to_numpy, rgb_from_message, depth_from_message, frame_from_messages):
        try:
            out = convert(msg)
        except (ValueError, TypeError):
            continue
        if isinstance(out, Frame):
            assert out.rgb.dtype == np.uint8 and out.rgb.shape == (msg.height, msg.width, 3)
        else:
            assert out.shape[:2] == (msg.height, msg.width)


@settings(max_examples=100, **CHECKS)
@given(st.lists(st.integers(-(2**70), 2**70), min_size=6, max_size=6))
def test_pixel_bytes_out_of_range_are_refused_never_wrapped(values: list[int]) -> None:
    msg = SimpleNamespace(height=1, width=2, step=6, encoding="rgb8", is_bigendian=0, data=values)
    if all(0 <= v <= 255 for v in values):
        assert image_to_numpy(msg).reshape(-1).tolist() == values
        return
    try:
        pixels = image_to_numpy(msg)
    except (ValueError, TypeError) as exc:
        assert "[0, 255]" in str(exc)
    else:
        raise AssertionError(f"{values} became the pixels {pixels.reshape(-1).tolist()}")


@settings(max_examples=150, **CHECKS)
@given(
    height=st.integers(0, 2**32 - 1),
    width=st.integers(0, 2**32 - 1),
    step=st.integers(0, 2**32 - 1),
    encoding=st.sampled_from(list(ENCODINGS)),
    data=st.binary(max_size=64),
)
def test_a_huge_declared_size_is_refused_before_allocating(
    height: int, width: int, step: int, encoding: str, data: bytes
) -> None:
    msg = SimpleNamespace(
        header=SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0), frame_id="cam"),
        height=height,
        width=width,
        step=step,
        encoding=encoding,
        is_bigendian=0,
        data=data,
    )
    tracemalloc.start()
    try:
        for convert in (image_to_numpy, frame_from_messages):
            with contextlib.suppress(ValueError, TypeError):
                convert(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak  # at most the 64 data bytes in a handful of small arrays


@settings(max_examples=200, **CHECKS)
@given(camera_infos())
def test_camera_info_gives_finite_intrinsics_or_a_documented_error(info: Any) -> None:
    try:
        k = intrinsics_from_camera_info(info)
    except (ValueError, TypeError):
        return
    assert all(np.isfinite([k.fx, k.fy, k.cx, k.cy])) and k.fx > 0 and k.fy > 0


depth_values = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 3.0e38, 1e-45])
)


@settings(max_examples=100, **CHECKS)
@given(
    fx=st.floats(1e-300, 1e300),
    fy=st.floats(1e-300, 1e300),
    cx=st.floats(-1e300, 1e300),
    cy=st.floats(-1e300, 1e300),
    depth32=st.lists(depth_values, min_size=12, max_size=12),
    depth16=st.lists(st.integers(0, 65535), min_size=12, max_size=12),
    mask=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_points_are_finite_and_the_cloud_is_dense_only_when_they_are(
    fx: float, fy: float, cx: float, cy: float, depth32: list[float], depth16: list[int], mask: list[bool]
) -> None:
    intrinsics = Intrinsics(fx, fy, cx, cy, width=4, height=3)
    selection = np.asarray(mask).reshape(3, 4)
    for depth, encoding in (
        (np.asarray(depth32, np.float32).reshape(3, 4), "32FC1"),
        (np.asarray(depth16, np.uint16).reshape(3, 4), "16UC1"),
    ):
        points = depth_to_points(depth, encoding, intrinsics, selection)
        assert np.isfinite(points).all()
        cloud = xyz_cloud(points)
        assert cloud.is_dense and cloud.width == len(points)
        # a frame answered end to end publishes the same cloud
        frame = Frame(
            HeaderData(1, "c"), np.zeros((3, 4, 3), np.uint8), depth, encoding, HeaderData(1, "d"), intrinsics
        )
        result = SegmentResult(selection, [], np.zeros(0), np.zeros(0), 1.0, 0, "fake")
        out = build_outputs(SegmentationOutcome(True, "ok", frame=frame, result=result), overlay=False)
        assert out.cloud is not None and out.cloud.is_dense and np.isfinite(out.cloud.points).all()


@settings(max_examples=100, **CHECKS)
@given(st.lists(st.tuples(depth_values, depth_values, depth_values), max_size=6))
def test_xyz_cloud_flags_non_finite_points(rows: list[tuple[float, float, float]]) -> None:
    points = np.asarray(rows, np.float32).reshape(-1, 3)
    assert xyz_cloud(points).is_dense == bool(np.isfinite(points).all())


@settings(max_examples=200, **CHECKS)
@given(sec=st.one_of(st.integers(-(2**40), 2**40), JUNK), nanosec=st.one_of(st.integers(-5, 2 * 10**9), JUNK))
def test_stamps_are_read_or_refused(sec: Any, nanosec: Any) -> None:
    try:
        ns = stamp_to_ns(SimpleNamespace(sec=sec, nanosec=nanosec))
    except (ValueError, TypeError):
        return
    assert ns == sec * S + nanosec and -(2**31) <= sec < 2**31 and 0 <= nanosec < S
