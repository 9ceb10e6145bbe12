"""Run the proposal stage (and optionally the frozen DINOv2 backbone) over images into a cache.

The run is planned once (the de-duplicated image list, split into shards of
``shard_size`` images, stored in ``cache.json``) and then works shard by shard; a finished
shard is never recomputed, so a crashed or killed run restarts where it stopped. See
:mod:`llmseg_ros.training.cache` for the layout, and
:mod:`llmseg_ros.training.precompute_run` for the run of ``training/precompute.py`` (the
models, the inputs, the job).

Any number of processes can fill one cache: the ranks of an ``accelerate launch`` /
``torchrun`` job (rank 0 plans, every rank starts with its own share of the shards, then
takes whatever is left), on one machine or on several that share the directory. Each
shard is claimed before it is computed (:mod:`llmseg_ros.training.claims`), so no two
live processes compute the same shard and the shard of a process that died is taken
over, by another process of the job or by the next run. The cache's files are the same
bytes whatever the number of processes.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmseg_ros.data.io import atomic_write_json, read_rgb
from llmseg_ros.training.cache import (
    MANIFEST_NAME,
    SUMMARY_NAME,
    CacheManifest,
    FeatureSpec,
    encode_record,
    finished_shards,
    image_key,
    remove_temporaries,
    shard_is_finished,
    write_shard,
)
from llmseg_ros.training.claims import DEFAULT_LEASE_SECONDS, ClaimOwner, ShardClaims
from llmseg_ros.types import Proposals
from llmseg_ros.utils.distributed import World

TINY_SAM_IMAGE_SIZE = 64
"""Encoder input side of the tiny SAM of the training scripts' tiny profile (seconds on a CPU)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

ProposalFn = Callable[[np.ndarray], Proposals]
"""(H, W, 3) uint8 RGB → proposals at (H, W)."""
FeatureFn = Callable[[np.ndarray], np.ndarray]
"""(H, W, 3) uint8 RGB → (C, g, g) backbone features (any float dtype; stored float16)."""
BatchFeatureFn = Callable[[Sequence[np.ndarray]], np.ndarray]
"""B images (H_i, W_i, 3) uint8 RGB → (B, C, g, g) backbone features (any float dtype)."""


@dataclass
class PrecomputeSummary:
    """What a precompute run did (over every process of the job).

    Attributes:
        images: images planned in the cache.
        computed: images processed by this run (the rest were in finished shards).
        shards: shards planned; ``shards_skipped`` of them were already finished.
        proposals_per_image: mean K over the images processed by this run (0 if none).
        min_proposals / max_proposals: range of K over those images.
        seconds_per_image: mean time one process spent per processed image (read +
            proposals + features + encoding + writing), seconds.
        proposal_seconds_per_image: mean time of the proposal stage alone, seconds.
        total_seconds: wall time of this run, seconds.
        feature_seconds_per_image: mean time of the backbone features (0 without).
        images_per_second: ``computed / total_seconds``, the whole job's throughput.
        world_size: processes in the job.
        ranks: per process: ``rank``, ``computed``, ``shards`` (written), ``seconds``
            (from the job's start to its last shard) and ``images_per_second``.
    """

    images: int
    computed: int
    shards: int
    shards_skipped: int
    proposals_per_image: float
    min_proposals: int
    max_proposals: int
    seconds_per_image: float
    proposal_seconds_per_image: float
    total_seconds: float
    feature_seconds_per_image: float = 0.0
    images_per_second: float = 0.0
    world_size: int = 1
    ranks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """One human-readable paragraph."""
        text = (
            f"{self.images} images in {self.shards} shards ({self.shards_skipped} already done); "
            f"processed {self.computed} images this run: {self.proposals_per_image:.1f} proposals per image "
            f"(min {self.min_proposals}, max {self.max_proposals}), {self.seconds_per_image:.3f} s per image "
            f"({self.proposal_seconds_per_image:.3f} s proposals, {self.feature_seconds_per_image:.3f} s "
            f"features), {self.total_seconds:.1f} s total, {self.images_per_second:.2f} images/s"
        )
        if self.world_size > 1:
            per_rank = ", ".join(
                f"rank {r['rank']} {r['computed']} images at {r['images_per_second']:.2f}/s"
                for r in self.ranks
            )
            text += f" over {self.world_size} processes ({per_rank})"
        return text


@dataclass
class _RankStats:
    """One process's share of a run (gathered into the summary)."""

    rank: int = 0
    shards: int = 0
    busy: float = 0.0
    proposal: float = 0.0
    feature: float = 0.0
    seconds: float = 0.0
    counts: list[int] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        computed = len(self.counts)
        return {
            "rank": self.rank,
            "computed": computed,
            "shards": self.shards,
            "seconds": self.seconds,
            "images_per_second": computed / self.seconds if self.seconds > 0 else 0.0,
        }


