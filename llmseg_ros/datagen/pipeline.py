"""End-to-end LLM-Seg40K generation (LLM-Seg paper, section 4.2).

For each sampled image: describe it (VLM or precomputed) → ask the text LLM for question /
answer pairs with the annotator prompt → parse and filter them against the image's
category names → attach the union mask of each answer's category as COCO RLE. Images run
concurrently; each finished image is appended to a JSONL journal, so a killed run restarts
where it stopped. The output is one JSON object keyed by image file name::

    {"000000391895.jpg": {"from_dataset": "coco", "image_id": 391895, "caption": "…",
                          "qa_pairs": [{"question": "…", "answer": "helmet", "category_id": 34,
                                        "rle_seg": {"size": [H, W], "counts": "…"}}]}}

Images whose reply kept no pair are journaled (not retried) but left out of the output;
pairs whose category mask is empty (degenerate annotations) are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmseg_ros.data.io import atomic_write_json
from llmseg_ros.data.llmseg40k import write_llmseg40k
from llmseg_ros.data.rle import encode_rle
from llmseg_ros.datagen.caption import CaptionSource, PrecomputedCaptions, build_caption_source
from llmseg_ros.datagen.clients import build_client
from llmseg_ros.datagen.coco import ImageEntry, InstanceIndex, sample_images
from llmseg_ros.datagen.config import DatagenConfig
from llmseg_ros.datagen.journal import Journal, sample_digest
from llmseg_ros.datagen.llm import (
    FATAL_STATUSES,
    ChatClient,
    LLMRequestError,
    MeteredClient,
    Prices,
    UsageMeter,
)
from llmseg_ros.datagen.parse import CategoryMatcher, filter_qa_pairs, parse_qa_pairs
from llmseg_ros.datagen.prompt import build_messages
from llmseg_ros.datagen.stats import dataset_statistics

LOGGER = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`generate_dataset` produced.

    Attributes:
        records: the output JSON's content (file name → record), in sample order.
        stats: the statistics written to ``config.stats_path``.
        failures: file name → error message for images that failed in this run.
    """

    records: dict[str, dict[str, Any]]
    stats: dict[str, Any]
    failures: dict[str, str]


class ImageAnnotator:
    """Turns one image into a journal entry (caption → LLM → parse/filter → masks)."""

    def __init__(
        self,
        config: DatagenConfig,
        index: InstanceIndex,
        captions: CaptionSource,
        client: ChatClient,
    ) -> None:
        self.config = config
        self.index = index
        self.captions = captions
        self.client = client

    def image_path(self, image: ImageEntry) -> Path | None:
        if self.config.images_dir is None:
            return None
        return Path(self.config.images_dir) / image.file_name

    def annotate(self, group: str, image: ImageEntry) -> dict[str, Any]:
        """Run every step for ``image``; returns the entry to journal (not yet written)."""
        categories = [self.index.categories[cid] for cid in image.category_ids]
        by_name = {c.name: c for c in categories}
        if len(by_name) != len(categories):
            raise ValueError(f"image {image.file_name!r} has two categories with the same name")
        caption = self.captions.caption(image.file_name, self.image_path(image))
        messages = build_messages(caption, list(by_name), self.config.filter.num_questions)
        reply = self.client.complete(messages)
        matcher = CategoryMatcher({c.name: c.synonyms for c in categories})
        kept, report = filter_qa_pairs(
            parse_qa_pairs(reply.text),
            matcher,
            max_per_answer=self.config.filter.max_questions_per_answer,
            max_questions=self.config.filter.num_questions,
            drop_name_leaks=self.config.filter.drop_name_leaks,
        )
        masks: dict[str, dict[str, Any] | None] = {}
        qa_pairs = []
        for pair in kept:
            category = by_name[pair.answer]
            if pair.answer not in masks:
                mask = self.index.category_mask(image, category.id)
                masks[pair.answer] = encode_rle(mask) if mask.any() else None
            if masks[pair.answer] is None:
                report.empty_mask += 1
                report.kept -= 1
                continue
            qa_pairs.append(
                {
                    "question": pair.question,
                    "answer": pair.answer,
                    "category_id": category.id,
                    "rle_seg": masks[pair.answer],
                }
            )
        record = {
            "from_dataset": self.config.from_dataset,
            "image_id": image.id,
            "caption": caption,
            "qa_pairs": qa_pairs,
        }
        return {
            "file_name": image.file_name,
            "group": group,
            "num_categories": image.num_categories,
            "record": record,
            "reply": reply.text,
            "filter": report.to_dict(),
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "attempts": reply.attempts,
                "has_usage": reply.has_usage,
            },
        }


