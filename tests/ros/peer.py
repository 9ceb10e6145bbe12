"""A ROS 2 peer process for the end-to-end tests: camera, output subscribers and service client.

Runs with the built workspace's environment (rclpy and the llmseg_ros interfaces), so the
pytest process itself needs no ROS. It reads one JSON command per line on stdin and
answers each with one JSON line on stdout (``{"ok": ...}`` or ``{"error": ...}``):

    {"op": "publish", "image_topic": "/cam/image", "depth_topic": null, "info_topic": null,
     "stamps_ns": [...], "reliability": "best_effort", "size": [48, 64], "frame_id": "cam"}
        -> {"matched": {"image": 1, ...}}   publishers created once per topic and QoS
    {"op": "listen", "topics": {"mask": ["Image", "/mask"], ...}}   reliable subscribers
    {"op": "received", "keys": ["mask"], "timeout_s": 10}  -> {"mask": [summary, ...], ...}
    {"op": "call", "service": "/reason_segment", "request": {...}, "timeout_s": 60, "wait": true,
     "type": "ReasonSegment"}   (or "StopTrack")
        -> response summary, or {"id": n} with "wait": false; then {"op": "result", "id": n}
    {"op": "quit"}

Messages are summarised (header, sizes, encodings, counts) rather than sent whole. The
frames are synthetic: the left half of the colour image is red, the right half blue; the
16UC1 depth is 1.5 m except the first ``INVALID_COLUMNS`` columns (0 = no depth).
"""

from __future__ import annotations

import array
import json
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from llmseg_ros.msg import Segmentation
from llmseg_ros.srv import ReasonSegment, StopTrack
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2

NS = 1_000_000_000
INVALID_COLUMNS = 4
DEPTH_MM = 1500
TYPES = {"Image": Image, "CameraInfo": CameraInfo, "PointCloud2": PointCloud2, "Segmentation": Segmentation}
SERVICES = {"ReasonSegment": ReasonSegment, "StopTrack": StopTrack}


