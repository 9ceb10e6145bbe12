"""Set-of-Mark rendering: proposals drawn on the image as numbered, outlined regions.

:func:`render_marks` outlines every mask in its own colour and writes its number inside it:

* **Numbering.** Label ``labels[i]`` (default ``i + 1``, so 1..K) marks ``masks[i]``, which
  is proposal ``proposal_indices[i]`` (default ``i``). :class:`MarkLayout` keeps the exact
  label → proposal map; the VLM's answer is read back through it.
* **Placement.** Each label sits on a pixel of its region, chosen to maximise the share
  of the label box inside the region, then the distance to the region's border
  (distance-transform maximum), so it lands in the interior. Regions are labelled
  smallest first (they have the fewest spots); a spot is free only if the box (plus a
  gap) touches no earlier label. If no free spot fits at the base size, the label shrinks
  (down to ``min_font_scale``); labels never overlap unless a region offers no free
  pixel at all (then ``LabelPlacement.overlaps`` is set).
* **Legibility.** Number in black or white (by luminance) on a box of the region's
  colour, drawn after every outline; font size follows the image size and shrinks
  for small regions. Colours are spread around the hue circle (golden-ratio steps).

:func:`render_zoom` crops around tiny regions and renders them enlarged with the *same*
labels, for a second, closer look; its layout maps labels to the same proposals.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
GOLDEN = 0.618033988749895


@dataclass(frozen=True)
class LabelPlacement:
    """Where and how one number was drawn (pixels of the rendered image).

    Attributes:
        label: the number drawn.
        proposal: index of the proposal it marks.
        anchor: (x, y) region pixel the label is centred on (inside the region).
        box: XYXY of the label's background box, end-exclusive.
        text_origin: (x, y) of ``cv2.putText``'s origin (text baseline, left).
        font_scale: ``cv2.FONT_HERSHEY_SIMPLEX`` scale.
        thickness: stroke thickness.
        color: RGB of the region's outline and the label background.
        text_color: RGB of the digits.
        inside_fraction: share of the label box lying inside the region, in [0, 1].
        overlaps: True only when no free spot existed and the label covers another.
    """

    label: int
    proposal: int
    anchor: tuple[int, int]
    box: tuple[int, int, int, int]
    text_origin: tuple[int, int]
    font_scale: float
    thickness: int
    color: tuple[int, int, int]
    text_color: tuple[int, int, int]
    inside_fraction: float
    overlaps: bool = False


@dataclass
class MarkLayout:
    """The label → proposal map of one rendering and where each label sits.

    Attributes:
        image_size: (H, W) of the rendered image.
        placements: label → placement, in ascending label order.
        crop_box: for a zoomed rendering, XYXY (end-exclusive) of the crop in the
            original image; ``None`` for a full-image rendering.
        scale: rendered pixels per original pixel (1.0 for a full rendering).
    """

    image_size: tuple[int, int]
    placements: dict[int, LabelPlacement] = field(default_factory=dict)
    crop_box: tuple[int, int, int, int] | None = None
    scale: float = 1.0

    @property
    def labels(self) -> dict[int, int]:
        """label → proposal index."""
        return {label: p.proposal for label, p in self.placements.items()}

    @property
    def valid_labels(self) -> set[int]:
        return set(self.placements)

    def proposals_for(self, labels: Sequence[int]) -> list[int]:
        """Sorted unique proposal indices of the given labels (unknown labels ignored)."""
        return sorted({self.placements[n].proposal for n in labels if n in self.placements})

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable summary (label keys as strings)."""
        return {
            "image_size": list(self.image_size),
            "crop_box": list(self.crop_box) if self.crop_box is not None else None,
            "scale": self.scale,
            "labels": {str(n): p.proposal for n, p in self.placements.items()},
            "boxes": {str(n): list(p.box) for n, p in self.placements.items()},
            "overlapping": [n for n, p in self.placements.items() if p.overlaps],
        }


