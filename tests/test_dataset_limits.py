"""Readers against coordinates, sizes and names that are out of range (regressions of issue 15).

Calls that crashed or exhausted memory before the fix run in a child process with an
address-space limit, so a regression fails the test instead of the test run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_datagen import _load_cli

from llmseg_ros.data import JsonlDataset, LLMSeg40KDataset, decode_rle, encode_rle, mask_from_labelme
from llmseg_ros.data import reasonseg as reasonseg_module
from llmseg_ros.data.checks import CLIP_MARGIN, MAX_IMAGE_PIXELS
from llmseg_ros.datagen.coco import InstanceIndex, annotation_mask

REPO = Path(__file__).resolve().parents[1]
H, W = 12, 16


def _shape(label: str, points: list[list[float]]) -> dict[str, Any]:
    return {"label": label, "points": points}


def _run_limited(code: str, memory_gib: float = 2.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python limited to ``memory_gib`` of address space."""
    prelude = textwrap.dedent(
        f"""
        import resource
        limit = int({memory_gib} * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- ReasonSeg ---------------------------------------------------------------------------------
def test_polygons_beyond_int32_give_the_clipped_polygon() -> None:
    far, near = 1e12, W + 5  # a band across the image, drawn once with a far and once with a near right end
    band = [[2, 2], [far, 2], [far, 6], [2, 6]]
    cover = [[-far, -far], [far, -far], [far, far], [-far, far]]
    expected = np.zeros((H, W), np.uint8)
    expected[2:7, 2:] = 1
    np.testing.assert_array_equal(mask_from_labelme({"shapes": [_shape("t", band)]}, H, W), expected)
    np.testing.assert_array_equal(
        mask_from_labelme({"shapes": [_shape("t", [[2, 2], [near, 2], [near, 6], [2, 6]])]}, H, W), expected
    )
    # a polygon around the whole image covers it (the int32 cast made it a single point)
    np.testing.assert_array_equal(mask_from_labelme({"shapes": [_shape("t", cover)]}, H, W), np.ones((H, W)))
    # a polygon entirely outside the image draws nothing and does not disturb the others
    outside = _shape("ignore", [[1e15, 1e15], [2e15, 1e15], [2e15, 2e15]])
    np.testing.assert_array_equal(mask_from_labelme({"shapes": [outside, _shape("t", band)]}, H, W), expected)


def test_the_rasteriser_never_sees_coordinates_far_outside_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV's fill time grows with the coordinates' extent (21 s per polygon near 2**31): keep it bounded."""
    seen: list[np.ndarray] = []
    real = cv2.fillPoly

    def recording(canvas: np.ndarray, polygons: list[np.ndarray], *args: Any) -> Any:
        seen.extend(polygons)
        return real(canvas, polygons, *args)

    monkeypatch.setattr(reasonseg_module.cv2, "fillPoly", recording)
    big = 2_000_000_000  # within int32
    mask = mask_from_labelme({"shapes": [_shape("t", [[-big, -big], [big, -big], [0, big]])]}, H, W)
    assert mask.all() and seen
    assert max(int(np.abs(p).max()) for p in seen) <= CLIP_MARGIN + max(H, W)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([[1, 2], [float("nan"), 3], [4, 5]], "must hold finite numbers"),
        ([[1, 2], [float("inf"), 3], [4, 5]], "must hold finite numbers"),
        ([[1, 2], [10**400, 3], [4, 5]], "holds a number too large"),
        ([[1, 2], ["3", 3], [4, 5]], "must hold numbers only"),
        ([[1, 2], [True, 3], [4, 5]], "must hold numbers only"),
        ([[1, 2, 3]], r"must be a list of \[x, y\] number pairs"),
    ],
)
def test_bad_coordinates_are_refused(points: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"shape 0 points {message}"):
        mask_from_labelme({"shapes": [_shape("t", points)]}, H, W)


def test_reasonseg_mask_size_is_capped() -> None:
    with pytest.raises(ValueError, match="exceeds the limit"):
        mask_from_labelme({"shapes": []}, 100_000, 100_000)


