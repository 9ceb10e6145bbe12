"""Reading ``torch.save`` files without running code from them.

Model checkpoints come as ``torch.save`` pickles: SAM's ``.pth``, DeepSpeed's
``mp_rank_00_model_states.pt``, Hugging Face ``pytorch_model*.bin`` shards. A pickle can
call any importable function while it is read, so :func:`read_torch_file` unpickles with
an allow-list: tensors (and ``nn.Parameter``), ``OrderedDict``, ``torch.Size``, dtypes and
plain Python values. DeepSpeed also pickles its own bookkeeping objects next to the
weights (``ds_config`` is a ``DeepSpeedConfig``); classes of the ``deepspeed`` package are
read as inert placeholders that keep no state and run nothing, so such files load without
DeepSpeed installed. Any other global is refused with a ``ValueError`` naming it, as is a
truncated, empty or garbage file.

Tensors are memory-mapped (``mmap=True``) when the file is in torch's zip format (every
``torch.save`` since PyTorch 1.6), so reading a 15 GB checkpoint costs little memory until
a tensor is touched.
"""

from __future__ import annotations

import pickle
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

# (module, name) pairs a weights pickle may reference.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        *(
            (builtins, name)
            for builtins in ("builtins", "__builtin__")
            for name in ("set", "frozenset", "slice")
        ),
        ("torch", "Size"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
    }
)
# Packages whose classes are bookkeeping next to the weights: read as inert placeholders.
_INERT_PACKAGES = ("deepspeed",)


class InertObject:
    """Stands in for a DeepSpeed bookkeeping object: accepts anything, keeps and runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle referenced a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _INERT_PACKAGES or (module, name) == ("argparse", "Namespace"):
            return InertObject
        raise RefusedGlobalError(module, name)


# torch.load takes a "pickle module"; this one only knows the restricted unpickler.
_RESTRICTED_PICKLE = types.ModuleType("llmseg_ros_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = pickle.load  # type: ignore[attr-defined]  # (legacy format only; never used)
_RESTRICTED_PICKLE.__name__ = "pickle"


def read_torch_file(path: str | Path, *, mmap: bool = True) -> Any:
    """Unpickle a ``torch.save`` file with the allow-list (see the module docstring).

    Args:
        path: the file.
        mmap: memory-map the tensors (zip format only; older files are read whole).

    Returns:
        The saved object (state dict, DeepSpeed state ...); tensors on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable ``torch.save`` file (empty, truncated,
            garbage), or its pickle references code outside the allow-list (the message
            names the global; such a file is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; expected a torch.save checkpoint")
    is_zip = zipfile.is_zipfile(path)
    try:
        if is_zip:
            return torch.load(
                path,
                map_location="cpu",
                mmap=mmap,
                weights_only=False,  # the restricted unpickler below is the guard
                pickle_module=_RESTRICTED_PICKLE,
            )
        with warnings.catch_warnings():  # pre-1.6 format (or no torch file): torch's own guard
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except RefusedGlobalError as exc:
        raise ValueError(
            f"{path}: refused: its pickle calls {exc.qualified}, which is not part of a weights file "
            "(tensors, dicts, plain values); the file is not a model checkpoint, or it was made to run "
            "code: do not open it with torch.load(weights_only=False)"
        ) from None
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        first = next((line for line in lines if "Unsupported" in line), lines[0])
        raise ValueError(
            f"{path}: refused: not a plain weights pickle ({first.strip()}); a model checkpoint holds only "
            "tensors and containers"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); the file is "
            "truncated, damaged or of another format"
        ) from None


def read_state_dict(path: str | Path, *, unwrap: str | None = None) -> dict[str, torch.Tensor]:
    """A tensor dictionary from a ``torch.save`` file.

    Args:
        unwrap: when the file holds a dict whose ``unwrap`` entry is a dict (SAM files saved
            as ``{"model": state_dict}``), that entry.

    Raises:
        ValueError: unreadable file (see :func:`read_torch_file`) or not a mapping of names
            to tensors.
    """
    data = read_torch_file(path)
    if unwrap is not None and isinstance(data, dict) and isinstance(data.get(unwrap), dict):
        data = data[unwrap]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a state dict (names → tensors), got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: expected names → tensors; entries {bad[:5]!r} are not")
    return data
