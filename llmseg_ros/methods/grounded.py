"""The training-free "VLM + GroundingSAM" baseline (LLM-Seg paper, Table 1).

1. The VLM answers the instruction with a short phrase ("… Please answer the question
   using a word or phrase.").
2. An open-vocabulary detector (Grounding DINO through ``transformers``) grounds the
   phrase: boxes above ``box_threshold`` (and ``text_threshold`` for the phrase tokens).
3. SAM is prompted with each box (single-mask output); the masks are united.

Every intermediate result (answer, phrase, boxes, detector scores, SAM scores) is in
``SegmentResult.extras``. Confidence: the highest detector score among kept boxes (0
when nothing was detected: the "no such object" answer).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.methods.common import frame_sam_encoding, prepare_sam_frame, proposal_free_result
from llmseg_ros.models.detector import GroundingDetector
from llmseg_ros.models.sam_prompting import decode_masks
from llmseg_ros.types import FrameFeatures, SegmentResult

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.models.chat_vlm import ChatVLM
    from llmseg_ros.models.components import Components

PHRASE_SUFFIX = "Please answer the question using a word or phrase."

_LEAD_INS = re.compile(
    r"^(?:sure[,!.]?\s*)?(?:(?:the\s+)?answer\s+is|it\s+is|it's|this\s+is|that\s+is|these\s+are|"
    r"they\s+are|you\s+(?:could|can|should)\s+use|i\s+(?:would|could)\s+use|use)\s*[:,]?\s+",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:a|an|the|some)\s+", re.IGNORECASE)


def grounding_prompt(instruction: str) -> str:
    """The VLM prompt of the baseline: the instruction plus the short-answer request."""
    return f"{instruction.strip()} {PHRASE_SUFFIX}"


def extract_phrase(answer: str) -> str:
    """The noun phrase in a short VLM answer, lower-cased, for the detector.

    Drops ``<SEG>`` and role tags, keeps the first sentence/line, strips lead-ins ("It is",
    "The answer is", "You could use"), quotes, trailing punctuation and a leading article.
    Returns "" when nothing is left.

    >>> extract_phrase("It is the red stool.")
    'red stool'
    """
    text = answer.replace("<SEG>", " ")
    text = re.sub(r"^\s*(?:ASSISTANT|assistant|A)\s*:\s*", "", text)
    text = text.strip().split("\n", 1)[0]
    text = re.split(r"(?<=[a-zA-Z0-9\"')\]])[.!?;](?:\s|$)", text, maxsplit=1)[0]
    text = text.strip().strip("\"'`*").strip()
    for _ in range(2):
        text = _LEAD_INS.sub("", text).strip()
    text = _ARTICLE.sub("", text)
    text = re.sub(r"\s+", " ", text).strip(" .,:;!?\"'`*").lower()
    return text


def boxes_to_mask(sam: Sam, encoding: Any, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prompt SAM with each box; returns the union mask (H, W) bool and SAM's IoU per box."""
    h, w = encoding.original_size
    if len(boxes) == 0:
        return np.zeros((h, w), dtype=bool), np.zeros(0, np.float32)
    logits, iou = decode_masks(sam, encoding, boxes=boxes, multimask_output=False)
    masks = (logits[:, 0] > sam.mask_threshold).cpu().numpy()
    return masks.any(axis=0), iou[:, 0].float().cpu().numpy()


class GroundedMethod:
    """VLM phrase → Grounding DINO boxes → SAM masks → union (see the module docstring)."""

    name = "grounded"

    def __init__(
        self,
        chat_vlm: ChatVLM,
        detector: GroundingDetector,
        sam: Sam,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        max_new_tokens: int = 24,
    ) -> None:
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.chat_vlm = chat_vlm
        self.detector = detector
        self.sam = sam
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_components(cls, components: Components) -> GroundedMethod:
        return cls(components.chat_vlm(), components.detector(), components.sam())

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> FrameFeatures:
        return prepare_sam_frame(self.sam, image)

    @torch.inference_mode()
    def segment(self, frame: FrameFeatures, request: SegmentRequest) -> SegmentResult:
        encoding = frame_sam_encoding(frame, self.name)
        t0 = time.perf_counter()
        output = self.chat_vlm.generate(
            frame.image,
            grounding_prompt(request.instruction),
            max_new_tokens=self.max_new_tokens,
            history=request.history,
        )
        phrase = extract_phrase(output.text)
        t1 = time.perf_counter()
        detections = self.detector.detect(
            frame.image, phrase, box_threshold=self.box_threshold, text_threshold=self.text_threshold
        )
        t2 = time.perf_counter()
        mask, sam_iou = boxes_to_mask(self.sam, encoding, detections.boxes)
        t3 = time.perf_counter()
        return proposal_free_result(
            self.name,
            mask,
            float(detections.scores.max()) if len(detections.scores) else 0.0,
            answer=output.text,
            timings={"vlm": t1 - t0, "detector": t2 - t1, "sam_decoder": t3 - t2},
            extras={
                "phrase": phrase,
                "boxes": detections.boxes.round(2).tolist(),
                "detector_scores": detections.scores.round(4).tolist(),
                "labels": detections.labels,
                "sam_scores": sam_iou.round(4).tolist(),
            },
        )
