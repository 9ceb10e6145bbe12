"""SAM everything-mode mask proposals (LLM-Seg's proposal stage).

Reference behaviour (the authors' code): the image is first downscaled with
``cv2.INTER_AREA`` so that its long side is at most ``max_long_side``; SAM's automatic
mask generator runs on it with the library defaults (32 x 32 point grid, 64 points per
batch, predicted-IoU threshold 0.88, stability threshold 0.95, box NMS 0.7, no crops, no
small-region removal); the masks are sorted by area, largest first, and truncated to
``max_proposals``. The kept masks are then resized back to the input resolution with
nearest-neighbour interpolation.

Two implementations produce the same masks:

* ``"reference"`` literally runs ``segment_anything.SamAutomaticMaskGenerator``.
* ``"fast"`` (default) computes the same numbers in less time. SAM's generator upsamples
  the low-resolution logits of every mask of every point to the image resolution before
  filtering, encodes each kept mask as an RLE and decodes it again. Here:

  - the mask decoder (``decoder``) is one of two implementations of SAM's
    ``MaskDecoder``:

    * ``"factored"`` (default) folds the projections of the 4096 image tokens of each
      point into its 7 prompt tokens (attention is linear in the keys and values, see
      :class:`_FactoredDecoder`), computes the first two-way block's image projections
      once per image, runs the upscaling head only for points with a mask above the IoU
      threshold, channels-last, in chunks that stay in the CPU caches. The arithmetic is
      the same function in another summation order: logits agree with SAM's forward to
      float32 rounding (relative 1e-6), which can move a mask pixel only where a logit or
      a score is within that rounding of its threshold;
    * ``"exact"`` runs the same kernels on the same batches of ``points_per_batch`` points
      as the reference, bit for bit: it computes the prompt-independent projections of the
      image tokens in its first two-way block once per image instead of once per point
      (checked bit for bit against SAM's own forward on the first batch a model decodes;
      if a backend rounds differently the generator uses SAM's forward) and skips its
      upscaling head for batches where no mask passes the IoU filter;
  - the predicted-IoU filter runs before any upsampling;
  - masks whose stability score is certainly below the threshold, or (when NMS cannot
    drop anything) whose area certainly keeps them out of the ``max_proposals`` largest,
    are recognised from bounds on the low-resolution logits and never upsampled;
  - every other mask is upsampled with the very same ``F.interpolate`` calls as SAM's
    ``postprocess_masks`` (restricted to the unpadded region, in small chunks) and its
    stability, area and box are computed exactly on the device; NMS is ``torchvision``'s
    ``batched_nms`` on the same inputs (same tie-breaking); no RLE round trip; only the
    returned masks are upsampled again at the end.

  With ``decoder="exact"`` the masks are identical to the reference's bit for bit; with
  ``"factored"`` the tests check the same masks (every one matched at IoU >= 0.99 both
  ways, scores within 1e-5) and the benchmark reports the agreement on every run.

Optional, CUDA only, and no longer bit-identical: a float16/bfloat16 image encoder
(``encoder_dtype``) and ``torch.compile`` of the image encoder (``compile_encoder``).
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms

from llmseg_ros.config import ProposalConfig
from llmseg_ros.types import Proposals

logger = logging.getLogger(__name__)

_ENCODER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_POST_CHUNK_PIXELS = 1 << 21  # upsampled logits per post-processing chunk (8 MiB of float32)
_BOUND_CHUNK_PIXELS = 1 << 24  # low-resolution logits per chunk of count bounds
# Per SAM model: whether the decoder with shared first-block projections reproduced SAM's
# own forward bit for bit (checked once, on the first batch the model decodes).
_SHARED_PREFIX_EXACT: weakref.WeakKeyDictionary[Sam, bool] = weakref.WeakKeyDictionary()


# -- image and mask geometry (shared by both implementations) ------------------------------


def check_image(image: Any) -> np.ndarray:
    """Validate an RGB frame: (H, W, 3) uint8 numpy array with H, W >= 1.

    Raises:
        TypeError: not a numpy array.
        ValueError: wrong shape or dtype (the message gives what was received).
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape} ({image.dtype})")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype} with shape {image.shape}")
    return image


def downscale_long_side(image: np.ndarray, max_long_side: int) -> np.ndarray:
    """Shrink ``image`` with ``cv2.INTER_AREA`` so that its long side is at most
    ``max_long_side`` (rounded like SAM's ``ResizeLongestSide``); smaller images are
    returned unchanged (not copied)."""
    height, width = image.shape[:2]
    if max(height, width) <= max_long_side:
        return image
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, max_long_side)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def resize_masks_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(K, h, w) bool → (K, H, W) bool with ``cv2.INTER_NEAREST``; ``size`` is (H, W)."""
    height, width = size
    if masks.shape[1:] == (height, width):
        return masks
    out = np.empty((masks.shape[0], height, width), dtype=bool)
    for i, mask in enumerate(masks):
        resized = cv2.resize(mask.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        out[i] = resized.astype(bool)
    return out


def mask_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) bool → (K, 4) float32 boxes [x0, y0, x1, y1] of the first and last
    foreground column and row (both inclusive, ``segment_anything``'s
    ``batched_mask_to_box`` convention); an empty mask gets [0, 0, 0, 0]."""
    k, height, width = masks.shape
    boxes = np.zeros((k, 4), dtype=np.float32)
    if k == 0:
        return boxes
    rows: np.ndarray = np.any(masks, axis=2)  # (K, H)
    cols: np.ndarray = np.any(masks, axis=1)  # (K, W)
    nonempty = rows.any(axis=1)
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = width - 1 - cols[:, ::-1].argmax(axis=1)
    boxes[:, 3] = height - 1 - rows[:, ::-1].argmax(axis=1)
    boxes[~nonempty] = 0.0
    return boxes


def area_order(areas: np.ndarray, limit: int) -> np.ndarray:
    """Indices sorting ``areas`` largest first (stable: ties keep their order), cut to
    ``limit``."""
    return np.argsort(-np.asarray(areas, dtype=np.int64), kind="stable")[:limit]


