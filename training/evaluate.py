"""Evaluate reasoning segmentation (gIoU / cIoU / ncIoU) on ReasonSeg, LLM-Seg40K or a JSONL dataset.

Three modes:

* ``--pred-dir DIR``: score a folder of predicted PNG masks, one per sample, named
  ``{sample id}.png`` (``> 0`` is foreground); with several splits, ``DIR/{split}/`` is used
  when it exists. No model is loaded. Sample ids: ReasonSeg image stem; LLM-Seg40K
  ``{image stem}_{question index}``; JSONL the ``id`` field or ``{image stem}_{k}``.
* model mode (``--config FILE``, ``--weights DIR`` and/or ``--profile tiny``): build a
  :class:`llmseg_ros.pipeline.ReasonSegmenter` and time each query.
* comparison mode (``--compare NAME[=CONFIG]``, repeatable): run several models on the
  same samples and write one table per split (LLM-Seg Table 1 / 5 style), see below.

Single-model modes write ``report.json`` (metrics per split; for ReasonSeg also LISA's
short / long query breakdown; n; seconds per query when a model ran; the model config;
per-sample records) and ``report.md`` (Markdown table) to ``--out``, atomically; ``--overlays N`` also writes
the N lowest-IoU samples per split as overlay PNGs (green hit, red false positive, blue
miss, grey ignore).

Comparison mode: each ``--compare`` entry is one row, labelled ``NAME``. ``NAME=CONFIG``
reads a SegmenterConfig file (which names the method and its weights_dir); ``NAME`` alone
must be a method name and the row uses the base config (``--config`` / ``--profile``, with
``--weights`` and ``--strategy`` applied as for a single run) with ``method = NAME``.
``--device`` applies to every row. Rows run one after the other, each model loaded once
and freed before the next row. Per split, ``{out}/{split}/comparison.json`` (summaries,
ReasonSeg short / long breakdown, configs, per-sample IoUs and seconds) and
``{out}/{split}/comparison.md`` (one row per entry: n, gIoU, cIoU, ncIoU, seconds per
query) are written atomically, also for a single split, and rewritten after each row;
``--overlays N`` writes ``{out}/{split}/overlays/{name}_{rank}_{id}.png``.

Several processes share the samples when the script runs under ``accelerate launch``
or ``torchrun`` (each evaluates a block of every split with its own model on its own
GPU); the reports, tables and overlays are the same files a single process writes
(timings aside), written by rank 0.

The logic lives in :mod:`llmseg_ros.evaluation` (``runner``, ``predictors``, ``writers``).

Examples::

    python training/evaluate.py --dataset reasonseg --root data/ReasonSeg --split val \
        --config training/configs/segmenter_llmseg.yaml --out runs/eval_val --overlays 20
    python training/evaluate.py --dataset jsonl --root data/synthetic/jsonl --split val \
        --pred-dir runs/preds --out runs/eval_preds
    python training/evaluate.py --dataset reasonseg --root data/ReasonSeg --split val \
        --config training/configs/segmenter_llmseg.yaml --compare llmseg \
        --compare lisa=training/configs/segmenter_lisa.yaml \
        --compare grounded --out runs/compare_val
    python training/evaluate.py --dataset jsonl --root runs/tiny/synthetic/jsonl --split train \
        --profile tiny --compare llmseg --compare lisa --compare grounded --out runs/compare_tiny
    # every GPU of a machine
    accelerate launch --num_processes 8 training/evaluate.py --dataset reasonseg --root data/ReasonSeg \
        --split val,test --config training/configs/segmenter_llmseg.yaml --out runs/eval_8gpu
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if importlib.util.find_spec("llmseg_ros") is None:  # a source checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmseg_ros.config import METHODS, SELECTION_STRATEGIES
from llmseg_ros.evaluation.runner import run_comparison, run_evaluation
from llmseg_ros.evaluation.settings import DATASETS, PROFILES, CompareRow, EvalSettings
from llmseg_ros.evaluation.writers import comparison_dir, comparison_markdown, report_markdown


def _compare_row(text: str) -> CompareRow:
    try:
        return CompareRow.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _image_root(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        return "", Path(text)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR or DIR, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate reasoning segmentation (gIoU / cIoU / ncIoU).",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, type=Path, help="dataset folder or file")
    parser.add_argument(
        "--split", action="append", help="split to evaluate (repeatable, or comma-separated); default val"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("eval_report"), help="report folder (default: eval_report)"
    )
    parser.add_argument("--pred-dir", type=Path, help="folder of predicted PNG masks named {sample id}.png")
    parser.add_argument(
        "--allow-missing", action="store_true", help="score missing predictions as empty masks"
    )
    parser.add_argument("--config", type=Path, help="SegmenterConfig JSON / YAML file")
    parser.add_argument("--weights", type=Path, help="trained weights folder (sets weights_dir)")
    parser.add_argument("--profile", choices=PROFILES, help="build a self-contained test profile")
    parser.add_argument(
        "--profile-dir", type=Path, help="folder that keeps the --profile models between runs"
    )
    parser.add_argument("--method", choices=METHODS, help="override the config's method")
    parser.add_argument("--strategy", choices=SELECTION_STRATEGIES, help="override the selection strategy")
    parser.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N, auto)")
    parser.add_argument(
        "--overlays",
        type=int,
        default=0,
        help="write the N lowest-IoU samples per split (and --compare row) as PNGs",
    )
    parser.add_argument("--limit", type=int, help="at most N samples per split")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls before timing (per model; default 1)"
    )
    parser.add_argument(
        "--image-root",
        action="append",
        type=_image_root,
        default=[],
        help="LLM-Seg40K images: NAME=DIR or DIR",
    )
    parser.add_argument(
        "--mask-root", type=Path, help="LLM-Seg40K: folder of relative segmentation_path files"
    )
    parser.add_argument(
        "--compare",
        action="append",
        type=_compare_row,
        default=[],
        metavar="NAME[=CONFIG]",
        help="one row of a method comparison (repeatable); NAME labels the row (letters, digits, "
        "'.', '_', '+', '-'). NAME=CONFIG: a SegmenterConfig JSON / YAML "
        "file (its method and weights_dir; only --device applies). NAME alone: a method name; the row "
        "uses the base config (--config / --profile, with --weights / --strategy applied) with "
        f"method NAME ({', '.join(METHODS)}). --device applies to every row. Writes "
        "OUT/SPLIT/comparison.json and OUT/SPLIT/comparison.md for every split (also a single one); "
        "not with --pred-dir or --method",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> EvalSettings:
    """Command line → :class:`EvalSettings` (argparse errors exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    splits = tuple(s for item in (args.split or ["val"]) for s in item.split(",") if s)
    try:
        return EvalSettings(
            dataset=args.dataset,
            root=args.root,
            splits=splits,
            out=args.out,
            pred_dir=args.pred_dir,
            allow_missing=args.allow_missing,
            config_file=args.config,
            weights=args.weights,
            profile=args.profile,
            profile_dir=args.profile_dir,
            method=args.method,
            strategy=args.strategy,
            device=args.device,
            overlays=args.overlays,
            limit=args.limit,
            warmup=args.warmup,
            image_roots=dict(args.image_root),
            mask_root=args.mask_root,
            compare=tuple(args.compare),
        )
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 1 bad data or predictions, 2 bad usage)."""
    settings = parse_args(argv)
    shown = os.environ.get("RANK", "0") == "0"  # one report per job (torchrun / accelerate set RANK)
    try:
        if settings.compare:
            comparisons = run_comparison(settings)
        else:
            report = run_evaluation(settings)
    except ValueError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    if not shown:
        return 0
    if settings.compare:
        for split, comparison in comparisons.items():
            print(comparison_markdown(comparison))
            print(f"comparison written to {comparison_dir(settings.out, split) / 'comparison.json'}\n")
    else:
        print(report_markdown(report))
        print(f"report written to {settings.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
