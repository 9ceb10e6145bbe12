"""The node's own code (llmseg_ros/node.py) on a machine without ROS 2, against stand-ins
for rclpy, message_filters and the generated message classes.

The stand-ins only record calls and, like rclpy's generated messages, reject unknown
field names and primitive sequences that are not ``array.array`` with rclpy's typecode,
so the node's conversions are checked field by field. The real rclpy run is the
launch_testing test in tests/ros/.
"""

from __future__ import annotations

import array
import importlib
import sys
import types
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ros_testing import REPO, FakeSegmenter, camera_info_msg, colour_image, image_msg, request_msg

S = 1_000_000_000
TYPECODES = {"uint8[]": "B", "int32[]": "i", "float32[]": "f", "float64[]": "d"}


def _fields(definition: str) -> dict[str, str]:
    """field name → type from .msg text (comments and blank lines ignored)."""
    out = {}
    for line in definition.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            kind, name = line.split()[:2]
            out[name] = kind
    return out


def message_class(name: str, fields: dict[str, str]) -> type:
    """A stand-in for an rclpy message class: keyword constructor, strict field names and sequences."""

    def __init__(self: Any, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(fields)
        assert not unknown, f"{name} has no field(s) {sorted(unknown)}"
        for field, kind in fields.items():
            value = kwargs.get(field)
            if kind in TYPECODES and value is not None:
                assert isinstance(value, array.array) and value.typecode == TYPECODES[kind], (
                    f"{name}.{field} ({kind}) must be array.array('{TYPECODES[kind]}'), got {type(value).__name__}"
                )
            setattr(self, field, value)

    return type(name, (), {"__init__": __init__, "FIELDS": fields})


HEADER = {"stamp": "builtin_interfaces/Time", "frame_id": "string"}
IMAGE = {"header": "std_msgs/Header", "height": "uint32", "width": "uint32", "encoding": "string",
         "is_bigendian": "uint8", "step": "uint32", "data": "uint8[]"}  # fmt: skip
CLOUD = {"header": "std_msgs/Header", "height": "uint32", "width": "uint32", "fields": "PointField[]",
         "is_bigendian": "bool", "point_step": "uint32", "row_step": "uint32", "data": "uint8[]", "is_dense": "bool"}  # fmt: skip


class Return(Enum):
    SUCCESS = 1
    FAILURE = 2
    ERROR = 3


class Recorder:
    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.published: list[Any] = []

    def publish(self, msg: Any) -> None:
        self.published.append(msg)


class Logger:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda text, **kwargs: self.lines.append((level, text))


class FakeLifecycleNode:
    def __init__(self, node_name: str, **kwargs: Any) -> None:
        self.params: dict[str, Any] = {}
        self.descriptors: dict[str, Any] = {}
        self.logger = Logger()
        self.entities: list[Recorder] = []
        self.destroyed: list[Recorder] = []

    def declare_parameter(self, name: str, value: Any, descriptor: Any = None) -> None:
        assert name not in self.params, f"parameter {name} declared twice"
        self.params[name], self.descriptors[name] = value, descriptor

    def get_parameter(self, name: str) -> Any:
        return SimpleNamespace(value=self.params[name])

    def get_logger(self) -> Logger:
        return self.logger

    def get_fully_qualified_name(self) -> str:
        return "/llmseg_perception"

    def _make(self, kind: str, *args: Any, **kwargs: Any) -> Recorder:
        entity = Recorder(kind, *args, **kwargs)
        self.entities.append(entity)
        return entity

    def create_lifecycle_publisher(self, *args: Any, **kwargs: Any) -> Recorder:
        return self._make("pub", *args, **kwargs)

    def create_subscription(self, *args: Any, **kwargs: Any) -> Recorder:
        return self._make("sub", *args, **kwargs)

    def create_service(self, *args: Any, **kwargs: Any) -> Recorder:
        return self._make("srv", *args, **kwargs)

    def destroy_lifecycle_publisher(self, entity: Recorder) -> None:
        self.destroyed.append(entity)

    destroy_subscription = destroy_service = destroy_lifecycle_publisher

    def on_activate(self, state: Any) -> Return:
        return Return.SUCCESS

    def on_deactivate(self, state: Any) -> Return:
        return Return.SUCCESS


class FakeFilterSubscriber:
    def __init__(self, node: FakeLifecycleNode, msg_type: Any, topic: str, **kwargs: Any) -> None:
        self.sub = node.create_subscription(msg_type, topic, None, **kwargs)


class FakeSync:
    def __init__(self, filters: list[Any], queue_size: int, slop: float) -> None:
        self.filters, self.queue_size, self.slop = filters, queue_size, slop
        self.callbacks: list[Any] = []

    def registerCallback(self, callback: Any) -> None:
        self.callbacks.append(callback)


def module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@pytest.fixture
def node_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    enum = SimpleNamespace
    srv_request, srv_response = (REPO / "srv" / "ReasonSegment.srv").read_text().split("\n---\n")
    reason_segment = type(
        "ReasonSegment",
        (),
        {
            "Request": message_class("Request", _fields(srv_request)),
            "Response": message_class("Response", _fields(srv_response)),
        },
    )
    stubs = {
        "rclpy": module("rclpy", init=lambda args=None: None, try_shutdown=lambda: None),
        "rclpy.lifecycle": module(
            "rclpy.lifecycle",
            LifecycleNode=FakeLifecycleNode,
            LifecycleState=object,
            TransitionCallbackReturn=Return,
        ),
        "rclpy.callback_groups": module(
            "rclpy.callback_groups", MutuallyExclusiveCallbackGroup=object, ReentrantCallbackGroup=object
        ),
        "rclpy.executors": module(
            "rclpy.executors", ExternalShutdownException=RuntimeError, MultiThreadedExecutor=object
        ),
        "rclpy.qos": module(
            "rclpy.qos",
            QoSProfile=lambda **kw: SimpleNamespace(**kw),
            HistoryPolicy=enum(KEEP_LAST="keep_last"),
            ReliabilityPolicy=enum(RELIABLE="reliable", BEST_EFFORT="best_effort"),
            DurabilityPolicy=enum(VOLATILE="volatile"),
        ),
        "rcl_interfaces": module("rcl_interfaces"),
        "rcl_interfaces.msg": module(
            "rcl_interfaces.msg", ParameterDescriptor=lambda **kw: SimpleNamespace(**kw)
        ),
        "builtin_interfaces": module("builtin_interfaces"),
        "builtin_interfaces.msg": module(
            "builtin_interfaces.msg", Time=message_class("Time", {"sec": "int32", "nanosec": "uint32"})
        ),
        "std_msgs": module("std_msgs"),
        "std_msgs.msg": module("std_msgs.msg", Header=message_class("Header", HEADER)),
        "sensor_msgs": module("sensor_msgs"),
        "sensor_msgs.msg": module(
            "sensor_msgs.msg",
            Image=message_class("Image", IMAGE),
            CameraInfo=message_class("CameraInfo", {}),
            PointCloud2=message_class("PointCloud2", CLOUD),
            PointField=message_class(
                "PointField", {"name": "string", "offset": "uint32", "datatype": "uint8", "count": "uint32"}
            ),
        ),
        "message_filters": module(
            "message_filters", Subscriber=FakeFilterSubscriber, ApproximateTimeSynchronizer=FakeSync
        ),
        "llmseg_ros.msg": module(
            "llmseg_ros.msg",
            Segmentation=message_class(
                "Segmentation", _fields((REPO / "msg" / "Segmentation.msg").read_text())
            ),
        ),
        "llmseg_ros.srv": module("llmseg_ros.srv", ReasonSegment=reason_segment),
    }
    for name, stub in stubs.items():
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.delitem(sys.modules, "llmseg_ros.node", raising=False)
    import llmseg_ros.models.components
    import llmseg_ros.pipeline

    class Segmenter(FakeSegmenter):
        loads = 0
        closes = 0

        def __init__(self, config: Any) -> None:
            super().__init__(config=config, prepare_s=0.01)

        def load(self) -> None:
            Segmenter.loads += 1

        def close(self) -> None:
            Segmenter.closes += 1

        def describe(self) -> dict[str, Any]:
            return {"method": "fake"}

    monkeypatch.setattr(llmseg_ros.pipeline, "ReasonSegmenter", Segmenter)
    monkeypatch.setattr(llmseg_ros.models.components, "missing_inputs", lambda config: [])
    mod = importlib.import_module("llmseg_ros.node")
    yield mod
    sys.modules.pop("llmseg_ros.node", None)


def frame_msgs(i: int) -> tuple[Any, Any, Any]:
    stamp = (10 + i) * S
    depth = np.full((24, 32), 1000, np.uint16)
    return (
        image_msg(colour_image(seed=i)[:, :, ::-1].copy(), "bgr8", stamp, "color_optical"),
        image_msg(depth, "16UC1", stamp, "color_optical"),
        camera_info_msg((30.0, 30.0, 15.5, 11.5), 32, 24, stamp, "color_optical"),
    )


def pubs(node: Any) -> dict[str, Recorder]:
    return {e.args[1]: e for e in node.entities if e.kind == "pub"}


def test_parameters_are_declared_with_descriptions(node_module: Any) -> None:
    from llmseg_ros.ros.params import default_parameters

    node = node_module.PerceptionNode()
    assert node.params == default_parameters()
    assert all(d.description for d in node.descriptors.values())


def test_lifecycle_frames_requests_and_outputs(node_module: Any) -> None:
    node = node_module.PerceptionNode()
    node.params.update({"use_depth": True, "precompute": True, "qos.depth": 3})
    state = object()
    ok = node_module.TransitionCallbackReturn.SUCCESS
    assert node.on_configure(state) == ok
    subs = [e for e in node.entities if e.kind == "sub"]
    assert [s.args[1] for s in subs] == ["image", "depth", "camera_info"]
    qos = subs[0].kwargs["qos_profile"]
    assert (qos.reliability, qos.history, qos.depth) == ("best_effort", "keep_last", 3)
    assert any("image QoS in use: reliability=best_effort" in text for _, text in node.logger.lines)
    assert set(pubs(node)) == {
        "mask",
        "segmentation",
        "masked_depth",
        "masked_depth/camera_info",
        "points",
        "overlay",
    }
    service = next(e for e in node.entities if e.kind == "srv")
    assert service.args[1] == "reason_segment"
    response_type = node_module.ReasonSegment.Response

    inactive = node._on_request(request_msg("a cup"), None)  # configured, not active yet
    assert not inactive.success and "ros2 lifecycle set /llmseg_perception activate" in inactive.message
    assert node.on_activate(state) == ok
    early = node._on_request(request_msg("a cup"), None)
    assert isinstance(early, response_type) and not early.success and "no image received yet" in early.message
    for i in range(3):
        node._on_frame(*frame_msgs(i))
    node._precompute.wait_idle(5.0)
    response = node._on_request(request_msg("the red things", return_overlay=True), None)
    assert response.success, response.message
    assert (response.frame_stamp.sec, response.frame_stamp.nanosec) == (12, 0)
    assert response.mask.encoding == "mono8" and response.mask.header.frame_id == "color_optical"
    assert response.overlay.encoding == "bgr8" and list(response.selected) == [0]
    published = {topic: pub.published for topic, pub in pubs(node).items()}
    assert all(len(msgs) == 1 for msgs in published.values()), {k: len(v) for k, v in published.items()}
    cloud = published["points"][0]
    mask = np.frombuffer(published["mask"][0].data, np.uint8).reshape(24, 32) == 255
    assert cloud.width == int(mask.sum()) and [f.name for f in cloud.fields] == ["x", "y", "z"]
    assert published["masked_depth/camera_info"][0] is not None
    assert published["segmentation"][0].header.stamp.sec == 12

    bad = node._on_request(request_msg("explode"), None)
    assert not bad.success and "boom" in bad.message
    node._on_frame(
        image_msg(np.zeros((4, 4), np.float32), "32FC1", 20 * S), *frame_msgs(0)[1:]
    )  # bad frame: dropped
    assert any(level == "warning" and "dropped a frame" in text for level, text in node.logger.lines)
    assert node._on_request(request_msg("the red things"), None).success

    loads = type(node._segmenter).loads
    assert node.on_deactivate(state) == ok
    assert type(node._segmenter).closes >= 1 and node._precompute is None
    assert not node._on_request(request_msg("a cup"), None).success
    assert node.on_activate(state) == ok and type(node._segmenter).loads == loads + 1
    assert node.on_cleanup(state) == ok
    assert len(node.destroyed) == len(node.entities)
    assert node._segmenter is None


def test_bad_parameters_fail_the_configure_transition(node_module: Any) -> None:
    node = node_module.PerceptionNode()
    node.params["selection.strategy"] = "best"
    assert node.on_configure(object()) == node_module.TransitionCallbackReturn.FAILURE
    assert any(level == "error" and "strategy must be one of" in text for level, text in node.logger.lines)
    assert node.entities == []
    node.params["selection.strategy"] = "top1_iou"
    node.params["qos.reliability"] = "reliable"
    assert node.on_configure(object()) == node_module.TransitionCallbackReturn.SUCCESS
    sub = next(e for e in node.entities if e.kind == "sub")
    assert sub.args[1] == "image" and sub.args[3].reliability == "reliable"


def test_node_module_is_the_only_ros_import_site(node_module: Any) -> None:
    assert Path(node_module.__file__).name == "node.py"
