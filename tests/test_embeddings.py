"""DINOv2 mask embeddings on a tiny random DINOv2 saved and loaded through the real path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llmseg_ros.models.embeddings import PIXEL_MEAN, PIXEL_STD, MaskEmbedder
from llmseg_ros.tiny.vision import TINY_DINOV2_HIDDEN, save_tiny_dinov2

INPUT = 112  # tiny model pre-trained at 56 → position embeddings interpolated 4×4 → 8×8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", seed=0)


@pytest.fixture(scope="module")
def embedder(tiny_dir: Path) -> MaskEmbedder:
    torch.manual_seed(0)
    return MaskEmbedder.load(
        str(tiny_dir), device="cpu", dtype=torch.float32, input_size=INPUT, out_dim=8, map_size=32
    )


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40), (7, 200)])
def test_preprocess_matches_manual_resize_normalise_pad(
    embedder: MaskEmbedder, shape: tuple[int, int]
) -> None:
    img = _image(*shape)
    nh, nw = _preprocess_shape(*shape, INPUT)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = np.zeros((3, INPUT, INPUT), dtype=np.float32)  # pad value after normalisation
    expected[:, :nh, :nw] = ((resized - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)).transpose(2, 0, 1)
    got = embedder.preprocess(img).numpy()
    assert got.shape == (3, INPUT, INPUT)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not got[:, nh:, :].any() and not got[:, :, nw:].any()  # padding only bottom and right
    assert np.abs(got[:, :nh, :nw]).sum() > 0


def test_backbone_features_shape_and_equality_with_direct_call(embedder: MaskEmbedder) -> None:
    img = _image(30, 50)
    feats = embedder.backbone_features(img)
    assert feats.shape == (TINY_DINOV2_HIDDEN, 8, 8)
    assert not feats.requires_grad
    with torch.no_grad():
        out = embedder.backbone(pixel_values=embedder.preprocess(img)[None]).last_hidden_state
    assert out.shape == (1, 1 + 64, TINY_DINOV2_HIDDEN)  # CLS + interpolated 8×8 grid
    expected = out[0, 1:].reshape(8, 8, TINY_DINOV2_HIDDEN).permute(2, 0, 1)
    torch.testing.assert_close(feats, expected)


def test_backbone_features_at_pretraining_size(tiny_dir: Path) -> None:
    emb = MaskEmbedder.load(str(tiny_dir), input_size=56, out_dim=4, map_size=16)
    assert emb.backbone_features(_image(20, 10)).shape == (TINY_DINOV2_HIDDEN, 4, 4)
    assert emb.project(emb.backbone_features(_image(20, 10))).shape == (4, 16, 16)


def test_project_is_conv_then_bilinear(embedder: MaskEmbedder) -> None:
    feats = embedder.backbone_features(_image(30, 50))
    with torch.no_grad():
        got = embedder.project(feats)
        w, bias = embedder.proj.weight[:, :, 0, 0], embedder.proj.bias
        assert bias is not None
        conv = torch.einsum("oc,chw->ohw", w, feats) + bias[:, None, None]
        expected = F.interpolate(conv[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert got.dtype == torch.float32 and got.shape == (8, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _reference_pool(feature_map: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    """One mask at a time: pad bottom-right to a square, soft bilinear resize, weighted mean."""
    s = feature_map.shape[-1]
    out = []
    for m in masks:
        h, w = m.shape
        side = max(h, w)
        square = np.zeros((side, side), dtype=np.float32)
        square[:h, :w] = m
        weight = F.interpolate(
            torch.from_numpy(square)[None, None],
            size=(s, s),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0, 0]
        out.append((feature_map * weight).sum(dim=(1, 2)) / (weight.sum() + 1e-8))
    return torch.stack(out)


def _random_masks(k: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((k, h, w), dtype=bool)
    for i in range(k):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        masks[i, y0:y1, x0:x1] = True
    masks[-1] = rng.random((h, w)) > 0.5  # a scattered mask too
    return masks


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (32, 32), (100, 37), (9, 64)])
def test_pool_matches_per_mask_reference(embedder: MaskEmbedder, shape: tuple[int, int]) -> None:
    feature_map = torch.randn(8, 32, 32, generator=torch.Generator().manual_seed(1))
    masks = _random_masks(5, *shape, seed=shape[0])
    got = embedder.pool(feature_map, masks)
    assert got.shape == (5, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference_pool(feature_map, masks), atol=1e-5, rtol=1e-5)
    # torch bool masks give the same answer
    torch.testing.assert_close(embedder.pool(feature_map, torch.from_numpy(masks)), got)


def test_pool_chunks_many_masks(embedder: MaskEmbedder) -> None:
    feature_map = torch.randn(8, 32, 32, generator=torch.Generator().manual_seed(2))
    masks = _random_masks(40, 24, 40, seed=3)  # more than one chunk
    torch.testing.assert_close(
        embedder.pool(feature_map, masks), _reference_pool(feature_map, masks), atol=1e-5, rtol=1e-5
    )


def test_pool_identity_resize_is_plain_masked_mean(embedder: MaskEmbedder) -> None:
    feature_map = torch.randn(8, 32, 32, generator=torch.Generator().manual_seed(4))
    masks = _random_masks(3, 32, 32, seed=5)
    expected = np.stack([feature_map.numpy()[:, m].mean(axis=1) for m in masks])
    np.testing.assert_allclose(embedder.pool(feature_map, masks).numpy(), expected, atol=1e-5)


def test_pool_padding_is_bottom_right(embedder: MaskEmbedder) -> None:
    # A 16×32 image: on the 32×32 map its content covers rows 0..15 only.
    feature_map = torch.zeros(8, 32, 32)
    feature_map[:, :16, :] = 1.0
    feature_map[:, 16:, :] = -100.0
    full = np.ones((1, 16, 32), dtype=bool)
    np.testing.assert_allclose(embedder.pool(feature_map, full).numpy(), 1.0, atol=1e-5)


def test_pool_empty_and_zero_masks(embedder: MaskEmbedder) -> None:
    feature_map = torch.randn(8, 32, 32)
    assert embedder.pool(feature_map, np.zeros((0, 10, 20), dtype=bool)).shape == (0, 8)
    np.testing.assert_array_equal(embedder.pool(feature_map, np.zeros((2, 10, 20), dtype=bool)).numpy(), 0.0)


def test_forward_and_trainability(embedder: MaskEmbedder) -> None:
    img = _image(30, 50, seed=7)
    masks = _random_masks(4, 30, 50, seed=8)
    emb = embedder(img, masks)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    expected = embedder.pool(embedder.project(embedder.backbone_features(img)), masks)
    torch.testing.assert_close(emb, expected)
    assert all(not p.requires_grad for p in embedder.backbone.parameters())
    assert all(p.requires_grad for p in embedder.proj.parameters())
    embedder.proj.zero_grad()
    emb.sum().backward()
    assert embedder.proj.weight.grad is not None and embedder.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in embedder.backbone.parameters())
    embedder.train()
    assert embedder.proj.training and not embedder.backbone.training
    embedder.eval()


def test_trainable_state_dict_round_trip(tiny_dir: Path, embedder: MaskEmbedder) -> None:
    state = embedder.trainable_state_dict()
    assert set(state) == {"proj.weight", "proj.bias"}
    assert state["proj.weight"].shape == (8, TINY_DINOV2_HIDDEN, 1, 1)
    other = MaskEmbedder.load(str(tiny_dir), input_size=INPUT, out_dim=8, map_size=32)
    img, masks = _image(30, 50, seed=9), _random_masks(3, 30, 50, seed=9)
    with torch.no_grad():
        assert not torch.allclose(other(img, masks), embedder(img, masks))
        other.load_trainable_state_dict(state)
        torch.testing.assert_close(other(img, masks), embedder(img, masks))
    with pytest.raises(ValueError, match=r"proj\.weight"):
        other.load_trainable_state_dict({"proj.weight": state["proj.weight"]})


def test_bfloat16_backbone_keeps_float32_outputs(tiny_dir: Path) -> None:
    emb = MaskEmbedder.load(str(tiny_dir), dtype=torch.bfloat16, input_size=INPUT, out_dim=8, map_size=32)
    feats = emb.backbone_features(_image(30, 50))
    assert feats.dtype == torch.bfloat16
    assert emb.proj.weight.dtype == torch.float32
    assert emb(_image(30, 50), _random_masks(2, 30, 50, seed=1)).dtype == torch.float32


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such_dir"
    with pytest.raises(FileNotFoundError, match=r"such_dir.*hf download"):
        MaskEmbedder.load(str(missing))
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(TypeError, match="'vit'"):
        MaskEmbedder.load(str(tmp_path / "vit"))


def test_input_validation(tiny_dir: Path, embedder: MaskEmbedder) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        MaskEmbedder.load(str(tiny_dir), input_size=100)
    with pytest.raises(ValueError, match="uint8"):
        embedder.preprocess(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        embedder.preprocess(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        embedder.pool(torch.zeros(8, 32, 32), np.zeros((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="feature_map"):
        embedder.pool(torch.zeros(8, 16, 16), np.zeros((1, 10, 10), dtype=bool))
    with pytest.raises(ValueError, match="features"):
        embedder.project(torch.zeros(3, 8, 8))


def test_tiny_dinov2_is_deterministic(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = save_tiny_dinov2(tmp_path / "a", seed=3)
    b = save_tiny_dinov2(tmp_path / "b", seed=3)
    c = save_tiny_dinov2(tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "model.safetensors"]


# -- position embeddings: torch.hub DINOv2 vs transformers ---------------------------------
def _hub_interpolation(table: torch.Tensor, grid: int) -> torch.Tensor:
    """facebookresearch/dinov2 interpolate_pos_encoding: float, bicubic, scale (grid + 0.1) / M."""
    m = int((table.shape[1] - 1) ** 0.5)
    patch = table[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    return torch.cat([table[:, :1].float(), patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def test_hub_position_embeddings_give_the_authors_features(tiny_dir: Path) -> None:
    """The authors' torch.hub DINOv2 resamples the position grid with a 0.1 offset; transformers
    resamples to the exact size. With ``pos_interpolation="hub"`` we compute the former."""
    from transformers import Dinov2Model

    image = _image(40, 70, seed=5)
    hub = MaskEmbedder.load(str(tiny_dir), input_size=INPUT, pos_interpolation="hub")
    ours_hf = MaskEmbedder.load(str(tiny_dir), input_size=INPUT, pos_interpolation="transformers")
    grid = INPUT // 14
    reference = Dinov2Model.from_pretrained(str(tiny_dir)).eval()
    original = reference.embeddings.position_embeddings.detach().clone()
    with torch.no_grad():
        pixels = hub.preprocess(image)[None]
        plain = reference(pixel_values=pixels).last_hidden_state[0, 1:]  # transformers' own resampling
        reference.embeddings.interpolate_pos_encoding = lambda emb, h, w: _hub_interpolation(original, grid)
        authors = reference(pixel_values=pixels).last_hidden_state[0, 1:]
    as_map = lambda tokens: tokens.T.reshape(-1, grid, grid)  # noqa: E731
    torch.testing.assert_close(hub.backbone_features(image), as_map(authors), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_hf.backbone_features(image), as_map(plain), rtol=1e-5, atol=1e-5)
    difference = (authors - plain).norm() / plain.norm()
    assert difference > 1e-3  # the two resamplings are not the same function
    with pytest.raises(ValueError, match="pos_interpolation must be one of"):
        MaskEmbedder.load(str(tiny_dir), input_size=INPUT, pos_interpolation="nearest")
