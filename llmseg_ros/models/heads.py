"""Heads on the VLM's ``<SEG>`` hidden state: the text projection into the 256-d query space
(LLM-Seg, LISA) and LISA's mask head (projection + a trainable copy of SAM's mask decoder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from llmseg_ros.models.sam_prompting import SamImageEncoding, decode_masks

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


class TextProjection(nn.Sequential):
    """LISA's ``text_hidden_fcs[0]``: Linear(h→h), ReLU, Linear(h→out_dim), Dropout(0).

    Input ``(..., hidden_size)`` → output ``(..., out_dim)``, in the weights' dtype.

    State-dict keys (identical to LISA / LLM-Seg checkpoints after stripping the prefix
    ``model.text_hidden_fcs.0.``): ``0.weight`` (h, h), ``0.bias`` (h,), ``2.weight``
    (out_dim, h), ``2.bias`` (out_dim,). Indices 1 (ReLU) and 3 (Dropout with p=0) hold
    no weights.
    """

    def __init__(self, hidden_size: int, out_dim: int = 256):
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        super().__init__(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, out_dim),
            nn.Dropout(0.0),
        )
        self.hidden_size = hidden_size
        self.out_dim = out_dim


class LisaMaskHead(nn.Module):
    """The trainable part of LISA: text projection + a copy of SAM's mask decoder.

    SAM itself (image encoder, prompt encoder) stays frozen and shared: it is held by
    reference, not registered as a submodule, so ``state_dict()`` / ``parameters()`` of
    this head are exactly what LISA trains and what the weights directory stores.
    """

    def __init__(self, sam: Sam, hidden_size: int) -> None:
        super().__init__()
        import copy

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
