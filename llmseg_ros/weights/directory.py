"""Our trained weights: one directory, written atomically, loaded exactly — or refused.

Layout::

    WEIGHTS_DIR/
      llmseg_weights.json   manifest: format, method, base models, dimensions, LoRA settings,
                            how the weights are queried (prompt format, teacher-forced answer,
                            DINOv2 position embeddings, SAM input size, mask pooling)
      heads.safetensors     trainable heads, keys "<module>.<param>": projection.* (text_hidden_fcs),
                            selector.* (fusion + IoU/IoP heads), mask_proj.* (DINOv2 1x1 projection),
                            mask_decoder.* (LISA only)
      adapter/              the VLM's LoRA adapter in peft's format (adapter_config.json +
                            adapter_model.safetensors, with the <SEG> embedding rows), unless the
                            manifest says "adapter": false (its base VLM holds the trained rows)
      vlm/                  only when the manifest's base_vlm is "./vlm": the base VLM itself
                            (imported checkpoints, ``llmseg import-weights``)

:func:`missing_weight_files` lists what a directory lacks; :func:`load_weights` refuses an
incomplete or damaged directory with a ``WeightsNotFoundError`` / ``ValueError`` naming the
file and what was expected, never a traceback from deep inside a reader.

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

from llmseg_ros.config import PromptFormat
from llmseg_ros.utils.atomic import atomic_directory

MANIFEST_NAME = "llmseg_weights.json"
HEADS_NAME = "heads.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
BUNDLED_PREFIX = "./"  # a manifest path starting with this lies inside the weights directory
FORMAT = "llmseg_ros.weights"
FORMAT_VERSION = 1
DINOV2_POS_INTERPOLATIONS = ("hub", "transformers")
SAM_DOWNSCALES = ("round", "truncate")
MASK_POOLINGS = ("input", "sam")


class _SavesAdapter(Protocol):
    def save_adapter(self, directory: Path) -> None: ...


def _check_type(source: str, name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    # bool is an int subclass; a manifest's ``true`` is never a size
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
        raise ValueError(f"{source}: {name!r} must be {_type_name(expected)}, got bool {value!r}")
    if not isinstance(value, expected):
        raise ValueError(
            f"{source}: {name!r} must be {_type_name(expected)}, got {type(value).__name__} {value!r}"
        )


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    names = {"str": "a string", "int": "an integer", "dict": "a JSON object", "bool": "true or false"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in types)


@dataclass
class WeightsManifest:
    """What a weights directory holds, which base models it was trained on and how to query it.

    Attributes:
        method: ``llmseg`` or ``lisa``.
        base_vlm: hub id or path of the VLM the adapter was trained on; ``"./vlm"`` = the
            VLM inside the weights directory (imported checkpoints).
        hidden_size: the VLM's hidden size (input of the text projection).
        embed_dim: size of the query and mask embeddings (256).
        dinov2: hub id or path of the DINOv2 backbone (LLM-Seg); ``"./…"`` = inside.
        embed_size: DINOv2 input long side.
        sam_model_type: SAM variant the heads were trained with.
        lora: LoRA settings used in training (r, alpha, dropout, target_modules).
        extra: free-form metadata (training steps, data, seed; import source ...).
        adapter: the directory holds ``adapter/`` (the LoRA adapter and ``<SEG>`` rows);
            ``False`` only when the base VLM itself holds the trained weights.
        prompt: how instructions are worded and which answer is teacher-forced.
        dinov2_pos_interpolation: ``hub`` (torch.hub DINOv2's position-embedding
            resampling) or ``transformers`` (see ``llmseg_ros.models.embeddings``).
        sam_downscale: ``round`` (SAM's) or ``truncate`` (the authors') sizing of the
            image SAM's proposals are computed on.
        mask_pooling: ``input`` (proposals pooled at the frame's resolution) or ``sam``
            (at SAM's input resolution, the authors').

    Manifests written before the last four fields existed mean our defaults: an adapter,
    our prompt format, transformers' interpolation, rounding and pooling at the input.
    """

    method: str
    base_vlm: str
    hidden_size: int
    embed_dim: int = 256
    dinov2: str = "facebook/dinov2-large"
    embed_size: int = 896
    sam_model_type: str = "vit_h"
    lora: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    adapter: bool = True
    prompt: PromptFormat = field(default_factory=PromptFormat)
    dinov2_pos_interpolation: str = "transformers"
    sam_downscale: str = "round"
    mask_pooling: str = "input"

    def __post_init__(self) -> None:
        if self.method not in ("llmseg", "lisa"):
            raise ValueError(f"method must be 'llmseg' or 'lisa', got {self.method!r}")
        if self.hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.embed_size < 14 or self.embed_size % 14:
            raise ValueError(f"embed_size must be a positive multiple of 14, got {self.embed_size}")
        for name, value, choices in (
            ("dinov2_pos_interpolation", self.dinov2_pos_interpolation, DINOV2_POS_INTERPOLATIONS),
            ("sam_downscale", self.sam_downscale, SAM_DOWNSCALES),
            ("mask_pooling", self.mask_pooling, MASK_POOLINGS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        if not isinstance(self.prompt, PromptFormat):
            raise ValueError(f"prompt must be a PromptFormat, got {type(self.prompt).__name__}")
        for name in ("base_vlm", "dinov2"):
            _check_bundled(name, getattr(self, name))

    @property
    def seg_token(self) -> str:
        """The segmentation token of the vocabulary (``<SEG>`` ours, ``[SEG]`` the authors')."""
        return self.prompt.seg_token

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["prompt"] = self.prompt.to_dict()
        return {"format": FORMAT, "version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> WeightsManifest:
        """Parse and check a manifest's JSON value; ``ValueError`` names ``source`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: the manifest must be a JSON object, got {_json_kind(data)}")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: unsupported version {data.get('version')!r}; expected {FORMAT_VERSION}"
            )
        for name in ("method", "base_vlm", "hidden_size"):
            if name not in data:
                raise ValueError(f"{source}: required field {name!r} is missing")
        expected: dict[str, type | tuple[type, ...]] = {
            "method": str,
            "base_vlm": str,
            "hidden_size": int,
            "embed_dim": int,
            "dinov2": str,
            "embed_size": int,
            "sam_model_type": str,
            "lora": dict,
            "extra": dict,
            "adapter": bool,
            "dinov2_pos_interpolation": str,
            "sam_downscale": str,
            "mask_pooling": str,
        }
        values: dict[str, Any] = {}
        for name, kind in expected.items():
            if name in data:
                _check_type(source, name, data[name], kind)
                values[name] = data[name]
        if "prompt" in data:
            values["prompt"] = PromptFormat.from_dict(data["prompt"], source=f"{source}: 'prompt'")
        elif "seg_token" in data:  # manifests from before the prompt format: our answer template
            _check_type(source, "seg_token", data["seg_token"], str)
            seg = data["seg_token"]
            try:
                values["prompt"] = PromptFormat(answer=f"It is {seg}.", seg_token=seg)
            except ValueError as exc:
                raise ValueError(f"{source}: 'seg_token': {exc}") from None
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _check_bundled(name: str, value: str) -> None:
    if value.startswith(BUNDLED_PREFIX):
        rest = value[len(BUNDLED_PREFIX) :]
        if not rest or any(part in ("", ".", "..") for part in rest.split("/")):
            raise ValueError(
                f"{name} {value!r} must name a folder inside the weights directory, like './vlm'"
            )


def bundled_path(directory: str | Path, value: str) -> Path | None:
    """The folder a manifest path like ``"./vlm"`` names inside ``directory``; ``None`` for hub ids / outside paths."""
    if not value.startswith(BUNDLED_PREFIX):
        return None
    return Path(directory) / value[len(BUNDLED_PREFIX) :]


@dataclass
class LoadedWeights:
    """A weights directory read back: the manifest, per-module state dicts, the adapter.

    Attributes:
        directory: where the weights were read from.
        adapter_dir: ``directory/adapter`` when the manifest has an adapter, else ``None``.
    """

    manifest: WeightsManifest
    state_dicts: dict[str, dict[str, torch.Tensor]]
    adapter_dir: Path | None
    directory: Path | None = None

    def model_source(self, name: str, configured: str) -> str:
        """The model to load for ``name`` (``base_vlm`` / ``dinov2``): the copy inside the
        weights directory when the manifest bundles one, else ``configured``."""
        value = getattr(self.manifest, name)
        if self.directory is not None:
            inside = bundled_path(self.directory, value)
            if inside is not None:
                return str(inside)
        return configured


class WeightsNotFoundError(FileNotFoundError):
    """A weights directory or one of its files is missing; the message says how to get it."""


def _read_manifest_data(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _adapter_expected(directory: Path) -> bool:
    """Whether the directory's manifest asks for an adapter (yes when it cannot be read)."""
    try:
        data = _read_manifest_data(directory / MANIFEST_NAME)
    except (OSError, ValueError):
        return True
    return not (isinstance(data, dict) and data.get("adapter") is False)


def _manifest_paths(directory: Path) -> list[str]:
    try:
        data = _read_manifest_data(directory / MANIFEST_NAME)
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    return [
        v
        for k in ("base_vlm", "dinov2")
        if isinstance(v := data.get(k), str) and v.startswith(BUNDLED_PREFIX)
    ]


def missing_weight_files(directory: str | Path) -> list[Path]:
    """Files a loadable weights directory must have that are absent (empty list = complete).

    Always ``llmseg_weights.json`` and ``heads.safetensors``; ``adapter/adapter_config.json``
    and ``adapter/adapter_model.safetensors`` unless the manifest says ``"adapter": false``;
    ``<folder>/config.json`` of every model the manifest bundles (``"./vlm"``).
    """
    directory = Path(directory)
    missing = [p for p in (directory / MANIFEST_NAME, directory / HEADS_NAME) if not p.is_file()]
    if _adapter_expected(directory):
        adapter = directory / ADAPTER_DIR
        if not (adapter / ADAPTER_CONFIG_NAME).is_file():
            missing.append(adapter / ADAPTER_CONFIG_NAME)
        if not any((adapter / name).is_file() for name in ADAPTER_WEIGHTS_NAMES):
            missing.append(adapter / ADAPTER_WEIGHTS_NAMES[0])
    for value in _manifest_paths(directory):
        config = directory / value[len(BUNDLED_PREFIX) :] / "config.json"
        if not config.is_file():
            missing.append(config)
    return missing


def save_weights(
    directory: str | Path,
    manifest: WeightsManifest,
    modules: dict[str, torch.nn.Module],
    vlm: _SavesAdapter | None = None,
) -> Path:
    """Write a weights directory atomically (temporary sibling, then rename).

    Args:
        directory: destination; replaced if it exists.
        manifest: description of the weights; ``manifest.adapter`` must say whether ``vlm``
            is given.
        modules: name → module whose ``state_dict()`` is stored under ``name.*``.
        vlm: object with ``save_adapter(directory)`` (``llmseg_ros.models.vlm.SegVLM``); ``None``
            stores no adapter (then the manifest must say ``adapter=False``).

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
    if manifest.adapter != (vlm is not None):
        raise ValueError(
            f"manifest.adapter is {manifest.adapter} but "
            + ("no VLM adapter was given" if vlm is None else "a VLM adapter was given")
            + "; a weights directory either holds the adapter or says it has none"
        )
    with atomic_directory(directory) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / HEADS_NAME), metadata={"format": FORMAT})
        if vlm is not None:
            vlm.save_adapter(tmp / ADAPTER_DIR)
        write_manifest(tmp, manifest)
    return directory


def write_manifest(directory: Path, manifest: WeightsManifest) -> None:
    """Write ``llmseg_weights.json`` into ``directory`` (a folder still being assembled)."""
    with open(directory / MANIFEST_NAME, "w", encoding="utf-8") as fh:
        json.dump(manifest.to_dict(), fh, indent=2, sort_keys=True)
        fh.write("\n")


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(
        f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the weights directory is "
        "damaged (empty, truncated or overwritten): export or import it again"
    )


def read_heads(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``heads.safetensors`` as module → state dict; ``ValueError`` for a damaged file or bad keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if not flat:
        raise ValueError(f"{path}: holds no tensors; expected '<module>.<param>' keys (projection.*, ...)")
    state_dicts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        module, dot, param = key.partition(".")
        if not module or not dot or not param:
            raise ValueError(f"{path}: tensor key {key!r} is not '<module>.<param>'")
        state_dicts.setdefault(module, {})[param] = value
    return state_dicts


def check_adapter(adapter: Path) -> None:
    """Refuse a damaged adapter folder (``ValueError`` naming the file) before peft reads it."""
    config_path = adapter / ADAPTER_CONFIG_NAME
    data = _read_manifest_data(config_path)
    if not isinstance(data, dict) or not isinstance(data.get("peft_type"), str):
        raise ValueError(
            f"{config_path}: not a peft adapter config (a JSON object with 'peft_type'), got {_json_kind(data)}"
        )
    weights = next((adapter / n for n in ADAPTER_WEIGHTS_NAMES if (adapter / n).is_file()), None)
    if weights is None:
        raise WeightsNotFoundError(weights_help([adapter / ADAPTER_WEIGHTS_NAMES[0]]))
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as fh:
                keys = list(fh.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise _unreadable(weights, exc) from None
        if not keys:
            raise ValueError(f"{weights}: holds no tensors; expected the LoRA adapter's weights")
    else:
        from llmseg_ros.weights.torch_files import read_torch_file

        read_torch_file(weights)  # refuses pickled code and damaged files with a ValueError
    meta = adapter / "segvlm.json"
    if meta.is_file() and not isinstance(_read_manifest_data(meta), dict):
        raise ValueError(f"{meta}: must hold a JSON object")


def load_weights(directory: str | Path) -> LoadedWeights:
    """Read a weights directory written by :func:`save_weights` or ``llmseg import-weights``.

    Raises:
        WeightsNotFoundError: the directory or a required file is missing (the message
            lists each missing file and how to obtain the weights).
        ValueError: a file is damaged or malformed (the message names it and what was
            expected): a manifest that is not a JSON object or has wrongly typed fields,
            an empty / truncated / garbage ``heads.safetensors`` or adapter file.
    """
    directory = Path(directory)
    missing = missing_weight_files(directory)
    if missing:
        raise WeightsNotFoundError(weights_help(missing))
    manifest_path = directory / MANIFEST_NAME
    manifest = WeightsManifest.from_dict(_read_manifest_data(manifest_path), source=str(manifest_path))
    state_dicts = read_heads(directory / HEADS_NAME)
    adapter: Path | None = None
    if manifest.adapter:
        adapter = directory / ADAPTER_DIR
        check_adapter(adapter)
    return LoadedWeights(manifest, state_dicts, adapter, directory)


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``module`` exactly: the same keys and shapes, else a ``ValueError``
    naming ``where`` (e.g. ``"weights in DIR, 'selector.*'"``), the missing, unexpected and
    mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected {_short(unexpected)}")
        if shapes:
            problems.append(f"wrong shape {_short(shapes)}")
        raise ValueError(f"{where} do not fit the model: " + "; ".join(problems))
    module.load_state_dict(state)


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', …' if len(items) > limit else ''}] ({len(items)})"


def weights_help(missing: list[Path]) -> str:
    """The message for missing trained weights: each file, and how to get them."""
    lines = ["trained llmseg_ros weights not found:"]
    lines += [f"  missing: {p}" for p in missing]
    lines += [
        "Import the published LLM-Seg / LISA checkpoints with `llmseg fetch-weights --released NAME` or "
        "`llmseg import-weights` (see README, 'Getting the weights'), produce your own with "
        "`python training/train.py --config training/configs/<config>.yaml`, or point --weights at a "
        f"directory holding {MANIFEST_NAME}, {HEADS_NAME} and {ADAPTER_DIR}/ (unless its manifest says "
        '"adapter": false).',
        "To see the pipeline run without trained weights, use `--profile tiny` (tiny random models).",
    ]
    return "\n".join(lines)
