"""LISA: the mask head prompts SAM with the <SEG> embedding; its training step learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmseg_ros.models.heads import LisaMaskHead
from llmseg_ros.models.losses import lisa_mask_loss
from llmseg_ros.models.sam_prompting import decode_masks, encode_image


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    from llmseg_ros.models.sam import build_sam
    from llmseg_ros.tiny.sam import save_tiny_sam

    path = save_tiny_sam(tmp_path_factory.mktemp("sam") / "sam.pth", seed=0)
    return build_sam("tiny", path, torch.device("cpu"))


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def test_head_holds_only_the_trainable_parts(sam) -> None:
    head = LisaMaskHead(sam, hidden_size=16)
    names = {n.split(".")[0] for n, _ in head.named_parameters()}
    assert names == {"projection", "mask_decoder"}
    assert set(head.trainable_state_dicts()) == {"projection", "mask_decoder"}
    # the decoder is a copy: training it leaves the shared SAM untouched
    assert head.mask_decoder is not sam.mask_decoder


def test_text_embedding_is_the_sparse_prompt(sam) -> None:
    """The head's output equals SAM's decoder prompted by the projected embedding alone."""
    torch.manual_seed(0)
    head = LisaMaskHead(sam, hidden_size=16).eval()
    image = _image()
    encoding = encode_image(sam, image)
    hidden = torch.randn(2, 16)
    with torch.no_grad():
        logits, iou = head(encoding, hidden)
        text = head.projection(hidden).unsqueeze(1)
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        low, iou_ref = sam.mask_decoder(
            image_embeddings=encoding.embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=torch.cat([sparse.expand(2, -1, -1), text], dim=1),
            dense_prompt_embeddings=dense.expand(2, -1, -1, -1),
            multimask_output=False,
        )
        ref = sam.postprocess_masks(low, encoding.input_size, encoding.original_size)[:, 0]
        via_helper, _ = decode_masks(sam, encoding, extra_sparse=text)
    assert logits.shape == (2, 48, 64) and iou.shape == (2,)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(iou, iou_ref[:, 0])
    torch.testing.assert_close(via_helper[:, 0], ref)


def test_loss_values_and_ignore_pixels() -> None:
    logits = torch.tensor([[[10.0, -10.0], [10.0, 3.0]]])
    gt = torch.tensor([[[1, 0], [1, 255]]], dtype=torch.uint8)
    out = lisa_mask_loss(logits, gt, ignore_pixels="exclude")
    # the ignored pixel adds nothing: near-perfect prediction elsewhere
    assert out["dice"].item() < 1e-3
    assert out["bce"].item() < 1e-3
    # LISA's released code: the 255 pixel is background, and its logit of 3 is a mistake
    released = lisa_mask_loss(logits, gt, ignore_pixels="background")
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, (gt == 1).float())
    assert released["bce"].item() == pytest.approx(expected_bce.item(), rel=1e-6)
    assert released["bce"].item() > 0.7
    wrong = lisa_mask_loss(-logits, gt)
    assert wrong["total"].item() == pytest.approx(2.0 * wrong["bce"].item() + 0.5 * wrong["dice"].item())
    with pytest.raises(ValueError, match="gt_masks must have the shape of logits"):
        lisa_mask_loss(logits, gt[0])


@pytest.mark.slow
def test_training_step_reduces_the_loss(sam) -> None:
    """A few AdamW steps on a small synthetic batch: frozen SAM encoder, trainable head."""
    torch.manual_seed(0)
    head = LisaMaskHead(sam, hidden_size=16)
    images = [_image(s) for s in range(3)]
    encodings = [encode_image(sam, im) for im in images]
    hidden = torch.randn(3, 16)  # stands for the <SEG> hidden states
    gts = []
    for i in range(3):
        gt = np.zeros((48, 64), np.uint8)
        gt[8 + 4 * i : 30 + 4 * i, 10 : 40 + 5 * i] = 1
        gts.append(torch.from_numpy(gt)[None])
    encoder_before = {k: v.clone() for k, v in sam.image_encoder.state_dict().items()}
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)

    def batch_loss() -> torch.Tensor:
        total = torch.zeros(())
        for enc, h, gt in zip(encodings, hidden, gts):
            logits, _ = head(enc, h[None])
            total = total + lisa_mask_loss(logits, gt)["total"]
        return total / 3

    with torch.no_grad():
        start = batch_loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss = batch_loss()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = batch_loss().item()
    assert end < 0.5 * start
    for k, v in sam.image_encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k])
