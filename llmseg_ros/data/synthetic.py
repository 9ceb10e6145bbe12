"""Small synthetic reasoning-segmentation scenes, for checking that a model can learn at all.

Each scene is a square image (96–128 px by default 112) with 2–4 non-overlapping
coloured shapes (circle, square, triangle, cross, star; red, green, blue, yellow; small
or large) on a plain or textured background. Each question names its target(s) only
implicitly, through what the shape affords ("what you could roll across the floor" →
circles), a colour hint ("the colour of a ripe tomato" → red), both, size ("the biggest
object") or position ("the object furthest to the left", "everything on the left half").
A question is only asked when its answer is a non-empty strict subset of the objects, so
the answer depends on the instruction, not on the image alone.

Every object is rasterised from an integer polygon with ``fillPoly`` plus a 1-px closed
outline, the exact rule of :func:`llmseg_ros.data.reasonseg.mask_from_labelme`, so the
JSONL masks and the labelme polygons written for the ReasonSeg layout agree pixel for
pixel. Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from llmseg_ros.data.io import atomic_write_json, write_image
from llmseg_ros.data.jsonl import write_jsonl
from llmseg_ros.data.rle import encode_rle
from llmseg_ros.data.sample import Sample

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (50, 165, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
}
FAMILIES = ("shape", "colour", "shape_colour", "size", "position", "half")
BACKGROUNDS = ("plain", "textured", "mixed")

SHAPE_HINTS: dict[str, tuple[str, ...]] = {
    "circle": (
        "what you could roll across the floor",
        "the thing that would keep rolling if I pushed it",
        "the shape with no corners at all",
    ),
    "square": (
        "the shape with four equal sides",
        "what looks like a window pane",
        "the thing shaped like a box seen from above",
    ),
    "triangle": (
        "the shape with exactly three corners",
        "what is shaped like a slice of pizza",
        "the thing that looks like a warning sign",
    ),
    "cross": (
        "what looks like a plus sign",
        "the symbol you would see on a first-aid kit",
        "the shape of a crossroads seen from above",
    ),
    "star": (
        "the shape you might draw in the night sky",
        "what looks like a sheriff's badge",
        "the shape with five sharp points",
    ),
}
COLOUR_HINTS: dict[str, tuple[str, ...]] = {
    "red": ("whatever has the colour of a ripe tomato", "anything coloured like a fire truck"),
    "green": ("whatever has the colour of fresh grass", "anything coloured like a leaf in summer"),
    "blue": ("whatever has the colour of a clear sky", "anything coloured like the deep sea"),
    "yellow": ("whatever has the colour of a banana", "anything coloured like a sunflower"),
}
COLOUR_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "red": ("tomato-coloured", "fire-truck-coloured"),
    "green": ("grass-coloured", "leaf-coloured"),
    "blue": ("sky-coloured", "sea-coloured"),
    "yellow": ("banana-coloured", "sunflower-coloured"),
}
SHAPE_NOUNS: dict[str, tuple[str, ...]] = {
    "circle": ("thing that could roll", "shape without corners"),
    "square": ("four-sided shape", "thing shaped like a window pane"),
    "triangle": ("three-cornered shape", "thing shaped like a pizza slice"),
    "cross": ("plus-shaped thing", "first-aid symbol"),
    "star": ("five-pointed shape", "thing shaped like a sheriff's badge"),
}
SIZE_HINTS: dict[str, tuple[str, ...]] = {
    "largest": ("the biggest object in the picture", "whatever takes up the most space here"),
    "smallest": ("the smallest object in the picture", "the tiniest thing here"),
}
POSITION_HINTS: dict[str, tuple[str, ...]] = {
    "left": ("the object furthest to the left", "the thing closest to the left edge"),
    "right": ("the object furthest to the right", "the thing closest to the right edge"),
    "top": ("the object nearest the top", "the highest thing in the picture"),
    "bottom": ("the object nearest the bottom", "the lowest thing in the picture"),
}
HALF_HINTS: dict[str, tuple[str, ...]] = {
    "left": ("everything on the left half of the picture", "all the things on the left side"),
    "right": ("everything on the right half of the picture", "all the things on the right side"),
}
SENTENCE_WRAPPERS = (
    "Can you show me {phrase}?",
    "Please point out {phrase} in this picture.",
    "I am looking for {phrase}. Where is it?",
)


@dataclass
class SyntheticConfig:
    """Scene generation parameters.

    Attributes:
        image_size: side of the square image in pixels (>= 64).
        min_objects / max_objects: objects per scene (2 <= min <= max <= 6).
        background: ``plain``, ``textured`` or ``mixed`` (each scene picks one).
        noise_std: standard deviation of Gaussian pixel noise (0–255 scale), 0 for none.
        families: question families to draw from (see ``FAMILIES``).
        sentence_prob: probability that a question is wrapped into a sentence
            (``is_sentence`` True) rather than given as a phrase.
    """

    image_size: int = 112
    min_objects: int = 2
    max_objects: int = 4
    background: str = "mixed"
    noise_std: float = 0.0
    families: tuple[str, ...] = FAMILIES
    sentence_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if not (2 <= self.min_objects <= self.max_objects <= 6):
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= 6, got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}"
            )
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        self.families = tuple(self.families)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(
                f"families must be a non-empty subset of {list(FAMILIES)}, got {list(self.families)}"
            )
        if not (0.0 <= self.sentence_prob <= 1.0):
            raise ValueError(f"sentence_prob must be in [0, 1], got {self.sentence_prob}")


@dataclass
class SceneObject:
    """One shape in a scene.

    Attributes:
        shape / colour / size: attribute names (``size`` is ``small`` or ``large``).
        polygon: (N, 2) int32 XY pixel vertices.
        mask: (H, W) bool, the polygon's fill plus 1-px closed outline.
    """

    shape: str
    colour: str
    size: str
    polygon: np.ndarray
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) mean pixel position."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive (x0, y0, x1, y1) pixel bounds."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@dataclass
class SyntheticQuery:
    """One question about a scene.

    Attributes:
        text: the instruction.
        paraphrases: other wordings of the same question (same target), same form.
        family: question family (see ``FAMILIES``); ``key``: the attribute asked about.
        targets: indices of the answer objects in ``SyntheticScene.objects``.
        is_sentence: sentence (True) or phrase (False).
    """

    text: str
    paraphrases: tuple[str, ...]
    family: str
    key: str
    targets: tuple[int, ...]
    is_sentence: bool


@dataclass
class SyntheticScene:
    """A rendered scene with its questions.

    Attributes:
        scene_id: name used for files and sample ids.
        image: (S, S, 3) uint8 RGB.
        objects: the shapes, in drawing order.
        queries: questions about the scene with distinct answers.
    """

    scene_id: str
    image: np.ndarray
    objects: list[SceneObject]
    queries: list[SyntheticQuery] = field(default_factory=list)

    def target_mask(self, query: SyntheticQuery) -> np.ndarray:
        """(S, S) uint8 0/1, the union of the query's target objects."""
        mask = np.zeros(self.image.shape[:2], dtype=bool)
        for i in query.targets:
            mask |= self.objects[i].mask
        return mask.astype(np.uint8)

    def sample_id(self, k: int) -> str:
        return f"{self.scene_id}_q{k}"

    def samples(self) -> list[Sample]:
        """One :class:`Sample` per query."""
        return [
            Sample(
                image=self.image,
                instruction=q.text,
                is_sentence=q.is_sentence,
                mask=self.target_mask(q),
                image_id=self.sample_id(k),
                source="synthetic",
                instructions=(q.text, *q.paraphrases),
            )
            for k, q in enumerate(self.queries)
        ]


