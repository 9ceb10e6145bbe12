"""Train LLM-Seg (selector, projections, ``<SEG>`` embedding / LM head, LoRA) and export the weights.

The same script runs on one CPU, one GPU or many GPUs::

    # one process (CPU or one GPU)
    python training/train.py --config training/configs/reasonseg_llmseg.yaml

    # all GPUs of a machine with DDP
    accelerate launch --multi_gpu --num_processes 2 training/train.py --config training/configs/reasonseg_llmseg.yaml

    # DeepSpeed ZeRO-2 (pip install deepspeed)
    accelerate launch --config_file training/configs/accelerate_deepspeed_zero2.yaml \\
        training/train.py --config training/configs/reasonseg_llmseg.yaml

    # mechanics only: tiny random models and synthetic data on CPU, a few seconds
    python training/train.py --config training/configs/tiny_smoke.yaml

Killed runs continue from their newest intact checkpoint when started again with the same
command. The weights land in ``OUTPUT_DIR/weights`` (load them with ``--weights`` in the
CLI, ``weights_dir`` in the config, or ``training/evaluate.py --weights``); with a
``val_source`` in the config, the weights with the best validation score also land in
``OUTPUT_DIR/weights_best``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a source checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmseg_ros.training.config import PROFILES, RESUME_MODES, TrainConfig, read_mapping


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML/JSON training config (fields of TrainConfig)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--max-steps", type=int, help="override max_steps (optimizer steps)")
    parser.add_argument("--stop-after", type=int, help="stop this invocation after this many steps in total")
    parser.add_argument("--resume", choices=RESUME_MODES, help="override resume (auto | never)")
    parser.add_argument("--profile", choices=PROFILES, help="tiny: tiny random models (+ synthetic data)")
    parser.add_argument("--device", help="override device (auto | cpu | cuda | cuda:N)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field; VALUE is YAML (e.g. lr=1e-5, lora.r=16, sources=[...]); repeatable",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``KEY=VALUE`` (dotted KEY for nested mappings, VALUE parsed as YAML) to ``data``."""
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}")
    value = yaml.safe_load(raw)
    *parents, leaf = key.split(".")
    target = data
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {assignment!r}: {part!r} is not a mapping")
        target = child
    target[leaf] = value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the command line (config file, then flags, then ``--set``)."""
    data: dict[str, Any] = read_mapping(args.config) if args.config else {}
    for flag, key in (
        ("output_dir", "output_dir"),
        ("max_steps", "max_steps"),
        ("stop_after", "stop_after"),
        ("resume", "resume"),
        ("profile", "profile"),
        ("device", "device"),
    ):
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    for assignment in args.set:
        apply_override(data, assignment)
    return TrainConfig.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a bad config file or flag: usage error, exit 2 like argparse
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from llmseg_ros.training.checkpoint import CheckpointError
    from llmseg_ros.training.trainer import train

    try:
        result = train(config, progress=not args.no_progress)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    if os.environ.get("RANK", "0") != "0":  # one report per run (torchrun / accelerate set RANK)
        return 0
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    if result.finished:
        print(f"finished {result.step} steps; weights in {result.weights_dir}")
    else:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint} (run again to continue)")
    if result.best_weights_dir is not None:
        print(
            f"best validation {config.val_metric} {result.best_score:.4f} at step {result.best_step}; "
            f"weights in {result.best_weights_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
