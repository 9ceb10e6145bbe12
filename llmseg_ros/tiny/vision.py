"""Tiny random DINOv2 for tests and smoke runs (the real architecture, a few thousand weights).

The model is pre-trained (in name only) at ``image_size`` 56 with patch 14, i.e. a 4×4
position grid, so any other ``MaskEmbedder`` input size exercises transformers'
position-embedding interpolation exactly as DINOv2-L at 896 does (37×37 → 64×64).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_DINOV2_HIDDEN = 32
TINY_DINOV2_IMAGE_SIZE = 56
TINY_DINOV2_PATCH = 14


def save_tiny_dinov2(directory: Path, seed: int = 0) -> Path:
    """Build a random tiny ``Dinov2Model`` and ``save_pretrained`` it into ``directory``.

    Config: patch 14, hidden 32, 2 layers, 2 heads, MLP ratio 2, image size 56. Weights
    depend only on ``seed``. Files are written to a temporary folder next to
    ``directory`` and moved in one by one with ``os.replace``.

    Args:
        directory: target folder (created if missing; existing files of the same name
            are replaced).
        seed: torch seed for the random weights.

    Returns:
        ``directory``, loadable with ``MaskEmbedder.load(str(directory))``.
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(
        hidden_size=TINY_DINOV2_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=TINY_DINOV2_IMAGE_SIZE,
        patch_size=TINY_DINOV2_PATCH,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Dinov2Model(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
