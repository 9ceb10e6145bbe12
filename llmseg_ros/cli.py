"""The ``llmseg`` command.

    llmseg segment --image IMG --instruction TEXT [--weights DIR | --config FILE | --profile tiny]
                   --out MASK.png [--overlay OVERLAY.png]
    llmseg fetch-weights [--dir DIR]
    llmseg replay-bag INPUT_BAG --instructions FILE --out OUTPUT_BAG [...]

argparse lives here only; everything is converted to a :class:`SegmenterConfig`.
Exit codes: 0 success, 1 runtime failure, 2 bad arguments / input, 3 missing weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmseg_ros.config import METHODS, SELECTION_STRATEGIES, SegmenterConfig, SelectionConfig

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_MISSING_WEIGHTS = 0, 1, 2, 3
TINY_BANNER = (
    "*** TINY PROFILE: tiny RANDOM models stand in for SAM, DINOv2 and the VLM. ***\n"
    "*** The mask shows the mechanics of the pipeline, not a meaningful answer. ***"
)


def default_cache_dir() -> Path:
    """Where tiny models are kept: $LLMSEG_CACHE, else $XDG_CACHE_HOME/llmseg_ros, else ~/.cache/llmseg_ros."""
    if os.environ.get("LLMSEG_CACHE"):
        return Path(os.environ["LLMSEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmseg_ros"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments that choose the models (shared by every subcommand that runs the pipeline)."""
    group = parser.add_argument_group("models")
    group.add_argument("--config", type=Path, help="JSON/YAML file with SegmenterConfig fields")
    group.add_argument("--weights", type=Path, help="directory of trained llmseg_ros weights")
    group.add_argument(
        "--profile",
        choices=["tiny"],
        help="'tiny': tiny random models built locally (no downloads; for seeing the mechanics)",
    )
    group.add_argument("--method", choices=METHODS, help="segmentation method (default: llmseg)")
    group.add_argument("--sam-checkpoint", type=Path, help="SAM .pth checkpoint")
    group.add_argument("--sam-model-type", choices=["vit_h", "vit_l", "vit_b"], help="SAM variant")
    group.add_argument("--dinov2", help="DINOv2 hub id or directory")
    group.add_argument("--vlm", help="VLM hub id or directory")
    group.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    group.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    group.add_argument("--quantization", choices=["8bit", "4bit"], help="load the VLM quantised (CUDA)")
    group.add_argument("--strategy", choices=SELECTION_STRATEGIES, help="proposal selection strategy")
    group.add_argument("--threshold", type=float, help="IoP threshold in [0, 1]")
    group.add_argument("--tiny-dir", type=Path, help="where the tiny profile's models are cached")


def config_from_args(args: argparse.Namespace, log: Any = print) -> SegmenterConfig:
    """Build the config from ``--profile`` / ``--config`` / ``--weights`` and overrides."""
    if args.profile == "tiny":
        from llmseg_ros.tiny import build_tiny_profile

        method = args.method or "llmseg"
        tiny_dir = args.tiny_dir or (default_cache_dir() / "tiny")
        log(TINY_BANNER)
        config = build_tiny_profile(tiny_dir, method=method)
    elif args.config is not None:
        config = SegmenterConfig.from_file(args.config)
    else:
        config = SegmenterConfig()
    changes: dict[str, Any] = {}
    for arg, fld in (
        ("weights", "weights_dir"),
        ("sam_checkpoint", "sam_checkpoint"),
        ("sam_model_type", "sam_model_type"),
        ("dinov2", "dinov2"),
        ("vlm", "vlm"),
        ("device", "device"),
        ("dtype", "dtype"),
        ("quantization", "vlm_quantization"),
        ("method", "method"),
    ):
        value = getattr(args, arg, None)
        if value is not None:
            changes[fld] = str(value) if isinstance(value, Path) else value
    if args.strategy is not None or args.threshold is not None:
        changes["selection"] = SelectionConfig(
            strategy=args.strategy or config.selection.strategy,
            iop_threshold=args.threshold if args.threshold is not None else config.selection.iop_threshold,
            top_k=config.selection.top_k,
        )
    return config.replace(**changes) if changes else config


def report_missing_inputs(config: SegmenterConfig, command: str) -> bool:
    """Print the model files ``config`` needs but cannot find to stderr (for ``llmseg <command>``).

    Returns:
        True when something is missing (the command should exit with ``EXIT_MISSING_WEIGHTS``).
    """
    from llmseg_ros.components import missing_inputs

    missing = missing_inputs(config)
    if missing:
        print("error: cannot run: model files are missing:", file=sys.stderr)
        for line in missing:
            print(f"  - {line}", file=sys.stderr)
        print(
            f"Run `llmseg {command} --profile tiny ...` to see the pipeline without weights.", file=sys.stderr
        )
    return bool(missing)


