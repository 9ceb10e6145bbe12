"""COCO / LVIS instance annotations: reading, sampling by category count, union masks.

Reads the instance JSON layout shared by COCO and LVIS (``images``, ``annotations``,
``categories``); segmentations may be polygons, uncompressed RLE or compressed RLE and
are decoded with ``pycocotools``. Images are split into *simple* and *complex* by their
number of distinct categories and drawn with a seeded RNG (LLM-Seg paper, section 4.2.1).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.checks import check_file_name, check_image_size, integer_value
from llmseg_ros.data.io import read_json
from llmseg_ros.data.rle import decode_rle, mask_from_polygons
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


def _record(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}: {value!r:.60}")
    return value


def _int_field(record: Mapping[str, Any], key: str, what: str) -> int:
    return integer_value(record.get(key), f"{what} field {key!r}")


def _file_name(image: Mapping[str, Any], what: str) -> str:
    name = image.get("file_name")
    if not name:
        url = image.get("coco_url") or image.get("url")
        if not url or not isinstance(url, str):
            raise ValueError(f"{what} has neither 'file_name' nor 'coco_url'")
        name = url.rstrip("/").rsplit("/", 1)[-1]
    if not isinstance(name, str):
        raise ValueError(f"{what} 'file_name' must be a string, got {name!r:.60}")
    return check_file_name(Path(name).name, what)


class InstanceIndex:
    """Index over one COCO/LVIS instance JSON.

    Build with :meth:`from_file` or :meth:`from_dict`. All masks are ``(H, W)`` bool in
    image pixel coordinates (row = y, column = x). Declared image sizes are validated and
    capped when the index is built (:func:`llmseg_ros.data.checks.check_image_size`);
    segmentations are validated when a mask is drawn, and every error names ``source``
    and the annotation.
    """

    def __init__(
        self,
        categories: Mapping[int, Category],
        images: Mapping[int, ImageEntry],
        annotations: Mapping[int, Sequence[Mapping[str, Any]]],
        source: str = "instance annotations",
    ) -> None:
        self.categories = dict(categories)
        self.images = dict(images)
        self.source = source
        self._annotations = {k: list(v) for k, v in annotations.items()}
        self._by_file = {im.file_name: im for im in self.images.values()}

    @classmethod
    def from_file(cls, path: str | Path) -> InstanceIndex:
        """Read an instance JSON file; ``ValueError`` naming the file when unreadable or malformed."""
        path = Path(path)
        return cls.from_dict(read_json(path, "instance annotations"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "instance annotations") -> InstanceIndex:
        """Index a parsed instance JSON (``images``, ``annotations``, ``categories`` lists).

        Raises:
            ValueError: anything malformed, with ``source`` and the record in the message.
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"{source}: instance annotations must be a JSON object with 'images', 'annotations' and "
                f"'categories', got a JSON {type(data).__name__}"
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(
                    f"{source}: instance annotations need a list under {key!r}, got {data.get(key)!r:.60}"
                )
        categories: dict[int, Category] = {}
        for k, raw in enumerate(data["categories"]):
            cat = _record(raw, f"{source}: categories[{k}]")
            cid = _int_field(cat, "id", f"{source}: category")
            name = cat.get("name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(
                    f"{source}: category {cid} needs a non-empty string 'name', got {name!r:.60}"
                )
            synonyms = cat.get("synonyms") or ()
            if not isinstance(synonyms, list | tuple):
                raise ValueError(f"{source}: category {cid} 'synonyms' must be a list, got {synonyms!r:.60}")
            categories[cid] = Category(cid, name, tuple(str(s) for s in synonyms if str(s).strip()))
        sizes: dict[int, tuple[str, int, int]] = {}
        for k, raw in enumerate(data["images"]):
            image = _record(raw, f"{source}: images[{k}]")
            iid = _int_field(image, "id", f"{source}: image")
            what = f"{source}: image {iid}"
            height, width = check_image_size(image.get("height"), image.get("width"), what)
            sizes[iid] = (_file_name(image, what), height, width)
        per_image: dict[int, list[Mapping[str, Any]]] = {iid: [] for iid in sizes}
        for k, raw in enumerate(data["annotations"]):
            ann = _record(raw, f"{source}: annotations[{k}]")
            what = f"{source}: annotation {ann.get('id')!r:.40}"
            iid = _int_field(ann, "image_id", what)
            cid = _int_field(ann, "category_id", what)
            if iid not in sizes:
                raise ValueError(f"{what} refers to unknown image_id {iid}")
            if cid not in categories:
                raise ValueError(f"{what} refers to unknown category_id {cid}")
            per_image[iid].append(ann)
        images: dict[int, ImageEntry] = {}
        seen: dict[str, int] = {}
        for iid, (name, height, width) in sizes.items():
            if name in seen:
                raise ValueError(f"{source}: images {seen[name]} and {iid} share the file name {name!r}")
            seen[name] = iid
            cat_ids = tuple(dict.fromkeys(_int_field(a, "category_id", "annotation") for a in per_image[iid]))
            images[iid] = ImageEntry(iid, name, height, width, cat_ids)
        return cls(categories, images, per_image, source)

    def image_by_file_name(self, file_name: str) -> ImageEntry:
        try:
            return self._by_file[file_name]
        except KeyError:
            raise ValueError(f"no image named {file_name!r} in the annotations") from None

    def category_names(self, image: ImageEntry) -> list[str]:
        """Names of the image's categories, in order of first annotation."""
        return [self.categories[c].name for c in image.category_ids]

    def category_mask(self, image: ImageEntry, category_id: int) -> np.ndarray:
        """Union of every instance of ``category_id`` in ``image``: ``(H, W)`` bool.

        Raises:
            ValueError: a malformed segmentation, naming the file, the image and the annotation.
        """
        if category_id not in image.category_ids:
            raise ValueError(f"category {category_id} is not annotated in image {image.file_name!r}")
        mask = np.zeros((image.height, image.width), dtype=bool)
        for ann in self._annotations[image.id]:
            if _int_field(ann, "category_id", "annotation") == category_id:
                try:
                    mask |= annotation_mask(ann, image.height, image.width)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{self.source}: image {image.file_name!r}: {exc}") from exc
        return mask


def annotation_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    """Decode one annotation's ``segmentation`` to an ``(height, width)`` bool mask.

    Accepts polygons (list of flat ``[x0, y0, x1, y1, …]`` lists in pixels), uncompressed
    RLE (``counts`` a list of ints) and compressed RLE (``counts`` a string), validated
    as :func:`llmseg_ros.data.rle.mask_from_polygons` and :func:`llmseg_ros.data.rle.decode_rle` say.

    Raises:
        ValueError: a malformed segmentation; the message names the annotation id.
    """
    what = f"annotation {ann.get('id')!r:.40}"
    seg = ann.get("segmentation")
    try:
        if isinstance(seg, list):
            return mask_from_polygons(seg, height, width)
        if isinstance(seg, Mapping) and "counts" in seg and "size" in seg:
            return decode_rle(seg, expected_size=(height, width)).astype(bool)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {exc}") from exc
    raise ValueError(
        f"{what} has no polygon or RLE 'segmentation' (got {seg!r:.60}); box-only datasets need masks first"
    )


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
