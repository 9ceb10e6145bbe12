"""A sharded, resumable on-disk cache of mask proposals (and optional DINOv2 features).

The proposal stage does not depend on the instruction, so training and evaluation run it
once per image (``training/precompute.py``) and read it back from here instead of
re-running SAM. Layout::

    CACHE_DIR/
      cache.json              manifest: format, version, shard size, the planned image list
                              (key, name) in shard order, proposal settings, feature spec
      shards/00000.jsonl      one JSON object per image, in plan order (see ``encode_record``)
      shards/00000.npz        only with features: array "<line>" = (C, g, g) float16 backbone
                              features of the image on that line of the JSONL shard
      summary.json            written when a run finishes (images, proposals per image, seconds)
      claims/                 while a run is under way: which process computes which shard
                              (``llmseg_ros.training.claims``); removed when the cache is complete

An image is identified by its *key*: the SHA-1 of its file bytes (first 20 hex digits), so
a cache follows the images when a dataset is moved and two datasets sharing images share
entries. A shard is finished when its JSONL file exists (and its NPZ file, when features
are cached); both are written under a temporary name, flushed to disk and renamed into
place (NPZ first), so a crash never leaves a half-written shard that looks finished.

The files are a function of the images and the settings only: no timings, no
timestamps (the NPZ members carry a fixed date), so a cache filled by any number of
processes, in any order, with interruptions, is byte-identical to one filled in a single
uninterrupted run (``summary.json``, the last run's report, aside).

Masks are COCO RLE (``llmseg_ros.data.rle``) at the resolution of the image the proposal
stage saw (the original image), boxes XYXY pixels, scores float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from llmseg_ros.data.rle import decode_rle, encode_rle
from llmseg_ros.types import Proposals
from llmseg_ros.utils.atomic import atomic_write_stream
from llmseg_ros.weights.directory import DINOV2_POS_INTERPOLATIONS

CACHE_FORMAT = "llmseg_ros.proposal_cache"
CACHE_VERSION = 1
MANIFEST_NAME = "cache.json"
SUMMARY_NAME = "summary.json"
SHARD_DIR = "shards"
KEY_HEX_DIGITS = 20
NPZ_DATE = (1980, 1, 1, 0, 0, 0)
"""Date stamped on every NPZ member (the earliest a zip entry holds), so equal arrays give equal files."""


def image_key(path: str | Path) -> str:
    """The cache key of an image file: SHA-1 of its bytes, first 20 hex digits.

    Raises:
        ValueError: the file cannot be read.
    """
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ValueError(f"cannot read image file {path} to compute its cache key: {exc}") from exc
    return digest.hexdigest()[:KEY_HEX_DIGITS]


def shard_name(index: int) -> str:
    """File stem of shard ``index`` (``00000``, ``00001`` ...)."""
    return f"{index:05d}"


@dataclass
class FeatureSpec:
    """Which frozen backbone features a cache holds.

    Attributes:
        model: hub id or path of the DINOv2 model that produced them.
        input_size: the backbone's input long side (pixels).
        shape: (C, g, g) of one image's features.
        dtype: storage dtype (``float16``).
        pos_interpolation: how the backbone resampled its position embeddings to the input
            size (``hub`` or ``transformers``, see :class:`~llmseg_ros.models.embeddings.MaskEmbedder`);
            a ``cache.json`` without it predates the choice and holds ``transformers`` features.
    """

    model: str
    input_size: int
    shape: tuple[int, int, int]
    dtype: str = "float16"
    pos_interpolation: str = "transformers"

    def __post_init__(self) -> None:
        self.shape = tuple(int(v) for v in self.shape)  # type: ignore[assignment]
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"feature shape must be (C, g, g) of positive ints, got {self.shape}")
        if self.dtype != "float16":
            raise ValueError(f"feature dtype must be 'float16', got {self.dtype!r}")
        if self.pos_interpolation not in DINOV2_POS_INTERPOLATIONS:
            raise ValueError(
                f"feature pos_interpolation must be one of {list(DINOV2_POS_INTERPOLATIONS)}, "
                f"got {self.pos_interpolation!r}"
            )


@dataclass
class CacheManifest:
    """Contents of ``cache.json``: what was planned and how.

    Attributes:
        items: (key, name) per image in shard order; ``name`` is the image path as given
            to the precompute run, for humans and error messages.
        shard_size: images per shard (the last shard may hold fewer).
        proposals: the proposal settings used (``ProposalConfig`` fields plus the SAM
            model type / checkpoint name), free-form.
        features: the cached backbone features, or ``None`` when only proposals are cached.
    """

    items: list[tuple[str, str]]
    shard_size: int
    proposals: dict[str, Any] = field(default_factory=dict)
    features: FeatureSpec | None = None

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        self.items = [(str(k), str(n)) for k, n in self.items]
        keys = [k for k, _ in self.items]
        if len(set(keys)) != len(keys):
            raise ValueError("cache items must have unique keys (deduplicate images before planning)")
        if isinstance(self.features, Mapping):
            self.features = FeatureSpec(**self.features)

    @property
    def num_shards(self) -> int:
        return (len(self.items) + self.shard_size - 1) // self.shard_size

    def shard_items(self, index: int) -> list[tuple[str, str]]:
        """The (key, name) pairs of shard ``index``, in line order."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"shard index must be in [0, {self.num_shards}), got {index}")
        return self.items[index * self.shard_size : (index + 1) * self.shard_size]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "shard_size": self.shard_size,
            "proposals": self.proposals,
            "features": None
            if self.features is None
            else {
                "model": self.features.model,
                "input_size": self.features.input_size,
                "shape": list(self.features.shape),
                "dtype": self.features.dtype,
                "pos_interpolation": self.features.pos_interpolation,
            },
            "items": [[k, n] for k, n in self.items],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "cache manifest") -> CacheManifest:
        if data.get("format") != CACHE_FORMAT:
            raise ValueError(f"{source}: 'format' must be {CACHE_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{source}: unsupported version {data.get('version')!r}; expected {CACHE_VERSION}"
            )
        try:
            items = [(str(k), str(n)) for k, n in data["items"]]
            return cls(
                items=items,
                shard_size=int(data["shard_size"]),
                proposals=dict(data.get("proposals") or {}),
                features=data.get("features"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed manifest ({exc!r})") from exc


def encode_record(key: str, name: str, proposals: Proposals, seconds: float | None = None) -> dict[str, Any]:
    """The JSON object stored for one image.

    Fields: ``key``, ``name``, ``height``, ``width``, ``masks`` (list of COCO RLE),
    ``predicted_iou``, ``stability_score`` (lists of K floats), ``boxes`` (K × 4 XYXY
    pixels), ``point_coords`` (K × 2 XY pixels), and ``seconds`` (proposal-stage time)
    only when given: the precompute run leaves it out so that the cache's bytes do not
    depend on the machine's speed (its summary reports the timings). float32 values
    round-trip exactly through JSON.
    """
    height, width = proposals.image_size
    record = {
        "key": key,
        "name": name,
        "height": height,
        "width": width,
        "masks": [encode_rle(m) for m in proposals.masks],
        "predicted_iou": [float(v) for v in np.asarray(proposals.predicted_iou, dtype=np.float32)],
        "stability_score": [float(v) for v in np.asarray(proposals.stability_score, dtype=np.float32)],
        "boxes": np.asarray(proposals.boxes, dtype=np.float32).tolist(),
        "point_coords": np.asarray(proposals.point_coords, dtype=np.float32).tolist(),
    }
    if seconds is not None:
        record["seconds"] = float(seconds)
    return record


def decode_record(record: Mapping[str, Any]) -> Proposals:
    """Inverse of :func:`encode_record`: the stored proposals (masks (K, H, W) bool)."""
    height, width = int(record["height"]), int(record["width"])
    rles = record["masks"]
    k = len(rles)
    if k == 0:
        return Proposals.empty(height, width)
    masks = np.stack([decode_rle(r).astype(bool) for r in rles])
    if masks.shape[1:] != (height, width):
        raise ValueError(
            f"cache record {record.get('key')!r}: masks are {masks.shape[1:]}, expected {(height, width)}"
        )
    return Proposals(
        masks=masks,
        predicted_iou=np.asarray(record["predicted_iou"], dtype=np.float32).reshape(k),
        stability_score=np.asarray(record["stability_score"], dtype=np.float32).reshape(k),
        boxes=np.asarray(record["boxes"], dtype=np.float32).reshape(k, 4),
        point_coords=np.asarray(record["point_coords"], dtype=np.float32).reshape(k, 2),
    )


@dataclass
class CachedFrame:
    """One image read back from the cache.

    Attributes:
        key: the image's cache key.
        name: the image path recorded when the cache was built.
        proposals: masks (K, H, W) bool at the original image resolution, largest first.
        features: (C, g, g) float16 backbone features, or ``None`` when not cached.
        seconds: proposal-stage seconds when the record holds them (caches written
            before timings left the records), else ``None``.
    """

    key: str
    name: str
    proposals: Proposals
    features: np.ndarray | None
    seconds: float | None


class ProposalCache:
    """Read-only access to a proposal cache directory (finished shards only).

    Safe to use from DataLoader worker processes: files are opened per read.

    Raises:
        FileNotFoundError: ``directory`` has no ``cache.json``.
        ValueError: the manifest is malformed.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no proposal cache at {self.directory} ({MANIFEST_NAME} missing); "
                "build one with `python training/precompute.py`"
            )
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{manifest_path}: not valid JSON ({exc})") from exc
        self.manifest = CacheManifest.from_dict(data, source=str(manifest_path))
        self._where: dict[str, tuple[int, int]] = {}
        self._finished: list[int] = []
        for shard in range(self.manifest.num_shards):
            if not shard_is_finished(self.directory, shard, self.manifest.features is not None):
                continue
            self._finished.append(shard)
            for line, (key, _) in enumerate(self.manifest.shard_items(shard)):
                self._where[key] = (shard, line)
        self._offsets: dict[int, list[int]] = {}
        self._path_keys: dict[str, str] = {}

    # -- inspection ----------------------------------------------------------------
    def __len__(self) -> int:
        """Number of images available (in finished shards)."""
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def keys(self) -> Iterator[str]:
        """Keys of the available images, in plan order."""
        return iter(self._where)

    def __iter__(self) -> Iterator[str]:
        return self.keys()

    @property
    def is_complete(self) -> bool:
        """Whether every planned shard is finished."""
        return len(self._finished) == self.manifest.num_shards

    @property
    def has_features(self) -> bool:
        return self.manifest.features is not None

    # -- reading -------------------------------------------------------------------
    def _line_offsets(self, shard: int) -> list[int]:
        offsets = self._offsets.get(shard)
        if offsets is None:
            offsets = []
            position = 0
            with open(shard_path(self.directory, shard, ".jsonl"), "rb") as handle:
                for line in handle:
                    offsets.append(position)
                    position += len(line)
            expected = len(self.manifest.shard_items(shard))
            if len(offsets) != expected:
                raise ValueError(
                    f"proposal cache {self.directory}: shard {shard_name(shard)} has {len(offsets)} records, "
                    f"expected {expected}; the cache is corrupt, rebuild that shard by deleting it and "
                    "re-running precompute"
                )
            self._offsets[shard] = offsets
        return offsets

    def get(self, key: str, *, with_features: bool = True) -> CachedFrame:
        """The cached proposals (and features, if cached and asked for) of image ``key``.

        Raises:
            KeyError: the key is not in a finished shard of this cache.
        """
        where = self._where.get(key)
        if where is None:
            raise KeyError(
                f"image key {key!r} is not in the proposal cache {self.directory} "
                f"({len(self)} images cached; was precompute run on this dataset and did it finish?)"
            )
        shard, line = where
        offset = self._line_offsets(shard)[line]
        with open(shard_path(self.directory, shard, ".jsonl"), "rb") as handle:
            handle.seek(offset)
            record = json.loads(handle.readline())
        if record.get("key") != key:
            raise ValueError(
                f"proposal cache {self.directory}: shard {shard_name(shard)} line {line} holds key "
                f"{record.get('key')!r}, expected {key!r}; the cache is corrupt"
            )
        features = None
        if with_features and self.manifest.features is not None:
            with np.load(shard_path(self.directory, shard, ".npz")) as archive:
                features = np.asarray(archive[str(line)])
        return CachedFrame(
            key=key,
            name=str(record.get("name", "")),
            proposals=decode_record(record),
            features=features,
            seconds=None if record.get("seconds") is None else float(record["seconds"]),
        )

    def lookup(self, image_path: str | Path, *, with_features: bool = True) -> CachedFrame:
        """Like :meth:`get`, by image file (its key is computed from the bytes, memoised per path)."""
        path = str(image_path)
        key = self._path_keys.get(path)
        if key is None:
            key = image_key(path)
            self._path_keys[path] = key
        try:
            return self.get(key, with_features=with_features)
        except KeyError:
            raise KeyError(
                f"image {path} (key {key}) is not in the proposal cache {self.directory}; "
                "run `python training/precompute.py` over this dataset first"
            ) from None


class CacheSet:
    """Several caches searched in order (for training on several datasets)."""

    def __init__(self, caches: list[ProposalCache]) -> None:
        if not caches:
            raise ValueError("CacheSet needs at least one ProposalCache")
        self.caches = caches

    def lookup(self, image_path: str | Path, *, with_features: bool = True) -> CachedFrame:
        """The first cache holding ``image_path``'s key.

        Raises:
            KeyError: no cache holds it.
        """
        key = image_key(image_path)
        for cache in self.caches:
            if key in cache:
                return cache.get(key, with_features=with_features)
        raise KeyError(
            f"image {image_path} (key {key}) is in none of the proposal caches "
            f"{[str(c.directory) for c in self.caches]}; run `python training/precompute.py` over it first"
        )


def shard_path(directory: Path, index: int, suffix: str) -> Path:
    """Path of shard ``index``'s ``.jsonl`` or ``.npz`` file."""
    return directory / SHARD_DIR / f"{shard_name(index)}{suffix}"


def finished_shards(directory: Path, with_features: bool) -> set[int]:
    """Indices of the finished shards, from one listing of ``shards/`` (see :func:`shard_is_finished`)."""
    try:
        names = os.listdir(directory / SHARD_DIR)
    except FileNotFoundError:
        return set()
    found: dict[str, set[int]] = {".jsonl": set(), ".npz": set()}
    for name in names:
        stem, dot, suffix = name.partition(".")
        if stem.isdigit() and f"{dot}{suffix}" in found:
            found[f"{dot}{suffix}"].add(int(stem))
    return found[".jsonl"] & found[".npz"] if with_features else found[".jsonl"]


def remove_temporaries(directory: Path) -> list[str]:
    """Delete the temporary files a killed writer left in a complete cache; returns their names.

    Temporary files (``.{name}.*.tmp``, see :func:`llmseg_ros.utils.atomic.atomic_write_stream`)
    are never read; call this only when every shard is finished, when no process has a
    reason to be writing one.
    """
    removed = []
    for folder in (directory, directory / SHARD_DIR):
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
                    removed.append(name)
    return removed


def shard_is_finished(directory: Path, index: int, with_features: bool) -> bool:
    """A shard is finished when its JSONL (and, with features, its NPZ) file exists."""
    if not shard_path(directory, index, ".jsonl").is_file():
        return False
    return not with_features or shard_path(directory, index, ".npz").is_file()


def write_npz(handle: IO[bytes], arrays: Sequence[np.ndarray]) -> None:
    """An uncompressed NPZ of members ``"0"``, ``"1"`` … (``np.load`` reads it), with fixed dates.

    ``np.savez`` stamps each member with the current time; here the bytes depend only
    on the arrays.
    """
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for index, array in enumerate(arrays):
            info = zipfile.ZipInfo(f"{index}.npy", date_time=NPZ_DATE)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def write_shard(
    directory: Path,
    index: int,
    records: list[dict[str, Any]],
    features: list[np.ndarray] | None,
) -> None:
    """Write one finished shard atomically: NPZ first (if any), then the JSONL that marks it done.

    Args:
        records: one :func:`encode_record` object per image, in plan order.
        features: one (C, g, g) array per record (stored as float16), or ``None``.
    """
    if features is not None:
        if len(features) != len(records):
            raise ValueError(f"got {len(features)} feature arrays for {len(records)} records")
        arrays = [np.asarray(f, dtype=np.float16) for f in features]
        atomic_write_stream(
            shard_path(directory, index, ".npz"), lambda fh: write_npz(fh, arrays), fsync=True
        )
    payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode("utf-8")
    atomic_write_stream(shard_path(directory, index, ".jsonl"), lambda fh: fh.write(payload), fsync=True)