def _summary(manifest: CacheManifest, skipped: int, stats: list[_RankStats]) -> PrecomputeSummary:
    counts = [k for s in stats for k in s.counts]
    computed = len(counts)
    total = max(s.seconds for s in stats)

    def per_image(value: float) -> float:
        return value / computed if computed else 0.0

    return PrecomputeSummary(
        images=len(manifest.items),
        computed=computed,
        shards=manifest.num_shards,
        shards_skipped=skipped,
        proposals_per_image=float(np.mean(counts)) if counts else 0.0,
        min_proposals=min(counts, default=0),
        max_proposals=max(counts, default=0),
        seconds_per_image=per_image(sum(s.busy for s in stats)),
        proposal_seconds_per_image=per_image(sum(s.proposal for s in stats)),
        total_seconds=total,
        feature_seconds_per_image=per_image(sum(s.feature for s in stats)),
        images_per_second=computed / total if total > 0 else 0.0,
        world_size=len(stats),
        ranks=[s.public() for s in stats],
    )


def list_images(folder: str | Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by extension, case-insensitive), sorted by path.

    Raises:
        ValueError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} is not a directory")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def plan_items(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(key, path) per distinct image, in the order given; duplicates (same bytes) are dropped."""
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in paths:
        key = image_key(path)
        if key not in seen:
            seen.add(key)
            items.append((key, str(path)))
    return items