# -- COCO / LVIS annotations of the generator ----------------------------------------------------
def _instances(segmentation: Any, height: int = H, width: int = W) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": height, "width": width}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": segmentation}],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate"}],
    }


def _pycocotools_count(x_end: float) -> int:
    """Pixels pycocotools gives the band x in [4, x_end], y in [2, 6] (an end just outside the image)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([[4, 2, x_end, 2, x_end, 6, 4, 6]], H, W)
    return int(mask_utils.decode(mask_utils.merge(rle)).sum())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "float('nan')",
            "ValueError: instance annotations: image 'a.jpg': annotation 7: polygon 0 must hold finite",
        ),
        (
            "float('inf')",
            "ValueError: instance annotations: image 'a.jpg': annotation 7: polygon 0 must hold finite",
        ),
        ("1e30", f"mask {_pycocotools_count(W + 5)}"),  # clipped: the band from x = 4 to the right edge
        ("-1e30", f"mask {_pycocotools_count(-5)}"),  # clipped: the band from the left edge to x = 4
    ],
)
def test_coco_polygons_with_nan_or_huge_values_neither_crash_nor_eat_memory(
    value: str, expected: str
) -> None:
    # before: a segfault in pycocotools (1e30) or 6.9 GB of memory in 30 s (NaN)
    result = _run_limited(
        f"""
        import json
        from llmseg_ros.datagen.coco import InstanceIndex
        data = json.loads({json.dumps(json.dumps(_instances(None)))})
        data["annotations"][0]["segmentation"] = [[4, 2, {value}, 2, {value}, 6, 4, 6]]
        index = InstanceIndex.from_dict(data)
        try:
            print("mask", int(index.category_mask(index.images[1], 1).sum()))
        except ValueError as exc:
            print("ValueError:", exc)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(expected), result.stdout


def test_declared_image_sizes_are_capped_before_anything_is_allocated() -> None:
    data = _instances([[0, 0, 5, 0, 5, 5]], height=100_000, width=100_000)
    with pytest.raises(ValueError, match=r"instance annotations: image 1: declared image size 100000x100000"):
        InstanceIndex.from_dict(data)
    for height, width, message in (
        (0, 4, "must be positive"),
        (4.5, 4, "must be an integer"),
        (4, "x", "integer"),
    ):
        with pytest.raises(ValueError, match=message):
            InstanceIndex.from_dict(_instances([[0, 0, 5, 0, 5, 5]], height=height, width=width))


def test_polygon_outlines_too_long_to_rasterise_are_refused() -> None:
    zigzag = [
        v for i in range(40_000) for v in (0.0 if i % 2 else W, float(i % H))
    ]  # 40k edges across the image
    mask = annotation_mask({"id": 1, "segmentation": [zigzag]}, H, W)  # 40k * 80 steps: under the limit
    assert mask.shape == (H, W)
    huge = [v for i in range(40_000) for v in (-CLIP_MARGIN if i % 2 else W + CLIP_MARGIN, 0.0)]
    with pytest.raises(ValueError, match=r"annotation 1: polygon 0 has an outline of .* steps"):
        annotation_mask({"id": 1, "segmentation": [huge]}, H, W)


