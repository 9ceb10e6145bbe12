"""What an evaluation run needs: the dataset, the model source, the rows of a comparison.

:class:`EvalSettings` is the typed form of ``training/evaluate.py``'s command line (the
script converts its arguments into one and calls :mod:`llmseg_ros.evaluation.runner`);
:class:`CompareRow` is one ``--compare NAME[=CONFIG]`` entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmseg_ros.config import METHODS, SegmenterConfig

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


@dataclass
class EvalSettings:
    """Everything an evaluation run needs (``training/evaluate.py`` builds one from its command line).

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
        """``compare`` (``--compare`` rows), ``pred_dir`` (saved masks) or ``model`` (one model)."""
        if self.compare:
            return "compare"
        return "pred_dir" if self.pred_dir is not None else "model"
