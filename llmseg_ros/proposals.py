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

  - the image encoder and the mask decoder run on the same inputs and the same batches of
    ``points_per_batch`` points as the reference, so every kernel sees the same shapes;
    the decoder computes the prompt-independent projections of the image tokens in its
    first two-way block once per image instead of once per point (checked bit for bit
    against SAM's own forward on the first batch a model decodes; if a backend rounds
    differently the generator uses SAM's forward) and skips its upscaling head for
    batches where no mask passes the IoU filter;
  - the predicted-IoU filter runs before any upsampling;
  - masks whose stability score is certainly below the threshold, or (when NMS cannot
    drop anything) whose area certainly keeps them out of the ``max_proposals`` largest,
    are recognised from bounds on the low-resolution logits and never upsampled;
  - every other mask is upsampled with the very same ``F.interpolate`` calls as SAM's
    ``postprocess_masks`` (restricted to the unpadded region, in small chunks) and its
    stability, area and box are computed exactly on the device; NMS is ``torchvision``'s
    ``batched_nms`` on the same inputs (same tie-breaking); no RLE round trip; only the
    returned masks are upsampled again at the end.

  The masks are therefore identical to the reference's, not just close (the tests check
  this bit for bit).

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
from segment_anything.modeling.transformer import Attention
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms

from llmseg_ros.config import ProposalConfig
from llmseg_ros.types import Proposals

logger = logging.getLogger(__name__)

_ENCODER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_POST_CHUNK_PIXELS = 1 << 22  # upsampled logits per post-processing chunk (16 MiB of float32)
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
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
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


