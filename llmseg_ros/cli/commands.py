"""``llmseg segment`` and ``llmseg fetch-weights``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from llmseg_ros.cli.common import (
    EXIT_FAIL,
    EXIT_MISSING_WEIGHTS,
    EXIT_OK,
    EXIT_USAGE,
    config_from_args,
    segmenter_for,
)
from llmseg_ros.tiny import TINY_BANNER


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
    from llmseg_ros.utils.imageio import mask_to_mono8, read_rgb, render_overlay, write_image_atomic

    try:
        image = read_rgb(args.image)
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    segmenter = segmenter_for(config, "segment")
    if segmenter is None:
        return EXIT_MISSING_WEIGHTS
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
    from llmseg_ros.utils.atomic import atomic_write_text
    from llmseg_ros.weights.fetch import FetchPlan, fetch_all

    hub = tuple(m for m in (args.dinov2, args.vlm) if m)
    plan = FetchPlan(
        directory=args.dir, sam_model_type=None if args.no_sam else args.sam_model_type, hub_models=hub
    )
    result = fetch_all(plan)
    config: dict[str, Any] = {"sam_model_type": args.sam_model_type}
    for key, name in (("sam_checkpoint", "sam"), ("dinov2", args.dinov2), ("vlm", args.vlm)):
        if name in result.paths:
            config[key] = str(result.paths[name])
    out = None
    if result.paths or not result.failures:  # what is here, also when something failed
        out = atomic_write_text(args.dir / "llmseg_config.json", json.dumps(config, indent=2) + "\n")
    if result.failures:
        print(f"error: {result.failure_report()}", file=sys.stderr)
        if out is not None:
            print(f"wrote {out} with what is here ({', '.join(sorted(result.paths))})", file=sys.stderr)
        print(
            f"Once the files are in place, run `llmseg fetch-weights --dir {args.dir}` again to write "
            "the config for all of them.",
            file=sys.stderr,
        )
        return EXIT_FAIL
    print(f"done; use `llmseg segment --config {out} --weights YOUR_TRAINED_WEIGHTS ...`")
    return EXIT_OK
