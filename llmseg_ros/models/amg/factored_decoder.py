"""SAM's mask decoder for many single-point prompts with the image-token projections folded
into the prompt tokens: the same function as ``MaskDecoder.forward`` in another summation
order (see :class:`FactoredDecoder`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention

from llmseg_ros.models.amg.decoding import point_prompt_tokens


class Scratch:
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
class FactoredContext:
    """Per-image state of :class:`FactoredDecoder` (float32; N = h * w image tokens, C
    channels, D the attentions' internal width, d = D / heads)."""

    size: tuple[int, int]  # (h, w) of the image embedding
    keys: torch.Tensor  # (N, C) image tokens entering the first block (embedding + no-mask embedding)
    t2i_k: torch.Tensor  # (heads, d, N) first block: token-to-image keys, transposed, per head
    t2i_v: torch.Tensor  # (heads, N, d) first block: token-to-image values per head
    i2t_q: torch.Tensor  # (D, N) first block: image-to-token queries, transposed
    pe_k: list[torch.Tensor]  # later blocks, then the final attention: (D, N) k_proj(PE), transposed
    pe_q: list[torch.Tensor]  # later blocks: (D, N) q_proj(PE) of image-to-token attention, transposed


def block_diagonal(x: torch.Tensor) -> torch.Tensor:
    """(B, T, heads, d) → (B, heads * T, heads * d): row h * T + t holds x[:, t, h] in the
    columns of head h, zeros elsewhere."""
    b, t, heads, d = x.shape
    eye = torch.eye(heads, dtype=x.dtype, device=x.device)
    return torch.einsum("bthe,hg->bhtge", x, eye).reshape(b, heads * t, heads * d)


class FactoredDecoder:
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
        self.scratch = Scratch()
        self.check_seconds = 0.0  # no one-time check (PointDecoder)
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
    def context(self, features: torch.Tensor) -> FactoredContext:
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
        return FactoredContext(
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
        q = FactoredDecoder._project_heads(attention.q_proj, queries_in, heads)  # (B, T, heads, d)
        d = q.shape[-1]
        w_k = attention.k_proj.weight.view(heads, d, c)
        folded = torch.einsum("bthe,hec->bhtc", q, w_k).reshape(b, heads * t, c)  # q_h W_k,h
        scores = self.scratch.get("scores", (b, heads * t, pe_k.shape[1]), x)
        torch.matmul(block_diagonal(q), pe_k, out=scores)  # (B, heads*T, N): q_h P_k,h^T
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
        k = FactoredDecoder._project_heads(attention.k_proj, keys_in, heads)  # (B, T, heads, d)
        d = k.shape[-1]
        k_bd = block_diagonal(k)  # (B, heads*T, D)
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

    def _transformer(self, ctx: FactoredContext, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        ctx: FactoredContext,
        points: torch.Tensor,
        need_masks: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode a batch (see ``PointDecoder``), ``chunk`` points at a time; ``need_masks``
        sees each chunk's IoUs and only the points it selects are upscaled."""
        decoder = self.decoder
        tokens = point_prompt_tokens(self.sam, points)
        b = tokens.shape[0]
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
