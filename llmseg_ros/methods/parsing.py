"""Robust parsers for the free-text answers of chat VLMs.

* :func:`parse_boxes` — grounding answers: JSON lists of objects with a box
  (``bbox_2d`` / ``box_2d`` / ``bbox`` / ``box`` ...), optional positive points
  (``point_2d`` / ``points`` / Seg-Zero's ``points_1`` ...) and an optional label, with or
  without code fences, ``<answer>`` tags, prose around them, Python-style quoting,
  trailing commas or a truncated end. When no JSON can be recovered, numeric 4-tuples
  after box keys (or bare bracketed 4-tuples, or Qwen2-VL's ``(x1,y1),(x2,y2)``) are
  collected best-effort. Coordinates are returned exactly as the model wrote them (its own
  convention; see :mod:`llmseg_ros.models.coords`), corners reordered to x1 <= x2,
  y1 <= y2.
* :func:`parse_mark_numbers` — Set-of-Mark answers: which numbered marks the model named
  (``"3"``, ``"#3"``, ``"mark 3"``, ``"[3]"``, ``"3 and 5"``, ``"Marks 2 and 7"``,
  ``"none"``).
* :func:`extract_reasoning` — the model's explanation without the machine-readable part.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]
Point = tuple[float, float]

BOX_KEYS = ("bbox_2d", "box_2d", "bbox", "box", "bounding_box", "boundingbox", "bndbox", "xyxy")
LABEL_KEYS = ("label", "name", "object", "category", "class", "ref", "text")
_POINT_KEY = re.compile(r"^(?:positive_)?(?:key)?points?(?:_2d)?(?:_\d+)?$")
_NUM = r"-?\d+(?:\.\d+)?"


@dataclass
class GroundedObject:
    """One object named by the model, in the model's own coordinates.

    Attributes:
        box: XYXY (x1 <= x2, y1 <= y2) or ``None`` when the model gave only points.
        points: positive points (x, y) on the object, possibly empty.
        label: the object's name when the model gave one.
    """

    box: Box | None
    points: list[Point] = field(default_factory=list)
    label: str | None = None


# -- scalar helpers -----------------------------------------------------------------------
def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and re.fullmatch(r"\s*" + _NUM + r"\s*", value):
        return float(value)
    return None


def _numbers(values: Iterable[Any]) -> list[float] | None:
    out = [_number(v) for v in values]
    return None if any(v is None for v in out) else [v for v in out if v is not None]


def _ordered(x1: float, y1: float, x2: float, y2: float) -> Box:
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _as_box(value: Any) -> Box | None:
    """[x1, y1, x2, y2], [[x1, y1], [x2, y2]] or {x1, y1, x2, y2} / {xmin, ...} → box."""
    if isinstance(value, (list, tuple)):
        if len(value) == 4:
            nums = _numbers(value)
            if nums is not None:
                return _ordered(*nums)
        if len(value) == 2 and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
            nums = _numbers([*value[0], *value[1]])
            if nums is not None:
                return _ordered(*nums)
        return None
    if isinstance(value, dict):
        lower = {str(k).lower(): v for k, v in value.items()}
        for keys in (
            ("x1", "y1", "x2", "y2"),
            ("xmin", "ymin", "xmax", "ymax"),
            ("left", "top", "right", "bottom"),
        ):
            if all(k in lower for k in keys):
                nums = _numbers(lower[k] for k in keys)
                if nums is not None:
                    return _ordered(*nums)
    return None


def _as_points(value: Any) -> list[Point]:
    """[x, y], [[x, y], ...], {x, y} or a list of those → points."""
    if isinstance(value, dict):
        lower = {str(k).lower(): v for k, v in value.items()}
        nums = _numbers([lower.get("x"), lower.get("y")])
        return [(nums[0], nums[1])] if nums is not None else []
    if isinstance(value, (list, tuple)):
        if len(value) == 2:
            nums = _numbers(value)
            if nums is not None:
                return [(nums[0], nums[1])]
        points: list[Point] = []
        for item in value:
            if isinstance(item, (list, tuple, dict)):
                points.extend(_as_points(item))
        return points
    return []


def _object_from_dict(value: dict[Any, Any]) -> GroundedObject | None:
    lower = {str(k).lower().strip(): v for k, v in value.items()}
    box = None
    for key in BOX_KEYS:
        if key in lower:
            box = _as_box(lower[key])
            if box is not None:
                break
    points: list[Point] = []
    for key, item in lower.items():
        if _POINT_KEY.match(key):
            points.extend(_as_points(item))
    if box is None and not points:
        return None
    label = None
    for key in LABEL_KEYS:
        if isinstance(lower.get(key), str) and lower[key].strip():
            label = lower[key].strip()
            break
    return GroundedObject(box=box, points=points, label=label)


def _objects_from(value: Any) -> list[GroundedObject]:
    """Every object in a parsed JSON value (dicts with box/point keys, bare 4-lists)."""
    if isinstance(value, dict):
        obj = _object_from_dict(value)
        if obj is not None:
            return [obj]
        return [o for v in value.values() for o in _objects_from(v)]
    if isinstance(value, (list, tuple)):
        box = _as_box(value)
        if box is not None:
            return [GroundedObject(box=box)]
        return [o for v in value for o in _objects_from(v)]
    return []


# -- JSON fragments -------------------------------------------------------------------------
@dataclass
class _Fragment:
    text: str
    start: int
    end: int  # exclusive
    missing: str  # closing brackets needed when the fragment is truncated ("" if closed)
    open_quote: int | None  # index in ``text`` of an unterminated string's opening quote


def _scan(text: str, start: int) -> _Fragment:
    """The bracketed fragment starting at ``text[start]`` ('[' or '{'), quote-aware."""
    closers = {"[": "]", "{": "}"}
    stack: list[str] = []
    quote: str | None = None
    quote_at = 0
    escape = False
    for i in range(start, len(text)):
        c = text[i]
        if quote is not None:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == quote:
                quote = None
            continue
        if c == '"' or (
            c == "'" and not (i > 0 and text[i - 1].isalnum() and i + 1 < len(text) and text[i + 1].isalpha())
        ):
            quote, quote_at = c, i
        elif c in closers:
            stack.append(closers[c])
        elif c in "]}":
            if not stack or stack[-1] != c:
                return _Fragment(text[start:i], start, i, "".join(reversed(stack)), None)
            stack.pop()
            if not stack:
                return _Fragment(text[start : i + 1], start, i + 1, "", None)
    open_quote = quote_at - start if quote is not None else None
    return _Fragment(text[start:], start, len(text), "".join(reversed(stack)), open_quote)


def _fragments(text: str) -> list[_Fragment]:
    out: list[_Fragment] = []
    i = 0
    while i < len(text):
        if text[i] in "[{":
            frag = _scan(text, i)
            out.append(frag)
            i = max(frag.end, i + 1)
        else:
            i += 1
    return out


def _repair(frag: _Fragment) -> str:
    """Best-effort JSON from a malformed or truncated fragment."""
    s = frag.text
    if frag.open_quote is not None:
        s = s[: frag.open_quote]
    if frag.missing:
        # Drop a dangling partial element: trailing separators and an incomplete key.
        s = re.sub(r"""(?:,|:|\s|"[^"]*"\s*:|'[^']*'\s*:)+$""", "", s)
        s += frag.missing
    s = re.sub(r"'([^'\"\\]*)'", r'"\1"', s)  # single-quoted strings
    s = re.sub(r"\bNone\b", "null", s)
    s = re.sub(r"\bTrue\b", "true", s)
    s = re.sub(r"\bFalse\b", "false", s)
    s = re.sub(r"([{,]\s*)([A-Za-z_][\w\-]*)\s*:", r'\1"\2":', s)  # unquoted keys
    s = re.sub(r"}\s*{", "},{", s)  # missing comma between objects
    s = re.sub(r"]\s*\[", "],[", s)
    s = re.sub(r",\s*([\]}])", r"\1", s)  # trailing commas
    return s


