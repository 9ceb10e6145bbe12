"""llmseg replay-bag on rosbag2 files the tests write (colour + depth + camera_info; sqlite3 and MCAP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from ros_testing import FakeSegmenter, camera_info_msg, colour_image, image_msg

from llmseg_ros.ros.bag_replay import ReplayTopics, detect_storage, replay_bag
from llmseg_ros.ros.frames import stamp_to_ns
from llmseg_ros.ros.images import image_to_numpy
from llmseg_ros.ros.schedule import ReplaySchedule

S = 1_000_000_000
T0 = 100 * S
COLOUR, DEPTH, INFO, CHATTER = (
    "/camera/color/image_raw",
    "/camera/depth/image_raw",
    "/camera/depth/camera_info",
    "/chatter",
)
TOPICS = ReplayTopics(COLOUR, DEPTH, INFO)
H, W = 24, 32


def colour_stamp(i: int) -> int:
    return T0 + i * 100_000_000


def depth_mm(i: int) -> np.ndarray:
    depth = np.full((H, W), 800 + 10 * i, np.uint16)
    depth[0, :] = 0  # no reading on the first row
    return depth


def write_bag(path: Path, storage: str, frames: int = 6, with_depth: bool = True) -> Path:
    """A recording as a camera driver writes it; depth arrives before colour on even frames, after on odd."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    messages = []
    for i in range(frames):
        t = colour_stamp(i)
        messages.append(
            (
                t + 10_000_000,
                COLOUR,
                "sensor_msgs/msg/Image",
                image_msg(colour_image(H, W, seed=i), "rgb8", t, "color_optical"),
            )
        )
        if with_depth:
            log = t + (5_000_000 if i % 2 == 0 else 30_000_000)
            d = t + 2_000_000
            messages.append(
                (log, DEPTH, "sensor_msgs/msg/Image", image_msg(depth_mm(i), "16UC1", d, "depth_optical"))
            )
            info = camera_info_msg((40.0, 40.0, 15.5, 11.5), W, H, d, "depth_optical")
            messages.append((log + 1, INFO, "sensor_msgs/msg/CameraInfo", info))
        chatter = store.types["std_msgs/msg/String"](data=f"tick {i}")
        messages.append((t + 1, CHATTER, "std_msgs/msg/String", chatter))
    with Writer(path, version=8, storage_plugin=plugin) as writer:
        conns = {}
        for log, topic, msgtype, msg in sorted(messages, key=lambda m: m[0]):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(conns[topic], log, store.serialize_cdr(msg, msgtype))
    return path


def read_bag(path: Path) -> dict[str, list[tuple[int, Any, bytes]]]:
    """topic → [(log time, message, raw)] read back with rosbags (definitions from the bag itself)."""
    from rosbags.highlevel import AnyReader

    out: dict[str, list[tuple[int, Any, bytes]]] = {}
    with AnyReader([path]) as reader:
        for conn, log, raw in reader.messages():
            out.setdefault(conn.topic, []).append((log, reader.deserialize(raw, conn.msgtype), bytes(raw)))
    return out


