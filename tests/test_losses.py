"""LLM-Seg selection losses, proposal targets and LISA's mask losses against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmseg_ros.models.losses import (
    dice_loss,
    iop_loss,
    iou_kl_loss,
    llmseg_loss,
    proposal_targets,
    sigmoid_bce_loss,
)


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v - max(values)) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# -- IoU KL loss ------------------------------------------------------------------------
def test_iou_kl_two_proposals_by_hand() -> None:
    sim, gt, tau = [0.1, 0.0], [1.0, 0.0], 0.05
    p = _softmax([s / tau for s in sim])  # softmax([2, 0])
    q = _softmax([g / tau for g in gt])  # softmax([20, 0])
    assert p[0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    got = iou_kl_loss(torch.tensor([sim]), torch.tensor([gt]), tau=tau)
    assert got.item() == pytest.approx(_kl(p, q), rel=1e-5)
    reverse = iou_kl_loss(torch.tensor([sim]), torch.tensor([gt]), tau=tau, direction="gt_pred")
    assert reverse.item() == pytest.approx(_kl(q, p), rel=1e-5)
    # "gt_pred" is what the released code computes with F.kl_div(log P, Q, reduction="sum")
    expected = F.kl_div(torch.tensor(p).log(), torch.tensor(q), reduction="sum")
    assert reverse.item() == pytest.approx(expected.item(), rel=1e-5)


def test_iou_kl_is_zero_for_k1_and_for_matching_scores() -> None:
    assert iou_kl_loss(torch.tensor([[0.3]]), torch.tensor([[0.9]])).item() == pytest.approx(0.0, abs=1e-7)
    x = torch.tensor([[0.2, 0.5, 0.1]])
    assert iou_kl_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_iou_kl_padded_batch_equals_mean_of_unpadded_rows() -> None:
    rows = [([0.3, -0.1], [0.1, 0.6]), ([0.2, 0.9, -0.4], [0.0, 0.2, 0.3])]
    sim = torch.tensor([[0.3, -0.1, 50.0], [0.2, 0.9, -0.4]])
    gt = torch.tensor([[0.1, 0.6, 7.0], [0.0, 0.2, 0.3]])
    padding = torch.tensor([[False, False, True], [False, False, False]])
    expected = [
        _kl(_softmax([s / 0.05 for s in r_s]), _softmax([g / 0.05 for g in r_g])) for r_s, r_g in rows
    ]
    got = iou_kl_loss(sim, gt, padding)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_iou_kl_gradients_finite_with_empty_rows() -> None:
    sim = torch.tensor([[0.3, -0.1, 0.0], [0.5, 0.2, 0.1]], requires_grad=True)
    gt = torch.tensor([[0.6, 0.1, 0.0], [0.0, 0.0, 0.0]])
    padding = torch.tensor([[False, False, True], [True, True, True]])
    loss = iou_kl_loss(sim, gt, padding)
    one_row = iou_kl_loss(sim[:1, :2].detach(), gt[:1, :2])
    assert loss.item() == pytest.approx(one_row.item(), rel=1e-6)  # the empty row is not averaged in
    loss.backward()
    assert sim.grad is not None and torch.isfinite(sim.grad).all()
    assert (sim.grad[0, 2] == 0) and (sim.grad[1] == 0).all() and sim.grad[0, :2].abs().sum() > 0
    all_padded = iou_kl_loss(sim, gt, torch.ones(2, 3, dtype=torch.bool))
    assert all_padded.item() == 0.0 and all_padded.requires_grad


def test_iou_kl_validation() -> None:
    with pytest.raises(ValueError, match="tau"):
        iou_kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), tau=0.0)
    with pytest.raises(ValueError, match="direction"):
        iou_kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), direction="sideways")
    with pytest.raises(ValueError, match="iou_gt"):
        iou_kl_loss(torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="padding_mask"):
        iou_kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


# -- IoP loss ---------------------------------------------------------------------------
def test_iop_loss_by_hand() -> None:
    got = iop_loss(torch.tensor([[0.2, 0.9]]), torch.tensor([[0.0, 1.0]]))
    assert got.item() == pytest.approx((math.exp(-1) * 0.04 + 1.0 * 0.01) / 2, rel=1e-6)
    k1 = iop_loss(torch.tensor([[0.7]]), torch.tensor([[0.5]]))
    assert k1.item() == pytest.approx(math.exp(-0.5) * 0.04, rel=1e-6)


def test_iop_loss_padded_batch() -> None:
    pred = torch.tensor([[0.2, 0.9, 0.3], [0.7, 0.0, 0.0]])
    gt = torch.tensor([[0.0, 1.0, 0.8], [0.5, 0.0, 0.0]])
    padding = torch.tensor([[False, False, False], [False, True, True]])
    row0 = (math.exp(-1) * 0.04 + 0.01 + math.exp(-0.2) * 0.25) / 3
    row1 = math.exp(-0.5) * 0.04
    assert iop_loss(pred, gt, padding).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


# -- combined -------------------------------------------------------------------------------
def test_llmseg_loss_combines_with_weights() -> None:
    sim, iou_gt = torch.tensor([[0.1, 0.0]]), torch.tensor([[1.0, 0.0]])
    iop_pred, iop_gt = torch.tensor([[0.2, 0.9]]), torch.tensor([[0.0, 1.0]])
    lm = torch.tensor(1.25)
    out = llmseg_loss(lm, sim, iou_gt, iop_pred, iop_gt, None)
    iou = iou_kl_loss(sim, iou_gt)
    iop = iop_loss(iop_pred, iop_gt)
    assert set(out) == {"total", "lm", "iou", "iop"}
    assert out["total"].item() == pytest.approx(1.25 + iou.item() + 50.0 * iop.item(), rel=1e-6)
    assert out["iou"].item() == pytest.approx(iou.item()) and out["iop"].item() == pytest.approx(iop.item())
    custom = llmseg_loss(lm, sim, iou_gt, iop_pred, iop_gt, None, iou_weight=2.0, iop_weight=0.0)
    assert custom["total"].item() == pytest.approx(1.25 + 2 * iou.item(), rel=1e-6)
    with pytest.raises(ValueError, match="lm_loss"):
        llmseg_loss(torch.ones(2), sim, iou_gt, iop_pred, iop_gt, None)


# -- proposal targets -------------------------------------------------------------------------
GT = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [255, 255, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=np.uint8,
)


def _proposals() -> np.ndarray:
    masks = np.zeros((7, 4, 4), dtype=bool)
    masks[0, :2, :2] = True  # exactly the object
    masks[1, :3, :2] = True  # object + ignore row → ignore removed
    masks[2] = True  # everything
    # masks[3] empty
    masks[4, 2, :2] = True  # only ignore pixels
    masks[5, :, 2:] = True  # background only
    masks[6, 0, :] = True  # half on the object
    return masks


EXPECTED_IOU = [1.0, 1.0, 4 / 14, 0.0, 0.0, 0.0, 2 / 6]
EXPECTED_IOP = [1.0, 1.0, 4 / 14, 0.0, 0.0, 0.0, 2 / 4]


def test_proposal_targets_by_hand() -> None:
    iou, iop = proposal_targets(_proposals(), GT)
    assert iou.dtype == iop.dtype == np.float32 and iou.shape == (7,)
    np.testing.assert_allclose(iou, EXPECTED_IOU, rtol=1e-6)
    np.testing.assert_allclose(iop, EXPECTED_IOP, rtol=1e-6)


# LLM-Seg's released targets: the sampled mask is ``(mask == 1)``, the ignore row is background
EXPECTED_IOU_BACKGROUND = [1.0, 4 / 6, 4 / 16, 0.0, 0.0, 0.0, 2 / 6]
EXPECTED_IOP_BACKGROUND = [1.0, 4 / 6, 4 / 16, 0.0, 0.0, 0.0, 2 / 4]


def test_proposal_targets_with_ignore_pixels_as_background_by_hand() -> None:
    iou, iop = proposal_targets(_proposals(), GT, "background")
    np.testing.assert_allclose(iou, EXPECTED_IOU_BACKGROUND, rtol=1e-6)
    np.testing.assert_allclose(iop, EXPECTED_IOP_BACKGROUND, rtol=1e-6)
    np.testing.assert_array_equal(iou, proposal_targets(_proposals(), GT == 1, "background")[0])


def test_proposal_targets_resizes_truth_by_nearest() -> None:
    big = np.kron(GT, np.ones((3, 3), dtype=np.uint8))  # 12×12, same content
    iou, iop = proposal_targets(_proposals(), big)
    np.testing.assert_allclose(iou, EXPECTED_IOU, rtol=1e-6)
    np.testing.assert_allclose(iop, EXPECTED_IOP, rtol=1e-6)


def test_proposal_targets_bool_truth_and_edge_cases() -> None:
    iou, iop = proposal_targets(_proposals(), GT == 1)  # no ignore: the ignore row is background
    assert iou[1] == pytest.approx(4 / 6) and iop[1] == pytest.approx(4 / 6)
    iou0, iop0 = proposal_targets(np.zeros((0, 4, 4), dtype=bool), GT)
    assert iou0.shape == iop0.shape == (0,)
    empty_truth = np.zeros((4, 4), dtype=np.uint8)
    iou_e, iop_e = proposal_targets(_proposals(), empty_truth)
    assert not iou_e.any() and not iop_e.any()
    with pytest.raises(ValueError, match="0, 1 or 255"):
        proposal_targets(_proposals(), GT * 2)
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        proposal_targets(np.zeros((4, 4), dtype=bool), GT)


# -- LISA mask losses -----------------------------------------------------------------------
def test_sigmoid_bce_loss_by_hand() -> None:
    logits = torch.zeros(3, 4, 5)
    targets = torch.randint(0, 2, (3, 4, 5)).float()
    assert sigmoid_bce_loss(logits, targets).item() == pytest.approx(math.log(2), rel=1e-6)
    x = torch.tensor([[[2.0, -1.0]], [[0.5, 3.0]]])  # (2, 1, 2)
    t = torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]])

    def bce(logit: float, target: float) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -(target * math.log(p) + (1 - target) * math.log(1 - p))

    per_mask = [(bce(2.0, 1) + bce(-1.0, 1)) / 2, (bce(0.5, 0) + bce(3.0, 1)) / 2]
    assert sigmoid_bce_loss(x, t).item() == pytest.approx(sum(per_mask) / 2, rel=1e-6)
    assert sigmoid_bce_loss(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4)).item() == 0.0


def test_dice_loss_by_hand() -> None:
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    half = dice_loss(torch.zeros(1, 2, 2), t)  # σ = 0.5 everywhere
    assert half.item() == pytest.approx(
        1 - (2 * 1.0 / 1000 + 1e-6) / (2.0 / 1000 + 2.0 / 1000 + 1e-6), rel=1e-6
    )
    perfect = dice_loss(torch.where(t > 0, 100.0, -100.0), t)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    miss = dice_loss(torch.full((1, 2, 2), -100.0), t)
    assert miss.item() == pytest.approx(1 - 1e-6 / (2.0 / 1000 + 1e-6), rel=1e-5)
    both = dice_loss(torch.cat([torch.zeros(1, 2, 2), torch.full((1, 2, 2), -100.0)]), torch.cat([t, t]))
    assert both.item() == pytest.approx((half.item() + miss.item()) / 2, rel=1e-5)
    assert dice_loss(torch.zeros(0, 2, 2), torch.zeros(0, 2, 2)).item() == 0.0
    with pytest.raises(ValueError, match="targets"):
        dice_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))
