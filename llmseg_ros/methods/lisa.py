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
from torch import nn

from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.methods.common import (
    frame_sam_encoding,
    load_state,
    prepare_sam_frame,
    proposal_free_result,
    query_seg_hidden,
    trained_weights_and_vlm,
)
from llmseg_ros.sam_prompting import SamImageEncoding, decode_masks
from llmseg_ros.types import FrameFeatures, SegmentResult

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.components import Components
    from llmseg_ros.vlm import SegVLM


class LisaMaskHead(nn.Module):
    """The trainable part of LISA: text projection + a copy of SAM's mask decoder.

    SAM itself (image encoder, prompt encoder) stays frozen and shared: it is held by
    reference, not registered as a submodule, so ``state_dict()`` / ``parameters()`` of
    this head are exactly what LISA trains and what the weights directory stores.
    """

    def __init__(self, sam: Sam, hidden_size: int) -> None:
        super().__init__()
        import copy

        from llmseg_ros.heads import TextProjection

        self._sam = [sam]  # a list keeps SAM out of this module's parameters
        self.projection = TextProjection(hidden_size, sam.prompt_encoder.embed_dim)
        self.mask_decoder = copy.deepcopy(sam.mask_decoder)

    @property
    def sam(self) -> Sam:
        return self._sam[0]

    def forward(
        self, encoding: SamImageEncoding, seg_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for one frame.

        Args:
            encoding: the frame's SAM encoding.
            seg_hidden: (N, hidden) ``<SEG>`` hidden states (N prompts on this frame).
        Returns:
            logits (N, H, W) at the frame's resolution and IoU predictions (N,).
        """
        text = self.projection(seg_hidden.float()).unsqueeze(1)  # (N, 1, 256)
        logits, iou = decode_masks(
            self.sam, encoding, extra_sparse=text, multimask_output=False, mask_decoder=self.mask_decoder
        )
        return logits[:, 0], iou[:, 0]

    def trainable_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the weights directory stores for LISA: projection and mask decoder."""
        return {"projection": self.projection.state_dict(), "mask_decoder": self.mask_decoder.state_dict()}


LISA_BCE_WEIGHT = 2.0
LISA_DICE_WEIGHT = 0.5


def lisa_mask_loss(
    logits: torch.Tensor,
    gt_masks: torch.Tensor,
    bce_weight: float = LISA_BCE_WEIGHT,
    dice_weight: float = LISA_DICE_WEIGHT,
) -> dict[str, torch.Tensor]:
    """LISA's mask loss: ``bce_weight · BCE + dice_weight · Dice`` (LM loss added by the caller).

    Args:
        logits: (N, H, W) mask logits at the ground truth's resolution.
        gt_masks: (N, H, W) uint8/bool ground truth with 0/1, and 255 = ignore. Ignored
            pixels are taken out of both terms (logit forced to a large negative value,
            target 0, so they add nothing to BCE or Dice; they still count in BCE's
            per-pixel mean).
    Returns:
        dict with ``total`` (weighted), ``bce`` and ``dice`` (unweighted), all scalars.
    """
    from llmseg_ros.losses import dice_loss, sigmoid_bce_loss

    if logits.shape != gt_masks.shape:
        raise ValueError(
            f"gt_masks must have the shape of logits {tuple(logits.shape)}, got {tuple(gt_masks.shape)}"
        )
    gt = gt_masks.to(logits.device)
    valid = gt != 255
    targets = ((gt == 1) & valid).float()
    masked_logits = torch.where(valid, logits.float(), torch.full_like(logits.float(), -1e4))
    bce = sigmoid_bce_loss(masked_logits, targets)
    dice = dice_loss(masked_logits, targets)
    return {"total": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}


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
            head.mask_decoder.load_state_dict(weights.state_dicts["mask_decoder"])
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
