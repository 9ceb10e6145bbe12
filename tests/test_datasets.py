"""RLE helpers, the LLM-Seg40K reader/writer and the JSONL format, on fixtures written here."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from llmseg_ros.data import (
    JsonlDataset,
    LLMSeg40KDataset,
    Sample,
    decode_rle,
    encode_rle,
    qa_pair,
    write_jsonl,
    write_llmseg40k,
)
from llmseg_ros.data.dataset import SampleDataset, read_image_and_mask


def _image(path: Path, height: int, width: int, value: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = value
    image[..., 1] = np.arange(width, dtype=np.uint8)[None, :]
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return image


def _png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask)


# -- RLE ------------------------------------------------------------------------------


def test_rle_round_trip_is_json_safe() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((17, 23)) < 0.3
    rle = encode_rle(mask)
    assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
    restored = decode_rle(json.loads(json.dumps(rle)))
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, mask.astype(np.uint8))


def test_rle_uncompressed_counts_are_column_major() -> None:
    # 2 x 3, column-major runs: 1 zero, 2 ones, 3 zeros → pixels (1,0) and (0,1) are set
    mask = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    np.testing.assert_array_equal(mask, [[0, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [2], "counts": "0"}, "'size' must be"),
        ({"size": [2, 2]}, "must have 'size' and 'counts'"),
        ({"size": [2, 2], "counts": [1, 1]}, "sum to 2, expected H\\*W = 4"),
        ({"size": [2, 2], "counts": 5}, "must be a str, bytes or list"),
    ],
)
def test_rle_bad_input(rle: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        decode_rle(rle)


def test_rle_refuses_ignore_values() -> None:
    with pytest.raises(ValueError, match="ignore labels cannot be encoded"):
        encode_rle(np.array([[0, 255]], np.uint8))


# -- LLM-Seg40K -----------------------------------------------------------------------


@pytest.fixture
def llmseg40k(tmp_path: Path) -> tuple[Path, dict[str, Path], np.ndarray, np.ndarray]:
    coco, ego = tmp_path / "coco", tmp_path / "ego"
    _image(coco / "000001.jpg", 6, 9, 50)
    _image(ego / "ego_7.jpg", 5, 4, 150)
    rle_mask = np.zeros((6, 9), bool)
    rle_mask[1:4, 2:7] = True
    png_mask = np.zeros((5, 4), np.uint8)
    png_mask[0, :] = 200  # any value > 0 is foreground
    png_mask[4, 3] = 1
    _png(tmp_path / "ann" / "masks" / "ego_7_0.png", png_mask)
    records = {
        "000001.jpg": {
            "from_dataset": "coco",
            "qa_pairs": [
                qa_pair("Where could I rest my feet?", "ottoman", mask=rle_mask),
                qa_pair("Which one is soft?", "pillow", mask=~rle_mask),
            ],
        },
        "ego_7.jpg": {
            "from_dataset": "ego_objects",
            "qa_pairs": [qa_pair("What keeps coffee warm?", "mug", segmentation_path="masks/ego_7_0.png")],
        },
    }
    json_path = write_llmseg40k(tmp_path / "ann" / "val.json", records)
    return json_path, {"coco": coco, "ego_objects": ego}, rle_mask, png_mask


def test_llmseg40k_reader_yields_one_sample_per_question(llmseg40k) -> None:
    json_path, roots, rle_mask, png_mask = llmseg40k
    dataset = LLMSeg40KDataset(json_path, roots)
    assert dataset.sample_ids == ["000001_0", "000001_1", "ego_7_0"]
    first, second, third = list(dataset)
    assert first.instruction == "Where could I rest my feet?" and first.answer == "ottoman"
    assert first.is_sentence is True and first.source == "llmseg40k"
    np.testing.assert_array_equal(first.mask, rle_mask.astype(np.uint8))
    np.testing.assert_array_equal(second.mask, (~rle_mask).astype(np.uint8))
    np.testing.assert_array_equal(third.mask, (png_mask > 0).astype(np.uint8))
    assert first.image.shape == (6, 9, 3) and third.image.shape == (5, 4, 3)
    assert abs(int(third.image[..., 0].mean()) - 150) < 4  # RGB order kept


def test_llmseg40k_needs_an_image_root_per_source(llmseg40k) -> None:
    json_path, roots, _, _ = llmseg40k
    with pytest.raises(ValueError, match="no image root given for from_dataset 'ego_objects'"):
        LLMSeg40KDataset(json_path, {"coco": roots["coco"]})
    # a single folder serves every source: the ego image is then missing there
    dataset = LLMSeg40KDataset(json_path, roots["coco"])
    assert dataset[0].image.shape == (6, 9, 3)
    with pytest.raises(ValueError, match=r"ego_7.jpg'\]\.qa_pairs\[0\]: image .* does not exist"):
        dataset[2]


def test_llmseg40k_rle_size_must_match_the_image(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg", 4, 4, 10)
    write_llmseg40k(
        tmp_path / "x.json",
        {"a.jpg": {"from_dataset": "coco", "qa_pairs": [qa_pair("q?", "a", mask=np.zeros((3, 4), bool))]}},
    )
    with pytest.raises(ValueError, match=r"RLE size \[3, 4\] differs from the image's \[4, 4\]"):
        LLMSeg40KDataset(tmp_path / "x.json")[0]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"a.jpg": {"qa_pairs": []}}, "'from_dataset' must be a string"),
        ({"a.jpg": {"from_dataset": "coco"}}, "'qa_pairs' must be a list"),
        (
            {"a.jpg": {"from_dataset": "coco", "qa_pairs": [{"question": "q", "answer": "a"}]}},
            r"qa_pairs\[0\]: give exactly one of 'rle_seg'",
        ),
        (
            {"a.jpg": {"from_dataset": "coco", "qa_pairs": [{"question": "", "segmentation_path": "m.png"}]}},
            "'question' must be a non-empty string",
        ),
    ],
)
def test_llmseg40k_writer_validates(tmp_path: Path, records: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_llmseg40k(tmp_path / "x.json", records)
    assert not (tmp_path / "x.json").exists()


# -- JSONL ----------------------------------------------------------------------------


@pytest.fixture
def jsonl_dataset(tmp_path: Path) -> tuple[Path, np.ndarray]:
    _image(tmp_path / "images" / "kitchen.png", 4, 5, 30)
    _image(tmp_path / "images" / "desk.png", 3, 3, 60)
    mask = np.zeros((4, 5), np.uint8)
    mask[1, 1:4] = 1
    mask[2, 2] = 7  # other values > 0 are foreground too
    mask[3, :] = 255  # ignore is kept
    _png(tmp_path / "masks" / "kitchen.png", mask)
    rle_mask = np.eye(3, dtype=bool)
    write_jsonl(
        tmp_path / "val.jsonl",
        [
            {
                "image": "images/kitchen.png",
                "question": "where do I wash dishes?",
                "mask": "masks/kitchen.png",
                "is_sentence": True,
            },
            {
                "image": "images/desk.png",
                "question": "the lamp",
                "rle": encode_rle(rle_mask),
                "is_sentence": False,
            },
            {
                "image": "images/kitchen.png",
                "question": "the sink",
                "rle": encode_rle(np.zeros((4, 5), bool)),
                "answer": "sink",
            },
            {"image": "images/desk.png", "question": "the pen", "rle": encode_rle(rle_mask), "id": "custom"},
        ],
    )
    return tmp_path / "val.jsonl", mask


def test_jsonl_reader_png_and_rle_masks(jsonl_dataset) -> None:
    path, _ = jsonl_dataset
    dataset = JsonlDataset(path)
    assert dataset.sample_ids == ["kitchen_0", "desk_0", "kitchen_1", "custom"]
    kitchen, desk, sink, pen = list(dataset)
    expected = np.zeros((4, 5), np.uint8)
    expected[1, 1:4] = 1
    expected[2, 2] = 1
    expected[3, :] = 255
    np.testing.assert_array_equal(kitchen.mask, expected)
    assert kitchen.is_sentence is True and desk.is_sentence is False and sink.is_sentence is None
    np.testing.assert_array_equal(desk.mask, np.eye(3, dtype=np.uint8))
    assert sink.answer == "sink" and sink.mask.sum() == 0
    assert pen.image_id == "custom" and pen.source == "jsonl"
    assert abs(int(desk.image[..., 0].mean()) - 60) < 2


def test_jsonl_errors_carry_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"image": "a.png", "question": "q", "rle": {"size": [1, 1], "counts": [1]}})
    cases = [
        ("{not json", "bad.jsonl:3: invalid JSON"),
        (
            json.dumps({"image": "a.png", "rle": {"size": [1, 1], "counts": [1]}}),
            "bad.jsonl:3: 'question' must be",
        ),
        (json.dumps({"image": "a.png", "question": "q"}), "bad.jsonl:3: give exactly one of 'mask'"),
        (
            json.dumps({"image": "a.png", "question": "q", "mask": "m.png", "colour": 1}),
            r"bad.jsonl:3: unknown key\(s\) \['colour'\]",
        ),
        (
            json.dumps({"image": "a.png", "question": "q", "mask": "m.png", "is_sentence": "no"}),
            "bad.jsonl:3: 'is_sentence'",
        ),
        (
            json.dumps({"image": "a.png", "question": "q", "mask": "m.png", "id": "a_0"}),
            "bad.jsonl:3: id 'a_0' was already used on line 1",
        ),
    ]
    for line, message in cases:
        path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            JsonlDataset(path)


def test_jsonl_rejects_foreground_saved_as_255(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 2, 2, 0)
    _png(tmp_path / "m.png", np.array([[0, 255], [255, 0]], np.uint8))
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "mask": "m.png"}])
    with pytest.raises(
        ValueError, match=r"d.jsonl:1: mask .*m.png has no foreground pixels and only the value 255"
    ):
        JsonlDataset(path)[0]


def test_jsonl_mask_size_must_match_image(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 2, 2, 0)
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "rle": encode_rle(np.zeros((2, 3), bool))}]
    )
    with pytest.raises(ValueError, match=r"d.jsonl:1: RLE size \[2, 3\] differs from the image's \[2, 2\]"):
        JsonlDataset(path)[0]


def test_write_jsonl_validates_and_leaves_no_partial_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="record 2: 'image' must be"):
        write_jsonl(
            tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "mask": "m.png"}, {"question": "q"}]
        )
    assert list(tmp_path.iterdir()) == []


def test_sample_validates_its_fields() -> None:
    image = np.zeros((3, 4, 3), np.uint8)
    with pytest.raises(
        ValueError, match=r"mask of sample 'x' has shape \(3, 3\), expected the image's \(3, 4\)"
    ):
        Sample(image, "q", None, np.zeros((3, 3), np.uint8), "x", "test")
    with pytest.raises(ValueError, match=r"values must be 0, 1 or 255, found \[2\]"):
        Sample(image, "q", None, np.full((3, 4), 2, np.uint8), "x", "test")
    with pytest.raises(ValueError, match="instruction of sample 'x' must be a non-empty string"):
        Sample(image, " ", None, np.zeros((3, 4), np.uint8), "x", "test")
    sample = Sample(image, "q", True, np.zeros((3, 4), np.uint8), "x", "test")
    assert sample.instructions == ("q",) and sample.image_size == (3, 4)


# -- the readers' base ------------------------------------------------------------------
class _Named:
    def __init__(self, image_id: str) -> None:
        self.image_id = image_id


class _InMemory(SampleDataset[_Named]):
    def __init__(self, ids: list[str]) -> None:
        self.entries = [_Named(i) for i in ids]
        self.loaded: list[str] = []

    def load_entry(self, entry: _Named) -> Sample:
        self.loaded.append(entry.image_id)
        return Sample(
            np.zeros((2, 2, 3), np.uint8), "q", None, np.zeros((2, 2), np.uint8), entry.image_id, "t"
        )


def test_sample_dataset_indexing_slicing_and_iteration() -> None:
    dataset = _InMemory(["a", "b", "c", "d"])
    assert len(dataset) == 4 and dataset.sample_ids == ["a", "b", "c", "d"] and dataset.loaded == []
    assert dataset[-1].image_id == "d"
    assert [s.image_id for s in dataset[1::2]] == ["b", "d"]
    assert [s.image_id for s in dataset] == ["a", "b", "c", "d"]
    with pytest.raises(IndexError):
        dataset[4]
    with pytest.raises(TypeError, match="abstract"):
        SampleDataset()  # type: ignore[abstract]


def test_read_image_and_mask_names_the_sample(tmp_path: Path) -> None:
    image = _image(tmp_path / "i.png", 3, 4, 9)
    got, mask = read_image_and_mask("s:1", tmp_path / "i.png", lambda size: np.ones((3, 4), np.uint8))
    np.testing.assert_array_equal(got, image)
    assert mask.shape == (3, 4)
    with pytest.raises(ValueError, match=r"^s:1: image .*missing\.png does not exist"):
        read_image_and_mask("s:1", tmp_path / "missing.png", lambda size: np.ones((3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"^s:2: mask shape \(2, 2\) does not match image shape \(3, 4\)"):
        read_image_and_mask("s:2", tmp_path / "i.png", lambda size: np.ones((2, 2), np.uint8))
