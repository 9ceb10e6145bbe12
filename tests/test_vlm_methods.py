"""vlm_grounding and vlm_marks end to end on CPU with tiny random Qwen2.5-VL / LLaVA and SAM.

Random VLMs write gibberish, so every method runs twice: once on the real generated text
(the whole path must hold up), and once with a scripted answer text on top of the real
model call (so boxes, numbers, SAM prompts and unions can be checked exactly)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmseg_ros.methods.base import SegmentationMethod, SegmentRequest
from llmseg_ros.methods.vlm_grounding import SAM_CACHE_KEY, VLMGroundingMethod
from llmseg_ros.methods.vlm_marks import (
    MARKS_IMAGE_KEY,
    MARKS_LAYOUT_KEY,
    ZOOM_IMAGE_KEY,
    ZOOM_LAYOUT_KEY,
    VLMMarksMethod,
)
from llmseg_ros.models.chat_vlm import ChatOutput, ChatVLM
from llmseg_ros.types import Proposals

CPU = torch.device("cpu")


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """The tiny random SAM (segment_anything architecture), saved and loaded through build_sam."""
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.tiny.sam import save_tiny_sam

    path = save_tiny_sam(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", seed=0)
    return build_sam("tiny", path, CPU)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    from llmseg_ros.tiny.qwen import save_tiny_qwen2_5_vl
    from llmseg_ros.tiny.vlm import save_tiny_llava

    root = tmp_path_factory.mktemp("vlms")
    return {
        "qwen": save_tiny_qwen2_5_vl(root / "qwen", seed=0),
        "llava": save_tiny_llava(root / "llava", seed=0),
    }


@pytest.fixture(scope="module", params=["qwen", "llava"])
def chat(request, vlm_dirs) -> ChatVLM:
    return ChatVLM.load(str(vlm_dirs[request.param]), device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen_chat(vlm_dirs) -> ChatVLM:
    return ChatVLM.load(str(vlm_dirs["qwen"]), device=CPU, dtype=torch.float32)


@pytest.fixture
def scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, size=(96, 128, 3), dtype=np.uint8)
    image[20:60, 30:80] = (200, 40, 40)
    return image


class Scripted:
    """Replaces the answer text of real ChatVLM calls and records what was asked."""

    def __init__(self, vlm: ChatVLM, answers: list[str]) -> None:
        self.vlm = vlm
        self.answers = list(answers)
        self.calls: list[tuple[np.ndarray, str, list[tuple[str, str]] | None]] = []

    def __call__(self, image, prompt, *, max_new_tokens=256, history=None) -> ChatOutput:
        real = ChatVLM.generate(self.vlm, image, prompt, max_new_tokens=1, history=history)
        self.calls.append((image, prompt, history))
        return dataclasses.replace(real, text=self.answers.pop(0))


class FixedProposals:
    """Proposal stage stand-in: a wall (left half), a disc, a box and a 3x3 speck."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, image: np.ndarray) -> Proposals:
        self.calls += 1
        h, w = image.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        masks = np.stack(
            [
                xx < w // 2,
                (xx - 95) ** 2 + (yy - 30) ** 2 < 14**2,
                (xx >= 80) & (xx < 120) & (yy >= 60) & (yy < 90),
                (xx >= 100) & (xx < 103) & (yy >= 70) & (yy < 73),
            ]
        )
        k = len(masks)
        return Proposals(
            masks=masks,
            predicted_iou=np.full(k, 0.9, np.float32),
            stability_score=np.full(k, 0.95, np.float32),
            boxes=np.zeros((k, 4), np.float32),
            point_coords=np.zeros((k, 2), np.float32),
        )


