"""What both mask decoders of the fast path share: their call contract
(:class:`PointDecoder`) and the input tokens of single-point prompts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
from segment_anything.modeling import Sam

ContextT = TypeVar("ContextT")


class PointDecoder(Protocol[ContextT]):
    """SAM's mask decoder for many single-point prompts on one image
    (``MaskDecoder.forward(..., multimask_output=True)`` per point).

    ``context(features)`` prepares the per-image state from (1, C, h, w) image
    embeddings; calling the decoder decodes one batch:

    Args:
        ctx: the image's context.
        points: (B, 2) float64 XY in the encoder frame (``ResizeLongestSide.apply_coords``).
        need_masks: called with (b, 3) predicted IoUs of some or all of the points,
            returns (b,) bool: the points whose masks are needed.
    Returns:
        iou: (B, 3) float32 predicted IoU of the three multimask outputs;
        low_res: (S, 3, 4h, 4w) float32 logits of the points ``index``;
        index: (S,) int64 increasing indices into the batch.

    ``check_seconds`` is the time spent on one-time self-checks since it was last reset
    (excluded from the decoder's timing).
    """

    check_seconds: float

    def context(self, features: torch.Tensor) -> ContextT: ...

    def __call__(
        self,
        ctx: ContextT,
        points: torch.Tensor,
        need_masks: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def point_prompt_tokens(sam: Sam, points: torch.Tensor) -> torch.Tensor:
    """Tokens entering SAM's two-way transformer for one foreground point per prompt, as
    in ``MaskDecoder.predict_masks``: the IoU token, the mask tokens and the point's
    sparse prompt embedding (with the padding point ``PromptEncoder`` adds).

    points: (B, 2) float64 XY in the encoder frame (``ResizeLongestSide.apply_coords``).
    Returns (B, T, C) float32 with T = 1 + num_mask_tokens + 2.
    """
    labels = torch.ones(points.shape[0], dtype=torch.int, device=points.device)
    sparse, _ = sam.prompt_encoder(points=(points[:, None, :], labels[:, None]), boxes=None, masks=None)
    decoder = sam.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