# -- tensor helpers of the fast path --------------------------------------------------------


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool → (N, 4) int64 XYXY boxes, equal to ``batched_mask_to_box``."""
    n, height, width = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=masks.device)
    # max over uint8 views: much faster than any() over bool on CPU, same result
    pixels = masks.view(torch.uint8)
    rows = pixels.amax(dim=2) > 0  # (N, H)
    cols = pixels.amax(dim=1) > 0  # (N, W)
    y = torch.arange(height, device=masks.device)
    x = torch.arange(width, device=masks.device)
    bottom = torch.where(rows, y, -1).amax(dim=1)
    top = torch.where(rows, y, height).amin(dim=1)
    right = torch.where(cols, x, -1).amax(dim=1)
    left = torch.where(cols, x, width).amin(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def upsample_logits(
    low_res: torch.Tensor, encoder_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """SAM's ``postprocess_masks`` for (N, h, w) low-resolution logits → (N, H, W) logits
    at ``original_size``: the same ``F.interpolate`` calls, the same values bit for bit,
    without computing the padded part of the encoder frame.

    * The masks go through ``F.interpolate`` as (N / 3, 3, h, w), the layout SAM's
      multimask output has (padded with copies when N is not a multiple of 3): PyTorch
      picks its bilinear CPU kernel (generic or separable, which round differently) from
      the channel count, the thread count and the output size, so this makes it pick the
      kernel the reference picks.
    * The first resize (to ``encoder_size`` squared, scale 4) is evaluated only on the
      rows and columns the crop to ``input_size`` keeps: the input is cut to the
      low-resolution pixels those outputs read and resized with the same scale factor,
      which gives the same source coordinates and weights.
    * The second resize (to ``original_size``) is skipped when it is the identity (at
      scale 1 bilinear interpolation returns its input).
    """
    n, low_h, low_w = low_res.shape
    pad = (-n) % 3
    x = torch.cat([low_res, low_res[:1].expand(pad, -1, -1)]) if pad else low_res
    x = x.view(-1, 3, low_h, low_w)
    in_h, in_w = input_size
    scale = encoder_size // low_h
    # The output size also steers the kernel choice (small outputs get the separable
    # kernel): take the shortcut only far from that regime, where the reference is too.
    if scale * low_h == encoder_size == scale * low_w and in_h + in_w > 256 and encoder_size > 128:
        rows = min(low_h, math.ceil(in_h / scale) + 1)
        cols = min(low_w, math.ceil(in_w / scale) + 1)
        # Output size and scale given together: the kernel maps output pixels to source
        # pixels with the scale (as in the reference's resize to encoder_size squared) and
        # writes only the rows and columns the crop keeps.
        x = torch.ops.aten.upsample_bilinear2d.default(
            x[..., :rows, :cols], [in_h, in_w], False, float(scale), float(scale)
        )
    else:
        x = F.interpolate(x, (encoder_size, encoder_size), mode="bilinear", align_corners=False)
        x = x[..., :in_h, :in_w]
    if (in_h, in_w) != tuple(original_size):
        x = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    return x.flatten(0, 1)[:n]  # (N, H, W), a view


def _pixel_counts(masks: torch.Tensor) -> torch.Tensor:
    """Per-mask count of foreground pixels: (N, H, W) bool → (N,) int32. Column sums
    first, over a uint8 view: on CPU a reduction over rows vectorises across the columns,
    and int16 holds a column's count (H < 2**15), several times faster than ``sum`` over
    both dimensions."""
    column_dtype = torch.int16 if masks.shape[-2] < 2**15 else torch.int32
    return masks.view(torch.uint8).sum(dim=-2, dtype=column_dtype).sum(dim=-1, dtype=torch.int32)


def _threshold_counts(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-mask count of logits above ``threshold``: (N, H, W) → (N,) int32."""
    return _pixel_counts(logits > threshold)


@dataclass
class _ImageContext:
    """Per-image decoder inputs shared by every point batch."""

    features: torch.Tensor  # (1, C, h, w) image embedding
    image_pe: torch.Tensor  # (1, C, h, w) dense positional encoding
    dense: torch.Tensor  # (1, C, h, w) no-mask embedding
    shared: dict[str, torch.Tensor] | None = None  # first-block image-token projections


