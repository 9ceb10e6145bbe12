"""Prompt and answer templates of the ``<SEG>`` VLM (LISA / LLM-Seg conventions).

Inference uses one fixed template per query kind:

* a sentence (an implicit instruction or question):
  ``"{instruction} Please output segmentation mask."``
* a phrase (a name or a referring expression):
  ``"What is {phrase} in this image? Please output segmentation mask."``

and the teacher-forced answer :data:`DEFAULT_ANSWER` (``"It is <SEG>."``); weights trained by
the LLM-Seg / LISA authors are queried with their own wording instead (``style="authors"``:
the instruction verbatim, answer ``"[SEG]."``, see ``llmseg_ros.config.AUTHORS_PROMPT``). Training draws a
question and an answer template at random (LISA's lists) with a caller-given
``random.Random`` so data generation is reproducible.

The texts returned here are the *user turn* only; :class:`llmseg_ros.models.vlm.SegVLM` puts
them into the model's chat format together with the image placeholder.
"""

from __future__ import annotations

import random
import re

SEG_TOKEN = "<SEG>"
DEFAULT_ANSWER = f"It is {SEG_TOKEN}."

SENTENCE_TEMPLATE = "{sentence} Please output segmentation mask."
PHRASE_TEMPLATE = "What is {phrase} in this image? Please output segmentation mask."

# Training question templates (LISA's short / long / explanatory lists).
PHRASE_QUESTION_TEMPLATES: tuple[str, ...] = (
    "Can you segment the {phrase} in this image?",
    "Please segment the {phrase} in this image.",
    "What is {phrase} in this image? Please respond with segmentation mask.",
    PHRASE_TEMPLATE,
)
SENTENCE_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{sentence} Please respond with segmentation mask.",
    SENTENCE_TEMPLATE,
)
EXPLANATORY_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{sentence} Please output segmentation mask and explain why.",
    "{sentence} Please output segmentation mask and explain the reason.",
    "{sentence} Please output segmentation mask and give some explanation.",
)
ANSWER_TEMPLATES: tuple[str, ...] = (
    DEFAULT_ANSWER,
    f"Sure, {SEG_TOKEN}.",
    f"Sure, it is {SEG_TOKEN}.",
    f"Sure, the segmentation result is {SEG_TOKEN}.",
    f"{SEG_TOKEN}.",
)

# A text with more words than this is treated as a sentence even without punctuation.
MAX_PHRASE_WORDS = 8
# First words that make an unpunctuated text a question / a command rather than a name.
QUESTION_WORDS = frozenset(
    {"what", "where", "which", "who", "whom", "whose", "why", "how", "when"}
    | {"is", "are", "can", "could", "would", "should", "do", "does"}
)
COMMAND_WORDS = frozenset(
    {"find", "show", "segment", "locate", "highlight", "point", "give", "tell", "pick", "please"}
)

_TERMINAL = (".", "?", "!")


