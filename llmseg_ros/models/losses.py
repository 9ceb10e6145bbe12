"""Training losses: LLM-Seg's selection losses and LISA's mask losses.

LLM-Seg (paper eq. 1, 3, 4), per sample with K real proposals:

* ``L_iou = KL(softmax(sim / τ) ‖ softmax(IoU_gt / τ))`` summed over the K proposals,
  τ = 0.05. The paper writes ``KL(Softmax(P·sᵀ/τ), Softmax(I/τ))``; read with the usual
  convention ``KL(P, Q) = Σ P log(P / Q)`` the prediction is the first argument, which is
  our default ``direction="pred_gt"``. The released code instead calls
  ``F.kl_div(pred.log(), gt, reduction="sum")`` = ``Σ gt log(gt / pred)``, i.e.
  ``KL(gt ‖ pred)``; pass ``direction="gt_pred"`` to train exactly like it.
* ``L_iop = (1/K) Σ_k exp(g_k − 1) · (p_k − g_k)²`` with ``p_k`` the predicted and
  ``g_k`` the ground-truth IoP.
* ``L = L_lm + λ_iou L_iou + λ_iop L_iop`` with λ_iou = 1, λ_iop = 50.

Batches are padded: ``padding_mask`` (B, K) bool, True = padded slot (ignored). Each loss
is computed per sample over its real proposals and averaged over the samples that have at
least one real proposal (0, still differentiable, when none has).

Pixels labelled 255 ("ignore", e.g. ReasonSeg's ignore polygons) in a ground truth are
handled one of two ways (``ignore_pixels``): ``"background"`` — the released code of
both papers: the target is ``mask == 1``, so ignored pixels count as background in the
IoU / IoP targets (LLM-Seg ``utils/reason_seg_dataset.py``: ``(mask == 1)``, then
``compute_all_iou`` / ``compute_all_iop``) and in LISA's mask loss; ``"exclude"`` — they
are taken out of every count (the way the ReasonSeg metrics treat them).

LISA (``model/LISA.py``), for N predicted masks with logits ``x`` and targets ``t``:

* ``sigmoid_bce_loss`` = (1/N) Σ_n mean_pixels BCEWithLogits(x_n, t_n);
* ``dice_loss`` = (1/N) Σ_n [1 − (2 Σ σ(x)t/s + ε) / (Σ σ(x)/s + Σ t/s + ε)] with
  s = 1000, ε = 1e-6, i.e. ``1 − (2I + 0.001) / (|P| + |T| + 0.001)`` in pixel units;
  LISA divides by ``N + 1e-8``, so N = 0 gives 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KL_DIRECTIONS = ("pred_gt", "gt_pred")
IGNORE_LABEL = 255
IGNORE_MODES = ("background", "exclude")


def _check_ignore_mode(ignore_pixels: str) -> None:
    if ignore_pixels not in IGNORE_MODES:
        raise ValueError(f"ignore_pixels must be one of {list(IGNORE_MODES)}, got {ignore_pixels!r}")


def _real_mask(reference: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, K) bool, True = real entry; validates the padding mask against ``reference``."""
    if padding_mask is None:
        return torch.ones(reference.shape, dtype=torch.bool, device=reference.device)
    if padding_mask.shape != reference.shape or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"padding_mask must be a bool tensor of shape {tuple(reference.shape)}, "
            f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    return ~padding_mask.to(reference.device)


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name_a} must be (B, K), got shape {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def _batch_mean(per_row: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of per-row losses (B,) over rows with at least one real entry."""
    has_real = real.any(dim=1)
    return (per_row * has_real).sum() / has_real.sum().clamp(min=1)


def iou_kl_loss(
    similarity: torch.Tensor,
    iou_gt: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    tau: float = 0.05,
    direction: str = "pred_gt",
) -> torch.Tensor:
    """LLM-Seg IoU-head loss (eq. 1): temperature-softmax KL between predicted and true IoU.

    Args:
        similarity: (B, K) predicted cosine similarities.
        iou_gt: (B, K) ground-truth IoU of each proposal, in [0, 1].
        padding_mask: (B, K) bool, True = padded; ``None`` = all real.
        tau: softmax temperature (> 0).
        direction: ``"pred_gt"`` = Σ P log(P/Q) (paper, default) or ``"gt_pred"`` =
            Σ Q log(Q/P) (released code), with P = softmax(sim/τ), Q = softmax(iou_gt/τ)
            over each sample's real proposals.

    Returns:
        Scalar float32: per-sample sum over K, averaged over the batch.
    """
    _check_pair("similarity", similarity, "iou_gt", iou_gt)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {list(KL_DIRECTIONS)}, got {direction!r}")
    real = _real_mask(similarity, padding_mask)
    floor = torch.finfo(torch.float32).min  # finite, so padded terms are 0 · finite, never NaN
    log_p = (similarity.float() / tau).masked_fill(~real, floor).log_softmax(dim=1)
    log_q = (iou_gt.to(similarity.device).float() / tau).masked_fill(~real, floor).log_softmax(dim=1)
    log_a, log_b = (log_p, log_q) if direction == "pred_gt" else (log_q, log_p)
    terms = log_a.exp() * (log_a - log_b)  # KL(A ‖ B) = Σ A log(A / B)
    per_row = torch.where(real, terms, torch.zeros_like(terms)).sum(dim=1)
    return _batch_mean(per_row, real)


def iop_loss(
    iop_pred: torch.Tensor,
    iop_gt: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LLM-Seg IoP-head loss (eq. 3): mean_k exp(g_k − 1) · (p_k − g_k)².

    Args:
        iop_pred: (B, K) predicted IoP probabilities in [0, 1].
        iop_gt: (B, K) ground-truth IoP in [0, 1].
        padding_mask: (B, K) bool, True = padded; ``None`` = all real.

    Returns:
        Scalar float32: mean over each sample's real proposals, averaged over the batch
        (for batch size 1, the mean over the real proposals).
    """
    _check_pair("iop_pred", iop_pred, "iop_gt", iop_gt)
    real = _real_mask(iop_pred, padding_mask)
    pred = iop_pred.float()
    gt = iop_gt.to(iop_pred.device).float()
    terms = torch.exp(gt - 1.0) * (pred - gt) ** 2
    terms = torch.where(real, terms, torch.zeros_like(terms))
    per_row = terms.sum(dim=1) / real.sum(dim=1).clamp(min=1)
    return _batch_mean(per_row, real)


def llmseg_loss(
    lm_loss: torch.Tensor,
    similarity: torch.Tensor,
    iou_gt: torch.Tensor,
    iop_pred: torch.Tensor,
    iop_gt: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    iou_weight: float = 1.0,
    iop_weight: float = 50.0,
    tau: float = 0.05,
    iou_direction: str = "pred_gt",
) -> dict[str, torch.Tensor]:
    """LLM-Seg training loss (eq. 4 plus the language-model cross-entropy).

    Args:
        lm_loss: scalar LM cross-entropy of the teacher-forced answer.
        similarity, iou_gt: (B, K), see :func:`iou_kl_loss`.
        iop_pred, iop_gt: (B, K), see :func:`iop_loss`.
        padding_mask: (B, K) bool, True = padded.
        iou_weight, iop_weight: λ_iou (1.0) and λ_iop (50.0).
        tau: temperature of :func:`iou_kl_loss`.
        iou_direction: KL direction of :func:`iou_kl_loss`.

    Returns:
        ``{"total": lm + λ_iou·iou + λ_iop·iop, "lm": lm, "iou": iou, "iop": iop}``, the
        components unweighted, all scalar float32 tensors.
    """
    if lm_loss.ndim != 0:
        raise ValueError(f"lm_loss must be a scalar tensor, got shape {tuple(lm_loss.shape)}")
    lm = lm_loss.float()
    iou = iou_kl_loss(similarity, iou_gt, padding_mask, tau=tau, direction=iou_direction)
    iop = iop_loss(iop_pred, iop_gt, padding_mask)
    total = lm + iou_weight * iou.to(lm.device) + iop_weight * iop.to(lm.device)
    return {"total": total, "lm": lm, "iou": iou, "iop": iop}


def _resize_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres (like skimage ``resize(order=0)``)."""
    rows = np.minimum(
        ((np.arange(height) + 0.5) * label.shape[0] / height).astype(np.int64), label.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(width) + 0.5) * label.shape[1] / width).astype(np.int64), label.shape[1] - 1
    )
    return label[rows[:, None], cols[None, :]]


def proposal_targets(
    proposal_masks: np.ndarray, gt_mask: np.ndarray, ignore_pixels: str = "exclude"
) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth IoU and IoP of each proposal, at the proposals' resolution.

    With S a proposal and G the foreground: IoU = |S∩G| / |S∪G|, IoP = |S∩G| / |S|; a
    proposal with no counted pixel (|S| = 0) scores 0 for both, as does IoU when
    |S∪G| = 0 (the released code divides 0 by 0 there).

    Args:
        proposal_masks: (K, H, W) bool.
        gt_mask: (H', W') bool or integer with values in {0, 1, 255}; resized to (H, W)
            by nearest neighbour when its size differs.
        ignore_pixels: pixels labelled 255 are ``"exclude"``-d from every count, or
            count as ``"background"`` (LLM-Seg's released code; see the module docstring).

    Returns:
        ``(iou, iop)``, each (K,) float32 in [0, 1].
    """
    masks = np.asarray(proposal_masks)
    if masks.ndim != 3:
        raise ValueError(f"proposal_masks must be (K, H, W), got shape {masks.shape}")
    gt = np.asarray(gt_mask)
    if gt.ndim != 2 or gt.size == 0:
        raise ValueError(f"gt_mask must be a non-empty (H, W) array, got shape {gt.shape}")
    if gt.dtype != bool:
        values = np.unique(gt)
        if not np.isin(values, (0, 1, IGNORE_LABEL)).all():
            raise ValueError(f"gt_mask values must be 0, 1 or {IGNORE_LABEL}, got {values.tolist()[:10]}")
    _check_ignore_mode(ignore_pixels)
    k, h, w = masks.shape
    if gt.shape != (h, w):
        gt = _resize_nearest(gt, h, w)
    counted = gt != IGNORE_LABEL if ignore_pixels == "exclude" else np.ones((h, w), dtype=bool)
    valid = counted.reshape(-1)
    fg = ((gt == 1) if gt.dtype != bool else gt).reshape(-1) & valid
    s = masks.reshape(k, h * w).astype(bool) & valid  # (K, N) valid proposal pixels
    inter = (s & fg).sum(axis=1).astype(np.float64)
    area = s.sum(axis=1).astype(np.float64)
    union = area + float(fg.sum()) - inter
    iou = np.divide(inter, union, out=np.zeros(k), where=union > 0)
    iop = np.divide(inter, area, out=np.zeros(k), where=area > 0)
    return iou.astype(np.float32), iop.astype(np.float32)


def _check_masks(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, H, W), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets must have the shape of logits {tuple(logits.shape)}, got {tuple(targets.shape)}"
        )


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LISA's mask BCE: per-mask mean of BCE-with-logits, summed and divided by N + 1e-8.

    Args:
        logits: (N, H, W) mask logits.
        targets: (N, H, W) float targets in {0, 1}.

    Returns:
        Scalar float32 (0 for N = 0).
    """
    _check_masks(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return loss.flatten(1).mean(dim=1).sum() / (logits.shape[0] + 1e-8)


def dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6
) -> torch.Tensor:
    """LISA's mask dice loss (see the module docstring for the formula).

    Args:
        logits: (N, H, W) mask logits.
        targets: (N, H, W) float targets in {0, 1}.
        scale: LISA's ``scale`` (1000): sums are divided by it before adding ``eps``.
        eps: LISA's smoothing term (1e-6).

    Returns:
        Scalar float32, mean over the N masks (0 for N = 0).
    """
    _check_masks(logits, targets)
    probs = logits.float().sigmoid().flatten(1)
    t = targets.float().flatten(1)
    numerator = 2 * (probs / scale * t).sum(dim=-1)
    denominator = (probs / scale).sum(dim=-1) + (t / scale).sum(dim=-1)
    loss = 1 - (numerator + eps) / (denominator + eps)
    return loss.sum() / (logits.shape[0] + 1e-8)


LISA_BCE_WEIGHT = 2.0
LISA_DICE_WEIGHT = 0.5


def lisa_mask_loss(
    logits: torch.Tensor,
    gt_masks: torch.Tensor,
    bce_weight: float = LISA_BCE_WEIGHT,
    dice_weight: float = LISA_DICE_WEIGHT,
    ignore_pixels: str = "exclude",
) -> dict[str, torch.Tensor]:
    """LISA's mask loss: ``bce_weight · BCE + dice_weight · Dice`` (LM loss added by the caller).

    Args:
        logits: (N, H, W) mask logits at the ground truth's resolution.
        gt_masks: (N, H, W) uint8/bool ground truth with 0/1, and 255 = ignore.
        bce_weight, dice_weight: LISA's λ_bce (2.0) and λ_dice (0.5).
        ignore_pixels: ``"background"`` (LISA's released code: the target is
            ``mask == 1``, an ignored pixel is a background pixel with its own logit) or
            ``"exclude"`` (ignored pixels add nothing to either term: logit forced to a
            large negative value, target 0; they still count in BCE's per-pixel mean).

    Returns:
        dict with ``total`` (weighted), ``bce`` and ``dice`` (unweighted), all scalars.
    """
    if logits.shape != gt_masks.shape:
        raise ValueError(
            f"gt_masks must have the shape of logits {tuple(logits.shape)}, got {tuple(gt_masks.shape)}"
        )
    _check_ignore_mode(ignore_pixels)
    gt = gt_masks.to(logits.device)
    targets = (gt == 1).float()
    scores = logits.float()
    if ignore_pixels == "exclude":
        scores = torch.where(gt != IGNORE_LABEL, scores, torch.full_like(scores, -1e4))
    bce = sigmoid_bce_loss(scores, targets)
    dice = dice_loss(scores, targets)
    return {"total": bce_weight * bce + dice_weight * dice, "bce": bce, "dice": dice}
