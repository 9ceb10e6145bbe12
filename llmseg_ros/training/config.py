"""Typed configuration of a training run (``training/train.py --config FILE``).

A config file (YAML or JSON) holds the fields of :class:`TrainConfig`; ``sources`` is a
list of :class:`DataSource` mappings and ``lora`` a :class:`~llmseg_ros.config.LoraSettings`
mapping. Every object validates itself and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmseg_ros.config import SAM_MODEL_TYPES, LoraSettings, ProposalConfig, SelectionConfig
from llmseg_ros.utils.configfile import load_config_file

SOURCE_KINDS = ("reasonseg", "llmseg40k", "jsonl")
INSTRUCTION_CHOICES = ("random", "first")
TEMPLATE_CHOICES = ("lisa", "inference")
DRAW_CHOICES = ("image", "question")
IGNORE_PIXEL_CHOICES = ("background", "exclude")
SEG_INIT_CHOICES = ("normal", "mean")
VAL_METRICS = ("giou", "giou_1024")
PRECISIONS = ("auto", "no", "bf16", "fp16")
PROFILES = ("custom", "tiny")
IOU_DIRECTIONS = ("pred_gt", "gt_pred")
RESUME_MODES = ("auto", "never")
TRAIN_METHODS = ("llmseg", "lisa")


@dataclass
class DataSource:
    """One dataset in the training mix.

    Attributes:
        kind: ``reasonseg`` (folder with train/val/test), ``llmseg40k`` (one JSON file)
            or ``jsonl`` (our JSON Lines format, ``llmseg_ros.data.jsonl``).
        path: the ReasonSeg root folder, the LLM-Seg40K JSON file or the JSONL file.
        rate: sampling rate; each training sample comes from this source with
            probability ``rate / Σ rates`` (LISA's ``sample_rate``, e.g. 9/3/1).
        split: ReasonSeg split folder (ignored by the other kinds).
        image_root: LLM-Seg40K image folder, or ``{from_dataset: folder}``; ``None`` = the
            JSON file's folder.
        mask_root: LLM-Seg40K folder for relative ``segmentation_path`` PNGs.
        cache: proposal cache directory (or list of directories) written by
            ``training/precompute.py``; ``None`` runs SAM on the fly (slow).
        name: label in logs (default: the kind).
        instructions: ``random`` draws one of a sample's instructions (ReasonSeg's
            paraphrases) per draw, as LISA trains; ``first`` always uses the first.
        templates: ``lisa`` draws the question and answer templates at random from
            LISA's lists (:mod:`llmseg_ros.models.prompts`), as LISA / LLM-Seg train;
            ``inference`` always uses the one prompt and answer the pipeline uses at
            inference time.
        draw: what one draw from this source is. ``image`` (default): an image, uniformly
            over the source's distinct images, with up to ``questions`` of its questions
            drawn without replacement — every instruction of every record of that image
            (ReasonSeg's paraphrases; the categories or referring expressions of a
            converted semantic / referring segmentation set, one JSONL line each), as
            LISA's and LLM-Seg's ``sem_seg`` / ``refer_seg`` / ``reason_seg`` datasets
            draw. ``question``: one question, uniformly over the records (LLM-Seg's
            LLM-Seg40K fine-tuning set); ``questions`` is then ignored.
        questions: the most questions per drawn image (LISA / LLM-Seg
            ``num_classes_per_sample``, 3). Each is its own conversation with the image;
            all of them are supervised in the same step.
    """

    kind: str
    path: str
    rate: float = 1.0
    split: str = "train"
    image_root: str | dict[str, str] | None = None
    mask_root: str | None = None
    cache: str | list[str] | None = None
    name: str = ""
    instructions: str = "random"
    templates: str = "lisa"
    draw: str = "image"
    questions: int = 3

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"source kind must be one of {list(SOURCE_KINDS)}, got {self.kind!r}")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"source path must be a non-empty string, got {self.path!r}")
        if not (isinstance(self.rate, int | float) and self.rate > 0):
            raise ValueError(f"source rate must be > 0, got {self.rate!r}")
        if self.instructions not in INSTRUCTION_CHOICES:
            raise ValueError(
                f"source instructions must be one of {list(INSTRUCTION_CHOICES)}, got {self.instructions!r}"
            )
        if self.templates not in TEMPLATE_CHOICES:
            raise ValueError(
                f"source templates must be one of {list(TEMPLATE_CHOICES)}, got {self.templates!r}"
            )
        if self.draw not in DRAW_CHOICES:
            raise ValueError(f"source draw must be one of {list(DRAW_CHOICES)}, got {self.draw!r}")
        if isinstance(self.questions, bool) or not isinstance(self.questions, int) or self.questions < 1:
            raise ValueError(f"source questions must be an integer >= 1, got {self.questions!r}")
        if isinstance(self.cache, tuple):
            self.cache = list(self.cache)
        self.name = self.name or self.kind

    @property
    def cache_dirs(self) -> list[str]:
        if self.cache is None:
            return []
        return [self.cache] if isinstance(self.cache, str) else list(self.cache)


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Method: ``method`` — ``llmseg`` (selector over SAM proposals; the default) or
    ``lisa`` (the ``<SEG>`` embedding prompts a trainable copy of SAM's mask decoder; the
    SAM image encoder stays frozen, no proposals or caches are used, ``sam_checkpoint``
    is required).

    Models:
        vlm: hub id or directory of the LLaVA model (``LlavaForConditionalGeneration``).
        dinov2: hub id or directory of DINOv2 (frozen; only used when a cache holds no
            features).
        embed_size: DINOv2 input long side (896).
        sam_checkpoint / sam_model_type / proposals: SAM for sources without a cache
            (LLM-Seg), or the SAM whose mask decoder LISA fine-tunes.
        lora: LoRA settings of the VLM (r 8, α 16, dropout 0.05 on q_proj, v_proj).
        init_weights: a weights directory (``llmseg_ros.weights.directory`` format) to start from,
            e.g. the ReasonSeg model when fine-tuning on LLM-Seg40K; ``None`` = fresh heads
            and adapter.
        gradient_checkpointing: recompute the VLM's activations in the backward pass.
        vlm_dtype: dtype of the frozen VLM / DINOv2 weights: ``auto`` (bfloat16 on CUDA
            with bf16 support, float16 on other CUDA, float32 on CPU), or explicit.

    Optimisation (LLM-Seg: AdamW lr 1e-4, WarmupDecayLR, batch 1 × 10 accumulation):
        lr, betas, weight_decay, eps: AdamW.
        head_lr: learning rate of the mask side (LLM-Seg: selector and ``mask_proj``;
            LISA: the mask decoder) when it should differ from the query side's (VLM
            adapter, embeddings, LM head, text projection); ``None`` = ``lr`` for
            everything, as the papers train.
        warmup_steps: linear warm-up from 0 to ``lr`` over these optimizer steps, then a
            linear decay to 0 at ``max_steps`` (DeepSpeed's WarmupDecayLR, linear type).
        max_steps: optimizer steps of the whole run.
        batch_size: samples per device per micro-step.
        grad_accum: micro-steps per optimizer step.
        max_grad_norm: gradient clipping (L2 norm); ``None`` or 0 = none.
        precision: ``auto`` (bf16 where supported, else fp16 on CUDA, none on CPU),
            ``no``, ``bf16`` or ``fp16`` — autocast through ``accelerate``.

    Losses: ``iou_weight`` (λ_iou 1), ``iop_weight`` (λ_iop 50), ``tau`` (0.05),
    ``iou_direction`` (default ``gt_pred`` = the released code's KL(gt ‖ pred), which the
    published numbers come from; ``pred_gt`` = the paper's formula read literally),
    ``lm_weight`` (1); LISA: ``bce_weight`` (2.0) and ``dice_weight`` (0.5) on the mask,
    plus ``lm_weight`` on the text. ``ignore_pixels``: ground-truth pixels labelled 255
    count as ``background`` in the IoU / IoP targets and LISA's mask loss (default, as
    both papers' released code trains) or are ``exclude``-d from them
    (:mod:`llmseg_ros.models.losses`). The metrics always exclude them.

    ``<SEG>``: ``seg_init`` — how a fresh adapter's ``<SEG>`` rows of the input embeddings
    and the LM head start: ``normal`` (default) draws each from N(0, σ²) with σ the
    language model's ``initializer_range`` (0.02 for LLaMA), which is what the authors'
    ``resize_token_embeddings`` did (transformers 4.29 / 4.31 initialise new rows with
    the model's ``_init_weights``); ``mean`` keeps the mean of the existing rows that
    :meth:`~llmseg_ros.models.vlm.SegVLM.load` puts there (transformers ≥ 4.46 resize
    from the mean and covariance instead). Ignored with ``init_weights`` (the adapter
    holds trained rows).

    Validation (LLM-Seg / LISA validate on ReasonSeg val after every epoch of 500 steps
    and keep the checkpoint with the best gIoU): ``val_source`` — a data source read as
    an evaluation set (its first instruction per sample, as the evaluator does; a
    proposal cache is used when given); ``val_every`` — validate every that many
    optimizer steps (0 = only after the last step) and after the last step;
    ``val_limit`` — the first N samples only (``None`` = all); ``val_selection`` — the
    selection strategy scored (default: IoP > 0.5, the strategy the LLM-Seg authors
    picked their checkpoint with); ``val_metric`` — what "best" compares: ``giou`` (at
    each image's resolution, as LISA's ``train_ds.py`` and the evaluator) or
    ``giou_1024`` (prediction and truth nearest-resized to 1024 × 1024 first, as LLM-Seg's
    ``validate_threshold``). The weights with the best score so far are exported to
    ``OUTPUT_DIR/weights_best`` (strictly greater than the previous best, as the authors
    compare), the last ones to ``OUTPUT_DIR/weights``; scores go to
    ``OUTPUT_DIR/validation.jsonl``.

    Run: ``output_dir`` (checkpoints, logs, final weights under ``weights/``),
    ``checkpoint_every`` (optimizer steps; 0 = only at the end), ``keep_checkpoints``,
    ``log_every``, ``seed``, ``num_workers`` (DataLoader worker processes),
    ``resume`` (``auto`` continues from the newest checkpoint in ``output_dir``, ``never``
    refuses to start over an existing run), ``stop_after`` (stop this invocation after
    that many optimizer steps in total, keeping the schedule of ``max_steps``: for
    time-limited jobs and for resume tests), ``profile`` (``tiny`` = tiny random models).
    """

    sources: list[DataSource] = field(default_factory=list)
    method: str = "llmseg"
    vlm: str = "llava-hf/llava-1.5-7b-hf"
    dinov2: str = "facebook/dinov2-large"
    embed_size: int = 896
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    init_weights: str | None = None
    gradient_checkpointing: bool = False
    vlm_dtype: str = "auto"

    lr: float = 1e-4
    head_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 5000
    batch_size: int = 1
    grad_accum: int = 10
    max_grad_norm: float | None = 1.0
    precision: str = "auto"

    iou_weight: float = 1.0
    iop_weight: float = 50.0
    lm_weight: float = 1.0
    tau: float = 0.05
    iou_direction: str = "gt_pred"
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    ignore_pixels: str = "background"
    seg_init: str = "normal"

    val_source: DataSource | None = None
    val_every: int = 0
    val_limit: int | None = None
    val_selection: SelectionConfig = field(default_factory=SelectionConfig)
    val_metric: str = "giou"

    output_dir: str = "runs/llmseg"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    resume: str = "auto"
    stop_after: int | None = None
    profile: str = "custom"
    device: str = "auto"

    def __post_init__(self) -> None:
        self.sources = [
            s if isinstance(s, DataSource) else _build(DataSource, s, "sources[]") for s in self.sources
        ]
        if isinstance(self.lora, dict):
            self.lora = _build(LoraSettings, self.lora, "lora")
        if isinstance(self.proposals, dict):
            self.proposals = _build(ProposalConfig, self.proposals, "proposals")
        if isinstance(self.val_source, dict):
            self.val_source = _build(DataSource, self.val_source, "val_source")
        if isinstance(self.val_selection, dict):
            self.val_selection = _build(SelectionConfig, self.val_selection, "val_selection")
        if self.val_source is not None and not isinstance(self.val_source, DataSource):
            raise ValueError(
                f"val_source must be a mapping of DataSource fields or null, got {type(self.val_source).__name__}"
            )
        if not isinstance(self.val_selection, SelectionConfig):
            raise ValueError(
                f"val_selection must be a mapping of SelectionConfig fields, got {type(self.val_selection).__name__}"
            )
        if not isinstance(self.lora, LoraSettings):
            raise ValueError(f"lora must be a mapping of LoraSettings fields, got {type(self.lora).__name__}")
        if not isinstance(self.proposals, ProposalConfig):
            raise ValueError(
                f"proposals must be a mapping of ProposalConfig fields, got {type(self.proposals).__name__}"
            )
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.sam_model_type not in SAM_MODEL_TYPES:
            raise ValueError(
                f"sam_model_type must be one of {list(SAM_MODEL_TYPES)}, got {self.sam_model_type!r}"
            )
        if self.embed_size < 14 or self.embed_size % 14 != 0:
            raise ValueError(f"embed_size must be a positive multiple of 14, got {self.embed_size}")
        if self.vlm_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"vlm_dtype must be auto, float32, float16 or bfloat16, got {self.vlm_dtype!r}")
        for name in ("lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "weight_decay",
            "iou_weight",
            "iop_weight",
            "lm_weight",
            "eps",
            "bce_weight",
            "dice_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "checkpoint_every", "num_workers", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"head_lr must be > 0 or null, got {self.head_lr!r}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 or null, got {self.max_grad_norm!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 or null, got {self.stop_after!r}")
        if self.val_limit is not None and self.val_limit < 1:
            raise ValueError(f"val_limit must be >= 1 or null, got {self.val_limit!r}")
        if self.val_every and self.val_source is None:
            raise ValueError(f"val_every is {self.val_every} but no val_source is set")
        choices: tuple[tuple[str, tuple[str, ...]], ...] = (
            ("precision", PRECISIONS),
            ("profile", PROFILES),
            ("iou_direction", IOU_DIRECTIONS),
            ("resume", RESUME_MODES),
            ("method", TRAIN_METHODS),
            ("ignore_pixels", IGNORE_PIXEL_CHOICES),
            ("seg_init", SEG_INIT_CHOICES),
            ("val_metric", VAL_METRICS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "training config")

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a JSON (``.json``) or YAML file holding the fields of this class (errors name file and line)."""
        return load_config_file(path).build(cls.from_dict)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        """Hash of the fields that must not change when a run is resumed.

        Run-control fields (output_dir, checkpoint_every, keep_checkpoints, log_every,
        num_workers, resume, stop_after) may change between invocations.
        """
        data = self.to_dict()
        for name in (
            "output_dir",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "num_workers",
            "resume",
            "stop_after",
        ):
            data.pop(name)
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _build(cls: Any, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; expected some of {sorted(known)}")
    return cls(**data)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Parse a JSON (``.json``) or YAML file that must hold a mapping (``ValueError`` names file and line)."""
    return load_config_file(path).data
