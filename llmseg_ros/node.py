"""The ROS 2 perception node: a thin lifecycle wrapper around :mod:`llmseg_ros.ros`.

This is the only module of the package that imports rclpy and ROS message types. It
declares the parameters, converts messages with the ROS-free functions of
:mod:`llmseg_ros.ros` and publishes what they return; all logic lives beneath it.

Lifecycle: ``configure`` reads the parameters, loads every model and creates the
subscriptions, publishers and the ``reason_segment`` service; ``activate`` starts serving
(reloading the models if a ``deactivate`` freed them); ``deactivate`` stops serving and
frees the models (GPU memory); ``cleanup`` / ``shutdown`` destroy everything.

Topics (relative names; remap or namespace them): subscribes ``image`` and, with
``use_depth``, ``depth`` + ``camera_info``; publishes ``mask``, ``segmentation``,
``masked_depth``, ``masked_depth/camera_info``, ``points`` and ``overlay``.
"""

from __future__ import annotations

import threading
from typing import Any

import message_filters
import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from llmseg_ros.msg import Segmentation
from llmseg_ros.ros.frames import FrameBuffer, frame_from_messages
from llmseg_ros.ros.handler import RequestHandler, SegmentationOutcome
from llmseg_ros.ros.messages import MessageBuilder, MessageTypes, PythonArrays
from llmseg_ros.ros.outputs import FrameOutputs, build_outputs
from llmseg_ros.ros.params import (
    DESCRIPTIONS,
    NodeSettings,
    default_parameters,
    handler_settings,
    split_parameters,
)
from llmseg_ros.ros.precompute import BackgroundPrecomputer
from llmseg_ros.srv import ReasonSegment

NODE_NAME = "llmseg_perception"