# -- rendering --------------------------------------------------------------------------


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """(N, 2) int32 XY vertices of ``shape`` centred at (cx, cy) pixels, of size ``radius``
    pixels, rotated by ``angle`` radians."""
    if shape == "circle":
        t = angle + np.linspace(0.0, 2 * math.pi, 24, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
    elif shape == "square":
        t = angle + math.pi / 4 + np.arange(4) * math.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius * 1.2
    elif shape == "triangle":
        t = angle - math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius * 1.35
    elif shape == "cross":
        a, b = radius * 1.1, radius * 0.38
        base = np.array(
            [
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
                [-b, -a],
            ]
        )
        c, s = math.cos(angle), math.sin(angle)
        pts = base @ np.array([[c, s], [-s, c]])
    elif shape == "star":
        t = angle - math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius * 1.3, radius * 0.55)
        pts = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    return np.rint(pts + np.array([cx, cy])).astype(np.int32)


def polygon_mask(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool raster of an (N, 2) int32 polygon: fill plus 1-px closed outline."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.polylines(canvas, [polygon], True, (1,), 1)
    cv2.fillPoly(canvas, [polygon], (1,))
    return canvas.astype(bool)


def background_image(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """(size, size, 3) float64 background on the 0–255 scale: ``plain``, ``textured`` (stripes
    and grain) or ``mixed`` (either, drawn from ``rng``)."""
    if kind == "mixed":
        kind = "plain" if rng.random() < 0.5 else "textured"
    base = rng.uniform(95, 185) + rng.uniform(-10, 10, size=3)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    if kind == "textured":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 18)
        stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
        grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), 1.5)
        image = image + (10 * stripes + 8 * grain)[..., None]
    return image


