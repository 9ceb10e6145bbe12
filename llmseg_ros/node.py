"""The ROS 2 perception node: a thin lifecycle wrapper around :mod:`llmseg_ros.ros`.

This is the only module of the package that imports rclpy and ROS message types. It
declares the parameters, converts messages with the ROS-free functions of
:mod:`llmseg_ros.ros` and publishes what they return; all logic lives beneath it.

Lifecycle: ``configure`` reads the parameters, loads every model and creates the
subscriptions, publishers, the ``reason_segment`` and ``stop_track`` services and the
track timeout timer; ``activate`` starts serving (reloading the models if a
``deactivate`` freed them); ``deactivate`` stops serving and
frees the models (GPU memory) once the model call in progress, if any, has finished;
``cleanup`` / ``shutdown`` destroy everything. ``ros2 lifecycle get`` and the parameter
services keep answering while a transition (e.g. the model load) runs.

Topics (relative names; remap or namespace them): subscribes ``image`` and, with
``use_depth``, ``depth`` + ``camera_info``; publishes ``mask``, ``segmentation``,
``masked_depth``, ``masked_depth/camera_info``, ``points`` and ``overlay``.

Tracks: a ``reason_segment`` request with ``track: true`` starts a live track
(:mod:`llmseg_ros.ros.track_service`); a worker thread updates every live track on each
new frame (the newest frame wins: one running, at most one waiting) and the node
publishes every output topic with that frame's header, the track's id and state on
``segmentation``. ``stop_track`` ends one or all; a timer ends the tracks that had no
confident update for ``track_timeout`` seconds while no frame comes. Each end is logged and
published on ``segmentation`` (``track_state: ended`` with the reason). Deactivating
stops every track.

Nothing a request or a message carries stops the node: the service and subscription
callbacks turn any unexpected exception into a logged error (and a ``success: false``
answer), transitions log why they failed, and the executor keeps spinning.
"""

from __future__ import annotations

import functools
import gc
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import message_filters
import rclpy
from builtin_interfaces.msg import Time
from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import CallbackGroup, MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNodeMixin, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from llmseg_ros.config import TrackerConfig
from llmseg_ros.msg import Segmentation
from llmseg_ros.ros.frames import FrameBuffer, format_stamp, frame_keeping_colour
from llmseg_ros.ros.gate import GatedSegmenter, ModelGate
from llmseg_ros.ros.handler import RequestError, RequestHandler, SegmentationOutcome
from llmseg_ros.ros.messages import MessageBuilder, MessageTypes, PythonArrays
from llmseg_ros.ros.outputs import FrameOutputs, build_outputs
from llmseg_ros.ros.params import (
    DESCRIPTIONS,
    INPUTS,
    NodeSettings,
    check_overrides,
    default_parameters,
    handler_settings,
    split_parameters,
)
from llmseg_ros.ros.precompute import BackgroundPrecomputer
from llmseg_ros.ros.track_service import (
    LiveTracks,
    ModelCall,
    TrackMessage,
    parse_stop_request,
    parse_track_request,
)
from llmseg_ros.ros.tracks import TrackStep, TrackWorker
from llmseg_ros.srv import ReasonSegment, StopTrack

NODE_NAME = "llmseg_perception"
# Executor threads: a request holds one while its model call runs (up to request_timeout),
# so the lifecycle and parameter services, the camera callbacks and further requests
# need spare ones.
EXECUTOR_THREADS = 8
# Longest wait for a running model call when the process exits (Ctrl-C) before the
# models are freed; the process exits anyway once the call ends.
EXIT_WAIT_S = 30.0


