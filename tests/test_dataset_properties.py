"""Property-based tests of the dataset readers (hypothesis).

For arbitrary field values and sizes, every public entry point either returns a valid
result or raises the documented clear error (``ValueError``; ``TypeError`` where the
docstring says so); nothing else escapes and nothing crashes the process. The work stays
in proportion to the declared image size, whatever the coordinates and counts say:
Python and numpy allocations are measured with ``tracemalloc``, and every example has a
per-example deadline of seconds (the unfixed readers took minutes or ran out of memory
on such input). Valid data rasterises exactly as the reference rules say.

Two families of strategies: files whose structure is right but whose values are
arbitrary (coordinates far out, NaN, huge counts, damaged RLE), which reach the
rasterisers; and files of arbitrary structure, which must be refused cleanly. Runs are
derandomised, so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from llmseg_ros.data import (
    JsonlDataset,
    LLMSeg40KDataset,
    ReasonSegDataset,
    decode_rle,
    encode_rle,
    mask_from_labelme,
    validate_llmseg40k,
)
from llmseg_ros.data.checks import CLIP_MARGIN, check_image_size, clip_polygon
from llmseg_ros.datagen.coco import InstanceIndex, annotation_mask

PROPERTY = settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True)
FILES = settings(max_examples=60, deadline=timedelta(seconds=5), derandomize=True)
SMALL = st.integers(1, 12)
BASE_MEMORY = 2 << 20  # bytes of allocations allowed besides 32 per declared pixel


# -- values ---------------------------------------------------------------------------------------
def one_branch(*strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``st.one_of`` that stays one branch when nested in another ``one_of`` (which flattens them)."""
    return st.one_of(*strategies).map(lambda value: value)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` about three times in four, else ``other`` (hypothesis alone would favour ``other``)."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else other)


junk = one_branch(
    st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=3), st.just({})
)
extreme = st.sampled_from(
    [2**31, -(2**31) - 1, 10**12, -(10**12), 1e30, -1e308, 10**400, float("nan"), float("inf"), -float("inf")]
)
moderate = one_branch(st.integers(-3, 15), st.floats(-3, 15))
any_value = st.one_of(moderate, extreme, st.floats(), junk)
# polygons: in range, with a far or non-finite vertex, or with any value at all
pairs = st.one_of(
    st.lists(st.tuples(moderate, moderate), min_size=1, max_size=8),
    st.lists(st.tuples(st.one_of(moderate, extreme), moderate), min_size=1, max_size=8),
    st.lists(st.tuples(any_value, any_value), min_size=1, max_size=6),
)
sizes = st.one_of(
    st.lists(SMALL, min_size=2, max_size=2),
    st.lists(st.sampled_from([0, -1, 10**6, 2**40, 10**30, 4.5]), min_size=2, max_size=2),
    junk,
)
json_counts = st.one_of(  # what a JSON file can hold
    st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=12),
    st.lists(st.one_of(st.integers(-3, 150), st.sampled_from([2**40, 10**30])), max_size=12),
    junk,
)


def rle_of(height: int, width: int) -> st.SearchStrategy[Any]:
    """COCO RLE of a random (height, width) mask: valid, or with a damaged size or counts."""
    valid = st.lists(st.booleans(), min_size=height * width, max_size=height * width).map(
        lambda bits: encode_rle(np.asarray(bits, bool).reshape(height, width))
    )
    damaged = one_branch(
        valid.map(lambda r: {**r, "counts": r["counts"][:-1]}),
        valid.map(lambda r: {**r, "counts": r["counts"] + "0"}),
        valid.map(lambda r: {**r, "size": [height + 1, width]}),
        st.fixed_dictionaries({"size": st.just([height, width]), "counts": json_counts}),
        st.fixed_dictionaries({"size": sizes, "counts": json_counts}),
    )
    return mostly(valid, damaged)


def _bounded(call: Any, pixels: int) -> Any:
    """Run ``call`` and check its Python and numpy allocations stayed in proportion to ``pixels``.

    ``pixels`` is the declared image size; whatever the coordinates and counts say, the
    work may not grow beyond it (:data:`BASE_MEMORY` plus 32 bytes a pixel).
    """
    limit = BASE_MEMORY + 32 * pixels
    tracemalloc.start()
    try:
        return call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, f"{peak} bytes allocated for a declared size of {pixels} pixels"


def _every_sample(dataset: Any, image_size: tuple[int, int]) -> None:
    """Load each sample of ``dataset``: a mask of the image's size, or a ``ValueError``, in bounded memory."""
    for k in range(len(dataset)):
        try:
            sample = _bounded(lambda k=k: dataset[k], image_size[0] * image_size[1])
        except ValueError:
            continue
        assert sample.mask.shape == image_size


def _declared(size: Any) -> int:
    """Pixels of a declared ``[height, width]`` (0 when it is not a size the readers accept)."""
    if not isinstance(size, list) or len(size) != 2:
        return 0
    try:
        h, w = check_image_size(size[0], size[1], "declared")
    except ValueError:
        return 0
    return h * w


# -- ReasonSeg ----------------------------------------------------------------------------------
labels = st.sampled_from(["target", "ignore", "flag", "Ignore this", "FLAG"])
labelme_shapes = st.lists(
    st.fixed_dictionaries({"label": labels, "points": pairs.map(lambda ps: [list(p) for p in ps])}),
    min_size=1,
    max_size=4,
)


@PROPERTY
@given(labelme_shapes, SMALL, SMALL)
def test_labelme_polygons_with_any_coordinates_give_masks_or_clear_errors(
    shapes: list[dict[str, Any]], height: int, width: int
) -> None:
    try:
        mask = _bounded(lambda: mask_from_labelme({"shapes": shapes}, height, width), height * width)
    except ValueError as exc:
        assert str(exc).startswith("shape "), exc
        return
    assert mask.shape == (height, width) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 255}


@PROPERTY
@given(
    st.one_of(
        st.fixed_dictionaries(
            {"shapes": st.one_of(st.lists(st.one_of(junk, st.dictionaries(labels, junk))), junk)}
        ),
        st.fixed_dictionaries({"shapes": st.lists(st.fixed_dictionaries({"label": junk, "points": junk}))}),
        junk,
    ),
    SMALL,
    SMALL,
)
def test_labelme_annotations_of_any_structure_are_refused_cleanly(
    annotation: Any, height: int, width: int
) -> None:
    with contextlib.suppress(ValueError, TypeError):  # TypeError: not a mapping, as documented
        mask_from_labelme(annotation, height, width)


def _reference_labelme(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """The reading rules of DESIGN.md applied literally: int32 truncation, outline + fill, largest first."""
    drawn, areas = [], []
    for s in shapes:
        if s["label"].lower() == "flag":
            continue
        pts = np.asarray(s["points"], dtype=np.float64).astype(np.int32)
        scratch = np.zeros((height, width), np.uint8)
        cv2.polylines(scratch, [pts], True, (1,), 1)
        cv2.fillPoly(scratch, [pts], (1,))
        areas.append(int(scratch.sum()))
        drawn.append((pts, 255 if "ignore" in s["label"].lower() else 1))
    mask = np.zeros((height, width), np.uint8)
    for i in np.argsort(np.asarray(areas, dtype=np.int64), kind="stable")[::-1]:
        pts, value = drawn[int(i)]
        cv2.polylines(mask, [pts], True, (value,), 1)
        cv2.fillPoly(mask, [pts], (value,))
    return mask


@PROPERTY
@given(st.data(), SMALL, SMALL)
def test_valid_labelme_polygons_rasterise_exactly_by_the_reference_rules(
    data: st.DataObject, height: int, width: int
) -> None:
    vertex = st.tuples(st.floats(-width - 3.0, 2.0 * width + 3), st.floats(-height - 3.0, 2.0 * height + 3))
    polygon = st.lists(vertex.map(list), min_size=1, max_size=7)
    shapes = data.draw(st.lists(st.fixed_dictionaries({"label": labels, "points": polygon}), max_size=4))
    np.testing.assert_array_equal(
        mask_from_labelme({"shapes": shapes}, height, width), _reference_labelme(shapes, height, width)
    )


@PROPERTY
@given(
    st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=3, max_size=10),
    st.lists(st.tuples(st.floats(-49.5, 49.5), st.floats(-49.5, 49.5)), min_size=1, max_size=10),
)
def test_clipping_keeps_what_is_inside_the_box(
    vertices: list[tuple[float, float]], probes: list[tuple[float, float]]
) -> None:
    """Even-odd containment of every point strictly inside the box is unchanged by clipping."""

    def contains(poly: np.ndarray, x: float, y: float) -> bool:
        inside = False
        for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
            if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
                inside = not inside
        return inside

    def near_an_edge(poly: np.ndarray, x: float, y: float) -> bool:
        for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
            length = np.hypot(x1 - x0, y1 - y0)
            if length and abs((x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)) / length < 1e-6:
                return True
        return False

    polygon = np.asarray(vertices, dtype=np.float64)
    clipped = clip_polygon(polygon, (-50.0, -50.0, 50.0, 50.0))
    assert (np.abs(clipped) <= 50.0).all()
    for x, y in probes:
        if not near_an_edge(polygon, x, y):  # a point within rounding of an edge may go either way
            assert contains(polygon, x, y) == (len(clipped) >= 3 and contains(clipped, x, y)), (x, y)


@FILES
@given(
    st.one_of(
        st.fixed_dictionaries(
            {"text": st.just(["where?"]), "is_sentence": st.booleans(), "shapes": labelme_shapes}
        ),
        st.fixed_dictionaries({"text": any_value, "is_sentence": any_value, "shapes": any_value}),
        junk,
    )
)
def test_reasonseg_split_reader_gives_samples_or_clear_errors(annotation: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        val = Path(folder) / "val"
        val.mkdir()
        assert cv2.imwrite(str(val / "a.png"), np.full((6, 7, 3), 50, np.uint8))
        (val / "a.json").write_text(json.dumps(annotation))
        try:
            samples = _bounded(lambda: list(ReasonSegDataset(folder, "val")), 6 * 7)
        except ValueError:
            return
        assert [s.mask.shape for s in samples] == [(6, 7)]


# -- RLE ----------------------------------------------------------------------------------------
@PROPERTY
@given(
    st.one_of(
        st.tuples(SMALL, SMALL).flatmap(lambda hw: rle_of(*hw)),
        st.fixed_dictionaries({"size": sizes, "counts": st.one_of(json_counts, st.binary(max_size=12))}),
        junk,
    )
)
def test_rle_decodes_or_raises_a_clear_error(rle: Any) -> None:
    pixels = _declared(rle.get("size")) if isinstance(rle, dict) else 0
    try:
        mask = _bounded(lambda: decode_rle(rle), pixels)
    except (ValueError, TypeError):  # TypeError: not a mapping / counts of another type, as documented
        return
    assert mask.shape == tuple(rle["size"]) and set(np.unique(mask)) <= {0, 1}


@PROPERTY
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12), SMALL)
def test_valid_run_lengths_decode_to_exactly_those_runs(runs: list[int], height: int) -> None:
    total = sum(runs)
    if total == 0 or total % height:
        return
    size = [height, total // height]
    compressed = mask_utils.frPyObjects({"size": size, "counts": runs}, *size)
    expected = np.repeat(np.arange(len(runs)) % 2, runs).reshape(size, order="F")
    np.testing.assert_array_equal(decode_rle({"size": size, "counts": runs}), expected)
    np.testing.assert_array_equal(
        decode_rle({"size": size, "counts": compressed["counts"].decode()}), expected
    )
    np.testing.assert_array_equal(decode_rle(encode_rle(expected.astype(bool))), expected)


# -- COCO / LVIS annotations (the generator's input) ----------------------------------------------
COCO_H, COCO_W = 7, 9
flat_polygons = st.lists(pairs.map(lambda ps: [v for p in ps for v in p]), min_size=1, max_size=3)


def _instances(segmentations: list[Any], height: Any = COCO_H, width: Any = COCO_W) -> dict[str, Any]:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": height, "width": width}],
        "annotations": [
            {"id": k, "image_id": 1, "category_id": 1 + k % 2, "segmentation": seg}
            for k, seg in enumerate(segmentations)
        ],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate", "synonyms": ["dish"]}],
    }


def _all_masks(data: Any) -> None:
    try:
        index = InstanceIndex.from_dict(data)
    except ValueError:
        return
    for image in index.images.values():
        assert "/" not in image.file_name and image.file_name not in ("", ".", "..")
        for category in image.category_ids:
            try:
                mask = _bounded(
                    lambda image=image, category=category: index.category_mask(image, category),
                    image.height * image.width,
                )
            except ValueError as exc:
                assert str(exc).startswith("instance annotations: image 'a.jpg': annotation "), exc
                continue
            assert mask.shape == (image.height, image.width) and mask.dtype == bool


@PROPERTY
@given(st.lists(st.one_of(flat_polygons, rle_of(COCO_H, COCO_W)), min_size=1, max_size=3))
def test_coco_segmentations_with_any_values_give_masks_or_clear_errors(segmentations: list[Any]) -> None:
    _all_masks(_instances(segmentations))


@PROPERTY
@given(
    st.one_of(
        st.builds(
            _instances,
            st.lists(st.one_of(flat_polygons, junk), max_size=2),
            st.one_of(SMALL, junk, extreme),
            st.one_of(SMALL, junk, extreme),
        ),
        st.fixed_dictionaries(
            {
                "images": st.one_of(
                    st.lists(
                        st.dictionaries(
                            st.sampled_from(["id", "file_name", "height", "width", "coco_url"]), any_value
                        )
                    ),
                    junk,
                ),
                "annotations": st.one_of(
                    st.lists(
                        st.dictionaries(
                            st.sampled_from(["id", "image_id", "category_id", "segmentation"]), any_value
                        )
                    ),
                    junk,
                ),
                "categories": st.one_of(
                    st.lists(st.dictionaries(st.sampled_from(["id", "name", "synonyms"]), any_value)), junk
                ),
            }
        ),
        junk,
    )
)
def test_instance_files_of_any_structure_index_or_are_refused_cleanly(data: Any) -> None:
    _all_masks(data)


@PROPERTY
@given(
    st.lists(st.lists(st.tuples(moderate, moderate), min_size=1, max_size=8), min_size=1, max_size=3).map(
        lambda polys: [[float(v) for p in poly for v in p] for poly in polys]
    ),
    SMALL,
    SMALL,
)
def test_valid_coco_polygons_rasterise_as_pycocotools_does(
    polygons: list[list[float]], height: int, width: int
) -> None:
    kept = [p for p in polygons if len(p) >= 6]
    expected = (
        mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(kept, height, width))).astype(bool)
        if kept
        else np.zeros((height, width), bool)
    )
    np.testing.assert_array_equal(
        annotation_mask({"id": 0, "segmentation": polygons}, height, width), expected
    )
    assert max(abs(v) for p in polygons for v in p) < CLIP_MARGIN  # valid data is never clipped


# -- LLM-Seg40K and JSONL files -------------------------------------------------------------------
keys = mostly(
    st.just("a.png"), st.sampled_from(["../a.png", "..", "sub/a.png", "", "missing.png", "a.png\0"])
)
qa = st.fixed_dictionaries(
    {"question": st.just("what?"), "answer": st.sampled_from(["cup", None]), "rle_seg": rle_of(5, 6)}
)


def _llmseg40k_samples(data: Any) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        assert cv2.imwrite(str(root / "a.png"), np.full((5, 6, 3), 70, np.uint8))
        (root / "split.json").write_text(json.dumps(data))
        try:
            validate_llmseg40k(data)
            dataset = LLMSeg40KDataset(root / "split.json")
        except ValueError:
            return
        _every_sample(dataset, (5, 6))


@FILES
@given(
    st.dictionaries(
        keys,
        st.fixed_dictionaries({"from_dataset": st.just("coco"), "qa_pairs": st.lists(qa, max_size=2)}),
        min_size=1,
        max_size=2,
    )
)
def test_llmseg40k_files_with_any_values_give_samples_or_clear_errors(data: Any) -> None:
    _llmseg40k_samples(data)


@FILES
@given(
    st.one_of(
        st.dictionaries(
            st.one_of(keys, st.text(max_size=3)),
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "from_dataset": any_value,
                        "qa_pairs": st.one_of(
                            st.lists(
                                st.dictionaries(st.sampled_from(["question", "answer", "rle_seg"]), any_value)
                            ),
                            junk,
                        ),
                    }
                ),
                junk,
            ),
        ),
        junk,
    )
)
def test_llmseg40k_files_of_any_structure_are_refused_cleanly(data: Any) -> None:
    _llmseg40k_samples(data)


jsonl_line = st.fixed_dictionaries(
    {"image": st.just("a.png"), "question": st.just("where?"), "rle": rle_of(4, 3)},
    optional={"is_sentence": st.booleans(), "answer": st.text(min_size=1, max_size=3)},
)
odd_line = one_branch(
    jsonl_line.flatmap(lambda line: st.sampled_from(sorted(line)).map(lambda k: {**line, k: None})),
    st.dictionaries(
        st.sampled_from(["image", "question", "rle", "mask", "id", "is_sentence", "answer"]), any_value
    ),
    junk,
)


@FILES
@given(st.lists(mostly(jsonl_line, odd_line), min_size=1, max_size=3))
def test_jsonl_files_give_samples_or_clear_errors(lines: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        assert cv2.imwrite(str(root / "a.png"), np.full((4, 3, 3), 70, np.uint8))
        (root / "d.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        try:
            dataset = JsonlDataset(root / "d.jsonl")
        except ValueError:
            return
        _every_sample(dataset, (4, 3))
