"""COCO / LVIS instance annotations: reading, sampling by category count, union masks.

Reads the instance JSON layout shared by COCO and LVIS (``images``, ``annotations``,
``categories``); segmentations may be polygons, uncompressed RLE or compressed RLE and
are decoded with ``pycocotools``. Images are split into *simple* and *complex* by their
number of distinct categories and drawn with a seeded RNG (LLM-Seg paper, section 4.2.1).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from llmseg_ros.datagen.config import SamplingConfig

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Category:
    """One annotation category.

    Attributes:
        id: the dataset's category id.
        name: the dataset's name (LVIS style, e.g. ``stop_sign``, ``bow_(weapon)``).
        synonyms: other names the category record itself lists (LVIS ``synonyms``).
    """

    id: int
    name: str
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageEntry:
    """One image and the categories annotated in it.

    Attributes:
        id: the dataset's image id.
        file_name: base name of the image file (LVIS: taken from ``coco_url``).
        height, width: image size in pixels.
        category_ids: distinct category ids in order of first annotation.
    """

    id: int
    file_name: str
    height: int
    width: int
    category_ids: tuple[int, ...]

    @property
    def num_categories(self) -> int:
        return len(self.category_ids)


@dataclass(frozen=True)
class SampledImages:
    """Result of :func:`sample_images`: the drawn images per group and the pool sizes."""

    simple: tuple[ImageEntry, ...]
    complex: tuple[ImageEntry, ...]
    available_simple: int
    available_complex: int

    def all(self) -> list[tuple[str, ImageEntry]]:
        """``(group, image)`` pairs, simple first, each group in draw order."""
        return [("simple", im) for im in self.simple] + [("complex", im) for im in self.complex]


def _int_field(record: Mapping[str, Any], key: str, what: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"{what} field {key!r} must be an integer, got {value!r}")
    return int(value)


def _file_name(image: Mapping[str, Any]) -> str:
    name = image.get("file_name")
    if not name:
        url = image.get("coco_url") or image.get("url")
        if not url:
            raise ValueError(f"image {image.get('id')!r} has neither 'file_name' nor 'coco_url'")
        name = str(url).rstrip("/").rsplit("/", 1)[-1]
    return Path(str(name)).name


class InstanceIndex:
    """Index over one COCO/LVIS instance JSON.

    Build with :meth:`from_file` or :meth:`from_dict`. All masks are ``(H, W)`` bool in
    image pixel coordinates (row = y, column = x).
    """

    def __init__(
        self,
        categories: Mapping[int, Category],
        images: Mapping[int, ImageEntry],
        annotations: Mapping[int, Sequence[Mapping[str, Any]]],
    ) -> None:
        self.categories = dict(categories)
        self.images = dict(images)
        self._annotations = {k: list(v) for k, v in annotations.items()}
        self._by_file = {im.file_name: im for im in self.images.values()}

    @classmethod
    def from_file(cls, path: str | Path) -> InstanceIndex:
        """Read an instance JSON file; ``ValueError`` when unreadable or malformed."""
        path = Path(path)
        try:
            with path.open("r", encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read instance annotations {path}: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InstanceIndex:
        """Index a parsed instance JSON (``images``, ``annotations``, ``categories`` lists)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"instance annotations must be a JSON object, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"instance annotations need a list under {key!r}, got {data.get(key)!r:.60}")
        categories: dict[int, Category] = {}
        for cat in data["categories"]:
            cid = _int_field(cat, "id", "category")
            name = cat.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"category {cid} needs a non-empty string 'name', got {name!r}")
            synonyms = tuple(str(s) for s in cat.get("synonyms") or () if str(s).strip())
            categories[cid] = Category(cid, name, synonyms)
        sizes: dict[int, tuple[str, int, int]] = {}
        for image in data["images"]:
            iid = _int_field(image, "id", "image")
            sizes[iid] = (
                _file_name(image),
                _int_field(image, "height", "image"),
                _int_field(image, "width", "image"),
            )
        per_image: dict[int, list[Mapping[str, Any]]] = {iid: [] for iid in sizes}
        for ann in data["annotations"]:
            iid = _int_field(ann, "image_id", "annotation")
            cid = _int_field(ann, "category_id", "annotation")
            if iid not in sizes:
                raise ValueError(f"annotation {ann.get('id')!r} refers to unknown image_id {iid}")
            if cid not in categories:
                raise ValueError(f"annotation {ann.get('id')!r} refers to unknown category_id {cid}")
            per_image[iid].append(ann)
        images: dict[int, ImageEntry] = {}
        seen: dict[str, int] = {}
        for iid, (name, height, width) in sizes.items():
            if name in seen:
                raise ValueError(f"images {seen[name]} and {iid} share the file name {name!r}")
            seen[name] = iid
            cat_ids = tuple(dict.fromkeys(int(a["category_id"]) for a in per_image[iid]))
            images[iid] = ImageEntry(iid, name, height, width, cat_ids)
        return cls(categories, images, per_image)

    def image_by_file_name(self, file_name: str) -> ImageEntry:
        try:
            return self._by_file[file_name]
        except KeyError:
            raise ValueError(f"no image named {file_name!r} in the annotations") from None

    def category_names(self, image: ImageEntry) -> list[str]:
        """Names of the image's categories, in order of first annotation."""
        return [self.categories[c].name for c in image.category_ids]

    def category_mask(self, image: ImageEntry, category_id: int) -> np.ndarray:
        """Union of every instance of ``category_id`` in ``image``: ``(H, W)`` bool."""
        if category_id not in image.category_ids:
            raise ValueError(f"category {category_id} is not annotated in image {image.file_name!r}")
        mask = np.zeros((image.height, image.width), dtype=bool)
        for ann in self._annotations[image.id]:
            if int(ann["category_id"]) == category_id:
                mask |= annotation_mask(ann, image.height, image.width)
        return mask