def _check_journal_entry(name: str, entry: Mapping[str, Any], path: Path) -> None:
    """Refuse a journal line that :meth:`ImageAnnotator.annotate` did not write."""
    record = entry.get("record")
    if (
        not isinstance(record, Mapping)
        or not isinstance(record.get("qa_pairs"), list)
        or entry.get("group") not in ("simple", "complex")
        or not isinstance(entry.get("usage", {}), Mapping)
        or not isinstance(entry.get("filter", {}), Mapping)
    ):
        raise ValueError(
            f"journal {path}: the entry of {name!r} was not written by this generator; "
            "use another output path or delete the journal to start over"
        )


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="LLM-Seg40K", disable=not enabled)


def generate_dataset(
    config: DatagenConfig,
    *,
    client: ChatClient | None = None,
    captions: CaptionSource | None = None,
) -> RunResult:
    """Generate (or resume) one LLM-Seg40K-style split and write output, journal and statistics.

    Args:
        config: the run's configuration.
        client: text LLM to use instead of the one ``config.llm`` describes.
        captions: caption source to use instead of the one ``config.caption`` describes.

    Returns:
        The records, the statistics and this run's failures. Failed images are not
        journaled; running again with the same configuration retries exactly those.

    Raises:
        ValueError: bad annotations, captions missing for sampled images, or a journal
            written for another sample.
        LLMRequestError: the LLM server answered 401, 403 or 404 (credentials, model name
            or URL wrong); finished images stay in the journal.
    """
    index = InstanceIndex.from_file(config.annotations)
    sample = sample_images(index, config.sampling)
    items = sample.all()
    names = [image.file_name for _, image in items]
    if not items:
        raise ValueError(
            f"no image in {config.annotations} has between {config.sampling.simple_min_categories} and "
            f"{config.sampling.simple_max_categories} or at least {config.sampling.complex_min_categories} categories"
        )
    source = captions if captions is not None else build_caption_source(config.caption)
    if isinstance(source, PrecomputedCaptions):
        missing = source.missing(names)
        if missing:
            raise ValueError(f"{len(missing)} sampled images have no precomputed caption, e.g. {missing[:5]}")
    prices = Prices(config.llm.prompt_price_per_1k, config.llm.completion_price_per_1k)
    meter = UsageMeter(prices)
    metered = MeteredClient(client if client is not None else build_client(config.llm), meter)
    assert config.journal_path is not None and config.stats_path is not None  # set in __post_init__
    journal = Journal.open(
        config.journal_path,
        sample_digest(names),
        {
            "annotations": Path(config.annotations).name,
            "seed": config.sampling.seed,
            "num_images": len(names),
        },
    )
    for name, entry in journal.entries.items():
        _check_journal_entry(name, entry, journal.path)
    annotator = ImageAnnotator(config, index, source, metered)
    pending = [(group, image) for group, image in items if image.file_name not in journal.entries]
    LOGGER.info(
        "%d images sampled, %d already done, %d to go", len(items), len(items) - len(pending), len(pending)
    )

    failures: dict[str, str] = {}
    with (
        _progress(len(items), len(items) - len(pending), config.progress) as bar,
        ThreadPoolExecutor(max_workers=config.workers) as pool,
    ):
        futures: dict[Future[dict[str, Any]], str] = {
            pool.submit(annotator.annotate, group, image): image.file_name for group, image in pending
        }
        try:
            for future in as_completed(futures):
                name = futures[future]
                try:
                    journal.append(future.result())
                except LLMRequestError as exc:
                    if exc.status in FATAL_STATUSES:  # wrong key, model or URL: every image would fail
                        raise
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    LOGGER.error("image %s failed: %s", name, exc)
                except (ValueError, OSError) as exc:
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    LOGGER.error("image %s failed: %s", name, exc)
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    records = {
        name: journal.entries[name]["record"]
        for name in names
        if name in journal.entries and journal.entries[name]["record"]["qa_pairs"]
    }
    write_llmseg40k(config.out, records)
    done = [journal.entries[name] for name in names if name in journal.entries]
    stats = dataset_statistics(
        done,
        prices,
        sampled={
            "simple": len(sample.simple),
            "complex": len(sample.complex),
            "available_simple": sample.available_simple,
            "available_complex": sample.available_complex,
        },
        failed=len(failures),
        this_run=meter.snapshot(),
    )
    atomic_write_json(config.stats_path, stats, indent=2)
    return RunResult(records, stats, failures)
