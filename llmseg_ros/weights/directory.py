"""Our trained weights: one directory, written atomically, loaded exactly.

Layout::

    WEIGHTS_DIR/
      llmseg_weights.json   manifest (format, method, base models, dimensions, LoRA settings)
      heads.safetensors     trainable heads, keys "<module>.<param>": projection.* (text_hidden_fcs),
                            selector.* (fusion + IoU/IoP heads), mask_proj.* (DINOv2 1x1 projection),
                            mask_decoder.* (LISA only)
      adapter/              the VLM's LoRA adapter in peft's format (with the <SEG> embedding rows)

``save_weights`` writes into a temporary sibling directory and renames it into place, so a
crash never leaves a half-written weights directory behind.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmseg_ros.utils.atomic import atomic_directory

MANIFEST_NAME = "llmseg_weights.json"
HEADS_NAME = "heads.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "llmseg_ros.weights"
FORMAT_VERSION = 1


class _SavesAdapter(Protocol):
    def save_adapter(self, directory: Path) -> None: ...


@dataclass
class WeightsManifest:
    """What a weights directory holds and which base models it was trained on.

    Attributes:
        method: ``llmseg`` or ``lisa``.
        base_vlm: hub id or path of the VLM the adapter was trained on.
        hidden_size: the VLM's hidden size (input of the text projection).
        embed_dim: size of the query and mask embeddings (256).
        dinov2: hub id or path of the DINOv2 backbone (LLM-Seg).
        embed_size: DINOv2 input long side.
        sam_model_type: SAM variant the heads were trained with.
        seg_token: the segmentation token added to the vocabulary.
        lora: LoRA settings used in training (r, alpha, dropout, target_modules).
        extra: free-form training metadata (steps, data, seed ...).
    """

    method: str
    base_vlm: str
    hidden_size: int
    embed_dim: int = 256
    dinov2: str = "facebook/dinov2-large"
    embed_size: int = 896
    sam_model_type: str = "vit_h"
    seg_token: str = "<SEG>"
    lora: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("llmseg", "lisa"):
            raise ValueError(f"method must be 'llmseg' or 'lisa', got {self.method!r}")
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> WeightsManifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: unsupported version {data.get('version')!r}; expected {FORMAT_VERSION}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclass
class LoadedWeights:
    """A weights directory read back: the manifest, per-module state dicts, the adapter."""

    manifest: WeightsManifest
    state_dicts: dict[str, dict[str, torch.Tensor]]
    adapter_dir: Path | None


class WeightsNotFoundError(FileNotFoundError):
    """A weights directory or one of its files is missing; the message says how to get it."""


def missing_weight_files(directory: str | Path) -> list[Path]:
    """Files a loadable weights directory must have that are absent (empty list = complete)."""
    directory = Path(directory)
    return [p for p in (directory / MANIFEST_NAME, directory / HEADS_NAME) if not p.is_file()]


def save_weights(
    directory: str | Path,
    manifest: WeightsManifest,
    modules: dict[str, torch.nn.Module],
    vlm: _SavesAdapter | None = None,
) -> Path:
    """Write a weights directory atomically (temporary sibling, then rename).

    Args:
        directory: destination; replaced if it exists.
        manifest: description of the weights.
        modules: name → module whose ``state_dict()`` is stored under ``name.*``.
        vlm: object with ``save_adapter(directory)`` (``llmseg_ros.models.vlm.SegVLM``); ``None``
            stores no adapter.

    Returns:
        The destination path.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if not modules:
        raise ValueError("modules must name at least one module to save")
    for name in modules:
        if not name or "." in name:
            raise ValueError(f"module names must be non-empty and contain no '.', got {name!r}")
    with atomic_directory(directory) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / HEADS_NAME), metadata={"format": FORMAT})
        if vlm is not None:
            vlm.save_adapter(tmp / ADAPTER_DIR)
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
    return directory


def load_weights(directory: str | Path) -> LoadedWeights:
    """Read a weights directory written by :func:`save_weights`.

    Raises:
        WeightsNotFoundError: the directory or a required file is missing (the message
            lists each missing file and how to obtain the weights).
        ValueError: the manifest is malformed.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = missing_weight_files(directory)
    if missing:
        raise WeightsNotFoundError(weights_help(missing))
    manifest_path = directory / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path}: not valid JSON ({exc})") from exc
    manifest = WeightsManifest.from_dict(data, source=str(manifest_path))
    flat = load_file(str(directory / HEADS_NAME))
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        module, _, param = key.partition(".")
        state_dicts.setdefault(module, {})[param] = value
    adapter = directory / ADAPTER_DIR
    return LoadedWeights(manifest, state_dicts, adapter if adapter.is_dir() else None)


def weights_help(missing: list[Path]) -> str:
    """The message for missing trained weights: each file, and how to get them."""
    lines = ["trained llmseg_ros weights not found:"]
    lines += [f"  missing: {p}" for p in missing]
    lines += [
        "Produce them with `python training/train.py --config training/configs/<config>.yaml` "
        "(see README, 'Training and evaluation'), or point --weights at a directory holding "
        f"{MANIFEST_NAME}, {HEADS_NAME} and {ADAPTER_DIR}/.",
        "To see the pipeline run without trained weights, use `--profile tiny` (tiny random models).",
    ]
    return "\n".join(lines)
