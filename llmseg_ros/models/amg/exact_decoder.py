"""SAM's mask decoder for many single-point prompts, bit for bit: the same modules on the
same batches as ``SamAutomaticMaskGenerator``, with the prompt-independent work done once
per image."""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention

from llmseg_ros.models.amg.decoding import point_prompt_tokens

logger = logging.getLogger(__name__)

# Per SAM model: whether the decoder with shared first-block projections reproduced SAM's
# own forward bit for bit (checked once, on the first batch the model decodes).
SHARED_PREFIX_EXACT: weakref.WeakKeyDictionary[Sam, bool] = weakref.WeakKeyDictionary()


@dataclass
class ImageContext:
    """Per-image decoder inputs shared by every point batch."""

    features: torch.Tensor  # (1, C, h, w) image embedding
    image_pe: torch.Tensor  # (1, C, h, w) dense positional encoding
    dense: torch.Tensor  # (1, C, h, w) no-mask embedding
    shared: dict[str, torch.Tensor] | None = None  # first-block image-token projections


class ExactDecoder:
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

    def context(self, features: torch.Tensor) -> ImageContext:
        """Per-image state for (1, C, h, w) image embeddings."""
        pe_encoder = self.sam.prompt_encoder
        height, width = features.shape[-2:]
        dense = pe_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, height, width)
        return ImageContext(features, pe_encoder.get_dense_pe(), dense)

    def _shared_projections(self, ctx: ImageContext) -> dict[str, torch.Tensor]:
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
        self, ctx: ImageContext, tokens: torch.Tensor
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
        self, ctx: ImageContext, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``MaskDecoder.predict_masks``' own transformer call."""
        b = tokens.shape[0]
        src = torch.repeat_interleave(ctx.features, b, dim=0) + ctx.dense.expand(b, -1, -1, -1)
        pos_src = torch.repeat_interleave(ctx.image_pe, b, dim=0)
        return self.transformer(src, pos_src, tokens)

    def _transformer(self, ctx: ImageContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        verdict = SHARED_PREFIX_EXACT.get(self.sam)
        if verdict is False:
            return self._transformer_module(ctx, tokens)
        out = self._transformer_shared(ctx, tokens)
        if verdict is None:
            start = time.perf_counter()
            reference = self._transformer_module(ctx, tokens)
            exact = torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])
            SHARED_PREFIX_EXACT[self.sam] = exact
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
        ctx: ImageContext,
        points: torch.Tensor,
        need_masks: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode a batch (see ``PointDecoder``). The masks of the whole batch (the
        reference's shapes) are computed when any point needs them, else none (S = B or 0)."""
        decoder = self.decoder
        tokens = point_prompt_tokens(self.sam, points)
        b = tokens.shape[0]
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
