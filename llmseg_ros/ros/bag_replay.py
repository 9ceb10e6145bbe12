"""Replay a recorded rosbag2 through the segmenter, without ROS 2 (``rosbags``).

Reads a sqlite3 or MCAP rosbag2 with a colour image topic (optionally a registered depth
image and its CameraInfo), answers the scheduled instruction on the scheduled frames with
the node's own request handling, and writes a NEW bag holding every input message
unchanged plus the node's output topics for each answered frame:

    <ns>/mask                       sensor_msgs/Image mono8 (colour header)
    <ns>/segmentation               llmseg_ros/msg/Segmentation (colour header)
    <ns>/overlay                    sensor_msgs/Image bgr8 (colour header)
    <ns>/masked_depth               sensor_msgs/Image 16UC1 / 32FC1 (depth header)
    <ns>/masked_depth/camera_info   sensor_msgs/CameraInfo (the matched input message)
    <ns>/points                     sensor_msgs/PointCloud2 XYZ float32 (depth header)

Tracks (``track: true`` in the schedule): from the frame a track starts on, every later
colour frame is answered for each live track (the node's :mod:`~llmseg_ros.ros.track_service`,
run synchronously: no frame is dropped), written with the same topics and the track's id and
state on ``segmentation``; its end is written on ``segmentation`` too.

Output messages carry the input frame's headers and the colour message's log time. The
bag is written into a staging folder next to the destination and renamed into place when
complete; a malformed input bag is refused with a ``ValueError`` naming it (see
:mod:`llmseg_ros.ros.bag_files`). The schedule format is described in
:mod:`llmseg_ros.ros.schedule`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final, Literal

from llmseg_ros.config import TrackerConfig
from llmseg_ros.ros.bag_files import (
    STORAGES,
    OutputStaging,
    check_output_path,
    deserialize,
    detect_storage,
    open_bag,
    read_messages,
)
from llmseg_ros.ros.frames import NS_PER_S, FrameBuffer, format_stamp, frame_keeping_colour, stamp_to_ns
from llmseg_ros.ros.handler import (
    HandlerSettings,
    RequestError,
    RequestHandler,
    SegmentationOutcome,
    Segmenter,
)
from llmseg_ros.ros.messages import MessageBuilder, MessageTypes, NumpyArrays
from llmseg_ros.ros.outputs import build_outputs
from llmseg_ros.ros.schedule import ReplaySchedule, TimedInstruction, finite_seconds
from llmseg_ros.ros.track_service import LiveTracks, TrackMessage, TrackRequest

# Field lines of msg/Segmentation.msg without comments (a test checks they match the file),
# so that replay works from a pip install, where msg/ is not shipped.
SEGMENTATION_MSGTYPE = "llmseg_ros/msg/Segmentation"
SEGMENTATION_MSG = """\
std_msgs/Header header
string instruction
string conversation_id
sensor_msgs/Image mask
int32[] selected
float32[] selected_similarity
float32[] selected_iop
int32 num_proposals
float32 confidence
string method
string answer
string[] stage_names
float64[] stage_seconds
string track_id
string track_state
string track_reason
"""
IMAGE = "sensor_msgs/msg/Image"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
POINT_CLOUD = "sensor_msgs/msg/PointCloud2"
BAG_VERSION: Final[Literal[8]] = 8  # rosbag2 metadata version written (9 is readable by Jazzy and newer only)


@dataclass
class ReplayTopics:
    """Input topics: colour image, and optionally the registered depth image and its CameraInfo."""

    image: str
    depth: str | None = None
    camera_info: str | None = None

    def __post_init__(self) -> None:
        if (self.depth is None) != (self.camera_info is None):
            raise ValueError("depth and camera_info topics go together: give both or neither")


@dataclass
class ReplaySummary:
    """What a replay did.

    Attributes:
        frames: colour frames in the input.
        processed: frames answered successfully (one message per output topic each).
        failed: scheduled frames whose request failed (``messages`` says why).
        unmatched: ``at`` entries that matched no frame.
        output: the new bag.
        storage: its storage plugin.
        counts: messages written per output topic.
        messages: failure reasons, warnings and track ends.
        tracked: frames answered by a live track (each track counts once per frame).
    """

    frames: int
    processed: int
    failed: int
    unmatched: list[TimedInstruction]
    output: Path
    storage: str
    counts: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    tracked: int = 0


def output_topics(namespace: str) -> dict[str, str]:
    """Output topic per key (``mask``, ``segmentation``, ...) under an absolute namespace."""
    if not namespace.startswith("/"):
        raise ValueError(f"output namespace must be absolute (start with '/'), got {namespace!r}")
    ns = namespace.rstrip("/")
    return {
        "mask": f"{ns}/mask",
        "segmentation": f"{ns}/segmentation",
        "overlay": f"{ns}/overlay",
        "masked_depth": f"{ns}/masked_depth",
        "camera_info": f"{ns}/masked_depth/camera_info",
        "points": f"{ns}/points",
    }


def make_typestore() -> Any:
    """A ``rosbags`` typestore with the ROS 2 Humble types plus ``llmseg_ros/msg/Segmentation``."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    typestore = get_typestore(Stores.ROS2_HUMBLE)
    typestore.register(get_types_from_msg(SEGMENTATION_MSG, SEGMENTATION_MSGTYPE))
    return typestore


