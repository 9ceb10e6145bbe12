"""The processes of one job started by ``accelerate launch`` or ``torchrun``, as the offline tools see them.

The launchers start one process per device and tell each its place through the
environment: ``RANK`` (0 … ``WORLD_SIZE`` − 1 over every machine), ``WORLD_SIZE``,
``LOCAL_RANK`` (its index on its machine) and ``MASTER_ADDR`` / ``MASTER_PORT`` (where
rank 0 listens). :func:`launched_world` joins that job through a ``gloo`` process group;
:class:`World` offers the few collectives the precompute and evaluation scripts need, on
Python objects (the tensors stay on each process's own device, so ``gloo`` serves GPU jobs
too). A plain ``python`` call is a world of one process, with no process group.

torch is imported only when a process group is used.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")
_SUBGROUP: tuple[Any, Any] | None = None  # (default group, its gloo subgroup) of current_world()

DEFAULT_TIMEOUT = timedelta(hours=6)
"""How long a collective waits for the slowest process (planning a large cache hashes every image)."""

__all__ = ["DEFAULT_TIMEOUT", "LaunchInfo", "World", "current_world", "launched_world", "rank_device"]


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in its job.

    Attributes:
        rank: 0 … ``world_size`` − 1, unique over every machine.
        world_size: processes in the job.
        local_rank: index of the process on its machine (picks its GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LaunchInfo:
        """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (absent: a single process).

        Raises:
            ValueError: a variable that is not an integer or out of range.
        """
        env = os.environ if environ is None else environ
        return cls(
            rank=_env_int(env, "RANK", 0),
            world_size=_env_int(env, "WORLD_SIZE", 1),
            local_rank=_env_int(env, "LOCAL_RANK", 0),
        )


class World:
    """The processes of one job, seen from one of them, with collectives on Python objects.

    Every collective must be called by every process of the job, in the same order.
    With one process they return at once.

    Args:
        info: this process's place in the job.
        group: the ``torch.distributed`` process group to communicate in (a ``gloo``
            group); ``None`` with one process.
    """

    def __init__(self, info: LaunchInfo | None = None, group: Any = None) -> None:
        self.info = info or LaunchInfo()
        if self.info.world_size > 1 and group is None:
            raise ValueError(f"a world of {self.info.world_size} processes needs a process group")
        self.group = group

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def local_rank(self) -> int:
        return self.info.local_rank

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes reports and shows progress."""
        return self.info.rank == 0

    def barrier(self) -> None:
        """Wait until every process has reached this call."""
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every process (the others' ``obj`` is ignored)."""
        if self.group is None:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, indexed by rank, on every process."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank})"


def current_world() -> World:
    """The job this process already belongs to, or a world of one.

    When ``torch.distributed`` is initialised (by ``accelerate`` in the trainer, or by
    :func:`launched_world`), the world spans its default group; for a backend other than
    ``gloo`` (NCCL) a ``gloo`` subgroup is created for the object collectives — a
    collective call, so every process calls this function together the first time; later
    calls return the same world.
    """
    import torch.distributed as dist

    global _SUBGROUP
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    info = LaunchInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=LaunchInfo.from_env().local_rank,
    )
    default = dist.group.WORLD
    if str(dist.get_backend()) == "gloo":
        return World(info, default)
    if _SUBGROUP is None or _SUBGROUP[0] is not default:  # one gloo subgroup per default group
        _SUBGROUP = (default, dist.new_group(backend="gloo"))
    return World(info, _SUBGROUP[1])


def _forget_subgroup() -> None:
    """Drop the cached process groups while the interpreter is still whole.

    A process group object still referenced after ``destroy_process_group`` is freed
    during interpreter finalisation, where its threads abort the process ("terminate
    called without an active exception").
    """
    global _SUBGROUP
    _SUBGROUP = None


atexit.register(_forget_subgroup)


@contextmanager
def launched_world(timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[World]:
    """Join the job the launcher started; a world of one for a plain ``python`` call.

    With ``WORLD_SIZE`` > 1 in the environment and no process group yet, a ``gloo``
    group is initialised from the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``) and destroyed on exit, after a barrier when the body ended normally;
    an existing group is reused as :func:`current_world` describes.

    Args:
        timeout: how long a collective waits for the slowest process.

    Raises:
        ValueError: malformed ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.
    """
    info = LaunchInfo.from_env()
    if info.world_size == 1:
        yield World()
        return
    import torch.distributed as dist

    if dist.is_initialized():
        yield current_world()
        return
    dist.init_process_group(backend="gloo", timeout=timeout)
    try:
        yield World(info, dist.group.WORLD)
    finally:
        _forget_subgroup()
        dist.destroy_process_group()


def rank_device(device: str, world: World) -> str:
    """The device one process of a multi-process job should use.

    ``auto`` and ``cuda`` name this process's own GPU, ``cuda:{local_rank mod GPUs}``, when
    CUDA is available and the job has several processes; any other name (``cpu``,
    ``cuda:N``) and a single-process job keep ``device`` as given.
    """
    if world.world_size == 1 or device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    return f"cuda:{world.local_rank % torch.cuda.device_count()}"
