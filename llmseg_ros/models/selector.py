"""LLM-Seg proposal selector: fusion of mask tokens with the ``<SEG>`` query, IoU and IoP heads.

Fusion (the released code's ``LISA_TwoWayAttentionBlock`` ×2 plus a final attention, i.e.
SAM's ``TwoWayTransformer`` without positional encodings and with attention downsample
rate 1). Mask tokens ``m`` (B, K, 256) are the "queries", the ``<SEG>`` query ``s``
(B, 1, 256) the single "key" token; every block does, in order::

    m = LN1(m + SelfAttn(m, m, m))          # masks attend to each other (padding masked)
    m = LN2(m + Attn(q=m, k=s, v=s))        # masks attend to the query
    m = LN3(m + MLP(m))                     # 256 → 2048 → 256, ReLU
    s = LN4(s + Attn(q=s, k=m, v=m))        # query attends to masks (padding masked)

and after the blocks ``m = LN(m + Attn(q=m, k=s, v=s))``. Heads on the fused ``m``:

* IoU head ``iou_head``: Linear 256→2048, ReLU, Linear 2048→256; similarity = cosine
  with the *pre-fusion* query (range [-1, 1]).
* IoP head ``iop_head``: Linear 256→128, ReLU, Linear 128→1; IoP = sigmoid (range [0, 1]).

Attending to the single query token always has softmax weight 1, so the ``q_proj`` /
``k_proj`` weights of ``cross_attn_mask_to_query`` and ``final_attn`` never receive a
gradient; they are kept so the layout matches the released checkpoints.

Padding convention: ``padding_mask`` (B, K) bool, True = padded slot. Padded slots are
zeroed on input, never attended to, and their outputs are set to 0, so real proposals get
the same scores whatever the padding. A batch row with no real proposal is allowed.

State-dict keys (``d`` = block index 0/1; each attention has ``q_proj``, ``k_proj``,
``v_proj``, ``out_proj`` with ``weight``/``bias``; each ``norm*`` has ``weight``/``bias``):
``layers.d.self_attn``, ``layers.d.norm1``, ``layers.d.cross_attn_mask_to_query``,
``layers.d.norm2``, ``layers.d.mlp.lin1``, ``layers.d.mlp.lin2``, ``layers.d.norm3``,
``layers.d.cross_attn_query_to_mask``, ``layers.d.norm4``, ``final_attn``,
``norm_final``, ``iou_head.0``, ``iou_head.2``, ``iop_head.0``, ``iop_head.2``. The
released checkpoints name them ``lisa_attention_layers.d.{self_attn, norm1,
cross_attn_token_to_image, norm2, mlp, norm3, cross_attn_image_to_token, norm4}``,
``lisa_final_attn``, ``lisa_norm_final_attn``, ``lisa_embedding_head`` (our ``iou_head``)
and ``lisa_iou_head`` (our ``iop_head``; its trailing Sigmoid has no weights).

Selection strategies (LLM-Seg Table 3; ``config.SELECTION_STRATEGIES``) are in
:func:`select`; :func:`union_mask` merges the chosen proposals.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmseg_ros.config import SELECTION_STRATEGIES

COSINE_EPS = 1e-8


@dataclass
class SelectorOutput:
    """Per-proposal scores, all (B, K) float32; 0 at padded slots.

    Attributes:
        similarity: cosine similarity of the IoU-head embedding with the query, [-1, 1].
        iop_logits: IoP-head logits.
        iop: ``sigmoid(iop_logits)``, predicted intersection over proposal, [0, 1].
    """

    similarity: torch.Tensor
    iop_logits: torch.Tensor
    iop: torch.Tensor


class MaskedAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections and an optional key padding mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, h, N, c/h)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q (B, Nq, C), k/v (B, Nk, C), key_padding_mask (B, Nk) bool True = ignore → (B, Nq, C).

        A query whose keys are all padded receives a zero attention output (then ``out_proj``).
        """
        qh, kh, vh = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        logits = (qh @ kh.transpose(-2, -1)) * qh.shape[-1] ** -0.5  # (B, h, Nq, Nk)
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            probs = (
                logits.masked_fill(pad, torch.finfo(logits.dtype).min).softmax(dim=-1).masked_fill(pad, 0.0)
            )
        else:
            probs = logits.softmax(dim=-1)
        out = (probs @ vh).transpose(1, 2).flatten(2)  # (B, Nq, C)
        return self.out_proj(out)


