"""Training data: several datasets mixed with sampling rates, one drawn image per position.

The stream is *stateless*: the example at position ``p`` depends only on (seed, p) —
which source (probability ``rate / Σ rates``, LISA's ``sample_rate``), which image of it
(uniform, with replacement, as LISA draws) and which of that image's questions (up to the
source's ``questions``, without replacement: LISA / LLM-Seg's ``num_classes_per_sample``),
and which question / answer template each gets (LISA's lists,
:mod:`llmseg_ros.models.prompts`, or the inference prompt). A run's data position is
therefore one integer, which makes resuming exact, lets DataLoader workers build examples
in any order, and gives each process of a multi-GPU run its own positions (see
:func:`rank_positions`).
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
    """One drawn image with Q ≥ 1 questions about it.

    Attributes:
        position: its position in the stream.
        source: name of the data source it came from.
        sample: the dataset sample of the image (image (H, W, 3) uint8 RGB, its file and
            id); with several records of one image, the first drawn one.
        instructions: Q instructions as the dataset gives them.
        questions / answers: Q templated user turns and answers, each answer holding one
            ``<SEG>``; each pair is its own conversation with the image.
        targets: Q (H, W) uint8 ground truths (0/1, 255 = ignore), one per question
            (ReasonSeg's paraphrases share one).
        proposals: cached proposals at (H, W), or ``None`` when the source has no cache
            (the trainer runs the proposal stage itself).
        features: (C, g, g) float16 cached backbone features, or ``None``.
        iou / iop: (Q, K) float32 ground-truth IoU / IoP of each proposal for each question
            (``None`` with the proposals).
    """

    position: int
    source: str
    sample: Sample
    instructions: list[str]
    questions: list[str]
    answers: list[str]
    targets: list[np.ndarray]
    proposals: Proposals | None
    features: np.ndarray | None
    iou: np.ndarray | None
    iop: np.ndarray | None

    @property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return self.sample.image

    @property
    def conversations(self) -> list[tuple[str, str]]:
        """The Q (question, answer) pairs."""
        return list(zip(self.questions, self.answers))


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


def add_targets(
    example: TrainExample, proposals: Proposals, ignore_pixels: str = "background"
) -> TrainExample:
    """Attach proposals and their (Q, K) ground-truth IoU / IoP (at the proposals' resolution).

    ``ignore_pixels``: how pixels labelled 255 enter the targets
    (:func:`llmseg_ros.models.losses.proposal_targets`).
    """
    if proposals.image_size != example.sample.image_size:
        raise ValueError(
            f"proposals of sample {example.sample.image_id!r} are {proposals.image_size}, the image is "
            f"{example.sample.image_size}; the cache was built from different images"
        )
    pairs = [proposal_targets(proposals.masks, target, ignore_pixels) for target in example.targets]
    k = len(proposals)
    example.iou = np.stack([iou for iou, _ in pairs]) if pairs else np.zeros((0, k), np.float32)
    example.iop = np.stack([iop for _, iop in pairs]) if pairs else np.zeros((0, k), np.float32)
    example.proposals = proposals
    return example


def sample_instructions(dataset: Sequence[Sample], index: int) -> tuple[str, ...]:
    """The instructions of sample ``index`` (the first is the sample's ``instruction``).

    Read from the reader's index when it has one (ReasonSeg's ``instructions``, a JSONL
    or LLM-Seg40K ``question``), so no pixels are loaded; otherwise the sample is loaded.
    """
    entries = getattr(dataset, "entries", None)
    if entries is not None:
        entry = entries[index]
        texts = getattr(entry, "instructions", None)
        if texts:
            return tuple(texts)
        question = getattr(entry, "question", None)
        if isinstance(question, str):
            return (question,)
    return dataset[index].instructions


def image_groups(dataset: Sequence[Sample]) -> list[list[int]]:
    """Sample indices of ``dataset`` grouped by image file, in order of first appearance.

    A reader that cannot list its image files without loading them gets one group per
    sample.
    """
    try:
        paths = dataset_image_paths(dataset)
    except TypeError:
        return [[i] for i in range(len(dataset))]
    groups: dict[Path, list[int]] = {}
    for index, path in enumerate(paths):
        groups.setdefault(path, []).append(index)
    return list(groups.values())


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
        ignore_pixels: how pixels labelled 255 enter the IoU / IoP targets
            (``background`` or ``exclude``, :func:`~llmseg_ros.models.losses.proposal_targets`).
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        seed: int,
        *,
        datasets: Sequence[Sequence[Sample]] | None = None,
        use_features: bool = True,
        with_proposals: bool = True,
        ignore_pixels: str = "background",
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
        # What one draw picks from: groups of samples sharing an image, or single samples.
        self.units: list[list[list[int]]] = [
            image_groups(d) if s.draw == "image" else [[i] for i in range(len(d))]
            for s, d in zip(self.sources, self.datasets)
        ]
        self.use_features = use_features
        self.ignore_pixels = ignore_pixels

    def __len__(self) -> int:
        """Nominal length (Σ dataset sizes); any non-negative position is valid."""
        return sum(len(d) for d in self.datasets)

    def choose(self, position: int) -> tuple[int, int, np.random.Generator]:
        """(source index, unit index, rng for the questions and templates) of ``position``.

        A unit is one image (``draw: image``) or one sample (``draw: question``).
        """
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        rng = np.random.default_rng([self.seed, int(position)])
        source = int(rng.choice(len(self.sources), p=self.probabilities))
        unit = int(rng.integers(len(self.units[source])))
        return source, unit, rng

    def _questions(
        self, source_index: int, indices: list[int], rng: np.random.Generator
    ) -> list[tuple[int, str]]:
        """(sample index, instruction) of each drawn question of one unit (samples ``indices``)."""
        source = self.sources[source_index]
        dataset = self.datasets[source_index]
        if source.draw == "question":
            texts = sample_instructions(dataset, indices[0])
            pick = int(rng.integers(len(texts))) if source.instructions == "random" else 0
            return [(indices[0], texts[pick])]
        candidates: list[tuple[int, str]] = []
        for index in indices:
            texts = sample_instructions(dataset, index)
            candidates.extend(
                (index, text) for text in (texts if source.instructions == "random" else texts[:1])
            )
        if len(candidates) <= source.questions:
            return candidates
        picked = rng.choice(len(candidates), size=source.questions, replace=False)
        return [candidates[int(i)] for i in picked]

    def __getitem__(self, position: int) -> TrainExample:
        source_index, unit, rng = self.choose(int(position))
        source = self.sources[source_index]
        dataset = self.datasets[source_index]
        drawn = self._questions(source_index, self.units[source_index][unit], rng)
        templates = random.Random(int(rng.integers(2**63)))
        loaded: dict[int, Sample] = {}
        for index, _ in drawn:
            if index not in loaded:
                loaded[index] = dataset[index]
        sample = loaded[drawn[0][0]]
        questions: list[str] = []
        answers: list[str] = []
        for index, text in drawn:
            is_sentence = loaded[index].is_sentence
            if source.templates == "lisa":
                questions.append(training_question(text, templates, is_sentence=is_sentence))
                answers.append(training_answer(templates))
            else:
                questions.append(format_instruction(text, is_sentence))
                answers.append(DEFAULT_ANSWER)
        targets = [loaded[index].mask for index, _ in drawn]
        for target in targets:
            if target.shape != sample.mask.shape:
                raise ValueError(
                    f"samples of image {sample.image_path} in source {source.name!r} have masks of "
                    f"shapes {target.shape} and {sample.mask.shape}"
                )
        example = TrainExample(
            position=int(position),
            source=source.name,
            sample=sample,
            instructions=[text for _, text in drawn],
            questions=questions,
            answers=answers,
            targets=targets,
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
            add_targets(example, frame.proposals, self.ignore_pixels)
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
