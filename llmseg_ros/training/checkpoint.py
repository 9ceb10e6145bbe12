"""Training checkpoints: atomic, verified, resumable exactly, and never unpickling code.

Layout of one checkpoint (``OUTPUT_DIR/checkpoints/step-00000500/``)::

    state.json              TrainState, the format version, and the size and SHA-256 of
                            every other file of the checkpoint (written last)
    trainable.safetensors   {parameter name: tensor} of every trainable parameter (CPU)
    optimizer.pt            the optimizer's state_dict (not with DeepSpeed, see below)
    scheduler.pt            the learning-rate scheduler's state_dict
    rng_<rank>.pt           RNG states of python ``random``, numpy, torch CPU and CUDA, per process
    engine/                 DeepSpeed only: the engine's checkpoint (sharded optimizer states)

Safety: tensors are stored as safetensors and the run's position as JSON; what only
torch can write (optimizer, scheduler and RNG states: dicts, lists, numbers and tensors)
goes through ``torch.save`` and is read back with ``torch.load(weights_only=True)``, whose
unpickler builds only those types and refuses anything else, so a planted file cannot
run code. Before any file is opened its size and SHA-256 are checked against
``state.json``, so a truncated or replaced file is caught up front. (DeepSpeed reads its
own ``engine/`` files with its own loader: resume DeepSpeed runs only from directories
you trust.)

Atomicity: a checkpoint is written into ``step-NNNNNNNN.tmp``, every file flushed to disk,
and the folder renamed into place once complete, so a crash never leaves a checkpoint
that looks finished. :func:`find_checkpoint` returns the newest checkpoint that passes
the checks; one that does not is reported and skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmseg_ros.data.io import atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
CHECKPOINT_FORMAT = 2
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete, corrupted, foreign or old)."""


@dataclass
class TrainState:
    """Where a run stands.

    Attributes:
        step: optimizer steps done.
        micro_step: micro-batches consumed per process (= step × grad_accum at a
            checkpoint); the data position of the next micro-batch.
        world_size: processes of the run that wrote the checkpoint.
        fingerprint: ``TrainConfig.fingerprint()`` of that run.
        best_score: the best validation score so far (``val_metric``; ``None`` before the
            first validation).
        best_step: the optimizer step it was reached at (0 before the first validation).
    """

    step: int = 0
    micro_step: int = 0
    world_size: int = 1
    fingerprint: str = ""
    best_score: float | None = None
    best_step: int = 0


def rng_state() -> dict[str, Any]:
    """The global RNG states: python ``random``, numpy, torch CPU, and every CUDA device.

    Only plain lists, numbers, strings and tensors, so the state round-trips through
    ``torch.save`` / ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": [
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root`` (the run's ``checkpoints/`` folder), oldest first.

    "Finished" means renamed into place with a ``state.json``; whether its files are
    intact is checked by :func:`load_checkpoint`.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest finished checkpoint under ``root``, or ``None`` (not verified)."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest finished checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path)


def _noop() -> None:
    return None


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (best effort for folders)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """relative path → {size, sha256} of every file under ``folder`` except ``state.json``."""
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != STATE_NAME:
            table[name] = {"size": path.stat().st_size, "sha256": _digest(path)}
    return table


def save_checkpoint(
    root: str | Path,
    state: TrainState,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any],
    rank: int = 0,
    barrier: Callable[[], None] = _noop,
    engine_save: Callable[[Path], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically; every process of the run calls it.

    Args:
        root: the run's ``checkpoints/`` folder.
        state: the run's position.
        trainable: name → tensor of the trainable parameters (written by rank 0).
        optimizer_state: the optimizer's state_dict (rank 0); ``None`` when
            ``engine_save`` stores it (DeepSpeed).
        scheduler_state: the scheduler's state_dict (rank 0).
        rank: this process's rank; each writes its own RNG state.
        barrier: synchronises the processes (``accelerator.wait_for_everyone``).
        engine_save: collective save of an engine checkpoint into a folder (DeepSpeed).
        keep: prune to this many checkpoints afterwards (rank 0).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f"{checkpoint_name(state.step)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    _fsync(tmp / f"rng_{rank}.pt")
    if engine_save is not None:
        engine_save(tmp / "engine")
    barrier()
    if rank == 0:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}
        save_file(tensors, str(tmp / TRAINABLE_NAME), metadata={"format": str(CHECKPOINT_FORMAT)})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_NAME)
        torch.save(scheduler_state, tmp / SCHEDULER_NAME)
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path)
        record = {"format": CHECKPOINT_FORMAT, **asdict(state), "files": _file_table(tmp)}
        with open(tmp / STATE_NAME, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        if keep is not None:
            prune_checkpoints(root, keep)
    barrier()
    return final


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back (tensors on CPU)."""

    path: Path
    state: TrainState
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any]
    rng: dict[str, Any] | None