def schedule(text: str) -> ReplaySchedule:
    return ReplaySchedule.from_mapping(yaml.safe_load(text))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_replay_every_second_frame_with_depth(tmp_path: Path, storage: str) -> None:
    bag = write_bag(tmp_path / "in", storage)
    logs: list[str] = []
    summary = replay_bag(
        bag, tmp_path / "out", schedule("instruction: the red things\nevery_n: 2"), FakeSegmenter(), TOPICS,
        progress=False, log=logs.append,
    )  # fmt: skip
    assert (summary.frames, summary.processed, summary.failed, summary.storage) == (6, 3, 0, storage)
    assert detect_storage(tmp_path / "out") == storage and logs == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp dir renamed and cleaned
    inputs, outputs = read_bag(bag), read_bag(tmp_path / "out")
    for topic in (COLOUR, DEPTH, INFO, CHATTER):  # inputs copied unchanged
        assert [(log, raw) for log, _, raw in outputs[topic]] == [(log, raw) for log, _, raw in inputs[topic]]
    masks = outputs["/llmseg/mask"]
    assert len(masks) == 3  # one per processed frame
    for k, (log, msg, _) in enumerate(masks):
        i = 2 * k
        assert stamp_to_ns(msg.header.stamp) == colour_stamp(i) and msg.header.frame_id == "color_optical"
        assert log == colour_stamp(i) + 10_000_000  # the colour message's log time
        assert msg.encoding == "mono8"
        np.testing.assert_array_equal(image_to_numpy(msg) == 255, colour_image(H, W, seed=i)[:, :, 0] > 150)
    for topic in (
        "/llmseg/segmentation",
        "/llmseg/overlay",
        "/llmseg/masked_depth",
        "/llmseg/masked_depth/camera_info",
        "/llmseg/points",
    ):
        assert len(outputs[topic]) == 3, topic
        assert summary.counts[topic] == 3
    seg = outputs["/llmseg/segmentation"][0][1]
    assert seg.instruction == "the red things" and list(seg.selected) == [0]
    for k, (_, msg, _) in enumerate(outputs["/llmseg/masked_depth"]):
        assert stamp_to_ns(msg.header.stamp) == colour_stamp(2 * k) + 2_000_000
        assert msg.header.frame_id == "depth_optical"
        depth = image_to_numpy(msg)
        left = colour_image(H, W, seed=2 * k)[:, :, 0] > 150
        np.testing.assert_array_equal(depth[left], depth_mm(2 * k)[left])
        assert (depth[~left] == 0).all()
    cloud = outputs["/llmseg/points"][1][1]
    assert cloud.header.frame_id == "depth_optical" and cloud.width == (H - 1) * (W // 2)
    assert outputs["/llmseg/masked_depth/camera_info"][0][2] == inputs[INFO][0][2]


def test_replay_at_stamps_mcap_to_sqlite3(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "in", "mcap", frames=4, with_depth=False)
    plan = {
        "at": [
            {"stamp": "100.300000000", "instruction": "the red things"},
            {"stamp_ns": colour_stamp(1) + 5_000_000, "instruction": "the red cup"},
            {"stamp": 500.0, "instruction": "never recorded"},
        ],
        "tolerance": 0.01,
    }
    logs: list[str] = []
    seg = FakeSegmenter()
    summary = replay_bag(
        bag,
        tmp_path / "out",
        ReplaySchedule.from_mapping(plan),
        seg,
        storage="sqlite3",
        progress=False,
        log=logs.append,
    )
    assert (summary.processed, summary.storage, [u.instruction for u in summary.unmatched]) == (
        2,
        "sqlite3",
        ["never recorded"],
    )
    assert detect_storage(tmp_path / "out") == "sqlite3"
    assert any("no colour frame within 0.01 s of stamp 500.000000000" in line for line in logs)
    outputs = read_bag(tmp_path / "out")
    assert [stamp_to_ns(m.header.stamp) for _, m, _ in outputs["/llmseg/mask"]] == [
        colour_stamp(1),
        colour_stamp(3),
    ]
    assert [c["instruction"] for c in seg.segment_calls] == ["the red cup", "the red things"]
    assert "/llmseg/masked_depth" not in outputs and "/llmseg/points" not in outputs


def test_failures_are_counted_and_reported(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "in", "sqlite3", frames=2)
    logs: list[str] = []
    summary = replay_bag(
        bag,
        tmp_path / "out",
        schedule("instruction: explode"),
        FakeSegmenter(),
        TOPICS,
        progress=False,
        log=logs.append,
    )
    assert (summary.processed, summary.failed) == (0, 2)
    assert len(logs) == 2 and "inference failed: RuntimeError: boom" in logs[0]
    assert "/llmseg/mask" not in read_bag(tmp_path / "out")


def test_bad_arguments_are_rejected_before_writing(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "in", "sqlite3", frames=1)
    (tmp_path / "exists").mkdir()
    s = schedule("instruction: a cup")
    with pytest.raises(ValueError, match="exists; choose another path or pass --overwrite"):
        replay_bag(bag, tmp_path / "exists", s, FakeSegmenter(), TOPICS, progress=False)
    with pytest.raises(ValueError, match="the bag has 2 sensor_msgs/msg/Image topics"):
        replay_bag(bag, tmp_path / "o1", s, FakeSegmenter(), progress=False)
    with pytest.raises(ValueError, match="topic '/nope' is not in the bag"):
        replay_bag(bag, tmp_path / "o2", s, FakeSegmenter(), ReplayTopics("/nope"), progress=False)
    with pytest.raises(
        ValueError, match="has type sensor_msgs/msg/Image; expected sensor_msgs/msg/CameraInfo"
    ):
        replay_bag(
            bag, tmp_path / "o3", s, FakeSegmenter(), ReplayTopics(COLOUR, DEPTH, DEPTH), progress=False
        )
    with pytest.raises(ValueError, match="output namespace must be absolute"):
        replay_bag(
            bag, tmp_path / "o5", s, FakeSegmenter(), TOPICS, output_namespace="llmseg", progress=False
        )
    with pytest.raises(ValueError, match="depth and camera_info topics go together"):
        ReplayTopics(COLOUR, DEPTH)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "in"]
    summary = replay_bag(bag, tmp_path / "exists", s, FakeSegmenter(), TOPICS, overwrite=True, progress=False)
    assert summary.processed == 1 and "/llmseg/mask" in read_bag(tmp_path / "exists")
    with pytest.raises(ValueError, match=r"input topics \['/llmseg/mask', .* clash with the output topics"):
        replay_bag(tmp_path / "exists", tmp_path / "again", s, FakeSegmenter(), TOPICS, progress=False)
    replay_bag(
        tmp_path / "exists",
        tmp_path / "again",
        s,
        FakeSegmenter(),
        TOPICS,
        output_namespace="/second",
        progress=False,
    )
    assert {"/llmseg/mask", "/second/mask"} <= set(read_bag(tmp_path / "again"))


