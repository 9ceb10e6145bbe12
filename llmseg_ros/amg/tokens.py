"""The decoder's input tokens for single-point prompts, shared by both mask decoders."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam


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
