"""Validation during training: the live modules scored on an evaluation set.

LLM-Seg and LISA validate on ReasonSeg val after every epoch (500 optimizer steps) and
keep the checkpoint with the best gIoU (LLM-Seg ``training.py``: ``is_best = giou >
best_score``, the gIoU of the IoP > 0.5 selection). :class:`Validator` does the same
with the library's pieces: the samples come from a dataset reader
(:func:`~llmseg_ros.training.datamix.open_source`), each is answered by the inference
method itself (:class:`~llmseg_ros.methods.llmseg.LLMSegMethod` or
:class:`~llmseg_ros.methods.lisa.LisaMethod`) built on the modules being trained, with
the sample's first instruction and the inference prompt, and scored by
:func:`~llmseg_ros.evaluation.report.evaluate_samples`. LLM-Seg frames take their
proposals (and backbone features) from the source's proposal cache when it has one, as
training does.

Validation changes no weight and draws from no global random generator, so a run that
validates trains exactly like one that does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from llmseg_ros.config import SelectionConfig
from llmseg_ros.data.sample import Sample
from llmseg_ros.evaluation.metrics import sample_iou
from llmseg_ros.evaluation.report import EvalRecord, evaluate_samples, summarize_records
from llmseg_ros.training.cache import CacheSet, ProposalCache
from llmseg_ros.training.checkpoint import restore_rng_state, rng_state
from llmseg_ros.training.config import DataSource
from llmseg_ros.training.datamix import open_source
from llmseg_ros.training.modules import LisaTrainModules, SegTrainModules, TrainModules, pool_at_grid
from llmseg_ros.types import FrameFeatures, Proposals

if TYPE_CHECKING:
    from llmseg_ros.methods.lisa import LisaMethod
    from llmseg_ros.methods.llmseg import LLMSegMethod

Gather = Callable[[list[EvalRecord]], list[EvalRecord]]


def giou_1024(records: Sequence[EvalRecord]) -> float:
    """Mean per-sample IoU after nearest-resizing prediction and truth to 1024 × 1024.

    What LLM-Seg's ``validate_threshold`` compares checkpoints by (it resizes both to
    1024 × 1024 before counting); the per-sample counts are the evaluator's normalised
    ones (:func:`~llmseg_ros.evaluation.metrics.sample_metrics`).
    """
    if not records:
        raise ValueError("cannot average an empty set of samples")
    return float(
        np.mean([sample_iou(r.metrics.normalized_intersection, r.metrics.normalized_union) for r in records])
    )


class _FramesOnly:
    """The proposal stage of a method whose frames the validator prepares itself."""

    def generate(self, image: np.ndarray) -> Proposals:
        raise RuntimeError("validation frames are prepared by the Validator, not by the method")


class Validator:
    """Scores the modules being trained on one evaluation source.

    Args:
        source: the evaluation set (a :class:`DataSource`; its ``split``, ``cache`` and
            reader settings are used, its sampling fields are not).
        limit: score only the first ``limit`` samples (``None`` = all).
        selection: the selection strategy of LLM-Seg predictions.
        proposal_fn: LLM-Seg's proposal stage for a source without a cache.
        rank / world_size: this process's share is every ``world_size``-th sample from
            ``rank``; ``gather`` collects every process's records (identity with one
            process).
        autocast: context manager factory for the forward passes (the trainer's mixed
            precision).
    """

    def __init__(
        self,
        source: DataSource,
        *,
        limit: int | None = None,
        selection: SelectionConfig | None = None,
        proposal_fn: Callable[[np.ndarray], Proposals] | None = None,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.source = source
        self.dataset: Sequence[Sample] = open_source(source)
        count = len(self.dataset) if limit is None else min(limit, len(self.dataset))
        self.indices = list(range(count))
        self.cache = CacheSet([ProposalCache(d) for d in source.cache_dirs]) if source.cache_dirs else None
        self.selection = selection or SelectionConfig()
        self.proposal_fn = proposal_fn
        self.rank, self.world_size = rank, world_size
        self.gather: Gather = gather or (lambda records: records)
        self.autocast = autocast

    def __len__(self) -> int:
        return len(self.indices)

    # -- one method per trained module ------------------------------------------------
    def _llmseg_predictor(self, modules: TrainModules) -> Callable[[Sample], np.ndarray]:
        from llmseg_ros.methods.base import SegmentRequest
        from llmseg_ros.methods.llmseg import LLMSegMethod

        method: LLMSegMethod = LLMSegMethod(
            cast(Any, _FramesOnly()),
            modules.embedder,
            modules.seg_vlm,
            modules.projection,
            modules.selector,
            self.selection,
        )
        embedder = modules.embedder

        def predict(sample: Sample) -> np.ndarray:
            features: torch.Tensor | None = None
            if self.cache is not None:
                if sample.image_path is None:
                    raise ValueError(f"validation sample {sample.image_id!r} has no image file to look up")
                frame = self.cache.lookup(sample.image_path, with_features=True)
                proposals = frame.proposals
                if frame.features is not None:
                    features = torch.from_numpy(frame.features)
            elif self.proposal_fn is not None:
                proposals = self.proposal_fn(sample.image)
            else:
                raise ValueError(
                    f"validation source {self.source.name!r} has no proposal cache and no SAM is loaded"
                )
            with torch.inference_mode():
                if features is None:
                    features = embedder.backbone_features(sample.image)
                embeddings = pool_at_grid(embedder, features, proposals.masks)
            prepared = FrameFeatures(image=sample.image, proposals=proposals, mask_embeddings=embeddings)
            request = SegmentRequest(sample.instruction, is_sentence=sample.is_sentence)
            return method.segment(prepared, request).mask

        return predict

    def _lisa_predictor(self, modules: LisaTrainModules) -> Callable[[Sample], np.ndarray]:
        from llmseg_ros.methods.base import SegmentRequest
        from llmseg_ros.methods.lisa import LisaMethod

        method: LisaMethod = LisaMethod(modules.head.sam, modules.seg_vlm, modules.head)

        def predict(sample: Sample) -> np.ndarray:
            request = SegmentRequest(sample.instruction, is_sentence=sample.is_sentence)
            return method.segment(method.prepare(sample.image), request).mask

        return predict

    # -- the run ------------------------------------------------------------------------
    def run(self, modules: SegTrainModules) -> tuple[dict[str, Any], list[EvalRecord]]:
        """Score ``modules`` (left in train mode afterwards) on the evaluation set.

        Returns:
            ``(summary, records)`` over all processes' samples:
            :func:`~llmseg_ros.evaluation.report.summarize_records` (``n``, ``giou``,
            ``ciou``, ``nciou``, ``seconds_per_query``) plus :func:`giou_1024`, and the
            per-sample records sorted by sample id.
        """
        if isinstance(modules, TrainModules):
            predict = self._llmseg_predictor(modules)
        elif isinstance(modules, LisaTrainModules):
            predict = self._lisa_predictor(modules)
        else:
            raise TypeError(f"cannot validate {type(modules).__name__}")
        mine = self.indices[self.rank :: self.world_size]
        saved = rng_state()
        was_training = modules.training
        modules.eval()
        try:
            with self.autocast():
                records = evaluate_samples((self.dataset[i] for i in mine), predict)[1] if mine else []
        finally:
            modules.train(was_training)
            restore_rng_state(saved)
        everything = sorted(self.gather(records), key=lambda r: r.sample_id)
        return {**summarize_records(everything), "giou_1024": giou_1024(everything)}, everything
