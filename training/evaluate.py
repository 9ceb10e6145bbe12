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
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

if importlib.util.find_spec("llmseg_ros") is None:  # a source checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import yaml

from llmseg_ros.config import METHODS, SELECTION_STRATEGIES, SegmenterConfig, SelectionConfig
from llmseg_ros.data.io import atomic_write_json, atomic_write_text, read_single_channel, write_image
from llmseg_ros.data.jsonl import JsonlDataset
from llmseg_ros.data.llmseg40k import LLMSeg40KDataset
from llmseg_ros.data.reasonseg import ReasonSegDataset
from llmseg_ros.data.sample import Sample
from llmseg_ros.evaluation.report import (
    EvalRecord,
    Predictor,
    WorstSamples,
    evaluate_samples,
    markdown_table,
    query_type_breakdown,
)

DATASETS = ("reasonseg", "llmseg40k", "jsonl")
PROFILES = ("tiny",)
TRAINED_METHODS = ("llmseg", "lisa")  # the methods that read weights_dir
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class CompareRow:
    """One row of a ``--compare`` table.

    Attributes:
        name: the row label; a method name (see ``METHODS``) when ``config`` is ``None``.
        config_file: the SegmenterConfig file given as ``NAME=CONFIG``, else ``None``.
        config: that file's content (read when the row is parsed), else ``None``: the row
            uses the base config with ``method = name``.
    """

    name: str
    config_file: Path | None = None
    config: SegmenterConfig | None = None

    def __post_init__(self) -> None:
        if not ROW_NAME.fullmatch(self.name):
            raise ValueError(
                f"--compare NAME must be a non-empty label of letters, digits, '.', '_', '+' or '-' "
                f"(it labels a table row and names overlay files), got {self.name!r}"
            )
        if (self.config_file is None) != (self.config is None):
            raise ValueError(f"--compare {self.name}: give both config_file and config, or neither")
        if self.config is None and self.name not in METHODS:
            raise ValueError(
                f"--compare {self.name!r}: unknown method {self.name!r}; expected one of {list(METHODS)}, "
                "or NAME=CONFIG with a SegmenterConfig file"
            )

    @classmethod
    def parse(cls, text: str) -> CompareRow:
        """``NAME`` or ``NAME=CONFIG`` → a row (``CONFIG`` is read now; ``ValueError`` names it)."""
        name, sep, path = text.partition("=")
        if not sep:
            return cls(name)
        if not path:
            raise ValueError(f"--compare {text!r}: expected NAME=CONFIG with a config file after '='")
        config_file = Path(path)
        try:
            config = SegmenterConfig.from_file(config_file)
        except (ValueError, TypeError, yaml.YAMLError) as exc:
            raise ValueError(f"--compare {text!r}: cannot use config file {config_file}: {exc}") from exc
        return cls(name, config_file, config)