def _threshold_counts(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-mask count of logits above ``threshold``: (N, H, W) → (N,) int32."""
    return (logits > threshold).sum(dim=(-1, -2), dtype=torch.int32)


@dataclass
class _ImageContext:
    """Per-image decoder inputs shared by every point batch."""

    features: torch.Tensor  # (1, C, h, w) image embedding
    image_pe: torch.Tensor  # (1, C, h, w) dense positional encoding
    dense: torch.Tensor  # (1, C, h, w) no-mask embedding
    shared: dict[str, torch.Tensor] | None = None  # first-block image-token projections


class _FastDecoder:
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
        need_masks: Callable[[torch.Tensor], bool],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode a batch of single-point prompts.

        Args:
            ctx: the image's context.
            points: (B, 2) float64 XY in the encoder frame (``ResizeLongestSide.apply_coords``).
            need_masks: called with the (B, 3) predicted IoUs; the masks are only
                computed when it returns True.
        Returns:
            iou: (B, 3) float32 predicted IoU of the three multimask outputs;
            low_res: (B, 3, 4h, 4w) float32 logits, or ``None`` when not needed.
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
        if not need_masks(iou):
            return iou, None
        _, channels, height, width = ctx.features.shape
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, channels, height, width))
        mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
        )
        _, c_up, h_up, w_up = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c_up, h_up * w_up)).view(b, -1, h_up, w_up)
        return iou, masks[:, 1:]


def _window_counts(out_len: int, in_len: int, low_len: int, encoder_size: int) -> np.ndarray:
    """For each low-resolution index i, how many output rows (or columns) read only
    low-resolution indices in the window [i - 2, i + 3].

    Output index y (after both resizes of ``upsample_logits``) reads encoder-frame indices
    a and a + 1 with a = floor((y + 0.5) * in_len / out_len - 0.5), each of which reads
    low-resolution indices f and f + 1 with f = floor((a + 0.5) * low_len / encoder_size
    - 0.5). y is counted at its f computed here; the window's margins cover f + 1, the
    second encoder-frame index and rounding differences in the kernel's own index maths.
    """
    y = np.arange(out_len, dtype=np.float64)
    a = np.floor(np.maximum(0.0, (y + 0.5) * (in_len / out_len) - 0.5)) if out_len != in_len else y
    first = np.floor(np.maximum(0.0, (a + 0.5) * (low_len / encoder_size) - 0.5)).astype(np.int64)
    return np.bincount(np.clip(first, 0, low_len - 1), minlength=low_len)


def _window_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """(N, h, w) → (N, h, w): max (or min) of ``x`` over the window of rows i - 2 .. i + 3
    and columns j - 2 .. j + 3 (cut at the borders)."""
    op = torch.maximum if largest else torch.minimum
    fill = -math.inf if largest else math.inf
    for pad, dim in (((2, 3), 2), ((0, 0, 2, 3), 1)):
        n = x.shape[dim]
        p = F.pad(x, pad, value=fill)  # length n + 5 along dim
        w2 = op(p.narrow(dim, 0, n + 4), p.narrow(dim, 1, n + 4))  # windows of 2
        w4 = op(w2.narrow(dim, 0, n + 2), w2.narrow(dim, 2, n + 2))  # windows of 4
        x = op(w4.narrow(dim, 0, n), w2.narrow(dim, 4, n))  # windows of 6
    return x


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
    lower bound, the only ones that can be returned. Every other mask is upsampled with
    ``upsample_logits`` (the reference's values bit for bit) and measured exactly.
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
        self.step = max(1, _POST_CHUNK_PIXELS // self.total)  # masks per upsampling chunk
        low_pixels = (self.encoder_size // 4) ** 2
        self.bound_step = max(1, _BOUND_CHUNK_PIXELS // low_pixels)  # masks per bounds chunk
        self.threshold = float(sam.mask_threshold)
        self.stability_filter = config.stability_score_thresh > 0.0
        self.nms_noop = config.box_nms_thresh >= 1.0
        # The reference compares float32 scores with the threshold in float32.
        self.stability_thresh = float(np.float32(config.stability_score_thresh))
        self._geometry: tuple[torch.Tensor, torch.Tensor] | None = None
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
            counts = []
            for out_len, in_len, low_len in ((height, in_h, low_h), (width, in_w, low_w)):
                c = _window_counts(out_len, in_len, low_len, self.encoder_size)
                used = min(low_len, int(np.flatnonzero(c)[-1]) + 4)  # window i reads up to i + 3
                counts.append(torch.as_tensor(c[:used], dtype=torch.float32, device=self.device))
            self._geometry = (counts[0], counts[1])
        return self._geometry

    def _bounds(self, low_res: torch.Tensor) -> Callable[[float], tuple[torch.Tensor, torch.Tensor]]:
        """For (N, h, w) logits: a function of a threshold t giving (N,) float64 lower and
        upper bounds of the number of upsampled logits > t (integers)."""
        rows, cols = self._counts(low_res)
        x = low_res[:, : rows.shape[0], : cols.shape[0]]
        window_min, window_max = _window_extreme(x, largest=False), _window_extreme(x, largest=True)
        margin = (1e-5 * (1.0 + low_res.abs().amax(dim=(1, 2))))[:, None, None]

        def count(t: float) -> tuple[torch.Tensor, torch.Tensor]:
            # (N, h', w') @ (w',) @ (h',): sums of integers below 2**24, exact in float32
            above = ((window_min > t + margin).float() @ cols) @ rows
            not_above = ((window_max < t - margin).float() @ cols) @ rows
            return above.double(), self.total - not_above.double()

        return count

    # -- per batch ------------------------------------------------------------------------------
    def add_batch(self, iou: torch.Tensor, low_res: torch.Tensor, first_point: int) -> None:
        """Filter one decoded batch like ``SamAutomaticMaskGenerator._process_batch``.

        iou: (B, 3); low_res: (B, 3, h, w) logits of grid points ``first_point`` onwards.
        """
        cfg = self.config
        iou = iou.flatten(0, 1)  # (3B,) point-major, like the reference's flatten(0, 1)
        low_res = low_res.flatten(0, 1)
        rank = torch.arange(iou.shape[0], device=iou.device) + 3 * first_point  # mask index in the image
        if cfg.pred_iou_thresh > 0.0:
            keep = torch.nonzero(iou > cfg.pred_iou_thresh).flatten()
            iou, low_res, rank = iou[keep], low_res[keep], rank[keep]
        step = self.bound_step
        for s in range(0, iou.shape[0], step):
            self._add_chunk(iou[s : s + step], low_res[s : s + step], rank[s : s + step])

    def _add_chunk(self, iou: torch.Tensor, low_res: torch.Tensor, rank: torch.Tensor) -> None:
        if not (self.stability_filter or self.nms_noop):
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
        areas = masks.sum(dim=(-1, -2))
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
                f["area_low"][index] = (logits > self.threshold).sum(dim=(-1, -2))
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
        self._decoder = _FastDecoder(sam)
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

        def need_masks(iou: torch.Tensor) -> bool:
            return iou_thresh <= 0.0 or bool((iou > iou_thresh).any())

        post = _PostProcessor(self.sam, cfg, grid_t, input_size, (h, w))
        self._decoder.check_seconds = 0.0
        decode_time = post_time = 0.0
        for start in range(0, in_points.shape[0], cfg.points_per_batch):
            stop = start + cfg.points_per_batch
            t_a = time.perf_counter()
            iou, low_res = self._decoder(ctx, in_points[start:stop], need_masks)
            self._sync()
            t_b = time.perf_counter()
            decode_time += t_b - t_a
            if low_res is not None:
                post.add_batch(iou, low_res, start)
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
