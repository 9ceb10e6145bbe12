"""Proposals built from synthetic scenes' own instance masks ("oracle" proposals).

SAM with random (tiny) weights proposes masks that do not follow objects, so a learnability
check on synthetic scenes cannot use it. Instead the proposal stage is replaced by the
scene generator's ground truth plus distractors, written into the ordinary proposal cache
(:func:`llmseg_ros.training.precompute.precompute_cache` with :class:`OracleProposals` as
the proposal function). Everything downstream — mask embeddings, the VLM query, the
selector, the losses, selection — is the real code. The proposals of one scene are:

* each object's mask;
* each object cut in two along a random line through its centre (two "part" proposals,
  as SAM's multi-granularity output has parts);
* the union of all objects (the largest proposal, so "always pick the largest mask"
  scores ``|target| / |all objects|``);

sorted by area, largest first, like the real generator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from llmseg_ros.data.synthetic import SyntheticScene
from llmseg_ros.types import Proposals


def pixel_key(image: np.ndarray) -> str:
    """SHA-1 of an image's shape and pixels (identifies a decoded image exactly)."""
    digest = hashlib.sha1(str(image.shape).encode("ascii"))
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _centre(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.mean()), float(ys.mean())] if len(xs) else [0.0, 0.0]


def scene_proposals(scene: SyntheticScene, seed: int = 0) -> Proposals:
    """Oracle proposals of one scene (see the module docstring), masks at image resolution.

    Args:
        scene: a generated scene (its objects' masks are used).
        seed: seed of the cut directions.

    Returns:
        Proposals with K = 3·n + 1 masks for n objects (empty halves dropped), largest
        first; predicted IoU and stability scores are 1.
    """
    rng = np.random.default_rng([seed, len(scene.objects), int(scene.image.sum()) % (2**31)])
    height, width = scene.image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    masks: list[np.ndarray] = []
    for obj in scene.objects:
        masks.append(obj.mask.copy())
        cx, cy = obj.centroid
        angle = rng.uniform(0.0, math.pi)
        side = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle) >= 0
        for half in (obj.mask & side, obj.mask & ~side):
            if half.any():
                masks.append(half)
    union = np.zeros((height, width), dtype=bool)
    for obj in scene.objects:
        union |= obj.mask
    masks.append(union)
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    stacked = np.stack([masks[i] for i in order])
    k = len(order)
    return Proposals(
        masks=stacked,
        predicted_iou=np.ones(k, dtype=np.float32),
        stability_score=np.ones(k, dtype=np.float32),
        boxes=np.asarray([_box(m) for m in stacked], dtype=np.float32),
        point_coords=np.asarray([_centre(m) for m in stacked], dtype=np.float32),
    )


class OracleProposals:
    """A proposal function (image → :class:`Proposals`) for known synthetic scenes.

    Images are matched by their exact pixels (the JSONL layout stores lossless PNGs), so
    it works as ``generate`` for :func:`~llmseg_ros.training.precompute.precompute_cache`.

    Raises (on call):
        KeyError: the image is not one of the scenes.
    """

    def __init__(self, scenes: Sequence[SyntheticScene], seed: int = 0) -> None:
        self._scenes = {pixel_key(s.image): s for s in scenes}
        self.seed = seed

    def __call__(self, image: np.ndarray) -> Proposals:
        scene = self._scenes.get(pixel_key(image))
        if scene is None:
            raise KeyError(f"image of shape {image.shape} is not one of the {len(self._scenes)} known scenes")
        return scene_proposals(scene, self.seed)
