"""A tiny random SAM (``build_sam("tiny", ...)``) for tests and the tiny profile.

The weights are PyTorch's default initialisation with a fixed seed, then rescaled by
``liven_sam`` so that everything mode behaves like a trained SAM in shape (not in
meaning): the absolute position embedding is random instead of zero; the upscaling
transposed convolutions use the same weights at their 2 x 2 kernel positions (masks
follow image regions instead of a random checkerboard); the mask logits are scaled up so
masks have sharp edges (stability scores spread over [0, 1] instead of sitting near 0);
and the IoU head predicts values around 0.85, so the reference filters (predicted IoU
0.88, stability 0.95) keep some masks and drop others.
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from llmseg_ros.models.sam import TINY_SAM_DEFAULT_IMAGE_SIZE, build_tiny_sam_architecture
from llmseg_ros.utils.atomic import atomic_write_stream

# Scale of the hypernetwork output layers (mask logits) and of the IoU head.
TINY_MASK_LOGIT_GAIN = 2000.0
TINY_IOU_CENTER = 0.85
TINY_IOU_GAIN = 3.0


@torch.no_grad()
def liven_sam(sam: Sam, seed: int = 0) -> Sam:
    """Rescale a randomly initialised SAM so that its everything-mode output looks like a
    trained one's (region-like masks with sharp edges, predicted IoUs around the
    thresholds); see the module docstring.

    Works on any size (the benchmark uses it on random ``vit_b`` weights). Changes the
    model in place and returns it.

    Args:
        sam: a SAM with random weights.
        seed: seed of the random position embedding.
    """
    generator = torch.Generator().manual_seed(seed)
    encoder = sam.image_encoder
    if encoder.pos_embed is not None:
        noise = torch.randn(encoder.pos_embed.shape, generator=generator) * 0.02
        encoder.pos_embed.copy_(noise.to(encoder.pos_embed))
    decoder = sam.mask_decoder
    for layer in decoder.output_upscaling:
        if isinstance(layer, torch.nn.ConvTranspose2d):
            # Same weights at the 2 x 2 kernel positions: the upscaling repeats pixels
            # instead of printing a random checkerboard into every mask.
            layer.weight.copy_(layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight) * 2.0)
    for mlp in decoder.output_hypernetworks_mlps:
        mlp.layers[-1].weight.mul_(TINY_MASK_LOGIT_GAIN)
        mlp.layers[-1].bias.mul_(TINY_MASK_LOGIT_GAIN)
    last = decoder.iou_prediction_head.layers[-1]
    last.weight.mul_(TINY_IOU_GAIN)
    last.bias.fill_(TINY_IOU_CENTER)
    return sam


def build_tiny_sam(seed: int = 0, image_size: int = TINY_SAM_DEFAULT_IMAGE_SIZE) -> Sam:
    """The tiny SAM with seeded random weights, in eval mode with gradients off.

    Args:
        seed: weights seed; the same seed always gives the same weights.
        image_size: encoder input side in pixels (multiple of 16); stored in the
            checkpoint through the shape of the position embedding.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam_architecture(image_size)
    liven_sam(sam, seed)
    sam.requires_grad_(False)
    return sam.eval()


def save_tiny_sam(path: str | Path, seed: int = 0, image_size: int = TINY_SAM_DEFAULT_IMAGE_SIZE) -> Path:
    """Write the tiny SAM's state dict to ``path`` (atomically); load it back with
    ``llmseg_ros.models.sam.build_sam("tiny", path)``.

    Returns:
        ``path``.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    state = build_tiny_sam(seed, image_size).state_dict()
    return atomic_write_stream(path, lambda handle: torch.save(state, handle))
