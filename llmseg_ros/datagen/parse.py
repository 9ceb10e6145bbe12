"""Parsing and filtering of the text LLM's question/answer pairs.

:func:`parse_qa_pairs` reads what models actually return: JSON (bare or in code fences),
numbered ``[Q]: … [A]: …`` lines (the format the prompt asks for), ``Q:``/``A:`` and
``Question:``/``Answer:`` blocks, numbered questions ending in an answer, all with prose
around them; a question without an answer comes back with ``answer=None``.

:class:`CategoryMatcher` maps a free-text answer onto one of the image's category names
(case, ``_``/``-``/spaces, articles, parenthesised qualifiers, plurals, and the synonyms
listed in the category records themselves). :func:`filter_qa_pairs` keeps the pairs whose
answer is one of the image's categories, at most ``max_per_answer`` per category
(paper rule 7), optionally dropping questions that name their answer (rule 4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RawPair:
    """One parsed pair: the question text and the answer text (``None`` when absent)."""

    question: str
    answer: str | None


@dataclass(frozen=True)
class KeptPair:
    """A pair that passed the filter; ``answer`` is the dataset's category name."""

    question: str
    answer: str


@dataclass
class FilterReport:
    """Counts of what :func:`filter_qa_pairs` did with the parsed pairs.

    ``empty_mask`` is filled by the pipeline: kept pairs dropped afterwards because their
    category's mask has no pixel (degenerate annotations).
    """

    parsed: int = 0
    kept: int = 0
    missing_answer: int = 0
    unknown_answer: int = 0
    duplicate_question: int = 0
    name_in_question: int = 0
    over_answer_limit: int = 0
    over_question_limit: int = 0
    empty_mask: int = 0

    def add(self, other: FilterReport | Mapping[str, int]) -> None:
        """Add another report's counts (a report or its ``to_dict()``) to this one."""
        values = asdict(other) if isinstance(other, FilterReport) else other
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(values.get(f.name, 0)))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ----------------------------------------------------------------------------- parsing
_QUESTION_KEYS = ("question", "q", "query")
_ANSWER_KEYS = ("answer", "a", "target", "object", "category")
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)
_Q_MARK = r"(?:\[\s*(?:Q|[Qq]uestion)\s*\d*\s*\]\s*[:：]?|\b(?:Q|[Qq]uestion)\s*\d*\s*[:：])"
_A_MARK = r"(?:\[\s*(?:A|[Aa]nswer)\s*\d*\s*\]\s*[:：]?|\b(?:A|[Aa]nswer)\s*\d*\s*[:：])"
_ITEM = r"^[ \t]*(?:\d{1,3}[.)]|\(\d{1,3}\)|[-*•])[ \t]+"
_EVENTS = re.compile(rf"(?P<item>{_ITEM})|(?P<q>{_Q_MARK})|(?P<a>{_A_MARK})", re.M)


def parse_qa_pairs(text: str) -> list[RawPair]:
    """Extract question/answer pairs from an LLM reply, in reply order.

    JSON is tried first (fenced blocks, then the first decodable array/object holding
    pairs); otherwise the text is read as marked or numbered pairs. Never raises on
    malformed replies: unreadable parts are skipped, unanswered questions come back with
    ``answer=None``.
    """
    if not isinstance(text, str):
        raise TypeError(f"LLM reply must be a str, got {type(text).__name__}")
    from_json = _parse_json(text)
    if from_json:
        return from_json
    return _parse_text(text)


def _text_value(value: Any) -> str | None:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return None
    return str(value).strip() or None


def _pair_from_item(item: Any) -> RawPair | None:
    if isinstance(item, Mapping):
        lower = {str(k).strip().lower(): v for k, v in item.items()}
        question = next((lower[k] for k in _QUESTION_KEYS if k in lower), None)
        if not isinstance(question, str) or not question.strip():
            return None
        answer = next((lower[k] for k in _ANSWER_KEYS if k in lower), None)
        return RawPair(question.strip(), _text_value(answer))
    if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str) and item[0].strip():
        return RawPair(item[0].strip(), _text_value(item[1]))
    return None


