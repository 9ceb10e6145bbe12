"""Synthetic moving-object sequences: ground truth for mask tracking.

A sequence is rendered with the synthetic scene code of :mod:`llmseg_ros.data.synthetic`
(its shapes, colours, backgrounds and polygon rasterisation): one *target* shape moves
along a straight line while it grows or shrinks and turns slowly, an *occluder* shape
passes in front of it halfway through (partial occlusion), and static *distractor*
shapes stand elsewhere. With ``exit=True`` the target leaves the image through the right
edge after three quarters of the frames and stays out. The ground truth of each frame is
the target's *visible* mask (occluded pixels are not part of it). Everything is
deterministic given the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llmseg_ros.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    background_image,
    polygon_mask,
    shape_polygon,
)


@dataclass
class MotionConfig:
    """Sequence parameters (lengths in pixels unless stated).

    Attributes:
        image_size: side of the square frames (>= 64).
        num_frames: frames in the sequence (>= 2).
        target_radius: target size at scale 1, as a fraction of ``image_size``.
        start_scale / end_scale: target scale at the first / last frame (linear in between).
        travel: distance the target's centre moves, as a fraction of ``image_size``
            (ignored when ``exit`` is set).
        turn: rotation of the target over the whole sequence, radians.
        occluder_radius: occluder size as a fraction of the target's radius at scale 1
            (0 = no occluder).
        occlusion: (start, end) of the occluder's pass in front of the target, as
            fractions of the sequence.
        distractors: static shapes away from the target's path (0–4).
        exit: the target leaves through the right edge at 3/4 of the sequence.
        background: ``plain``, ``textured`` or ``mixed``.
        noise_std: per-frame Gaussian pixel noise (0–255 scale).
    """

    image_size: int = 128
    num_frames: int = 40
    target_radius: float = 0.2
    start_scale: float = 0.85
    end_scale: float = 1.2
    travel: float = 0.35
    turn: float = 0.6
    occluder_radius: float = 0.55
    occlusion: tuple[float, float] = (0.35, 0.65)
    distractors: int = 2
    exit: bool = False
    background: str = "mixed"
    noise_std: float = 2.0

    def __post_init__(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")
        if not (0.05 <= self.target_radius <= 0.3):
            raise ValueError(f"target_radius must be in [0.05, 0.3], got {self.target_radius}")
        for name in ("start_scale", "end_scale"):
            if not (0.5 <= getattr(self, name) <= 1.5):
                raise ValueError(f"{name} must be in [0.5, 1.5], got {getattr(self, name)}")
        if not (0.0 <= self.travel <= 0.5):
            raise ValueError(f"travel must be in [0, 0.5], got {self.travel}")
        if not (0.0 <= self.occluder_radius <= 1.0):
            raise ValueError(f"occluder_radius must be in [0, 1], got {self.occluder_radius}")
        start, end = (float(v) for v in self.occlusion)
        if not (0.0 <= start < end <= 1.0):
            raise ValueError(
                f"occlusion must be (start, end) with 0 <= start < end <= 1, got {self.occlusion}"
            )
        self.occlusion = (start, end)
        if not (0 <= self.distractors <= 4):
            raise ValueError(f"distractors must be in [0, 4], got {self.distractors}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@dataclass
class MotionSequence:
    """A rendered sequence with its ground truth.

    Attributes:
        frames: ``num_frames`` (S, S, 3) uint8 RGB images.
        masks: the target's visible mask in each frame, (S, S) bool.
        target: (shape, colour) of the target.
        exit_frame: first frame in which no target pixel is visible after it left the
            image (``None`` when it never leaves).
        occluded: per frame, the fraction of the target hidden by the occluder.
    """

    frames: list[np.ndarray]
    masks: list[np.ndarray]
    target: tuple[str, str]
    exit_frame: int | None = None
    occluded: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance of point ``p`` to the segment ``a``–``b``."""
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def generate_motion_sequence(seed: int, config: MotionConfig | None = None) -> MotionSequence:
    """Render one moving-target sequence (see the module docstring)."""
    cfg = config or MotionConfig()
    rng = np.random.default_rng(seed)
    size, n = cfg.image_size, cfg.num_frames
    radius = cfg.target_radius * size
    extent = 1.35  # polygon reach per unit radius (the star's and triangle's tips)
    reach = radius * max(cfg.start_scale, cfg.end_scale) * extent
    colours = list(COLOURS)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colours[int(rng.integers(len(colours)))]
    others = [c for c in colours if c != colour]

    if cfg.exit:
        start = np.array([rng.uniform(reach + 2, size / 2), rng.uniform(reach + 2, size - reach - 2)])
        out_at = max(1, (3 * n) // 4)
        end = np.array([size + reach + 2.0, start[1]])
        step = (end - start) / out_at
        centres = [start + step * min(t, out_at) for t in range(n)]
    else:
        theta = rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(theta), math.sin(theta)])
        half = direction * cfg.travel * size / 2
        middle = np.array([size / 2, size / 2])
        low, high = reach + 2, size - reach - 2
        start = np.clip(middle - half, low, high)
        end = np.clip(middle + half, low, high)
        centres = [start + (end - start) * t / (n - 1) for t in range(n)]
    scales = [cfg.start_scale + (cfg.end_scale - cfg.start_scale) * t / (n - 1) for t in range(n)]
    angle0 = rng.uniform(0, 2 * math.pi)
    angles = [angle0 + cfg.turn * t / (n - 1) for t in range(n)]

    background = background_image(rng, size, cfg.background)
    scene = background.copy()
    path_end = centres[-1] if not cfg.exit else np.array([float(size), start[1]])
    for k in range(cfg.distractors):
        d_radius = rng.uniform(0.08, 0.12) * size
        for _try in range(100):
            centre = rng.uniform(d_radius * extent + 1, size - d_radius * extent - 1, size=2)
            if _segment_distance(centre, centres[0], path_end) > reach + d_radius * extent + 4:
                polygon = shape_polygon(
                    SHAPES[int(rng.integers(len(SHAPES)))],
                    centre[0],
                    centre[1],
                    d_radius,
                    rng.uniform(0, 6.3),
                )
                scene[polygon_mask(polygon, size, size)] = COLOURS[others[k % len(others)]]
                break

    occluder_colour = COLOURS[others[int(rng.integers(len(others)))]]
    occluder_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    occ_radius = cfg.occluder_radius * radius
    sweep_from, sweep_to = round(cfg.occlusion[0] * (n - 1)), round(cfg.occlusion[1] * (n - 1))
    side = 1.0 if rng.random() < 0.5 else -1.0
    frames: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    occluded: list[float] = []
    exit_frame: int | None = None
    for t in range(n):
        image = scene.copy()
        polygon = shape_polygon(shape, centres[t][0], centres[t][1], radius * scales[t], angles[t])
        full = polygon_mask(polygon, size, size)
        image[full] = COLOURS[colour]
        visible = full.copy()
        if occ_radius > 0 and sweep_from <= t <= sweep_to:
            # the occluder crosses the target from one side to the other, a little off its centre
            u = (t - sweep_from) / max(1, sweep_to - sweep_from)
            offset = np.array([(2 * u - 1) * 2.0 * radius, side * 0.35 * radius])
            oc = centres[t] + offset
            occ = polygon_mask(shape_polygon(occluder_shape, oc[0], oc[1], occ_radius, 0.3 * t), size, size)
            image[occ] = occluder_colour
            visible &= ~occ
        if cfg.noise_std > 0:
            image = image + rng.normal(0.0, cfg.noise_std, image.shape)
        frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        masks.append(visible)
        occluded.append(0.0 if not full.any() else 1.0 - visible.sum() / full.sum())
        if cfg.exit and exit_frame is None and t > 0 and not full.any():
            exit_frame = t
    return MotionSequence(
        frames=frames, masks=masks, target=(shape, colour), exit_frame=exit_frame, occluded=occluded
    )
