"""ReasonSeg labelme parsing (flag / ignore / overlap rules) and the split reader."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from llmseg_ros.data.reasonseg import ReasonSegDataset, mask_from_labelme


def _shape(label: str, points: list[list[float]]) -> dict:
    return {"label": label, "points": points, "shape_type": "polygon"}


def test_flag_skipped_ignore_overwrites_larger_target_regardless_of_file_order() -> None:
    annotation = {
        "shapes": [
            # small ignore square listed first; points truncate to (3,3)-(5,5): 9 px
            _shape("Ignore_region", [[3.9, 3.2], [5.7, 3.0], [5.2, 5.9], [3.0, 5.0]]),
            # large target square (1,1)-(8,8): 64 px, drawn first because it is larger
            _shape("target", [[1, 1], [8, 1], [8, 8], [1, 8]]),
            # would cover everything with 1, but "FLAG" shapes are skipped
            _shape("FLAG", [[0, 0], [9, 0], [9, 9], [0, 9]]),
        ]
    }
    mask = mask_from_labelme(annotation, 10, 10)
    expected = np.zeros((10, 10), np.uint8)
    expected[1:9, 1:9] = 1
    expected[3:6, 3:6] = 255
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)


def test_small_target_inside_ignore_region_stays_target() -> None:
    annotation = {
        "shapes": [
            _shape("target", [[1, 1], [2, 1], [2, 2], [1, 2]]),
            _shape("ignore", [[0, 0], [4, 0], [4, 4], [0, 4]]),
        ]
    }
    mask = mask_from_labelme(annotation, 6, 7)
    expected = np.zeros((6, 7), np.uint8)
    expected[0:5, 0:5] = 255
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(mask, expected)


def test_outline_counts_in_the_polygon() -> None:
    # a 2-point "polygon" has no interior: only its 1-px closed outline is drawn
    mask = mask_from_labelme({"shapes": [_shape("x", [[1, 2], [4, 2]])]}, 5, 6)
    expected = np.zeros((5, 6), np.uint8)
    expected[2, 1:5] = 1
    np.testing.assert_array_equal(mask, expected)


def test_flag_only_skips_the_exact_label() -> None:
    annotation = {"shapes": [_shape("flagpole", [[0, 0], [2, 0], [2, 2], [0, 2]])]}
    assert mask_from_labelme(annotation, 4, 4).sum() == 9


def test_equal_areas_draw_the_later_shape_first() -> None:
    # both 3x3 squares have 9 px; the reference reverses an ascending sort, so the later
    # file entry is drawn first and the earlier one wins the overlap
    annotation = {
        "shapes": [
            _shape("target", [[0, 0], [2, 0], [2, 2], [0, 2]]),
            _shape("ignore", [[1, 1], [3, 1], [3, 3], [1, 3]]),
        ]
    }
    mask = mask_from_labelme(annotation, 5, 5)
    assert mask[1, 1] == 1 and mask[2, 2] == 1
    assert mask[3, 3] == 255 and mask[1, 3] == 255


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({}, "'shapes' must be a list"),
        ({"shapes": [_shape("x", [])]}, "shape 0 points must be a non-empty list"),
        ({"shapes": [_shape("x", [[0, 0], [1]])]}, "shape 0 points must be a list of"),
        ({"shapes": [{"label": 3, "points": [[0, 0], [1, 1]]}]}, "shape 0 label must be a string"),
    ],
)
def test_bad_annotations_are_rejected(annotation: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_from_labelme(annotation, 4, 4)


def _write_pair(folder: Path, name: str, size: tuple[int, int], annotation: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((*size, 3), 90, np.uint8)
    image[..., 0] = 200  # red-ish in RGB → checks BGR→RGB conversion
    assert cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (folder / f"{name}.json").write_text(json.dumps(annotation), encoding="utf-8")


@pytest.fixture
def reasonseg_root(tmp_path: Path) -> Path:
    val = tmp_path / "ReasonSeg" / "val"
    _write_pair(
        val,
        "b_long",
        (12, 16),
        {
            "text": ["What would you use to sit on?", "Where can I sit?"],
            "is_sentence": True,
            "shapes": [_shape("target", [[2, 2], [5, 2], [5, 5], [2, 5]])],
        },
    )
    _write_pair(
        val,
        "a_short",
        (10, 8),
        {"text": ["the chair"], "is_sentence": False, "shapes": [_shape("flag", [[0, 0], [3, 0], [3, 3]])]},
    )
    return tmp_path / "ReasonSeg"


def test_dataset_reads_sorted_samples_with_first_instruction(reasonseg_root: Path) -> None:
    dataset = ReasonSegDataset(reasonseg_root, "val")
    assert len(dataset) == 2
    assert dataset.sample_ids == ["a_short", "b_long"]
    short, long = dataset[0], dataset[1]
    assert (short.instruction, short.is_sentence, short.source) == ("the chair", False, "reasonseg")
    assert short.image.shape == (10, 8, 3) and short.mask.shape == (10, 8)
    assert short.mask.sum() == 0  # only a flag shape
    assert long.instruction == "What would you use to sit on?"
    assert long.instructions == ("What would you use to sit on?", "Where can I sit?")
    assert long.is_sentence is True
    assert int(long.mask.sum()) == 16 and long.mask[2:6, 2:6].all()
    assert abs(int(long.image[..., 0].mean()) - 200) < 4 and abs(int(long.image[..., 2].mean()) - 90) < 4
    assert long.image_path is not None and long.image_path.endswith("b_long.jpg")
    assert [s.image_id for s in dataset] == ["a_short", "b_long"]
    assert [s.image_id for s in dataset[0:1]] == ["a_short"]


def test_query_type_filter_follows_is_sentence(reasonseg_root: Path) -> None:
    assert ReasonSegDataset(reasonseg_root, "val", query_type="short").sample_ids == ["a_short"]
    assert ReasonSegDataset(reasonseg_root, "val", query_type="long").sample_ids == ["b_long"]
    with pytest.raises(ValueError, match="query_type must be one of"):
        ReasonSegDataset(reasonseg_root, "val", query_type="medium")


def test_dataset_errors_name_the_problem(reasonseg_root: Path) -> None:
    with pytest.raises(
        ValueError, match=r"split folder .*test does not exist \(folders under root: \['val'\]\)"
    ):
        ReasonSegDataset(reasonseg_root, "test")
    (reasonseg_root / "val" / "b_long.json").write_text(
        json.dumps({"text": ["x"], "is_sentence": "yes", "shapes": []}), encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"b_long\.json: 'is_sentence' must be true or false"):
        ReasonSegDataset(reasonseg_root, "val")
    (reasonseg_root / "val" / "b_long.json").unlink()
    with pytest.raises(ValueError, match=r"has no annotation file b_long\.json"):
        ReasonSegDataset(reasonseg_root, "val")


def test_cp1252_annotations_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    _write_pair(folder, "x", (4, 4), {"text": ["a"], "is_sentence": False, "shapes": []})
    (folder / "x.json").write_bytes(
        '{"text": ["caf\xe9 table"], "is_sentence": false, "shapes": []}'.encode("cp1252")
    )
    assert ReasonSegDataset(tmp_path, "val")[0].instruction == "café table"