def _pairs_from_json(obj: Any) -> list[RawPair]:
    if isinstance(obj, Mapping):
        single = _pair_from_item(obj)
        if single is not None:
            return [single]
        for value in obj.values():
            if isinstance(value, list):
                found = _pairs_from_json(value)
                if found:
                    return found
        return []
    if isinstance(obj, list):
        return [p for p in (_pair_from_item(item) for item in obj) if p is not None]
    return []


def _parse_json(text: str) -> list[RawPair]:
    decoder = json.JSONDecoder()
    for chunk in [*(m.group(1) for m in _FENCE.finditer(text)), text]:
        starts = [i for i, ch in enumerate(chunk) if ch in "[{"][:32]
        for start in starts:
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                continue
            pairs = _pairs_from_json(obj)
            if pairs:
                return pairs
    return []


def _first_line(payload: str) -> str:
    """The payload's text up to the end of its line, or its next non-empty line."""
    stripped = payload.lstrip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


def _split_inline(item: str) -> tuple[str, str | None]:
    """``"Which …? helmet"`` → (``"Which …?"``, ``"helmet"``); no trailing text → no answer."""
    cut = item.rfind("?")
    if cut < 0:
        return item, None
    rest = item[cut + 1 :].strip(" \t-–—:=>→|")
    return item[: cut + 1], rest or None


def _parse_text(text: str) -> list[RawPair]:
    text = "\n".join(
        line for line in text.replace("**", "").splitlines() if not line.lstrip().startswith("```")
    )
    matches = list(_EVENTS.finditer(text))
    pairs: list[RawPair] = []
    pending: str | None = None
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        payload = _first_line(text[match.end() : end])
        kind = match.lastgroup
        if kind == "a":
            if pending is not None:
                pairs.append(RawPair(pending, payload or None))
                pending = None
            continue
        if not payload:
            continue
        if pending is not None:
            pairs.append(RawPair(pending, None))
            pending = None
        if kind == "q":
            pending = payload
        else:  # a numbered / bulleted line without a Q marker
            question, answer = _split_inline(payload)
            if answer is None:
                pending = question
            else:
                pairs.append(RawPair(question, answer))
    if pending is not None:
        pairs.append(RawPair(pending, None))
    return [RawPair(p.question.strip(" \t\"'“”"), p.answer) for p in pairs]


# ----------------------------------------------------------------------------- matching
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "children": "child",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
}
_LEADS = ("the answer is ", "answer is ", "it is ", "it's ", "the ", "a ", "an ")


