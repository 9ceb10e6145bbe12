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
      :class:`llmseg_ros.models.amg.factored_decoder.FactoredDecoder`), computes the first
      two-way block's image projections once per image, runs the upscaling head only for
      points with a mask above the IoU threshold, channels-last, in chunks that stay in
      the CPU caches. The arithmetic is
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

import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide

from llmseg_ros.config import ProposalConfig
from llmseg_ros.models.amg.decoding import PointDecoder
from llmseg_ros.models.amg.exact_decoder import ExactDecoder
from llmseg_ros.models.amg.factored_decoder import FactoredDecoder
from llmseg_ros.models.amg.postprocess import PostProcessor, area_order
from llmseg_ros.models.sam_prompting import SamImageEncoding
from llmseg_ros.types import Proposals

_ENCODER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


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


DOWNSCALE_ROUNDINGS = ("round", "truncate")


def downscaled_shape(height: int, width: int, max_long_side: int, rounding: str = "round") -> tuple[int, int]:
    """(h, w) of an (height, width) image shrunk so its long side is at most ``max_long_side``.

    ``rounding``: ``"round"`` rounds the scaled sides like SAM's ``ResizeLongestSide``
    (``int(x * s + 0.5)``); ``"truncate"`` truncates them as the LLM-Seg authors'
    preprocessing did (``int(x * (max_long_side / long_side))``, which can make the long
    side one pixel shorter than ``max_long_side``). Images that already fit are unchanged.
    """
    if rounding not in DOWNSCALE_ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(DOWNSCALE_ROUNDINGS)}, got {rounding!r}")
    if max(height, width) <= max_long_side:
        return height, width
    if rounding == "round":
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, max_long_side)
        return int(new_h), int(new_w)
    scale = float(max_long_side) / max(height, width)
    return int(height * scale), int(width * scale)


def downscale_long_side(image: np.ndarray, max_long_side: int, rounding: str = "round") -> np.ndarray:
    """Shrink ``image`` with ``cv2.INTER_AREA`` so that its long side is at most
    ``max_long_side`` (sides rounded or truncated, see :func:`downscaled_shape`); smaller
    images are returned unchanged (not copied)."""
    height, width = image.shape[:2]
    new_h, new_w = downscaled_shape(height, width, max_long_side, rounding)
    if (new_h, new_w) == (height, width):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def nearest_sources(size: int, source_size: int) -> np.ndarray:
    """For each of ``source_size`` pixels along one axis, a pixel of a ``size``-long
    ``cv2.INTER_NEAREST`` upscaling that copied it (``size >= source_size``).

    ``cv2.resize`` itself maps an index ramp, so the answer is exact for its rounding.
    """
    if size < source_size or source_size < 1:
        raise ValueError(f"size must be >= source_size >= 1, got {size} and {source_size}")
    ramp = np.arange(source_size, dtype=np.int32)[None, :]  # (1, source_size)
    mapped = cv2.resize(ramp, (size, 1), interpolation=cv2.INTER_NEAREST)[0]  # (size,) source index per pixel
    first = np.full(source_size, -1, dtype=np.int64)
    positions = np.arange(size - 1, -1, -1)
    first[mapped[::-1]] = positions  # the last write is the first position
    if (first < 0).any():
        raise RuntimeError(f"cv2 nearest upscaling {source_size} → {size} skipped a source pixel")
    return first


def masks_at_sam_resolution(masks: np.ndarray, sam_hw: tuple[int, int]) -> np.ndarray:
    """The proposals as SAM produced them, before :func:`resize_masks_nearest` upscaled them.

    Args:
        masks: (K, H, W) bool, the proposals at the input resolution.
        sam_hw: (h, w) of SAM's (downscaled) input, h <= H and w <= W.
    Returns:
        (K, h, w) bool, exactly SAM's masks (nearest upscaling copies every source pixel
        at least once, so one copy of each is picked); ``masks`` itself when the sizes match.
    """
    _, height, width = masks.shape
    h, w = int(sam_hw[0]), int(sam_hw[1])
    if (h, w) == (height, width):
        return masks
    rows, cols = nearest_sources(height, h), nearest_sources(width, w)
    return np.ascontiguousarray(masks[:, rows][:, :, cols])


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


class ProposalGenerator:
    """Class-agnostic mask proposals for a frame: SAM everything mode (see module doc).

    Args:
        sam: a SAM model (``llmseg_ros.models.sam.build_sam``); its device is used.
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
        downscale_rounding: ``"round"`` (SAM's rounding) or ``"truncate"`` (the LLM-Seg
            authors' preprocessing) of the downscaled size, see :func:`downscaled_shape`.

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
        downscale_rounding: str = "round",
    ) -> None:
        if downscale_rounding not in DOWNSCALE_ROUNDINGS:
            raise ValueError(
                f"downscale_rounding must be one of {list(DOWNSCALE_ROUNDINGS)}, got {downscale_rounding!r}"
            )
        self.downscale_rounding = downscale_rounding
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
        self._decoder: PointDecoder[Any] = (
            FactoredDecoder(sam) if decoder == "factored" else ExactDecoder(sam)
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

    def sam_input_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the downscaled image SAM sees for an (height, width) frame."""
        return downscaled_shape(height, width, self.config.max_long_side, self.downscale_rounding)

    # -- public API -------------------------------------------------------------------
    def generate(self, image: np.ndarray) -> Proposals:
        """Mask proposals for one RGB frame (see :meth:`generate_with_encoding`)."""
        return self.generate_with_encoding(image)[0]

    def generate_with_encoding(self, image: np.ndarray) -> tuple[Proposals, SamImageEncoding | None]:
        """Mask proposals for one RGB frame, and SAM's image encoding they were decoded from.

        The encoding (of the frame downscaled to ``max_long_side``; ``original_size`` is
        the frame's) prompts SAM again on the same frame at no encoder cost (mask
        tracking). The reference implementation keeps no encoding (``None``).

        Args:
            image: (H, W, 3) uint8 RGB.
        Returns:
            (proposals, encoding): proposals with masks (K, H, W) bool at the input
            resolution, largest area first (area measured at SAM's resolution, ties in
            NMS order), K <= ``max_proposals``; boxes XYXY (inclusive) of the returned
            masks; point coordinates in input pixels; ``Proposals.empty(H, W)`` when
            nothing passes. The encoding's embedding is (1, C, h, w) float32 on SAM's
            device.
        Raises:
            TypeError, ValueError: ``image`` is not an (H, W, 3) uint8 array.
        """
        check_image(image)
        start = time.perf_counter()
        small = downscale_long_side(image, self.config.max_long_side, self.downscale_rounding)
        timings = {"resize": time.perf_counter() - start}
        encoding: SamImageEncoding | None = None
        if self._reference is not None:
            selected = self._generate_reference(small)
        else:
            selected, embedding, input_size = self._generate_fast(small, timings)
            encoding = SamImageEncoding(embedding, input_size, (int(image.shape[0]), int(image.shape[1])))
        proposals = self._finish(selected, image.shape[:2], small.shape[:2])
        timings["total"] = time.perf_counter() - start
        self.last_timings = timings
        return proposals, encoding

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
    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], torch.Tensor, tuple[int, int]]:
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

        post = PostProcessor(self.sam, cfg, grid_t, input_size, (h, w))
        self._decoder.check_seconds = 0.0
        decode_time = post_time = 0.0
        for start in range(0, in_points.shape[0], cfg.points_per_batch):
            stop = start + cfg.points_per_batch
            t_a = time.perf_counter()
            iou, low_res, index = self._decoder(ctx, in_points[start:stop], need_masks)
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
        return selected, features, input_size
