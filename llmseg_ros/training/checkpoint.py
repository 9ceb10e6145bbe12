"""Training checkpoints: atomic, resumable exactly.

Layout of one checkpoint (``OUTPUT_DIR/checkpoints/step-00000500/``)::

    state.json        TrainState: optimizer step, micro-step, world size, config fingerprint
    trainable.pt      {parameter name: tensor} of every trainable parameter (CPU)
    optimizer.pt      the optimizer's state_dict (not with DeepSpeed, see below)
    scheduler.pt      the learning-rate scheduler's state_dict
    rng_<rank>.pt     RNG states of python ``random``, numpy, torch CPU and CUDA, per process
    engine/           DeepSpeed only: the engine's checkpoint (sharded optimizer states)

It is written into ``step-NNNNNNNN.tmp`` and renamed into place once complete, so a crash
never leaves a checkpoint that looks finished. Files are read with ``torch.load(...,
weights_only=False)``: only load checkpoints you wrote yourself.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmseg_ros.data.io import atomic_write_json

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.json"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Where a run stands.

    Attributes:
        step: optimizer steps done.
        micro_step: micro-batches consumed per process (= step × grad_accum at a
            checkpoint); the data position of the next micro-batch.
        world_size: processes of the run that wrote the checkpoint.
        fingerprint: ``TrainConfig.fingerprint()`` of that run.
    """

    step: int = 0
    micro_step: int = 0
    world_size: int = 1
    fingerprint: str = ""


def rng_state() -> dict[str, Any]:
    """The global RNG states: python ``random``, numpy, torch CPU, and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root`` (the run's ``checkpoints/`` folder), oldest first."""
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
    """The newest finished checkpoint under ``root``, or ``None``."""
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
    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f"{checkpoint_name(state.step)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    if engine_save is not None:
        engine_save(tmp / "engine")
    barrier()
    if rank == 0:
        torch.save({k: v.detach().to("cpu").clone() for k, v in trainable.items()}, tmp / "trainable.pt")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        with open(tmp / STATE_NAME, "w", encoding="utf-8") as fh:
            json.dump(asdict(state), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def load_checkpoint(path: str | Path, rank: int = 0) -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    ``rng`` is this rank's RNG state, ``None`` when the checkpoint was written by a run
    with fewer processes (the caller then seeds that rank afresh).

    Raises:
        FileNotFoundError: ``path`` is not a finished checkpoint.
    """
    path = Path(path)
    state_path = path / STATE_NAME
    if not state_path.is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint ({STATE_NAME} missing)")
    state = TrainState(**json.loads(state_path.read_text(encoding="utf-8")))

    def load(name: str) -> Any:
        return torch.load(path / name, map_location="cpu", weights_only=False)

    rng_path = path / f"rng_{rank}.pt"
    return LoadedCheckpoint(
        path=path,
        state=state,
        trainable=load("trainable.pt"),
        optimizer_state=load("optimizer.pt") if (path / "optimizer.pt").is_file() else None,
        scheduler_state=load("scheduler.pt"),
        rng=load(rng_path.name) if rng_path.is_file() else None,
    )


def write_run_config(output_dir: str | Path, config: dict[str, Any]) -> Path:
    """Store the run's resolved configuration as ``OUTPUT_DIR/train_config.json`` (atomic)."""
    return atomic_write_json(Path(output_dir) / "train_config.json", config)
