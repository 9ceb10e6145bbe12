"""``vlm_grounding``: a chat VLM names boxes (and points), SAM turns them into masks.

Training-free two-stage reasoning segmentation (the Seg-Zero recipe without its RL
training): the VLM reasons briefly about the instruction and answers with a JSON list
of objects ``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], "label": ...}`` in its own
coordinate convention (Qwen2.5-VL: absolute pixels of its resized input). The answer is
parsed (:func:`~llmseg_ros.methods.parsing.parse_boxes`), mapped back to the original
image (:mod:`~llmseg_ros.models.coords`), and every object prompts SAM:

* a box (with the object's points that lie inside it as positive clicks) →
  ``multimask_output=False``, SAM's single mask for an unambiguous prompt;
* points only → ``multimask_output=True`` and the mask with the best predicted IoU.

The result is the union of those masks. An answer without objects ("[]", "no such
object") is a valid, empty result.

Per frame, ``prepare`` runs SAM's image encoder once
(:func:`~llmseg_ros.models.sam_prompting.encode_image`) and keeps the encoding in
``FrameFeatures.cache["vlm_grounding_sam"]``; every instruction on that frame reuses it.
The encoding is a value, not predictor state, so frames can be answered in any order and
from several threads; masks and scores are those of ``segment_anything.SamPredictor``.

Confidence (``SegmentResult.confidence``): the mean of SAM's predicted IoU over the
non-empty masks that form the result, clipped to [0, 1]; 0.0 when the result is empty.
It measures how clean the masks are, not whether the VLM picked the right object.

``SegmentResult.extras``: ``reasoning`` (the explanation), ``boxes`` (XYXY original
pixels, one per prompted object), ``points`` (per object, XY original pixels),
``labels``, ``sam_scores`` (per object), ``raw_text`` (the VLM's full answer),
``coordinate_convention`` and ``model_input_size`` ((H, W) the VLM saw).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.methods.common import prepare_sam_frame, proposal_free_result
from llmseg_ros.methods.parsing import GroundedObject, extract_reasoning, parse_boxes
from llmseg_ros.models.coords import map_boxes, map_points
from llmseg_ros.models.sam_prompting import SamImageEncoding, decode_masks, encode_image
from llmseg_ros.types import FrameFeatures, SegmentResult
from llmseg_ros.utils.imageio import check_rgb_image

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.models.chat_vlm import ChatOutput, ChatVLM

SAM_CACHE_KEY = "vlm_grounding_sam"

_COORDINATE_HINTS = {
    "absolute_resized": "Coordinates are absolute pixel positions in the image (x to the right, y down).",
    "normalized_1000": (
        "Coordinates are integers from 0 to 1000 relative to the image size "
        "(0 is the left or top edge, 1000 the right or bottom edge)."
    ),
    "relative_0_1": (
        "Coordinates are fractions of the image width and height between 0 and 1, with 3 decimals "
        "(0 is the left or top edge, 1 the right or bottom edge)."
    ),
}


def grounding_prompt(instruction: str, convention: str) -> str:
    """The user turn asking for brief reasoning and a JSON list of boxes (+ points)."""
    if convention not in _COORDINATE_HINTS:
        raise ValueError(f"convention must be one of {sorted(_COORDINATE_HINTS)}, got {convention!r}")
    return (
        f'Request: "{instruction}"\n'
        "Find every object in the image that this request refers to. First explain briefly, in one or "
        "two sentences, what the request refers to. Then give the answer as a JSON list in a ```json "
        'code block, one entry per object: {"bbox_2d": [x1, y1, x2, y2], "point_2d": [x, y], '
        '"label": "<name>"}, where (x1, y1) is the top-left and (x2, y2) the bottom-right corner of the '
        "box and point_2d is a point on the object. "
        f"{_COORDINATE_HINTS[convention]} "
        "If nothing in the image matches the request, answer with an empty list []."
    )


class VLMGroundingMethod:
    """Chat VLM boxes/points → SAM masks → union (see the module docstring)."""

    name = "vlm_grounding"

    def __init__(self, chat_vlm: ChatVLM, sam: Sam, *, max_new_tokens: int = 256) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.chat_vlm = chat_vlm
        self.sam = sam
        self.max_new_tokens = max_new_tokens

    def _predict(
        self, encoding: SamImageEncoding, box: np.ndarray | None, points: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """One object's mask ((H, W) bool) and SAM's predicted IoU for it.

        A box (with its points as positive clicks) gives SAM's single mask; points alone
        give the best of its three masks by predicted IoU.
        """
        logits, iou = decode_masks(
            self.sam,
            encoding,
            boxes=None if box is None else box[None],
            points=points[None] if len(points) else None,
            point_labels=np.ones((1, len(points)), dtype=np.int64) if len(points) else None,
            multimask_output=box is None,
        )
        scores = iou[0].float().cpu().numpy()  # (M,)
        best = int(np.argmax(scores))
        return (logits[0, best] > self.sam.mask_threshold).cpu().numpy(), float(scores[best])

    # -- per frame --------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> FrameFeatures:
        """SAM's image embedding of the frame (no proposals)."""
        check_rgb_image(image)
        return prepare_sam_frame(self.sam, image, SAM_CACHE_KEY)

    # -- per instruction --------------------------------------------------------------------
    def _objects_in_image(
        self, objects: list[GroundedObject], output: ChatOutput
    ) -> list[tuple[np.ndarray | None, np.ndarray, str | None]]:
        """(box XYXY or None, points (P, 2), label) in original pixels; unusable objects dropped."""
        convention = self.chat_vlm.coordinate_convention
        input_size, image_size, content = output.input_size, output.image_size, output.content_box
        out: list[tuple[np.ndarray | None, np.ndarray, str | None]] = []
        for obj in objects:
            box: np.ndarray | None = None
            if obj.box is not None:
                mapped, kept = map_boxes(
                    np.array([obj.box]),
                    convention=convention,
                    input_size=input_size,
                    image_size=image_size,
                    content_box=content,
                )
                if len(kept) == 0 and not obj.points:
                    continue
                box = mapped[0] if len(kept) else None
            points = np.zeros((0, 2), dtype=np.float32)
            if obj.points:
                points, _ = map_points(
                    np.array(obj.points),
                    convention=convention,
                    input_size=input_size,
                    image_size=image_size,
                    content_box=content,
                )
                if box is not None and len(points):  # clicks outside the object's box are dropped
                    inside = (
                        (points[:, 0] >= box[0])
                        & (points[:, 0] <= box[2])
                        & (points[:, 1] >= box[1])
                        & (points[:, 1] <= box[3])
                    )
                    points = points[inside]
            if box is None and len(points) == 0:
                continue
            out.append((box, points, obj.label))
        return out

    @torch.inference_mode()
    def segment(self, frame: FrameFeatures, request: SegmentRequest) -> SegmentResult:
        timings: dict[str, float] = {}
        encoding = frame.cache.get(SAM_CACHE_KEY)
        if encoding is None:
            t0 = time.perf_counter()
            encoding = encode_image(self.sam, frame.image)
            frame.cache[SAM_CACHE_KEY] = encoding
            timings["sam_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        output = self.chat_vlm.generate(
            frame.image,
            grounding_prompt(request.instruction, self.chat_vlm.coordinate_convention),
            max_new_tokens=self.max_new_tokens,
            history=list(request.history),
        )
        t1 = time.perf_counter()
        objects = self._objects_in_image(parse_boxes(output.text), output)
        reasoning = extract_reasoning(output.text)
        height, width = frame.image_size
        mask = np.zeros((height, width), dtype=bool)
        scores: list[float] = []
        kept_scores: list[float] = []
        for box, points, _ in objects:
            obj_mask, score = self._predict(encoding, box, points)
            scores.append(score)
            if obj_mask.any():
                mask |= obj_mask
                kept_scores.append(score)
        t2 = time.perf_counter()
        timings.update({"vlm": t1 - t0, "sam_decoder": t2 - t1})
        confidence = float(np.clip(np.mean(kept_scores), 0.0, 1.0)) if kept_scores else 0.0
        extras: dict[str, Any] = {
            "reasoning": reasoning,
            "boxes": [
                [round(float(v), 2) for v in box] if box is not None else None for box, _, _ in objects
            ],
            "points": [[[round(float(x), 2), round(float(y), 2)] for x, y in pts] for _, pts, _ in objects],
            "labels": [label for _, _, label in objects],
            "sam_scores": [round(s, 4) for s in scores],
            "raw_text": output.text,
            "coordinate_convention": self.chat_vlm.coordinate_convention,
            "model_input_size": list(output.input_size),
        }
        return proposal_free_result(
            self.name, mask, confidence, answer=reasoning, timings=timings, extras=extras
        )
