"""The published checkpoints as read-only tensor sources, read lazily.

* :func:`open_deepspeed` — an LLM-Seg release: DeepSpeed ZeRO-2's
  ``ckpt_model/{latest, global_stepN/mp_rank_00_model_states.pt}``; the model is the
  ``"module"`` entry (the peft-wrapped ``LISAForCausalLM`` state dict), everything else
  in that file is DeepSpeed bookkeeping.
* :func:`open_hf` — a LISA release in Hugging Face format (``config.json``, sharded
  ``pytorch_model-*.bin`` or ``model-*.safetensors`` with their index, tokenizer files).

Tensors are memory-mapped (``torch.load(mmap=True)``, safetensors ``safe_open``), so a
7B / 13B checkpoint is read one tensor at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmseg_ros.weights.torch_files import read_torch_file

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
HF_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class TensorSource:
    """Named tensors of one checkpoint, read on demand.

    Attributes:
        description: what was opened (for reports).
        files: the files the tensors come from.
        extras: other entries of the checkpoint that are not model weights (DeepSpeed
            bookkeeping: ``global_steps``, ``ds_version`` ...), by name, with a short
            description of each.
        info: those of them that are plain numbers or strings, by value.
    """

    description: str
    files: list[Path]
    _tensors: dict[str, Any] = field(repr=False)  # name → tensor, or (safe_open handle, name)
    extras: dict[str, str] = field(default_factory=dict)
    info: dict[str, int | float | str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (memory-mapped when the file allows)."""
        value = self._tensors[key]
        if isinstance(value, torch.Tensor):
            return value
        handle, name = value
        return handle.get_tensor(name)

    def shape(self, key: str) -> tuple[int, ...]:
        value = self._tensors[key]
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        handle, name = value
        return tuple(handle.get_slice(name).get_shape())

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._tensors:
            yield key, self.get(key)


def _describe(value: Any) -> str:
    if isinstance(value, (int, float, str, bool)) or value is None:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    if isinstance(value, (list, tuple, set, dict)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def deepspeed_model_file(source: str | Path) -> tuple[Path, str | None]:
    """The ``mp_rank_00_model_states.pt`` of a DeepSpeed checkpoint and its tag.

    ``source`` may be the ``ckpt_model`` folder (its ``latest`` file names the tag), a
    ``global_stepN`` folder, or the file itself.

    Raises:
        FileNotFoundError: nothing usable at ``source`` (the message says what was looked for).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path, path.parent.name
    if not path.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint {path} does not exist")
    if (path / DEEPSPEED_MODEL_FILE).is_file():
        return path / DEEPSPEED_MODEL_FILE, path.name
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if not tag or not re.fullmatch(r"[A-Za-z0-9_.-]+", tag[0]):
            raise ValueError(
                f"{latest}: expected the name of a checkpoint folder (e.g. global_step5000), got {tag!r}"
            )
        model_file = path / tag[0] / DEEPSPEED_MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"{latest} names {tag[0]!r}, but {model_file} does not exist")
        return model_file, tag[0]
    steps = sorted(p for p in path.glob(f"*/{DEEPSPEED_MODEL_FILE}"))
    if len(steps) == 1:
        return steps[0], steps[0].parent.name
    raise FileNotFoundError(
        f"{path}: no DeepSpeed checkpoint found: expected a 'latest' file naming a folder that holds "
        f"{DEEPSPEED_MODEL_FILE} (the authors' ckpt_model layout)"
        + (f"; found several: {[str(p.parent.name) for p in steps]}" if steps else "")
    )


def open_deepspeed(source: str | Path) -> TensorSource:
    """The ``"module"`` state dict of a DeepSpeed checkpoint (see :func:`deepspeed_model_file`).

    Raises:
        FileNotFoundError: no checkpoint file.
        ValueError: unreadable file, refused pickle, or no ``module`` state dict in it.
    """
    model_file, tag = deepspeed_model_file(source)
    data = read_torch_file(model_file)
    if not isinstance(data, dict) or not isinstance(data.get("module"), dict):
        raise ValueError(
            f"{model_file}: not a DeepSpeed model-states file: expected a dict with a 'module' state dict, "
            f"got {type(data).__name__}"
            + (f" with keys {sorted(map(str, data))[:8]}" if isinstance(data, dict) else "")
        )
    module = data["module"]
    bad = [k for k, v in module.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{model_file}: 'module' entries {bad[:5]!r} are not name → tensor")
    extras = {str(k): _describe(v) for k, v in data.items() if k != "module"}
    info = {
        str(k): v for k, v in data.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
    }
    return TensorSource(
        f"DeepSpeed checkpoint {tag} ({model_file})", [model_file], dict(module), extras, info
    )


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; ``ValueError`` naming it otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def open_hf(source: str | Path) -> TensorSource:
    """The weights of a Hugging Face checkpoint folder (sharded or single file, .bin or .safetensors).

    Raises:
        FileNotFoundError: not a folder, or no weights files.
        ValueError: unreadable / refused files, or an index naming missing shards.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder {folder} does not exist")
    files: list[Path]
    index = next((folder / n for n in HF_INDEX_NAMES if (folder / n).is_file()), None)
    if index is not None:
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' object")
        names = sorted({str(v) for v in weight_map.values()})
        odd = [n for n in names if Path(n).name != n or n in (".", "..")]
        if odd:
            raise ValueError(f"{index}: shard names must be file names in the folder, got {odd[:5]}")
        files = [folder / n for n in names]
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are missing: {absent}")
    else:
        single = next((folder / n for n in HF_SINGLE_NAMES if (folder / n).is_file()), None)
        if single is None:
            raise FileNotFoundError(
                f"{folder}: no weights: expected {' or '.join(HF_INDEX_NAMES)} with its shards, or "
                f"{' or '.join(HF_SINGLE_NAMES)}"
            )
        files = [single]
    tensors: dict[str, Any] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt")
                shard = {name: (handle, name) for name in handle.keys()}  # noqa: SIM118 (a safe_open handle)
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        else:
            data = read_torch_file(path)
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
            ):
                raise ValueError(f"{path}: expected a state dict (names → tensors)")
            shard = dict(data)
        duplicates = sorted(set(shard) & set(tensors))
        if duplicates:
            raise ValueError(f"{path}: tensors {duplicates[:5]} also appear in another shard")
        tensors.update(shard)
    return TensorSource(f"Hugging Face checkpoint {folder}", files, tensors)
