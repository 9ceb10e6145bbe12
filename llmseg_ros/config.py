"""Typed configuration of the reasoning-segmentation pipeline.

Every object validates itself in ``__post_init__`` and raises ``ValueError`` naming the
field and the bad value. ``SegmenterConfig.from_dict`` / ``to_dict`` give the JSON / YAML
form used by the CLI (``--config``), the ROS parameters and the weights directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmseg_ros.utils.configfile import load_config_file

METHODS = ("llmseg", "lisa", "grounded", "vlm_grounding", "vlm_marks")
SELECTION_STRATEGIES = (
    "top1_iou",
    "iop_threshold",
    "top1_iou_iop_threshold",
    "topk_iou_iop_threshold",
)
DTYPES = ("auto", "float32", "float16", "bfloat16")
SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")
QUANTIZATION = (None, "8bit", "4bit")
PROPOSAL_IMPLEMENTATIONS = ("fast", "reference")
PROPOSAL_DECODERS = ("factored", "exact")
TRACKER_BACKENDS = ("sam", "sam2")


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_known(what: str, data: dict[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; expected some of {sorted(known)}")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


@dataclass
class ProposalConfig:
    """SAM everything-mode parameters (defaults: the reference generator's)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    max_proposals: int = 50
    max_long_side: int = 1024
    implementation: str = "fast"
    decoder: str = "factored"

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        _check_range("pred_iou_thresh", self.pred_iou_thresh, -1e9, 1e9)
        _check_range("box_nms_thresh", self.box_nms_thresh, 0.0, 1.0)
        if self.max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {self.max_proposals}")
        if self.max_long_side < 16:
            raise ValueError(f"max_long_side must be >= 16, got {self.max_long_side}")
        _check_choice("implementation", self.implementation, PROPOSAL_IMPLEMENTATIONS)
        _check_choice("decoder", self.decoder, PROPOSAL_DECODERS)


@dataclass
class SelectionConfig:
    """How proposals are picked from the selector's scores (LLM-Seg Table 3)."""

    strategy: str = "iop_threshold"
    iop_threshold: float = 0.5
    top_k: int = 5

    def __post_init__(self) -> None:
        _check_choice("strategy", self.strategy, SELECTION_STRATEGIES)
        _check_range("iop_threshold", self.iop_threshold, 0.0, 1.0)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class TrackerConfig:
    """How a tracked answer follows its target from frame to frame (``ReasonSegmenter.track``).

    Propagation (``backend``):
        ``sam``: the pipeline's SAM, prompted on each new frame's image encoding with the
        previous mask's box (enlarged by ``box_margin``), ``positive_points`` points
        inside the previous mask, ``negative_points`` points around its box, and the
        previous low-resolution mask logits as the dense prompt. ``sam2``: SAM 2's video
        predictor (``Sam2VideoModel`` from transformers, with its memory bank) loaded
        from ``sam2_model`` (a local directory or hub id).

    Confidence and loss of the target: each update's confidence is in [0, 1] (``sam``:
    SAM's predicted IoU times the mask's stability score; ``sam2``: SAM 2's
    object-presence probability). A frame is *weak* when its confidence is below
    ``lost_below`` or its mask covers less than ``min_area_fraction`` of the image; the
    track is *lost* after ``lost_patience`` weak frames in a row (at once when the mask is
    empty), and recovers on the next confident frame.

    Re-query policy (needs the instruction the track was started with): the full method
    runs again on a frame when ``requery_every`` frames have passed since the last full
    answer (0 = never), when the propagated confidence is below ``requery_below``
    (0 = never), and every ``lost_requery_every`` frames while the track is lost (0 =
    never). Its answer replaces the propagated one.

    Timeout: the track *expires* when ``timeout_s`` seconds of frame time (header
    stamps) pass without a confident update.

    Attributes:
        backend: ``sam`` | ``sam2`` (see above).
        sam2_model: SAM 2 video model directory or hub id; required for ``sam2``.
        positive_points: points sampled inside the previous mask (>= 0).
        negative_points: points sampled outside the previous box (>= 0).
        box_margin: the box prompt grows by this fraction of its width / height on
            every side (room for motion between frames).
        requery_every: frames between periodic full re-queries; 0 = never.
        requery_below: re-query when the propagated confidence is below this; 0 = never.
        lost_requery_every: frames between re-query attempts while lost; 0 = never.
        lost_below: confidence below which a frame is weak.
        lost_patience: consecutive weak frames before the track is lost (>= 1).
        min_area_fraction: masks smaller than this fraction of the image count as empty.
        timeout_s: seconds without a confident update before the track expires (> 0).
        seed: seed of the prompt-point sampling (updates are reproducible).
    """

    backend: str = "sam"
    sam2_model: str | None = None
    positive_points: int = 3
    negative_points: int = 4
    box_margin: float = 0.1
    requery_every: int = 0
    requery_below: float = 0.3
    lost_requery_every: int = 10
    lost_below: float = 0.5
    lost_patience: int = 3
    min_area_fraction: float = 1e-4
    timeout_s: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, TRACKER_BACKENDS)
        if self.backend == "sam2" and not self.sam2_model:
            raise ValueError(
                "sam2_model must name a SAM 2 video model (directory or hub id) for backend 'sam2'"
            )
        for name in ("positive_points", "negative_points", "requery_every", "lost_requery_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if (
            isinstance(self.lost_patience, bool)
            or not isinstance(self.lost_patience, int)
            or self.lost_patience < 1
        ):
            raise ValueError(f"lost_patience must be an integer >= 1, got {self.lost_patience!r}")
        _check_range("box_margin", self.box_margin, 0.0, 2.0)
        _check_range("requery_below", self.requery_below, 0.0, 1.0)
        _check_range("lost_below", self.lost_below, 0.0, 1.0)
        _check_range("min_area_fraction", self.min_area_fraction, 0.0, 1.0)
        if not (self.timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown tracker field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (LLM-Seg / LISA defaults)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        _check_range("dropout", self.dropout, 0.0, 1.0)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


CONVERSATION_FORMATS = ("llava15", "llava_v1")
INSTRUCTION_STYLES = ("ours", "authors")


@dataclass
class PromptFormat:
    """How an instruction becomes the ``<SEG>`` VLM's text, and the answer it is taught with.

    Part of every weights directory's manifest, so each set of weights is queried the way it
    was trained (``llmseg_ros.weights.directory``).

    Attributes:
        conversation: ``llava15``: the processor's chat template (LLaVA-1.5,
            ``"USER: <image>\\n{question} ASSISTANT:"``), our own training's format;
            ``llava_v1``: the LLM-Seg / LISA authors' ``llava_v1`` template (their system
            prompt, ``USER:`` / ``ASSISTANT:`` turns separated by ``" "`` and ``"</s>"``, the
            image as ``<im_start><image><im_end>`` in the first turn), tokenised piece by
            piece as their tokenizer did.
        instruction: ``ours``: whitespace normalised, terminal punctuation added to
            sentences; ``authors``: the stripped instruction verbatim (their validation).
        answer: the teacher-forced answer; holds :attr:`seg_token` exactly once
            (``"It is <SEG>."`` ours, ``"[SEG]."`` the authors' validation).
        seg_token: the segmentation token of the vocabulary (``<SEG>`` ours, ``[SEG]``
            the authors').
    """

    conversation: str = "llava15"
    instruction: str = "ours"
    answer: str = "It is <SEG>."
    seg_token: str = "<SEG>"

    def __post_init__(self) -> None:
        _check_choice("conversation", self.conversation, CONVERSATION_FORMATS)
        _check_choice("instruction", self.instruction, INSTRUCTION_STYLES)
        for name in ("answer", "seg_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a non-empty str, got {getattr(self, name)!r}")
        if self.seg_token != self.seg_token.strip() or any(c.isspace() for c in self.seg_token):
            raise ValueError(f"seg_token must hold no whitespace, got {self.seg_token!r}")
        if self.answer.count(self.seg_token) != 1:
            raise ValueError(
                f"answer must contain the seg_token {self.seg_token!r} exactly once, got {self.answer!r}"
            )

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "prompt") -> PromptFormat:
        """A prompt format from its JSON form; ``ValueError`` naming ``source`` when malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(known)}")
        for key, value in data.items():
            if not isinstance(value, str):
                raise ValueError(f"{source}.{key} must be a str, got {type(value).__name__}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


# The format the released LLM-Seg and LISA checkpoints were trained and validated with.
AUTHORS_PROMPT = PromptFormat(
    conversation="llava_v1", instruction="authors", answer="[SEG].", seg_token="[SEG]"
)


@dataclass
class ConversationConfig:
    """Limits of follow-up conversations (requests sharing a ``conversation_id``).

    Attributes:
        max_turns: earlier (instruction, answer) turns kept per conversation; older ones
            are forgotten. Turns are also dropped, oldest first, whenever the prompt would
            not fit the VLM's context.
        max_id_chars: longest conversation id accepted (characters).
        max_conversations: conversations remembered at once (least recently used forgotten).
    """

    max_turns: int = 8
    max_id_chars: int = 128
    max_conversations: int = 64

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_id_chars", "max_conversations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class SegmenterConfig:
    """Everything needed to build a :class:`llmseg_ros.pipeline.ReasonSegmenter`.

    Model fields take a local path or a Hugging Face hub id (DINOv2, VLM) or a local
    checkpoint file (SAM, from its official URL; see ``llmseg fetch-weights``).

    Attributes:
        method: which method answers instructions (see ``METHODS``).
        sam_checkpoint: path of the SAM ``.pth`` checkpoint; ``None`` only for methods
            that need no SAM.
        sam_model_type: ``vit_h`` | ``vit_l`` | ``vit_b`` | ``tiny`` (the test model).
        dinov2: hub id or directory of a ``Dinov2Model``.
        vlm: hub id or directory of the VLM (``LlavaForConditionalGeneration`` for
            llmseg/lisa/grounded; any image-text-to-text chat model for vlm_*).
        weights_dir: our trained weights (selector, projection, LoRA adapter, JSON
            config); required by llmseg and lisa.
        detector: hub id or directory of a Grounding DINO model (grounded method).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available).
        dtype: ``auto`` (bfloat16 on CUDA when supported, else float16 on CUDA,
            float32 on CPU) or an explicit dtype; SAM post-processing is always fp32.
        vlm_quantization: ``None``, ``8bit`` or ``4bit`` (bitsandbytes, CUDA only).
        embed_size: DINOv2 input long side (896 in LLM-Seg).
        max_instruction_chars: longest instruction accepted.
        conversation: limits of follow-up conversations.
    """

    method: str = "llmseg"
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    dinov2: str = "facebook/dinov2-large"
    vlm: str = "llava-hf/llava-1.5-7b-hf"
    weights_dir: str | None = None
    detector: str = "IDEA-Research/grounding-dino-tiny"
    device: str = "auto"
    dtype: str = "auto"
    vlm_quantization: str | None = None
    embed_size: int = 896
    max_instruction_chars: int = 1000
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    profile: str = "custom"

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("sam_model_type", self.sam_model_type, SAM_MODEL_TYPES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("vlm_quantization", self.vlm_quantization, QUANTIZATION)
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.embed_size < 14 or self.embed_size % 14 != 0:
            raise ValueError(f"embed_size must be a positive multiple of 14, got {self.embed_size}")
        if self.max_instruction_chars < 1:
            raise ValueError(f"max_instruction_chars must be >= 1, got {self.max_instruction_chars}")
        for name, cls in (
            ("proposals", ProposalConfig),
            ("selection", SelectionConfig),
            ("lora", LoraSettings),
            ("conversation", ConversationConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmenterConfig:
        """Build from the mapping :meth:`to_dict` writes; unknown fields (nested ones too) are errors."""
        _check_known("config", data, cls)
        for name, section in (
            ("proposals", ProposalConfig),
            ("selection", SelectionConfig),
            ("lora", LoraSettings),
        ):
            if isinstance(data.get(name), dict):
                _check_known(name, data[name], section)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> SegmenterConfig:
        """Read a JSON (``.json``) or YAML file holding the fields of this class.

        Raises:
            ValueError: (a :class:`~llmseg_ros.utils.configfile.ConfigFileError`) naming the
                file, the line and what was expected.
        """
        return load_config_file(path).build(cls.from_dict)

    def replace(self, **changes: Any) -> SegmenterConfig:
        return dataclasses.replace(self, **changes)
