"""ReasonSeg (LISA) reader: labelme-style polygons to 0/1/255 masks.

Layout: ``{root}/{split}/{name}.jpg`` next to ``{name}.json`` for split in train / val /
test. The JSON holds ``text`` (list of instructions; evaluation uses the first),
``is_sentence`` (bool; LISA's Table 1 calls ``False`` a short query and ``True`` a long
query) and ``shapes`` ([{label, points}], points as [x, y] pixels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from llmseg_ros.data.checks import check_image_size, clip_to_image_margin, polygon_points
from llmseg_ros.data.dataset import SampleDataset
from llmseg_ros.data.io import parse_json, read_rgb
from llmseg_ros.data.sample import IGNORE_VALUE, Sample

REASONSEG_SPLITS = ("train", "val", "test")
QUERY_TYPES = ("all", "short", "long")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _shape_points(shape: Any, index: int, height: int, width: int) -> np.ndarray:
    if not isinstance(shape, Mapping):
        raise ValueError(
            f"shape {index} must be an object with 'label' and 'points', got {type(shape).__name__}"
        )
    points = polygon_points(shape.get("points"), f"shape {index} points")
    if len(points) == 0:
        raise ValueError(f"shape {index} points must be a non-empty list of [x, y] pairs, got none")
    # Points far outside the image are clipped first (their int32 cast would wrap and
    # OpenCV's fill time grows with the extent); the rest truncate toward zero, as the
    # reference reader does.
    return clip_to_image_margin(points, height, width).astype(np.int32)


def _draw(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    cv2.polylines(canvas, [points], True, (value,), 1)
    cv2.fillPoly(canvas, [points], (value,))


def mask_from_labelme(annotation: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Rasterise a ReasonSeg / labelme annotation into a ground-truth mask.

    Rules (the reference reader's): shapes whose lower-cased label is exactly ``"flag"``
    are skipped; points are truncated to int32 pixel coordinates (x right, y down); each
    polygon's area is its rasterised pixel count (fill plus 1-px closed outline); polygons
    are drawn largest area first, so smaller ones overwrite larger ones where they overlap;
    each is drawn as ``fillPoly`` plus a 1-px closed outline with value 255 when its
    lower-cased label contains ``"ignore"``, else 1. Equal areas are drawn in reverse file
    order (the reference reverses an ascending sort). Coordinates must be finite; a
    polygon reaching more than :data:`llmseg_ros.data.checks.CLIP_MARGIN` pixels outside
    the image is clipped to that box before the truncation (only such polygons differ
    from the reference, whose int32 cast would wrap them).

    Args:
        annotation: the parsed JSON; only ``shapes`` is read.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        (height, width) uint8 with values 0 (background), 1 (target), 255 (ignore).
    """
    height, width = check_image_size(height, width, "ReasonSeg mask")
    if not isinstance(annotation, Mapping):
        raise TypeError(f"annotation must be a mapping, got {type(annotation).__name__}")
    shapes = annotation.get("shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"annotation 'shapes' must be a list, got {type(shapes).__name__}")
    polygons: list[tuple[np.ndarray, int]] = []
    areas: list[int] = []
    for index, shape in enumerate(shapes):
        points = _shape_points(shape, index, height, width)
        label = shape.get("label")
        if not isinstance(label, str):
            raise ValueError(f"shape {index} label must be a string, got {label!r}")
        if label.lower() == "flag" or len(points) == 0:  # flags, and polygons clipped away entirely
            continue
        scratch = np.zeros((height, width), dtype=np.uint8)
        _draw(scratch, points, 1)
        areas.append(int(scratch.sum(dtype=np.int64)))
        polygons.append((points, IGNORE_VALUE if "ignore" in label.lower() else 1))
    mask = np.zeros((height, width), dtype=np.uint8)
    order = np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]
    for i in order:
        points, value = polygons[int(i)]
        _draw(mask, points, value)
    return mask


def read_annotation(path: str | Path) -> dict[str, Any]:
    """Parse a ReasonSeg JSON file (UTF-8, falling back to cp1252 like the reference reader)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read ReasonSeg annotation {path}: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: neither UTF-8 nor cp1252 text: {exc}") from exc
    data = parse_json(text, str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _texts(data: Mapping[str, Any], path: Path) -> tuple[str, ...]:
    text = data.get("text")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) and t.strip() for t in text):
        raise ValueError(f"{path}: 'text' must be a non-empty list of non-empty strings, got {text!r}")
    return tuple(text)


def _is_sentence(data: Mapping[str, Any], path: Path) -> bool:
    value = data.get("is_sentence")
    if not isinstance(value, bool):
        raise ValueError(f"{path}: 'is_sentence' must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class ReasonSegEntry:
    """Index entry of one ReasonSeg image (cheap: no pixels loaded)."""

    image_id: str
    image_path: Path
    json_path: Path
    instructions: tuple[str, ...]
    is_sentence: bool


class ReasonSegDataset(SampleDataset[ReasonSegEntry]):
    """ReasonSeg split reader; samples are loaded lazily on indexing.

    Args:
        root: the ReasonSeg folder holding ``train/``, ``val/``, ``test/``.
        split: which split folder to read.
        query_type: ``all``; ``short`` (``is_sentence`` false) or ``long``
            (``is_sentence`` true), the breakdown of LISA's Table 1.

    Samples are sorted by file name; ``image_id`` is the file stem.
    """

    def __init__(self, root: str | Path, split: str = "val", *, query_type: str = "all") -> None:
        if query_type not in QUERY_TYPES:
            raise ValueError(f"query_type must be one of {list(QUERY_TYPES)}, got {query_type!r}")
        self.root = Path(root)
        self.split = split
        self.query_type = query_type
        directory = self.root / split
        if not directory.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
            raise ValueError(
                f"ReasonSeg split folder {directory} does not exist (folders under root: {found})"
            )
        entries = []
        for image_path in sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            json_path = image_path.with_suffix(".json")
            if not json_path.is_file():
                raise ValueError(f"{image_path} has no annotation file {json_path.name}")
            data = read_annotation(json_path)
            entry = ReasonSegEntry(
                image_id=image_path.stem,
                image_path=image_path,
                json_path=json_path,
                instructions=_texts(data, json_path),
                is_sentence=_is_sentence(data, json_path),
            )
            if query_type == "all" or entry.is_sentence == (query_type == "long"):
                entries.append(entry)
        ids = [e.image_id for e in entries]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{directory}: several images share a file stem; image ids must be unique")
        self.entries = entries

    def load_entry(self, entry: ReasonSegEntry) -> Sample:
        image = read_rgb(entry.image_path)
        mask = mask_from_labelme(read_annotation(entry.json_path), image.shape[0], image.shape[1])
        return Sample(
            image=image,
            instruction=entry.instructions[0],
            is_sentence=entry.is_sentence,
            mask=mask,
            image_id=entry.image_id,
            source="reasonseg",
            image_path=str(entry.image_path),
            instructions=entry.instructions,
        )
