"""``SamAutomaticMaskGenerator``'s filtering, NMS and our area ordering on the device,
without upsampling masks whose fate is known from bounds (see :class:`PostProcessor`),
and the tensor helpers it uses: SAM's ``postprocess_masks`` restricted to the unpadded
region, pixel counts and boxes."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torchvision.ops.boxes import batched_nms

from llmseg_ros.config import ProposalConfig

_POST_CHUNK_PIXELS = 1 << 21  # upsampled logits per post-processing chunk (8 MiB of float32)
_BOUND_CHUNK_PIXELS = 1 << 24  # low-resolution logits per chunk of count bounds


def area_order(areas: np.ndarray, limit: int) -> np.ndarray:
    """Indices sorting ``areas`` largest first (stable: ties keep their order), cut to
    ``limit``."""
    return np.argsort(-np.asarray(areas, dtype=np.int64), kind="stable")[:limit]


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


def pixel_counts(masks: torch.Tensor) -> torch.Tensor:
    """Per-mask count of foreground pixels: (N, H, W) bool → (N,) int32. Column sums
    first, over a uint8 view: on CPU a reduction over rows vectorises across the columns,
    and int16 holds a column's count (H < 2**15), several times faster than ``sum`` over
    both dimensions."""
    column_dtype = torch.int16 if masks.shape[-2] < 2**15 else torch.int32
    return masks.view(torch.uint8).sum(dim=-2, dtype=column_dtype).sum(dim=-1, dtype=torch.int32)


def threshold_counts(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-mask count of logits above ``threshold``: (N, H, W) → (N,) int32."""
    return pixel_counts(logits > threshold)


# Low-resolution window [i - before, i + after] that bounds the outputs counted at index i
# (see window_counts): the general case, and the common one where the second resize of
# ``upsample_logits`` is the identity and the first has scale exactly 4.
WIDE_WINDOW = (2, 3)
EXACT_WINDOW = (0, 1)


def window_counts(out_len: int, in_len: int, low_len: int, encoder_size: int) -> np.ndarray:
    """For each low-resolution index i, how many output rows (or columns) are counted at i.

    Output index y (after both resizes of ``upsample_logits``) reads encoder-frame indices
    a and a + 1 with a = floor((y + 0.5) * in_len / out_len - 0.5), each of which reads
    low-resolution indices f and f + 1 with f = floor((a + 0.5) * low_len / encoder_size
    - 0.5); y is counted at its f computed here. When the second resize is the identity
    (a = y) and low_len / encoder_size is exactly 1/4, this is the kernel's own index
    arithmetic (exact in floating point) and y reads only f and f + 1 (``EXACT_WINDOW``);
    otherwise ``WIDE_WINDOW``'s margins cover f + 1, the second encoder-frame index and
    rounding differences in the kernel's own index maths.
    """
    y = np.arange(out_len, dtype=np.float64)
    a = np.floor(np.maximum(0.0, (y + 0.5) * (in_len / out_len) - 0.5)) if out_len != in_len else y
    first = np.floor(np.maximum(0.0, (a + 0.5) * (low_len / encoder_size) - 0.5)).astype(np.int64)
    return np.bincount(np.clip(first, 0, low_len - 1), minlength=low_len)


def window_extreme(x: torch.Tensor, largest: bool, window: tuple[int, int] = WIDE_WINDOW) -> torch.Tensor:
    """(N, h, w) → (N, h, w): max (or min) of ``x`` over the window of rows
    i - before .. i + after and columns j - before .. j + after (cut at the borders), with
    ``window = (before, after)``."""
    before, after = window
    sign = 1.0 if largest else -1.0
    padded = F.pad(sign * x[:, None], (before, after, before, after), value=-math.inf)
    return sign * F.max_pool2d(padded, before + after + 1, stride=1)[:, 0]


class PostProcessor:
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
        self.window = WIDE_WINDOW  # set with the geometry
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
            self.window = EXACT_WINDOW if identity else WIDE_WINDOW
            counts = []
            for out_len, in_len, low_len in ((height, in_h, low_h), (width, in_w, low_w)):
                c = window_counts(out_len, in_len, low_len, self.encoder_size)
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
        window_min = window_extreme(x, largest=False, window=self.window)
        window_max = window_extreme(x, largest=True, window=self.window)
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
        stability = threshold_counts(logits, self.threshold + offset) / threshold_counts(
            logits, self.threshold - offset
        )
        return logits, stability

    def _measure(self, rank: torch.Tensor, iou: torch.Tensor, low_res: torch.Tensor) -> None:
        """Upsample exactly (in chunks), filter on stability, store exact areas and boxes."""
        for s in range(0, rank.shape[0], self.step):
            self._measure_chunk(rank[s : s + self.step], iou[s : s + self.step], low_res[s : s + self.step])

    def _measure_chunk(self, rank: torch.Tensor, iou: torch.Tensor, low_res: torch.Tensor) -> None:
        logits, stability = self._exact(low_res)
        masks = logits > self.threshold  # thresholding all is cheaper than copying logits
        if self.stability_filter:
            keep = torch.nonzero(stability >= self.config.stability_score_thresh).flatten()
            if keep.numel() == 0:
                return
            if keep.numel() < rank.shape[0]:
                rank, iou, low_res, masks, stability = (
                    rank[keep],
                    iou[keep],
                    low_res[keep],
                    masks[keep],
                    stability[keep],
                )
        areas = pixel_counts(masks).long()
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
                f["area_low"][index] = threshold_counts(logits, self.threshold).long()
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
