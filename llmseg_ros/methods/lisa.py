"""LISA (embedding-as-mask): the ``<SEG>`` embedding prompts SAM's mask decoder.

``<SEG>`` hidden state → text projection (h→h→256, LISA's ``text_hidden_fcs``) → appended
to SAM's (empty) sparse prompt tokens → SAM mask decoder, single-mask output → SAM's own
post-processing to the frame's resolution → mask = logits > 0.

Per frame (cached): SAM's image embedding and the VLM's image-prefix cache.
Confidence: SAM's IoU prediction for the mask, clipped to [0, 1].
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.methods.common import (
    frame_sam_encoding,
    load_state,
    prepare_sam_frame,
    proposal_free_result,
    query_seg_hidden,
    trained_weights_and_vlm,
)
from llmseg_ros.models.heads import LisaMaskHead
from llmseg_ros.types import FrameFeatures, SegmentResult

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.models.components import Components
    from llmseg_ros.models.vlm import SegVLM


class LisaMethod:
    """LISA inference on loaded models (see the module docstring)."""

    name = "lisa"

    def __init__(self, sam: Sam, vlm: SegVLM, head: LisaMaskHead) -> None:
        self.sam = sam
        self.vlm = vlm
        self.head = head.eval()
        self._prefix_lock = threading.Lock()

    @classmethod
    def from_components(cls, components: Components) -> LisaMethod:
        weights, vlm = trained_weights_and_vlm(components, "lisa")
        sam = components.sam()
        head = LisaMaskHead(sam, vlm.hidden_size)
        load_state(head.projection, weights, "projection", components.config.weights_dir)
        if "mask_decoder" in weights.state_dicts:  # else SAM's own decoder (zero-shot)
            load_state(head.mask_decoder, weights, "mask_decoder", components.config.weights_dir)
        head.to(components.device)
        return cls(sam, vlm, head)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> FrameFeatures:
        return prepare_sam_frame(self.sam, image)

    @torch.inference_mode()
    def segment(self, frame: FrameFeatures, request: SegmentRequest) -> SegmentResult:
        encoding = frame_sam_encoding(frame, self.name)
        timings: dict[str, float] = {}
        answer, hidden = query_seg_hidden(self.vlm, frame, request, timings, self._prefix_lock)
        t1 = time.perf_counter()
        logits, iou = self.head(encoding, hidden.reshape(1, -1).to(encoding.embedding.device))
        mask = (logits[0] > self.sam.mask_threshold).cpu().numpy()
        sam_iou = float(iou[0])
        timings["sam_decoder"] = time.perf_counter() - t1
        return proposal_free_result(
            self.name,
            mask,
            float(np.clip(sam_iou, 0.0, 1.0)),
            answer=answer,
            timings=timings,
            extras={"sam_iou_prediction": sam_iou},
        )
