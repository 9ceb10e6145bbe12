"""Parsers of VLM answers, on a corpus of realistic outputs (Qwen2.5-VL, Seg-Zero, LLaVA style)."""

from __future__ import annotations

import pytest

from llmseg_ros.methods.parsing import (
    GroundedObject,
    extract_reasoning,
    mark_candidates,
    parse_boxes,
    parse_mark_numbers,
)

# (answer, expected objects as (box, points, label))
BOX_CORPUS = [
    pytest.param(
        '[{"bbox_2d": [10, 20, 110, 220], "label": "cup"}]',
        [((10, 20, 110, 220), [], "cup")],
        id="well-formed",
    ),
    pytest.param(
        "The user wants to throw away scraps, so the bin next to the sink.\n"
        '```json\n[\n  {"bbox_2d": [512, 300, 640, 470], "point_2d": [575, 390], "label": "trash bin"}\n]\n```\n'
        "The bin is the only container for waste.",
        [((512, 300, 640, 470), [(575, 390)], "trash bin")],
        id="fenced-with-prose",
    ),
    pytest.param(
        '```json\n[{"bbox_2d": [5, 6, 50, 60], "label": "mug"}, {"bbox_2d": [70, 80, 90, 99], "label": "mug"}]\n```',
        [((5, 6, 50, 60), [], "mug"), ((70, 80, 90, 99), [], "mug")],
        id="several-objects",
    ),
    pytest.param(
        "[{'bbox_2d': [10, 20, 30, 40], 'label': 'mug',}, ]",
        [((10, 20, 30, 40), [], "mug")],
        id="single-quotes-trailing-commas",
    ),
    pytest.param(
        '[{"bbox_2d": [10, 20, 30, 40], "label": "cup"}, {"bbox_2d": [50, 60, 70, 80] "label": "plate"}]',
        [((10, 20, 30, 40), [], "cup"), ((50, 60, 70, 80), [], "plate")],
        id="missing-comma",
    ),
    pytest.param(
        '[{"bbox_2d": [10, 20, 30, 40], "label": "cup"}, {"bbox_2d": [50, 60, 7',
        [((10, 20, 30, 40), [], "cup")],
        id="truncated",
    ),
    pytest.param(
        '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "lid"}, {"bbox_2d": [5, 6, 7, 8], "label": "pa',
        [((1, 2, 3, 4), [], "lid"), ((5, 6, 7, 8), [], None)],
        id="truncated-fence-inside-string",
    ),
    pytest.param(
        '[{"bbox_2d": [300, 200, 100, 50], "label": "chair"}]',
        [((100, 50, 300, 200), [], "chair")],
        id="swapped-corners",
    ),
    pytest.param(
        "<think>Something to sit on: the sofa.</think>\n"
        '<answer>{"bbox": [100, 50, 320, 240], "points_1": [150, 120], "points_2": [260, 200]}</answer>',
        [((100, 50, 320, 240), [(150, 120), (260, 200)], None)],
        id="seg-zero-format",
    ),
    pytest.param('[{"point_2d": [12, 34], "label": "knob"}]', [(None, [(12, 34)], "knob")], id="points-only"),
    pytest.param(
        '{"bbox_2d": [1, 2, 3, 4]}\n{"bbox_2d": [5, 6, 7, 8]}',
        [((1, 2, 3, 4), [], None), ((5, 6, 7, 8), [], None)],
        id="json-lines",
    ),
    pytest.param("[{bbox_2d: [1, 2, 3, 4], label: 'x'}]", [((1, 2, 3, 4), [], "x")], id="unquoted-keys"),
    pytest.param(
        '{"objects": [{"box": {"x1": 4, "y1": 5, "x2": 40, "y2": 50}, "name": "book"}]}',
        [((4, 5, 40, 50), [], "book")],
        id="nested-dict-box",
    ),
    pytest.param(
        "The ladder is at [0.12, 0.3, 0.45, 0.9].", [((0.12, 0.3, 0.45, 0.9), [], None)], id="llava-relative"
    ),
    pytest.param("the stool (10,20),(30,40)", [((10, 20, 30, 40), [], None)], id="qwen2-vl-pairs"),
    pytest.param(
        '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [1, 2, 3, 4]}]', [((1, 2, 3, 4), [], None)], id="duplicates"
    ),
    pytest.param("[]", [], id="empty-list"),
    pytest.param("```json\n[]\n```", [], id="empty-fenced"),
    pytest.param("There is no such object in the image.", [], id="no-such-object"),
    pytest.param(
        "I cannot see anything you could stand on; there are 2 cups and 3 plates.", [], id="prose-numbers"
    ),
    pytest.param('[{"bbox_2d": [1, 2, 3], "label": "bad"}]', [], id="three-numbers"),
]


