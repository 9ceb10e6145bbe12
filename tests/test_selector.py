"""Proposal selector: fusion/head maths, padding, strategies, union; and the text projection."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmseg_ros.config import SELECTION_STRATEGIES
from llmseg_ros.models.heads import TextProjection
from llmseg_ros.models.selector import FusionBlock, MaskedAttention, ProposalSelector, select, union_mask

SMALL = {"dim": 32, "num_heads": 4, "mlp_dim": 64, "iou_hidden": 48, "iop_hidden": 16}


@pytest.fixture()
def selector() -> ProposalSelector:
    torch.manual_seed(0)
    return ProposalSelector(**SMALL).eval()


def _ref_attention(attn: MaskedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h = attn.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (h, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(attn.q_proj(q)), split(attn.k_proj(k)), split(attn.v_proj(v)))
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def _reference(
    sel: ProposalSelector, masks: torch.Tensor, query: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md's order written out with PyTorch's attention: (similarity, iop), (B, K)."""
    m, t = masks, query[:, None]
    for layer in sel.layers:
        assert isinstance(layer, FusionBlock)
        m = layer.norm1(m + _ref_attention(layer.self_attn, m, m, m))
        m = layer.norm2(m + _ref_attention(layer.cross_attn_mask_to_query, m, t, t))
        m = layer.norm3(m + layer.mlp.lin2(torch.relu(layer.mlp.lin1(m))))
        t = layer.norm4(t + _ref_attention(layer.cross_attn_query_to_mask, t, m, m))
    m = sel.norm_final(m + _ref_attention(sel.final_attn, m, t, t))
    similarity = F.cosine_similarity(sel.iou_head(m), query[:, None], dim=-1)  # pre-fusion query
    iop = torch.sigmoid(sel.iop_head(m)[..., 0])
    return similarity, iop


def test_forward_matches_reference(selector: ProposalSelector) -> None:
    masks, query = torch.randn(3, 6, 32), torch.randn(3, 32)
    with torch.no_grad():
        out = selector(masks, query)
        sim, iop = _reference(selector, masks, query)
    assert out.similarity.shape == out.iop.shape == out.iop_logits.shape == (3, 6)
    assert out.similarity.dtype == torch.float32
    torch.testing.assert_close(out.similarity, sim, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iop, iop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iop, torch.sigmoid(out.iop_logits))
    assert out.similarity.abs().max() <= 1.0 + 1e-6
    assert ((out.iop >= 0) & (out.iop <= 1)).all()


def test_default_architecture() -> None:
    sel = ProposalSelector()
    assert len(sel.layers) == 2
    block = sel.layers[0]
    assert isinstance(block, FusionBlock)
    assert block.mlp.lin1.weight.shape == (2048, 256)
    assert block.self_attn.num_heads == 8
    assert block.self_attn.q_proj.weight.shape == (256, 256)
    assert [tuple(p.shape) for p in sel.iou_head.parameters()] == [(2048, 256), (2048,), (256, 2048), (256,)]
    assert [tuple(p.shape) for p in sel.iop_head.parameters()] == [(128, 256), (128,), (1, 128), (1,)]
    prefixes = {
        ".".join(k.split(".")[:3]) if k.startswith("layers") else k.rsplit(".", 1)[0]
        for k in sel.state_dict()
    }
    expected_layer = {
        "self_attn", "norm1", "cross_attn_mask_to_query", "norm2", "mlp", "norm3", "cross_attn_query_to_mask", "norm4"
    }  # fmt: skip
    assert {p for p in prefixes if p.startswith("layers.0.")} == {f"layers.0.{n}" for n in expected_layer}
    assert {p for p in prefixes if not p.startswith("layers.")} == {
        "final_attn.q_proj", "final_attn.k_proj", "final_attn.v_proj", "final_attn.out_proj",
        "norm_final", "iou_head.0", "iou_head.2", "iop_head.0", "iop_head.2",
    }  # fmt: skip
    out = sel(torch.randn(1, 5, 256), torch.randn(1, 256))
    assert out.similarity.shape == (1, 5)


