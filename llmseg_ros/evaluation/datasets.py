"""The dataset reader of one evaluation split (ReasonSeg, LLM-Seg40K or JSONL).

:func:`open_split` names a split by the dataset's format and its root, the way
``training/evaluate.py --dataset --root --split`` does; the readers load pixels lazily,
on indexing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from llmseg_ros.data.dataset import SampleDataset
from llmseg_ros.data.jsonl import JsonlDataset
from llmseg_ros.data.llmseg40k import LLMSeg40KDataset
from llmseg_ros.data.reasonseg import ReasonSegDataset
from llmseg_ros.evaluation.settings import DATASETS, EvalSettings

__all__ = ["load_split", "open_split", "sample_count", "split_file"]


def split_file(root: Path, split: str, suffix: str, several: bool) -> Path:
    """The annotation file of ``split``: ``root`` itself, or the one file in ``root`` named for it.

    Looks for ``{split}{suffix}``, then ``llmseg40k_{split}{suffix}``, then the single
    ``*{split}*{suffix}``.

    Raises:
        ValueError: ``root`` is missing; ``root`` is a file but ``several`` splits are
            asked for; no file or several files match.
    """
    if root.is_file():
        if several:
            raise ValueError(
                f"--root {root} is a single file; evaluate several splits from a folder of {suffix} files"
            )
        return root
    if not root.is_dir():
        raise ValueError(f"--root {root} does not exist")
    exact = [root / f"{split}{suffix}", root / f"llmseg40k_{split}{suffix}"]
    for path in exact:
        if path.is_file():
            return path
    matches = sorted(root.glob(f"*{split}*{suffix}"))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"no {suffix} file for split {split!r} in {root} (expected {exact[0].name})")
    raise ValueError(f"several {suffix} files match split {split!r} in {root}: {[m.name for m in matches]}")


def open_split(
    dataset: str,
    root: str | Path,
    split: str,
    *,
    image_roots: Mapping[str, Path] | None = None,
    mask_root: Path | None = None,
    several: bool = False,
) -> SampleDataset:
    """The reader of one split (lazy: pixels load on indexing).

    Args:
        dataset: ``reasonseg`` | ``llmseg40k`` | ``jsonl``.
        root: ReasonSeg folder; LLM-Seg40K JSON file or folder of ``{split}.json``; JSONL
            file or folder of ``{split}.jsonl``.
        split: the split name (``val``, ``test``, ...).
        image_roots: LLM-Seg40K image folder per ``from_dataset``; the key ``""`` serves
            every source.
        mask_root: folder that LLM-Seg40K ``segmentation_path`` values resolve against.
        several: more splits are read from the same ``root`` (then it must be a folder).

    Raises:
        ValueError: unknown ``dataset``, or a missing / ambiguous split file.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    root = Path(root)
    if dataset == "reasonseg":
        return ReasonSegDataset(root, split)
    if dataset == "llmseg40k":
        image_roots = image_roots or {}
        # a root given without a name serves every from_dataset
        roots: dict[str, Path] | Path | None = image_roots.get("") or dict(image_roots) or None
        return LLMSeg40KDataset(split_file(root, split, ".json", several), roots, mask_root=mask_root)
    return JsonlDataset(split_file(root, split, ".jsonl", several))


def load_split(settings: EvalSettings, split: str) -> SampleDataset:
    """The reader of ``split`` of the dataset ``settings`` names."""
    return open_split(
        settings.dataset,
        settings.root,
        split,
        image_roots=settings.image_roots,
        mask_root=settings.mask_root,
        several=len(settings.splits) > 1,
    )


def sample_count(dataset: SampleDataset, split: str, limit: int | None) -> int:
    """How many samples of ``split`` to evaluate: all, or the first ``limit``.

    Raises:
        ValueError: the split is empty.
    """
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ValueError(f"split {split!r} has no samples")
    return count
