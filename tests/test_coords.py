"""Coordinate mapping from VLM conventions to image pixels, against hand-computed boxes and
the installed Qwen2-VL processor's own resize rule."""

from __future__ import annotations

import numpy as np
import pytest

from llmseg_ros.models.coords import (
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    map_boxes,
    map_points,
    processor_resize_rules,
    qwen_input_size,
    smart_resize,
)

# (H, W) → hand-computed Qwen2.5-VL input size with the released defaults
# (factor 28, min 56*56, max 28*28*1280).
HAND_RESIZED = [
    ((480, 640), (476, 644)),  # 17 x 23 patches of 28: round(480/28) = 17, round(640/28) = 23
    ((1080, 1920), (728, 1316)),  # too large: beta = sqrt(1080*1920 / 1003520) = 1.4375 → floor
    ((20, 30), (56, 84)),  # too small: beta = sqrt(3136 / 600) = 2.286 → ceil
    ((1000, 300), (1008, 308)),  # portrait
    ((333, 777), (336, 784)),
]


@pytest.mark.parametrize(("size", "resized"), HAND_RESIZED)
def test_smart_resize_hand_computed(size: tuple[int, int], resized: tuple[int, int]) -> None:
    assert smart_resize(*size) == resized


def test_smart_resize_matches_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(8, 4000, size=(300, 2))]
    sizes += [(14, 2800), (2800, 14), (28, 28), (56, 56), (1, 100)]
    for factor, lo, hi in ((28, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS), (28, 3136, 12544), (32, 1024, 200_000)):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                continue
            assert smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == reference(
                h, w, factor=factor, min_pixels=lo, max_pixels=hi
            ), (h, w, factor)


@pytest.mark.parametrize("size", [(96, 128), (128, 96), (60, 200), (300, 300), (17, 23)])
def test_qwen_input_size_matches_the_processor_output(size: tuple[int, int]) -> None:
    """What the installed Qwen2-VL image processor actually produces (grid * patch)."""
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    assert processor_resize_rules(processor) == (28, 56 * 56, 28 * 28 * 16)
    image = np.zeros((*size, 3), np.uint8)
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    assert qwen_input_size(*size, processor) == (int(grid[1]) * 14, int(grid[2]) * 14)


def test_absolute_resized_boxes_hand_computed() -> None:
    # 480x640 image, Qwen input 476x644: x scales by 640/644, y by 480/476.
    boxes = np.array([[64.4, 47.6, 322.0, 238.0], [644.0, 476.0, 0.0, 0.0]])
    out, kept = map_boxes(boxes, convention="absolute_resized", input_size=(476, 644), image_size=(480, 640))
    np.testing.assert_allclose(out, [[64, 48, 320, 240], [0, 0, 640, 480]], atol=1e-4)
    assert kept.tolist() == [0, 1]
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("image_size", "input_size", "box", "expected"),
    [
        ((1080, 1920), (728, 1316), [131.6, 72.8, 658.0, 364.0], [192.0, 108.0, 960.0, 540.0]),
        ((1000, 300), (1008, 308), [30.8, 100.8, 154.0, 504.0], [30.0, 100.0, 150.0, 500.0]),
        ((20, 30), (56, 84), [0.0, 0.0, 42.0, 28.0], [0.0, 0.0, 15.0, 10.0]),
    ],
)
def test_absolute_resized_aspect_ratios(image_size, input_size, box, expected) -> None:
    assert smart_resize(*image_size) == input_size
    out, _ = map_boxes(
        np.array([box]), convention="absolute_resized", input_size=input_size, image_size=image_size
    )
    np.testing.assert_allclose(out[0], expected, atol=1e-3)


def test_normalized_and_relative_conventions() -> None:
    out, _ = map_boxes(
        np.array([[100, 250, 500, 1000]]),
        convention="normalized_1000",
        input_size=(448, 448),
        image_size=(480, 640),
    )
    np.testing.assert_allclose(out[0], [64, 120, 320, 480], atol=1e-4)
    out, _ = map_boxes(
        np.array([[0.1, 0.25, 0.5, 1.0]]),
        convention="relative_0_1",
        input_size=(336, 336),
        image_size=(480, 640),
    )
    np.testing.assert_allclose(out[0], [64, 120, 320, 480], atol=1e-4)


def test_padded_square_content_box() -> None:
    """LLaVA-1.5: a 90x160 image padded to 160x160 (35 px bands) and resized to 64x64."""
    content = (0.0, 14.0, 64.0, 50.0)  # 35 * 0.4 = 14, (35 + 90) * 0.4 = 50
    out, _ = map_boxes(
        np.array([[0.25, 0.25, 0.5, 0.5]]),
        convention="relative_0_1",
        input_size=(64, 64),
        image_size=(90, 160),
        content_box=content,
    )
    # x: 0.25 * 64 = 16 → 16 * 160/64 = 40; y: 16 → (16 - 14) * 90/36 = 5; 32 → 45.
    np.testing.assert_allclose(out[0], [40, 5, 80, 45], atol=1e-4)


def test_clipping_and_degenerate_boxes() -> None:
    boxes = np.array(
        [
            [-20, -10, 50, 40],  # clipped
            [700, 10, 800, 50],  # entirely right of the image → dropped
            [10, 10, 10.5, 40],  # thinner than 1 px → dropped
            [np.nan, 0, 5, 5],  # not finite → dropped
            [30, 40, 10, 20],  # swapped corners
        ]
    )
    out, kept = map_boxes(boxes, convention="absolute_resized", input_size=(100, 200), image_size=(100, 200))
    assert kept.tolist() == [0, 4]
    np.testing.assert_allclose(out, [[0, 0, 50, 40], [10, 20, 30, 40]])
    empty, kept = map_boxes(
        np.zeros((0, 4)), convention="absolute_resized", input_size=(10, 10), image_size=(10, 10)
    )
    assert empty.shape == (0, 4) and kept.shape == (0,)


def test_points_outside_are_dropped() -> None:
    pts, kept = map_points(
        np.array([[500, 500], [1000, 1000], [1200, 10], [-5, 3]]),
        convention="normalized_1000",
        input_size=(50, 50),
        image_size=(100, 200),
    )
    assert kept.tolist() == [0, 1]
    np.testing.assert_allclose(pts, [[100.0, 50.0], [199.5, 99.5]])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="coordinate convention must be one of"):
        map_boxes(np.zeros((1, 4)), convention="pixels", input_size=(1, 1), image_size=(1, 1))
    with pytest.raises(ValueError, match="input_size must be"):
        map_boxes(np.zeros((1, 4)), convention="absolute_resized", input_size=(0, 5), image_size=(1, 1))
    with pytest.raises(ValueError, match="content_box"):
        map_points(
            np.zeros((1, 2)),
            convention="absolute_resized",
            input_size=(4, 4),
            image_size=(4, 4),
            content_box=(3, 0, 1, 4),
        )
    with pytest.raises(ValueError, match="height and width must be >= 1"):
        smart_resize(0, 10)
