"""The project's own dataset format: JSON Lines, one sample per line.

Each line is an object::

    {"image": "images/0001.jpg",      # path relative to the .jsonl file (or absolute)
     "question": "what could I sit on?",
     "mask": "masks/0001.png",         # PNG, 0 background, 255 ignore, other > 0 target
     "rle": {"size": [H, W], "counts": "..."},   # instead of "mask": COCO RLE, target = 1
     "is_sentence": true,              # optional; sentence (true) or phrase (false)
     "id": "0001_0",                   # optional; default "{image stem}_{k}", k = how many
                                       # earlier lines used the same image
     "answer": "chair"}                # optional

Exactly one of ``mask`` and ``rle`` is given. PNG masks keep 255 as "ignore", so a
foreground written as 255 would be read as all-ignore: a mask whose only non-zero value is
255 is rejected with an error that says so. Blank lines are skipped; errors name the file
and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.dataset import SampleDataset, read_image_and_mask
from llmseg_ros.data.io import atomic_write_text, parse_json, read_single_channel
from llmseg_ros.data.rle import decode_rle
from llmseg_ros.data.sample import IGNORE_VALUE, Sample

_KNOWN_KEYS = {"image", "question", "mask", "rle", "is_sentence", "id", "answer"}


def mask_from_png(path: str | Path) -> np.ndarray:
    """Read a PNG ground truth: 0 → 0, 255 → 255 (ignore), any other value > 0 → 1.

    Returns:
        (H, W) uint8 with values 0/1/255.

    Raises:
        ValueError: unreadable or multi-channel file, or a mask whose only non-zero value
            is 255 (foreground saved as 255 instead of 1).
    """
    raw = read_single_channel(path)
    ignore = raw == IGNORE_VALUE
    foreground = (raw > 0) & ~ignore
    if ignore.any() and not foreground.any():
        raise ValueError(
            f"mask {path} has no foreground pixels and only the value 255, which this format reads as "
            "'ignore'; write the target as 1 (or any value in 1..254)"
        )
    mask = foreground.astype(np.uint8)
    mask[ignore] = IGNORE_VALUE
    return mask


@dataclass(frozen=True)
class JsonlRecord:
    """One parsed line (paths resolved, pixels not loaded)."""

    line: int
    image_id: str
    image_path: Path
    question: str
    mask_path: Path | None
    rle: dict[str, Any] | None
    is_sentence: bool | None
    answer: str | None


def _parse_line(obj: Any, where: str, base: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(_KNOWN_KEYS)}")
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    if ("mask" in obj) == ("rle" in obj):
        raise ValueError(f"{where}: give exactly one of 'mask' (PNG path) and 'rle' (COCO RLE)")
    mask = obj.get("mask")
    if "mask" in obj and (not isinstance(mask, str) or not mask):
        raise ValueError(f"{where}: 'mask' must be a non-empty path string, got {mask!r}")
    rle = obj.get("rle")
    if "rle" in obj and not (isinstance(rle, dict) and "size" in rle and "counts" in rle):
        raise ValueError(f"{where}: 'rle' must be an object with 'size' and 'counts'")
    is_sentence = obj.get("is_sentence")
    if is_sentence is not None and not isinstance(is_sentence, bool):
        raise ValueError(f"{where}: 'is_sentence' must be true, false or absent, got {is_sentence!r}")
    for key in ("id", "answer"):
        if key in obj and (not isinstance(obj[key], str) or not obj[key]):
            raise ValueError(f"{where}: '{key}' must be a non-empty string, got {obj[key]!r}")
    return {
        "image_path": base / image,
        "question": question,
        "mask_path": base / mask if isinstance(mask, str) else None,
        "rle": rle,
        "is_sentence": is_sentence,
        "id": obj.get("id"),
        "answer": obj.get("answer"),
    }


def read_jsonl_records(path: str | Path) -> list[JsonlRecord]:
    """Parse and validate every line of a JSONL dataset file (no pixels are read).

    Raises:
        ValueError: malformed line (message ``{file}:{line}: ...``) or duplicate ids.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read JSONL dataset {path}: {exc}") from exc
    base = path.parent
    records: list[JsonlRecord] = []
    seen_images: dict[Path, int] = {}
    seen_ids: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        obj = parse_json(line, where)
        fields = _parse_line(obj, where, base)
        image_path: Path = fields["image_path"]
        occurrence = seen_images.get(image_path, 0)
        seen_images[image_path] = occurrence + 1
        image_id = fields["id"] if fields["id"] is not None else f"{image_path.stem}_{occurrence}"
        if image_id in seen_ids:
            raise ValueError(f"{where}: id {image_id!r} was already used on line {seen_ids[image_id]}")
        seen_ids[image_id] = number
        records.append(
            JsonlRecord(
                line=number,
                image_id=image_id,
                image_path=image_path,
                question=fields["question"],
                mask_path=fields["mask_path"],
                rle=fields["rle"],
                is_sentence=fields["is_sentence"],
                answer=fields["answer"],
            )
        )
    return records


def _record_mask(record: JsonlRecord, image_size: tuple[int, int]) -> np.ndarray:
    if record.mask_path is not None:
        return mask_from_png(record.mask_path)
    assert record.rle is not None
    return decode_rle(record.rle, expected_size=image_size)


class JsonlDataset(SampleDataset[JsonlRecord]):
    """Reader of a JSONL dataset file; samples are loaded lazily on indexing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries = read_jsonl_records(self.path)

    @property
    def records(self) -> list[JsonlRecord]:
        """The parsed lines, one per sample (the dataset's entries)."""
        return self.entries

    def load_entry(self, record: JsonlRecord) -> Sample:
        image, mask = read_image_and_mask(
            f"{self.path}:{record.line}", record.image_path, lambda size: _record_mask(record, size)
        )
        return Sample(
            image=image,
            instruction=record.question,
            is_sentence=record.is_sentence,
            mask=mask,
            image_id=record.image_id,
            source="jsonl",
            image_path=str(record.image_path),
            answer=record.answer,
        )


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Validate ``records`` (one dict per line, keys as in the module docstring) and write them atomically.

    Relative ``image`` / ``mask`` paths are interpreted relative to ``path``'s folder; the
    files themselves are not checked here.
    """
    path = Path(path)
    lines = []
    ids: set[str] = set()
    for number, record in enumerate(records, start=1):
        fields = _parse_line(dict(record), f"record {number}", path.parent)
        if fields["id"] is not None:
            if fields["id"] in ids:
                raise ValueError(f"record {number}: id {fields['id']!r} is used twice")
            ids.add(fields["id"])
        lines.append(json.dumps(dict(record), ensure_ascii=False))
    return atomic_write_text(path, "".join(line + "\n" for line in lines))
