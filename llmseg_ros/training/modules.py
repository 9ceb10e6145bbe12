"""The models of a training run and the one ``nn.Module`` that holds everything trained.

Both methods train the VLM's LoRA adapter with its ``embed_tokens`` / ``lm_head`` copies
(as :meth:`llmseg_ros.models.vlm.SegVLM.load` with ``trainable=True`` sets them up) and the text
projection (h → h → 256). LLM-Seg (:class:`TrainModules`) adds the mask-embedding 1×1
projection (``mask_proj``, DINOv2 1024 → 256) and the selector (fusion + IoU / IoP heads);
LISA (:class:`LisaTrainModules`) adds a copy of SAM's mask decoder. Frozen: the LLaVA base
weights, DINOv2, SAM's image and prompt encoders. Each module registers exactly the
trained parts, so ``accelerate`` (DDP, DeepSpeed) wraps and synchronises only them, and
its ``forward`` computes the whole loss.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmseg_ros.models.losses import llmseg_loss
from llmseg_ros.training.config import DataSource, TrainConfig
from llmseg_ros.types import Proposals

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.heads import LisaMaskHead, TextProjection
    from llmseg_ros.models.sam_prompting import SamImageEncoding
    from llmseg_ros.models.selector import ProposalSelector
    from llmseg_ros.models.vlm import SegVLM
    from llmseg_ros.training.datamix import TrainExample
    from llmseg_ros.weights.directory import LoadedWeights

TINY_MARKER = "tiny_models.json"
TINY_VERSION = 1


@dataclass
class Batch:
    """One micro-batch, ready for :meth:`TrainModules.forward`.

    B images with Q_b questions each; the N = Σ Q_b conversations are the rows.

    Attributes:
        images: B (H, W, 3) uint8 RGB images.
        conversations: N (question, answer) pairs; each answer holds one ``<SEG>``.
        image_index: (N,) int64, the image of each conversation (non-decreasing).
        features: B (C, g, g) backbone feature tensors (any float dtype, any device).
        masks: B (K_b, H_b, W_b) bool proposal masks at image resolution.
        iou / iop: (N, K) float32 ground-truth targets per conversation, 0 at padded slots.
        padding: (N, K) bool, True = padded slot; K = max(1, max_b K_b).
    """

    images: list[np.ndarray]
    conversations: list[tuple[str, str]]
    image_index: torch.Tensor
    features: list[torch.Tensor]
    masks: list[np.ndarray]
    iou: torch.Tensor
    iop: torch.Tensor
    padding: torch.Tensor


def pad_targets(
    ious: list[np.ndarray], iops: list[np.ndarray], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-row (K_b,) targets into (N, K) tensors plus the (N, K) padding mask."""
    if len(ious) != len(iops) or not ious:
        raise ValueError(
            f"need equally many, non-zero IoU and IoP target arrays, got {len(ious)} and {len(iops)}"
        )
    k = max(1, *(len(v) for v in ious))
    b = len(ious)
    iou = torch.zeros((b, k), dtype=torch.float32)
    iop = torch.zeros((b, k), dtype=torch.float32)
    padding = torch.ones((b, k), dtype=torch.bool)
    for i, (u, p) in enumerate(zip(ious, iops)):
        if len(u) != len(p):
            raise ValueError(f"sample {i}: {len(u)} IoU targets but {len(p)} IoP targets")
        iou[i, : len(u)] = torch.as_tensor(u, dtype=torch.float32)
        iop[i, : len(p)] = torch.as_tensor(p, dtype=torch.float32)
        padding[i, : len(u)] = False
    return iou.to(device), iop.to(device), padding.to(device)