def _place_objects(rng: np.random.Generator, config: SyntheticConfig) -> list[SceneObject]:
    size = config.image_size
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _attempt in range(100):
        occupied = np.zeros((size, size), dtype=np.uint8)
        objects: list[SceneObject] = []
        for _ in range(count):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            size_name = "large" if rng.random() < 0.5 else "small"
            lo, hi = (0.13, 0.17) if size_name == "large" else (0.065, 0.085)
            radius = rng.uniform(lo, hi) * size
            extent = radius * 1.35 + 3
            for _try in range(60):
                cx, cy = rng.uniform(extent, size - extent, size=2)
                polygon = shape_polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi))
                mask = polygon_mask(polygon, size, size)
                if not (mask & occupied.astype(bool)).any():
                    break
            else:
                break  # no room left: start the scene over
            objects.append(SceneObject(shape, colour, size_name, polygon, mask))
            occupied |= np.asarray(
                cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)), dtype=np.uint8
            )
        if len(objects) == count:
            return objects
    raise RuntimeError("could not place non-overlapping objects; lower max_objects or raise image_size")


def _render(rng: np.random.Generator, objects: list[SceneObject], config: SyntheticConfig) -> np.ndarray:
    image = background_image(rng, config.image_size, config.background)
    for obj in objects:
        image[obj.mask] = COLOURS[obj.colour]
    if config.noise_std > 0:
        image = image + rng.normal(0.0, config.noise_std, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# -- questions ------------------------------------------------------------------------


Candidate = tuple[str, str, tuple[int, ...], tuple[str, ...]]  # family, key, targets, phrasings


def _unique_extreme(values: Sequence[float], margin: float, largest: bool) -> int | None:
    order = np.argsort(values)
    best, second = (order[-1], order[-2]) if largest else (order[0], order[1])
    if abs(values[best] - values[second]) < margin:
        return None
    return int(best)


def _candidates(objects: list[SceneObject], size: int, family: str) -> list[Candidate]:
    n = len(objects)
    everything = set(range(n))
    out: list[Candidate] = []

    def add(key: str, targets: set[int], phrasings: tuple[str, ...]) -> None:
        if targets and targets != everything:
            out.append((family, key, tuple(sorted(targets)), phrasings))

    if family == "shape":
        for shape in sorted({o.shape for o in objects}):
            add(shape, {i for i, o in enumerate(objects) if o.shape == shape}, SHAPE_HINTS[shape])
    elif family == "colour":
        for colour in sorted({o.colour for o in objects}):
            add(colour, {i for i, o in enumerate(objects) if o.colour == colour}, COLOUR_HINTS[colour])
    elif family == "shape_colour":
        for shape, colour in sorted({(o.shape, o.colour) for o in objects}):
            targets = {i for i, o in enumerate(objects) if o.shape == shape and o.colour == colour}
            same_shape = {i for i, o in enumerate(objects) if o.shape == shape}
            same_colour = {i for i, o in enumerate(objects) if o.colour == colour}
            if targets == same_shape and targets == same_colour:
                continue  # one attribute alone would answer it
            phrasings = tuple(
                f"the {adj} {noun}" for adj in COLOUR_ADJECTIVES[colour] for noun in SHAPE_NOUNS[shape]
            )
            add(f"{colour}_{shape}", targets, phrasings)
    elif family == "size":
        areas = [float(o.area) for o in objects]
        for key, largest in (("largest", True), ("smallest", False)):
            ratio_ok = (
                sorted(areas)[-1] >= 1.5 * sorted(areas)[-2]
                if largest
                else sorted(areas)[1] >= 1.5 * sorted(areas)[0]
            )
            best = _unique_extreme(areas, 0.0, largest)
            if ratio_ok and best is not None:
                add(key, {best}, SIZE_HINTS[key])
    elif family == "position":
        centroids = [o.centroid for o in objects]
        xs = [c[0] for c in centroids]
        ys = [c[1] for c in centroids]
        margin = 0.12 * size
        for key, values, largest in (
            ("left", xs, False),
            ("right", xs, True),
            ("top", ys, False),
            ("bottom", ys, True),
        ):
            best = _unique_extreme(values, margin, largest)
            if best is not None:
                add(key, {best}, POSITION_HINTS[key])
    elif family == "half":
        half = size / 2
        left = {i for i, o in enumerate(objects) if o.bbox[2] < half}
        right = {i for i, o in enumerate(objects) if o.bbox[0] >= half}
        if left | right == everything:  # nobody straddles the middle
            add("left", left, HALF_HINTS["left"])
            add("right", right, HALF_HINTS["right"])
    else:
        raise ValueError(f"unknown question family {family!r}")
    return out


def _make_queries(
    rng: np.random.Generator, objects: list[SceneObject], config: SyntheticConfig, count: int
) -> list[SyntheticQuery]:
    by_family = {f: _candidates(objects, config.image_size, f) for f in config.families}
    queries: list[SyntheticQuery] = []
    used_targets: set[tuple[int, ...]] = set()
    families = [f for f in config.families if by_family[f]]
    while len(queries) < count and families:
        family = families[int(rng.integers(len(families)))]
        options = [c for c in by_family[family] if c[2] not in used_targets]
        if not options:
            families.remove(family)
            continue
        _, key, targets, phrasings = options[int(rng.integers(len(options)))]
        order = rng.permutation(len(phrasings))
        texts = [phrasings[int(i)] for i in order]
        is_sentence = bool(rng.random() < config.sentence_prob)
        if is_sentence:
            wrapper = SENTENCE_WRAPPERS[int(rng.integers(len(SENTENCE_WRAPPERS)))]
            texts = [wrapper.format(phrase=t) for t in texts]
        queries.append(SyntheticQuery(texts[0], tuple(texts[1:]), family, key, targets, is_sentence))
        used_targets.add(targets)
    return queries


def generate_scene(
    seed: int | Sequence[int],
    config: SyntheticConfig | None = None,
    *,
    scene_id: str = "scene",
    questions: int = 1,
) -> SyntheticScene:
    """Render one scene with ``questions`` questions whose target sets all differ.

    Args:
        seed: seed (or seed sequence) of ``numpy.random.default_rng``; same seed, same scene.
        config: generation parameters (defaults if ``None``).
        scene_id: name of the scene (sample ids are ``{scene_id}_q{k}``).
        questions: how many questions to ask (>= 1).
    """
    if questions < 1:
        raise ValueError(f"questions must be >= 1, got {questions}")
    config = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    for _ in range(200):
        objects = _place_objects(rng, config)
        queries = _make_queries(rng, objects, config, questions)
        if len(queries) == questions:
            image = _render(rng, objects, config)
            return SyntheticScene(scene_id=scene_id, image=image, objects=objects, queries=queries)
    raise RuntimeError(
        f"could not generate {questions} distinct questions from families {list(config.families)}; "
        "ask fewer questions or allow more families"
    )


def _split_seed(seed: int, split: str, index: int) -> list[int]:
    return [seed, zlib.crc32(split.encode("utf-8")), index]


def generate_split(
    split: str, count: int, *, seed: int = 0, config: SyntheticConfig | None = None, questions: int = 1
) -> list[SyntheticScene]:
    """``count`` scenes of a split; scene ``i`` depends only on (seed, split name, i)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [
        generate_scene(_split_seed(seed, split, i), config, scene_id=f"{split}_{i:05d}", questions=questions)
        for i in range(count)
    ]


def _labelme(scene: SyntheticScene, query: SyntheticQuery) -> dict[str, Any]:
    size = scene.image.shape[0]
    return {
        "text": [query.text, *query.paraphrases],
        "is_sentence": query.is_sentence,
        "shapes": [
            {
                "label": "target",
                "points": scene.objects[i].polygon.tolist(),
                "shape_type": "polygon",
            }
            for i in query.targets
        ],
        "imageHeight": size,
        "imageWidth": size,
    }


def write_synthetic_dataset(
    directory: str | Path,
    splits: Mapping[str, int] | None = None,
    *,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    questions: int = 1,
    mask_format: str = "png",
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Path]:
    """Write scenes in both the JSONL format and the ReasonSeg layout.

    Layout under ``directory``::

        jsonl/{split}.jsonl                     one line per question (ids {scene}_q{k})
        jsonl/images/{split}/{scene}.png        lossless image
        jsonl/masks/{split}/{scene}_q{k}.png    0/1 mask (mask_format "png"; "rle" inlines it)
        reasonseg/{split}/{scene}_q{k}.jpg      image (JPEG quality 95) + labelme JSON
        reasonseg/{split}/{scene}_q{k}.json     text [question, paraphrases...], is_sentence, shapes

    Every file is written atomically; a split's ``.jsonl`` index is written last.

    Args:
        splits: scenes per split name (default ``{"train": 200, "val": 50}``).
        seed: base seed; scene ``i`` of split ``s`` depends only on (seed, s, i).
        questions: questions per scene (distinct targets).
        mask_format: ``png`` or ``rle`` for the JSONL masks.
        progress: called with (split, scene index) after each scene.

    Returns:
        ``{split: path of its .jsonl}``.
    """
    if mask_format not in ("png", "rle"):
        raise ValueError(f"mask_format must be 'png' or 'rle', got {mask_format!r}")
    splits = dict(splits) if splits is not None else {"train": 200, "val": 50}
    root = Path(directory)
    outputs: dict[str, Path] = {}
    for split, count in splits.items():
        jsonl_dir = root / "jsonl"
        lines: list[dict[str, Any]] = []
        for index, scene in enumerate(
            generate_split(split, count, seed=seed, config=config, questions=questions)
        ):
            image_rel = Path("images") / split / f"{scene.scene_id}.png"
            write_image(jsonl_dir / image_rel, scene.image)
            for k, query in enumerate(scene.queries):
                sample_id = scene.sample_id(k)
                mask = scene.target_mask(query)
                line: dict[str, Any] = {
                    "id": sample_id,
                    "image": image_rel.as_posix(),
                    "question": query.text,
                    "is_sentence": query.is_sentence,
                }
                if mask_format == "png":
                    mask_rel = Path("masks") / split / f"{sample_id}.png"
                    write_image(jsonl_dir / mask_rel, mask)
                    line["mask"] = mask_rel.as_posix()
                else:
                    line["rle"] = encode_rle(mask)
                lines.append(line)
                reason_dir = root / "reasonseg" / split
                write_image(reason_dir / f"{sample_id}.jpg", scene.image)
                atomic_write_json(reason_dir / f"{sample_id}.json", _labelme(scene, query))
            if progress is not None:
                progress(split, index)
        outputs[split] = write_jsonl(jsonl_dir / f"{split}.jsonl", lines)
    return outputs