def _read_state(path: Path) -> tuple[TrainState, dict[str, dict[str, Any]]]:
    state_path = path / STATE_NAME
    if not state_path.is_file():
        raise CheckpointError(f"{path} is not a finished checkpoint ({STATE_NAME} missing)")
    try:
        record = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path} is not readable JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise CheckpointError(f"{state_path} must hold a JSON object, got {type(record).__name__}")
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written in checkpoint format {record.get('format', 1)!r}, not {CHECKPOINT_FORMAT} "
            "(older versions stored pickled trainable.pt files, which are never loaded); "
            "start the run in a new output_dir"
        )
    files = record.pop("files", None)
    record.pop("format")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise CheckpointError(f"{state_path} has no valid 'files' table of sizes and SHA-256 digests")
    known = {f.name for f in fields(TrainState)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise CheckpointError(f"{state_path} holds unknown field(s) {unknown}")
    try:
        state = TrainState(**record)
    except TypeError as exc:
        raise CheckpointError(f"{state_path}: {exc}") from exc
    if not (isinstance(state.step, int) and isinstance(state.micro_step, int) and state.step >= 0):
        raise CheckpointError(f"{state_path}: step and micro_step must be non-negative integers")
    return state, files


def verify_checkpoint(path: str | Path) -> TrainState:
    """Check a checkpoint's ``state.json`` and every file it lists (size, then SHA-256).

    Opens no file other than ``state.json`` for parsing.

    Raises:
        CheckpointError: naming the first problem found.
    """
    path = Path(path)
    state, files = _read_state(path)
    for required in (TRAINABLE_NAME, SCHEDULER_NAME):
        if required not in files:
            raise CheckpointError(f"{path} lists no {required}")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {STATE_NAME}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"{path} holds files its {STATE_NAME} does not list: {extra[:5]}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path}: {name} has {size} bytes, {expected['size']} were written (truncated?)"
            )
        if _digest(file) != expected["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match the SHA-256 recorded when it was written")
    return state


def _torch_file(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (no code runs on load)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} could not be read as tensors and plain data (refused by torch.load(weights_only=True)): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc


def load_checkpoint(path: str | Path, rank: int = 0) -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, after :func:`verify_checkpoint`.

    ``rng`` is this rank's RNG state, ``None`` when the checkpoint was written by a run
    with fewer processes (the caller then seeds that rank afresh).

    Raises:
        CheckpointError: the checkpoint is incomplete, corrupted, or holds anything but
            tensors and plain data.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    state = verify_checkpoint(path)
    try:
        trainable = load_file(str(path / TRAINABLE_NAME))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / TRAINABLE_NAME} is not a valid safetensors file ({exc})") from exc
    optimizer_path = path / OPTIMIZER_NAME
    rng_path = path / f"rng_{rank}.pt"
    return LoadedCheckpoint(
        path=path,
        state=state,
        trainable=trainable,
        optimizer_state=_torch_file(optimizer_path) if optimizer_path.is_file() else None,
        scheduler_state=_torch_file(path / SCHEDULER_NAME),
        rng=_torch_file(rng_path) if rng_path.is_file() else None,
    )


def find_checkpoint(root: str | Path, rank: int = 0) -> tuple[LoadedCheckpoint | None, list[str]]:
    """The newest checkpoint under ``root`` that loads, and why each newer one was skipped.

    Returns:
        ``(checkpoint, problems)``: ``checkpoint`` is ``None`` when there is none that
        loads; ``problems`` holds one message per skipped checkpoint, newest first.
    """
    problems: list[str] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path, rank), problems
        except CheckpointError as exc:
            problems.append(str(exc))
    return None, problems


def write_run_config(output_dir: str | Path, config: dict[str, Any]) -> Path:
    """Store the run's resolved configuration as ``OUTPUT_DIR/train_config.json`` (atomic)."""
    return atomic_write_json(Path(output_dir) / "train_config.json", config)