def annotation_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Decode one annotation's ``segmentation`` to an ``(height, width)`` bool mask.

    Accepts polygons (list of flat ``[x0, y0, x1, y1, …]`` lists in pixels), uncompressed
    RLE (``counts`` a list of ints) and compressed RLE (``counts`` a string).
    """
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polygons = []
        for poly in seg:
            if not isinstance(poly, list) or len(poly) % 2:
                raise ValueError(
                    f"annotation {ann.get('id')!r}: a polygon must be a flat list of x, y pairs, got {poly!r:.60}"
                )
            if len(poly) >= 6:  # fewer than 3 points has no area
                polygons.append([float(v) for v in poly])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(seg, Mapping) and "counts" in seg and "size" in seg:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise ValueError(
                f"annotation {ann.get('id')!r}: RLE size {list(seg['size'])} differs from the image's "
                f"{[height, width]}"
            )
        if isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(dict(seg), height, width)
        else:
            counts = seg["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(
            f"annotation {ann.get('id')!r} has no polygon or RLE 'segmentation' (got {seg!r:.60}); "
            "box-only datasets need masks first"
        )
    return np.asarray(mask_utils.decode(rle), dtype=bool)


def image_group(image: ImageEntry, config: SamplingConfig) -> str | None:
    """``"simple"``, ``"complex"`` or ``None`` (too few categories / between the groups)."""
    n = image.num_categories
    if config.simple_min_categories <= n <= config.simple_max_categories:
        return "simple"
    if n >= config.complex_min_categories:
        return "complex"
    return None


def sample_images(index: InstanceIndex, config: SamplingConfig) -> SampledImages:
    """Draw ``num_simple`` simple and ``num_complex`` complex images (seeded, no replacement).

    Pools are ordered by image id before drawing, so the result depends only on the
    annotations and ``config.seed``. A group with fewer images than asked for is taken
    whole (logged as a warning).
    """
    pools: dict[str, list[ImageEntry]] = {"simple": [], "complex": []}
    for iid in sorted(index.images):
        group = image_group(index.images[iid], config)
        if group is not None:
            pools[group].append(index.images[iid])
    rng = random.Random(config.seed)
    drawn: dict[str, tuple[ImageEntry, ...]] = {}
    for group, wanted in (("simple", config.num_simple), ("complex", config.num_complex)):
        pool = pools[group]
        if wanted > len(pool):
            LOGGER.warning("asked for %d %s images, only %d exist; taking all", wanted, group, len(pool))
        drawn[group] = tuple(rng.sample(pool, min(wanted, len(pool))))
    return SampledImages(drawn["simple"], drawn["complex"], len(pools["simple"]), len(pools["complex"]))