def _word_forms(word: str) -> set[str]:
    """The word plus the singulars it may be a plural of (over-generates on purpose)."""
    forms = {word}
    if word in _IRREGULAR:
        forms.add(_IRREGULAR[word])
    if len(word) > 3 and word.endswith("ies"):
        forms.add(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        forms |= {word[:-3] + "f", word[:-3] + "fe"}
    if len(word) > 3 and word.endswith("es"):
        forms.add(word[:-2])
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        forms.add(word[:-1])
    return forms


def clean_answer(answer: str) -> str:
    """Strip wrappers and trailing prose: ``' "Boots." They protect…'`` → ``'Boots'``."""
    text = _first_line(answer)
    text = text.strip(" \t\"'`*“”‘’[]")
    text = re.split(r"(?<=[\w)])[.!?;]\s", text, maxsplit=1)[0]
    return text.strip(" \t\"'`*“”‘’.!?;:,")


def _loose_key(text: str) -> str:
    """Lower case, ``_``/``-`` as spaces, collapsed whitespace (parentheses kept)."""
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _word_key(text: str) -> str:
    """Lower-case words only: parenthesised parts, punctuation and leading articles gone."""
    text = re.sub(r"\([^)]*\)", " ", text.lower())
    text = " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())
    changed = True
    while changed:
        changed = False
        for lead in _LEADS:
            if text.startswith(lead):
                text, changed = text[len(lead) :], True
    return text


def _plural_keys(key: str) -> set[str]:
    words = key.split()
    if not words:
        return set()
    return {" ".join([*words[:-1], form]) for form in _word_forms(words[-1])}


class CategoryMatcher:
    """Maps free-text answers onto the category names of one image.

    Args:
        categories: category name → synonyms from the category record (may be empty).

    Matching is tried in three tiers, stopping at the first that finds anything:
    exact up to case/``_``/``-``/spacing, then on words only (qualifiers in parentheses
    and articles dropped), then allowing singular/plural differences in the last word.
    A tier that finds two or more categories makes the answer ambiguous (``None``).
    """

    def __init__(self, categories: Mapping[str, Sequence[str]]) -> None:
        if not categories:
            raise ValueError("CategoryMatcher needs at least one category name")
        self.names = list(categories)
        self._aliases = {name: [name, *categories[name]] for name in self.names}
        self._tiers: list[dict[str, set[str]]] = [{}, {}, {}]
        for name, aliases in self._aliases.items():
            for alias in aliases:
                self._tiers[0].setdefault(_loose_key(alias), set()).add(name)
                word_key = _word_key(alias)
                if word_key:
                    self._tiers[1].setdefault(word_key, set()).add(name)
                    for key in _plural_keys(word_key):
                        self._tiers[2].setdefault(key, set()).add(name)

    def match(self, answer: str) -> str | None:
        """The category name ``answer`` refers to, or ``None`` (unknown or ambiguous)."""
        text = clean_answer(answer)
        if not text:
            return None
        word_key = _word_key(text)
        probes: list[Iterable[str]] = [[_loose_key(text)], [word_key], _plural_keys(word_key)]
        for tier, keys in zip(self._tiers, probes):
            found: set[str] = set()
            for key in keys:
                found |= tier.get(key, set())
            if len(found) == 1:
                return next(iter(found))
            if found:
                return None
        return None

    def mentions(self, question: str, name: str) -> bool:
        """Whether ``question`` spells out category ``name`` or one of its synonyms (any number)."""
        words = _word_key(question).split()
        for alias in self._aliases[name]:
            target = _word_key(alias).split()
            if not target:
                continue
            n = len(target)
            last = _word_forms(target[-1])
            for i in range(len(words) - n + 1):
                if words[i : i + n - 1] == target[:-1] and _word_forms(words[i + n - 1]) & last:
                    return True
        return False


def filter_qa_pairs(
    pairs: Sequence[RawPair],
    matcher: CategoryMatcher,
    *,
    max_per_answer: int = 2,
    max_questions: int = 5,
    drop_name_leaks: bool = True,
) -> tuple[list[KeptPair], FilterReport]:
    """Keep the usable pairs, in order.

    A pair is dropped when its answer or question is missing, its answer is not one of
    the matcher's categories, its question repeats an earlier one, its question names
    the answer (``drop_name_leaks``), its category already has ``max_per_answer``
    questions, or ``max_questions`` pairs are already kept.
    """
    if max_per_answer < 1 or max_questions < 1:
        raise ValueError(
            f"max_per_answer and max_questions must be >= 1, got {max_per_answer}, {max_questions}"
        )
    report = FilterReport(parsed=len(pairs))
    kept: list[KeptPair] = []
    per_answer: dict[str, int] = {}
    seen: set[str] = set()
    for pair in pairs:
        if pair.answer is None or not pair.question.strip():
            report.missing_answer += 1
            continue
        name = matcher.match(pair.answer)
        if name is None:
            report.unknown_answer += 1
            continue
        question_key = _word_key(pair.question)
        if question_key in seen:
            report.duplicate_question += 1
            continue
        if drop_name_leaks and matcher.mentions(pair.question, name):
            report.name_in_question += 1
            continue
        if per_answer.get(name, 0) >= max_per_answer:
            report.over_answer_limit += 1
            continue
        if len(kept) >= max_questions:
            report.over_question_limit += 1
            continue
        seen.add(question_key)
        per_answer[name] = per_answer.get(name, 0) + 1
        kept.append(KeptPair(pair.question.strip(), name))
    report.kept = len(kept)
    return kept, report