def upsample_matrix(grid: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(size, grid) float32 matrix ``A`` of 1-D linear upsampling (``align_corners=False``).

    ``F.interpolate(x, (size, size), mode="bilinear", align_corners=False)`` of a
    (grid, grid) map ``x`` equals ``A @ x @ A.T`` (bilinear interpolation is separable).
    """
    eye = torch.eye(grid, dtype=torch.float32, device=device)[:, None, :]  # (grid, 1, grid)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0, :].T


def pool_at_grid(embedder: MaskEmbedder, features: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """``embedder.pool(embedder.project(features), masks)`` computed at the backbone's grid.

    The projected map is ``U(P)`` with ``P = proj(features)`` (out_dim, g, g) and ``U`` the
    bilinear upsampling to (S, S); the pooled embedding of mask weights ``w`` (S, S) is
    ``Σ w·U(P) / (Σw + 1e-8)``. Since ``U(P) = A P Aᵀ`` per channel,
    ``Σ w·U(P) = Σ (Aᵀ w A)·P``: the weights are brought down to the g × g grid instead
    of the features up to S × S — the same number (up to float rounding) for a fraction
    of the time and memory, which is what makes CPU training of the tiny models fast.

    Args:
        embedder: the mask embedder (its ``proj`` is applied, gradients flow into it).
        features: (hidden, g, g) backbone features, any float dtype and device.
        masks: (K, H, W) bool proposal masks at image resolution.

    Returns:
        (K, out_dim) float32 on the embedder's device.
    """
    from llmseg_ros.models.embeddings import POOL_EPS

    if (
        features.ndim != 3
        or features.shape[0] != embedder.hidden_size
        or features.shape[1] != features.shape[2]
    ):
        raise ValueError(
            f"features must be ({embedder.hidden_size}, g, g), got shape {tuple(features.shape)}"
        )
    weights = embedder.mask_weights(masks)  # (K, S, S), no gradient needed
    a = upsample_matrix(int(features.shape[1]), embedder.map_size, weights.device)  # (S, g)
    low = torch.matmul(a.T, torch.matmul(weights, a))  # (K, g, g) = Aᵀ w A
    projected = embedder.proj(features.to(device=weights.device, dtype=torch.float32)[None])[0]  # (C, g, g)
    pooled = torch.einsum("kij,cij->kc", low, projected)
    return pooled / (weights.sum(dim=(1, 2))[:, None] + POOL_EPS)


class SegTrainModules(nn.Module, abc.ABC):
    """What every method trains on the VLM side, and the interface the trainer drives.

    Submodule ``vlm`` is the peft-wrapped LLaVA (LoRA adapter, ``embed_tokens`` /
    ``lm_head`` copies trainable); the :class:`SegVLM` wrapper is a plain attribute.
    Subclasses add the method's heads as submodules and define the batch, the losses and
    what is exported.

    Class attributes:
        method: the method name written to the weights manifest.
        loss_names: the unweighted loss terms ``forward`` returns besides ``total``.
        mask_side: parameter-name prefixes trained at ``head_lr``.
    """

    method = ""
    loss_names: tuple[str, ...] = ()
    mask_side: tuple[str, ...] = ()
    seg_vlm: SegVLM

    def __init__(self, vlm: SegVLM) -> None:
        super().__init__()
        self.vlm = vlm.model
        object.__setattr__(self, "seg_vlm", vlm)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """name → parameter of every trainable parameter (live tensors, not copies)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def seg_query(
        self, images: list[np.ndarray], conversations: list[tuple[str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM cross-entropy and the (N, hidden) ``<SEG>`` hidden state of each conversation.

        Args:
            images: N images, the one of each conversation (repeated for several
                questions about one image, as LISA / LLM-Seg batch them).
            conversations: N (question, answer) pairs.

        Returns:
            The token-mean cross-entropy over all N answers and the (N, hidden) states.

        Raises:
            ValueError: an answer does not hold exactly one ``<SEG>``.
        """
        lm, seg_hidden, batch_index = self.seg_vlm.training_forward(images, conversations)
        expected = torch.arange(len(images), device=batch_index.device)
        if batch_index.shape != expected.shape or not torch.equal(batch_index, expected):
            raise ValueError(
                f"every answer must hold exactly one <SEG>; got <SEG> rows for samples {batch_index.tolist()}"
            )
        return lm, seg_hidden

    @abc.abstractmethod
    def prepare_batch(self, examples: list[TrainExample], device: torch.device) -> Any:
        """Turn data-stream examples into this method's batch (run outside autocast)."""

    @abc.abstractmethod
    def export_modules(self) -> dict[str, nn.Module]:
        """name → module stored in ``heads.safetensors`` under ``name.*``."""

    @abc.abstractmethod
    def manifest_fields(self) -> dict[str, Any]:
        """Method-specific :class:`~llmseg_ros.weights.directory.WeightsManifest` fields."""

    def weighted_total(self, losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """``Σ weights[name] · losses[name]`` over :attr:`loss_names`."""
        first, *rest = self.loss_names
        total = weights[first] * losses[first]
        for name in rest:
            total = total + weights[name] * losses[name]
        return total


class TrainModules(SegTrainModules):
    """Every trained part of LLM-Seg as one module; ``forward`` returns the losses.

    Submodules: ``vlm`` (the peft-wrapped LLaVA), ``projection``, ``mask_proj`` (the
    embedder's 1×1 convolution) and ``selector``. The :class:`MaskEmbedder` wrapper is
    kept as a plain attribute (not a submodule), so the frozen DINOv2 backbone is not
    part of this module.

    Args:
        proposal_fn: the proposal stage for examples whose source has no cache
            (``None`` when every source is cached).
        ignore_pixels: how ground-truth pixels labelled 255 enter the IoU / IoP targets
            of uncached examples (``background`` or ``exclude``).
    """

    method = "llmseg"
    loss_names = ("lm", "iou", "iop")
    mask_side = ("selector.", "mask_proj.")
    embedder: MaskEmbedder
    proposal_fn: Callable[[np.ndarray], Proposals] | None

    def __init__(
        self,
        vlm: SegVLM,
        embedder: MaskEmbedder,
        projection: TextProjection,
        selector: ProposalSelector,
        *,
        iou_weight: float = 1.0,
        iop_weight: float = 50.0,
        lm_weight: float = 1.0,
        tau: float = 0.05,
        iou_direction: str = "gt_pred",
        proposal_fn: Callable[[np.ndarray], Proposals] | None = None,
        ignore_pixels: str = "background",
    ) -> None:
        super().__init__(vlm)
        self.projection = projection
        self.mask_proj = embedder.proj
        self.selector = selector
        object.__setattr__(self, "embedder", embedder)
        object.__setattr__(self, "proposal_fn", proposal_fn)
        self.weights = {"iou": iou_weight, "iop": iop_weight, "lm": lm_weight}
        self.tau = tau
        self.iou_direction = iou_direction
        self.ignore_pixels = ignore_pixels

    def mask_embeddings(
        self, features: list[torch.Tensor], masks: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (B, K, 256) float32 mask embeddings and the (B, K) padding mask (True = pad)."""
        pooled = [pool_at_grid(self.embedder, f, m) for f, m in zip(features, masks)]  # B × (K_b, 256)
        k = max(1, *(p.shape[0] for p in pooled))
        out = pooled[0].new_zeros((len(pooled), k, pooled[0].shape[1]))
        padding = torch.ones((len(pooled), k), dtype=torch.bool, device=out.device)
        for i, p in enumerate(pooled):
            out[i, : p.shape[0]] = p
            padding[i, : p.shape[0]] = False
        return out, padding

    def prepare_batch(self, examples: list[TrainExample], device: torch.device) -> Batch:
        """Fill in proposals / features that were not cached and build the padded targets."""
        from llmseg_ros.training.datamix import add_targets

        features: list[torch.Tensor] = []
        for example in examples:
            if example.proposals is None:
                if self.proposal_fn is None:
                    raise ValueError(
                        f"example from source {example.source!r} has no cached proposals and no SAM is loaded"
                    )
                add_targets(example, self.proposal_fn(example.image), self.ignore_pixels)
            if example.features is None:
                features.append(self.embedder.backbone_features(example.image))
            else:
                features.append(torch.from_numpy(example.features).to(device))
        ious: list[np.ndarray] = []
        iops: list[np.ndarray] = []
        image_index: list[int] = []
        for b, example in enumerate(examples):
            assert example.iou is not None and example.iop is not None
            ious.extend(example.iou)
            iops.extend(example.iop)
            image_index.extend([b] * len(example.questions))
        iou, iop, padding = pad_targets(ious, iops, device)
        return Batch(
            images=[e.image for e in examples],
            conversations=[pair for e in examples for pair in e.conversations],
            image_index=torch.tensor(image_index, dtype=torch.long),
            features=features,
            masks=[e.proposals.masks for e in examples if e.proposals is not None],
            iou=iou,
            iop=iop,
            padding=padding,
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch: ``total``, ``lm``, ``iou``, ``iop`` (scalars, float32).

        ``total = λ_lm·lm + λ_iou·iou + λ_iop·iop`` (LLM-Seg eq. 4 plus the LM cross-entropy).
        As in the released code (``model/LISA.py``), ``lm`` is the token mean over all
        conversations, and ``iou`` / ``iop`` are averaged over each image's questions, then
        over the images (those with at least one proposal).
        """
        rows = batch.image_index.tolist()
        lm, seg_hidden = self.seg_query([batch.images[b] for b in rows], batch.conversations)
        query = self.projection(seg_hidden.to(next(self.projection.parameters()).dtype))  # (N, 256)
        embeddings, padding = self.mask_embeddings(batch.features, batch.masks)  # (B, K, 256), (B, K)
        index = batch.image_index.to(embeddings.device)
        embeddings, padding = embeddings[index], padding[index]  # one row per conversation
        if padding.shape != batch.padding.shape or not torch.equal(padding.cpu(), batch.padding.cpu()):
            raise ValueError("the proposal masks and the IoU/IoP targets disagree on the number of proposals")
        out = self.selector(embeddings, query, padding)
        iou_gt = batch.iou.to(out.similarity.device)
        iop_gt = batch.iop.to(out.iop.device)
        per_image: dict[str, list[torch.Tensor]] = {"iou": [], "iop": []}
        for b in range(len(batch.images)):
            mine = index == b
            if not mine.any() or bool(padding[mine].all()):
                continue  # no proposal: nothing to learn for the selector
            terms = llmseg_loss(
                lm,
                out.similarity[mine],
                iou_gt[mine],
                out.iop[mine],
                iop_gt[mine],
                padding[mine],
                iou_weight=self.weights["iou"],
                iop_weight=self.weights["iop"],
                tau=self.tau,
                iou_direction=self.iou_direction,
            )
            per_image["iou"].append(terms["iou"])
            per_image["iop"].append(terms["iop"])
        zero = out.similarity.sum() * 0.0  # keeps the graph when no image has proposals
        losses = {
            "lm": lm.float(),
            "iou": torch.stack(per_image["iou"]).mean() if per_image["iou"] else zero,
            "iop": torch.stack(per_image["iop"]).mean() if per_image["iop"] else zero,
        }
        losses["total"] = self.weighted_total(losses, self.weights)
        return losses

    def export_modules(self) -> dict[str, nn.Module]:
        return {"projection": self.projection, "selector": self.selector, "mask_proj": self.mask_proj}

    def manifest_fields(self) -> dict[str, Any]:
        return {"embed_dim": self.embedder.out_dim}


@dataclass
class LisaBatch:
    """One LISA micro-batch: B images with Q_b questions each, N = Σ Q_b conversations.

    Attributes:
        images: B (H, W, 3) uint8 RGB images.
        conversations: N (question, answer) pairs; each answer holds one ``<SEG>``.
        image_index: (N,) int64, the image of each conversation.
        encodings: B frozen SAM image encodings (no gradient).
        gt_masks: N (H_b, W_b) uint8 ground truths (0/1, 255 = ignore) on the device.
    """

    images: list[np.ndarray]
    conversations: list[tuple[str, str]]
    image_index: torch.Tensor
    encodings: list[SamImageEncoding]
    gt_masks: list[torch.Tensor]


class LisaTrainModules(SegTrainModules):
    """Every trained part of LISA: the VLM side and :class:`LisaMaskHead` (``head``).

    ``head.projection`` (h → h → 256, LISA's ``text_hidden_fcs``) and ``head.mask_decoder``
    (a trainable copy of SAM's) are submodules; SAM's image and prompt encoders stay
    frozen outside this module. Losses (LISA eq. 3): ``λ_lm·lm + λ_bce·bce + λ_dice·dice``
    with the mask terms averaged over the batch's masks (every question of every image,
    as ``model/LISA.py`` divides by ``num_masks``), at each image's resolution.
    ``ignore_pixels``: how ground-truth pixels labelled 255 enter the mask loss.
    """

    method = "lisa"
    loss_names = ("lm", "bce", "dice")
    mask_side = ("head.mask_decoder.",)

    def __init__(
        self,
        vlm: SegVLM,
        head: LisaMaskHead,
        *,
        lm_weight: float = 1.0,
        bce_weight: float = 2.0,
        dice_weight: float = 0.5,
        sam_model_type: str = "vit_h",
        ignore_pixels: str = "background",
    ) -> None:
        super().__init__(vlm)
        self.head = head
        self.weights = {"lm": lm_weight, "bce": bce_weight, "dice": dice_weight}
        self.sam_model_type = sam_model_type
        self.ignore_pixels = ignore_pixels

    def prepare_batch(self, examples: list[TrainExample], device: torch.device) -> LisaBatch:
        """Encode each image with the frozen SAM image encoder; move the masks to ``device``."""
        from llmseg_ros.models.sam_prompting import encode_image

        return LisaBatch(
            images=[e.image for e in examples],
            conversations=[pair for e in examples for pair in e.conversations],
            image_index=torch.tensor(
                [b for b, e in enumerate(examples) for _ in e.questions], dtype=torch.long
            ),
            encodings=[encode_image(self.head.sam, e.image) for e in examples],
            gt_masks=[
                torch.from_numpy(np.ascontiguousarray(t)).to(device) for e in examples for t in e.targets
            ],
        )

    def forward(self, batch: LisaBatch) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch: ``total``, ``lm``, ``bce``, ``dice`` (scalars, float32)."""
        from llmseg_ros.models.losses import lisa_mask_loss

        rows = batch.image_index.tolist()
        lm, seg_hidden = self.seg_query([batch.images[b] for b in rows], batch.conversations)
        bce = dice = torch.zeros((), device=seg_hidden.device)
        for i, (b, gt) in enumerate(zip(rows, batch.gt_masks)):
            logits, _ = self.head(batch.encodings[b], seg_hidden[i : i + 1])  # (1, H, W)
            terms = lisa_mask_loss(logits, gt[None], ignore_pixels=self.ignore_pixels)
            bce = bce + terms["bce"]
            dice = dice + terms["dice"]
        count = len(batch.gt_masks)
        losses = {"lm": lm.float(), "bce": bce / count, "dice": dice / count}
        losses["total"] = self.weighted_total(losses, self.weights)
        return losses

    def export_modules(self) -> dict[str, nn.Module]:
        return {"projection": self.head.projection, "mask_decoder": self.head.mask_decoder}

    def manifest_fields(self) -> dict[str, Any]:
        return {"embed_dim": self.head.sam.prompt_encoder.embed_dim, "sam_model_type": self.sam_model_type}


def seg_row_std(vlm: SegVLM) -> float:
    """σ of a freshly initialised vocabulary row: the language model's ``initializer_range``.

    What transformers' ``_init_weights`` uses for new rows of the input embeddings and the
    LM head when a resize does not start from the mean (0.02 when the config gives none).
    """
    base = vlm.model.get_base_model() if hasattr(vlm.model, "get_base_model") else vlm.model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return float(getattr(config, "initializer_range", None) or 0.02)


def _vocab_weights(module: nn.Module) -> list[torch.Tensor]:
    """The (vocab, hidden) weight of an embedding / LM head, and of every peft copy of it."""
    copies: Any = getattr(module, "modules_to_save", None)
    if copies is None:
        return [cast(torch.Tensor, module.weight)]
    original: Any = module.original_module
    return [original.weight, *(m.weight for m in copies.values())]


def init_seg_rows(vlm: SegVLM, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start the ``<SEG>`` rows of the input embeddings and the LM head as the authors' run did.

    LISA and LLM-Seg add ``[SEG]`` and call ``resize_token_embeddings`` under transformers
    4.31 / 4.29, which builds the grown matrices and initialises them with the model's
    ``_init_weights`` — for LLaMA ``normal_(0, initializer_range)`` — before copying the
    old rows back: the new row of each is an independent N(0, σ²) draw. Here both rows
    are drawn from a generator seeded with ``seed`` (the same on every process), and
    written into the base weights and every trainable peft copy of them.

    Returns:
        The (hidden,) embedding row and the (hidden,) LM-head row now in place.
    """
    std = seg_row_std(vlm)
    generator = torch.Generator().manual_seed(int(seed))
    embedding, head = vlm.model.get_input_embeddings(), vlm.model.get_output_embeddings()
    rows = []
    with torch.no_grad():
        for module in (embedding, head):
            weights = _vocab_weights(module)
            row = torch.randn(weights[0].shape[1], generator=generator, dtype=torch.float32) * std
            for weight in weights:
                weight[vlm.seg_token_id] = row.to(weight.device, weight.dtype)
            rows.append(weights[-1][vlm.seg_token_id].detach().clone())
    return rows[0], rows[1]


def _initial_weights(config: TrainConfig) -> LoadedWeights | None:
    """``init_weights`` read back and checked against the run's method."""
    if config.init_weights is None:
        return None
    from llmseg_ros.weights.directory import load_weights

    init = load_weights(config.init_weights)
    if init.manifest.method != config.method:
        raise ValueError(
            f"init_weights {config.init_weights} hold {init.manifest.method!r} weights, not {config.method!r}"
        )
    if init.adapter_dir is None:
        raise ValueError(f"init_weights {config.init_weights} hold no VLM adapter (adapter/)")
    return init


def _load_init_state(init: LoadedWeights, config: TrainConfig, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        state = init.state_dicts.get(name)
        if state is None:
            raise ValueError(f"init_weights {config.init_weights} hold no '{name}.*' tensors")
        module.load_state_dict(state)


def _load_sam(config: TrainConfig, device: torch.device, why: str) -> Sam:
    if config.sam_checkpoint is None:
        raise ValueError(f"{why}, but sam_checkpoint is not set")
    from llmseg_ros.models.sam import build_sam

    return build_sam(config.sam_model_type, config.sam_checkpoint, device)


def build_train_modules(
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    need_proposals: bool,
) -> SegTrainModules:
    """Load the models of ``config.method`` and return the module holding what it trains.

    The VLM is loaded with a trainable LoRA adapter (from ``init_weights`` when given;
    otherwise fresh, with the ``<SEG>`` rows started as ``config.seg_init`` says, see
    :func:`init_seg_rows`).
    LLM-Seg: DINOv2 (frozen) with fresh or initial ``mask_proj``, projection and
    selector; SAM and its proposal generator only when ``need_proposals`` (some source
    has no cache). LISA: SAM (frozen) and a :class:`LisaMaskHead` with fresh or initial
    projection and mask decoder (SAM's own decoder weights when fresh, as LISA starts).

    Args:
        config: the run's configuration (method, models, LoRA, losses, ``init_weights``).
        device: where everything lives.
        dtype: dtype of the frozen VLM and DINOv2 weights.
        need_proposals: LLM-Seg only: load SAM's proposal stage for uncached sources.
    """
    from llmseg_ros.models.vlm import SegVLM

    init = _initial_weights(config)
    vlm = SegVLM.load(
        config.vlm,
        device=device,
        dtype=dtype,
        adapter_dir=None if init is None else init.adapter_dir,
        lora=config.lora,
        trainable=True,
    )
    if init is None and config.seg_init == "normal":
        init_seg_rows(vlm, config.seed)
    if config.gradient_checkpointing:
        vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init is not None and init.manifest.hidden_size != vlm.hidden_size:
        raise ValueError(
            f"init_weights {config.init_weights} expect a VLM of hidden size {init.manifest.hidden_size}, "
            f"{config.vlm!r} has {vlm.hidden_size}"
        )
    if config.method == "lisa":
        from llmseg_ros.models.heads import LisaMaskHead

        sam = _load_sam(config, device, "method 'lisa' fine-tunes SAM's mask decoder")
        sam.requires_grad_(False)
        head = LisaMaskHead(sam, vlm.hidden_size).to(device)
        head.requires_grad_(True)
        if init is not None:
            _load_init_state(init, config, {"projection": head.projection, "mask_decoder": head.mask_decoder})
        return LisaTrainModules(
            vlm,
            head,
            lm_weight=config.lm_weight,
            bce_weight=config.bce_weight,
            dice_weight=config.dice_weight,
            sam_model_type=config.sam_model_type,
            ignore_pixels=config.ignore_pixels,
        )

    from llmseg_ros.models.embeddings import MaskEmbedder
    from llmseg_ros.models.heads import TextProjection
    from llmseg_ros.models.selector import ProposalSelector

    embedder = MaskEmbedder.load(config.dinov2, device=device, dtype=dtype, input_size=config.embed_size)
    projection = TextProjection(vlm.hidden_size).to(device)
    selector = ProposalSelector().to(device)
    if init is not None:
        _load_init_state(
            init, config, {"projection": projection, "selector": selector, "mask_proj": embedder.proj}
        )
    proposal_fn = None
    if need_proposals:
        from llmseg_ros.models.proposals import ProposalGenerator

        sam = _load_sam(
            config,
            device,
            "a data source has no proposal cache, so SAM runs during training "
            "(precompute caches with training/precompute.py or set sam_checkpoint)",
        )
        proposal_fn = ProposalGenerator.from_config(sam, config.proposals).generate
    return TrainModules(
        vlm,
        embedder,
        projection,
        selector,
        iou_weight=config.iou_weight,
        iop_weight=config.iop_weight,
        lm_weight=config.lm_weight,
        tau=config.tau,
        iou_direction=config.iou_direction,
        proposal_fn=proposal_fn,
        ignore_pixels=config.ignore_pixels,
    )


def build_tiny_models(directory: str | Path, seed: int = 0) -> dict[str, str]:
    """Write (once) tiny random base models for ``--profile tiny``: LLaVA, DINOv2, SAM.

    Returns:
        ``{"vlm": dir, "dinov2": dir, "sam_checkpoint": file}``.
    """
    from llmseg_ros.tiny.sam import save_tiny_sam
    from llmseg_ros.tiny.vision import save_tiny_dinov2
    from llmseg_ros.tiny.vlm import save_tiny_llava
    from llmseg_ros.training.precompute import TINY_SAM_IMAGE_SIZE

    directory = Path(directory)
    paths = {
        "vlm": str(directory / "llava"),
        "dinov2": str(directory / "dinov2"),
        "sam_checkpoint": str(directory / "sam_tiny.pth"),
    }
    marker = directory / TINY_MARKER
    expected = {"version": TINY_VERSION, "seed": seed}
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == expected:
            return paths
    except (OSError, json.JSONDecodeError):
        pass
    directory.mkdir(parents=True, exist_ok=True)
    save_tiny_llava(Path(paths["vlm"]), seed=seed)
    save_tiny_dinov2(Path(paths["dinov2"]), seed=seed)
    save_tiny_sam(Path(paths["sam_checkpoint"]), seed=seed, image_size=TINY_SAM_IMAGE_SIZE)
    from llmseg_ros.data.io import atomic_write_json

    atomic_write_json(marker, expected)
    return paths


def apply_tiny_profile(config: TrainConfig) -> TrainConfig:
    """``profile: tiny``: tiny random base models (and synthetic data when no source is given).

    Models go to ``OUTPUT_DIR/tiny_models``; without sources, 16 synthetic scenes are
    written to ``OUTPUT_DIR/synthetic`` and used as a JSONL source with proposals from the
    tiny SAM. The tiny DINOv2 input size and proposal settings of ``llmseg_ros.tiny`` are used.
    """
    from llmseg_ros.tiny import TINY_EMBED_SIZE, TINY_PROPOSALS

    out = Path(config.output_dir)
    paths = build_tiny_models(out / "tiny_models", seed=config.seed)
    changes: dict[str, Any] = {
        "vlm": paths["vlm"],
        "dinov2": paths["dinov2"],
        "sam_checkpoint": paths["sam_checkpoint"],
        "sam_model_type": "tiny",
        "embed_size": TINY_EMBED_SIZE,
        "proposals": TINY_PROPOSALS,
    }
    if not config.sources:
        from llmseg_ros.data.synthetic import write_synthetic_dataset

        data_dir = out / "synthetic"
        train_file = data_dir / "jsonl" / "train.jsonl"
        if not train_file.is_file():
            write_synthetic_dataset(data_dir, {"train": 16}, seed=config.seed)
        changes["sources"] = [DataSource(kind="jsonl", path=str(train_file), name="synthetic")]
    return config.replace(**changes)
