"""Prompted SAM on a cached image encoding (boxes, points or a text embedding).

Unlike ``segment_anything.SamPredictor``, the encoding is a value, not predictor state,
so one SAM serves many frames and threads at once. Pre- and post-processing are
segment-anything's own (``ResizeLongestSide``, ``Sam.preprocess``,
``Sam.postprocess_masks``), and prompts reach the prompt encoder as float32 tensors as in
``SamPredictor.predict``, so for an RGB SAM the masks and scores are the predictor's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass
class SamImageEncoding:
    """SAM's image embedding of one frame.

    Attributes:
        embedding: (1, C, h, w) image-encoder output (C = 256, h = w = 64 for 1024 input).
        input_size: (H', W') of the resized image before padding (long side = img_size).
        original_size: (H, W) of the frame.
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def sam_input_tensor(sam: Sam, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) uint8 RGB → (1, 3, img_size, img_size) normalised, padded input + resized size."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = transform.apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None].float()
    return sam.preprocess(x), (int(resized.shape[0]), int(resized.shape[1]))


@torch.no_grad()
def encode_image(sam: Sam, image: np.ndarray) -> SamImageEncoding:
    """Run SAM's image encoder once for a frame ((H, W, 3) uint8 RGB)."""
    x, input_size = sam_input_tensor(sam, image)
    embedding = sam.image_encoder(x)
    return SamImageEncoding(embedding, input_size, (int(image.shape[0]), int(image.shape[1])))


def decode_low_res(
    sam: Sam,
    encoding: SamImageEncoding,
    *,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    mask_input: torch.Tensor | None = None,
    extra_sparse: torch.Tensor | None = None,
    multimask_output: bool = False,
    mask_decoder: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder + mask decoder on a cached encoding, masks at low resolution.

    Args:
        boxes: (N, 4) XYXY pixels of the original frame: one prediction per box.
        points: (N, P, 2) XY pixels of the original frame with ``point_labels`` (N, P)
            (1 = foreground, 0 = background): one prediction per row.
        mask_input: (N, 1, 4h, 4w) low-resolution mask logits (a previous prediction of
            this function, 256 x 256 for a 1024 input) used as SAM's dense prompt.
        extra_sparse: (N, T, C) embeddings appended to the sparse prompt tokens (LISA's
            ``<SEG>`` embedding); with no boxes / points it alone prompts the decoder.
        multimask_output: SAM's three-mask output instead of the single mask.
        mask_decoder: a decoder to use instead of ``sam.mask_decoder`` (LISA's trained one).
    Returns:
        low-resolution logits (N, M, 4h, 4w) in the padded input square (M = 1 or 3) and
        the IoU predictions (N, M).
    """
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = encoding.embedding.device
    box_t = point_t = None
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        box_t = torch.as_tensor(
            transform.apply_boxes(boxes, encoding.original_size), dtype=torch.float, device=device
        )
    if points is not None:
        if point_labels is None:
            raise ValueError("point_labels must be given with points")
        pts = np.asarray(points, dtype=np.float32)
        if pts.ndim != 3 or pts.shape[-1] != 2:
            raise ValueError(f"points must be (N, P, 2), got shape {pts.shape}")
        coords = torch.as_tensor(
            transform.apply_coords(pts, encoding.original_size), dtype=torch.float, device=device
        )
        point_t = (coords, torch.as_tensor(np.asarray(point_labels), device=device, dtype=torch.int))
    if mask_input is not None:
        mask_input = mask_input.to(device, torch.float)
    sparse, dense = sam.prompt_encoder(points=point_t, boxes=box_t, masks=mask_input)
    if extra_sparse is not None:
        extra = extra_sparse.to(sparse.dtype)
        if sparse.shape[0] == 1 and extra.shape[0] > 1:
            sparse = sparse.expand(extra.shape[0], -1, -1)
            dense = dense.expand(extra.shape[0], -1, -1, -1)
        sparse = torch.cat([sparse, extra], dim=1)
    decoder = sam.mask_decoder if mask_decoder is None else mask_decoder
    low_res: torch.Tensor
    iou: torch.Tensor
    low_res, iou = decoder(
        image_embeddings=encoding.embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
    )
    return low_res, iou


def decode_masks(
    sam: Sam,
    encoding: SamImageEncoding,
    *,
    boxes: np.ndarray | None = None,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    extra_sparse: torch.Tensor | None = None,
    multimask_output: bool = False,
    mask_decoder: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_low_res` with the masks upsampled to the frame's size.

    Returns:
        logits (N, M, H, W) float at the original resolution (M = 1 or 3) and the IoU
        predictions (N, M).
    """
    low_res, iou = decode_low_res(
        sam,
        encoding,
        boxes=boxes,
        points=points,
        point_labels=point_labels,
        extra_sparse=extra_sparse,
        multimask_output=multimask_output,
        mask_decoder=mask_decoder,
    )
    logits = sam.postprocess_masks(low_res, encoding.input_size, encoding.original_size)
    return logits, iou