def _load_or_create_manifest(
    directory: Path,
    items: list[tuple[str, str]],
    shard_size: int,
    proposals: dict[str, Any],
    spec: Callable[[], FeatureSpec] | None,
) -> CacheManifest:
    """The manifest of ``directory``: created for a new cache, checked against the inputs on resume."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        manifest = CacheManifest(
            items=items, shard_size=shard_size, proposals=proposals, features=None if spec is None else spec()
        )
        atomic_write_json(path, manifest.to_dict())
        return manifest
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"cannot resume the cache at {directory}: {path} is unreadable ({exc}); it was damaged "
            "outside precompute (which writes it atomically): restore it, or write to a new directory"
        ) from exc
    manifest = CacheManifest.from_dict(data, source=str(path))
    problems = []
    if [k for k, _ in manifest.items] != [k for k, _ in items]:
        problems.append(f"a different image list ({len(manifest.items)} planned, {len(items)} given)")
    if manifest.shard_size != shard_size:
        problems.append(f"shard_size {manifest.shard_size} (asked for {shard_size})")
    if (manifest.features is not None) != (spec is not None):
        problems.append(f"features={manifest.features is not None} (asked for {spec is not None})")
    if manifest.proposals != proposals:
        problems.append(f"proposal settings {manifest.proposals} (asked for {proposals})")
    if problems:
        raise ValueError(
            f"the cache at {directory} was planned with " + "; ".join(problems) + ". "
            "Resume with the same inputs and settings, or write to a new directory."
        )
    return manifest


def _features_array(features: BatchFeatureFn, images: Sequence[np.ndarray]) -> np.ndarray:
    array = np.asarray(features(images), dtype=np.float16)
    if array.ndim != 4 or array.shape[0] != len(images):
        raise ValueError(
            f"backbone features of {len(images)} images must be ({len(images)}, C, g, g), got shape {array.shape}"
        )
    return array


def _one_at_a_time(features: FeatureFn) -> BatchFeatureFn:
    def batch(images: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(features(image)) for image in images])

    return batch


def _plan(
    world: World,
    directory: Path,
    paths: Sequence[str | Path],
    shard_size: int,
    settings: dict[str, Any],
    features: BatchFeatureFn | None,
    feature_model: str,
    feature_input_size: int,
    feature_pos_interpolation: str,
) -> CacheManifest:
    """Rank 0 hashes the images and creates or checks the manifest; every rank gets it (or rank 0's error)."""
    data: dict[str, Any] | None = None
    problem: tuple[bool, str] | None = None  # (a ValueError?, message) of rank 0
    if world.is_main:
        try:
            items = plan_items(paths)

            def probe_spec() -> FeatureSpec:
                # The feature shape is fixed by the backbone (square padded input); probe one image.
                assert features is not None
                _, channels, height, width = _features_array(features, [read_rgb(items[0][1])]).shape
                return FeatureSpec(
                    model=feature_model,
                    input_size=feature_input_size,
                    shape=(channels, height, width),
                    pos_interpolation=feature_pos_interpolation,
                )

            manifest = _load_or_create_manifest(
                directory, items, shard_size, settings, None if features is None else probe_spec
            )
            held = manifest.features
            if held is not None and (
                held.model != feature_model
                or held.input_size != feature_input_size
                or held.pos_interpolation != feature_pos_interpolation
            ):
                raise ValueError(
                    f"the cache at {directory} holds features of {held.model!r} at {held.input_size} px "
                    f"(position embeddings: {held.pos_interpolation}), asked for {feature_model!r} at "
                    f"{feature_input_size} px ({feature_pos_interpolation}); use another --out or delete it"
                )
            data = manifest.to_dict()
        except Exception as exc:
            world.broadcast((None, (type(exc) is ValueError, str(exc))))
            raise
    data, problem = world.broadcast((data, problem))
    if data is None:
        assert problem is not None
        bad_input, message = problem
        if bad_input:  # the inputs or settings: the same clear message on every rank
            raise ValueError(message)
        raise RuntimeError(f"rank 0 could not plan the cache at {directory}: {message}")
    return CacheManifest.from_dict(data, source=str(directory / MANIFEST_NAME))


class _JobProgress:
    """Rank 0's progress bar over the whole job.

    Counts the images of every shard any process has published since the start (read
    from the cache directory twice a second by a thread) plus those of the shard this
    process is computing.
    """

    def __init__(self, directory: Path, sizes: dict[int, int], with_features: bool, enabled: bool) -> None:
        from tqdm import tqdm

        self.directory = directory
        self.sizes = sizes
        self.with_features = with_features
        self.bar = tqdm(total=sum(sizes.values()), desc="proposals", unit="img", disable=not enabled)
        self.enabled = enabled
        self._own = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="precompute-progress", daemon=True)

    def __enter__(self) -> _JobProgress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.refresh()
        self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.refresh()

    def refresh(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            done = finished_shards(self.directory, self.with_features)
            count = sum(size for shard, size in self.sizes.items() if shard in done) + self._own
        self.bar.n = min(count, self.bar.total)
        self.bar.refresh()

    def image_done(self) -> None:
        with self._lock:
            self._own += 1

    def publish(self, write: Callable[[], None]) -> None:
        """Run ``write`` (publishing this process's shard) and stop counting its images as own."""
        with self._lock:
            write()
            self._own = 0


def _shard_order(todo: Sequence[int], world: World) -> list[int]:
    """This rank's share first (every ``world_size``-th shard from its rank), then the rest."""
    own = [s for i, s in enumerate(todo) if i % world.world_size == world.rank]
    taken = set(own)
    return own + [s for s in todo if s not in taken]


def _next_shard(
    order: Sequence[int], claims: ShardClaims, directory: Path, with_features: bool, poll: float
) -> int | None:
    """Claim the next unfinished shard; wait while live processes hold every unfinished one.

    Returns ``None`` when every shard of ``order`` is finished.
    """
    while True:
        done = finished_shards(directory, with_features)
        pending = [s for s in order if s not in done]
        if not pending:
            return None
        for shard in pending:
            if claims.try_claim(shard):
                if shard_is_finished(directory, shard, with_features):  # published meanwhile
                    claims.release(shard)
                    continue
                return shard
        time.sleep(poll)  # held by others: they finish it, or die and it goes stale


def _compute_shard(
    manifest: CacheManifest,
    shard: int,
    generate: ProposalFn,
    features: BatchFeatureFn | None,
    batch_size: int,
    stats: _RankStats,
    progress: _JobProgress,
) -> tuple[list[dict[str, Any]], list[np.ndarray] | None]:
    """Records (and features, in batches of ``batch_size`` images) of one shard."""
    records: list[dict[str, Any]] = []
    arrays: list[np.ndarray] | None = None if features is None else []
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        assert features is not None and arrays is not None and manifest.features is not None
        start = time.perf_counter()
        computed = _features_array(features, [image for _, image in batch])
        stats.feature += time.perf_counter() - start
        for (name, _), array in zip(batch, computed, strict=True):
            if array.shape != manifest.features.shape:
                raise ValueError(
                    f"backbone features of image {name} have shape {array.shape}, the cache's are "
                    f"{manifest.features.shape}"
                )
            arrays.append(array)
        batch.clear()

    for key, name in manifest.shard_items(shard):
        image = read_rgb(name)
        start = time.perf_counter()
        proposals = generate(image)
        stats.proposal += time.perf_counter() - start
        if proposals.image_size != image.shape[:2]:
            raise ValueError(
                f"proposal stage returned masks of size {proposals.image_size} for image {name} of "
                f"size {image.shape[:2]}; masks must be at the image's resolution"
            )
        records.append(encode_record(key, name, proposals))
        stats.counts.append(len(proposals))
        if features is not None:
            batch.append((name, image))
            if len(batch) == batch_size:
                flush()
        progress.image_done()
    if batch:
        flush()
    return records, arrays


def precompute_cache(
    paths: Sequence[str | Path],
    output_dir: str | Path,
    generate: ProposalFn,
    *,
    features: FeatureFn | None = None,
    feature_model: str = "",
    feature_input_size: int = 0,
    feature_pos_interpolation: str = "hub",
    shard_size: int = 32,
    proposal_settings: dict[str, Any] | None = None,
    progress: bool = True,
    max_shards: int | None = None,
    batch_features: BatchFeatureFn | None = None,
    feature_batch_size: int = 1,
    world: World | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> PrecomputeSummary:
    """Fill (or finish) a proposal cache for ``paths``, alone or as one process of a job.

    Args:
        paths: image files; duplicates (same bytes) are cached once. Only rank 0 reads
            the list (it plans the cache; the other ranks take the plan from it).
        output_dir: cache directory, created if missing; an existing cache is resumed
            (it must have been planned with the same images and settings).
        generate: the proposal stage (for instance ``ProposalGenerator.generate``).
        features: optional backbone, one image at a time (``MaskEmbedder.backbone_features``
            moved to numpy); or
        batch_features: the backbone on several images at once, called with up to
            ``feature_batch_size`` images of one shard (the same batches whichever
            process computes the shard, so the bytes do not depend on the process count).
        feature_model / feature_input_size / feature_pos_interpolation: recorded in the
            manifest with the features (the last: the backbone's ``pos_interpolation``).
        shard_size: images per shard.
        proposal_settings: JSON-safe description of the proposal stage, stored in the
            manifest and checked on resume.
        progress: show a tqdm progress bar of the whole job (on rank 0).
        max_shards: stop after writing this many shards in this call, per process (for
            tests and time-limited jobs); ``None`` = all.
        world: the processes of the job (:func:`llmseg_ros.utils.distributed.launched_world`);
            ``None``: this process alone (other processes may still share the directory).
        lease_seconds: a shard claim untouched this long belongs to a dead process and is
            taken over (see :mod:`llmseg_ros.training.claims`).

    Returns:
        The summary of the whole job (on every rank); rank 0 also writes it to
        ``summary.json`` when every shard is finished.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if feature_batch_size < 1:
        raise ValueError(f"feature_batch_size must be >= 1, got {feature_batch_size}")
    if not paths:
        raise ValueError("no images to precompute (the path list is empty)")
    if features is not None and batch_features is not None:
        raise ValueError("give features (one image) or batch_features (several), not both")
    batch_fn = batch_features if features is None else _one_at_a_time(features)
    if batch_fn is not None and (not feature_model or feature_input_size < 1):
        raise ValueError("feature_model and a positive feature_input_size are required with features")
    world = world or World()
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    settings = dict(proposal_settings or {})
    manifest = _plan(
        world,
        directory,
        paths,
        shard_size,
        settings,
        batch_fn,
        feature_model,
        feature_input_size,
        feature_pos_interpolation,
    )
    with_features = manifest.features is not None
    job = world.broadcast(uuid.uuid4().hex)  # also the job's common start
    start = time.perf_counter()
    done = finished_shards(directory, with_features)
    todo = [s for s in range(manifest.num_shards) if s not in done]
    skipped = manifest.num_shards - len(todo)
    shown = todo if max_shards is None else todo[: max_shards * world.world_size]
    sizes = {s: len(manifest.shard_items(s)) for s in shown}
    stats = _RankStats(rank=world.rank)
    owner = ClaimOwner.this_process(job, world.rank)
    poll = min(1.0, lease_seconds / 10)
    with (
        _JobProgress(directory, sizes, with_features, progress and world.is_main) as bar,
        ShardClaims(directory, owner, lease_seconds=lease_seconds) as claims,
    ):
        order = _shard_order(todo, world)
        while max_shards is None or stats.shards < max_shards:
            shard = _next_shard(order, claims, directory, with_features, poll)
            if shard is None:
                break
            shard_start = time.perf_counter()
            records, arrays = _compute_shard(
                manifest, shard, generate, batch_fn, feature_batch_size, stats, bar
            )
            bar.publish(functools.partial(write_shard, directory, shard, records, arrays))
            claims.release(shard)
            stats.shards += 1
            stats.busy += time.perf_counter() - shard_start
            stats.seconds = time.perf_counter() - start
    summary = _summary(manifest, skipped, world.all_gather(stats))
    if world.is_main:
        if len(finished_shards(directory, with_features)) == manifest.num_shards:
            atomic_write_json(directory / SUMMARY_NAME, summary.to_dict())
            claims.clear()
            remove_temporaries(directory)  # of processes killed mid-write
        else:
            claims.remove_if_empty()
    return summary
