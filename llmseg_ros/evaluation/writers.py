"""The files an evaluation writes: ``report.{json,md}``, ``comparison.{json,md}`` and overlays.

Every file is written atomically (a temporary name, then a rename), so a reader never
sees a half-written report.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.io import atomic_write_json, atomic_write_text, write_image
from llmseg_ros.evaluation.report import EvalRecord, markdown_table
from llmseg_ros.evaluation.settings import TRAINED_METHODS

__all__ = [
    "comparison_dir",
    "comparison_markdown",
    "report_markdown",
    "safe_name",
    "write_comparison",
    "write_overlays",
    "write_report",
]


def safe_name(text: str) -> str:
    """``text`` as part of a file name: every run of characters other than letters, digits
    and ``._-`` becomes ``_``; at most 120 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def write_overlays(
    worst: Sequence[tuple[EvalRecord, np.ndarray]], out: Path, prefix: str, *, write: bool = True
) -> list[str]:
    """Write ``out/overlays/{prefix}_{rank}_{sample id}.png``; paths relative to ``out``.

    Args:
        worst: (record, (H, W, 3) uint8 RGB overlay) pairs, worst first (see
            :meth:`~llmseg_ros.evaluation.report.WorstSamples.worst`).
        write: ``False`` only names the files (a process that is not the one writing).
    """
    paths = []
    for rank, (record, image) in enumerate(worst):
        path = out / "overlays" / f"{prefix}_{rank:03d}_{safe_name(record.sample_id)}.png"
        if write:
            write_image(path, image)
        paths.append(str(path.relative_to(out)))
    return paths


def report_markdown(report: dict[str, Any]) -> str:
    """The Markdown form of a report (one row per split and subset)."""
    rows = []
    for split, subsets in report["splits"].items():
        for subset, summary in subsets.items():
            if summary is not None:
                rows.append((f"{split} / {subset}", summary))
    lines = [
        "# Evaluation report",
        "",
        f"- dataset: `{report['dataset']}` at `{report['root']}`",
        f"- mode: {report['mode']}" + (f" (`{report['pred_dir']}`)" if report["pred_dir"] else ""),
    ]
    if report.get("config"):
        config = report["config"]
        lines.append(
            f"- method: `{config.get('method')}`, selection: `{config.get('selection', {}).get('strategy')}`"
        )
    missing = sum(len(v) for v in report.get("missing_predictions", {}).values())
    if missing:
        lines.append(f"- missing predictions scored as empty masks: {missing}")
    lines += [
        "",
        "IoUs in percent; seconds per query only when a model ran.",
        "",
        markdown_table(rows, "Split / subset"),
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write ``report.json`` and ``report.md`` atomically."""
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))


def comparison_dir(out: Path, split: str) -> Path:
    """Folder of one split's comparison: ``out/{split}`` (unsafe characters replaced by ``_``)."""
    return out / safe_name(split)


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The Markdown form of one split's comparison: one row per ``--compare`` entry
    (n, gIoU, cIoU, ncIoU in percent, seconds per query); ReasonSeg adds short / long rows."""
    lines = [
        f"# {comparison['title']}",
        "",
        f"{comparison['n']} samples; IoUs in percent; seconds per query include frame preparation.",
        "",
    ]
    for name, config in comparison["configs"].items():
        details = [f"method `{config['method']}`"]
        if config["method"] in TRAINED_METHODS:
            details.append(f"weights `{config.get('weights_dir')}`")
        if config["method"] == "llmseg":
            details.append(f"selection `{config.get('selection', {}).get('strategy')}`")
        details.append(f"device `{config.get('device')}`")
        lines.append(f"- {name}: {', '.join(details)}")
    if comparison["pending"]:
        lines.append(f"- not run yet: {', '.join(comparison['pending'])}")
    lines += ["", markdown_table(list(comparison["methods"].items()))]
    if comparison["breakdown"]:
        rows = [
            (f"{name} / {subset}", summary)
            for name, subsets in comparison["breakdown"].items()
            for subset, summary in subsets.items()
            if summary is not None
        ]
        lines += [
            "ReasonSeg query types (LISA: short = phrases, long = sentences).",
            "",
            markdown_table(rows, "Method / subset"),
        ]
    return "\n".join(lines)


def write_comparison(comparison: dict[str, Any], folder: Path) -> None:
    """Write ``comparison.json`` and ``comparison.md`` to ``folder`` atomically."""
    atomic_write_json(folder / "comparison.json", comparison)
    atomic_write_text(folder / "comparison.md", comparison_markdown(comparison))
