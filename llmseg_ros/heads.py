"""Projection of the VLM's ``<SEG>`` hidden state into the 256-d query space."""

from __future__ import annotations

from torch import nn


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