class MLPBlock(nn.Module):
    """Linear(dim→hidden), ReLU, Linear(hidden→dim) (keys ``lin1``, ``lin2`` as in SAM)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class FusionBlock(nn.Module):
    """One two-way attention block between K mask tokens and the query token."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.self_attn = MaskedAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_mask_to_query = MaskedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_query_to_mask = MaskedAttention(dim, num_heads)
        self.norm4 = nn.LayerNorm(dim)

    def forward(
        self, masks: torch.Tensor, query: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """masks (B, K, C), query (B, 1, C), padding_mask (B, K) | None → updated (masks, query)."""
        masks = self.norm1(masks + self.self_attn(masks, masks, masks, padding_mask))
        masks = self.norm2(masks + self.cross_attn_mask_to_query(masks, query, query))
        masks = self.norm3(masks + self.mlp(masks))
        query = self.norm4(query + self.cross_attn_query_to_mask(query, masks, masks, padding_mask))
        return masks, query


class ProposalSelector(nn.Module):
    """Scores K mask proposals against one ``<SEG>`` query (see the module docstring).

    Args:
        dim: token width (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the fusion MLPs (2048).
        depth: number of two-way blocks (2).
        iou_hidden: hidden width of the IoU head (2048).
        iop_hidden: hidden width of the IoP head (128).
    """

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        depth: int = 2,
        iou_hidden: int = 2048,
        iop_hidden: int = 128,
    ):
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
            ("depth", depth),
            ("iou_hidden", iou_hidden),
            ("iop_hidden", iop_hidden),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dim = dim
        self.layers = nn.ModuleList(FusionBlock(dim, num_heads, mlp_dim) for _ in range(depth))
        self.final_attn = MaskedAttention(dim, num_heads)
        self.norm_final = nn.LayerNorm(dim)
        self.iou_head = nn.Sequential(nn.Linear(dim, iou_hidden), nn.ReLU(), nn.Linear(iou_hidden, dim))
        self.iop_head = nn.Sequential(nn.Linear(dim, iop_hidden), nn.ReLU(), nn.Linear(iop_hidden, 1))

    def forward(
        self, mask_embeddings: torch.Tensor, query: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> SelectorOutput:
        """Score a batch of padded proposal sets.

        Args:
            mask_embeddings: (B, K, dim) mask embeddings (cast to the selector's dtype).
            query: (B, dim) projected ``<SEG>`` hidden states.
            padding_mask: (B, K) bool, True = padded slot; ``None`` = all real.

        Returns:
            :class:`SelectorOutput` with (B, K) float32 tensors (0 at padded slots).
        """
        if mask_embeddings.ndim != 3 or mask_embeddings.shape[-1] != self.dim:
            raise ValueError(
                f"mask_embeddings must be (B, K, {self.dim}), got {tuple(mask_embeddings.shape)}"
            )
        b, k, _ = mask_embeddings.shape
        if query.shape != (b, self.dim):
            raise ValueError(f"query must be ({b}, {self.dim}), got {tuple(query.shape)}")
        if padding_mask is not None:
            if padding_mask.shape != (b, k) or padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"padding_mask must be a ({b}, {k}) bool tensor, got {tuple(padding_mask.shape)} {padding_mask.dtype}"
                )
            padding_mask = padding_mask.to(mask_embeddings.device)
        dtype = self.norm_final.weight.dtype
        masks = mask_embeddings.to(dtype)
        if padding_mask is not None:
            masks = masks.masked_fill(padding_mask[..., None], 0.0)
        query_in = query.to(dtype)
        tokens = query_in[:, None, :]  # (B, 1, C)
        for layer in self.layers:
            masks, tokens = layer(masks, tokens, padding_mask)
        masks = self.norm_final(masks + self.final_attn(masks, tokens, tokens))
        embedded = F.normalize(self.iou_head(masks).float(), dim=-1, eps=COSINE_EPS)  # (B, K, C)
        anchor = F.normalize(query_in.float(), dim=-1, eps=COSINE_EPS)  # (B, C)
        similarity = (embedded * anchor[:, None, :]).sum(dim=-1)
        iop_logits = self.iop_head(masks).float().squeeze(-1)
        iop = torch.sigmoid(iop_logits)
        if padding_mask is not None:
            similarity = similarity.masked_fill(padding_mask, 0.0)
            iop_logits = iop_logits.masked_fill(padding_mask, 0.0)
            iop = iop.masked_fill(padding_mask, 0.0)
        return SelectorOutput(similarity=similarity, iop_logits=iop_logits, iop=iop)

    def score(self, mask_embeddings: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unbatched scoring: mask_embeddings (K, dim), query (dim,) → (similarity (K,), iop (K,)) float32.

        K = 0 returns two empty tensors without running the network.
        """
        if mask_embeddings.ndim != 2 or mask_embeddings.shape[-1] != self.dim:
            raise ValueError(f"mask_embeddings must be (K, {self.dim}), got {tuple(mask_embeddings.shape)}")
        if query.shape != (self.dim,):
            raise ValueError(f"query must be ({self.dim},), got {tuple(query.shape)}")
        if mask_embeddings.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.float32, device=mask_embeddings.device)
            return empty, empty.clone()
        out = self.forward(mask_embeddings[None], query[None])
        return out.similarity[0], out.iop[0]


def select(
    similarity: np.ndarray,
    iop: np.ndarray,
    strategy: str,
    iop_threshold: float = 0.5,
    top_k: int = 5,
) -> list[int]:
    """Pick proposals from the selector's scores (LLM-Seg Table 3).

    Strategies:
        ``top1_iou``: the proposal with the highest similarity.
        ``iop_threshold``: every proposal with ``iop > iop_threshold`` (the default; an
            empty answer means "nothing matches" and is valid).
        ``top1_iou_iop_threshold``: union of the two above.
        ``topk_iou_iop_threshold``: ``iop > iop_threshold`` among the ``top_k`` proposals
            with the highest similarity.

    Ties in similarity go to the lower index. The threshold is strict.

    Args:
        similarity: (K,) IoU-head similarities.
        iop: (K,) IoP predictions in [0, 1].
        strategy: one of ``config.SELECTION_STRATEGIES``.
        iop_threshold: IoP threshold in [0, 1].
        top_k: candidates kept by similarity for ``topk_iou_iop_threshold`` (>= 1).

    Returns:
        Sorted unique proposal indices; ``[]`` when K = 0.
    """
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"strategy must be one of {list(SELECTION_STRATEGIES)}, got {strategy!r}")
    if not 0.0 <= iop_threshold <= 1.0:
        raise ValueError(f"iop_threshold must be in [0, 1], got {iop_threshold!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    sim = np.asarray(similarity, dtype=np.float64)
    iops = np.asarray(iop, dtype=np.float64)
    if sim.ndim != 1 or iops.shape != sim.shape:
        raise ValueError(f"similarity and iop must both be (K,), got {sim.shape} and {iops.shape}")
    if not (np.isfinite(sim).all() and np.isfinite(iops).all()):
        raise ValueError("similarity and iop must be finite")
    if sim.size == 0:
        return []
    chosen: set[int] = set()
    if strategy in ("top1_iou", "top1_iou_iop_threshold"):
        chosen.add(int(np.argmax(sim)))  # first maximum = lowest index on ties
    if strategy in ("iop_threshold", "top1_iou_iop_threshold"):
        chosen.update(int(i) for i in np.flatnonzero(iops > iop_threshold))
    if strategy == "topk_iou_iop_threshold":
        candidates = np.argsort(-sim, kind="stable")[:top_k]
        chosen.update(int(i) for i in candidates if iops[i] > iop_threshold)
    return sorted(chosen)


def union_mask(masks: np.ndarray, indices: Iterable[int]) -> np.ndarray:
    """Union of the chosen proposals.

    Args:
        masks: (K, H, W) bool proposals.
        indices: proposal indices in [0, K) (may be empty).

    Returns:
        (H, W) bool; all False when ``indices`` is empty.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {masks.shape}")
    try:
        idx = np.asarray([operator.index(i) for i in indices], dtype=np.int64)
    except TypeError as exc:
        raise TypeError(f"indices must be integers: {exc}") from None
    bad = idx[(idx < 0) | (idx >= masks.shape[0])]
    if bad.size:
        raise ValueError(f"indices must be in [0, {masks.shape[0]}), got {bad.tolist()}")
    if idx.size == 0:
        return np.zeros(masks.shape[1:], dtype=bool)
    return np.asarray(masks[idx].astype(bool).any(axis=0))