def _clean(text: str, name: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise ValueError(f"{name} must contain non-whitespace text, got {text!r}")
    return cleaned


def _first_word(text: str) -> str:
    match = re.match(r"[A-Za-z']+", text)
    return match.group(0).lower() if match else ""


def is_sentence(text: str) -> bool:
    """Guess whether ``text`` is a sentence (True) or a phrase (False).

    A sentence ends with ``.``, ``?`` or ``!``, has more than :data:`MAX_PHRASE_WORDS`
    words, or starts with a question word ("where", "what", "can" …) or a command verb
    ("find", "show" …). Everything else ("the red mug", "stronger mario") is a phrase.
    Used when the caller does not say which kind the instruction is.
    """
    return _looks_like_sentence(_clean(text, "text"))


def _looks_like_sentence(cleaned: str) -> bool:
    if cleaned.endswith(_TERMINAL) or len(cleaned.split()) > MAX_PHRASE_WORDS:
        return True
    first = _first_word(cleaned)
    return first in QUESTION_WORDS or first in COMMAND_WORDS


def _as_sentence(text: str) -> str:
    """Terminal punctuation added when missing (``?`` after a question word, else ``.``)."""
    if text.endswith(_TERMINAL):
        return text
    return text + ("?" if _first_word(text) in QUESTION_WORDS else ".")


def _as_phrase(text: str) -> str:
    return text.rstrip(" .!?")


def format_instruction(instruction: str, is_sentence: bool | None = None, *, style: str = "ours") -> str:
    """The user-turn text for an instruction at inference time.

    Args:
        instruction: the user's instruction.
        is_sentence: True → sentence template, False → phrase template, None → decided
            by :func:`is_sentence`.
        style: ``"ours"``: whitespace normalised, terminal punctuation added to a sentence
            and stripped from a phrase; ``"authors"``: the instruction stripped of leading
            and trailing whitespace and used verbatim, as the LLM-Seg / LISA validation
            code does (``text.strip()`` into the same two templates).

    Returns:
        ``"{sentence} Please output segmentation mask."`` or
        ``"What is {phrase} in this image? Please output segmentation mask."``.
    """
    if style not in ("ours", "authors"):
        raise ValueError(f"style must be 'ours' or 'authors', got {style!r}")
    cleaned = _clean(instruction, "instruction")
    sentence = _looks_like_sentence(cleaned) if is_sentence is None else bool(is_sentence)
    if style == "authors":
        text = instruction.strip()
        return SENTENCE_TEMPLATE.format(sentence=text) if sentence else PHRASE_TEMPLATE.format(phrase=text)
    if sentence:
        return SENTENCE_TEMPLATE.format(sentence=_as_sentence(cleaned))
    phrase = _as_phrase(cleaned)
    if not phrase:
        raise ValueError(f"instruction {instruction!r} has no words to use as a phrase")
    return PHRASE_TEMPLATE.format(phrase=phrase)


def pick_template(templates: tuple[str, ...] | list[str], rng: random.Random) -> str:
    """One template drawn uniformly with ``rng`` (a ``random.Random``)."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if not templates:
        raise ValueError("templates must hold at least one template")
    return templates[rng.randrange(len(templates))]


def training_question(
    text: str, rng: random.Random, *, is_sentence: bool | None = None, explain: bool = False
) -> str:
    """A randomly templated user turn for training.

    Args:
        text: a category name / referring phrase, or a reasoning sentence.
        rng: source of randomness (the caller seeds it for reproducible data).
        is_sentence: kind of ``text``; ``None`` → :func:`is_sentence`.
        explain: ask for an explanation too (sentences only; LISA's explanatory list).

    Returns:
        A phrase question from :data:`PHRASE_QUESTION_TEMPLATES`, or a sentence question
        from :data:`SENTENCE_QUESTION_TEMPLATES` / :data:`EXPLANATORY_QUESTION_TEMPLATES`.
    """
    cleaned = _clean(text, "text")
    sentence = _looks_like_sentence(cleaned) if is_sentence is None else bool(is_sentence)
    if explain and not sentence:
        raise ValueError(f"explain=True needs a sentence query, got the phrase {text!r}")
    if sentence:
        templates = EXPLANATORY_QUESTION_TEMPLATES if explain else SENTENCE_QUESTION_TEMPLATES
        return pick_template(templates, rng).format(sentence=_as_sentence(cleaned))
    return pick_template(PHRASE_QUESTION_TEMPLATES, rng).format(phrase=_as_phrase(cleaned))


def training_answer(rng: random.Random, explanation: str | None = None) -> str:
    """A randomly templated answer holding exactly one :data:`SEG_TOKEN`.

    Args:
        rng: source of randomness.
        explanation: optional reasoning appended after the template
            ("It is <SEG>. Because …"); must not contain ``<SEG>``.
    """
    answer = pick_template(ANSWER_TEMPLATES, rng)
    if explanation is None:
        return answer
    cleaned = _clean(explanation, "explanation")
    if SEG_TOKEN in cleaned:
        raise ValueError(f"explanation must not contain {SEG_TOKEN}, got {explanation!r}")
    return f"{answer} {cleaned}"