class _Dataset(Protocol):
    @property
    def sample_ids(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


@dataclass
class EvalSettings:
    """Everything the evaluation needs (built from the command line by :func:`parse_args`).

    Attributes:
        dataset: ``reasonseg`` | ``llmseg40k`` | ``jsonl``.
        root: ReasonSeg folder; LLM-Seg40K JSON file or folder of ``{split}.json``; JSONL
            file or folder of ``{split}.jsonl``.
        splits: split names, evaluated in order.
        out: report folder.
        pred_dir: folder of predicted PNG masks (prediction mode), else ``None``.
        allow_missing: score a missing prediction as an empty mask instead of failing.
        config_file / weights / profile: model source (model mode).
        profile_dir: where ``--profile tiny`` keeps its models (reused across runs);
            ``None``: a temporary folder removed afterwards.
        method / strategy / device: overrides of the model config.
        overlays: lowest-IoU samples per split to draw.
        limit: evaluate at most this many samples per split.
        warmup: untimed predictor calls on the first sample before timing (model mode).
        image_roots: LLM-Seg40K image folder per ``from_dataset`` (key ``""``: every source).
        mask_root: folder that LLM-Seg40K ``segmentation_path`` values resolve against.
        compare: rows of a method comparison (comparison mode when not empty).
    """

    dataset: str
    root: Path
    splits: tuple[str, ...] = ("val",)
    out: Path = Path("eval_report")
    pred_dir: Path | None = None
    allow_missing: bool = False
    config_file: Path | None = None
    weights: Path | None = None
    profile: str | None = None
    profile_dir: Path | None = None
    method: str | None = None
    strategy: str | None = None
    device: str | None = None
    overlays: int = 0
    limit: int | None = None
    warmup: int = 1
    image_roots: dict[str, Path] = field(default_factory=dict)
    mask_root: Path | None = None
    compare: tuple[CompareRow, ...] = ()

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if not self.splits:
            raise ValueError("give at least one split")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct, got {list(self.splits)}")
        base_args = self.config_file is not None or self.weights is not None or self.profile is not None
        model_args = base_args or bool(self.compare)
        if self.pred_dir is not None and self.compare:
            raise ValueError(
                "--compare runs models; it cannot be combined with --pred-dir (saved predictions)"
            )
        if self.pred_dir is not None and model_args:
            raise ValueError(
                "--pred-dir evaluates saved predictions; it cannot be combined with a model source"
            )
        if self.pred_dir is None and not model_args:
            raise ValueError("give --pred-dir, or a model through --config, --weights or --profile")
        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {list(PROFILES)}, got {self.profile!r}")
        if self.profile is not None and (self.config_file is not None or self.weights is not None):
            raise ValueError(
                "--profile builds its own config and weights; do not combine it with --config/--weights"
            )
        if self.overlays < 0:
            raise ValueError(f"overlays must be >= 0, got {self.overlays}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        self._check_compare(base_args)

    def _check_compare(self, base_args: bool) -> None:
        if not self.compare:
            return
        names = [row.name for row in self.compare]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"--compare names must be distinct; given more than once: {twice}")
        if self.method is not None:
            raise ValueError(
                "--method picks the model of a single run; with --compare each row names its method "
                "(NAME or NAME=CONFIG)"
            )
        bare = [row.name for row in self.compare if row.config is None]
        if bare and not base_args:
            raise ValueError(
                f"--compare {bare[0]} has no =CONFIG, so it uses the base model config: give --config, "
                "--weights or --profile, or NAME=CONFIG"
            )

    @property
    def mode(self) -> str:
        if self.compare:
            return "compare"
        return "pred_dir" if self.pred_dir is not None else "model"


# -- datasets -------------------------------------------------------------------------


def _split_file(root: Path, split: str, suffix: str, several: bool) -> Path:
    if root.is_file():
        if several:
            raise ValueError(
                f"--root {root} is a single file; evaluate several splits from a folder of {suffix} files"
            )
        return root
    if not root.is_dir():
        raise ValueError(f"--root {root} does not exist")
    exact = [root / f"{split}{suffix}", root / f"llmseg40k_{split}{suffix}"]
    for path in exact:
        if path.is_file():
            return path
    matches = sorted(root.glob(f"*{split}*{suffix}"))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"no {suffix} file for split {split!r} in {root} (expected {exact[0].name})")
    raise ValueError(f"several {suffix} files match split {split!r} in {root}: {[m.name for m in matches]}")


def load_split(settings: EvalSettings, split: str) -> _Dataset:
    """The dataset reader of one split (lazy: pixels load on indexing)."""
    several = len(settings.splits) > 1
    if settings.dataset == "reasonseg":
        return ReasonSegDataset(settings.root, split)
    if settings.dataset == "llmseg40k":
        # a root given without a name serves every from_dataset
        roots: dict[str, Path] | Path | None = (
            settings.image_roots.get("") or dict(settings.image_roots) or None
        )
        return LLMSeg40KDataset(
            _split_file(settings.root, split, ".json", several), roots, mask_root=settings.mask_root
        )
    return JsonlDataset(_split_file(settings.root, split, ".jsonl", several))


