"""LLM-Seg40K reader and writer.

The dataset is one JSON object keyed by image file name::

    {"000000123.jpg": {"from_dataset": "coco",            # or "ego_objects"
                       "qa_pairs": [{"question": "...", "answer": "...",
                                     "rle_seg": {"size": [H, W], "counts": "..."}},   # train
                                    {"question": "...", "answer": "...",
                                     "segmentation_path": "masks/123_1.png"}]}}        # val/test

Images live in one folder per ``from_dataset`` (COCO/LVIS images, EgoObjects images).
Masks come from ``rle_seg`` (COCO RLE) or from a PNG at ``segmentation_path`` (> 0 is
foreground; relative paths resolve against ``mask_root``). One sample per question, with
id ``{image stem}_{question index}``; questions are sentences (``is_sentence`` True).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.checks import check_file_name
from llmseg_ros.data.dataset import SampleDataset, read_image_and_mask
from llmseg_ros.data.io import atomic_write_json, read_json, read_single_channel
from llmseg_ros.data.rle import decode_rle, encode_rle
from llmseg_ros.data.sample import Sample

FROM_DATASETS = ("coco", "ego_objects")


def _check_pair(qa: Any, where: str) -> None:
    if not isinstance(qa, Mapping):
        raise ValueError(f"{where}: a QA pair must be an object, got {type(qa).__name__}")
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    answer = qa.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer' must be a string, got {answer!r}")
    has_rle = qa.get("rle_seg") is not None
    has_png = qa.get("segmentation_path") is not None
    if has_rle == has_png:
        raise ValueError(f"{where}: give exactly one of 'rle_seg' (COCO RLE) and 'segmentation_path' (PNG)")
    if has_rle and not (isinstance(qa["rle_seg"], Mapping) and {"size", "counts"} <= set(qa["rle_seg"])):
        raise ValueError(f"{where}: 'rle_seg' must be an object with 'size' and 'counts'")
    if has_png and (not isinstance(qa["segmentation_path"], str) or not qa["segmentation_path"]):
        raise ValueError(f"{where}: 'segmentation_path' must be a non-empty string")


def validate_llmseg40k(data: Any, where: str = "LLM-Seg40K data") -> None:
    """Check the structure described in the module docstring; raise ``ValueError`` naming the entry."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object keyed by image file name, got {type(data).__name__}")
    for image_name, entry in data.items():
        here = f"{where}[{image_name!r:.80}]"
        check_file_name(image_name, f"{where}: key")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{here}: expected an object, got {type(entry).__name__}")
        source = entry.get("from_dataset")
        if not isinstance(source, str) or not source:
            raise ValueError(
                f"{here}: 'from_dataset' must be a string such as {list(FROM_DATASETS)}, got {source!r}"
            )
        pairs = entry.get("qa_pairs")
        if not isinstance(pairs, list):
            raise ValueError(f"{here}: 'qa_pairs' must be a list, got {type(pairs).__name__}")
        for k, qa in enumerate(pairs):
            _check_pair(qa, f"{here}.qa_pairs[{k}]")


def qa_pair(
    question: str,
    answer: str,
    *,
    mask: np.ndarray | None = None,
    segmentation_path: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build one QA pair: ``mask`` ((H, W) bool or 0/1) is stored as ``rle_seg``, or name a PNG.

    ``extra`` keys (for instance the generator's rationale) are kept as they are.
    """
    pair: dict[str, Any] = {"question": question, "answer": answer, **extra}
    if (mask is None) == (segmentation_path is None):
        raise ValueError("give exactly one of mask and segmentation_path")
    if mask is not None:
        pair["rle_seg"] = encode_rle(mask)
    else:
        pair["segmentation_path"] = segmentation_path
    _check_pair(pair, "qa_pair")
    return pair


def write_llmseg40k(path: str | Path, records: Mapping[str, Mapping[str, Any]]) -> Path:
    """Validate ``records`` (the JSON object of the module docstring) and write it atomically."""
    validate_llmseg40k(records, "records")
    return atomic_write_json(path, {k: dict(v) for k, v in records.items()}, indent=None)


@dataclass(frozen=True)
class LLMSeg40KEntry:
    """One question (pixels not loaded)."""

    image_id: str
    image_name: str
    image_path: Path
    from_dataset: str
    qa_index: int
    question: str
    answer: str | None
    rle: Mapping[str, Any] | None
    mask_path: Path | None


def _entry_mask(entry: LLMSeg40KEntry, image_size: tuple[int, int]) -> np.ndarray:
    if entry.rle is not None:
        return decode_rle(entry.rle, expected_size=image_size)
    assert entry.mask_path is not None
    return (read_single_channel(entry.mask_path) > 0).astype(np.uint8)


class LLMSeg40KDataset(SampleDataset[LLMSeg40KEntry]):
    """LLM-Seg40K split reader, one sample per question; pixels are loaded lazily.

    Args:
        json_path: the split's JSON file.
        image_roots: folder of the images per ``from_dataset`` (``{"coco": ..., "ego_objects":
            ...}``), or one folder for every source; ``None``: the JSON file's folder.
        mask_root: folder that relative ``segmentation_path`` values resolve against;
            ``None``: the JSON file's folder.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_roots: Mapping[str, str | Path] | str | Path | None = None,
        *,
        mask_root: str | Path | None = None,
    ) -> None:
        self.json_path = Path(json_path)
        data = read_json(self.json_path, "LLM-Seg40K file")
        validate_llmseg40k(data, str(self.json_path))
        base = self.json_path.parent
        roots: dict[str, Path] | Path
        if image_roots is None:
            roots = base
        elif isinstance(image_roots, Mapping):
            roots = {str(k): Path(v) for k, v in image_roots.items()}
        else:
            roots = Path(image_roots)
        self.mask_root = Path(mask_root) if mask_root is not None else base
        entries: list[LLMSeg40KEntry] = []
        ids: set[str] = set()
        for image_name, entry in data.items():
            source = entry["from_dataset"]
            if isinstance(roots, dict):
                if source not in roots:
                    raise ValueError(
                        f"{self.json_path}[{image_name!r}]: no image root given for from_dataset {source!r} "
                        f"(roots given for {sorted(roots)})"
                    )
                image_path = roots[source] / image_name
            else:
                image_path = roots / image_name
            for k, qa in enumerate(entry["qa_pairs"]):
                image_id = f"{Path(image_name).stem}_{k}"
                if image_id in ids:
                    raise ValueError(f"{self.json_path}: sample id {image_id!r} is not unique")
                ids.add(image_id)
                seg_path = qa.get("segmentation_path")
                entries.append(
                    LLMSeg40KEntry(
                        image_id=image_id,
                        image_name=image_name,
                        image_path=image_path,
                        from_dataset=source,
                        qa_index=k,
                        question=qa["question"],
                        answer=qa.get("answer"),
                        rle=qa.get("rle_seg"),
                        mask_path=self.mask_root / seg_path if seg_path is not None else None,
                    )
                )
        self.entries = entries

    def load_entry(self, entry: LLMSeg40KEntry) -> Sample:
        where = f"{self.json_path}[{entry.image_name!r}].qa_pairs[{entry.qa_index}]"
        image, mask = read_image_and_mask(where, entry.image_path, lambda size: _entry_mask(entry, size))
        return Sample(
            image=image,
            instruction=entry.question,
            is_sentence=True,
            mask=mask,
            image_id=entry.image_id,
            source="llmseg40k",
            image_path=str(entry.image_path),
            answer=entry.answer,
        )
