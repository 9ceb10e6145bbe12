"""The grounded baseline's stages: phrase parsing, detector, box → SAM prompt, union."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmseg_ros.methods.grounded import (
    PHRASE_SUFFIX,
    boxes_to_mask,
    extract_phrase,
    grounding_prompt,
)
from llmseg_ros.models.detector import GroundingDetector
from llmseg_ros.models.sam_prompting import decode_masks, encode_image


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        ("stool", "stool"),
        ("Stool.", "stool"),
        ("It is the red stool.", "red stool"),
        ("It is <SEG>.", ""),
        ("The answer is: a trash can.", "trash can"),
        ("Sure, it is the step stool. Because you can stand on it.", "step stool"),
        ("You could use the chair", "chair"),
        ('"coffee mug"', "coffee mug"),
        ("ASSISTANT: the blue book\nIt is on the shelf.", "blue book"),
        ("   ", ""),
    ],
)
def test_extract_phrase(answer: str, phrase: str) -> None:
    assert extract_phrase(answer) == phrase


def test_prompt_appends_the_papers_suffix() -> None:
    assert grounding_prompt(" where is the cup? ") == f"where is the cup? {PHRASE_SUFFIX}"


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.tiny.sam import save_tiny_sam

    path = save_tiny_sam(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", seed=0)
    return build_sam("tiny", path, torch.device("cpu"))


def _image(h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_boxes_prompt_sam_like_the_predictor(tiny_sam) -> None:
    """Our box → SAM prompt path gives the same masks as segment_anything.SamPredictor."""
    from segment_anything import SamPredictor

    image = _image()
    boxes = np.array([[10, 12, 60, 70], [50, 5, 120, 90]], dtype=np.float32)
    encoding = encode_image(tiny_sam, image)
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    torch.testing.assert_close(encoding.embedding, predictor.features)
    union, iou = boxes_to_mask(tiny_sam, encoding, boxes)
    expected = []
    for i, box in enumerate(boxes):
        masks, scores, _ = predictor.predict(box=box, multimask_output=False)
        expected.append(masks[0])
        assert iou[i] == pytest.approx(float(scores[0]), abs=1e-5)
    np.testing.assert_array_equal(union, np.logical_or.reduce(expected))
    # no box → empty, valid answer
    empty, no_iou = boxes_to_mask(tiny_sam, encoding, np.zeros((0, 4), np.float32))
    assert empty.shape == image.shape[:2] and not empty.any() and no_iou.shape == (0,)


def test_decode_masks_checks_points(tiny_sam) -> None:
    encoding = encode_image(tiny_sam, _image())
    with pytest.raises(ValueError, match="point_labels must be given"):
        decode_masks(tiny_sam, encoding, points=np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match=r"points must be \(N, P, 2\)"):
        decode_masks(tiny_sam, encoding, points=np.zeros((1, 2)), point_labels=np.ones((1, 1)))


def test_tiny_detector_loads_and_detects(tmp_path) -> None:
    from llmseg_ros.tiny.detector import save_tiny_grounding_dino

    path = save_tiny_grounding_dino(tmp_path / "gd", seed=0)
    detector = GroundingDetector.load(str(path), device=torch.device("cpu"))
    image = _image(120, 160)
    dets = detector.detect(image, "red stool", box_threshold=0.0, text_threshold=0.0)
    assert dets.boxes.shape[1] == 4 and len(dets.boxes) == len(dets.scores) == len(dets.labels) > 0
    assert (dets.boxes[:, [0, 2]] <= 160).all() and (dets.boxes[:, [1, 3]] <= 120).all()
    assert (dets.boxes >= 0).all()
    # the threshold filters: nothing passes a threshold above every score
    strict = detector.detect(image, "red stool", box_threshold=float(dets.scores.max()) + 1e-3)
    assert len(strict.boxes) == 0
    assert len(detector.detect(image, "").boxes) == 0


def test_detector_missing_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"detector directory .* not found"):
        GroundingDetector.load(str(tmp_path / "absent"), device=torch.device("cpu"))