# -- predictors -----------------------------------------------------------------------


def pred_dir_predictor(
    directory: Path, sample_ids: Sequence[str], *, allow_missing: bool = False
) -> tuple[Predictor, list[str]]:
    """Predictor reading ``{directory}/{sample id}.png`` (``> 0`` foreground).

    Returns the predictor and the ids without a file. Missing files raise ``ValueError``
    unless ``allow_missing``, in which case they predict an empty mask.
    """
    if not directory.is_dir():
        raise ValueError(f"prediction folder {directory} does not exist")
    missing = [i for i in sample_ids if not (directory / f"{i}.png").is_file()]
    if missing and not allow_missing:
        shown = ", ".join(f"{i}.png" for i in missing[:5])
        raise ValueError(
            f"{len(missing)} of {len(sample_ids)} predictions missing in {directory} (e.g. {shown}); "
            "pass --allow-missing to score them as empty masks"
        )
    missing_set = set(missing)

    def predict(sample: Sample) -> np.ndarray:
        if sample.image_id in missing_set:
            return np.zeros(sample.mask.shape, dtype=bool)
        return read_single_channel(directory / f"{sample.image_id}.png") > 0

    return predict, missing


def resolve_config(settings: EvalSettings, scratch: Path, method: str | None = None) -> SegmenterConfig:
    """The model config named by ``settings`` (``--profile`` / ``--config`` / ``--weights`` + overrides).

    Args:
        scratch: a folder that lives as long as the evaluation (holds the ``--profile``
            models when no ``profile_dir`` is given).
        method: the method to select, overriding ``settings.method`` (a ``--compare`` row).
    """
    method = method if method is not None else settings.method
    if settings.profile == "tiny":
        from llmseg_ros.tiny import build_tiny_profile

        profile_dir = settings.profile_dir if settings.profile_dir is not None else scratch / "tiny"
        # the profile picks the models that fit the method (e.g. a different VLM for vlm_*)
        config = build_tiny_profile(profile_dir, method=method or "llmseg")
    else:
        config = (
            SegmenterConfig.from_file(settings.config_file) if settings.config_file else SegmenterConfig()
        )
        if settings.weights is not None:
            config = config.replace(weights_dir=str(settings.weights))
        if method is not None:
            config = config.replace(method=method)
    if settings.device is not None:
        config = config.replace(device=settings.device)
    if settings.strategy is not None:
        config = config.replace(selection=SelectionConfig(strategy=settings.strategy))
    return config


def row_config(settings: EvalSettings, row: CompareRow, scratch: Path) -> tuple[SegmenterConfig, bool]:
    """The config of one ``--compare`` row, and whether its selection overrides every call.

    ``NAME=CONFIG`` rows use their file with only ``--device`` applied; ``NAME`` rows use
    :func:`resolve_config` with ``method = NAME`` (``--weights`` / ``--strategy`` apply).
    """
    if row.config is None:
        return resolve_config(settings, scratch, method=row.name), settings.strategy is not None
    config = row.config
    if settings.device is not None:
        config = config.replace(device=settings.device)
    return config, False


def model_predictor(config: SegmenterConfig, *, override_selection: bool = False) -> Predictor:
    """Build a :class:`llmseg_ros.pipeline.ReasonSegmenter` and wrap it as a predictor.

    Args:
        config: the segmenter's config.
        override_selection: also pass ``config.selection`` to every ``segment`` call.
    """
    from llmseg_ros.pipeline import ReasonSegmenter

    return segmenter_predictor(ReasonSegmenter(config), override_selection=override_selection)


