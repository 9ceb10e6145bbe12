"""The base of the dataset readers: an index of cheap entries, pixels loaded on indexing."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, Protocol, TypeVar, overload

import numpy as np

from llmseg_ros.data.io import read_rgb
from llmseg_ros.data.sample import Sample


class _Entry(Protocol):
    @property
    def image_id(self) -> str: ...


EntryT = TypeVar("EntryT", bound=_Entry)


class SampleDataset(Sequence[Sample], Generic[EntryT]):
    """A read-only sequence of :class:`Sample` built from an index of entries.

    Subclasses fill ``self.entries`` (one entry per sample, each with a unique
    ``image_id``; no pixels) when they are constructed and implement :meth:`load_entry`,
    which reads one entry's pixels. Indexing with an int loads one sample, with a slice
    a list of them; iteration loads them one at a time.
    """

    entries: list[EntryT]

    @abstractmethod
    def load_entry(self, entry: EntryT) -> Sample:
        """Read the image and mask of ``entry`` into a :class:`Sample`."""

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def sample_ids(self) -> list[str]:
        """The ``image_id`` of every sample, in order (no pixels are read)."""
        return [e.image_id for e in self.entries]

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.load_entry(self.entries[index])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def read_image_and_mask(
    where: str, image_path: Path, read_mask: Callable[[tuple[int, int]], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its ground-truth mask, naming ``where`` in every error.

    Args:
        where: the sample's location for messages (``file:line``, ``file[key]`` ...).
        image_path: the image file.
        read_mask: given the image's ``(H, W)``, reads the (H, W) uint8 mask (0 / 1 /
            255); a mask with a declared size (RLE) is checked against it before decoding.
    Returns:
        (H, W, 3) uint8 RGB image and its (H, W) uint8 mask.
    Raises:
        ValueError: unreadable image or mask (the reader's message, prefixed with
            ``where``), or a mask whose shape is not the image's.
    """
    try:
        image = read_rgb(image_path)
        mask = read_mask((int(image.shape[0]), int(image.shape[1])))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{where}: mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    return image, mask
