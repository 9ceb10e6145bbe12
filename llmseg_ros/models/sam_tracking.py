"""SAM prompted with the previous frame's mask: one step of mask propagation.

The step runs SAM's prompt encoder and mask decoder on the new frame's cached image
encoding (:class:`~llmseg_ros.models.sam_prompting.SamImageEncoding`) with a box, point
prompts and the previous low-resolution mask logits as the dense prompt (SAM's
``mask_input``, as ``SamPredictor.predict`` takes it), and returns the new mask with
the scores a tracker needs: SAM's predicted IoU and the mask's stability score
(``segment_anything.utils.amg.calculate_stability_score`` on the low-resolution logits).

A track that starts from a binary mask (any method's answer) has no logits yet:
:func:`mask_prompt_from_mask` turns the mask into low-resolution logits of
±``MASK_PROMPT_LOGIT`` in SAM's padded input frame (SAM 2 converts binary mask prompts
with the same ±10 scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import calculate_stability_score

from llmseg_ros.models.sam_prompting import SamImageEncoding, decode_low_res

MASK_PROMPT_LOGIT = 10.0
STABILITY_OFFSET = 1.0


@dataclass
class SamPropagation:
    """One propagated mask.

    Attributes:
        mask: (H, W) bool at the frame's resolution.
        low_res: (1, 1, 4h, 4w) float32 mask logits in SAM's padded input frame (the
            next step's dense prompt).
        predicted_iou: SAM's IoU prediction for the mask (unclipped).
        stability: stability score in [0, 1] (IoU of the mask thresholded at
            ±``STABILITY_OFFSET`` logits; 0 when both are empty).
    """

    mask: np.ndarray
    low_res: torch.Tensor
    predicted_iou: float
    stability: float


def low_res_size(encoding: SamImageEncoding) -> int:
    """Side of SAM's low-resolution masks for this encoding (4 × the embedding's side)."""
    return int(encoding.embedding.shape[-1]) * 4


def mask_prompt_from_mask(sam: Sam, encoding: SamImageEncoding, mask: np.ndarray) -> torch.Tensor:
    """A binary mask as SAM's dense prompt for frames with ``encoding``'s geometry.

    Args:
        mask: (H, W) bool at ``encoding.original_size``.
    Returns:
        (1, 1, 4h, 4w) float32 logits on the encoding's device: +``MASK_PROMPT_LOGIT``
        inside, -``MASK_PROMPT_LOGIT`` outside, the area fraction in between at edges.
    """
    if mask.shape != encoding.original_size:
        raise ValueError(f"mask has shape {mask.shape}, but the frame is {encoding.original_size} (H, W)")
    img_size = int(sam.image_encoder.img_size)
    in_h, in_w = encoding.input_size
    resized = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_AREA)
    square = np.zeros((img_size, img_size), dtype=np.float32)
    square[:in_h, :in_w] = resized
    side = low_res_size(encoding)
    fraction = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA)
    logits = (2.0 * np.clip(fraction, 0.0, 1.0) - 1.0) * MASK_PROMPT_LOGIT
    return torch.as_tensor(logits, device=encoding.embedding.device)[None, None]


@torch.no_grad()
def propagate_mask(
    sam: Sam,
    encoding: SamImageEncoding,
    *,
    box: np.ndarray | None,
    points: np.ndarray | None,
    point_labels: np.ndarray | None,
    mask_input: torch.Tensor | None,
    mask_threshold: float | None = None,
) -> SamPropagation:
    """SAM's single-mask prediction on ``encoding`` for a box + points + previous-mask prompt.

    Args:
        box: (4,) XYXY pixels of the frame, or ``None``.
        points: (P, 2) XY pixels with ``point_labels`` (P,) (1 = object, 0 = background),
            or ``None`` (P may be 0).
        mask_input: (1, 1, 4h, 4w) previous low-resolution logits, or ``None``.
        mask_threshold: logit threshold of the binary mask (default ``sam.mask_threshold``).
    """
    threshold = float(sam.mask_threshold if mask_threshold is None else mask_threshold)
    pts = lbl = None
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float32)[None]
        lbl = np.asarray(point_labels, dtype=np.int32)[None]
    low_res, iou = decode_low_res(
        sam,
        encoding,
        boxes=None if box is None else np.asarray(box, dtype=np.float32)[None],
        points=pts,
        point_labels=lbl,
        mask_input=mask_input,
        multimask_output=False,
    )
    in_h, in_w = encoding.input_size
    scale = low_res.shape[-1] / float(sam.image_encoder.img_size)
    valid = low_res[..., : max(1, round(in_h * scale)), : max(1, round(in_w * scale))]
    # an empty mask at both thresholds is 0 / 0: no object, no stability
    stability = float(
        torch.nan_to_num(calculate_stability_score(valid[0], threshold, STABILITY_OFFSET), nan=0.0)[0]
    )
    logits = sam.postprocess_masks(low_res, encoding.input_size, encoding.original_size)
    mask = (logits[0, 0] > threshold).cpu().numpy()
    return SamPropagation(
        mask=mask,
        low_res=low_res[:, :1].float(),
        predicted_iou=float(iou[0, 0]),
        stability=stability,
    )