@contextlib.contextmanager
def loaded_segmenter(config: SegmenterConfig) -> Iterator[Any]:
    """A :class:`llmseg_ros.pipeline.ReasonSegmenter` (models load on first use), closed on exit."""
    from llmseg_ros.pipeline import ReasonSegmenter

    segmenter = ReasonSegmenter(config)
    try:
        yield segmenter
    finally:
        segmenter.close()


def segmenter_predictor(segmenter: Any, *, override_selection: bool = False) -> Predictor:
    """Wrap a segmenter as a predictor: sample → (H, W) bool mask at the sample's resolution.

    Args:
        segmenter: a :class:`llmseg_ros.pipeline.ReasonSegmenter`.
        override_selection: also pass ``segmenter.config.selection`` to every ``segment`` call.
    """
    selection = segmenter.config.selection if override_selection else None

    def predict(sample: Sample) -> np.ndarray:
        result = segmenter.segment(
            sample.image, sample.instruction, selection=selection, is_sentence=sample.is_sentence
        )
        return np.asarray(result.mask)

    return predict


# -- report ---------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def run_evaluation(settings: EvalSettings) -> dict[str, Any]:
    """Evaluate every split, write ``report.json`` / ``report.md`` (and overlays) to ``settings.out``.

    Returns the report (the content of ``report.json``).
    """
    datasets = {split: load_split(settings, split) for split in settings.splits}
    report: dict[str, Any] = {
        "dataset": settings.dataset,
        "root": str(settings.root),
        "mode": settings.mode,
        "pred_dir": str(settings.pred_dir) if settings.pred_dir is not None else None,
        "limit": settings.limit,
        "config": None,
        "strategy": settings.strategy,
        "splits": {},
        "missing_predictions": {},
        "overlays": {},
        "samples": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    model_predict: Predictor | None = None
    with contextlib.ExitStack() as stack:
        if settings.pred_dir is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmseg-eval-")))
            config = resolve_config(settings, scratch)
            report["config"] = config.to_dict()
            model_predict = model_predictor(config, override_selection=settings.strategy is not None)
        for split, dataset in datasets.items():
            count = _sample_count(dataset, split, settings.limit)
            ids = dataset.sample_ids[:count]
            if model_predict is not None:
                predict = model_predict
                if split == settings.splits[0]:  # warm up once, before the first timed call
                    for _ in range(settings.warmup):
                        predict(dataset[0])
            else:
                assert settings.pred_dir is not None
                split_dir = settings.pred_dir / split
                directory = (
                    split_dir if len(settings.splits) > 1 and split_dir.is_dir() else settings.pred_dir
                )
                predict, missing = pred_dir_predictor(directory, ids, allow_missing=settings.allow_missing)
                report["missing_predictions"][split] = missing
            worst = WorstSamples(settings.overlays)
            summary, records = evaluate_samples(
                (dataset[i] for i in range(count)), predict, timed=model_predict is not None, callback=worst
            )
            if settings.dataset == "reasonseg":
                report["splits"][split] = query_type_breakdown(records)
            else:
                report["splits"][split] = {"overall": summary}
            report["samples"][split] = [r.to_dict() for r in records]
            report["overlays"][split] = _write_overlays(worst, settings.out, _safe_name(split))
    write_report(report, settings.out)
    return report


def _write_overlays(worst: WorstSamples, out: Path, prefix: str) -> list[str]:
    """Write ``out/overlays/{prefix}_{rank}_{sample id}.png``, worst first; paths relative to ``out``."""
    paths = []
    for rank, (record, image) in enumerate(worst.worst()):
        path = out / "overlays" / f"{prefix}_{rank:03d}_{_safe_name(record.sample_id)}.png"
        write_image(path, image)
        paths.append(str(path.relative_to(out)))
    return paths


def _sample_count(dataset: _Dataset, split: str, limit: int | None) -> int:
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError(f"split {split!r} has no samples")
    return count


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


# -- comparison -----------------------------------------------------------------------


def comparison_dir(out: Path, split: str) -> Path:
    """Folder of one split's comparison: ``out/{split}`` (unsafe characters replaced by ``_``)."""
    return out / _safe_name(split)


def run_comparison(settings: EvalSettings) -> dict[str, dict[str, Any]]:
    """Run every ``--compare`` row on the same samples; write one comparison per split.

    Rows run in order; each row's segmenter loads once, evaluates every split (after
    ``settings.warmup`` untimed calls on the first sample) and is closed before the next
    row. After each row, ``{out}/{split}/comparison.json`` / ``comparison.md`` are
    rewritten atomically (see :func:`comparison_markdown`), so a failure keeps the rows
    already done (``pending`` lists the others).

    Returns:
        split → comparison (the content of its ``comparison.json``).
    """
    if not settings.compare:
        raise ValueError("run_comparison needs at least one --compare row")
    folders = {split: comparison_dir(settings.out, split) for split in settings.splits}
    if len(set(folders.values())) != len(folders):
        raise ValueError(f"splits {list(settings.splits)} share a folder name once made file-safe")
    datasets = {split: load_split(settings, split) for split in settings.splits}
    counts = {split: _sample_count(dataset, split, settings.limit) for split, dataset in datasets.items()}
    names = [row.name for row in settings.compare]
    comparisons: dict[str, dict[str, Any]] = {
        split: {
            "title": f"Methods comparison: {settings.dataset} / {split}",
            "dataset": settings.dataset,
            "root": str(settings.root),
            "split": split,
            "n": counts[split],
            "limit": settings.limit,
            "rows": names,
            "pending": list(names),
            "configs": {},
            "methods": {},
            "breakdown": {},
            "samples": {},
            "overlays": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for split in settings.splits
    }
    with tempfile.TemporaryDirectory(prefix="llmseg-compare-") as scratch:
        # resolve every row first: a bad config fails before any model loads
        configs = [row_config(settings, row, Path(scratch)) for row in settings.compare]
        for row, (config, override_selection) in zip(settings.compare, configs, strict=True):
            with loaded_segmenter(config) as segmenter:
                predict = segmenter_predictor(segmenter, override_selection=override_selection)
                if settings.warmup:  # untimed calls: load the models, warm the caches
                    first = datasets[settings.splits[0]][0]
                    for _ in range(settings.warmup):
                        predict(first)
                for split, dataset in datasets.items():
                    worst = WorstSamples(settings.overlays)
                    summary, records = evaluate_samples(
                        (dataset[i] for i in range(counts[split])), predict, callback=worst
                    )
                    folder = folders[split]
                    _add_row(comparisons[split], row.name, config, summary, records, settings.dataset)
                    comparisons[split]["overlays"][row.name] = _write_overlays(worst, folder, row.name)
                    comparisons[split]["pending"].remove(row.name)
                    write_comparison(comparisons[split], folder)
    return comparisons


def _add_row(
    comparison: dict[str, Any],
    name: str,
    config: SegmenterConfig,
    summary: dict[str, Any],
    records: Sequence[EvalRecord],
    dataset: str,
) -> None:
    comparison["configs"][name] = config.to_dict()
    comparison["methods"][name] = summary
    if dataset == "reasonseg":
        comparison["breakdown"][name] = query_type_breakdown(records)
    comparison["samples"][name] = [{"id": r.sample_id, "iou": r.iou, "seconds": r.seconds} for r in records]


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


# -- command line ---------------------------------------------------------------------


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
    if settings.compare:
        try:
            comparisons = run_comparison(settings)
        except ValueError as exc:
            print(f"evaluate.py: error: {exc}", file=sys.stderr)
            return 1
        for split, comparison in comparisons.items():
            print(comparison_markdown(comparison))
            print(f"comparison written to {comparison_dir(settings.out, split) / 'comparison.json'}\n")
        return 0
    try:
        report = run_evaluation(settings)
    except ValueError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    print(report_markdown(report))
    print(f"report written to {settings.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
