"""SAM registry: official builders, the tiny test model, checkpoints and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from llmseg_ros.models.proposals import ProposalGenerator
from llmseg_ros.models.sam import SAM_CHECKPOINT_FILES, SAM_CHECKPOINT_URLS, build_sam
from llmseg_ros.tiny.sam import build_tiny_sam, save_tiny_sam


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoint_urls_are_the_official_ones():
    assert set(SAM_CHECKPOINT_URLS) == {"vit_h", "vit_l", "vit_b"}
    assert SAM_CHECKPOINT_FILES == {
        "vit_h": "sam_vit_h_4b8939.pth",
        "vit_l": "sam_vit_l_0b3195.pth",
        "vit_b": "sam_vit_b_01ec64.pth",
    }
    for name, url in SAM_CHECKPOINT_URLS.items():
        assert url == f"https://dl.fbaipublicfiles.com/segment_anything/{SAM_CHECKPOINT_FILES[name]}"


@pytest.mark.parametrize("model_type", ["vit_h", "vit_l", "vit_b"])
def test_missing_official_checkpoint(tmp_path, model_type):
    path = tmp_path / "nowhere" / f"sam_{model_type}.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_sam(model_type, path)
    message = str(info.value)
    assert str(path) in message
    assert "llmseg fetch-weights" in message
    assert SAM_CHECKPOINT_URLS[model_type] in message


def test_missing_tiny_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sam_tiny\.pth.*save_tiny_sam"):
        build_sam("tiny", tmp_path / "sam_tiny.pth")


def test_unknown_model_type():
    with pytest.raises(ValueError, match=r"vit_h.*tiny.*'vit_x'"):
        build_sam("vit_x", None)


def test_tiny_round_trip(tmp_path):
    path = save_tiny_sam(tmp_path / "sam_tiny.pth", seed=3)
    assert path == tmp_path / "sam_tiny.pth"
    assert [p.name for p in tmp_path.iterdir()] == ["sam_tiny.pth"]  # no temporary left over
    built = build_tiny_sam(seed=3)
    loaded = build_sam("tiny", path)
    assert loaded.image_encoder.img_size == 1024
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for (name, a), (_, b) in zip(built.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    points = np.array([[10.0, 12.0], [40.0, 30.0]])
    outputs = []
    for sam in (built, loaded):
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        masks, scores, logits = predictor.predict(points[:1], np.ones(1), multimask_output=True)
        outputs.append((predictor.features, masks, scores, logits))
    for a, b in zip(*outputs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    params = {"points_per_side": 2, "pred_iou_thresh": -1e4, "stability_score_thresh": 0.0}
    a_props = ProposalGenerator(built, **params).generate(image)
    b_props = ProposalGenerator(loaded, **params).generate(image)
    assert len(a_props) > 0
    np.testing.assert_array_equal(a_props.masks, b_props.masks)
    np.testing.assert_array_equal(a_props.predicted_iou, b_props.predicted_iou)


def test_tiny_image_size_is_stored_in_the_checkpoint(tmp_path):
    path = save_tiny_sam(tmp_path / "small.pth", seed=0, image_size=256)
    sam = build_sam("tiny", path)
    assert sam.image_encoder.img_size == 256
    assert sam.prompt_encoder.image_embedding_size == (16, 16)
    x = torch.zeros(1, 3, 256, 256)
    with torch.no_grad():
        assert sam.image_encoder(x).shape == (1, 32, 16, 16)


def test_tiny_seeds():
    a, b, c = build_tiny_sam(seed=0), build_tiny_sam(seed=0), build_tiny_sam(seed=1)
    assert torch.equal(a.image_encoder.patch_embed.proj.weight, b.image_encoder.patch_embed.proj.weight)
    assert not torch.equal(a.image_encoder.patch_embed.proj.weight, c.image_encoder.patch_embed.proj.weight)
    state = torch.get_rng_state()
    build_tiny_sam(seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone


def test_bad_checkpoints(tmp_path):
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="state dict"):
        build_sam("tiny", not_a_state_dict)
    wrong = tmp_path / "wrong.pth"
    state = build_tiny_sam().state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth does not fit SAM tiny"):
        build_sam("tiny", wrong)


def test_device_and_random_weights():
    sam = build_sam("tiny", None, device="cpu")
    assert sam.device == torch.device("cpu")
    assert sam.image_encoder.img_size == 1024
    assert not sam.training


@pytest.mark.slow
def test_official_builder_loads_its_own_checkpoint(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("vit_b", None)
    assert sam.image_encoder.patch_embed.proj.out_channels == 768
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), path)
    loaded = build_sam("vit_b", path)
    assert torch.equal(loaded.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)
    with pytest.raises(ValueError, match="does not fit SAM vit_l"):
        build_sam("vit_l", path)
