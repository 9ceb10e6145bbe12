"""What every ``llmseg`` subcommand shares: exit codes, the model arguments and the
conversion of arguments to a :class:`SegmenterConfig`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmseg_ros.config import METHODS, SELECTION_STRATEGIES, SegmenterConfig, SelectionConfig
from llmseg_ros.tiny import TINY_BANNER, build_tiny_profile, default_cache_dir

if TYPE_CHECKING:
    from llmseg_ros.pipeline import ReasonSegmenter

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_MISSING_WEIGHTS = 0, 1, 2, 3


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments that choose the models (shared by every subcommand that runs the pipeline)."""
    group = parser.add_argument_group("models")
    group.add_argument(
        "--config", type=Path, help="file with SegmenterConfig fields: JSON if named *.json, else YAML"
    )
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
    from llmseg_ros.models.components import missing_inputs

    missing = missing_inputs(config)
    if missing:
        print("error: cannot run: model files are missing:", file=sys.stderr)
        for line in missing:
            print(f"  - {line}", file=sys.stderr)
        print(
            f"Run `llmseg {command} --profile tiny ...` to see the pipeline without weights.", file=sys.stderr
        )
    return bool(missing)


def prefer_cached_models(config: SegmenterConfig) -> SegmenterConfig:
    """``config`` with its hub ids pointed at their local cache folders when the hub is unreachable.

    Offline, the hub client retries its requests for a minute or more per model before it
    falls back to the cache; a cached model loads at once from its folder. Online, ``config``
    is unchanged (the hub client then checks for updates as usual).
    """
    from llmseg_ros.models.components import hub_model_ids
    from llmseg_ros.utils import hub

    found = {key: hub.cached_snapshot(repo_id) for key, repo_id in hub_model_ids(config).items()}
    cached = {key: str(folder) for key, folder in found.items() if folder is not None}
    if not cached:
        return config
    reason = hub.unreachable_reason()
    if reason is None:
        return config
    names = ", ".join(str(getattr(config, key)) for key in cached)
    print(f"the Hugging Face hub cannot be reached ({reason}); using the cached {names}", file=sys.stderr)
    return config.replace(**cached)


def segmenter_for(config: SegmenterConfig, command: str) -> ReasonSegmenter | None:
    """The segmenter ``llmseg <command>`` runs (models not loaded yet), or ``None`` after
    printing which model files are missing (:func:`report_missing_inputs`)."""
    if report_missing_inputs(config, command):
        return None
    from llmseg_ros.pipeline import ReasonSegmenter

    return ReasonSegmenter(prefer_cached_models(config))
