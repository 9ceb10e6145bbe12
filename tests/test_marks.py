"""Set-of-Mark rendering: one visible label per region, inside it, no overlaps, exact mapping."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from llmseg_ros.methods.marks import (
    FONT,
    LabelPlacement,
    MarkLayout,
    distinct_colors,
    render_marks,
    render_zoom,
    small_regions,
    zoom_group,
)


def _scene(height: int = 240, width: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """Image + masks: floor, a disc with a nested small disc, a box, a tiny square, a thin bar,
    regions touching the image border, and overlapping discs."""
    rng = np.random.default_rng(0)
    image = rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    masks = [
        yy >= 150,  # floor, touches three borders
        (xx - 80) ** 2 + (yy - 80) ** 2 < 45**2,  # disc
        (xx - 85) ** 2 + (yy - 75) ** 2 < 10**2,  # nested in the disc
        (xx >= 200) & (xx < 300) & (yy >= 20) & (yy < 120),  # box
        (xx >= 210) & (xx < 214) & (yy >= 30) & (yy < 34),  # 4x4 square inside the box
        (xx >= 260) & (xx < 262) & (yy >= 50) & (yy < 80),  # 2-px bar inside the box
        (xx < 15) & (yy < 15),  # top-left corner
        (xx - 150) ** 2 + (yy - 200) ** 2 < 20**2,  # two overlapping discs on the floor
        (xx - 170) ** 2 + (yy - 205) ** 2 < 20**2,
    ]
    return image, np.stack(masks)


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _expected_label_pixels(placement: LabelPlacement, shape: tuple[int, int, int]) -> np.ndarray:
    """The label re-drawn alone with cv2 from its placement (background box + digits)."""
    x0, y0, x1, y1 = placement.box
    patch = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    patch[:] = placement.color
    origin = (placement.text_origin[0] - x0, placement.text_origin[1] - y0)
    cv2.putText(
        patch,
        str(placement.label),
        origin,
        FONT,
        placement.font_scale,
        placement.text_color,
        placement.thickness,
        cv2.LINE_AA,
    )
    return patch


def _check_layout(image: np.ndarray, masks: np.ndarray, marked: np.ndarray, layout: MarkLayout) -> None:
    height, width = image.shape[:2]
    nonempty = [i for i in range(len(masks)) if masks[i].any()]
    # exactly one label per (non-empty) proposal
    assert sorted(layout.labels.values()) == nonempty
    boxes = []
    for label, p in layout.placements.items():
        assert p.label == label
        x, y = p.anchor
        assert masks[p.proposal][y, x], f"label {label} is not inside proposal {p.proposal}"
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x0 <= x < x1 and y0 <= y < y1, "the label box must contain its anchor"
        assert not p.overlaps
        # visible: the rendered pixels are exactly this label, digits and all
        np.testing.assert_array_equal(marked[y0:y1, x0:x1], _expected_label_pixels(p, marked.shape))
        # the digits are drawn: part of the box differs from the background colour
        assert (marked[y0:y1, x0:x1] != np.array(p.color, np.uint8)).any(axis=-1).sum() >= 3
        boxes.append(p.box)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not _boxes_overlap(boxes[i], boxes[j]), (boxes[i], boxes[j])


def test_every_region_gets_one_visible_label_inside_without_overlaps() -> None:
    image, masks = _scene()
    marked, layout = render_marks(image, masks)
    _check_layout(image, masks, marked, layout)
    # numbering 1..K, label n ↔ proposal n - 1
    assert layout.labels == {n: n - 1 for n in range(1, len(masks) + 1)}
    # large regions hold their label box entirely
    for label in (1, 2, 4):
        assert layout.placements[label].inside_fraction == 1.0
    # the disc's label avoids the nested disc's pixels
    disc = layout.placements[2]
    x0, y0, x1, y1 = disc.box
    assert not masks[2][y0:y1, x0:x1].any()
    # input untouched, outlines drawn in the region colours
    assert marked.shape == image.shape and marked.dtype == np.uint8
    assert not np.array_equal(marked, image)


def test_labels_shrink_on_small_regions() -> None:
    image, masks = _scene()
    _, layout = render_marks(image, masks)
    assert layout.placements[5].font_scale < layout.placements[4].font_scale  # 4x4 square vs box


def test_custom_labels_and_proposal_indices_map_exactly() -> None:
    image, masks = _scene()
    labels = [10, 3, 7, 1, 22, 5, 9, 14, 2]
    proposals = [40, 41, 42, 43, 44, 45, 46, 47, 48]
    _, layout = render_marks(image, masks, labels=labels, proposal_indices=proposals)
    assert layout.labels == dict(zip(labels, proposals))
    assert layout.proposals_for([22, 3, 99]) == [41, 44]
    for label, p in layout.placements.items():
        x, y = p.anchor
        assert masks[labels.index(label)][y, x]
    payload = layout.to_json()
    assert payload["labels"]["22"] == 44 and payload["overlapping"] == []


def test_random_crowded_scenes() -> None:
    rng = np.random.default_rng(1)
    for _ in range(3):
        height, width = 180, 240
        image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:height, :width]
        masks = []
        for _ in range(30):
            cx, cy = rng.integers(0, width), rng.integers(0, height)
            rx, ry = rng.integers(3, 60), rng.integers(3, 60)
            masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1)
        stack = np.stack(masks)
        marked, layout = render_marks(image, stack)
        _check_layout(image, stack, marked, layout)


def test_empty_masks_get_no_label() -> None:
    image, masks = _scene()
    masks[3] = False
    _, layout = render_marks(image, masks)
    assert 4 not in layout.placements and len(layout.placements) == len(masks) - 1
    marked, none = render_marks(image, masks[:0])
    assert none.placements == {} and np.array_equal(marked, image)


def test_distinct_colors() -> None:
    colors = distinct_colors(50)
    assert len(set(colors)) == 50
    pairs = [(a, b) for i, a in enumerate(colors[:12]) for b in colors[i + 1 : 12]]
    assert min(sum(abs(x - y) for x, y in zip(a, b)) for a, b in pairs) > 40


def test_zoom_pass_keeps_labels_and_proposals() -> None:
    image, masks = _scene()
    _, full = render_marks(image, masks)
    small = small_regions(masks)
    assert {4, 5, 6}.issubset(small) and 0 not in small and 1 not in small
    zoom = render_zoom(image, masks, small, [i + 1 for i in small])
    assert zoom is not None
    zoomed, layout = zoom
    assert layout.crop_box is not None
    x0, y0, x1, y1 = layout.crop_box
    assert layout.scale >= 1.5
    assert zoomed.shape[:2] == (round((y1 - y0) * layout.scale), round((x1 - x0) * layout.scale))
    assert layout.placements, "the zoomed view shows at least one region"
    for label, p in layout.placements.items():
        assert full.labels[label] == p.proposal  # same number, same proposal
        # the anchor maps back into the original region
        ox = x0 + int(p.anchor[0] / layout.scale)
        oy = y0 + int(p.anchor[1] / layout.scale)
        assert masks[p.proposal][min(oy, masks.shape[1] - 1), min(ox, masks.shape[2] - 1)]


def test_zoom_group_picks_a_cluster_when_regions_are_spread() -> None:
    yy, xx = np.mgrid[:200, :300]
    masks = np.stack(
        [
            (xx >= 5) & (xx < 9) & (yy >= 5) & (yy < 9),
            (xx >= 290) & (xx < 294) & (yy >= 190) & (yy < 194),
            (xx >= 280) & (xx < 284) & (yy >= 180) & (yy < 184),
        ]
    )
    group = zoom_group(masks, [0, 1, 2])
    assert group is not None
    chosen, crop, zoom = group
    assert chosen == [1, 2] and zoom >= 1.5
    assert crop[0] <= 280 and crop[2] >= 294
    assert zoom_group(masks, []) is None
    assert render_zoom(np.zeros((200, 300, 3), np.uint8), masks, [], []) is None


def test_bad_inputs() -> None:
    image, masks = _scene()
    with pytest.raises(ValueError, match="masks must be"):
        render_marks(image, masks[:, :10])
    with pytest.raises(ValueError, match="distinct positive integers"):
        render_marks(image, masks[:2], labels=[1, 1])
    with pytest.raises(ValueError, match="image must be"):
        render_marks(image.astype(np.float32), masks)