def _load(frag: _Fragment) -> tuple[bool, Any]:
    """(parsed?, value) for one fragment: strict JSON, Python literal, then repaired JSON."""
    if not frag.missing and frag.open_quote is None:
        try:
            return True, json.loads(frag.text)
        except ValueError:
            pass
        try:
            return True, ast.literal_eval(frag.text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    try:
        return True, json.loads(_repair(frag))
    except ValueError:
        return False, None


# -- regex fallback -------------------------------------------------------------------------
_TUPLE4 = re.compile(
    r"[\[(]\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*[\])]"
)
_PAIR_BOX = re.compile(
    r"\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)\s*,?\s*\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)"
)
_KEYED_BOX = re.compile(
    r"""["']?(?:""" + "|".join(BOX_KEYS) + r""")["']?\s*[:=]\s*""" + _TUPLE4.pattern, re.IGNORECASE
)
_KEYED_POINTS = re.compile(
    r"""["']?(?:positive_)?points?(?:_2d)?(?:_\d+)?["']?\s*[:=]\s*(\[[\[\]\d\s,.\-]*\]?)""", re.IGNORECASE
)
_KEYED_LABEL = re.compile(
    r"""["']?(?:""" + "|".join(LABEL_KEYS) + r""")["']?\s*[:=]\s*["']([^"'\n]*)["']?""", re.I
)


def _regex_object(chunk: str) -> GroundedObject | None:
    match = _KEYED_BOX.search(chunk) or _TUPLE4.search(chunk)
    box = _ordered(*(float(g) for g in match.groups())) if match else None
    if box is None and (pair := _PAIR_BOX.search(chunk)):
        box = _ordered(*(float(g) for g in pair.groups()))
    points: list[Point] = []
    for pm in _KEYED_POINTS.finditer(chunk):
        nums = [float(n) for n in re.findall(_NUM, pm.group(1))]
        points.extend((nums[i], nums[i + 1]) for i in range(0, len(nums) - 1, 2))
    if box is None and not points:
        return None
    label_match = _KEYED_LABEL.search(chunk)
    label = label_match.group(1).strip() if label_match and label_match.group(1).strip() else None
    return GroundedObject(box=box, points=points, label=label)


def _regex_objects(text: str) -> list[GroundedObject]:
    """Objects recovered with regular expressions (one per ``{``-chunk, or per 4-tuple)."""
    if "{" in text:
        chunks = text.split("{")[1:]
        return [obj for chunk in chunks if (obj := _regex_object(chunk)) is not None]
    boxes = [_ordered(*(float(g) for g in m.groups())) for m in _TUPLE4.finditer(text)]
    if not boxes:
        boxes = [_ordered(*(float(g) for g in m.groups())) for m in _PAIR_BOX.finditer(text)]
    return [GroundedObject(box=b) for b in boxes]


# -- public API ---------------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.IGNORECASE | re.DOTALL)


def _groups(text: str) -> list[list[str]]:
    """Where to look, most specific first: <answer> tags, code fences, the whole text."""
    groups = []
    answers = [a for a in _ANSWER_TAG.findall(text) if a.strip()]
    if answers:
        groups.append(answers)
    fences = [f for f in _FENCE.findall(text) if f.strip()]
    if fences:
        groups.append(fences)
    groups.append([text])
    return groups


def _dedupe(objects: list[GroundedObject]) -> list[GroundedObject]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for obj in objects:
        key = (obj.box, tuple(obj.points), obj.label)
        if key not in seen:
            seen.add(key)
            out.append(obj)
    return out


def parse_boxes(text: str) -> list[GroundedObject]:
    """Objects (boxes, points, labels) in a VLM's grounding answer.

    Args:
        text: the model's answer.
    Returns:
        Objects in the order the model listed them (exact duplicates removed); an empty
        list for "no such object" answers (``[]``, prose without coordinates).
        Coordinates are in the model's own convention.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    for group in _groups(text):
        objects: list[GroundedObject] = []
        found = False
        for region in group:
            frags = _fragments(region)
            for frag in frags:
                ok, value = _load(frag)
                if ok and isinstance(value, (list, tuple, dict)):
                    found = True
                    objects.extend(_objects_from(value))
                elif not ok:
                    recovered = _regex_objects(frag.text)
                    found = found or bool(recovered)
                    objects.extend(recovered)
            if not frags:
                recovered = _regex_objects(region)
                found = found or bool(recovered)
                objects.extend(recovered)
        if found:
            return _dedupe(objects)
    return []


def extract_reasoning(text: str) -> str:
    """The model's explanation: ``<think>`` content if present, else the text without
    ``<answer>`` blocks, code fences and coordinate-bearing JSON, whitespace-collapsed."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    think = _THINK.search(text)
    if think and think.group(1).strip():
        return " ".join(think.group(1).split())
    rest = _ANSWER_TAG.sub(" ", text)
    rest = _FENCE.sub(" ", rest)
    pieces = []
    last = 0
    for frag in _fragments(rest):
        ok, value = _load(frag)
        is_answer = (ok and bool(_objects_from(value))) or (not ok and bool(_regex_objects(frag.text)))
        is_answer = is_answer or (ok and value in ([], {}))
        if is_answer:
            pieces.append(rest[last : frag.start])
            last = frag.end
    pieces.append(rest[last:])
    cleaned = " ".join("".join(pieces).split())
    return re.sub(r"\s*(?:final\s+)?answer\s*:?\s*$", "", cleaned, flags=re.IGNORECASE).strip()


# -- mark numbers ---------------------------------------------------------------------------------
_MARK_WORDS = (
    r"(?:marks?|labels?|regions?|numbers?|masks?|ids?|options?|areas?|segments?|candidates?|objects?)"
)
_LIST = r"#?\s*\d+(?:\s*(?:,|and|&|or|/|\+|;)\s*(?:#\s*)?\d+)*"
_EXPLICIT = (
    re.compile(
        r"\b" + _MARK_WORDS + r"\s*(?:no\.?|nr\.?)?\s*[:=]?\s*(" + _LIST + r")(?![\d.%])", re.IGNORECASE
    ),
    re.compile(r"#\s*(\d+)\b"),
    re.compile(r"\[\s*(#?\s*\d+(?:\s*,\s*#?\s*\d+)*)\s*\]"),
)
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b|:|：)", re.IGNORECASE)
_NONE = re.compile(
    r"\b(?:none|nothing|n/a|no\s+(?:such|matching|suitable|valid|relevant|correct|marks?|regions?|objects?|"
    r"labels?|match(?:es)?|answer|numbers?))\b",
    re.IGNORECASE,
)
_UNITS = (
    r"%|°|cm|mm|km|m|px|pixels?|kg|g|lbs?|degrees?|meters?|metres?|inch(?:es)?|ft|feet|hours?|h|minutes?|min|"
    r"seconds?|s|years?|x|times|st|nd|rd|th|am|pm|d"
)
# Verbs and function words that may follow a mark number ("3 is the mug", "5 and 7").
_AFTER_MARK_OK = frozenset(
    {
        "is",
        "was",
        "has",
        "does",
        "seems",
        "looks",
        "contains",
        "shows",
        "covers",
        "matches",
        "fits",
        "corresponds",
        "answers",
        "appears",
        "depicts",
        "represents",
        "includes",
        "marks",
        "labels",
        "regions",
        "as",
        "its",
        "this",
        "us",
        "yes",
    }
)
_BARE = re.compile(r"(?<![\w.#/:-])(\d+)(?!\.\d|[\w/:]|\s*(?:" + _UNITS + r")\b|\s*[%°])")
_LINE_ENUM = re.compile(r"^[ \t]*(\d+)[.)][ \t]+\S", re.MULTILINE)


