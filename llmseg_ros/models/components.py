"""Lazy, load-once access to every model a method may need.

Methods ask :class:`Components` for what they use (SAM, the proposal generator, DINOv2,
the ``<SEG>`` VLM, a chat VLM, a detector, our trained heads); each model is built the
first time it is asked for and kept until :meth:`Components.release`. Loading is
serialised by a lock so concurrent requests never load a model twice.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from llmseg_ros.config import SegmenterConfig
from llmseg_ros.utils.device import resolve_device, resolve_dtype
from llmseg_ros.weights.directory import LoadedWeights, WeightsNotFoundError, load_weights, weights_help

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.models.chat_vlm import ChatVLM
    from llmseg_ros.models.detector import GroundingDetector
    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.proposals import ProposalGenerator
    from llmseg_ros.models.vlm import SegVLM

T = TypeVar("T")

# Which inputs each method needs; used to report every missing file at once.
METHOD_NEEDS: dict[str, tuple[str, ...]] = {
    "llmseg": ("sam", "dinov2", "vlm", "weights"),
    "lisa": ("sam", "vlm", "weights"),
    "grounded": ("sam", "vlm", "detector"),
    "vlm_grounding": ("sam", "vlm"),
    "vlm_marks": ("sam", "vlm"),
}


def _looks_like_path(value: str) -> bool:
    """Hub ids are ``owner/name``; anything absolute, relative-dotted or existing is a path."""
    return value.startswith(("/", ".", "~")) or Path(value).exists() or value.count("/") != 1


MODEL_FIELDS = {"dinov2": "DINOv2 model", "vlm": "VLM", "detector": "detector"}


def hub_model_ids(config: SegmenterConfig) -> dict[str, str]:
    """The model fields ``config.method`` needs that hold hub ids, not local paths (field → id)."""
    needs = METHOD_NEEDS[config.method]
    values = {key: str(getattr(config, key)) for key in MODEL_FIELDS if key in needs}
    return {key: value for key, value in values.items() if not _looks_like_path(value)}


def missing_inputs(config: SegmenterConfig) -> list[str]:
    """Human-readable lines, one per model file or directory the method needs and cannot get.

    Local paths that do not exist are reported with how to get them. A hub id counts as
    missing when it is not in the local Hugging Face cache and the hub cannot be reached
    (offline mode, or no connection within a few seconds): loading it would only end in
    the hub client's retries. Hub ids that are cached, or reachable, are not checked further.
    """
    from llmseg_ros.utils import hub

    needs = METHOD_NEEDS[config.method]
    problems: list[str] = []
    if "sam" in needs:
        if config.sam_checkpoint is None:
            problems.append(
                f"SAM checkpoint: not set (sam_checkpoint); get the {config.sam_model_type} checkpoint with "
                "`llmseg fetch-weights` or from the segment-anything release"
            )
        elif not Path(config.sam_checkpoint).expanduser().is_file():
            problems.append(
                f"SAM checkpoint: {config.sam_checkpoint} not found; get it with `llmseg fetch-weights` "
                "or from the segment-anything release"
            )
    hub_ids = hub_model_ids(config)
    for key, label in MODEL_FIELDS.items():
        value = str(getattr(config, key))
        if key in needs and key not in hub_ids and not Path(value).expanduser().exists():
            problems.append(f"{label}: {value} not found; download it with `llmseg fetch-weights`")
    uncached = {key: value for key, value in hub_ids.items() if hub.cached_snapshot(value) is None}
    unreachable = hub.unreachable_reason() if uncached else None
    if unreachable is not None:
        for key, value in uncached.items():
            local = f"weights/{value.split('/')[-1]}"
            problems.append(
                f"{MODEL_FIELDS[key]}: {value} is not in the local Hugging Face cache and the hub cannot "
                f"be reached ({unreachable}); on a connected machine run "
                f"`{hub.download_command(value, local)}` (or `llmseg fetch-weights`), copy {local} here "
                f"and set {key} to it"
            )
    if "weights" in needs:
        if config.weights_dir is None:
            problems.append(
                "trained weights: not set (weights_dir / --weights); " + weights_help([]).splitlines()[1]
            )
        else:
            from llmseg_ros.weights.directory import missing_weight_files

            for path in missing_weight_files(config.weights_dir):
                problems.append(f"trained weights: {path} not found; produce them with training/train.py")
    return problems


class Components:
    """The models of one pipeline, each loaded on first use and kept until ``release``.

    Attributes:
        config: the pipeline configuration.
        device: resolved torch device.
        dtype: resolved compute dtype for the large models (SAM post-processing and the
            small heads stay float32).
    """

    def __init__(self, config: SegmenterConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._models: dict[str, Any] = {}
        self._lock = threading.RLock()

    def _get(self, name: str, factory: Callable[[], T]) -> T:
        with self._lock:
            if name not in self._models:
                self._models[name] = factory()
            return cast(T, self._models[name])

    @property
    def loaded(self) -> list[str]:
        """Names of the models currently in memory."""
        with self._lock:
            return sorted(self._models)

    # -- foundation models -----------------------------------------------------------
    def sam(self) -> Sam:
        def build() -> Sam:
            from llmseg_ros.models.sam import build_sam

            if self.config.sam_checkpoint is None:
                raise WeightsNotFoundError(
                    "SAM checkpoint not set (sam_checkpoint); get it with `llmseg fetch-weights`"
                )
            return build_sam(self.config.sam_model_type, self.config.sam_checkpoint, self.device)

        return self._get("sam", build)

    def proposal_generator(self) -> ProposalGenerator:
        def build() -> ProposalGenerator:
            from llmseg_ros.models.proposals import ProposalGenerator

            return ProposalGenerator.from_config(self.sam(), self.config.proposals)

        return self._get("proposal_generator", build)

    def trained_weights(self) -> LoadedWeights:
        def build() -> LoadedWeights:
            if self.config.weights_dir is None:
                raise WeightsNotFoundError(weights_help([]))
            return load_weights(self.config.weights_dir)

        return self._get("trained_weights", build)

    def mask_embedder(self) -> MaskEmbedder:
        def build() -> MaskEmbedder:
            from llmseg_ros.models.embeddings import MaskEmbedder
            from llmseg_ros.weights.directory import load_module_state

            weights = self.trained_weights()
            embedder = MaskEmbedder.load(
                weights.model_source("dinov2", self.config.dinov2),
                device=self.device,
                dtype=self.dtype,
                input_size=self.config.embed_size,
                pos_interpolation=weights.manifest.dinov2_pos_interpolation,
            )
            state = weights.state_dicts.get("mask_proj")
            if state is None:
                raise ValueError(f"weights in {self.config.weights_dir} hold no 'mask_proj.*' tensors")
            load_module_state(
                embedder.proj, state, f"the 'mask_proj.*' tensors of the weights in {self.config.weights_dir}"
            )
            return embedder.eval()

        return self._get("mask_embedder", build)

    def seg_vlm(self) -> SegVLM:
        def build() -> SegVLM:
            from llmseg_ros.models.vlm import SegVLM

            weights = self.trained_weights()
            return SegVLM.load(
                weights.model_source("base_vlm", self.config.vlm),
                device=self.device,
                dtype=self.dtype,
                adapter_dir=weights.adapter_dir,
                quantization=self.config.vlm_quantization,
                prompt=weights.manifest.prompt,
            )

        return self._get("seg_vlm", build)

    def chat_vlm(self) -> ChatVLM:
        def build() -> ChatVLM:
            from llmseg_ros.models.chat_vlm import ChatVLM

            return ChatVLM.load(
                self.config.vlm,
                device=self.device,
                dtype=self.dtype,
                quantization=self.config.vlm_quantization,
            )

        return self._get("chat_vlm", build)

    def detector(self) -> GroundingDetector:
        def build() -> GroundingDetector:
            from llmseg_ros.models.detector import GroundingDetector

            return GroundingDetector.load(self.config.detector, device=self.device)

        return self._get("detector", build)

    def release(self) -> None:
        """Drop every model (and free cached GPU memory)."""
        with self._lock:
            self._models.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