def test_padding_does_not_influence_real_entries(selector: ProposalSelector) -> None:
    real_a, real_b = torch.randn(3, 32), torch.randn(5, 32)
    qa, qb = torch.randn(32), torch.randn(32)
    batch = torch.full((2, 5, 32), float("nan"))  # garbage (even NaN) in padded slots
    batch[0, :3], batch[1] = real_a, real_b
    batch[0, 3] = 1e4
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    with torch.no_grad():
        out = selector(batch, torch.stack([qa, qb]), padding)
        alone_a = selector(real_a[None], qa[None])
        alone_b = selector(real_b[None], qb[None])
    torch.testing.assert_close(out.similarity[0, :3], alone_a.similarity[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iop[0, :3], alone_a.iop[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.similarity[1], alone_b.similarity[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.similarity).all() and torch.isfinite(out.iop_logits).all()
    assert (out.similarity[0, 3:] == 0).all() and (out.iop[0, 3:] == 0).all()


def test_row_without_real_proposals_is_harmless(selector: ProposalSelector) -> None:
    masks, query = torch.randn(2, 4, 32), torch.randn(2, 32)
    padding = torch.tensor([[True] * 4, [False, False, True, False]])
    out = selector(masks, query, padding)
    assert torch.isfinite(out.similarity).all()
    (out.similarity.sum() + out.iop.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in selector.parameters() if p.grad is not None)


def test_permuting_proposals_permutes_scores(selector: ProposalSelector) -> None:
    masks, query = torch.randn(1, 6, 32), torch.randn(1, 32)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        out, out_p = selector(masks, query), selector(masks[:, perm], query)
    torch.testing.assert_close(out_p.similarity, out.similarity[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.iop, out.iop[:, perm], atol=1e-5, rtol=1e-5)


def test_score_unbatched_k1_and_k0(selector: ProposalSelector) -> None:
    one, query = torch.randn(1, 32), torch.randn(32)
    sim, iop = selector.score(one, query)
    assert sim.shape == iop.shape == (1,)
    ref_sim, ref_iop = _reference(selector, one[None], query[None])
    torch.testing.assert_close(sim, ref_sim[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iop, ref_iop[0], atol=1e-5, rtol=1e-5)
    sim0, iop0 = selector.score(torch.zeros(0, 32), query)
    assert sim0.shape == iop0.shape == (0,)


def test_selector_and_projection_train(selector: ProposalSelector) -> None:
    proj = TextProjection(hidden_size=24, out_dim=32)
    selector.train()
    hidden = torch.randn(2, 24)
    out = selector(torch.randn(2, 4, 32), proj(hidden))
    (out.similarity.sum() + out.iop_logits.sum()).backward()
    # Attending to the single query token has softmax weight 1 whatever q·k is, so the
    # q/k projections of the mask→query attentions get no gradient (as in the released model).
    dead = (
        "cross_attn_mask_to_query.q_proj",
        "cross_attn_mask_to_query.k_proj",
        "final_attn.q_proj",
        "final_attn.k_proj",
    )
    for module in (selector, proj):
        for name, p in module.named_parameters():
            assert p.requires_grad, name
            assert p.grad is not None, name
            assert (p.grad.abs().sum() == 0) == any(d in name for d in dead), name


def test_input_validation(selector: ProposalSelector) -> None:
    with pytest.raises(ValueError, match="mask_embeddings"):
        selector(torch.randn(2, 32), torch.randn(2, 32))
    with pytest.raises(ValueError, match="query"):
        selector(torch.randn(2, 3, 32), torch.randn(3, 32))
    with pytest.raises(ValueError, match="padding_mask"):
        selector(torch.randn(2, 3, 32), torch.randn(2, 32), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must divide"):
        ProposalSelector(dim=30, num_heads=4)


def test_text_projection_layout_and_values() -> None:
    proj = TextProjection(hidden_size=6, out_dim=4)
    assert [k for k in proj.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert isinstance(proj[1], torch.nn.ReLU) and isinstance(proj[3], torch.nn.Dropout) and proj[3].p == 0.0
    x = torch.randn(2, 3, 6)
    first, second = proj[0], proj[2]
    assert isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.Linear)
    expected = F.linear(torch.relu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)
    torch.testing.assert_close(proj.train()(x), expected)
    with pytest.raises(ValueError, match="hidden_size"):
        TextProjection(0)


# -- selection strategies -----------------------------------------------------------------
SIM = np.array([0.1, 0.9, 0.9, 0.3, -0.2, 0.5, 0.4])
IOP = np.array([0.6, 0.2, 0.5, 0.7, 0.9, 0.51, 0.1])


@pytest.mark.parametrize(
    ("strategy", "kwargs", "expected"),
    [
        ("top1_iou", {}, [1]),  # tie 1/2 → lower index
        ("iop_threshold", {}, [0, 3, 4, 5]),  # 0.5 itself does not pass (strict)
        ("top1_iou_iop_threshold", {}, [0, 1, 3, 4, 5]),
        ("topk_iou_iop_threshold", {"top_k": 3}, [5]),  # top-3 by similarity: 1, 2, 5
        ("topk_iou_iop_threshold", {}, [3, 5]),  # top-5: 1, 2, 5, 6, 3
        ("iop_threshold", {"iop_threshold": 0.65}, [3, 4]),
        ("topk_iou_iop_threshold", {"top_k": 100}, [0, 3, 4, 5]),
    ],
)
def test_select_strategies(strategy: str, kwargs: dict[str, Any], expected: list[int]) -> None:
    assert select(SIM, IOP, strategy, **kwargs) == expected


def test_select_empty_answers_and_ties() -> None:
    low = np.array([0.1, 0.5, 0.2])
    sim = np.array([0.2, 0.7, 0.7])
    assert select(sim, low, "iop_threshold") == []
    assert select(sim, low, "topk_iou_iop_threshold") == []
    assert select(sim, low, "top1_iou_iop_threshold") == [1]
    tied = np.array([0.5, 0.5, 0.5, 0.5])
    assert select(tied, np.full(4, 0.9), "topk_iou_iop_threshold", top_k=2) == [0, 1]
    assert select(tied, np.full(4, 0.9), "top1_iou") == [0]
    for strategy in SELECTION_STRATEGIES:
        assert select(np.zeros(0), np.zeros(0), strategy) == []
        assert select(np.array([0.3]), np.array([0.9]), strategy) == [0]


def test_select_validation() -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        select(SIM, IOP, "best")
    with pytest.raises(ValueError, match=r"\(K,\)"):
        select(SIM, IOP[:3], "top1_iou")
    with pytest.raises(ValueError, match="finite"):
        select(np.array([np.nan]), np.array([0.5]), "top1_iou")
    with pytest.raises(ValueError, match="iop_threshold"):
        select(SIM, IOP, "iop_threshold", iop_threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        select(SIM, IOP, "topk_iou_iop_threshold", top_k=0)


def test_union_mask() -> None:
    masks = np.zeros((3, 4, 5), dtype=bool)
    masks[0, 0, 0] = masks[1, 1, :] = masks[2, :, 4] = True
    np.testing.assert_array_equal(union_mask(masks, [0, 2]), masks[0] | masks[2])
    np.testing.assert_array_equal(union_mask(masks, [1]), masks[1])
    empty = union_mask(masks, [])
    assert empty.shape == (4, 5) and empty.dtype == bool and not empty.any()
    assert union_mask(np.zeros((0, 4, 5), dtype=bool), []).shape == (4, 5)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        union_mask(masks, [3])
    with pytest.raises(TypeError, match="integers"):
        union_mask(masks, [0.5])  # type: ignore[list-item]
