"""LLM-Seg: SAM proposals + DINOv2 mask embeddings, picked by a ``<SEG>`` query.

Per frame (instruction-independent, cached): SAM everything-mode proposals (and SAM's image
encoding they came from, kept under ``SAM_KEY`` for mask tracking), DINOv2 mask embeddings
(K, 256), and the VLM's key/value cache of the image prefix.
Per instruction: one teacher-forced VLM pass → ``<SEG>`` hidden state → text projection
(h→h→256) → selector (fusion + IoU / IoP heads) → selection strategy → union mask.

The weights' manifest says how they were trained, and the method follows it: the VLM's
prompt format (``llmseg_ros.models.vlm``), DINOv2's position embeddings
(``llmseg_ros.models.embeddings``), the rounding of SAM's downscaled input
(``sam_downscale``) and the resolution the proposals are pooled at (``mask_pooling``:
``input`` = the frame's; ``sam`` = SAM's input, the authors' — the masks SAM produced,
before they are upscaled to the frame).

Confidence (``SegmentResult.confidence``):
    * IoP-based strategies: mean predicted IoP of the selected proposals; when nothing is
      selected (the "no such object" answer), ``1 - max IoP`` — the confidence that
      nothing qualifies.
    * ``top1_iou``: the selected proposal's cosine similarity mapped to [0, 1] as
      ``(s + 1) / 2``.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmseg_ros.config import SelectionConfig
from llmseg_ros.methods.base import SegmentRequest
from llmseg_ros.methods.common import SAM_KEY, load_state, query_seg_hidden, sync, trained_weights_and_vlm
from llmseg_ros.types import FrameFeatures, Proposals, SegmentResult

if TYPE_CHECKING:
    from llmseg_ros.models.components import Components
    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.heads import TextProjection
    from llmseg_ros.models.proposals import ProposalGenerator
    from llmseg_ros.models.selector import ProposalSelector
    from llmseg_ros.models.vlm import SegVLM


def selection_confidence(
    similarity: np.ndarray, iop: np.ndarray, selected: list[int], strategy: str
) -> float:
    """Confidence of a selection in [0, 1] (see the module docstring)."""
    if len(iop) == 0:
        return 0.0
    if strategy == "top1_iou":
        return float(np.clip((similarity[selected[0]] + 1.0) / 2.0, 0.0, 1.0)) if selected else 0.0
    if not selected:
        return float(1.0 - iop.max())
    return float(np.mean(iop[selected]))


class LLMSegMethod:
    """The LLM-Seg method on loaded models (see the module docstring)."""

    name = "llmseg"

    def __init__(
        self,
        proposal_generator: ProposalGenerator,
        mask_embedder: MaskEmbedder,
        vlm: SegVLM,
        projection: TextProjection,
        selector: ProposalSelector,
        selection: SelectionConfig | None = None,
        mask_pooling: str = "input",
    ) -> None:
        if mask_pooling not in ("input", "sam"):
            raise ValueError(f"mask_pooling must be 'input' or 'sam', got {mask_pooling!r}")
        self.mask_pooling = mask_pooling
        self.proposal_generator = proposal_generator
        self.mask_embedder = mask_embedder
        self.vlm = vlm
        self.projection = projection.eval()
        self.selector = selector.eval()
        self.selection = selection or SelectionConfig()
        self.device = next(self.selector.parameters()).device
        self._prefix_lock = threading.Lock()

    @classmethod
    def from_components(cls, components: Components) -> LLMSegMethod:
        from llmseg_ros.models.heads import TextProjection
        from llmseg_ros.models.selector import ProposalSelector

        weights, vlm = trained_weights_and_vlm(components, "llmseg")
        manifest = weights.manifest
        projection = TextProjection(manifest.hidden_size, manifest.embed_dim)
        selector = ProposalSelector(dim=manifest.embed_dim)
        load_state(projection, weights, "projection", components.config.weights_dir)
        load_state(selector, weights, "selector", components.config.weights_dir)
        projection.to(components.device)
        selector.to(components.device)
        if manifest.sam_downscale == "round":
            proposal_generator = components.proposal_generator()
        else:  # the rounding these weights were trained with
            from llmseg_ros.models.proposals import ProposalGenerator

            proposal_generator = ProposalGenerator.from_config(
                components.sam(), components.config.proposals, downscale_rounding=manifest.sam_downscale
            )
        return cls(
            proposal_generator,
            components.mask_embedder(),
            vlm,
            projection,
            selector,
            components.config.selection,
            mask_pooling=manifest.mask_pooling,
        )

    # -- per frame -----------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> FrameFeatures:
        t0 = time.perf_counter()
        proposals, encoding = self.proposal_generator.generate_with_encoding(image)
        t1 = time.perf_counter()
        features = self.mask_embedder.backbone_features(image)
        feature_map = self.mask_embedder.project(features)
        embeddings = self.mask_embedder.pool(feature_map, self.pooled_masks(proposals)).float()
        sync(self.device)
        t2 = time.perf_counter()
        return FrameFeatures(
            image=image,
            proposals=proposals,
            mask_embeddings=embeddings,
            timings={"proposals": t1 - t0, "mask_embeddings": t2 - t1},
            cache={} if encoding is None else {SAM_KEY: encoding},
        )

    def pooled_masks(self, proposals: Proposals) -> np.ndarray:
        """The proposals at the resolution they are pooled at: the frame's (``input``) or
        SAM's input (``sam``; (K, h, w) bool, exactly the masks SAM produced)."""
        if self.mask_pooling == "input" or len(proposals) == 0:
            return proposals.masks
        from llmseg_ros.models.proposals import masks_at_sam_resolution

        height, width = proposals.image_size
        return masks_at_sam_resolution(
            proposals.masks, self.proposal_generator.sam_input_shape(height, width)
        )

    # -- per instruction -----------------------------------------------------------
    @torch.inference_mode()
    def segment(self, frame: FrameFeatures, request: SegmentRequest) -> SegmentResult:
        if frame.mask_embeddings is None:
            raise ValueError("frame was not prepared by the llmseg method (no mask embeddings)")
        selection = request.selection or self.selection
        timings: dict[str, float] = {}
        answer, hidden = query_seg_hidden(self.vlm, frame, request, timings, self._prefix_lock)
        t1 = time.perf_counter()
        query = self.projection(hidden.to(self.device, torch.float32).unsqueeze(0))[0]  # (256,)
        similarity_t, iop_t = self.selector.score(frame.mask_embeddings.to(self.device), query)
        similarity = similarity_t.float().cpu().numpy()
        iop = iop_t.float().cpu().numpy()
        from llmseg_ros.models.selector import select, union_mask

        selected = select(
            similarity, iop, selection.strategy, iop_threshold=selection.iop_threshold, top_k=selection.top_k
        )
        mask = union_mask(frame.proposals.masks, selected)
        timings["selector"] = time.perf_counter() - t1
        return SegmentResult(
            mask=mask,
            selected=selected,
            similarity=similarity,
            iop=iop,
            confidence=selection_confidence(similarity, iop, selected, selection.strategy),
            num_proposals=len(frame.proposals),
            method=self.name,
            answer=answer,
            timings=timings,
            extras={"strategy": selection.strategy, "iop_threshold": selection.iop_threshold},
        )
