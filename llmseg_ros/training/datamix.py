"""Training data: several datasets mixed with sampling rates, one example per position.

The stream is *stateless*: the example at position ``p`` depends only on (seed, p) —
which source (probability ``rate / Σ rates``, LISA's ``sample_rate``), which sample of it
(uniform, with replacement, as LISA draws), which of its instructions, and which
question / answer template (LISA's lists, :mod:`llmseg_ros.models.prompts`, or the inference
prompt). A run's data
position is therefore one integer, which makes resuming exact, lets DataLoader workers
build examples in any order, and gives each process of a multi-GPU run its own
positions (see :func:`rank_positions`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmseg_ros.data.sample import Sample
from llmseg_ros.models.losses import proposal_targets
from llmseg_ros.models.prompts import DEFAULT_ANSWER, format_instruction, training_answer, training_question
from llmseg_ros.training.cache import CacheSet, ProposalCache
from llmseg_ros.training.config import DataSource
from llmseg_ros.types import Proposals


@dataclass
class TrainExample:
    """One training example.

    Attributes:
        position: its position in the stream.
        source: name of the data source it came from.
        sample: the dataset sample (image (H, W, 3) uint8 RGB, mask (H, W) uint8 0/1/255).
        question / answer: the templated user turn and the answer holding ``<SEG>``.
        proposals: cached proposals at (H, W), or ``None`` when the source has no cache
            (the trainer runs the proposal stage itself).
        features: (C, g, g) float16 cached backbone features, or ``None``.
        iou / iop: (K,) float32 ground-truth IoU / IoP of each proposal (``None`` with
            the proposals).
    """

    position: int
    source: str
    sample: Sample
    question: str
    answer: str
    proposals: Proposals | None
    features: np.ndarray | None
    iou: np.ndarray | None
    iop: np.ndarray | None


def open_source(source: DataSource) -> Sequence[Sample]:
    """The dataset reader of one source (pixels are loaded lazily on indexing).

    Raises:
        ValueError: the dataset cannot be read or is empty.
    """
    dataset: Sequence[Sample]
    if source.kind == "reasonseg":
        from llmseg_ros.data.reasonseg import ReasonSegDataset

        dataset = ReasonSegDataset(source.path, source.split)
    elif source.kind == "llmseg40k":
        from llmseg_ros.data.llmseg40k import LLMSeg40KDataset

        dataset = LLMSeg40KDataset(source.path, source.image_root, mask_root=source.mask_root)
    else:
        from llmseg_ros.data.jsonl import JsonlDataset

        dataset = JsonlDataset(source.path)
    if len(dataset) == 0:
        raise ValueError(f"data source {source.name!r} ({source.kind} at {source.path}) holds no samples")
    return dataset


def dataset_image_paths(dataset: Sequence[Sample]) -> list[Path]:
    """Image files of a dataset reader without loading pixels, in sample order (with repeats)."""
    entries = getattr(dataset, "entries", None)
    if entries is None:
        entries = getattr(dataset, "records", None)
    if entries is None:
        raise TypeError(f"cannot list the image files of a {type(dataset).__name__} without loading it")
    return [Path(e.image_path) for e in entries]


def add_targets(example: TrainExample, proposals: Proposals) -> TrainExample:
    """Attach proposals and their ground-truth IoU / IoP (at the proposals' resolution)."""
    if proposals.image_size != example.sample.image_size:
        raise ValueError(
            f"proposals of sample {example.sample.image_id!r} are {proposals.image_size}, the image is "
            f"{example.sample.image_size}; the cache was built from different images"
        )
    iou, iop = proposal_targets(proposals.masks, example.sample.mask)
    example.proposals, example.iou, example.iop = proposals, iou, iop
    return example


class DataMix(torch.utils.data.Dataset[TrainExample]):
    """Map-style dataset over stream positions (any non-negative int).

    Args:
        sources: the mix; each with its reader and (optional) proposal caches.
        seed: the stream's seed.
        datasets: pre-opened readers (same order as ``sources``); opened from the
            sources when ``None``.
        use_features: read cached backbone features when the caches hold them.
        with_proposals: attach cached proposals and their targets (LLM-Seg); ``False``
            ignores the caches (LISA needs only the ground-truth masks).
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        seed: int,
        *,
        datasets: Sequence[Sequence[Sample]] | None = None,
        use_features: bool = True,
        with_proposals: bool = True,
    ) -> None:
        if not sources:
            raise ValueError("the training mix needs at least one data source (config 'sources')")
        self.sources = list(sources)
        self.seed = int(seed)
        self.datasets = list(datasets) if datasets is not None else [open_source(s) for s in self.sources]
        if len(self.datasets) != len(self.sources):
            raise ValueError(f"got {len(self.datasets)} datasets for {len(self.sources)} sources")
        rates = np.asarray([s.rate for s in self.sources], dtype=np.float64)
        self.probabilities = rates / rates.sum()
        self.caches: list[CacheSet | None] = [
            CacheSet([ProposalCache(d) for d in s.cache_dirs]) if s.cache_dirs and with_proposals else None
            for s in self.sources
        ]
        self.use_features = use_features

    def __len__(self) -> int:
        """Nominal length (Σ dataset sizes); any non-negative position is valid."""
        return sum(len(d) for d in self.datasets)

    def choose(self, position: int) -> tuple[int, int, random.Random]:
        """(source index, sample index, template rng) of ``position``."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        rng = np.random.default_rng([self.seed, int(position)])
        source = int(rng.choice(len(self.sources), p=self.probabilities))
        index = int(rng.integers(len(self.datasets[source])))
        return source, index, random.Random(int(rng.integers(2**63)))

    def __getitem__(self, position: int) -> TrainExample:
        source_index, index, rng = self.choose(int(position))
        source = self.sources[source_index]
        sample = self.datasets[source_index][index]
        if source.instructions == "random":
            instruction = sample.instructions[rng.randrange(len(sample.instructions))]
        else:
            instruction = sample.instruction
        if source.templates == "lisa":
            question = training_question(instruction, rng, is_sentence=sample.is_sentence)
            answer = training_answer(rng)
        else:
            question, answer = format_instruction(instruction, sample.is_sentence), DEFAULT_ANSWER
        example = TrainExample(
            position=int(position),
            source=source.name,
            sample=sample,
            question=question,
            answer=answer,
            proposals=None,
            features=None,
            iou=None,
            iop=None,
        )
        cache = self.caches[source_index]
        if cache is not None:
            if sample.image_path is None:
                raise ValueError(
                    f"sample {sample.image_id!r} of source {source.name!r} has no image file to look up"
                )
            frame = cache.lookup(sample.image_path, with_features=self.use_features)
            example.features = frame.features
            add_targets(example, frame.proposals)
        return example


def rank_positions(start_micro_step: int, rank: int, world_size: int, batch_size: int) -> Iterator[list[int]]:
    """Positions of each micro-batch of one process, from micro-step ``start_micro_step`` on.

    Micro-step ``t`` of process ``r`` takes positions ``[(t·W + r)·B, (t·W + r + 1)·B)``, so
    the processes of a run never share a position and a resumed run continues exactly.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    step = start_micro_step
    while True:
        first = (step * world_size + rank) * batch_size
        yield list(range(first, first + batch_size))
        step += 1


class PositionBatches(torch.utils.data.Sampler[list[int]]):
    """Batch sampler for a DataLoader over :class:`DataMix` (infinite; see :func:`rank_positions`)."""

    def __init__(self, start_micro_step: int, rank: int, world_size: int, batch_size: int) -> None:
        self.args = (start_micro_step, rank, world_size, batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        return rank_positions(*self.args)


def collate_examples(batch: list[TrainExample]) -> list[TrainExample]:
    """DataLoader collate function: keep the examples as a list."""
    return batch