def message_types(typestore: Any) -> MessageTypes:
    """The ``rosbags`` message classes the builder needs."""
    t = typestore.types
    return MessageTypes(
        header=t["std_msgs/msg/Header"],
        time=t["builtin_interfaces/msg/Time"],
        image=t[IMAGE],
        point_field=t["sensor_msgs/msg/PointField"],
        point_cloud=t[POINT_CLOUD],
        segmentation=t[SEGMENTATION_MSGTYPE],
    )


def guess_topics(connections: Iterable[Any]) -> ReplayTopics:
    """The colour topic when the bag has exactly one Image topic (depth needs explicit topics)."""
    images = sorted({c.topic for c in connections if c.msgtype == IMAGE})
    if len(images) != 1:
        raise ValueError(
            f"the bag has {len(images)} sensor_msgs/msg/Image topics {images}; name the colour one with --image-topic"
            " (and --depth-topic / --camera-info-topic for depth)"
        )
    return ReplayTopics(image=images[0])


def replay_bag(
    input_path: str | Path,
    output_path: str | Path,
    schedule: ReplaySchedule,
    segmenter: Segmenter,
    topics: ReplayTopics | None = None,
    *,
    storage: str | None = None,
    output_namespace: str = "/llmseg",
    overlay: bool = True,
    sync_slop_s: float = 0.05,
    timeout_s: float = 600.0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ReplaySummary:
    """Run ``segmenter`` over a bag and write a new bag with its outputs.

    Args:
        input_path: rosbag2 directory (or bare .db3 / .mcap file).
        output_path: the new bag directory (must not exist unless ``overwrite``).
        schedule: which instruction applies to which colour frame.
        segmenter: a loaded segmenter.
        topics: input topics; ``None`` = the bag's only Image topic, without depth.
        storage: ``sqlite3`` / ``mcap`` of the output; ``None`` = the input's.
        output_namespace: absolute prefix of the output topics.
        overlay: also write the bgr8 overlay topic.
        sync_slop_s: seconds between a colour stamp and its depth / CameraInfo stamps.
        timeout_s: per-frame deadline of the request handler.
        overwrite: replace an existing ``output_path``.
        progress: show a tqdm progress bar (one step per scheduled frame).
        log: receives warnings and the reason of every failed frame.
    Raises:
        ValueError: bad paths, topics, storage or settings (checked before anything is
            written), or an input bag that cannot be read (:class:`~llmseg_ros.ros.bag_files.BagError`,
            possibly after some frames; the output is then not written).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise ValueError(f"input bag {input_path} does not exist")
    finite_seconds(sync_slop_s, "sync_slop_s")
    finite_seconds(timeout_s, "timeout_s", positive=True)
    check_output_path(output_path, input_path, overwrite=overwrite)
    out_storage = storage or detect_storage(input_path)
    if out_storage not in STORAGES:
        raise ValueError(f"storage must be one of {list(STORAGES)}, got {out_storage!r}")
    with open_bag(input_path) as reader:
        replay = _Replay(
            reader,
            input_path,
            schedule,
            segmenter,
            topics,
            output_topics(output_namespace),
            sync_slop_s,
            timeout_s,
        )
        summary = ReplaySummary(replay.frames, 0, 0, replay.unmatched, output_path, out_storage)
        for entry in replay.unmatched:
            log(
                f"warning: no colour frame within {schedule.tolerance_ns / NS_PER_S:g} s of stamp "
                f"{format_stamp(entry.stamp_ns)} ({entry.instruction!r})"
            )
        staging = OutputStaging(output_path)
        with staging as staged:
            replay.run(staged, out_storage, summary, overlay=overlay, progress=progress)
            staging.commit()
    for line in summary.messages:
        log(line)
    return summary


def _nearest(sorted_stamps: list[int], stamp: int, slop_ns: int) -> int | None:
    j = bisect.bisect_left(sorted_stamps, stamp)
    near = [k for k in (j - 1, j) if 0 <= k < len(sorted_stamps)]
    if not near:
        return None
    best = min(near, key=lambda k: abs(sorted_stamps[k] - stamp))
    return sorted_stamps[best] if abs(sorted_stamps[best] - stamp) <= slop_ns else None


class _Replay:
    """One replay: scans the bag's stamps (pass 1), then copies and answers (pass 2)."""

    def __init__(
        self,
        reader: Any,
        path: Path,
        schedule: ReplaySchedule,
        segmenter: Segmenter,
        topics: ReplayTopics | None,
        out_topics: dict[str, str],
        sync_slop_s: float,
        timeout_s: float,
    ) -> None:
        self.reader = reader
        self.path = path
        self.schedule = schedule
        self.out_topics = out_topics
        self.topics = topics or guess_topics(reader.connections)
        self.typestore = make_typestore()
        self.builder = MessageBuilder(message_types(self.typestore), NumpyArrays())
        self.slop_s = sync_slop_s
        self.image_conns = self._connections(self.topics.image, IMAGE)
        self.depth_conns = self._connections(self.topics.depth, IMAGE)
        self.info_conns = self._connections(self.topics.camera_info, CAMERA_INFO)
        clash = sorted({c.topic for c in reader.connections} & set(out_topics.values()))
        if clash:
            raise ValueError(
                f"input topics {clash} clash with the output topics; choose another --output-namespace"
            )
        self.buffer = FrameBuffer(1)
        self.handler = RequestHandler(
            segmenter,
            self.buffer,
            HandlerSettings(
                max_instruction_chars=segmenter.config.max_instruction_chars,
                request_timeout_s=timeout_s,
                stamp_tolerance_s=0.0,
                image_topic=self.topics.image,
            ),
        )
        self.live: LiveTracks | None = None
        if schedule.track or any(entry.track for entry in schedule.at):
            if not callable(getattr(segmenter, "track", None)):
                raise ValueError(
                    f"the segmenter ({type(segmenter).__name__}) cannot track; remove track: true"
                )
            self.live = LiveTracks(
                segmenter,  # type: ignore[arg-type]  # checked above: it has track()
                TrackerConfig(timeout_s=schedule.track_timeout_s),
                max_tracks=max(1, len(schedule.at) + 1),
            )
        self._scan()

    def _connections(self, topic: str | None, msgtype: str) -> list[Any]:
        if topic is None:
            return []
        found = [c for c in self.reader.connections if c.topic == topic]
        if not found:
            topics = sorted({c.topic for c in self.reader.connections})
            raise ValueError(f"topic {topic!r} is not in the bag; its topics are {topics}")
        for conn in found:
            if conn.msgtype != msgtype:
                raise ValueError(f"topic {topic!r} has type {conn.msgtype}; expected {msgtype}")
        return found

    def _decode(self, conn: Any, raw: Any, log_ns: int) -> Any:
        return deserialize(self.typestore, raw, conn, log_ns, self.path)

    def _scan(self) -> None:
        """Pass 1: header stamps → scheduled frames and their depth / CameraInfo partners."""
        ids = {
            c.id: kind
            for kind, conns in (("c", self.image_conns), ("d", self.depth_conns), ("i", self.info_conns))
            for c in conns
        }
        stamps: dict[str, list[int]] = {"c": [], "d": [], "i": []}
        wanted = self.image_conns + self.depth_conns + self.info_conns
        for conn, log_ns, raw in read_messages(self.reader, self.path, wanted):
            stamps[ids[conn.id]].append(stamp_to_ns(self._decode(conn, raw, log_ns).header.stamp))
        self.colour_stamps = stamps["c"]
        self.frames = len(self.colour_stamps)
        self.plan, self.unmatched = self.schedule.plan(self.colour_stamps)
        self.track_starts = self.schedule.track_plan(self.colour_stamps)
        # frames to decode and answer: the scheduled ones, and every frame from the first track on
        first_track = min(self.track_starts, default=self.frames)
        self.needed = set(self.plan) | set(range(first_track, self.frames))
        slop_ns = round(self.slop_s * NS_PER_S)
        depth, info = sorted(stamps["d"]), sorted(stamps["i"])
        # frame index → (depth stamp, info stamp); None when the frame has no partners.
        self.partners: dict[int, tuple[int, int] | None] = {}
        # partner stamp → how many scheduled frames still need it (held until then).
        self.wanted: dict[str, dict[int, int]] = {"d": {}, "i": {}}
        for index in sorted(self.needed):
            d = _nearest(depth, self.colour_stamps[index], slop_ns) if self.depth_conns else None
            i = _nearest(info, self.colour_stamps[index], slop_ns) if self.info_conns else None
            self.partners[index] = (d, i) if d is not None and i is not None else None
            if d is not None and i is not None:
                self.wanted["d"][d] = self.wanted["d"].get(d, 0) + 1
                self.wanted["i"][i] = self.wanted["i"].get(i, 0) + 1

    def run(self, bag: Path, storage: str, summary: ReplaySummary, *, overlay: bool, progress: bool) -> None:
        """Pass 2: copy every message to ``bag``; answer each scheduled frame once its partners arrived."""
        from rosbags.rosbag2 import StoragePlugin, Writer
        from tqdm import tqdm

        kinds = {
            c.id: kind
            for kind, conns in (("c", self.image_conns), ("d", self.depth_conns), ("i", self.info_conns))
            for c in conns
        }
        held: dict[str, dict[int, Any]] = {"d": {}, "i": {}}
        pending: list[tuple[int, Any, int]] = []  # (frame index, colour message, log time)
        colour_index = -1
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        with (
            Writer(bag, version=BAG_VERSION, storage_plugin=plugin) as writer,
            tqdm(total=len(self.needed), unit="frame", desc="replay-bag", disable=not progress) as bar,
        ):
            copies = {c.id: _copy_connection(writer, c, self.typestore) for c in self.reader.connections}
            out = _OutputWriter(writer, self.typestore, self.out_topics, summary)
            for conn, log_ns, raw in read_messages(self.reader, self.path):
                writer.write(copies[conn.id], log_ns, raw)
                kind = kinds.get(conn.id)
                if kind in ("d", "i"):
                    msg = self._decode(conn, raw, log_ns)
                    stamp = stamp_to_ns(msg.header.stamp)
                    if self.wanted[kind].get(stamp, 0) > 0:
                        held[kind][stamp] = msg
                elif kind == "c":
                    colour_index += 1
                    if colour_index in self.needed:
                        pending.append((colour_index, self._decode(conn, raw, log_ns), log_ns))
                still = []
                for index, colour, colour_log_ns in pending:
                    partners = self.partners[index]
                    if partners is not None and not (partners[0] in held["d"] and partners[1] in held["i"]):
                        still.append((index, colour, colour_log_ns))
                        continue
                    depth = info = None
                    if partners is not None:
                        depth, info = held["d"][partners[0]], held["i"][partners[1]]
                        self._release(held, partners)
                    self._answer(index, colour, depth, info, colour_log_ns, out, summary, overlay)
                    bar.update(1)
                pending = still
            for index, colour, colour_log_ns in pending:  # partners never arrived: answer without depth
                self._answer(index, colour, None, None, colour_log_ns, out, summary, overlay)
                bar.update(1)

    def _release(self, held: dict[str, dict[int, Any]], partners: tuple[int, int]) -> None:
        for kind, stamp in zip(("d", "i"), partners):
            self.wanted[kind][stamp] -= 1
            if self.wanted[kind][stamp] == 0:
                del held[kind][stamp]

    def _answer(
        self,
        index: int,
        colour: Any,
        depth: Any,
        info: Any,
        log_ns: int,
        out: _OutputWriter,
        summary: ReplaySummary,
        overlay: bool,
    ) -> None:
        where = f"frame {index} ({format_stamp(self.colour_stamps[index])})"
        if self.depth_conns and depth is None:
            summary.messages.append(
                f"{where}: no depth + camera_info within {self.slop_s:g} s; answered without depth"
            )
        try:
            frame, depth_problem = frame_keeping_colour(colour, depth, info)
        except (ValueError, TypeError) as exc:
            summary.failed += 1
            summary.messages.append(f"{where}: {exc}")
            return
        if depth_problem is not None:
            summary.messages.append(f"{where}: depth not used ({depth_problem}); answered without depth")
        self.buffer.add(frame)
        if self.live is not None and len(self.live):
            for message in self.live.step(frame):
                self._write_track(message, where, log_ns, out, summary, overlay)
        if index not in self.plan:
            return
        request = SimpleNamespace(
            instruction=self.plan[index],
            image=None,
            stamp=SimpleNamespace(sec=frame.stamp_ns // NS_PER_S, nanosec=frame.stamp_ns % NS_PER_S),
            selection_strategy=self.schedule.selection_strategy,
            iop_threshold=self.schedule.iop_threshold,
            return_overlay=False,
            explain=self.schedule.explain,
            conversation_id="",
        )
        outcome = self.handler.handle(request)
        if outcome.success and self.live is not None and index in self.track_starts:
            try:
                outcome = self.live.start(outcome, TrackRequest(True, self.track_starts[index]))
            except RequestError as exc:
                outcome.success, outcome.message = False, f"{exc} (the answer was: {outcome.message})"
        if not outcome.success:
            summary.failed += 1
            summary.messages.append(f"{where}: {outcome.message}")
            return
        self._write(outcome, where, log_ns, out, summary, overlay)
        summary.processed += 1

    def _write_track(
        self,
        message: TrackMessage,
        where: str,
        log_ns: int,
        out: _OutputWriter,
        summary: ReplaySummary,
        overlay: bool,
    ) -> None:
        if message.ended:
            summary.messages.append(f"{where}: {message.log_line()}")
        if message.has_frame:
            self._write(message.outcome, where, log_ns, out, summary, overlay)
            summary.tracked += 1
        else:
            segmentation = self.builder.segmentation(message.outcome, None, message.header)
            out.write("segmentation", SEGMENTATION_MSGTYPE, segmentation, log_ns)

    def _write(
        self,
        outcome: SegmentationOutcome,
        where: str,
        log_ns: int,
        out: _OutputWriter,
        summary: ReplaySummary,
        overlay: bool,
    ) -> None:
        """Write one answer's messages (every output topic the frame allows)."""
        outputs = build_outputs(outcome, overlay=overlay)
        b = self.builder
        out.write("mask", IMAGE, b.image(outputs.mask, outputs.header), log_ns)
        out.write("segmentation", SEGMENTATION_MSGTYPE, b.segmentation(outcome, outputs.mask), log_ns)
        if outputs.overlay is not None:
            out.write("overlay", IMAGE, b.image(outputs.overlay, outputs.header), log_ns)
        if outputs.masked_depth is not None and outputs.depth_header is not None:
            out.write("masked_depth", IMAGE, b.image(outputs.masked_depth, outputs.depth_header), log_ns)
            out.write("camera_info", CAMERA_INFO, outputs.camera_info, log_ns)
            if outputs.cloud is not None:
                out.write("points", POINT_CLOUD, b.point_cloud(outputs.cloud, outputs.depth_header), log_ns)
        summary.messages.extend(f"{where}: {warning}" for warning in outputs.warnings)


class _OutputWriter:
    """Creates output connections on first use and counts what is written."""

    def __init__(self, writer: Any, typestore: Any, topics: dict[str, str], summary: ReplaySummary) -> None:
        self.writer, self.typestore, self.topics, self.summary = writer, typestore, topics, summary
        self.connections: dict[str, Any] = {}

    def write(self, key: str, msgtype: str, message: Any, log_ns: int) -> None:
        topic = self.topics[key]
        if key not in self.connections:
            self.connections[key] = self.writer.add_connection(topic, msgtype, typestore=self.typestore)
        self.writer.write(self.connections[key], log_ns, self.typestore.serialize_cdr(message, msgtype))
        self.summary.counts[topic] = self.summary.counts.get(topic, 0) + 1


def _copy_connection(writer: Any, conn: Any, typestore: Any) -> Any:
    """Add an output connection identical to an input one (definition, hash, QoS, format)."""
    msgdef = conn.msgdef.data if conn.msgdef is not None and conn.msgdef.data else None
    digest = conn.digest or None
    kwargs: dict[str, Any] = {
        "serialization_format": getattr(conn.ext, "serialization_format", "cdr"),
        "offered_qos_profiles": getattr(conn.ext, "offered_qos_profiles", None) or [],
    }
    if msgdef is not None and digest is not None:
        return writer.add_connection(conn.topic, conn.msgtype, msgdef=msgdef, rihs01=digest, **kwargs)
    if conn.msgtype not in typestore.types:
        raise ValueError(
            f"topic {conn.topic!r} ({conn.msgtype}) has no message definition in the input bag and is not a ROS 2"
            " Humble type; cannot copy it"
        )
    return writer.add_connection(conn.topic, conn.msgtype, typestore=typestore, **kwargs)
