"""The ``llmseg`` command.

    llmseg segment --image IMG --instruction TEXT [--weights DIR | --config FILE | --profile tiny]
                   --out MASK.png [--overlay OVERLAY.png]
    llmseg fetch-weights [--dir DIR] [--released NAME ...]
    llmseg import-weights --format llmseg-deepspeed|lisa-hf SRC --out DIR [--dry-run ...]
    llmseg replay-bag INPUT_BAG --instructions FILE --out OUTPUT_BAG [...]

argparse lives here only; everything is converted to a :class:`SegmenterConfig`.
Exit codes: 0 success, 1 runtime failure, 2 bad arguments / input, 3 missing weights.
Every subcommand takes ``--verbose`` to also show the dependencies' progress bars, warnings
and log messages (see :mod:`llmseg_ros.cli.quiet`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmseg_ros.cli.commands import cmd_fetch, cmd_segment
from llmseg_ros.cli.common import (
    EXIT_FAIL,
    EXIT_MISSING_WEIGHTS,
    EXIT_OK,
    EXIT_USAGE,
    add_model_arguments,
)
from llmseg_ros.cli.quiet import dependency_output
from llmseg_ros.cli.replay import add_replay_arguments, run_replay
from llmseg_ros.cli.weights import add_import_command, add_released_option

__all__ = ["EXIT_FAIL", "EXIT_MISSING_WEIGHTS", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmseg", description="Reasoning segmentation (LLM-Seg) for robots")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the dependencies' progress bars, warnings and log messages",
    )

    seg = sub.add_parser("segment", parents=[common], help="segment one image for one instruction")
    seg.add_argument("--image", type=Path, required=True, help="input image (PNG/JPEG)")
    seg.add_argument("--instruction", required=True, help="the (implicit) instruction")
    seg.add_argument("--out", type=Path, required=True, help="output mask PNG (255 = selected)")
    seg.add_argument("--overlay", type=Path, help="optional overlay PNG")
    seg.add_argument("--explain", action="store_true", help="also generate the VLM's text answer")
    seg.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_arguments(seg)
    seg.set_defaults(func=cmd_segment)

    fetch = sub.add_parser(
        "fetch-weights", parents=[common], help="download SAM, DINOv2 and the VLM (needs network)"
    )
    fetch.add_argument("--dir", type=Path, default=Path("weights"), help="destination directory")
    fetch.add_argument("--sam-model-type", choices=["vit_h", "vit_l", "vit_b"], default="vit_h")
    fetch.add_argument("--no-sam", action="store_true", help="skip the SAM checkpoint")
    fetch.add_argument("--dinov2", default="facebook/dinov2-large", help="DINOv2 hub id ('' to skip)")
    fetch.add_argument("--vlm", default="llava-hf/llava-1.5-7b-hf", help="VLM hub id ('' to skip)")
    fetch.set_defaults(func=cmd_fetch)
    add_released_option(fetch)
    add_import_command(sub, parents=[common])

    replay = sub.add_parser(
        "replay-bag", parents=[common], help="run the pipeline over a rosbag2 and write a new bag"
    )
    add_replay_arguments(replay)
    replay.set_defaults(func=run_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with dependency_output(args.verbose):
            return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