@pytest.mark.parametrize(("text", "expected"), BOX_CORPUS)
def test_parse_boxes_corpus(text: str, expected: list) -> None:
    got = parse_boxes(text)
    assert [(o.box, o.points, o.label) for o in got] == [
        (
            tuple(float(v) for v in box) if box is not None else None,
            [tuple(map(float, p)) for p in pts],
            label,
        )
        for box, pts, label in expected
    ]
    assert all(isinstance(o, GroundedObject) for o in got)


def test_parse_boxes_prefers_answer_over_reasoning_json() -> None:
    text = (
        '<think>An earlier guess was [{"bbox_2d": [0, 0, 5, 5]}] but it is wrong.</think>'
        '<answer>[{"bbox_2d": [10, 10, 20, 20], "label": "mug"}]</answer>'
    )
    assert [o.box for o in parse_boxes(text)] == [(10.0, 10.0, 20.0, 20.0)]


def test_parse_boxes_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="text must be a string"):
        parse_boxes(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('The bin by the sink.\n```json\n[{"bbox_2d": [1, 2, 3, 4]}]\n```', "The bin by the sink."),
        ("<think>It is used for sitting.</think><answer>[]</answer>", "It is used for sitting."),
        ('Sofa: [{"bbox_2d": [1, 2, 3, 4]}] because it is soft.', "Sofa: because it is soft."),
        ("No such object. []", "No such object."),
    ],
)
def test_extract_reasoning(text: str, expected: str) -> None:
    assert extract_reasoning(text) == expected


VALID = range(1, 11)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", [3]),
        ("#3", [3]),
        ("mark 3", [3]),
        ("Mark #3.", [3]),
        ("[3]", [3]),
        ("3 and 5", [3, 5]),
        ("3, 5", [3, 5]),
        ("Marks 2 and 7", [2, 7]),
        ("regions 4, 2 & 9", [2, 4, 9]),
        ('{"marks": [6, 1]}', [1, 6]),
        ("none", []),
        ("None of the marks match the instruction.", []),
        ("Answer: none", []),
        ("No such region.", []),
        ("Mark 12", []),  # out of range
        ("Marks 3 and 42", [3]),
        ("The mug is mark 4, which is 30 cm from mark 9. Answer: 4", [4]),
        ("There are 2 cups on the table; the answer is 5.", [5]),
        ("1. The fridge is mark 6.\n2. The oven is mark 8.", [6, 8]),
        ("It is 50% covered and 2.5 m away; mark #6", [6]),
        ("Answer:\n3.\n", [3]),
        ("I think 3 is the bin.", [3]),
        ("Answer: 3; none of the others", [3]),
        ("<answer>7</answer>", [7]),
        ("There are 3 chairs.", []),
    ],
)
def test_parse_mark_numbers_corpus(text: str, expected: list[int]) -> None:
    assert parse_mark_numbers(text, VALID) == expected


def test_parse_mark_numbers_valid_set_and_candidates() -> None:
    assert parse_mark_numbers("marks 2, 4 and 6", {2, 6}) == [2, 6]
    assert mark_candidates("marks 2, 4 and 60") == [2, 4, 60]
    with pytest.raises(TypeError, match="valid must be a range or a set"):
        parse_mark_numbers("3", [1, 2, 3])  # type: ignore[arg-type]