def test_schedule_file_formats_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps(
            {"instruction": "a cup", "every_n": 3, "selection": {"strategy": "top1_iou"}, "explain": True}
        )
    )
    plan = ReplaySchedule.from_file(path)
    assert (plan.every_n, plan.selection_strategy, plan.iop_threshold, plan.explain) == (
        3,
        "top1_iou",
        -1.0,
        True,
    )
    assert plan.plan([10, 20, 30, 40, 50, 60, 70]) == ({0: "a cup", 3: "a cup", 6: "a cup"}, [])
    timed = schedule(
        "instruction: a\nat: [{stamp: 2.5, instruction: b}, {stamp: '1.000000001', instruction: c}]"
    )
    assert [t.stamp_ns for t in timed.at] == [2_500_000_000, 1_000_000_001]
    assert timed.plan([S, 2 * S, 25 * S // 10])[0] == {0: "c", 1: "a", 2: "b"}
    for text, message in [
        ("instruction: a\nevery: 2", r"unknown key\(s\) \['every'\]"),
        ("every_n: 2", "must give `instruction`"),
        ("instruction: a\nevery_n: 0", "every_n must be an integer >= 1"),
        ("at: [{stamp: 1.0, stamp_ns: 1, instruction: a}]", r"at\[0\] needs exactly one of stamp"),
        ("at: [{stamp: 1.0}]", r"at\[0\].instruction must be a non-empty string"),
        ("at: [{stamp: 'yesterday', instruction: a}]", "must look like 'sec.nanosec'"),
        ("instruction: a\nselection: {strategy: best}", "selection.strategy must be one of"),
        ("- a list", "must hold a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            schedule(text)
    bad = tmp_path / "bad.yaml"
    bad.write_text("instruction: [unclosed")
    with pytest.raises(ValueError, match="cannot parse the instructions file"):
        ReplaySchedule.from_file(bad)
    with pytest.raises(ValueError, match="cannot read the instructions file"):
        ReplaySchedule.from_file(tmp_path / "missing.yaml")


def test_cli_usage_errors_exit_2_before_loading_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmseg_ros.cli import main

    bag = write_bag(tmp_path / "in", "sqlite3", frames=1)
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: a cup\n")
    cases = [
        (
            ["--instructions", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")],
            "cannot read the instructions",
        ),
        (
            ["--instructions", str(plan), "--out", str(plan)],
            "exists; choose another path or pass --overwrite",
        ),
        (
            ["--instructions", str(plan), "--out", str(bag), "--overwrite"],
            "the output bag must differ from the input",
        ),
        (
            ["--instructions", str(plan), "--out", str(tmp_path / "o"), "--depth-topic", DEPTH],
            "need --image-topic",
        ),
        (
            [
                "--instructions",
                str(plan),
                "--out",
                str(tmp_path / "o"),
                "--image-topic",
                COLOUR,
                "--depth-topic",
                DEPTH,
            ],
            "depth and camera_info topics go together",
        ),
    ]
    for extra, message in cases:
        assert main(["replay-bag", str(bag), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_replays_a_bag_with_the_tiny_profile(tmp_path: Path, tiny_profile_dir: Path) -> None:
    from llmseg_ros.cli import main

    bag = write_bag(tmp_path / "in", "mcap", frames=3)
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: where can I put the dirty dishes?\n")
    rc = main(
        [
            "replay-bag", str(bag), "--instructions", str(plan), "--out", str(tmp_path / "out"),
            "--profile", "tiny", "--tiny-dir", str(tiny_profile_dir),
            "--image-topic", COLOUR, "--depth-topic", DEPTH, "--camera-info-topic", INFO, "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    assert detect_storage(tmp_path / "out") == "mcap"
    outputs = read_bag(tmp_path / "out")
    masks = outputs["/llmseg/mask"]
    assert [stamp_to_ns(m.header.stamp) for _, m, _ in masks] == [colour_stamp(i) for i in range(3)]
    assert {m.header.frame_id for _, m, _ in masks} == {"color_optical"}
    assert all((m.height, m.width) == (H, W) for _, m, _ in masks)
    assert len(outputs["/llmseg/segmentation"]) == len(outputs["/llmseg/masked_depth"]) == 3
    assert (
        main(["replay-bag", str(bag), "--instructions", str(plan), "--out", str(tmp_path / "out")]) == 2
    )  # exists


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lisa", "grounded", "vlm_grounding", "vlm_marks"])
def test_replay_with_every_other_method(tmp_path: Path, tiny_profile_dir: Path, method: str) -> None:
    from llmseg_ros.cli import main

    bag = write_bag(tmp_path / "in", "sqlite3", frames=2)
    plan = tmp_path / "plan.yaml"
    plan.write_text("instruction: something I could stand on\n")
    rc = main(
        [
            "replay-bag", str(bag), "--instructions", str(plan), "--out", str(tmp_path / "out"),
            "--profile", "tiny", "--tiny-dir", str(tiny_profile_dir), "--method", method,
            "--image-topic", COLOUR, "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    outputs = read_bag(tmp_path / "out")
    masks = outputs["/llmseg/mask"]
    assert [stamp_to_ns(m.header.stamp) for _, m, _ in masks] == [colour_stamp(i) for i in range(2)]
    assert [m.method for _, m, _ in outputs["/llmseg/segmentation"]] == [method, method]
