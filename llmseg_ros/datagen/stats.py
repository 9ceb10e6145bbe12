"""Dataset statistics in the manner of the LLM-Seg paper, section 4.3.

Computed from the journal entries of a run (so a resumed run reports on every image it
finished, across restarts): images, questions, questions per image, words per question,
categories covered, simple/complex split, filter counts, tokens and cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from llmseg_ros.datagen.llm import Prices, Usage
from llmseg_ros.datagen.parse import FilterReport


def journal_usage(entries: Iterable[Mapping[str, Any]], prices: Prices) -> Usage:
    """Token totals over journal entries (each holding a ``usage`` mapping), priced with ``prices``."""
    requests = attempts = prompt = completion = missing = 0
    for entry in entries:
        usage = entry.get("usage") or {}
        requests += 1
        attempts += int(usage.get("attempts", 1))
        prompt += int(usage.get("prompt_tokens", 0))
        completion += int(usage.get("completion_tokens", 0))
        missing += 0 if usage.get("has_usage", True) else 1
    return Usage(requests, attempts, prompt, completion, missing, prices.cost(prompt, completion))


def dataset_statistics(
    entries: Iterable[Mapping[str, Any]],
    prices: Prices,
    *,
    sampled: Mapping[str, int] | None = None,
    failed: int = 0,
    this_run: Usage | None = None,
) -> dict[str, Any]:
    """Summarise finished images.

    Args:
        entries: journal entries with ``group``, ``record`` (``qa_pairs`` of
            ``{question, answer}``), ``filter`` counts and ``usage``.
        prices: per-1K-token prices for the cost figures.
        sampled: sample sizes to report (``simple``, ``complex``, pool sizes).
        failed: images that failed in this run (not journaled; a rerun retries them).
        this_run: the usage meter of this process (includes failed images' replies).

    Returns:
        JSON-ready mapping; ``questions_per_image`` and ``words_per_question`` are means
        over images with at least one question (0.0 when there are none).
    """
    entries = list(entries)
    images = questions = words = 0
    groups = {"simple": 0, "complex": 0}
    categories: set[str] = set()
    report = FilterReport()
    for entry in entries:
        pairs = entry["record"]["qa_pairs"]
        report.add(entry.get("filter") or {})
        if not pairs:
            continue
        images += 1
        groups[entry["group"]] = groups.get(entry["group"], 0) + 1
        for pair in pairs:
            questions += 1
            words += len(pair["question"].split())
            categories.add(pair["answer"])
    stats: dict[str, Any] = {
        "images": images,
        "images_processed": len(entries),
        "images_without_questions": len(entries) - images,
        "images_failed": failed,
        "questions": questions,
        "questions_per_image": questions / images if images else 0.0,
        "words_per_question": words / questions if questions else 0.0,
        "categories": len(categories),
        "groups": groups,
        "sampled": dict(sampled or {}),
        "filter": report.to_dict(),
        "usage": journal_usage(entries, prices).to_dict(),
    }
    if this_run is not None:
        stats["usage_this_run"] = this_run.to_dict()
    return stats


def format_statistics(stats: Mapping[str, Any]) -> str:
    """A short human-readable block of the main figures."""
    usage = stats["usage"]
    lines = [
        f"images                 {stats['images']} (simple {stats['groups'].get('simple', 0)}, "
        f"complex {stats['groups'].get('complex', 0)}; {stats['images_without_questions']} without questions, "
        f"{stats['images_failed']} failed)",
        f"questions              {stats['questions']}",
        f"questions per image    {stats['questions_per_image']:.2f}",
        f"words per question     {stats['words_per_question']:.1f}",
        f"categories             {stats['categories']}",
        f"tokens                 {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion",
        f"cost                   {usage['cost']:.4f}",
    ]
    return "\n".join(lines)