def stamp(ns: int) -> Time:
    return Time(sec=ns // NS, nanosec=ns % NS)


def stamp_ns(t: Any) -> int:
    return int(t.sec) * NS + int(t.nanosec)


def colour_pixels(h: int, w: int) -> np.ndarray:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 40, 40)
    rgb[:, w // 2 :] = (40, 40, 200)
    return rgb


def depth_pixels(h: int, w: int) -> np.ndarray:
    depth = np.full((h, w), DEPTH_MM, np.uint16)
    depth[:, :INVALID_COLUMNS] = 0
    return depth


def image_message(pixels: np.ndarray, encoding: str, ns: int, frame_id: str) -> Image:
    h, w = pixels.shape[:2]
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=0, step=pixels.nbytes // h)
    msg.header.stamp, msg.header.frame_id = stamp(ns), frame_id
    msg.data = array.array("B", pixels.tobytes())
    return msg


def info_message(h: int, w: int, ns: int, frame_id: str) -> CameraInfo:
    info = CameraInfo(height=h, width=w, distortion_model="plumb_bob")
    info.header.stamp, info.header.frame_id = stamp(ns), frame_id
    info.k = [50.0, 0.0, w / 2 - 0.5, 0.0, 50.0, h / 2 - 0.5, 0.0, 0.0, 1.0]
    info.p = [50.0, 0.0, w / 2 - 0.5, 0.0, 0.0, 50.0, h / 2 - 0.5, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.d = [0.0] * 5
    return info


def header_summary(header: Any) -> dict[str, Any]:
    return {"stamp_ns": stamp_ns(header.stamp), "frame_id": header.frame_id}


class Peer(Node):
    def __init__(self) -> None:
        super().__init__("llmseg_test_peer")
        self._lock = threading.Lock()
        self._publishers_: dict[tuple[str, str, str], Any] = {}
        self._clients_: dict[int, Any] = {}
        self._received: dict[str, list[dict[str, Any]]] = {}
        self._subs: dict[str, Any] = {}
        self._published_depth: dict[int, np.ndarray] = {}
        self._calls: dict[int, tuple[threading.Event, Any]] = {}

    # -- summaries ---------------------------------------------------------------------
    def image_summary(self, msg: Image) -> dict[str, Any]:
        out = {
            **header_summary(msg.header),
            "height": msg.height,
            "width": msg.width,
            "encoding": msg.encoding,
            "step": msg.step,
            "data_len": len(msg.data),
        }
        if msg.height and msg.width:
            raw = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
            if msg.encoding == "mono8":
                mask = raw[:, : msg.width] == 255
                out["selected"] = int(mask.sum())
                out["values"] = sorted({int(v) for v in np.unique(raw[:, : msg.width])})
                depth = self._published_depth.get(out["stamp_ns"])
                if depth is not None and depth.shape == mask.shape:
                    out["selected_with_depth"] = int((mask & (depth > 0)).sum())
            elif msg.encoding == "16UC1":
                values = raw[:, : 2 * msg.width].copy().view("<u2")
                out["nonzero"] = int((values > 0).sum())
                out["values"] = sorted({int(v) for v in np.unique(values)})
        return out

    def cloud_summary(self, msg: PointCloud2) -> dict[str, Any]:
        out = {
            **header_summary(msg.header),
            "height": msg.height,
            "width": msg.width,
            "fields": [[f.name, f.offset, f.datatype, f.count] for f in msg.fields],
            "point_step": msg.point_step,
            "row_step": msg.row_step,
            "is_dense": bool(msg.is_dense),
            "data_len": len(msg.data),
        }
        if msg.width and msg.point_step == 12:
            xyz = np.frombuffer(bytes(msg.data), "<f4").reshape(-1, 3)
            out["z_range"] = [float(xyz[:, 2].min()), float(xyz[:, 2].max())]
            out["finite"] = bool(np.isfinite(xyz).all())
        return out

    def summary(self, msg: Any) -> dict[str, Any]:
        if isinstance(msg, Image):
            return self.image_summary(msg)
        if isinstance(msg, PointCloud2):
            return self.cloud_summary(msg)
        if isinstance(msg, CameraInfo):
            return {**header_summary(msg.header), "height": msg.height, "width": msg.width, "k": list(msg.k)}
        if isinstance(msg, Segmentation):
            return {
                **header_summary(msg.header),
                "instruction": msg.instruction,
                "conversation_id": msg.conversation_id,
                "mask": self.image_summary(msg.mask),
                "selected": list(msg.selected),
                "num_proposals": msg.num_proposals,
                "method": msg.method,
                "stage_names": list(msg.stage_names),
                "track_id": msg.track_id,
                "track_state": msg.track_state,
                "track_reason": msg.track_reason,
            }
        raise TypeError(type(msg).__name__)

    def response_summary(self, r: Any) -> dict[str, Any]:
        if isinstance(r, StopTrack.Response):
            return {"success": bool(r.success), "message": r.message, "stopped": list(r.stopped)}
        return {
            "success": bool(r.success),
            "message": r.message,
            "mask": self.image_summary(r.mask),
            "frame_stamp_ns": stamp_ns(r.frame_stamp),
            "selected": list(r.selected),
            "selected_similarity": [float(v) for v in r.selected_similarity],
            "selected_iop": [float(v) for v in r.selected_iop],
            "num_proposals": r.num_proposals,
            "confidence": float(r.confidence),
            "method": r.method,
            "answer": r.answer,
            "stage_names": list(r.stage_names),
            "stage_seconds": [float(v) for v in r.stage_seconds],
            "overlay": self.image_summary(r.overlay),
            "track_id": r.track_id,
        }

    # -- operations --------------------------------------------------------------------
    def _publisher(self, msg_type: Any, topic: str, reliability: str) -> Any:
        key = (msg_type.__name__, topic, reliability)
        if key not in self._publishers_:
            qos = QoSProfile(
                history=HistoryPolicy.KEEP_LAST,
                depth=10,
                reliability=(
                    ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
                ),
                durability=DurabilityPolicy.VOLATILE,
            )
            self._publishers_[key] = self.create_publisher(msg_type, topic, qos)
        return self._publishers_[key]

    def op_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        h, w = args.get("size", [48, 64])
        frame_id = args.get("frame_id", "test_color_optical")
        reliability = args.get("reliability", "best_effort")
        pubs = {"image": (self._publisher(Image, args["image_topic"], reliability), None)}
        if args.get("depth_topic"):
            pubs["depth"] = (self._publisher(Image, args["depth_topic"], reliability), None)
            pubs["info"] = (self._publisher(CameraInfo, args["info_topic"], reliability), None)
        deadline = time.monotonic() + float(args.get("wait_match_s", 5.0))
        while time.monotonic() < deadline and not all(p.get_subscription_count() for p, _ in pubs.values()):
            time.sleep(0.05)
        matched = {key: p.get_subscription_count() for key, (p, _) in pubs.items()}
        if all(matched.values()):
            time.sleep(0.2)  # let the new match settle before best-effort samples go out
        for ns in args["stamps_ns"]:
            pubs["image"][0].publish(image_message(colour_pixels(h, w), "rgb8", ns, frame_id))
            if "depth" in pubs:
                depth = depth_pixels(h, w)
                self._published_depth[ns] = depth
                pubs["depth"][0].publish(image_message(depth, "16UC1", ns, frame_id))
                pubs["info"][0].publish(info_message(h, w, ns, frame_id))
            time.sleep(float(args.get("period_s", 0.05)))
        return {"matched": matched}

    def op_listen(self, args: dict[str, Any]) -> dict[str, Any]:
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=10,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )
        for key, (type_name, topic) in args["topics"].items():
            if key in self._subs:
                self.destroy_subscription(self._subs.pop(key))

            def store(msg: Any, key: str = key) -> None:
                summary = self.summary(msg)
                with self._lock:
                    self._received.setdefault(key, []).append(summary)

            self._subs[key] = self.create_subscription(TYPES[type_name], topic, store, qos)
        deadline = time.monotonic() + float(args.get("wait_match_s", 5.0))
        topics = {key: topic for key, (_, topic) in args["topics"].items()}
        while time.monotonic() < deadline and not all(self.count_publishers(t) for t in topics.values()):
            time.sleep(0.05)
        return {key: self.count_publishers(topic) for key, topic in topics.items()}

    def op_received(self, args: dict[str, Any]) -> dict[str, Any]:
        keys = args["keys"]
        minimum = int(args.get("min", 1))
        deadline = time.monotonic() + float(args.get("timeout_s", 10.0))
        while True:
            with self._lock:
                got = {k: list(self._received.get(k, [])) for k in keys}
            if all(len(v) >= minimum for v in got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def op_clear(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._received.clear()
        return {}

    def _request(self, fields: dict[str, Any], service_type: Any = ReasonSegment) -> Any:
        request = service_type.Request()
        for name, value in fields.items():
            if name == "stamp_ns":
                request.stamp = stamp(int(value))
            elif name == "image":
                h, w = value.get("size", [48, 64])
                request.image = image_message(
                    colour_pixels(h, w), "rgb8", 0, value.get("frame_id", "request")
                )
            else:
                setattr(request, name, value)
        return request

    def op_call(self, args: dict[str, Any]) -> dict[str, Any]:
        # A client per call: a client that outlived a restarted server may never hear its answer.
        service = args["service"]
        service_type = SERVICES[args.get("type", "ReasonSegment")]
        client = self.create_client(service_type, service)
        if not client.wait_for_service(timeout_sec=float(args.get("wait_service_s", 30.0))):
            self.destroy_client(client)
            raise RuntimeError(f"service {service} is not available")
        done = threading.Event()
        future = client.call_async(self._request(args.get("request", {}), service_type))
        future.add_done_callback(lambda _: done.set())
        call_id = len(self._calls) + 1
        self._calls[call_id] = (done, future)
        self._clients_[call_id] = client
        if not args.get("wait", True):
            return {"id": call_id}
        return self.op_result({"id": call_id, "timeout_s": args.get("timeout_s", 60.0)})

    def op_result(self, args: dict[str, Any]) -> dict[str, Any]:
        call_id = int(args["id"])
        done, future = self._calls[call_id]
        if not done.wait(float(args.get("timeout_s", 60.0))):
            return {"answered": False}
        self.destroy_client(self._clients_.pop(call_id))
        return {"answered": True, **self.response_summary(future.result())}


def main() -> int:
    rclpy.init()
    peer = Peer()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(peer)
    threading.Thread(target=executor.spin, daemon=True).start()
    print(json.dumps({"ok": {"ready": True}}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            op = command.pop("op")
            if op == "quit":
                print(json.dumps({"ok": {}}), flush=True)
                break
            try:
                answer = {"ok": getattr(peer, f"op_{op}")(command)}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(json.dumps(answer), flush=True)
    finally:
        executor.shutdown()
        peer.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
