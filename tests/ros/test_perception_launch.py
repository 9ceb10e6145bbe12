"""launch_testing test of the launched perception node (tiny random models).

Launches ``perception.launch.py`` (namespace, remapped camera topics, depth on, tiny
profile), waits until the lifecycle node is active, publishes synchronised colour + depth
+ CameraInfo frames, calls ``reason_segment`` (a bad request, then a good one), checks
that every output topic carries the source header, and after shutdown that the node
exited cleanly.

Runs where ROS 2 is installed and the package is built (``colcon test``, or
``launch_test tests/ros/test_perception_launch.py``); skipped elsewhere.
"""

from __future__ import annotations

import array
import os
import time
import unittest
from typing import Any

import numpy as np
import pytest

REASON = (
    "needs a ROS 2 installation with the llmseg_ros package built (colcon build; source install/setup.bash)"
)
for _module in ("rclpy", "launch_testing", "launch_ros", "llmseg_ros.srv"):
    pytest.importorskip(_module, reason=f"{_module} is not importable: {REASON}")

import launch_testing  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import rclpy  # noqa: E402
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description import LaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from llmseg_ros.msg import Segmentation  # noqa: E402
from llmseg_ros.srv import ReasonSegment  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

NS = "/llmseg_test"
COLOUR, DEPTH, INFO = "/test_cam/color/image_raw", "/test_cam/depth/image_raw", "/test_cam/depth/camera_info"
H, W = 48, 64
STARTUP_TIMEOUT = 600.0  # the first start builds the tiny models


@pytest.mark.launch_test
def generate_test_description() -> tuple[LaunchDescription, dict]:
    launch_file = os.path.join(get_package_share_directory("llmseg_ros"), "launch", "perception.launch.py")
    perception = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(launch_file),
        launch_arguments={
            "namespace": NS.strip("/"),
            "image_topic": COLOUR,
            "depth_topic": DEPTH,
            "camera_info_topic": INFO,
            "use_depth": "true",
            "device": "cpu",
            "profile": "tiny",
        }.items(),
    )
    return LaunchDescription([perception, launch_testing.actions.ReadyToTest()]), {}


def _stamp(ns: int) -> object:
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _frame(stamp_ns: int) -> tuple[Image, Image, CameraInfo]:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (200, 40, 40)
    rgb[:, W // 2 :] = (40, 40, 200)
    colour = Image(height=H, width=W, encoding="rgb8", is_bigendian=0, step=3 * W)
    colour.header.stamp, colour.header.frame_id = _stamp(stamp_ns), "test_color_optical"
    colour.data = array.array("B", rgb.tobytes())
    depth_mm = np.full((H, W), 1500, np.uint16)
    depth = Image(height=H, width=W, encoding="16UC1", is_bigendian=0, step=2 * W)
    depth.header.stamp, depth.header.frame_id = _stamp(stamp_ns), "test_color_optical"
    depth.data = array.array("B", depth_mm.astype("<u2").tobytes())
    info = CameraInfo(height=H, width=W, distortion_model="plumb_bob")
    info.header = depth.header
    info.k = [50.0, 0.0, W / 2 - 0.5, 0.0, 50.0, H / 2 - 0.5, 0.0, 0.0, 1.0]
    return colour, depth, info


class TestPerceptionNode(unittest.TestCase):
    node: Any

    @classmethod
    def setUpClass(cls) -> None:
        rclpy.init()
        cls.node = rclpy.create_node("llmseg_launch_test_client")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.node.destroy_node()
        rclpy.shutdown()

    def _call(
        self, client: object, request: ReasonSegment.Request, timeout: float = 120.0
    ) -> ReasonSegment.Response:
        future = client.call_async(request)  # type: ignore[attr-defined]
        rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        self.assertTrue(future.done(), "reason_segment did not answer in time")
        return future.result()

    def test_node_serves_requests_and_publishes_with_the_source_header(self, proc_output: object) -> None:
        proc_output.assertWaitFor("active: serving reason_segment", timeout=STARTUP_TIMEOUT)  # type: ignore[attr-defined]
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        pubs = [
            self.node.create_publisher(t, name, qos)
            for t, name in ((Image, COLOUR), (Image, DEPTH), (CameraInfo, INFO))
        ]
        received: dict[str, list] = {}
        for msg_type, name in (
            (Image, "mask"),
            (Segmentation, "segmentation"),
            (Image, "masked_depth"),
            (CameraInfo, "masked_depth/camera_info"),
            (PointCloud2, "points"),
            (Image, "overlay"),
        ):
            self.node.create_subscription(
                msg_type, f"{NS}/{name}", lambda m, key=name: received.setdefault(key, []).append(m), qos
            )
        client = self.node.create_client(ReasonSegment, f"{NS}/reason_segment")
        self.assertTrue(client.wait_for_service(timeout_sec=60.0), f"{NS}/reason_segment is not available")

        request = ReasonSegment.Request()
        request.instruction = "where can I put the dirty dishes?"
        early = self._call(client, request)
        self.assertFalse(early.success)
        self.assertIn("no image received yet", early.message)

        stamps = [1_700_000_000_000_000_000 + i * 100_000_000 for i in range(5)]
        deadline = time.monotonic() + 10.0
        sent = 0
        while time.monotonic() < deadline and sent < len(stamps):
            for pub, msg in zip(pubs, _frame(stamps[sent])):
                pub.publish(msg)
            sent += 1
            rclpy.spin_once(self.node, timeout_sec=0.2)

        empty = ReasonSegment.Request()
        empty.instruction = "   "
        bad = self._call(client, empty)
        self.assertFalse(bad.success)
        self.assertIn("instruction is empty", bad.message)

        request.return_overlay = True
        response = self._call(client, request, timeout=300.0)
        self.assertTrue(response.success, response.message)
        stamp_ns = response.frame_stamp.sec * 1_000_000_000 + response.frame_stamp.nanosec
        self.assertIn(stamp_ns, stamps)
        self.assertEqual((response.mask.height, response.mask.width, response.mask.encoding), (H, W, "mono8"))
        self.assertEqual(response.mask.header.frame_id, "test_color_optical")
        self.assertEqual(response.overlay.encoding, "bgr8")
        self.assertEqual(len(response.stage_names), len(response.stage_seconds))

        deadline = time.monotonic() + 30.0
        wanted = {"mask", "segmentation", "masked_depth", "masked_depth/camera_info", "points", "overlay"}
        while time.monotonic() < deadline and not wanted <= set(received):
            rclpy.spin_once(self.node, timeout_sec=0.1)
        self.assertLessEqual(wanted, set(received), f"topics received: {sorted(received)}")
        for key in ("mask", "segmentation", "masked_depth", "points", "overlay"):
            header = received[key][-1].header
            self.assertEqual(header.stamp.sec * 1_000_000_000 + header.stamp.nanosec, stamp_ns, key)
            self.assertEqual(header.frame_id, "test_color_optical", key)
        self.assertEqual(received["segmentation"][-1].instruction, request.instruction)
        mask = np.frombuffer(bytes(received["mask"][-1].data), np.uint8)
        points = received["points"][-1]
        self.assertEqual(points.width, int((mask == 255).sum()))  # every masked pixel has depth


@launch_testing.post_shutdown_test()
class TestPerceptionNodeShutdown(unittest.TestCase):
    def test_exit_code(self, proc_info: object) -> None:
        launch_testing.asserts.assertExitCodes(proc_info)