class _ExactDecoder:
    """SAM's mask decoder for many single-point prompts on one image.

    Numerically it is ``MaskDecoder.forward(..., multimask_output=True)``: the same
    modules on the same batches. Two shortcuts avoid work without changing a bit:
    the image tokens' projections that do not depend on the prompt (first two-way block:
    keys + PE, their key/value projections for token-to-image attention and their query
    projection for image-to-token attention) are computed once per image; the upscaling
    head runs only when the caller needs the masks.
    """

    def __init__(self, sam: Sam) -> None:
        self.sam = sam
        self.decoder = sam.mask_decoder
        self.transformer = sam.mask_decoder.transformer
        self.check_seconds = 0.0  # time spent on the one-time bit-for-bit check

    def context(self, features: torch.Tensor) -> _ImageContext:
        """Per-image state for (1, C, h, w) image embeddings."""
        pe_encoder = self.sam.prompt_encoder
        height, width = features.shape[-2:]
        dense = pe_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)
        return _ImageContext(features, pe_encoder.get_dense_pe(), dense)

    def _shared_projections(self, ctx: _ImageContext) -> dict[str, torch.Tensor]:
        if ctx.shared is None:
            block = self.transformer.layers[0]
            src = ctx.features + ctx.dense  # == each row of repeat_interleave(features) + dense
            keys = src.flatten(2).permute(0, 2, 1)  # (1, h*w, C)
            key_pe = ctx.image_pe.flatten(2).permute(0, 2, 1)
            k = keys + key_pe
            ctx.shared = {
                "keys": keys,
                "key_pe": key_pe,
                "t2i_k": block.cross_attn_token_to_image.k_proj(k),
                "t2i_v": block.cross_attn_token_to_image.v_proj(keys),
                "i2t_q": block.cross_attn_image_to_token.q_proj(k),
            }
        return ctx.shared

    @staticmethod
    def _attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``segment_anything`` ``Attention.forward`` after its three input projections."""
        heads = attention.num_heads
        q = attention._separate_heads(q, heads)
        k = attention._separate_heads(k, heads)
        v = attention._separate_heads(v, heads)
        attn = q @ k.permute(0, 1, 3, 2)  # (B, heads, Nq, Nk)
        attn = attn / math.sqrt(q.shape[-1])
        attn = torch.softmax(attn, dim=-1)
        return attention.out_proj(attention._recombine_heads(attn @ v))

    def _transformer_shared(
        self, ctx: _ImageContext, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``TwoWayTransformer.forward`` with the first block's prompt-independent
        image-token work taken from ``ctx``. tokens: (B, T, C) → (queries, keys)."""
        shared = self._shared_projections(ctx)
        b = tokens.shape[0]
        block = self.transformer.layers[0]
        # First block (skip_first_layer_pe=True), written out as in TwoWayAttentionBlock.
        queries = block.self_attn(q=tokens, k=tokens, v=tokens)
        queries = block.norm1(queries)
        att = block.cross_attn_token_to_image
        q = att.q_proj(queries + tokens)
        attn_out = self._attend(att, q, shared["t2i_k"].expand(b, -1, -1), shared["t2i_v"].expand(b, -1, -1))
        queries = block.norm2(queries + attn_out)
        queries = block.norm3(queries + block.mlp(queries))
        att = block.cross_attn_image_to_token
        q = queries + tokens
        attn_out = self._attend(att, shared["i2t_q"].expand(b, -1, -1), att.k_proj(q), att.v_proj(queries))
        keys = block.norm4(shared["keys"] + attn_out)
        key_pe = shared["key_pe"].expand(b, -1, -1)
        for layer in self.transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
        attn_out = self.transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        queries = self.transformer.norm_final_attn(queries + attn_out)
        return queries, keys

    def _transformer_module(
        self, ctx: _ImageContext, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder.predict_masks``' own transformer call."""
        b = tokens.shape[0]
        src = torch.repeat_interleave(ctx.features, b, dim=0) + ctx.dense.expand(b, -1, -1, -1)
        pos_src = torch.repeat_interleave(ctx.image_pe, b, dim=0)
        return self.transformer(src, pos_src, tokens)

    def _transformer(self, ctx: _ImageContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        verdict = _SHARED_PREFIX_EXACT.get(self.sam)
        if verdict is False:
            return self._transformer_module(ctx, tokens)
        out = self._transformer_shared(ctx, tokens)
        if verdict is None:
            start = time.perf_counter()
            reference = self._transformer_module(ctx, tokens)
            exact = torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])
            _SHARED_PREFIX_EXACT[self.sam] = exact
            self.check_seconds += time.perf_counter() - start
            if not exact:
                logger.warning(
                    "shared first-block projections do not reproduce SAM's decoder bit for bit on %s; "
                    "using SAM's own forward for every batch",
                    ctx.features.device,
                )
                return reference
        return out

    def __call__(
        self,
        ctx: _ImageContext,
        points: torch.Tensor,
        need_masks: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode a batch of single-point prompts.

        Args:
            ctx: the image's context.
            points: (B, 2) float64 XY in the encoder frame (``ResizeLongestSide.apply_coords``).
            need_masks: called with the (B, 3) predicted IoUs, returns (B,) bool: the
                points whose masks are needed. This decoder computes the masks of the
                whole batch (the reference's shapes) when any is needed, else none.
        Returns:
            iou: (B, 3) float32 predicted IoU of the three multimask outputs;
            low_res: (S, 3, 4h, 4w) float32 logits of the points ``index``;
            index: (S,) int64 indices into the batch (S = B or 0).
        """
        labels = torch.ones(points.shape[0], dtype=torch.int, device=points.device)
        sparse, _ = self.sam.prompt_encoder(
            points=(points[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        decoder = self.decoder
        b = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        hs, keys = self._transformer(ctx, tokens)
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, 1:]
        if not bool(need_masks(iou).any()):
            return (
                iou,
                iou.new_zeros((0, 3, 4 * ctx.features.shape[-2], 4 * ctx.features.shape[-1])),
                (torch.zeros(0, dtype=torch.int64, device=iou.device)),
            )
        _, channels, height, width = ctx.features.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, channels, height, width))
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        _, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c_up, h_up * w_up)).view(b, -1, h_up, w_up)
        return iou, masks[:, 1:], torch.arange(b, device=iou.device)


class _Scratch:
    """Reusable scratch tensors, one per name, grown on demand. Large tensors allocated
    afresh for every chunk of points are mapped and faulted in by the OS each time, which
    on CPU costs as much as the arithmetic on them."""

    def __init__(self) -> None:
        self._store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised float tensor of ``shape`` on ``like``'s device and dtype; the
        previous tensor of the same name is overwritten."""
        numel = math.prod(shape)
        buf = self._store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._store[name] = buf
        return buf[:numel].view(shape)


@dataclass
class _FactoredContext:
    """Per-image state of :class:`_FactoredDecoder` (float32; N = h * w image tokens, C
    channels, D the attentions' internal width, d = D / heads)."""

    size: tuple[int, int]  # (h, w) of the image embedding
    keys: torch.Tensor  # (N, C) image tokens entering the first block (embedding + no-mask embedding)
    t2i_k: torch.Tensor  # (heads, d, N) first block: token-to-image keys, transposed, per head
    t2i_v: torch.Tensor  # (heads, N, d) first block: token-to-image values per head
    i2t_q: torch.Tensor  # (D, N) first block: image-to-token queries, transposed
    pe_k: list[torch.Tensor]  # later blocks, then the final attention: (D, N) k_proj(PE), transposed
    pe_q: list[torch.Tensor]  # later blocks: (D, N) q_proj(PE) of image-to-token attention, transposed


def _block_diagonal(x: torch.Tensor) -> torch.Tensor:
    """(B, T, heads, d) → (B, heads * T, heads * d): row h * T + t holds x[:, t, h] in the
    columns of head h, zeros elsewhere."""
    b, t, heads, d = x.shape
    eye = torch.eye(heads, dtype=x.dtype, device=x.device)
    return torch.einsum("bthe,hg->bhtge", x, eye).reshape(b, heads * t, heads * d)


class _FactoredDecoder:
    """SAM's mask decoder for many single-point prompts on one image, with the projections
    of the N image tokens folded into the few (T = 7) prompt tokens: the same function as
    ``MaskDecoder.forward(..., multimask_output=True)``, with float sums in another order.

    For one point, with X the (N, C) image tokens, PE their positional encoding and, per
    head h, W_*,h the rows of a projection that belong to the head:

    * token-to-image attention (later blocks and the final attention): the scores
      q_h ((X + PE) W_k,h^T + b_k,h)^T are (q_h W_k,h) X^T + q_h P_k,h^T with
      P_k = PE W_k^T + b_k fixed per image; the output attn_h (X W_v,h^T + b_v,h) is
      (attn_h X) W_v,h^T + b_v,h (softmax rows sum to 1);
    * image-to-token attention: the scores ((X + PE) W_q,h^T + b_q,h) k_h^T are
      X (k_h W_q,h)^T + P_q,h k_h^T with P_q = PE W_q^T + b_q; the output projection of
      the concatenated heads is sum_h attn_h (v_h W_o,h^T) + b_o, the bias added as
      b_o / heads to each head's rows (its attention rows sum to 1);
    * the first block's image tokens do not depend on the prompt: its image-token
      projections are computed once per image;
    * the upscaling head runs channels-last and only on the points whose masks are
      needed: a 2 x 2 stride-2 transposed convolution is one matrix product,
      LayerNorm2d is ``layer_norm`` over the channels; the (3, 4h, 4w) logits are
      rearranged at the end.

    Every per-point product with the image tokens is N x C x (heads * T) instead of
    N x C x D: 56 columns instead of 128 for SAM's 8 heads and 7 tokens. The points are
    decoded ``chunk`` at a time (whatever the batch): the per-point buffers (4 MiB of
    image tokens for SAM's 64 x 64 x 256) then stay in the CPU caches and are reused by
    the allocator instead of being mapped afresh.
    """

    def __init__(self, sam: Sam, chunk: int = 4) -> None:
        self.sam = sam
        self.decoder = sam.mask_decoder
        self.transformer = sam.mask_decoder.transformer
        self.chunk = chunk
        self.scratch = _Scratch()
        self.check_seconds = 0.0  # no one-time check (interface of _ExactDecoder)
        up = self.decoder.output_upscaling
        convs = [up[i] for i in (0, 3)] if len(up) == 5 else []
        self._channels_last = (
            len(convs) == 2
            and isinstance(up[1], LayerNorm2d)
            and isinstance(up[2], torch.nn.GELU)
            and isinstance(up[4], torch.nn.GELU)
            and all(
                isinstance(m, torch.nn.ConvTranspose2d)
                and m.kernel_size == (2, 2)
                and m.stride == (2, 2)
                and m.padding == (0, 0)
                and m.output_padding == (0, 0)
                and m.dilation == (1, 1)
                and m.groups == 1
                and m.bias is not None
                for m in convs
            )
        )

    # -- per image ------------------------------------------------------------------------------
    def context(self, features: torch.Tensor) -> _FactoredContext:
        """Per-image state for (1, C, h, w) image embeddings."""
        pe_encoder = self.sam.prompt_encoder
        height, width = features.shape[-2:]
        dense = pe_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        keys = (features + dense)[0].flatten(1).t().contiguous()  # (N, C)
        pe = pe_encoder.get_dense_pe()[0].flatten(1).t().contiguous()  # (N, C)
        first = self.transformer.layers[0]
        t2i = first.cross_attn_token_to_image
        heads = t2i.num_heads
        n = keys.shape[0]
        later = list(self.transformer.layers[1:])
        pe_attn = [layer.cross_attn_token_to_image for layer in later]
        pe_attn.append(self.transformer.final_attn_token_to_image)
        return _FactoredContext(
            size=(int(height), int(width)),
            keys=keys,
            t2i_k=t2i.k_proj(keys + pe).view(n, heads, -1).permute(1, 2, 0).contiguous(),
            t2i_v=t2i.v_proj(keys).view(n, heads, -1).transpose(0, 1).contiguous(),
            i2t_q=first.cross_attn_image_to_token.q_proj(keys + pe).t().contiguous(),
            pe_k=[attention.k_proj(pe).t().contiguous() for attention in pe_attn],
            pe_q=[layer.cross_attn_image_to_token.q_proj(pe).t().contiguous() for layer in later],
        )

    # -- attention ----------------------------------------------------------------------------------
    @staticmethod
    def _project_heads(linear: torch.nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, C) tokens → (B, T, heads, d) projection, scaled by 1 / sqrt(d)."""
        b, t, _ = x.shape
        y = linear(x)
        d = y.shape[-1] // heads
        return y.view(b, t, heads, d) * (1.0 / math.sqrt(d))

    def _softmax(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.ops.aten._softmax.out(x, dim, False, out=self.scratch.get("attn", tuple(x.shape), x))

    def _layer_norm(self, x: torch.Tensor, norm: torch.nn.LayerNorm | LayerNorm2d, name: str) -> torch.Tensor:
        """``layer_norm`` over the last dimension of ``x`` into the scratch tensor ``name``."""
        shape = tuple(x.shape)
        stats = (*shape[:-1], 1)
        out, _, _ = torch.ops.aten.native_layer_norm.out(
            x,
            [shape[-1]],
            norm.weight,
            norm.bias,
            norm.eps,
            out0=self.scratch.get(name, shape, x),
            out1=self.scratch.get("ln_mean", stats, x),
            out2=self.scratch.get("ln_rstd", stats, x),
        )
        return out

    def _token_to_image(
        self, attention: Attention, queries_in: torch.Tensor, x: torch.Tensor, pe_k: torch.Tensor
    ) -> torch.Tensor:
        """``attention(q=queries_in, k=x + PE, v=x)`` with the key and value projections
        folded into the queries. queries_in: (B, T, C); x: (B, N, C); pe_k: (D, N).
        Returns (B, T, C)."""
        b, t, c = queries_in.shape
        heads = attention.num_heads
        q = _FactoredDecoder._project_heads(attention.q_proj, queries_in, heads)  # (B, T, heads, d)
        d = q.shape[-1]
        w_k = attention.k_proj.weight.view(heads, d, c)
        folded = torch.einsum("bthe,hec->bhtc", q, w_k).reshape(b, heads * t, c)  # q_h W_k,h
        scores = self.scratch.get("scores", (b, heads * t, pe_k.shape[1]), x)
        torch.matmul(_block_diagonal(q), pe_k, out=scores)  # (B, heads*T, N): q_h P_k,h^T
        scores.baddbmm_(folded, x.transpose(1, 2))
        attn = self._softmax(scores, -1)
        ax = torch.bmm(attn, x).view(b, heads, t, c)  # attn_h X
        w_v = attention.v_proj.weight.view(heads, d, c)
        out = torch.einsum("bhtc,hec->bthe", ax, w_v).reshape(b, t, heads * d) + attention.v_proj.bias
        return attention.out_proj(out)

    def _image_to_token(
        self,
        attention: Attention,
        x: torch.Tensor,
        q_image: torch.Tensor | None,
        pe_q: torch.Tensor | None,
        keys_in: torch.Tensor,
        values_in: torch.Tensor,
    ) -> torch.Tensor:
        """x + ``attention(q=x + PE, k=keys_in, v=values_in)`` (the residual sum, before
        the block's LayerNorm) with the query projection folded into the token keys and
        the output projection into the token values.

        x: (N, C) shared or (B, N, C) image tokens; q_image: (D, N) their query
        projection when shared, else ``pe_q``: (D, N) the PE part of the queries;
        keys_in, values_in: (B, T, C). Returns (B, N, C).
        """
        b, t, c = keys_in.shape
        heads = attention.num_heads
        k = _FactoredDecoder._project_heads(attention.k_proj, keys_in, heads)  # (B, T, heads, d)
        d = k.shape[-1]
        k_bd = _block_diagonal(k)  # (B, heads*T, D)
        v = attention.v_proj(values_in).view(b, t, heads, d)
        w_o = attention.out_proj.weight.view(c, heads, d)
        v_out = torch.einsum("bthe,che->bhtc", v, w_o).reshape(b, heads * t, c)  # rows h*T + t: v_h W_o,h^T
        v_out += attention.out_proj.bias / heads
        n = x.shape[-2]
        scores = self.scratch.get("scores", (b, heads * t, n), x)
        if q_image is not None:
            torch.matmul(k_bd, q_image, out=scores)  # (B, heads*T, N)
        else:
            assert pe_q is not None
            torch.matmul(k_bd, pe_q, out=scores)
            scores.baddbmm_(torch.matmul(k_bd, attention.q_proj.weight), x.transpose(1, 2))  # k_h W_q,h X^T
        attn = self._softmax(scores.view(b, heads, t, n), 2).view(b, heads * t, n)  # over each head's T
        out = self.scratch.get("residual", (b, n, c), x)
        return torch.baddbmm(x if x.dim() == 3 else x.expand(b, -1, -1), attn.transpose(1, 2), v_out, out=out)

    @staticmethod
    def _token_block_start(block: Any, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """A two-way block's self-attention on the tokens and ``norm1``."""
        if block.skip_first_layer_pe:
            queries = block.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + block.self_attn(q=q, k=q, v=queries)
        return block.norm1(queries)

    def _transformer(self, ctx: _FactoredContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``TwoWayTransformer.forward``: tokens (B, T, C) → (queries (B, T, C), keys (B, N, C))."""
        layers = self.transformer.layers
        block = layers[0]
        b, t, _ = tokens.shape
        queries = self._token_block_start(block, tokens, tokens)
        # First block, token-to-image attention on prompt-independent keys and values.
        att = block.cross_attn_token_to_image
        q = self._project_heads(att.q_proj, queries + tokens, att.num_heads)  # (B, T, heads, d)
        q = q.permute(2, 0, 1, 3).reshape(att.num_heads, b * t, -1)
        scores = torch.bmm(
            q, ctx.t2i_k, out=self.scratch.get("scores", (q.shape[0], q.shape[1], ctx.t2i_k.shape[-1]), q)
        )
        out = torch.bmm(self._softmax(scores, -1), ctx.t2i_v)  # (heads, B*T, d)
        out = out.view(att.num_heads, b, t, -1).permute(1, 2, 0, 3).reshape(b, t, -1)
        queries = block.norm2(queries + att.out_proj(out))
        queries = block.norm3(queries + block.mlp(queries))
        keys = self._image_to_token(
            block.cross_attn_image_to_token, ctx.keys, ctx.i2t_q, None, queries + tokens, queries
        )
        keys = self._layer_norm(keys, block.norm4, "keys0")
        for i, block in enumerate(layers[1:]):
            queries = self._token_block_start(block, queries, tokens)
            attn_out = self._token_to_image(
                block.cross_attn_token_to_image, queries + tokens, keys, ctx.pe_k[i]
            )
            queries = block.norm2(queries + attn_out)
            queries = block.norm3(queries + block.mlp(queries))
            keys = self._image_to_token(
                block.cross_attn_image_to_token, keys, None, ctx.pe_q[i], queries + tokens, queries
            )
            keys = self._layer_norm(keys, block.norm4, f"keys{(i + 1) % 2}")
        final = self.transformer.final_attn_token_to_image
        attn_out = self._token_to_image(final, queries + tokens, keys, ctx.pe_k[-1])
        return self.transformer.norm_final_attn(queries + attn_out), keys

    # -- masks ----------------------------------------------------------------------------------------
    def _upscale_channels_last(self, keys: torch.Tensor) -> torch.Tensor:
        """(S, N, C) → (S, 16 N, C'') the upscaling head's output, channels last, rows in
        the order (token, first convolution's kernel row and column, second's)."""
        conv1, norm, act1, conv2, act2 = self.decoder.output_upscaling
        s, n, c = keys.shape
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # (C, kernel row, column, out)
        scratch = self.scratch
        z = scratch.get("up1", (s * n, 4 * c1), keys)
        torch.addmm(conv1.bias.repeat(4), keys.reshape(s * n, c), w1, out=z)
        z = self._layer_norm(z.view(s * n * 4, c1), norm, "up1_norm")
        torch.ops.aten.gelu_(z, approximate=act1.approximate)
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        g = scratch.get("up2", (s * n * 4, 4 * c2), keys)
        torch.addmm(conv2.bias.repeat(4), z, w2, out=g)
        torch.ops.aten.gelu_(g, approximate=act2.approximate)
        return g.view(s, n * 16, c2)

    def _masks(self, keys: torch.Tensor, hs: torch.Tensor, size: tuple[int, int], out: torch.Tensor) -> None:
        """Multimask logits into ``out`` (S, 3, 4h, 4w) from final keys (S, N, C) and
        tokens (S, T, C)."""
        decoder = self.decoder
        s, _, c = keys.shape
        height, width = size
        hyper = torch.stack(
            [
                decoder.output_hypernetworks_mlps[i](hs[:, 1 + i, :])
                for i in range(1, decoder.num_mask_tokens)
            ],
            dim=1,
        )  # (S, 3, C'')
        m = hyper.shape[1]
        if not self._channels_last:
            upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(s, c, height, width))
            _, c_up, h_up, w_up = upscaled.shape
            out.copy_((hyper @ upscaled.view(s, c_up, h_up * w_up)).view(s, m, h_up, w_up))
            return
        up = self._upscale_channels_last(keys)
        logits = torch.bmm(up, hyper.transpose(1, 2), out=self.scratch.get("logits", (s, up.shape[1], m), up))
        # row (i, j, a, b, a2, b2) → pixel (4i + 2a + a2, 4j + 2b + b2) of each mask
        logits = logits.view(s, height, width, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        out.view(s, m, height, 2, 2, width, 2, 2).copy_(logits)

    def __call__(
        self,
        ctx: _FactoredContext,
        points: torch.Tensor,
        need_masks: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode a batch of single-point prompts.

        Args:
            ctx: the image's context.
            points: (B, 2) float64 XY in the encoder frame (``ResizeLongestSide.apply_coords``).
            need_masks: called with (b, 3) predicted IoUs of some of the points, returns
                (b,) bool: the points whose masks are computed.
        Returns:
            iou: (B, 3) float32 predicted IoU of the three multimask outputs;
            low_res: (S, 3, 4h, 4w) float32 logits of the points ``index``;
            index: (S,) int64 increasing indices into the batch.
        """
        labels = torch.ones(points.shape[0], dtype=torch.int, device=points.device)
        sparse, _ = self.sam.prompt_encoder(
            points=(points[:, None, :], labels[:, None]), boxes=None, masks=None
        )
        decoder = self.decoder
        b = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        height, width = ctx.size
        masks = points.new_empty((b, decoder.num_mask_tokens - 1, 4 * height, 4 * width), dtype=torch.float32)
        ious, indices = [], []
        filled = 0
        for start in range(0, b, self.chunk):
            hs, keys = self._transformer(ctx, tokens[start : start + self.chunk])
            iou = decoder.iou_prediction_head(hs[:, 0, :])[:, 1:]
            ious.append(iou)
            index = torch.nonzero(need_masks(iou)).flatten()
            if index.numel():
                if index.numel() < iou.shape[0]:
                    keys, hs = keys[index], hs[index]
                self._masks(keys, hs, ctx.size, masks[filled : filled + index.numel()])
                filled += index.numel()
                indices.append(index + start)
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=masks.device)
        return torch.cat(ious), masks[:filled], index


# Low-resolution window [i - before, i + after] that bounds the outputs counted at index i
# (see _window_counts): the general case, and the common one where the second resize of
# ``upsample_logits`` is the identity and the first has scale exactly 4.
_WIDE_WINDOW = (2, 3)
_EXACT_WINDOW = (0, 1)


def _window_counts(out_len: int, in_len: int, low_len: int, encoder_size: int) -> np.ndarray:
    """For each low-resolution index i, how many output rows (or columns) are counted at i.

    Output index y (after both resizes of ``upsample_logits``) reads encoder-frame indices
    a and a + 1 with a = floor((y + 0.5) * in_len / out_len - 0.5), each of which reads
    low-resolution indices f and f + 1 with f = floor((a + 0.5) * low_len / encoder_size
    - 0.5); y is counted at its f computed here. When the second resize is the identity
    (a = y) and low_len / encoder_size is exactly 1/4, this is the kernel's own index
    arithmetic (exact in floating point) and y reads only f and f + 1 (``_EXACT_WINDOW``);
    otherwise ``_WIDE_WINDOW``'s margins cover f + 1, the second encoder-frame index and
    rounding differences in the kernel's own index maths.
    """
    y = np.arange(out_len, dtype=np.float64)
    a = np.floor(np.maximum(0.0, (y + 0.5) * (in_len / out_len) - 0.5)) if out_len != in_len else y
    first = np.floor(np.maximum(0.0, (a + 0.5) * (low_len / encoder_size) - 0.5)).astype(np.int64)
    return np.bincount(np.clip(first, 0, low_len - 1), minlength=low_len)


def _window_extreme(x: torch.Tensor, largest: bool, window: tuple[int, int] = _WIDE_WINDOW) -> torch.Tensor:
    """(N, h, w) → (N, h, w): max (or min) of ``x`` over the window of rows
    i - before .. i + after and columns j - before .. j + after (cut at the borders), with
    ``window = (before, after)``."""
    before, after = window
    sign = 1.0 if largest else -1.0
    padded = F.pad(sign * x[:, None], (before, after, before, after), value=-math.inf)
    return sign * F.max_pool2d(padded, before + after + 1, stride=1)[:, 0]


class _PostProcessor:
    """``SamAutomaticMaskGenerator``'s filtering, NMS and our area ordering for one image,
    on the device, without upsampling masks whose fate is already known.

    Bilinear interpolation is a convex combination: an upsampled logit lies between the
    smallest and the largest low-resolution logit it reads (up to float rounding, covered
    by a margin of 1e-5 of the mask's largest magnitude). Counting, from the
    low-resolution logits alone, the output pixels that are certainly above or certainly
    not above a threshold bounds the exact counts behind the stability score and the
    area. Masks whose stability is certainly below the threshold are dropped without
    being upsampled; when NMS cannot drop anything (``box_nms_thresh >= 1``: box IoU never
    exceeds 1) and the stability filter is certainly passed (or off), exact areas are only
    computed for masks whose upper area bound reaches the ``max_proposals``-th largest
    lower bound, the only ones that can be returned (for the stability filter alone the
    bounds are dropped for the rest of the image when they reject few masks). Every other
    mask is upsampled with ``upsample_logits`` (the reference's values bit for bit) and
    measured exactly.
    """

    def __init__(
        self,
        sam: Sam,
        config: ProposalConfig,
        grid: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> None:
        self.sam = sam
        self.grid = grid  # (N, 2) float64 XY pixels of the point grid
        self.config = config
        self.input_size = input_size
        self.original_size = original_size
        self.encoder_size = int(sam.image_encoder.img_size)
        self.device = torch.device(sam.device)
        height, width = original_size
        self.total = height * width
        # Masks per upsampling chunk: a multiple of 3, since upsample_logits pads to one.
        self.step = 3 * max(1, _POST_CHUNK_PIXELS // (3 * self.total))
        low_pixels = (self.encoder_size // 4) ** 2
        self.bound_step = max(1, _BOUND_CHUNK_PIXELS // low_pixels)  # masks per bounds chunk
        self.threshold = float(sam.mask_threshold)
        self.stability_filter = config.stability_score_thresh > 0.0
        self.nms_noop = config.box_nms_thresh >= 1.0
        # The reference compares float32 scores with the threshold in float32.
        self.stability_thresh = float(np.float32(config.stability_score_thresh))
        self._geometry: tuple[torch.Tensor, torch.Tensor] | None = None
        self.window = _WIDE_WINDOW  # set with the geometry
        self._bound_tries = self._bound_hits = 0  # masks tried on / rejected by the bounds
        self.fields: dict[str, list[torch.Tensor]] = {
            name: []
            for name in ("rank", "iou", "stability", "boxes", "area_low", "area_up", "exact", "low_res")
        }

    # -- bounds ------------------------------------------------------------------------------
    def _counts(self, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) float32 window counts, cut after the last window any output reads."""
        if self._geometry is None:
            low_h, low_w = low_res.shape[-2:]
            (height, width), (in_h, in_w) = self.original_size, self.input_size
            identity = (height, width) == (in_h, in_w) and self.encoder_size == 4 * low_h == 4 * low_w
            self.window = _EXACT_WINDOW if identity else _WIDE_WINDOW
            counts = []
            for out_len, in_len, low_len in ((height, in_h, low_h), (width, in_w, low_w)):
                c = _window_counts(out_len, in_len, low_len, self.encoder_size)
                # window i reads up to i + after
                used = min(low_len, int(np.flatnonzero(c)[-1]) + self.window[1] + 1)
                counts.append(torch.as_tensor(c[:used], dtype=torch.float32, device=self.device))
            self._geometry = (counts[0], counts[1])
        return self._geometry

    def _bounds(self, low_res: torch.Tensor) -> Callable[[float], tuple[torch.Tensor, torch.Tensor]]:
        """For (N, h, w) logits: a function of a threshold t giving (N,) float64 lower and
        upper bounds of the number of upsampled logits > t (integers)."""
        rows, cols = self._counts(low_res)
        x = low_res[:, : rows.shape[0], : cols.shape[0]]
        window_min = _window_extreme(x, largest=False, window=self.window)
        window_max = _window_extreme(x, largest=True, window=self.window)
        margin = (1e-5 * (1.0 + low_res.abs().amax(dim=(1, 2))))[:, None, None]

        def count(t: float) -> tuple[torch.Tensor, torch.Tensor]:
            # (N, h', w') @ (w',) @ (h',): sums of integers below 2**24, exact in float32
            above = ((window_min > t + margin).float() @ cols) @ rows
            not_above = ((window_max < t - margin).float() @ cols) @ rows
            return above.double(), self.total - not_above.double()

        return count

    # -- per batch ------------------------------------------------------------------------------
    def add_batch(self, iou: torch.Tensor, low_res: torch.Tensor, points: torch.Tensor) -> None:
        """Filter decoded masks like ``SamAutomaticMaskGenerator._process_batch``.

        iou: (B, 3); low_res: (B, 3, h, w) logits of the grid points ``points`` ((B,)
        int64 indices into the grid, increasing).
        """
        cfg = self.config
        iou = iou.flatten(0, 1)  # (3B,) point-major, like the reference's flatten(0, 1)
        low_res = low_res.flatten(0, 1)
        m = torch.arange(3, device=iou.device)
        rank = (3 * points[:, None] + m).flatten()  # mask index in the image
        if cfg.pred_iou_thresh > 0.0:
            keep = torch.nonzero(iou > cfg.pred_iou_thresh).flatten()
            iou, low_res, rank = iou[keep], low_res[keep], rank[keep]
        step = self.bound_step
        for s in range(0, iou.shape[0], step):
            self._add_chunk(iou[s : s + step], low_res[s : s + step], rank[s : s + step])

    def _use_bounds(self) -> bool:
        """Bounds are needed to defer masks when NMS drops nothing; for the stability
        filter alone they are skipped once they have rejected under a quarter of the
        masks they were tried on (they cost about half an exact measurement)."""
        if self.nms_noop:
            return True
        if not self.stability_filter:
            return False
        return self._bound_tries < 64 or self._bound_hits >= 0.25 * self._bound_tries

    def _add_chunk(self, iou: torch.Tensor, low_res: torch.Tensor, rank: torch.Tensor) -> None:
        if not self._use_bounds():
            self._measure(rank, iou, low_res)
            return
        count = self._bounds(low_res)
        keep = torch.arange(iou.shape[0], device=iou.device)
        sure = torch.ones(iou.shape[0], dtype=torch.bool, device=iou.device)  # certainly passes
        if self.stability_filter:
            offset = self.config.stability_score_offset
            inter_low, inter_up = count(self.threshold + offset)
            union_low, union_up = count(self.threshold - offset)
            fails = inter_up < (self.stability_thresh - 1e-6) * union_low
            sure = (inter_low > 0) & (inter_low >= (self.stability_thresh + 1e-6) * union_up)
            keep = torch.nonzero(~fails).flatten()
            self._bound_tries += iou.shape[0]
            self._bound_hits += iou.shape[0] - keep.shape[0]
        now = keep
        if self.nms_noop:
            area_low, area_up = count(self.threshold)
            later, now = keep[sure[keep]], keep[~sure[keep]]
            if later.numel():
                self._store(
                    rank=rank[later],
                    iou=iou[later],
                    stability=torch.full((later.numel(),), math.nan, device=iou.device),
                    boxes=torch.zeros((later.numel(), 4), dtype=torch.int64, device=iou.device),
                    area_low=area_low[later].round().long(),
                    area_up=area_up[later].round().long(),
                    exact=torch.zeros(later.numel(), dtype=torch.bool, device=iou.device),
                    low_res=low_res[later],
                )
        if now.numel():
            self._measure(rank[now], iou[now], low_res[now])

    def _exact(self, low_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upsampled logits (N, H, W) and their stability scores (N,) float32."""
        logits = upsample_logits(low_res, self.encoder_size, self.input_size, self.original_size)
        offset = self.config.stability_score_offset
        # calculate_stability_score: one mask always contains the other
        stability = _threshold_counts(logits, self.threshold + offset) / _threshold_counts(
            logits, self.threshold - offset
        )
        return logits, stability

    def _measure(self, rank: torch.Tensor, iou: torch.Tensor, low_res: torch.Tensor) -> None:
        """Upsample exactly (in chunks), filter on stability, store exact areas and boxes."""
        for s in range(0, rank.shape[0], self.step):
            self._measure_chunk(rank[s : s + self.step], iou[s : s + self.step], low_res[s : s + self.step])

    def _measure_chunk(self, rank: torch.Tensor, iou: torch.Tensor, low_res: torch.Tensor) -> None:
        logits, stability = self._exact(low_res)
        if self.stability_filter:
            keep = torch.nonzero(stability >= self.config.stability_score_thresh).flatten()
            rank, iou, low_res, logits, stability = (
                rank[keep],
                iou[keep],
                low_res[keep],
                logits[keep],
                stability[keep],
            )
        masks = logits > self.threshold
        areas = _pixel_counts(masks).long()
        self._store(
            rank=rank,
            iou=iou,
            stability=stability,
            boxes=boxes_from_masks(masks),
            area_low=areas,
            area_up=areas,
            exact=torch.ones(rank.shape[0], dtype=torch.bool, device=rank.device),
            low_res=low_res,
        )

    def _store(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.fields[name].append(value)

    # -- end of the image -------------------------------------------------------------------------
    def select(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """NMS on the same inputs as the reference, area order, cut to ``max_proposals``.

        Returns masks (K, H, W) bool, predicted IoU (K,), stability (K,) and point XY (K, 2)
        at SAM's input resolution, largest area first.
        """
        height, width = self.original_size
        if not self.fields["rank"]:
            return (
                np.zeros((0, height, width), dtype=bool),
                np.zeros((0,), dtype=np.float32),
                np.zeros((0,), dtype=np.float32),
                np.zeros((0, 2), dtype=np.float64),
            )
        f = {name: torch.cat(values) for name, values in self.fields.items()}
        order = torch.argsort(f["rank"])  # generation order: the reference's concatenation
        f = {name: value[order] for name, value in f.items()}
        # Deferred masks have no box; they only exist when NMS drops nothing, so its
        # output (score order) does not depend on the boxes.
        keep = batched_nms(
            f["boxes"].float(),
            f["iou"],
            torch.zeros(len(order), device=order.device),
            self.config.box_nms_thresh,
        )
        limit = self.config.max_proposals
        if not bool(f["exact"][keep].all()):
            if keep.numel() > limit:
                # Masks whose largest possible area is below the limit-th largest certain
                # area are smaller than at least `limit` masks: they cannot be returned.
                cutoff = torch.topk(f["area_low"][keep], limit).values[-1]
                keep = keep[f["area_up"][keep] >= cutoff]
            pending = keep[~f["exact"][keep]]
            for s in range(0, pending.numel(), self.step):
                index = pending[s : s + self.step]
                logits, stability = self._exact(f["low_res"][index])
                f["area_low"][index] = _threshold_counts(logits, self.threshold).long()
                f["stability"][index] = stability
        chosen = keep[
            torch.as_tensor(area_order(f["area_low"][keep].cpu().numpy(), limit), device=keep.device)
        ]
        low_res = f["low_res"][chosen]
        masks = torch.zeros((chosen.numel(), height, width), dtype=torch.bool, device=low_res.device)
        for s in range(0, chosen.numel(), self.step):
            logits = upsample_logits(
                low_res[s : s + self.step], self.encoder_size, self.input_size, self.original_size
            )
            masks[s : s + self.step] = logits > self.threshold
        return (
            masks.cpu().numpy(),
            f["iou"][chosen].cpu().numpy(),
            f["stability"][chosen].cpu().numpy(),
            self.grid[f["rank"][chosen] // 3].cpu().numpy(),
        )


class ProposalGenerator:
    """Class-agnostic mask proposals for a frame: SAM everything mode (see module doc).

    Args:
        sam: a SAM model (``llmseg_ros.sam.build_sam``); its device is used.
        points_per_side: the prompt grid has ``points_per_side ** 2`` points.
        points_per_batch: points decoded together (bounds memory; the same batches as
            SAM's generator, which keeps the fast path's masks identical).
        pred_iou_thresh: keep masks whose predicted IoU is above this (no filter when
            <= 0, like SAM's generator).
        stability_score_thresh: keep masks whose stability score is at least this (no
            filter when <= 0).
        stability_score_offset: logit offset of the stability score.
        box_nms_thresh: box IoU above which NMS drops the lower-scored mask.
        max_proposals: at most this many masks are returned (the largest).
        max_long_side: the image is first downscaled (INTER_AREA) to this long side.
        implementation: ``"fast"`` or ``"reference"`` (``SamAutomaticMaskGenerator``).
        decoder: the fast path's mask decoder, ``"factored"`` (fastest, masks agree with
            the reference) or ``"exact"`` (bit for bit); ignored by the reference.
        encoder_dtype: ``None``/``"float32"``, or ``"float16"``/``"bfloat16"`` for the
            image encoder under CUDA autocast (fast path, CUDA only; masks then differ
            slightly from the reference).
        compile_encoder: ``torch.compile`` the image encoder (fast path, CUDA only).

    After each ``generate`` call, ``last_timings`` holds seconds per stage
    (``resize``, ``image_encoder``, ``mask_decoder``, ``postprocess``, ``total``, and
    ``decoder_check`` on the first call that checks the decoder shortcut for this model;
    the reference implementation only reports ``resize`` and ``total``).
    """

    def __init__(
        self,
        sam: Sam,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        max_proposals: int = 50,
        max_long_side: int = 1024,
        implementation: str = "fast",
        decoder: str = "factored",
        *,
        encoder_dtype: str | None = None,
        compile_encoder: bool = False,
    ) -> None:
        self.config = ProposalConfig(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            max_proposals=max_proposals,
            max_long_side=max_long_side,
            implementation=implementation,
            decoder=decoder,
        )
        self.sam = sam
        self.device = torch.device(sam.device)
        if encoder_dtype in (None, "float32"):
            self.encoder_dtype: torch.dtype | None = None
        elif encoder_dtype in _ENCODER_DTYPES:
            self.encoder_dtype = _ENCODER_DTYPES[encoder_dtype]
        else:
            raise ValueError(
                f"encoder_dtype must be None, 'float32', 'float16' or 'bfloat16', got {encoder_dtype!r}"
            )
        if (self.encoder_dtype is not None or compile_encoder) and self.device.type != "cuda":
            raise ValueError(
                f"encoder_dtype={encoder_dtype!r} / compile_encoder={compile_encoder} need SAM on CUDA, "
                f"but it is on {self.device}"
            )
        if (self.encoder_dtype is not None or compile_encoder) and implementation != "fast":
            raise ValueError("encoder_dtype and compile_encoder apply to implementation='fast' only")
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self._encoder: Callable[[torch.Tensor], torch.Tensor] = sam.image_encoder
        if compile_encoder:
            self._encoder = torch.compile(sam.image_encoder)
        self._decoder: _ExactDecoder | _FactoredDecoder = (
            _FactoredDecoder(sam) if decoder == "factored" else _ExactDecoder(sam)
        )
        self._reference: SamAutomaticMaskGenerator | None = None
        if implementation == "reference":
            self._reference = SamAutomaticMaskGenerator(
                sam,
                points_per_side=points_per_side,
                points_per_batch=points_per_batch,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                stability_score_offset=stability_score_offset,
                box_nms_thresh=box_nms_thresh,
                crop_n_layers=0,
                min_mask_region_area=0,
                output_mode="binary_mask",
            )
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_config(cls, sam: Sam, cfg: ProposalConfig, **options: Any) -> ProposalGenerator:
        """Build from a :class:`ProposalConfig`; ``options`` are the keyword-only flags."""
        return cls(
            sam,
            points_per_side=cfg.points_per_side,
            points_per_batch=cfg.points_per_batch,
            pred_iou_thresh=cfg.pred_iou_thresh,
            stability_score_thresh=cfg.stability_score_thresh,
            stability_score_offset=cfg.stability_score_offset,
            box_nms_thresh=cfg.box_nms_thresh,
            max_proposals=cfg.max_proposals,
            max_long_side=cfg.max_long_side,
            implementation=cfg.implementation,
            decoder=cfg.decoder,
            **options,
        )

    @property
    def implementation(self) -> str:
        return self.config.implementation

    # -- public API -------------------------------------------------------------------
    def generate(self, image: np.ndarray) -> Proposals:
        """Mask proposals for one RGB frame.

        Args:
            image: (H, W, 3) uint8 RGB.
        Returns:
            Proposals with masks (K, H, W) bool at the input resolution, largest area
            first (area measured at SAM's resolution, ties in NMS order), K <=
            ``max_proposals``; boxes XYXY (inclusive) of the returned masks; point
            coordinates in input pixels. ``Proposals.empty(H, W)`` when nothing passes.
        Raises:
            TypeError, ValueError: ``image`` is not an (H, W, 3) uint8 array.
        """
        check_image(image)
        start = time.perf_counter()
        small = downscale_long_side(image, self.config.max_long_side)
        timings = {"resize": time.perf_counter() - start}
        if self._reference is not None:
            selected = self._generate_reference(small)
        else:
            selected = self._generate_fast(small, timings)
        proposals = self._finish(selected, image.shape[:2], small.shape[:2])
        timings["total"] = time.perf_counter() - start
        self.last_timings = timings
        return proposals

    # -- shared end ---------------------------------------------------------------------
    def _finish(
        self,
        selected: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        input_hw: tuple[int, ...],
        small_hw: tuple[int, ...],
    ) -> Proposals:
        """Selected masks at SAM's resolution → Proposals at the input resolution."""
        masks, iou, stability, points = selected
        height, width = int(input_hw[0]), int(input_hw[1])
        if masks.shape[0] == 0:
            return Proposals.empty(height, width)
        masks = resize_masks_nearest(masks, (height, width))
        scale = np.array([width / small_hw[1], height / small_hw[0]], dtype=np.float64)
        return Proposals(
            masks=masks,
            predicted_iou=iou.astype(np.float32),
            stability_score=stability.astype(np.float32),
            boxes=mask_boxes_xyxy(masks),
            point_coords=(points * scale).astype(np.float32),
        )

    # -- reference ------------------------------------------------------------------------
    def _generate_reference(self, small: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        assert self._reference is not None
        records = self._reference.generate(small)
        areas = np.array([r["area"] for r in records], dtype=np.int64)
        chosen = [records[i] for i in area_order(areas, self.config.max_proposals)]
        h, w = small.shape[:2]
        masks = np.zeros((len(chosen), h, w), dtype=bool)
        for i, record in enumerate(chosen):
            masks[i] = record["segmentation"]
        return (
            masks,
            np.array([r["predicted_iou"] for r in chosen], dtype=np.float32),
            np.array([r["stability_score"] for r in chosen], dtype=np.float32),
            np.array([r["point_coords"][0] for r in chosen], dtype=np.float64).reshape(-1, 2),
        )

    # -- fast ---------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _encode(self, small: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """``SamPredictor.set_image``: (1, C, h, w) float32 embedding and the resized size."""
        resized = self.transform.apply_image(small)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        x = self.sam.preprocess(pixels)
        if self.encoder_dtype is not None:
            with torch.autocast(device_type="cuda", dtype=self.encoder_dtype):
                features = self._encoder(x)
        else:
            features = self._encoder(x)
        return features.float(), (int(pixels.shape[-2]), int(pixels.shape[-1]))

    @torch.inference_mode()
    def _generate_fast(
        self, small: np.ndarray, timings: dict[str, float]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        t0 = time.perf_counter()
        features, input_size = self._encode(small)
        self._sync()
        t1 = time.perf_counter()
        timings["image_encoder"] = t1 - t0

        h, w = small.shape[:2]
        ctx = self._decoder.context(features)
        grid = build_point_grid(cfg.points_per_side) * np.array([[w, h]], dtype=np.float64)  # (N, 2) XY
        in_points = torch.as_tensor(self.transform.apply_coords(grid, (h, w)), device=self.device)
        grid_t = torch.as_tensor(grid, device=self.device)
        iou_thresh = cfg.pred_iou_thresh

        def need_masks(iou: torch.Tensor) -> torch.Tensor:
            if iou_thresh <= 0.0:
                return torch.ones(iou.shape[0], dtype=torch.bool, device=iou.device)
            return (iou > iou_thresh).any(dim=1)

        post = _PostProcessor(self.sam, cfg, grid_t, input_size, (h, w))
        self._decoder.check_seconds = 0.0
        decode_time = post_time = 0.0
        for start in range(0, in_points.shape[0], cfg.points_per_batch):
            stop = start + cfg.points_per_batch
            t_a = time.perf_counter()
            iou, low_res, index = self._decoder(ctx, in_points[start:stop], need_masks)  # type: ignore[arg-type]
            self._sync()
            t_b = time.perf_counter()
            decode_time += t_b - t_a
            if index.numel():
                post.add_batch(iou[index], low_res, index + start)
            self._sync()
            post_time += time.perf_counter() - t_b

        t_c = time.perf_counter()
        selected = post.select()
        self._sync()
        timings["mask_decoder"] = decode_time - self._decoder.check_seconds
        if self._decoder.check_seconds:
            timings["decoder_check"] = self._decoder.check_seconds
        timings["postprocess"] = post_time + time.perf_counter() - t_c
        return selected