class TransitionCallbackGroup(CallbackGroup):
    """The lifecycle services' callback group: one ``change_state`` at a time, the rest at any time.

    rclpy puts the lifecycle services into the node's default (mutually exclusive) group,
    next to the parameter services, so while ``configure`` loads the models neither
    ``ros2 lifecycle get`` nor ``ros2 param`` would get an answer. In this group only the
    ``change_state`` service excludes itself; ``get_state`` and the other queries run
    beside it, and the parameter services stay in the (idle) default group.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._transition_running = False

    @staticmethod
    def _is_transition(entity: Any) -> bool:
        return getattr(entity, "srv_type", None) is ChangeState

    def can_execute(self, entity: Any) -> bool:
        with self._lock:
            return not (self._is_transition(entity) and self._transition_running)

    def beginning_execution(self, entity: Any) -> bool:
        if not self._is_transition(entity):
            return True
        with self._lock:
            if self._transition_running:
                return False
            self._transition_running = True
            return True

    def ending_execution(self, entity: Any) -> None:
        if self._is_transition(entity):
            with self._lock:
                self._transition_running = False


Transition = Callable[[Any, LifecycleState], TransitionCallbackReturn]


def _logged(name: str) -> Callable[[Transition], Transition]:
    """Log (with the traceback) an exception escaping a transition callback, then report ERROR.

    rclpy turns such an exception into the ERROR outcome without a word.
    """

    def wrap(callback: Transition) -> Transition:
        @functools.wraps(callback)
        def run(self: PerceptionNode, state: LifecycleState) -> TransitionCallbackReturn:
            try:
                return callback(self, state)
            except Exception as exc:
                self.get_logger().error(
                    f"{name} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}"
                )
                return TransitionCallbackReturn.ERROR

        return run

    return wrap


class PerceptionNode(LifecycleNodeMixin, Node):
    """Lifecycle node serving ``reason_segment`` and publishing the answers.

    Built like ``rclpy.lifecycle.LifecycleNode`` (the same two bases), but with its
    lifecycle services in a :class:`TransitionCallbackGroup`.
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        Node.__init__(self, node_name, **kwargs)
        LifecycleNodeMixin.__init__(
            self, enable_communication_interface=True, callback_group=TransitionCallbackGroup()
        )
        self._unknown_parameters = self._declare_parameters()
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
        self._gate = ModelGate()
        self._settings = NodeSettings()
        self._segmenter: Any = None
        self._buffer: FrameBuffer | None = None
        self._handler: RequestHandler | None = None
        self._precompute: BackgroundPrecomputer | None = None
        self._tracks: LiveTracks | None = None
        self._track_worker: TrackWorker | None = None
        self._subscriptions_: list[Any] = []
        self._sync: Any = None
        self._service: Any = None
        self._stop_service: Any = None
        self._track_timer: Any = None
        self._pubs: dict[str, Any] = {}
        self.get_logger().info("created; waiting for the lifecycle 'configure' transition")

    def _declare_parameters(self) -> dict[str, Any]:
        """Declare every parameter (with its description); report start-up values that do not fit.

        A value of the wrong type would make ``declare_parameter`` raise and the process
        die before the lifecycle starts; a misspelled name would be ignored. Both are
        logged here, and ``configure`` fails on them until they are fixed. An integer
        given for a floating-point parameter is taken as that number.

        Returns:
            The start-up values whose names this node does not declare.
        """
        # rclpy keeps the start-up values (parameters files, -p) in Node._parameter_overrides
        # (Humble to Rolling); there is no public accessor.
        overrides = {name: p.value for name, p in getattr(self, "_parameter_overrides", {}).items()}
        check = check_overrides(
            overrides,
            [name for name in overrides if self.has_parameter(name)],
            self.get_fully_qualified_name(),
        )
        for name, default in default_parameters().items():
            descriptor = ParameterDescriptor(description=DESCRIPTIONS[name])
            if name in check.coerced:
                self.declare_parameter(name, check.coerced[name], descriptor, ignore_override=True)
            elif name in check.mistyped:
                descriptor.dynamic_typing = True  # keeps the given value, so that configure names it
                self.declare_parameter(name, default, descriptor)
            else:
                self.declare_parameter(name, default, descriptor)
        for problem in check.problems():
            self.get_logger().error(problem)
        return {name: overrides[name] for name in check.unknown}

    # -- lifecycle ---------------------------------------------------------------------
    @_logged("configure")
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            values: dict[str, Any] = {name: self.get_parameter(name).value for name in default_parameters()}
            config, settings = split_parameters({**values, **self._unknown_parameters})
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
                GatedSegmenter(self._segmenter, self._gate),
                self._buffer,
                handler_settings(config, settings, image_topic),
            )
            self._tracks = LiveTracks(
                self._segmenter,
                TrackerConfig(timeout_s=settings.track_timeout),
                max_tracks=settings.max_tracks,
                model_call=ModelCall(self._handler.model_lock, self._gate),
            )
        except Exception as exc:
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            self._teardown("configure failed")
            return TransitionCallbackReturn.FAILURE
        self._gate.open()
        self.get_logger().info(f"configured: {self._segmenter.describe()}")
        return TransitionCallbackReturn.SUCCESS

    @_logged("activate")
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._segmenter.load()  # no-op unless a deactivate freed the models
        except Exception as exc:
            self.get_logger().error(f"activate failed: cannot load the models: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        self._gate.open()
        if self._settings.precompute and self._handler is not None:
            self._precompute = BackgroundPrecomputer(
                self._handler.features_for, on_error=self._precompute_failed
            )
        if self._tracks is not None:
            self._track_worker = TrackWorker(
                self._tracks.tracks, on_step=self._on_track_step, on_error=self._track_step_failed
            )
        self._active.set()
        self.get_logger().info("active: serving reason_segment and stop_track")
        return super().on_activate(state)

    @_logged("deactivate")
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        freed = self._stop_serving(
            "the node was deactivated before this request's model call started",
            wait_s=max(self._settings.request_timeout, 10.0),
        )
        self.get_logger().info("inactive: models freed" if freed else "inactive")
        return super().on_deactivate(state)

    @_logged("cleanup")
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown("the node was cleaned up")
        self.get_logger().info("cleaned up")
        return TransitionCallbackReturn.SUCCESS

    @_logged("shutdown")
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown("the node is shutting down")
        self.get_logger().info("shut down")
        return TransitionCallbackReturn.SUCCESS

    @_logged("error processing")
    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown("the node is recovering from an error")
        return TransitionCallbackReturn.SUCCESS

    def release(self) -> None:
        """Stop serving and free the models once no model call runs (called before the process exits)."""
        self._teardown("the node is shutting down", wait_s=EXIT_WAIT_S)

    def _stop_serving(self, reason: str, wait_s: float) -> bool:
        """Stop answering, wait (up to ``wait_s``) for the model call in progress, then free the models.

        Returns:
            whether the models were freed (``False`` when none were loaded, or a model
            call was still running after ``wait_s``: then they stay loaded, and a later
            ``activate`` uses them).
        """
        self._active.clear()
        precompute, self._precompute = self._precompute, None
        if precompute is not None:
            precompute.close(timeout=5.0)
        worker, self._track_worker = self._track_worker, None
        if worker is not None:
            worker.close(timeout=wait_s)
        if self._tracks is not None and len(self._tracks):
            self._publish_tracks(self._tracks.close(reason))
        idle = self._gate.close(reason, timeout=wait_s)
        if self._handler is not None:
            self._handler.clear()
        if self._buffer is not None:
            self._buffer.clear()
        if self._segmenter is None or not self._segmenter.is_loaded:
            return False
        if not idle:
            self.get_logger().error(
                f"a model call is still running after {wait_s:g} s; the models stay loaded until the next "
                "deactivate, cleanup or exit"
            )
            return False
        self._segmenter.close()
        return True

    def _teardown(self, reason: str, wait_s: float | None = None) -> None:
        self._stop_serving(reason, wait_s=self._settings.request_timeout if wait_s is None else wait_s)
        for pub in self._pubs.values():
            self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        for sub in self._subscriptions_:
            self.destroy_subscription(sub)
        self._subscriptions_ = []
        self._sync = None
        for service in (self._service, self._stop_service):
            if service is not None:
                self.destroy_service(service)
        self._service = self._stop_service = None
        if self._track_timer is not None:
            self.destroy_timer(self._track_timer)
            self._track_timer = None
        self._handler = None
        self._tracks = None
        self._segmenter = None

    # -- entities ----------------------------------------------------------------------
    @staticmethod
    def _input_qos(settings: NodeSettings, name: str) -> QoSProfile:
        reliability, depth = settings.input_qos(name)
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=depth,
            reliability=(
                ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
            ),
            durability=DurabilityPolicy.VOLATILE,
        )

    def _create_entities(self, settings: NodeSettings) -> str:
        """Create subscriptions, publishers and the service; returns the resolved image topic."""
        inputs = MutuallyExclusiveCallbackGroup()
        names = INPUTS if settings.use_depth else INPUTS[:1]
        types = {"image": Image, "depth": Image, "camera_info": CameraInfo}
        if settings.use_depth:
            filters = [
                message_filters.Subscriber(
                    self,
                    types[name],
                    name,
                    qos_profile=self._input_qos(settings, name),
                    callback_group=inputs,
                )
                for name in names
            ]
            self._sync = message_filters.ApproximateTimeSynchronizer(
                filters, settings.sync_queue_size, settings.sync_slop
            )
            self._sync.registerCallback(self._on_frame)
            self._subscriptions_ = [f.sub for f in filters]
        else:
            self._subscriptions_ = [
                self.create_subscription(
                    Image, "image", self._on_frame, self._input_qos(settings, "image"), callback_group=inputs
                )
            ]
        described = []
        for name, sub in zip(names, self._subscriptions_):
            reliability, depth = settings.input_qos(name)
            described.append(f"{name} '{sub.topic_name}': {reliability}, keep_last {depth}, volatile")
        self.get_logger().info(
            "input QoS in use: "
            + "; ".join(described)
            + (f" (approximate time sync, slop {settings.sync_slop:g} s)" if settings.use_depth else "")
            + ". A best_effort subscription matches best-effort and reliable publishers; a reliable one only "
            "reliable publishers. Outputs are reliable, keep_last 1, volatile."
        )
        qos_out = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
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
        services = ReentrantCallbackGroup()
        self._service = self.create_service(
            ReasonSegment, "reason_segment", self._on_request, callback_group=services
        )
        self._stop_service = self.create_service(
            StopTrack, "stop_track", self._on_stop_track, callback_group=services
        )
        # Ends the tracks that time out while no frame comes (frames end them themselves).
        self._track_timer = self.create_timer(
            max(0.05, min(0.5, settings.track_timeout / 5)),
            self._expire_tracks,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        return str(self._subscriptions_[0].topic_name)

    # -- callbacks ---------------------------------------------------------------------
    def _on_frame(
        self, image: Image, depth: Image | None = None, camera_info: CameraInfo | None = None
    ) -> None:
        try:
            self._add_frame(image, depth, camera_info)
        except Exception as exc:  # a camera message must never take the node down
            self.get_logger().error(
                f"dropped a frame after an unexpected {type(exc).__name__}: {exc}\n"
                f"{traceback.format_exc().rstrip()}",
                throttle_duration_sec=5.0,
            )

    def _add_frame(self, image: Image, depth: Image | None, camera_info: CameraInfo | None) -> None:
        buffer, precompute = self._buffer, self._precompute
        tracks, worker = self._tracks, self._track_worker
        if not self._active.is_set() or buffer is None:
            return
        try:
            frame, depth_problem = frame_keeping_colour(image, depth, camera_info)
        except (ValueError, TypeError) as exc:
            self.get_logger().warning(f"dropped a frame: {exc}", throttle_duration_sec=5.0)
            return
        if depth_problem is not None:
            self.get_logger().warning(
                f"frame {format_stamp(frame.stamp_ns)}: its depth is not used ({depth_problem}); its answers "
                "have mask, segmentation and overlay but no masked_depth or points",
                throttle_duration_sec=5.0,
            )
        buffer.add(frame)
        if precompute is not None:
            precompute.submit(frame)
        if tracks is not None:
            tracks.observe(frame, self.get_clock().now().nanoseconds)
            if worker is not None:
                worker.submit(frame)  # never waits: a newer frame replaces the waiting one

    def _on_request(self, request: ReasonSegment.Request, response: ReasonSegment.Response) -> Any:
        try:
            return self._answer(request)
        except Exception as exc:  # a request must never take the node down
            response.success, response.message = False, self._unexpected("reason_segment", "answering", exc)
            return response

    def _unexpected(self, service: str, doing: str, exc: Exception) -> str:
        """Log an unexpected exception of a service callback; the message for its response."""
        self.get_logger().error(
            f"{service}: unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc().rstrip()}"
        )
        return f"internal error while {doing}: {type(exc).__name__}: {exc}; the node keeps serving"

    def _not_active(self) -> str:
        return f"node is not active; activate it with: ros2 lifecycle set {self.get_fully_qualified_name()} activate"

    def _answer(self, request: ReasonSegment.Request) -> Any:
        handler, tracks = self._handler, self._tracks
        if not self._active.is_set() or handler is None or tracks is None:
            return self._builder.response(SegmentationOutcome(False, self._not_active()), None, None)
        try:
            track = parse_track_request(request)
            if track.track:
                tracks.check_start(track)
        except RequestError as exc:
            self.get_logger().info(f"request failed: {exc}")
            return self._builder.response(SegmentationOutcome(False, str(exc)), None, None)
        outcome = handler.handle(request)
        if outcome.success and track.track and outcome.frame is not None:
            features = handler.features_for(outcome.frame)[0] if handler.has_features(outcome.frame) else None
            try:
                outcome = tracks.start(outcome, track, features, now_ns=self.get_clock().now().nanoseconds)
            except RequestError as exc:
                outcome.success = False
                outcome.message = f"{exc} (the answer was: {outcome.message})"
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

    def _on_stop_track(self, request: StopTrack.Request, response: StopTrack.Response) -> Any:
        try:
            tracks = self._tracks
            if not self._active.is_set() or tracks is None:
                response.success, response.message = False, self._not_active()
                return response
            try:
                stop = tracks.stop(parse_stop_request(request))
            except RequestError as exc:
                response.success, response.message = False, str(exc)
                return response
            self._publish_tracks(stop.messages)
            response.success, response.message, response.stopped = stop.success, stop.message, stop.stopped
        except Exception as exc:  # a request must never take the node down
            response.success, response.message = False, self._unexpected("stop_track", "stopping", exc)
        return response

    def _on_track_step(self, step: TrackStep) -> None:
        tracks = self._tracks
        if tracks is not None:
            self._publish_tracks(tracks.messages(step))

    def _expire_tracks(self) -> None:
        tracks = self._tracks
        if tracks is None or not len(tracks):
            return
        try:
            self._publish_tracks(tracks.expire(self.get_clock().now().nanoseconds))
        except Exception as exc:  # a timer must never take the node down
            self.get_logger().error(
                f"track timeout check failed: {type(exc).__name__}: {exc}", throttle_duration_sec=5.0
            )

    def _publish_tracks(self, messages: list[TrackMessage]) -> None:
        """Publish each track's frame answer (every topic) or end (``segmentation``); log the ends."""
        for m in messages:
            if m.ended:
                self.get_logger().info(m.log_line())
            try:
                if m.has_frame:
                    self._publish(m.outcome, build_outputs(m.outcome, overlay=self._settings.publish_overlay))
                else:
                    self._pubs["segmentation"].publish(self._builder.segmentation(m.outcome, None, m.header))
            except Exception as exc:  # publishing must never take the node down
                self.get_logger().error(
                    f"could not publish track {m.outcome.track_id}: {type(exc).__name__}: {exc}",
                    throttle_duration_sec=5.0,
                )

    def _track_step_failed(self, frame: Any, exc: BaseException) -> None:
        self.get_logger().warning(
            f"tracking failed on frame {frame.stamp_ns}: {type(exc).__name__}: {exc}",
            throttle_duration_sec=5.0,
        )

    def _publish(self, outcome: SegmentationOutcome, outputs: FrameOutputs) -> None:
        b = self._builder
        pubs = self._pubs
        pubs["mask"].publish(b.image(outputs.mask, outputs.header))
        pubs["segmentation"].publish(b.segmentation(outcome, outputs.mask))
        if outputs.overlay is not None and self._settings.publish_overlay:
            pubs["overlay"].publish(b.image(outputs.overlay, outputs.header))
        if outputs.masked_depth is not None:
            pubs["masked_depth"].publish(b.image(outputs.masked_depth, outputs.depth_header))
            pubs["camera_info"].publish(outputs.camera_info)
        if outputs.cloud is not None and outputs.depth_header is not None:
            pubs["points"].publish(b.point_cloud(outputs.cloud, outputs.depth_header))
        for warning in outputs.warnings:
            self.get_logger().warning(warning, throttle_duration_sec=5.0)

    def _precompute_failed(self, frame: Any, exc: BaseException) -> None:
        self.get_logger().warning(
            f"background precompute failed for frame {frame.stamp_ns}: {type(exc).__name__}: {exc}",
            throttle_duration_sec=5.0,
        )


def spin(executor: MultiThreadedExecutor, node: Node) -> None:
    """Spin until the context shuts down; an exception escaping a callback is logged, not fatal.

    (rclpy's executor re-raises such an exception from ``spin()``, which would end the
    process.) Ctrl-C (``KeyboardInterrupt``) and an external shutdown still end it.
    """
    while rclpy.ok(context=executor.context):
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            raise
        except Exception as exc:
            node.get_logger().error(
                f"a callback raised {type(exc).__name__}: {exc}; the node keeps running\n"
                f"{traceback.format_exc().rstrip()}",
                throttle_duration_sec=5.0,
            )


def _uninterrupted(step: Callable[[], Any]) -> None:
    """Run one step of the exit; a further Ctrl-C does not cut it short (the step runs again)."""
    while True:
        try:
            step()
            return
        except KeyboardInterrupt:
            continue


def main(args: list[str] | None = None) -> int:
    """Run the node with a multi-threaded executor until shutdown (Ctrl-C); exit code 0."""
    rclpy.init(args=args)
    node = PerceptionNode()
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    try:
        spin(executor, node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # Under `ros2 launch`, Ctrl-C reaches the node twice (from the terminal, and
        # forwarded by launch): the second must not cut the orderly exit short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for step in (node.release, executor.shutdown, node.destroy_node, rclpy.try_shutdown):
            _uninterrupted(step)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rclpy.try_shutdown restores the previous handler
        # The process ends now: spare the interpreter's final garbage collection passes over
        # every object torch and transformers created (seconds; launch sends SIGTERM 5 s
        # after SIGINT).
        gc.freeze()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