class PerceptionNode(LifecycleNode):
    """Lifecycle node serving ``reason_segment`` and publishing the answers."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for name, value in default_parameters().items():
            self.declare_parameter(name, value, ParameterDescriptor(description=DESCRIPTIONS.get(name, "")))
        self._builder = MessageBuilder(
            MessageTypes(
                header=Header,
                time=Time,
                image=Image,
                point_field=PointField,
                point_cloud=PointCloud2,
                segmentation=Segmentation,
                response=ReasonSegment.Response,
            ),
            PythonArrays(),
        )
        self._active = threading.Event()
        self._settings = NodeSettings()
        self._segmenter: Any = None
        self._buffer: FrameBuffer | None = None
        self._handler: RequestHandler | None = None
        self._precompute: BackgroundPrecomputer | None = None
        self._subscriptions_: list[Any] = []
        self._sync: Any = None
        self._service: Any = None
        self._pubs: dict[str, Any] = {}
        self.get_logger().info("created; waiting for the lifecycle 'configure' transition")

    # -- lifecycle ---------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            values = {name: self.get_parameter(name).value for name in default_parameters()}
            config, settings = split_parameters(values)
            if settings.profile == "tiny":
                from llmseg_ros.tiny import TINY_BANNER, build_tiny_profile, default_cache_dir

                self.get_logger().warning(TINY_BANNER)
                tiny = build_tiny_profile(default_cache_dir() / "tiny", method=config.method)
                config = tiny.replace(
                    selection=config.selection, max_instruction_chars=config.max_instruction_chars
                )
            from llmseg_ros.models.components import missing_inputs
            from llmseg_ros.pipeline import ReasonSegmenter

            missing = missing_inputs(config)
            if missing:
                raise FileNotFoundError("model files are missing: " + "; ".join(missing))
            self._settings = settings
            self._segmenter = ReasonSegmenter(config)
            self._segmenter.load()
            self._buffer = FrameBuffer(settings.frame_buffer_size)
            image_topic = self._create_entities(settings)
            self._handler = RequestHandler(
                self._segmenter, self._buffer, handler_settings(config, settings, image_topic)
            )
        except Exception as exc:
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._teardown()
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"configured: {self._segmenter.describe()}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._segmenter.load()  # no-op unless a deactivate freed the models
        except Exception as exc:
            self.get_logger().error(f"activate failed: cannot load the models: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        if self._settings.precompute and self._handler is not None:
            self._precompute = BackgroundPrecomputer(
                self._handler.features_for, on_error=self._precompute_failed
            )
        self._active.set()
        self.get_logger().info("active: serving reason_segment")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self.get_logger().info("inactive: models freed")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info("cleaned up")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info("shut down")
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def release(self) -> None:
        """Free the models and stop the worker threads (called before the process exits)."""
        self._teardown()

    def _stop_serving(self) -> None:
        self._active.clear()
        if self._precompute is not None:
            self._precompute.close(timeout=5.0)
            self._precompute = None
        if self._handler is not None:
            self._handler.clear()
        if self._buffer is not None:
            self._buffer.clear()
        if self._segmenter is not None:
            self._segmenter.close()

    def _teardown(self) -> None:
        self._stop_serving()
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        for sub in self._subscriptions_:
            self.destroy_subscription(sub)
        self._subscriptions_ = []
        self._sync = None
        if self._service is not None:
            self.destroy_service(self._service)
            self._service = None
        self._handler = None
        self._segmenter = None

    # -- entities ----------------------------------------------------------------------
    def _create_entities(self, settings: NodeSettings) -> str:
        """Create subscriptions, publishers and the service; returns the resolved image topic."""
        reliability = (
            ReliabilityPolicy.RELIABLE
            if settings.qos_reliability == "reliable"
            else ReliabilityPolicy.BEST_EFFORT
        )
        qos_in = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=settings.qos_depth,
            reliability=reliability,
            durability=DurabilityPolicy.VOLATILE,
        )
        qos_out = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE)
        inputs = MutuallyExclusiveCallbackGroup()
        if settings.use_depth:
            filters = [
                message_filters.Subscriber(self, Image, "image", qos_profile=qos_in, callback_group=inputs),
                message_filters.Subscriber(self, Image, "depth", qos_profile=qos_in, callback_group=inputs),
                message_filters.Subscriber(
                    self, CameraInfo, "camera_info", qos_profile=qos_in, callback_group=inputs
                ),
            ]
            self._sync = message_filters.ApproximateTimeSynchronizer(
                filters, settings.sync_queue_size, settings.sync_slop
            )
            self._sync.registerCallback(self._on_frame)
            self._subscriptions_ = [f.sub for f in filters]
        else:
            self._subscriptions_ = [
                self.create_subscription(Image, "image", self._on_frame, qos_in, callback_group=inputs)
            ]
        image_topic = str(getattr(self._subscriptions_[0], "topic_name", "image"))
        self.get_logger().info(
            f"image QoS in use: reliability={settings.qos_reliability}, history=keep_last, depth={settings.qos_depth},"
            f" durability=volatile on '{image_topic}'"
            + (" (+ depth, camera_info; approximate sync)" if settings.use_depth else "")
            + ". A best_effort subscription accepts any camera; set qos.reliability:=reliable only if needed."
        )
        for key, msg_type, topic in (
            ("mask", Image, "mask"),
            ("segmentation", Segmentation, "segmentation"),
            ("masked_depth", Image, "masked_depth"),
            ("camera_info", CameraInfo, "masked_depth/camera_info"),
            ("points", PointCloud2, "points"),
            ("overlay", Image, "overlay"),
        ):
            self._pubs[key] = self.create_lifecycle_publisher(msg_type, topic, qos_out)
        self._service = self.create_service(
            ReasonSegment, "reason_segment", self._on_request, callback_group=ReentrantCallbackGroup()
        )
        return image_topic

    # -- callbacks ---------------------------------------------------------------------
    def _on_frame(
        self, image: Image, depth: Image | None = None, camera_info: CameraInfo | None = None
    ) -> None:
        if not self._active.is_set() or self._buffer is None:
            return
        try:
            frame = frame_from_messages(image, depth, camera_info)
        except (ValueError, TypeError) as exc:
            self.get_logger().warning(f"dropped a frame: {exc}", throttle_duration_sec=5.0)
            return
        self._buffer.add(frame)
        if self._precompute is not None:
            self._precompute.submit(frame)

    def _on_request(self, request: ReasonSegment.Request, response: ReasonSegment.Response) -> Any:
        handler = self._handler
        if not self._active.is_set() or handler is None:
            outcome = SegmentationOutcome(
                False,
                f"node is not active; activate it with: ros2 lifecycle set {self.get_fully_qualified_name()} activate",
            )
            return self._builder.response(outcome, None, None)
        outcome = handler.handle(request)
        outputs: FrameOutputs | None = None
        if outcome.success:
            try:
                outputs = build_outputs(
                    outcome, overlay=self._settings.publish_overlay or outcome.overlay is not None
                )
                self._publish(outcome, outputs)
            except Exception as exc:  # publishing must never take the node down
                self.get_logger().error(f"could not publish the answer: {type(exc).__name__}: {exc}")
                outcome.message += f" (publishing failed: {type(exc).__name__}: {exc})"
        else:
            self.get_logger().info(f"request failed: {outcome.message}")
        overlay = outputs.overlay if outputs is not None and outcome.overlay is not None else None
        return self._builder.response(outcome, outputs.mask if outputs is not None else None, overlay)

    def _publish(self, outcome: SegmentationOutcome, outputs: FrameOutputs) -> None:
        b = self._builder
        self._pubs["mask"].publish(b.image(outputs.mask, outputs.header))
        self._pubs["segmentation"].publish(b.segmentation(outcome, outputs.mask))
        if outputs.overlay is not None and self._settings.publish_overlay:
            self._pubs["overlay"].publish(b.image(outputs.overlay, outputs.header))
        if outputs.masked_depth is not None:
            self._pubs["masked_depth"].publish(b.image(outputs.masked_depth, outputs.depth_header))
            self._pubs["camera_info"].publish(outputs.camera_info)
        if outputs.cloud is not None and outputs.depth_header is not None:
            self._pubs["points"].publish(b.point_cloud(outputs.cloud, outputs.depth_header))
        for warning in outputs.warnings:
            self.get_logger().warning(warning, throttle_duration_sec=5.0)

    def _precompute_failed(self, frame: Any, exc: BaseException) -> None:
        self.get_logger().warning(
            f"background precompute failed for frame {frame.stamp_ns}: {type(exc).__name__}: {exc}",
            throttle_duration_sec=5.0,
        )


def main(args: list[str] | None = None) -> int:
    """Run the node with a multi-threaded executor until shutdown (Ctrl-C)."""
    rclpy.init(args=args)
    node = PerceptionNode()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.release()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