def _reference_union(sam, image, prompts) -> tuple[np.ndarray, list[float]]:
    """segment_anything.SamPredictor directly: one mask per (box, points) prompt, unioned."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    union = np.zeros(image.shape[:2], bool)
    scores = []
    for box, points in prompts:
        masks, iou, _ = predictor.predict(
            point_coords=points if points is not None else None,
            point_labels=np.ones(len(points)) if points is not None else None,
            box=box,
            multimask_output=box is None,
        )
        best = int(np.argmax(iou))
        union |= masks[best]
        scores.append(float(iou[best]))
    return union, scores


# -- vlm_grounding ---------------------------------------------------------------------------
def test_grounding_end_to_end_on_generated_text(chat, tiny_sam, scene) -> None:
    method = VLMGroundingMethod(chat, tiny_sam, max_new_tokens=12)
    assert isinstance(method, SegmentationMethod) and method.name == "vlm_grounding"
    frame = method.prepare(scene)
    assert len(frame.proposals) == 0 and frame.proposals.image_size == (96, 128)
    assert SAM_CACHE_KEY in frame.cache and "sam_encoder" in frame.timings
    result = method.segment(frame, SegmentRequest("where could I put my cup?"))
    assert result.method == "vlm_grounding" and result.mask.shape == (96, 128) and result.mask.dtype == bool
    assert 0.0 <= result.confidence <= 1.0
    assert set(result.extras) >= {"reasoning", "boxes", "points", "sam_scores", "raw_text"}
    assert result.answer == result.extras["reasoning"]
    json.dumps(result.extras)
    assert {"vlm", "sam_decoder"} <= set(result.timings)


# (family → model-convention answer box, the same box in original 96x128 pixels)
GROUNDING_BOXES = {
    # Qwen2.5-VL: input 84x140 (smart_resize, factor 28); x * 128/140, y * 96/84
    "qwen": ("[14, 7, 70, 42]", [12.8, 8.0, 64.0, 48.0], "[42, 21]", [38.4, 24.0]),
    # LLaVA: padded to 128x128 (16-px bands), resized to 64x64 → content box (0, 8, 64, 56)
    "llava": ("[0.25, 0.25, 0.5, 0.75]", [32.0, 16.0, 64.0, 80.0], "[0.375, 0.5]", [48.0, 48.0]),
}


def test_grounding_maps_boxes_and_prompts_sam_like_the_predictor(chat, tiny_sam, scene, monkeypatch) -> None:
    family = "qwen" if chat.family == "qwen2_5_vl" else "llava"
    box_text, box, point_text, point = GROUNDING_BOXES[family]
    answer = (
        "The red block is where a cup can stand.\n```json\n"
        f'[{{"bbox_2d": {box_text}, "point_2d": {point_text}, "label": "block"}}]\n```'
    )
    scripted = Scripted(chat, [answer])
    monkeypatch.setattr(chat, "generate", scripted)
    method = VLMGroundingMethod(chat, tiny_sam)
    frame = method.prepare(scene)
    history = [("what is red?", "the block")]
    result = method.segment(frame, SegmentRequest("where could I put my cup?", history=history))
    np.testing.assert_allclose(result.extras["boxes"], [box], atol=0.01)
    np.testing.assert_allclose(result.extras["points"], [[point]], atol=0.01)
    assert result.extras["labels"] == ["block"]
    assert result.extras["reasoning"] == "The red block is where a cup can stand."
    assert scripted.calls[0][2] == history and "where could I put my cup?" in scripted.calls[0][1]
    expected, scores = _reference_union(
        tiny_sam, scene, [(np.array(box, np.float32), np.array([point], np.float32))]
    )
    assert expected.any() and not expected.all(), "the tiny SAM must give a non-trivial mask here"
    np.testing.assert_array_equal(result.mask, expected)
    assert result.extras["sam_scores"] == pytest.approx(scores, abs=1e-4)
    assert result.confidence == pytest.approx(float(np.clip(scores[0], 0, 1)), abs=1e-4)


def test_grounding_no_object_and_points_only(chat, tiny_sam, scene, monkeypatch) -> None:
    family = "qwen" if chat.family == "qwen2_5_vl" else "llava"
    _, _, point_text, point = GROUNDING_BOXES[family]
    scripted = Scripted(chat, ["There is no such object in the image. []", f'[{{"point_2d": {point_text}}}]'])
    monkeypatch.setattr(chat, "generate", scripted)
    method = VLMGroundingMethod(chat, tiny_sam)
    frame = method.prepare(scene)
    empty = method.segment(frame, SegmentRequest("a giraffe"))
    assert empty.is_empty and empty.confidence == 0.0 and empty.extras["boxes"] == []
    assert empty.answer == "There is no such object in the image."
    points_only = method.segment(frame, SegmentRequest("the block"))
    assert points_only.extras["boxes"] == [None]
    expected, _ = _reference_union(tiny_sam, scene, [(None, np.array([point], np.float32))])
    np.testing.assert_array_equal(points_only.mask, expected)


def test_grounding_reuses_the_frame_encoding_in_any_order(qwen_chat, tiny_sam, scene, monkeypatch) -> None:
    chat = qwen_chat
    answer = '[{"bbox_2d": [14, 7, 70, 42]}]'
    monkeypatch.setattr(chat, "generate", Scripted(chat, [answer] * 3))
    method = VLMGroundingMethod(chat, tiny_sam)
    other = np.ascontiguousarray(scene[::-1, ::-1])
    first = method.prepare(scene)
    second = method.prepare(other)
    calls = []
    for module in ("llmseg_ros.methods.vlm_grounding", "llmseg_ros.models.sam_prompting"):
        monkeypatch.setattr(f"{module}.encode_image", lambda *a, **k: calls.append(a))
    on_first = method.segment(first, SegmentRequest("block"))
    on_second = method.segment(second, SegmentRequest("block"))
    again = method.segment(first, SegmentRequest("block"))
    assert calls == [], "segment must reuse the cached encoding"
    reference, _ = _reference_union(tiny_sam, scene, [(np.array([12.8, 8.0, 64.0, 48.0], np.float32), None)])
    np.testing.assert_array_equal(on_first.mask, reference)
    np.testing.assert_array_equal(again.mask, reference)
    reference_other, _ = _reference_union(
        tiny_sam, other, [(np.array([12.8, 8.0, 64.0, 48.0], np.float32), None)]
    )
    np.testing.assert_array_equal(on_second.mask, reference_other)


def test_grounding_rejects_bad_arguments(qwen_chat, tiny_sam) -> None:
    chat = qwen_chat
    with pytest.raises(ValueError, match="max_new_tokens"):
        VLMGroundingMethod(chat, tiny_sam, max_new_tokens=0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        VLMGroundingMethod(chat, tiny_sam).prepare(np.zeros((8, 8), np.uint8))


# -- vlm_marks ---------------------------------------------------------------------------------
def test_marks_end_to_end_on_generated_text(chat, scene) -> None:
    source = FixedProposals()
    method = VLMMarksMethod(chat, source, max_new_tokens=8)
    assert isinstance(method, SegmentationMethod) and method.name == "vlm_marks"
    frame = method.prepare(scene)
    assert source.calls == 1 and len(frame.proposals) == 4
    marked = frame.cache[MARKS_IMAGE_KEY]
    assert marked.shape == scene.shape and marked.dtype == np.uint8
    assert frame.cache[MARKS_LAYOUT_KEY].labels == {1: 0, 2: 1, 3: 2, 4: 3}
    result = method.segment(frame, SegmentRequest("the red block"))
    assert result.method == "vlm_marks" and result.mask.shape == (96, 128) and result.num_proposals == 4
    assert all(0 <= i < 4 for i in result.selected)
    assert result.similarity.shape == (4,) and result.iop.shape == (4,)
    json.dumps(result.extras)
    assert result.extras["label_to_proposal"] == {"1": 0, "2": 1, "3": 2, "4": 3}
    assert source.calls == 1, "proposals are computed once per frame"


def test_marks_selects_the_named_proposals(chat, scene, monkeypatch) -> None:
    scripted = Scripted(chat, ["The disc is round. Answer: 2", "Marks 2 and 9", "Answer: none"])
    monkeypatch.setattr(chat, "generate", scripted)
    method = VLMMarksMethod(chat, FixedProposals(), zoom_small=False)
    frame = method.prepare(scene)
    assert frame.cache[ZOOM_LAYOUT_KEY] is None
    result = method.segment(frame, SegmentRequest("something round"))
    assert result.selected == [1] and result.extras["marks"] == [2]
    np.testing.assert_array_equal(result.mask, frame.proposals.masks[1])
    assert result.confidence == 1.0 and result.answer == "The disc is round. Answer: 2"
    np.testing.assert_array_equal(scripted.calls[0][0], frame.cache[MARKS_IMAGE_KEY])
    assert "4 numbered regions" in scripted.calls[0][1]
    half = method.segment(frame, SegmentRequest("something round"))
    assert half.selected == [1] and half.confidence == 0.5  # 9 is not a mark
    none = method.segment(frame, SegmentRequest("a giraffe"))
    assert none.is_empty and none.selected == [] and none.confidence == 0.0


def test_marks_zoom_pass_decides_tiny_regions(chat, scene, monkeypatch) -> None:
    method = VLMMarksMethod(chat, FixedProposals(), zoom_small=True)
    frame = method.prepare(scene)
    zoom_layout = frame.cache[ZOOM_LAYOUT_KEY]
    assert zoom_layout is not None and 4 in zoom_layout.labels and zoom_layout.labels[4] == 3
    # first pass names the speck (4) and the wall (1): the zoomed pass decides the speck
    scripted = Scripted(chat, ["Answer: 1 and 4", "Answer: none"])
    monkeypatch.setattr(chat, "generate", scripted)
    result = method.segment(frame, SegmentRequest("dust"))
    assert len(scripted.calls) == 2
    np.testing.assert_array_equal(scripted.calls[1][0], frame.cache[ZOOM_IMAGE_KEY])
    assert result.extras["marks_zoom"] == [] and result.extras["marks"] == [1] and result.selected == [0]
    # first pass names nothing: the zoomed pass may find the speck
    scripted = Scripted(chat, ["Answer: none", "Answer: 4"])
    monkeypatch.setattr(chat, "generate", scripted)
    result = method.segment(frame, SegmentRequest("dust"))
    assert result.selected == [3]
    np.testing.assert_array_equal(result.mask, frame.proposals.masks[3])
    # first pass names only large regions: no second pass
    scripted = Scripted(chat, ["Answer: 3"])
    monkeypatch.setattr(chat, "generate", scripted)
    result = method.segment(frame, SegmentRequest("the box"))
    assert len(scripted.calls) == 1 and result.selected == [2] and result.extras["raw_text_zoom"] is None


def test_marks_limits_and_checks(qwen_chat, scene) -> None:
    chat = qwen_chat
    method = VLMMarksMethod(chat, FixedProposals(), max_marks=2, zoom_small=False)
    frame = method.prepare(scene)
    assert frame.cache[MARKS_LAYOUT_KEY].labels == {1: 0, 2: 1}

    class WrongSize(FixedProposals):
        def generate(self, image: np.ndarray) -> Proposals:
            return super().generate(image[:10])

    with pytest.raises(ValueError, match="expected masks at the image's resolution"):
        VLMMarksMethod(chat, WrongSize()).prepare(scene)
    with pytest.raises(ValueError, match="max_marks"):
        VLMMarksMethod(chat, FixedProposals(), max_marks=0)

    class Nothing:
        def generate(self, image: np.ndarray) -> Proposals:
            return Proposals.empty(*image.shape[:2])

    empty_method = VLMMarksMethod(chat, Nothing())
    result = empty_method.segment(empty_method.prepare(scene), SegmentRequest("anything"))
    assert result.is_empty and result.num_proposals == 0 and result.extras["raw_text"] == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_methods_on_cuda_in_bfloat16(vlm_dirs, tiny_sam, scene) -> None:
    cuda = torch.device("cuda")
    chat = ChatVLM.load(str(vlm_dirs["qwen"]), device=cuda, dtype=torch.bfloat16)
    assert next(chat.model.parameters()).device.type == "cuda"
    grounding = VLMGroundingMethod(chat, tiny_sam.to(cuda), max_new_tokens=8)
    result = grounding.segment(grounding.prepare(scene), SegmentRequest("the block"))
    assert result.mask.shape == (96, 128)
    marks = VLMMarksMethod(chat, FixedProposals(), max_new_tokens=8)
    result = marks.segment(marks.prepare(scene), SegmentRequest("the block"))
    assert result.mask.shape == (96, 128)
    tiny_sam.to(CPU)
