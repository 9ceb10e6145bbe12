"""Prompt templates of the <SEG> VLM."""

from __future__ import annotations

import random

import pytest

from llmseg_ros.models import prompts
from llmseg_ros.models.prompts import (
    ANSWER_TEMPLATES,
    DEFAULT_ANSWER,
    EXPLANATORY_QUESTION_TEMPLATES,
    PHRASE_QUESTION_TEMPLATES,
    SEG_TOKEN,
    SENTENCE_QUESTION_TEMPLATES,
    format_instruction,
    is_sentence,
    pick_template,
    training_answer,
    training_question,
)

PHRASE_AT_LIMIT = "the big brown box on the left table"


def test_constants_match_the_papers() -> None:
    assert SEG_TOKEN == "<SEG>"
    assert DEFAULT_ANSWER == "It is <SEG>."
    assert {"It is <SEG>.", "Sure, it is <SEG>.", "Sure, the segmentation result is <SEG>.", "<SEG>."} <= set(
        ANSWER_TEMPLATES
    )
    for template in ANSWER_TEMPLATES:
        assert template.count(SEG_TOKEN) == 1
    for template in PHRASE_QUESTION_TEMPLATES:
        assert template.count("{phrase}") == 1 and SEG_TOKEN not in template
    for template in SENTENCE_QUESTION_TEMPLATES + EXPLANATORY_QUESTION_TEMPLATES:
        assert template.startswith("{sentence} ") and SEG_TOKEN not in template


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the red mug", False),
        ("stronger mario", False),
        ("trash can", False),
        ("Where can I throw away the scraps?", True),
        ("The thing I sit on.", True),
        ("where can I sit", True),  # question word, no punctuation
        ("find something that holds water", True),  # command verb
        ("the big brown box on the left of the blue table", True),  # > MAX_PHRASE_WORDS words
        (PHRASE_AT_LIMIT, False),  # exactly MAX_PHRASE_WORDS words
    ],
)
def test_is_sentence(text: str, expected: bool) -> None:
    assert len(PHRASE_AT_LIMIT.split(" ")) == prompts.MAX_PHRASE_WORDS
    assert is_sentence(text) is expected


def test_format_instruction_templates() -> None:
    assert format_instruction("Where could I sit?") == "Where could I sit? Please output segmentation mask."
    assert format_instruction("the cup") == "What is the cup in this image? Please output segmentation mask."
    # The caller's choice overrides the guess; punctuation is adapted to the template.
    assert format_instruction("the cup.", is_sentence=False) == (
        "What is the cup in this image? Please output segmentation mask."
    )
    assert format_instruction("the cup", is_sentence=True) == "the cup. Please output segmentation mask."
    assert format_instruction("where can I sit") == "where can I sit? Please output segmentation mask."
    assert (
        format_instruction("  the   cup \n")
        == "What is the cup in this image? Please output segmentation mask."
    )


@pytest.mark.parametrize("bad", ["", "   ", "\n"])
def test_format_instruction_rejects_empty(bad: str) -> None:
    with pytest.raises(ValueError, match="instruction must contain non-whitespace text"):
        format_instruction(bad)


def test_format_instruction_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="instruction must be a str"):
        format_instruction(3)  # type: ignore[arg-type]


def test_training_templates_are_seeded_and_cover_the_lists() -> None:
    seen_questions = {training_question("chair", random.Random(i)) for i in range(200)}
    assert seen_questions == {t.format(phrase="chair") for t in PHRASE_QUESTION_TEMPLATES}
    seen_sentences = {training_question("Where can I sit?", random.Random(i)) for i in range(200)}
    assert seen_sentences == {t.format(sentence="Where can I sit?") for t in SENTENCE_QUESTION_TEMPLATES}
    seen_answers = {training_answer(random.Random(i)) for i in range(200)}
    assert seen_answers == set(ANSWER_TEMPLATES)
    # Same seed, same draws.
    a, b = random.Random(7), random.Random(7)
    assert [training_question("chair", a) for _ in range(10)] == [
        training_question("chair", b) for _ in range(10)
    ]


def test_explanatory_questions_and_answers() -> None:
    rng = random.Random(0)
    question = training_question("Where can I sit?", rng, explain=True)
    assert question in {t.format(sentence="Where can I sit?") for t in EXPLANATORY_QUESTION_TEMPLATES}
    answer = training_answer(rng, explanation="Because the sofa is soft.")
    assert answer.endswith(" Because the sofa is soft.") and answer.count(SEG_TOKEN) == 1
    with pytest.raises(ValueError, match="explain=True needs a sentence"):
        training_question("chair", rng, explain=True)
    with pytest.raises(ValueError, match="must not contain <SEG>"):
        training_answer(rng, explanation="and <SEG> again")


def test_pick_template_checks_rng() -> None:
    with pytest.raises(TypeError, match=r"rng must be a random\.Random"):
        pick_template(ANSWER_TEMPLATES, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one template"):
        pick_template((), random.Random(0))
    assert pick_template(("a",), random.Random(0)) == "a"


@pytest.mark.parametrize(
    ("text", "is_sent", "expected"),
    [
        # the LLM-Seg / LISA validation: text.strip() verbatim, no punctuation added or removed
        ("  where could I sit down  ", True, "where could I sit down Please output segmentation mask."),
        ("the cup.", False, "What is the cup. in this image? Please output segmentation mask."),
        ("a  b", True, "a  b Please output segmentation mask."),
    ],
)
def test_authors_style_keeps_the_instruction_verbatim(text: str, is_sent: bool, expected: str) -> None:
    assert format_instruction(text, is_sent, style="authors") == expected
    assert format_instruction(text, is_sent) != expected  # ours normalises and punctuates
    with pytest.raises(ValueError, match="style must be 'ours' or 'authors'"):
        format_instruction(text, style="theirs")
