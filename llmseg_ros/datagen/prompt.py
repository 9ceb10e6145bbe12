"""The annotator prompt sent to the text LLM (LLM-Seg paper, section 4.2.2 and Fig. 4).

Three parts, as in the paper: the role and its seven rules, one worked example, then the
query built the same way as the example from an image description and the image's
ground-truth category names. The wording is ours; the rules carry the paper's meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

OBJECT_SEPARATOR = " | "

ROLE = (
    "You are labelling images for a segmentation dataset. You cannot see the image: you get a "
    "short description of it and the list of objects that are outlined in it. Write {n} "
    "question-and-answer pairs; each question must point to one of the outlined objects, and its "
    "answer is that object. Follow these rules:"
)

RULES = (
    "Keep every question brief and clear, and tie it closely to this image.",
    "Each answer must be exactly one name copied from the object list.",
    "Objects on the list that the description leaves out are still in the image; you may ask about them as well.",
    "Never put the object's name or its position in the image into the question.",
    "Build each question on what the object is like or what it is used for.",
    "Ask about this particular scene, not about general facts that would fit any picture.",
    "Ask at most two different questions that share the same answer.",
)

EXAMPLE_DESCRIPTION = (
    "A small kitchen with white cabinets. A woman is cutting vegetables on a wooden board next to "
    "the sink. A kettle stands on the stove, and a bowl of apples sits on the counter. Sunlight "
    "comes in through a window above the sink."
)
EXAMPLE_OBJECTS = (
    "person",
    "knife",
    "cutting_board",
    "sink",
    "kettle",
    "stove",
    "apple",
    "bowl",
    "refrigerator",
)
EXAMPLE_PAIRS = (
    ("Which item would she reach for to heat water for a cup of tea?", "kettle"),
    ("What is she holding to slice the vegetables she is preparing?", "knife"),
    ("Where could she wash the vegetables before cooking them?", "sink"),
    ("Which appliance in this kitchen keeps the food cold?", "refrigerator"),
    ("What protects the counter top while she chops?", "cutting_board"),
)


def format_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    """Numbered ``[Q]: … [A]: …`` lines, the answer format the prompt asks for."""
    return "\n".join(f"{i}. [Q]: {q} [A]: {a}" for i, (q, a) in enumerate(pairs, start=1))


def _block(description: str, objects: Sequence[str]) -> str:
    return f"[Description]:\n{description.strip()}\n\n[Objects]:\n{OBJECT_SEPARATOR.join(objects)}\n\n[Questions]:\n"


def build_prompt(description: str, categories: Sequence[str], num_questions: int = 5) -> str:
    """The full annotator prompt for one image.

    Args:
        description: the image caption (plain text, a few sentences).
        categories: the image's ground-truth category names, as written in the dataset.
        num_questions: how many pairs to ask for (5 in the paper).

    Returns:
        One string: role, numbered rules, the worked example, then the query whose
        ``[Questions]`` part is left for the model to fill.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"description must be a non-empty string, got {description!r}")
    names = [c for c in categories]
    if not names or any(not isinstance(c, str) or not c.strip() for c in names):
        raise ValueError(f"categories must be a non-empty list of non-empty strings, got {names!r}")
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    rules = "\n".join(f"{i}. {rule}" for i, rule in enumerate(RULES, start=1))
    return (
        f"{ROLE.format(n=num_questions)}\n\n{rules}\n\n"
        "Here is a worked example.\n\n"
        f"{_block(EXAMPLE_DESCRIPTION, EXAMPLE_OBJECTS)}{format_pairs(EXAMPLE_PAIRS)}\n\n"
        f"Now write {num_questions} pairs in the same format for the image below.\n\n"
        f"{_block(description, names)}"
    )


def build_messages(
    description: str, categories: Sequence[str], num_questions: int = 5
) -> list[dict[str, str]]:
    """Chat messages for :func:`build_prompt`: a single user turn, as in the paper."""
    return [{"role": "user", "content": build_prompt(description, categories, num_questions)}]
