"""DINOv2 mask embeddings: one 256-d vector per mask proposal (LLM-Seg).

The frozen DINOv2 backbone (transformers ``Dinov2Model``) sees the image resized so its
long side is ``input_size`` (896 in LLM-Seg) and padded bottom-right to a square; its patch
tokens form a ``(hidden, g, g)`` grid with ``g = input_size // patch_size`` (64 at 896 with
patch 14). A trainable 1×1 convolution maps them to ``out_dim`` channels (256), the map is
upsampled bilinearly to ``map_size × map_size`` (256×256, float32), and each proposal is
pooled as a weighted mean ``Σ(w·F) / (Σw + 1e-8)`` with ``w`` the proposal resized softly
onto the same padded square.

Padding convention (image and masks alike): the content sits in the top-left corner of
the square and the padding is added at the bottom and on the right, so a pixel ``(y, x)``
of an ``(H, W)`` image lands at ``(y, x) · S / max(H, W)`` of an ``S × S`` map.

* Image: ``segment_anything``'s ``ResizeLongestSide(input_size).apply_image`` (PIL
  bilinear to ``get_preprocess_shape(H, W, input_size)``), normalised with ImageNet
  mean/std on the 0–255 scale, zero-padded bottom-right to ``input_size²``.
* Masks: zero-padded bottom-right to ``max(H, W)²`` at their own resolution, then resized
  to ``map_size²`` with bilinear interpolation (``antialias=True``, ``align_corners=False``)
  as soft float weights — the released LLM-Seg code's order (pad, then resize). Masks may
  come at any resolution with the image's aspect ratio (SAM runs on a downscaled copy).

Trainable weights: only :attr:`MaskEmbedder.proj`. :meth:`MaskEmbedder.trainable_state_dict`
returns exactly the keys ``proj.weight`` ``(out_dim, hidden, 1, 1)`` and ``proj.bias``
``(out_dim,)`` (``lisa_dino_conv.weight`` / ``.bias`` in the authors' checkpoints); the
backbone is always frozen and in eval mode.

Position embeddings (``pos_interpolation``): DINOv2 was pre-trained on a 37×37 grid; at 896
px the grid is 64×64. The released LLM-Seg code loads DINOv2 through ``torch.hub``
(``dinov2_vitl14``), whose ``interpolate_pos_encoding`` resamples the 37×37 embeddings in
float32 with bicubic interpolation (no antialias) given a *scale factor*
``(64 + 0.1) / 37`` — the 0.1 "interpolate offset" — so the source coordinates are
``(i + 0.5) · 37 / 64.1 − 0.5``. transformers' ``Dinov2Model`` resamples to the exact
*size* 64, ``(i + 0.5) · 37 / 64 − 0.5``: at 896 px its features differ from the hub's by
about 1.8 % (relative L2). ``"hub"`` (the default) resamples the embeddings once, the
hub's way, and stores them in the backbone for the input grid (transformers then uses them
as they are), so ``facebook/dinov2-large`` gives the authors' features; ``"transformers"``
keeps transformers' own resampling (what weights trained before this option used; their
manifest says so).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
POOL_EPS = 1e-8
_SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_MASK_CHUNK = 16  # masks resized at once in `pool` (bounds peak memory for big frames)
POS_INTERPOLATIONS = ("hub", "transformers")
HUB_INTERPOLATE_OFFSET = 0.1  # dinov2's `interpolate_offset` (vision_transformer.py)


def hub_position_embeddings(position_embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2 position embeddings resampled to a ``grid × grid`` patch grid as ``torch.hub``'s
    ``dinov2_vitl14`` does (``interpolate_pos_encoding``: float32, bicubic, no antialias,
    scale factor ``(grid + 0.1) / M``).

    Args:
        position_embeddings: (1, 1 + M², D), the class token's first.
    Returns:
        (1, 1 + grid², D) in the input's dtype; the input itself when ``grid == M``.
    """
    if position_embeddings.ndim != 3 or position_embeddings.shape[0] != 1:
        raise ValueError(
            f"position_embeddings must be (1, 1 + M*M, D), got {tuple(position_embeddings.shape)}"
        )
    n = int(position_embeddings.shape[1]) - 1
    m = math.isqrt(n)
    if m * m != n or m < 1:
        raise ValueError(f"position_embeddings must hold 1 + M*M rows, got {n + 1}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if grid == m:
        return position_embeddings
    dim = int(position_embeddings.shape[2])
    pos = position_embeddings.float()
    patch = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = float(grid + HUB_INTERPOLATE_OFFSET) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise RuntimeError(
            f"hub interpolation gave a {tuple(patch.shape[-2:])} grid, expected {(grid, grid)}"
        )
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos[:, :1], patch], dim=1).to(position_embeddings.dtype)


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a filesystem path (not a ``org/name`` hub id)."""
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or model.endswith("/")
        or "\\" in model
        or Path(model).expanduser().exists()
    )


class MaskEmbedder(nn.Module):
    """Frozen DINOv2 + trainable 1×1 projection + mask pooling.

    Args:
        backbone: a transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``); it is
            frozen (``requires_grad=False``) and kept in eval mode.
        input_size: long side of the backbone input in pixels, a multiple of the patch
            size (896 in LLM-Seg).
        out_dim: channels of the projected feature map and of each mask embedding (256).
        map_size: side of the square feature map the masks are pooled on (256).
        pos_interpolation: ``"hub"`` (torch.hub DINOv2's position-embedding resampling,
            the authors') or ``"transformers"`` (see the module docstring).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        input_size: int = 896,
        out_dim: int = 256,
        map_size: int = 256,
        pos_interpolation: str = "hub",
    ):
        super().__init__()
        if pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"pos_interpolation must be one of {list(POS_INTERPOLATIONS)}, got {pos_interpolation!r}"
            )
        config = getattr(backbone, "config", None)
        if config is None or getattr(config, "model_type", None) not in _SUPPORTED_MODEL_TYPES:
            raise TypeError(
                f"backbone must be a transformers DINOv2 model (model_type in {list(_SUPPORTED_MODEL_TYPES)}), "
                f"got {type(backbone).__name__}"
            )
        patch = int(config.patch_size)
        if input_size < patch or input_size % patch != 0:
            raise ValueError(
                f"input_size must be a positive multiple of the patch size {patch}, got {input_size}"
            )
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if map_size < 1:
            raise ValueError(f"map_size must be >= 1, got {map_size}")
        self.backbone = backbone
        self.backbone.eval()
        self.backbone.requires_grad_(False)
        self.input_size = int(input_size)
        self.patch_size = patch
        self.grid_size = self.input_size // patch
        self.hidden_size = int(config.hidden_size)
        self.out_dim = int(out_dim)
        self.map_size = int(map_size)
        self.pos_interpolation = pos_interpolation
        if pos_interpolation == "hub":
            embeddings = getattr(backbone, "embeddings", None)
            table = getattr(embeddings, "position_embeddings", None)
            if not isinstance(table, nn.Parameter):
                raise TypeError("backbone has no embeddings.position_embeddings parameter to resample")
            with torch.no_grad():
                resampled = hub_position_embeddings(table.detach(), self.grid_size)
            # The input is always input_size² (padded), so transformers uses this table as is.
            embeddings.position_embeddings = nn.Parameter(resampled, requires_grad=False)  # type: ignore[union-attr]
        # The only trainable part; float32 whatever the backbone's dtype.
        self.proj = nn.Conv2d(self.hidden_size, self.out_dim, kernel_size=1)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        input_size: int = 896,
        out_dim: int = 256,
        map_size: int = 256,
        pos_interpolation: str = "hub",
    ) -> MaskEmbedder:
        """Load DINOv2 from a local directory or a hub id and wrap it.

        Args:
            model: directory written by ``save_pretrained`` or a hub id such as
                ``facebook/dinov2-large``.
            device: where the backbone and the projection live.
            dtype: backbone dtype (the projection and everything after it stay float32).
            input_size, out_dim, map_size, pos_interpolation: see :class:`MaskEmbedder`.

        Returns:
            The embedder in eval mode; ``proj`` is freshly initialised (load trained
            weights with :meth:`load_trainable_state_dict`).

        Raises:
            FileNotFoundError: ``model`` names a local path that does not exist.
            OSError: the hub id is neither cached nor downloadable.
            TypeError: the checkpoint is not a DINOv2 model.
        """
        from transformers import AutoConfig, AutoModel

        if not isinstance(model, (str, Path)):
            raise TypeError(f"model must be a directory or a hub id string, got {type(model).__name__}")
        model = str(model)
        path = Path(model).expanduser()
        if _looks_like_path(model):
            if not path.is_dir():
                problem = "is not a directory" if path.exists() else "does not exist"
                raise FileNotFoundError(
                    f"DINOv2 model directory {model!r} {problem}; fetch it with "
                    f"`hf download facebook/dinov2-large --local-dir {model}` (or pass a hub id)"
                )
            source = str(path)
        else:
            source = model
        try:
            config = AutoConfig.from_pretrained(source)
            if config.model_type not in _SUPPORTED_MODEL_TYPES:
                raise TypeError(
                    f"{model!r} holds a {config.model_type!r} model; expected one of {list(_SUPPORTED_MODEL_TYPES)}"
                )
            backbone = AutoModel.from_pretrained(source, config=config, dtype=dtype)
        except OSError as exc:
            raise OSError(
                f"cannot load DINOv2 {model!r}: {str(exc).rstrip('.')}. Download it first with "
                f"`hf download {model} --local-dir <dir>` and pass that directory"
            ) from exc
        embedder = cls(
            backbone,
            input_size=input_size,
            out_dim=out_dim,
            map_size=map_size,
            pos_interpolation=pos_interpolation,
        )
        embedder.to(device)
        embedder.backbone.to(dtype=dtype)
        return embedder.eval()

    def train(self, mode: bool = True) -> MaskEmbedder:
        """Switch ``proj`` to training mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    # -- trainable weights -----------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"proj.weight": (out_dim, hidden, 1, 1), "proj.bias": (out_dim,)}`` (detached, float32)."""
        return {f"proj.{name}": value.detach().clone() for name, value in self.proj.state_dict().items()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the keys written by :meth:`trainable_state_dict` (exactly those, shapes checked)."""
        expected = {"proj.weight", "proj.bias"}
        if set(state_dict) != expected:
            raise ValueError(
                f"mask-embedder state dict must have keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        self.proj.load_state_dict({key[len("proj.") :]: value for key, value in state_dict.items()})

    # -- stages ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Resize, normalise and pad one image for the backbone.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (3, input_size, input_size) float32 on the embedder's device; the resized image
            fills the top-left ``get_preprocess_shape(H, W, input_size)`` corner, the rest
            is 0 (after normalisation).
        """
        from segment_anything.utils.transforms import ResizeLongestSide

        if not isinstance(image, np.ndarray):
            raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image must be non-empty, got shape {image.shape}")
        resized = ResizeLongestSide(self.input_size).apply_image(np.ascontiguousarray(image))
        x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1).float()  # (3, h, w)
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.input_size - w, 0, self.input_size - h))

    @torch.no_grad()
    def backbone_features(self, image: np.ndarray) -> torch.Tensor:
        """Frozen DINOv2 patch tokens of one image (no gradient; cache them per frame).

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            (hidden, g, g) tensor in the backbone's dtype, ``g = input_size // patch``
            ((1024, 64, 64) for ViT-L at 896); CLS and register tokens dropped, the
            final layer norm applied (DINOv2's ``x_norm_patchtokens``).
        """
        pixels = self.preprocess(image).unsqueeze(0)
        dtype = next(self.backbone.parameters()).dtype
        tokens = self.backbone(pixel_values=pixels.to(dtype)).last_hidden_state  # (1, prefix + g*g, hidden)
        g = self.grid_size
        patches = tokens[0, -g * g :]  # drop CLS (+ registers), which come first
        return patches.transpose(0, 1).reshape(self.hidden_size, g, g)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Trainable 1×1 projection and bilinear upsampling.

        Args:
            features: (hidden, g, g) from :meth:`backbone_features`, any float dtype.

        Returns:
            (out_dim, map_size, map_size) float32.
        """
        if features.ndim != 3 or features.shape[0] != self.hidden_size:
            raise ValueError(
                f"features must be ({self.hidden_size}, g, g), got shape {tuple(features.shape)}"
            )
        x = self.proj(features.to(device=self.device, dtype=torch.float32).unsqueeze(0))
        x = F.interpolate(x, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
        return x[0]

    def mask_weights(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Soft pooling weights of masks on the square feature map.

        Args:
            masks: (K, H, W) bool (or 0/1) at the image's resolution (or any resolution
                with the same aspect ratio).

        Returns:
            (K, map_size, map_size) float32 in [0, 1] on the embedder's device.
        """
        m = torch.as_tensor(masks)
        if m.ndim != 3:
            raise ValueError(f"masks must be (K, H, W), got shape {tuple(m.shape)}")
        k, h, w = m.shape
        s = self.map_size
        if k == 0:
            return torch.zeros((0, s, s), dtype=torch.float32, device=self.device)
        if h < 1 or w < 1:
            raise ValueError(f"masks must have a non-empty (H, W), got shape {tuple(m.shape)}")
        side = max(h, w)
        out = []
        for start in range(0, k, _MASK_CHUNK):
            chunk = m[start : start + _MASK_CHUNK].to(self.device).float()
            chunk = F.pad(chunk, (0, side - w, 0, side - h)).unsqueeze(1)  # (k, 1, side, side)
            chunk = F.interpolate(chunk, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out.append(chunk[:, 0])
        return torch.cat(out, dim=0)

    def pool(self, feature_map: torch.Tensor, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Weighted mean of the feature map inside each mask.

        Args:
            feature_map: (C, map_size, map_size) from :meth:`project`.
            masks: (K, H, W) bool at the image's resolution.

        Returns:
            (K, C) float32, ``Σ(w·F) / (Σw + 1e-8)`` per mask (zeros for an empty mask).
        """
        if feature_map.ndim != 3 or feature_map.shape[1:] != (self.map_size, self.map_size):
            raise ValueError(
                f"feature_map must be (C, {self.map_size}, {self.map_size}), got shape {tuple(feature_map.shape)}"
            )
        weights = self.mask_weights(masks).flatten(1)  # (K, S*S)
        feats = feature_map.to(device=weights.device, dtype=torch.float32).flatten(1)  # (C, S*S)
        return (weights @ feats.T) / (weights.sum(dim=1, keepdim=True) + POOL_EPS)

    def forward(self, image: np.ndarray, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Mask embeddings of one image: (K, out_dim) float32 (gradients flow into ``proj``)."""
        return self.pool(self.project(self.backbone_features(image)), masks)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, grid={self.grid_size}, out_dim={self.out_dim}, "
            f"map_size={self.map_size}, pos_interpolation={self.pos_interpolation!r}"
        )