def test_rle_segmentations_are_validated_before_pycocotools_sees_them() -> None:
    short = encode_rle(np.ones((2, 2), bool))  # runs for 4 pixels declared as a 12 x 16 mask
    with pytest.raises(ValueError, match=r"annotation 3: RLE counts sum to 4, expected H\*W = 192"):
        annotation_mask({"id": 3, "segmentation": {"size": [H, W], "counts": short["counts"]}}, H, W)
    with pytest.raises(ValueError, match="annotation 3: RLE run lengths must be non-negative"):
        annotation_mask({"id": 3, "segmentation": {"size": [H, W], "counts": [-1, 193]}}, H, W)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2, 3]", "must be a JSON object with 'images', 'annotations' and 'categories', got a JSON list"),
        ("null", "got a JSON NoneType"),
        ('{"images": [5], "annotations": [], "categories": []}', r"images\[0\] must be a JSON object"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1e999, "name": "x"}]}', "must be an integer"),
        ('{"images": [{"id": 1, "file_name": "..", "height": 2, "width": 2}], "annotations": [], '
         '"categories": []}', "is not a bare file name"),
        ("[" * 100_000, "nested too deeply"),
    ],
)  # fmt: skip
def test_generator_exits_2_on_malformed_annotations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    ann = tmp_path / "instances.json"
    ann.write_text(content)
    captions = tmp_path / "captions.json"
    captions.write_text("{}")
    rc = _load_cli().main(
        ["--annotations", str(ann), "--captions", str(captions), "--out", str(tmp_path / "out.json"),
         "--llm-base-url", "http://127.0.0.1:9/v1", "--no-progress"]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(ann) in err and re.search(message, err), err
    assert not (tmp_path / "out.json").exists()


# -- RLE in JSONL / LLM-Seg40K ------------------------------------------------------------------
def _png(path: Path, height: int = 4, width: int = 4) -> None:
    assert cv2.imwrite(str(path), np.full((height, width, 3), 80, np.uint8))


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        (
            {"size": [4, 4], "counts": "04"},
            r"RLE counts sum to 4, expected H\*W = 16",
        ),  # pixels left undefined
        ({"size": [4, 4], "counts": [0, 4]}, r"RLE counts sum to 4, expected H\*W = 16"),
        ({"size": [4, 4], "counts": "0\x7f"}, "characters outside"),
        ({"size": [4, 4], "counts": "0P"}, "ends inside a run length"),
        ({"size": [4, 4], "counts": "0" * 40}, "runs for 16 pixels"),
        ({"size": [100_000, 100_000], "counts": "0"}, "exceeds the limit"),
        ({"size": [5, 4], "counts": [20]}, r"RLE size \[5, 4\] differs from the image's \[4, 4\]"),
        ({"size": [4, 4], "counts": [10**30]}, "below 2\\*\\*63"),
    ],
)
def test_jsonl_rle_with_absurd_sizes_or_counts_is_refused(tmp_path: Path, rle: Any, message: str) -> None:
    _png(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q?", "rle": rle}) + "\n")
    with pytest.raises(ValueError, match=rf"d.jsonl:1: .*{message}"):
        JsonlDataset(path)[0]


def test_rle_of_a_huge_declared_size_is_checked_against_the_image_before_decoding() -> None:
    # 10000 x 13000 is under the cap: the image's own size refuses it before 130 MB are allocated
    result = _run_limited(
        """
        from llmseg_ros.data import decode_rle
        try:
            decode_rle({"size": [10000, 13000], "counts": [130000000]}, expected_size=(4, 4))
        except ValueError as exc:
            print("ValueError:", exc)
        """,
        memory_gib=1.0,
    )
    assert result.stdout.startswith("ValueError: RLE size [10000, 13000] differs"), result.stderr[-1500:]
    assert MAX_IMAGE_PIXELS >= 10000 * 13000


def test_compressed_counts_decode_as_pycocotools_does() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()
        np.testing.assert_array_equal(decode_rle(encode_rle(mask)), mask.astype(np.uint8))


@pytest.mark.parametrize("key", ["../secret.png", "sub/a.png", "..", ".", "a\\..\\b.png", "", "a\0.png"])
def test_llmseg40k_keys_must_be_bare_file_names(tmp_path: Path, key: str) -> None:
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "secret.png")
    pair = {"question": "q?", "answer": "a", "rle_seg": encode_rle(np.ones((4, 4), bool))}
    path = tmp_path / "split.json"
    path.write_text(json.dumps({key: {"from_dataset": "coco", "qa_pairs": [pair]}}))
    with pytest.raises(ValueError, match=r"split.json: key: .*(not a bare file name|non-empty string)"):
        LLMSeg40KDataset(path, tmp_path / "images")