def _explicit_numbers(text: str) -> list[int]:
    spans: list[tuple[int, int]] = []
    numbers: list[int] = []
    for pattern in _EXPLICIT:
        for m in pattern.finditer(text):
            if any(a <= m.start(1) < b for a, b in spans):
                continue
            spans.append((m.start(1), m.end(1)))
            numbers.extend(int(n) for n in re.findall(r"\d+", m.group(1)))
    return numbers


def _bare_numbers(text: str) -> list[int]:
    enumerations = {m.start(1) for m in _LINE_ENUM.finditer(text)}
    numbers = []
    for m in _BARE.finditer(text):
        if m.start(1) in enumerations:
            continue
        following = re.match(r"\s+([a-z]+)\b", text[m.end(1) :], re.IGNORECASE)
        if following:
            word = following.group(1).lower()
            if word.endswith("s") and not word.endswith("ss") and word not in _AFTER_MARK_OK:
                continue  # a count: "2 cups", "3 people"
        numbers.append(int(m.group(1)))
    return numbers


def mark_candidates(text: str) -> list[int]:
    """Every number the answer names as a mark, in order, before any range check.

    Looks only after the last ``Answer:`` / ``answer is`` (or inside ``<answer>``) when
    present. Explicit references (``#3``, ``mark 3``, ``marks 2 and 7``, ``[3, 5]``) win;
    without them a "none" answer gives ``[]``; otherwise bare integers count, except
    decimals, percentages, measurements (``2 m``, ``30 cm``), ordinals, times, negative
    numbers, line-start enumerations (``1. ...``), parts of words (``A4``) and counts
    (a number followed by a plural noun: ``2 cups``); an answer that starts with "none" /
    "no such ..." / "nothing" gives ``[]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    tagged = [a for a in _ANSWER_TAG.findall(text) if a.strip()]
    if tagged:
        region = tagged[-1]
    else:
        markers = list(_ANSWER_MARKER.finditer(text))
        region = text[markers[-1].end() :] if markers else text
    explicit = _explicit_numbers(region)
    if explicit:
        return explicit
    bare = _bare_numbers(region)
    if not bare or _NONE.match(region.lstrip(" \t\n\"'*:.-")):
        return []
    return bare


def parse_mark_numbers(text: str, valid: range | set[int] | frozenset[int]) -> list[int]:
    """The mark numbers a Set-of-Mark answer selects (see :func:`mark_candidates`).

    Args:
        text: the model's answer.
        valid: the numbers drawn on the image (e.g. ``range(1, K + 1)``); others are
            ignored.
    Returns:
        Sorted unique numbers, all in ``valid``; empty for "none".
    """
    if not isinstance(valid, (range, set, frozenset)):
        raise TypeError(f"valid must be a range or a set of ints, got {type(valid).__name__}")
    return sorted({n for n in mark_candidates(text) if n in valid})
