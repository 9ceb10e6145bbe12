"""``llmseg replay-bag``: run the pipeline over a rosbag2 and write a new bag (no ROS 2 needed).

    llmseg replay-bag INPUT_BAG --instructions FILE --out OUTPUT_BAG \
        [--config FILE | --weights DIR | --profile tiny] [--image-topic T] \
        [--depth-topic T --camera-info-topic T] [--storage sqlite3|mcap] [...]

See :mod:`llmseg_ros.ros.bag_replay` for the output topics and :mod:`llmseg_ros.ros.schedule`
for the instructions file.

Exit codes: 0 every scheduled frame answered; 1 some frames failed (the bag is written);
2 bad input (arguments, instructions file, unreadable or malformed bag, output path);
3 model files missing; 130 interrupted (SIGINT), 143 terminated (SIGTERM). Whatever the
exit, the output bag is complete or not there (an overwritten one is left as it was).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

from llmseg_ros.cli.common import (
    EXIT_FAIL,
    EXIT_MISSING_WEIGHTS,
    EXIT_OK,
    EXIT_USAGE,
    add_model_arguments,
    config_from_args,
    segmenter_for,
)
from llmseg_ros.tiny import TINY_BANNER


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``llmseg replay-bag`` (the model arguments included)."""
    parser.add_argument(
        "input_bag", type=Path, help="rosbag2 directory (sqlite3 or MCAP) or a .db3/.mcap file"
    )
    parser.add_argument(
        "--instructions", type=Path, required=True, help="YAML/JSON file: which instruction when"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the new bag (a directory that must not exist)"
    )
    topics = parser.add_argument_group("topics")
    topics.add_argument("--image-topic", help="colour image topic (default: the bag's only Image topic)")
    topics.add_argument("--depth-topic", help="depth image registered to the colour image (16UC1 or 32FC1)")
    topics.add_argument("--camera-info-topic", help="CameraInfo of the depth image")
    topics.add_argument(
        "--output-namespace", default="/llmseg", help="prefix of the output topics (default /llmseg)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--storage", choices=["sqlite3", "mcap"], help="storage of the new bag (default: the input's)"
    )
    out.add_argument("--no-overlay", action="store_true", help="do not write the overlay topic")
    out.add_argument("--sync-slop", type=float, default=0.05, help="seconds between colour and depth stamps")
    out.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per frame")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output bag")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup runs as it does for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_now(code: int, message: str) -> NoReturn:
    """Report and leave at once, skipping interpreter teardown.

    A request worker thread may still be inside the model (native code); tearing the
    interpreter down under it aborts the process ("terminate called without an active
    exception") instead of exiting with ``code``. The output bag is already cleaned up.
    """
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_replay(args: argparse.Namespace) -> int:
    """Run ``llmseg replay-bag``; returns the exit code (see the module docstring).

    SIGINT and SIGTERM end the process with 130 / 143 after the partial output is removed.
    """
    try:
        with _sigterm_raises():
            return _run_replay(args)
    except KeyboardInterrupt:
        _exit_now(
            EXIT_INTERRUPTED, f"interrupted: {args.out} is not written (an existing bag is left as it was)"
        )
    except _Terminated:
        _exit_now(
            EXIT_TERMINATED, f"terminated: {args.out} is not written (an existing bag is left as it was)"
        )


def _run_replay(args: argparse.Namespace) -> int:
    from llmseg_ros.ros.bag_files import check_output_path, open_bag
    from llmseg_ros.ros.bag_replay import ReplayTopics, replay_bag
    from llmseg_ros.ros.schedule import ReplaySchedule

    try:
        schedule = ReplaySchedule.from_file(args.instructions)
        topics = None
        if args.image_topic or args.depth_topic or args.camera_info_topic:
            if not args.image_topic:
                raise ValueError("--depth-topic / --camera-info-topic need --image-topic")
            topics = ReplayTopics(args.image_topic, args.depth_topic, args.camera_info_topic)
        if not args.input_bag.exists():
            raise ValueError(f"input bag {args.input_bag} does not exist")
        check_output_path(args.out, args.input_bag, overwrite=args.overwrite)
        with open_bag(args.input_bag):  # a malformed bag is refused before the models load
            pass
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    segmenter = segmenter_for(config, "replay-bag")
    if segmenter is None:
        return EXIT_MISSING_WEIGHTS
    t0 = time.perf_counter()
    try:
        segmenter.load()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    print(f"models loaded in {time.perf_counter() - t0:.2f} s ({segmenter.describe()['device']})")
    try:
        summary = replay_bag(
            args.input_bag,
            args.out,
            schedule,
            segmenter,
            topics,
            storage=args.storage,
            output_namespace=args.output_namespace,
            overlay=not args.no_overlay,
            sync_slop_s=args.sync_slop,
            timeout_s=args.timeout,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        segmenter.close()
    print(
        f"{summary.processed} of {summary.frames} frames answered ({summary.failed} failed); "
        f"wrote {summary.output} ({summary.storage})"
    )
    for topic, count in sorted(summary.counts.items()):
        print(f"  {topic}: {count} messages")
    if config.profile == "tiny":
        print(TINY_BANNER.splitlines()[1])
    return EXIT_OK if summary.failed == 0 else EXIT_FAIL