def distinct_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` saturated RGB colours, hue advanced by the golden ratio, alternating brightness."""
    colors = []
    for i in range(count):
        hue = (0.08 + i * GOLDEN) % 1.0
        value = 1.0 if i % 2 == 0 else 0.78
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def text_color_for(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def base_font_scale(image_size: tuple[int, int]) -> float:
    """Default label size for an image: ~20 px digits at 1000 px long side, never below 0.35."""
    return float(min(1.5, max(0.35, max(image_size) / 1100.0)))


def _thickness(scale: float) -> int:
    return max(1, round(scale * 2))


def _label_size(text: str, scale: float) -> tuple[int, int, int, int]:
    """(box width, box height, padding, text height) for ``text`` at ``scale``."""
    thickness = _thickness(scale)
    (tw, th), _ = cv2.getTextSize(text, FONT, scale, thickness)
    pad = max(1, round(2 * scale))
    return tw + 2 * pad + thickness, th + 2 * pad + thickness, pad, th


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.int64)
    out[1:, 1:] = a.astype(np.int64).cumsum(0).cumsum(1)
    return out


def _box_sums(ii: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


@dataclass
class _Spot:
    coverage: float
    depth: float
    cx: int
    cy: int
    box: tuple[int, int, int, int]
    scale: float
    free: bool


def _best_spot(
    mask: np.ndarray,
    depth: np.ndarray,
    mask_ii: np.ndarray,
    occ_ii: np.ndarray,
    other_ii: np.ndarray,
    size: tuple[int, int],
    scale: float,
    max_candidates: int = 40000,
) -> _Spot | None:
    """Best label box of ``size`` (w, h) centred on a region pixel; free spots only.

    Ranked by the share of the box inside the region, minus half the share covering
    already-labelled (smaller, possibly nested) regions, then by depth inside the region.
    """
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) > max_candidates:
        step = int(np.ceil(len(xs) / max_candidates))
        ys, xs = ys[::step], xs[::step]
    w, h = size
    x0 = np.clip(xs - w // 2, 0, max(width - w, 0))
    y0 = np.clip(ys - h // 2, 0, max(height - h, 0))
    x1 = np.minimum(x0 + w, width)
    y1 = np.minimum(y0 + h, height)
    free = _box_sums(occ_ii, x0, y0, x1, y1) == 0
    if not free.any():
        return None
    coverage = _box_sums(mask_ii, x0, y0, x1, y1) / (w * h)  # clipped-off parts count as outside
    foreign = _box_sums(other_ii, x0, y0, x1, y1) / (w * h)
    d = depth[ys, xs]
    key = np.where(free, np.round(coverage - 0.5 * foreign, 3) * 1e6 + d, -np.inf)
    i = int(np.argmax(key))
    return _Spot(
        float(coverage[i]),
        float(d[i]),
        int(xs[i]),
        int(ys[i]),
        (int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])),
        scale,
        True,
    )


def _scales(base: float, minimum: float) -> list[float]:
    scales = []
    s = base
    while s > minimum + 1e-6:
        scales.append(s)
        s *= 0.8
    scales.append(minimum)
    return scales


def _place(
    mask: np.ndarray, text: str, occupied: np.ndarray, labelled: np.ndarray, base: float, minimum: float
) -> _Spot:
    """Label spot for one region (image pixels), largest scale whose box fits inside it.

    Works in a window around the region (its box grown by the largest label), which holds
    every candidate box. Falls back to the smallest label at the deepest region pixel
    (``free`` False) when every spot is taken.
    """
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    mw, mh, _, _ = _label_size(text, base)
    wx0, wy0 = max(int(xs.min()) - mw, 0), max(int(ys.min()) - mh, 0)
    wx1, wy1 = min(int(xs.max()) + 1 + mw, width), min(int(ys.max()) + 1 + mh, height)
    sub = mask[wy0:wy1, wx0:wx1]
    # Zero padding: the image border counts as the region's border.
    depth = cv2.distanceTransform(np.pad(sub.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    mask_ii = _integral(sub)
    occ_ii = _integral(occupied[wy0:wy1, wx0:wx1])
    other_ii = _integral(labelled[wy0:wy1, wx0:wx1])
    best: _Spot | None = None
    for scale in _scales(base, minimum):
        w, h, _, _ = _label_size(text, scale)
        spot = _best_spot(sub, depth, mask_ii, occ_ii, other_ii, (w, h), scale)
        if spot is None:
            continue
        if best is None or spot.coverage > best.coverage + 1e-3:
            best = spot
        if spot.coverage >= 0.999:
            break
    if best is None:
        w, h, _, _ = _label_size(text, minimum)
        cy, cx = np.unravel_index(int(np.argmax(np.where(sub, depth, -1))), sub.shape)
        x0 = int(np.clip(cx - w // 2, 0, max(sub.shape[1] - w, 0)))
        y0 = int(np.clip(cy - h // 2, 0, max(sub.shape[0] - h, 0)))
        x1, y1 = min(x0 + w, sub.shape[1]), min(y0 + h, sub.shape[0])
        cover = float(sub[y0:y1, x0:x1].sum()) / (w * h)
        best = _Spot(cover, float(depth[cy, cx]), int(cx), int(cy), (x0, y0, x1, y1), minimum, False)
    bx0, by0, bx1, by1 = best.box
    return _Spot(
        best.coverage,
        best.depth,
        best.cx + wx0,
        best.cy + wy0,
        (bx0 + wx0, by0 + wy0, bx1 + wx0, by1 + wy0),
        best.scale,
        best.free,
    )


def render_marks(
    image: np.ndarray,
    masks: np.ndarray,
    *,
    labels: Sequence[int] | None = None,
    proposal_indices: Sequence[int] | None = None,
    font_scale: float | None = None,
    min_font_scale: float = 0.3,
    outline_thickness: int | None = None,
    fill_alpha: float = 0.0,
    gap: int = 1,
) -> tuple[np.ndarray, MarkLayout]:
    """Draw numbered marks for ``masks`` on a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (K, H, W) bool regions.
        labels: K distinct positive numbers to draw (default 1..K).
        proposal_indices: K proposal indices the masks stand for (default 0..K-1).
        font_scale: largest label size (default :func:`base_font_scale`).
        min_font_scale: smallest label size tried for crowded or small regions.
        outline_thickness: contour width in pixels (default 1, 2 above 800 px).
        fill_alpha: opacity of a colour fill of each region (0 = outlines only).
        gap: free pixels kept between labels.
    Returns:
        The marked (H, W, 3) uint8 RGB image and its :class:`MarkLayout`. Empty masks get
        no label (they have no interior) and are absent from the layout.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {getattr(image, 'shape', type(image))}")
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (K, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    masks = masks.astype(bool, copy=False)
    k = masks.shape[0]
    labels = list(range(1, k + 1)) if labels is None else [int(n) for n in labels]
    proposal_indices = list(range(k)) if proposal_indices is None else [int(i) for i in proposal_indices]
    if len(labels) != k or len(proposal_indices) != k:
        raise ValueError(
            f"labels and proposal_indices must have {k} entries, got {len(labels)} and {len(proposal_indices)}"
        )
    if len(set(labels)) != k or any(n < 1 for n in labels):
        raise ValueError(f"labels must be distinct positive integers, got {labels}")
    if not 0.0 <= fill_alpha <= 1.0:
        raise ValueError(f"fill_alpha must be in [0, 1], got {fill_alpha}")
    height, width = image.shape[:2]
    base = font_scale if font_scale is not None else base_font_scale((height, width))
    minimum = min(min_font_scale, base)
    line = outline_thickness if outline_thickness is not None else (2 if max(height, width) > 800 else 1)
    palette = distinct_colors(max(labels, default=0))
    colors = {n: palette[n - 1] for n in labels}

    canvas = image.copy()
    areas = masks.sum(axis=(1, 2))
    if fill_alpha > 0:
        for i in np.argsort(-areas, kind="stable"):
            fill = np.array(colors[labels[i]], dtype=np.float32)
            region = masks[i]
            canvas[region] = ((1 - fill_alpha) * canvas[region] + fill_alpha * fill).astype(np.uint8)
    for i in np.argsort(-areas, kind="stable"):  # large first, so small outlines stay on top
        if areas[i] == 0:
            continue
        contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, colors[labels[i]], line)

    occupied = np.zeros((height, width), dtype=bool)  # label boxes placed so far (+ gap)
    labelled = np.zeros((height, width), dtype=bool)  # union of the regions labelled so far
    placements: dict[int, LabelPlacement] = {}
    for i in np.argsort(areas, kind="stable"):  # smallest first: fewest spots
        if areas[i] == 0:
            continue
        text = str(labels[i])
        best = _place(masks[i], text, occupied, labelled, base, minimum)
        x0, y0, x1, y1 = best.box
        _, _, pad, th = _label_size(text, best.scale)
        color = colors[labels[i]]
        placements[labels[i]] = LabelPlacement(
            label=labels[i],
            proposal=proposal_indices[i],
            anchor=(best.cx, best.cy),
            box=best.box,
            text_origin=(x0 + pad, y0 + pad + th),
            font_scale=best.scale,
            thickness=_thickness(best.scale),
            color=color,
            text_color=text_color_for(color),
            inside_fraction=best.coverage,
            overlaps=not best.free,
        )
        occupied[max(y0 - gap, 0) : y1 + gap, max(x0 - gap, 0) : x1 + gap] = True
        labelled |= masks[i]

    for label in sorted(placements):
        draw_label(canvas, placements[label])
    layout = MarkLayout(image_size=(height, width), placements={n: placements[n] for n in sorted(placements)})
    return canvas, layout


def draw_label(canvas: np.ndarray, placement: LabelPlacement) -> None:
    """Draw one label (background box + digits) in place, clipped to its box."""
    x0, y0, x1, y1 = placement.box
    roi = canvas[y0:y1, x0:x1]
    roi[:] = placement.color
    origin = (placement.text_origin[0] - x0, placement.text_origin[1] - y0)
    cv2.putText(
        roi,
        str(placement.label),
        origin,
        FONT,
        placement.font_scale,
        placement.text_color,
        placement.thickness,
        cv2.LINE_AA,
    )


def small_regions(masks: np.ndarray, *, max_area_fraction: float = 0.005, max_side: int = 24) -> list[int]:
    """Indices of regions that are tiny: area below ``max_area_fraction`` of the image,
    or a bounding box no longer than ``max_side`` pixels on either side (empty masks excluded)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got {masks.shape}")
    total = masks.shape[1] * masks.shape[2]
    out = []
    for i, m in enumerate(masks):
        area = int(m.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(m)
        side = max(int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        if area < max_area_fraction * total or side <= max_side:
            out.append(i)
    return out


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _crop_for(
    boxes: list[tuple[int, int, int, int]], size: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    height, width = size
    bx0, by0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    bx1, by1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    grow = max(8, round(margin * max(bx1 - bx0, by1 - by0)))
    return max(bx0 - grow, 0), max(by0 - grow, 0), min(bx1 + grow, width), min(by1 + grow, height)


def zoom_group(
    masks: np.ndarray,
    indices: Sequence[int],
    *,
    margin: float = 0.25,
    max_zoom: float = 4.0,
    min_zoom: float = 1.5,
) -> tuple[list[int], tuple[int, int, int, int], float] | None:
    """The regions to show enlarged, their crop (XYXY) and the zoom factor.

    All of ``indices`` when their union box (grown by ``margin`` of its long side, at
    least 8 px) can be enlarged by ``min_zoom``; otherwise the largest group of them that
    fits in a window of the image's size / ``min_zoom`` centred on one of them. ``None``
    when no non-empty region is given.
    """
    masks = np.asarray(masks, dtype=bool)
    height, width = masks.shape[1:]
    boxes = {int(i): _bbox(masks[int(i)]) for i in indices if masks[int(i)].any()}
    if not boxes:
        return None
    long_side = max(height, width)

    def zoom_of(crop: tuple[int, int, int, int]) -> float:
        return min(max_zoom, long_side / max(crop[2] - crop[0], crop[3] - crop[1]))

    chosen = sorted(boxes)
    crop = _crop_for([boxes[i] for i in chosen], (height, width), margin)
    if zoom_of(crop) < min_zoom:
        win_w, win_h = width / min_zoom / (1 + 2 * margin), height / min_zoom / (1 + 2 * margin)
        best: list[int] = []
        for i in sorted(boxes):
            cx, cy = (boxes[i][0] + boxes[i][2]) / 2, (boxes[i][1] + boxes[i][3]) / 2
            group = [
                j
                for j in sorted(boxes)
                if boxes[j][0] >= cx - win_w / 2
                and boxes[j][2] <= cx + win_w / 2
                and boxes[j][1] >= cy - win_h / 2
                and boxes[j][3] <= cy + win_h / 2
            ]
            if len(group) > len(best):
                best = group
        if not best:
            return None
        chosen = best
        crop = _crop_for([boxes[i] for i in chosen], (height, width), margin)
        if zoom_of(crop) < min_zoom:
            return None
    return chosen, crop, float(zoom_of(crop))


def render_zoom(
    image: np.ndarray,
    masks: np.ndarray,
    indices: Sequence[int],
    labels: Sequence[int],
    *,
    margin: float = 0.25,
    max_zoom: float = 4.0,
    min_zoom: float = 1.5,
    proposal_indices: Sequence[int] | None = None,
) -> tuple[np.ndarray, MarkLayout] | None:
    """An enlarged crop around (a group of) the regions ``indices``, marked with their ``labels``.

    The crop and the regions shown come from :func:`zoom_group`; the crop is scaled by
    its zoom factor (bicubic image, nearest-neighbour masks) and only the regions shown
    are drawn, each with the same number as on the full rendering, so the layout maps
    labels to the same proposals.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (K, H, W) bool, all regions (indexed by ``indices``).
        indices: which regions may be shown.
        labels: their numbers (same length as ``indices``).
        proposal_indices: proposal index of every one of the K masks (default 0..K-1).
    Returns:
        (zoomed marked image, layout with ``crop_box`` and ``scale``), or ``None`` when
        there is nothing to show or no crop can be enlarged by ``min_zoom``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (K, {image.shape[0]}, {image.shape[1]}), got {masks.shape}")
    indices = [int(i) for i in indices]
    if len(labels) != len(indices):
        raise ValueError(f"labels must match indices in length, got {len(labels)} and {len(indices)}")
    label_of = dict(zip(indices, (int(n) for n in labels)))
    group = zoom_group(masks, indices, margin=margin, max_zoom=max_zoom, min_zoom=min_zoom)
    if group is None:
        return None
    shown, (x0, y0, x1, y1), zoom = group
    out_w, out_h = max(1, round((x1 - x0) * zoom)), max(1, round((y1 - y0) * zoom))
    crop = cv2.resize(image[y0:y1, x0:x1], (out_w, out_h), interpolation=cv2.INTER_CUBIC)
    crop_masks = np.stack(
        [
            cv2.resize(
                masks[i, y0:y1, x0:x1].astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST
            )
            > 0
            for i in shown
        ]
    )
    all_props = (
        list(range(masks.shape[0])) if proposal_indices is None else [int(p) for p in proposal_indices]
    )
    marked, layout = render_marks(
        crop, crop_masks, labels=[label_of[i] for i in shown], proposal_indices=[all_props[i] for i in shown]
    )
    layout.crop_box = (x0, y0, x1, y1)
    layout.scale = zoom
    return marked, layout