def _print_result(result: Any, as_json: bool) -> None:
    timings = {k: round(v, 4) for k, v in result.timings.items()}
    if as_json:
        print(
            json.dumps(
                {
                    "method": result.method,
                    "selected": result.selected,
                    "num_proposals": result.num_proposals,
                    "confidence": result.confidence,
                    "mask_pixels": int(result.mask.sum()),
                    "answer": result.answer,
                    "timings_s": timings,
                    "extras": result.extras,
                },
                indent=2,
                default=str,
            )
        )
        return
    print(f"method: {result.method}   proposals: {result.num_proposals}   selected: {result.selected}")
    print(
        f"mask pixels: {int(result.mask.sum())} of {result.mask.size}   confidence: {result.confidence:.3f}"
    )
    if result.answer is not None:
        print(f"answer: {result.answer}")
    print("timings (s):")
    for stage, seconds in timings.items():
        print(f"  {stage:<16} {seconds:8.4f}")


def cmd_segment(args: argparse.Namespace) -> int:
    from llmseg_ros.imageio import mask_to_mono8, read_rgb, render_overlay, write_image_atomic

    try:
        image = read_rgb(args.image)
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if report_missing_inputs(config, "segment"):
        return EXIT_MISSING_WEIGHTS
    from llmseg_ros.pipeline import ReasonSegmenter

    segmenter = ReasonSegmenter(config)
    try:
        t0 = time.perf_counter()
        segmenter.load()
        load_s = time.perf_counter() - t0
        result = segmenter.segment(image, args.instruction, explain=args.explain)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    write_image_atomic(args.out, mask_to_mono8(result.mask), rgb=False)
    if args.overlay is not None:
        write_image_atomic(args.overlay, render_overlay(image, result.mask))
    if not args.json:
        print(f"models loaded in {load_s:.2f} s ({segmenter.describe()['device']})")
    _print_result(result, args.json)
    if not args.json:
        print(f"mask written to {args.out}" + (f", overlay to {args.overlay}" if args.overlay else ""))
        if config.profile == "tiny":
            print(TINY_BANNER.splitlines()[1])
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from llmseg_ros.fetch import FetchError, FetchPlan, fetch_all

    hub = tuple(m for m in (args.dinov2, args.vlm) if m)
    plan = FetchPlan(
        directory=args.dir, sam_model_type=None if args.no_sam else args.sam_model_type, hub_models=hub
    )
    try:
        paths = fetch_all(plan)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    config: dict[str, Any] = {"sam_model_type": args.sam_model_type}
    if "sam" in paths:
        config["sam_checkpoint"] = str(paths["sam"])
    if args.dinov2 in paths:
        config["dinov2"] = str(paths[args.dinov2])
    if args.vlm in paths:
        config["vlm"] = str(paths[args.vlm])
    from llmseg_ros.atomic import atomic_write_text

    out = atomic_write_text(args.dir / "llmseg_config.json", json.dumps(config, indent=2) + "\n")
    print(f"done; use `llmseg segment --config {out} --weights YOUR_TRAINED_WEIGHTS ...`")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmseg", description="Reasoning segmentation (LLM-Seg) for robots")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment one image for one instruction")
    seg.add_argument("--image", type=Path, required=True, help="input image (PNG/JPEG)")
    seg.add_argument("--instruction", required=True, help="the (implicit) instruction")
    seg.add_argument("--out", type=Path, required=True, help="output mask PNG (255 = selected)")
    seg.add_argument("--overlay", type=Path, help="optional overlay PNG")
    seg.add_argument("--explain", action="store_true", help="also generate the VLM's text answer")
    seg.add_argument("--json", action="store_true", help="print the result as JSON")
    add_model_arguments(seg)
    seg.set_defaults(func=cmd_segment)

    fetch = sub.add_parser("fetch-weights", help="download SAM, DINOv2 and the VLM (needs network)")
    fetch.add_argument("--dir", type=Path, default=Path("weights"), help="destination directory")
    fetch.add_argument("--sam-model-type", choices=["vit_h", "vit_l", "vit_b"], default="vit_h")
    fetch.add_argument("--no-sam", action="store_true", help="skip the SAM checkpoint")
    fetch.add_argument("--dinov2", default="facebook/dinov2-large", help="DINOv2 hub id ('' to skip)")
    fetch.add_argument("--vlm", default="llava-hf/llava-1.5-7b-hf", help="VLM hub id ('' to skip)")
    fetch.set_defaults(func=cmd_fetch)

    from llmseg_ros.cli_replay import add_replay_arguments, run_replay

    replay = sub.add_parser("replay-bag", help="run the pipeline over a rosbag2 and write a new bag")
    add_replay_arguments(replay)
    replay.set_defaults(func=run_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
