"""Typed configuration of the LLM-Seg40K data-generation pipeline (paper 002, section 4.2).

Every object validates itself in ``__post_init__`` and raises ``ValueError`` naming the
field and the bad value. The CLI (``training/generate_dataset.py``) builds a
:class:`DatagenConfig`; library code never sees ``argparse`` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

FROM_DATASETS = ("coco", "ego_objects")

CAPTION_PROMPT = "Describe what this image shows in at most ten sentences."
DEFAULT_DEADLINE_S = 600.0
DEFAULT_MAX_REPLY_BYTES = 8 << 20  # a 1024-token completion is a few KiB


def _check_seconds(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def _check_positive(name: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


@dataclass
class SamplingConfig:
    """How images are drawn from the instance annotations (paper section 4.2.1).

    An image is *simple* when its number of distinct categories lies in
    ``[simple_min_categories, simple_max_categories]`` and *complex* when it is at least
    ``complex_min_categories`` (paper: 2–5 and > 5; 6000 simple and 4000 complex LVIS
    images). Draws are uniform without replacement, seeded by ``seed``.
    """

    num_simple: int = 6000
    num_complex: int = 4000
    simple_min_categories: int = 2
    simple_max_categories: int = 5
    complex_min_categories: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("num_simple", self.num_simple, 0)
        _check_positive("num_complex", self.num_complex, 0)
        _check_positive("simple_min_categories", self.simple_min_categories, 1)
        if self.simple_max_categories < self.simple_min_categories:
            raise ValueError(
                f"simple_max_categories must be >= simple_min_categories ({self.simple_min_categories}), "
                f"got {self.simple_max_categories}"
            )
        if self.complex_min_categories <= self.simple_max_categories:
            raise ValueError(
                f"complex_min_categories must be > simple_max_categories ({self.simple_max_categories}), "
                f"got {self.complex_min_categories}"
            )
        if self.num_simple + self.num_complex == 0:
            raise ValueError("num_simple + num_complex must be >= 1, got 0")


@dataclass
class CaptionConfig:
    """Where image descriptions come from: a local VLM or a precomputed JSON file.

    Attributes:
        model: hub id or directory of an image-text-to-text chat model (LLaVA-1.5 in the
            paper); used when ``captions_path`` is ``None``.
        captions_path: JSON object mapping image file name → description; skips the VLM.
        prompt: the single-turn instruction sent with each image.
        max_new_tokens: generation budget of one description.
        device, dtype: as in :func:`llmseg_ros.utils.device.resolve_device` / ``resolve_dtype``.
    """

    model: str | None = None
    captions_path: str | None = None
    prompt: str = CAPTION_PROMPT
    max_new_tokens: int = 256
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.captions_path is None):
            raise ValueError(
                "exactly one of caption model and captions_path must be set, got "
                f"model={self.model!r}, captions_path={self.captions_path!r}"
            )
        if not self.prompt.strip():
            raise ValueError("caption prompt must not be empty")
        _check_positive("max_new_tokens", self.max_new_tokens)


@dataclass
class LLMConfig:
    """The text LLM that writes the questions.

    Either an OpenAI-compatible HTTP endpoint (``base_url``, ``model``, ``api_key``; any
    left ``None`` is read from the environment, see :func:`llmseg_ros.datagen.llm.resolve_http_settings`)
    or a local transformers causal LM (``local_model``).

    Attributes:
        timeout_s: limit of one socket operation of a request (connect, one read; seconds).
        deadline_s: wall-clock limit of one chat request, retries and backoff waits
            included (seconds); a reply still trickling in then is abandoned.
        max_reply_bytes: largest reply body read; a larger one fails the request.
        max_retries: retries after the first attempt on 429, 5xx and connection errors.
        backoff_base_s, backoff_max_s: exponential backoff ``base·2^attempt`` capped at
            ``max``, with jitter; a ``Retry-After`` header overrides it (capped at ``max``).
        temperature: sampling temperature sent to the model; ``None`` leaves the server's.
        max_tokens: completion budget per request.
        prompt_price_per_1k, completion_price_per_1k: cost per 1000 tokens (any currency).
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    local_model: str | None = None
    timeout_s: float = 120.0
    deadline_s: float = DEFAULT_DEADLINE_S
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    temperature: float | None = None
    max_tokens: int = 1024
    prompt_price_per_1k: float = 0.0
    completion_price_per_1k: float = 0.0
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.local_model is not None and self.base_url is not None:
            raise ValueError(
                f"set either local_model ({self.local_model!r}) or base_url ({self.base_url!r}), not both"
            )
        _check_seconds("timeout_s", self.timeout_s)
        _check_seconds("deadline_s", self.deadline_s)
        if (
            isinstance(self.max_reply_bytes, bool)
            or not isinstance(self.max_reply_bytes, int)
            or self.max_reply_bytes < 1
        ):
            raise ValueError(f"max_reply_bytes must be an integer >= 1, got {self.max_reply_bytes!r}")
        _check_positive("max_retries", self.max_retries, 0)
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                "backoff must satisfy 0 <= backoff_base_s <= backoff_max_s, got "
                f"base={self.backoff_base_s!r}, max={self.backoff_max_s!r}"
            )
        if self.temperature is not None and not (0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2] or None, got {self.temperature!r}")
        _check_positive("max_tokens", self.max_tokens)
        for name in ("prompt_price_per_1k", "completion_price_per_1k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class FilterConfig:
    """Post-processing of the LLM's question/answer pairs (paper rules 2, 4 and 7).

    Attributes:
        num_questions: questions asked for per image (5 in the paper) and the most kept.
        max_questions_per_answer: rule 7 (2 in the paper).
        drop_name_leaks: drop a question that spells out its answer's category name (rule 4).
    """

    num_questions: int = 5
    max_questions_per_answer: int = 2
    drop_name_leaks: bool = True

    def __post_init__(self) -> None:
        _check_positive("num_questions", self.num_questions)
        _check_positive("max_questions_per_answer", self.max_questions_per_answer)


@dataclass
class DatagenConfig:
    """One run of the generator.

    Attributes:
        annotations: COCO/LVIS instance JSON (``images``, ``annotations``, ``categories``).
        out: output JSON in the LLM-Seg40K layout (one object keyed by image file name).
        caption: where the image descriptions come from.
        images_dir: folder of the images; required when captioning with a VLM.
        from_dataset: value written to each record's ``from_dataset``.
        workers: concurrent images in flight (LLM requests run in parallel).
        journal_path: progress journal (JSONL); default ``<out>.journal.jsonl``.
        stats_path: statistics JSON; default ``<out stem>.stats.json`` next to ``out``.
        progress: show a tqdm bar.
    """

    annotations: str
    out: str
    caption: CaptionConfig
    images_dir: str | None = None
    from_dataset: str = "coco"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    workers: int = 8
    journal_path: str | None = None
    stats_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.annotations:
            raise ValueError("annotations must name an instance JSON file, got an empty string")
        if not self.out:
            raise ValueError("out must name the output JSON file, got an empty string")
        if self.from_dataset not in FROM_DATASETS:
            raise ValueError(f"from_dataset must be one of {list(FROM_DATASETS)}, got {self.from_dataset!r}")
        _check_positive("workers", self.workers)
        for name, cls in (
            ("sampling", SamplingConfig),
            ("caption", CaptionConfig),
            ("llm", LLMConfig),
            ("filter", FilterConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.caption.model is not None and self.images_dir is None:
            raise ValueError("images_dir is required when captioning with a VLM (caption.model is set)")
        if self.journal_path is None:
            self.journal_path = f"{self.out}.journal.jsonl"
        if self.stats_path is None:
            out = Path(self.out)
            self.stats_path = str(out.with_name(f"{out.stem}.stats.json"))
        if len({self.out, self.journal_path, self.stats_path}) != 3:
            raise ValueError(
                f"out, journal_path and stats_path must differ, got {self.out!r}, "
                f"{self.journal_path!r}, {self.stats_path!r}"
            )
