"""Exclusive claims on the shards of a proposal cache, shared through the cache directory.

Every process that fills a cache (the ranks of one ``torchrun`` / ``accelerate launch``
job, on one machine or several sharing the directory, or separate runs) claims a shard
before computing it, so no two live processes compute the same shard. A claim is a small
JSON file ``claims/{shard}.{generation}`` naming its owner (job id, rank, host, pid):

* **atomic**: the file is written under a temporary name and hard-linked to its final
  name; ``link`` fails if the name exists, so exactly one process gets a generation and
  a claim is never half-written;
* **alive**: the owner touches its claim files every ``lease / 10`` seconds from a
  background thread;
* **taken over** when its owner is dead: a process on the same machine (and pid
  namespace) whose pid no longer exists, or a claim not touched for ``lease`` seconds (another host, a hung machine).
  The taker creates the next generation, so two takers never both win. If a presumed
  dead owner was only slow, both write the same bytes under the same shard name
  (atomic renames), so the cache still holds the shard once;
* **released** when the shard is published (its claim files are removed) or when its
  owner fails with an exception; ``claims/`` is removed when the cache is complete.

Compare the hosts' clocks (NTP) before relying on the lease across machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

CLAIM_DIR = "claims"
DEFAULT_LEASE_SECONDS = 300.0

__all__ = ["CLAIM_DIR", "DEFAULT_LEASE_SECONDS", "ClaimOwner", "ShardClaims", "machine_id"]


@dataclass(frozen=True)
class ClaimOwner:
    """Who holds a claim.

    Attributes:
        job: id shared by the processes of one launch (a fresh one per run).
        rank: the process's rank in that job.
        host: where ``pid`` is meaningful (:func:`machine_id`).
        pid: the process id there.
    """

    job: str
    rank: int
    host: str
    pid: int

    @classmethod
    def this_process(cls, job: str, rank: int = 0) -> ClaimOwner:
        return cls(job=job, rank=rank, host=machine_id(), pid=os.getpid())


def machine_id() -> str:
    """Where a pid means this process table: host name, kernel boot id and pid namespace.

    Two containers on one machine share the host name and boot id but not their pid
    namespaces, so a pid is only checked for liveness where all three match.
    """
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid") else Path(source).read_text().strip())
        except OSError:
            parts.append("?")
    return "|".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class ShardClaims:
    """The claims of one cache directory, from one process's side.

    Use as a context manager: it runs the heartbeat thread and, on exit, releases the
    claims still held (a failed shard becomes claimable at once).

    Args:
        directory: the cache directory (``claims/`` is created inside).
        owner: this process.
        lease_seconds: a claim untouched this long is taken over.
    """

    def __init__(
        self, directory: str | Path, owner: ClaimOwner, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.folder = Path(directory) / CLAIM_DIR
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self._held: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifetime ------------------------------------------------------------------------
    def __enter__(self) -> ShardClaims:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="shard-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for shard in list(self._held):
            self.abandon(shard)

    def _heartbeat(self) -> None:
        interval = self.lease_seconds / 10
        while not self._stop.wait(interval):
            with self._lock:
                paths = list(self._held.values())
            for path in paths:
                with contextlib.suppress(FileNotFoundError):  # released or cleared meanwhile
                    os.utime(path)

    # -- claims --------------------------------------------------------------------------
    def _generations(self, shard: int) -> list[tuple[int, Path]]:
        """(generation, path) of the shard's claim files, newest last."""
        prefix = f"{shard:05d}."
        found = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.folder):
                if name.startswith(prefix) and name[len(prefix) :].isdigit():
                    found.append((int(name[len(prefix) :]), self.folder / name))
        return sorted(found)

    def _read(self, path: Path) -> tuple[ClaimOwner | None, float] | None:
        """(owner or ``None`` if unreadable, seconds since the last heartbeat); ``None`` if gone."""
        try:
            age = time.time() - path.stat().st_mtime
            data = json.loads(path.read_text(encoding="utf-8"))
            return ClaimOwner(**data), age
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None, age

    def is_stale(self, owner: ClaimOwner | None, age: float) -> bool:
        """Whether a claim of ``owner`` last touched ``age`` seconds ago may be taken over."""
        if owner == self.owner:
            return False
        if owner is not None and owner.host == self.owner.host and not _pid_alive(owner.pid):
            return True
        return age > self.lease_seconds

    def holder(self, shard: int) -> ClaimOwner | None:
        """The live owner of ``shard``'s newest claim, ``None`` when it is free or stale."""
        generations = self._generations(shard)
        if not generations:
            return None
        state = self._read(generations[-1][1])
        if state is None:
            return None
        owner, age = state
        return None if self.is_stale(owner, age) else owner

    def try_claim(self, shard: int) -> bool:
        """Claim ``shard`` unless a live process holds it; ``True`` when this process now holds it."""
        if shard in self._held:
            return True
        generations = self._generations(shard)
        generation = 0
        if generations:
            newest, path = generations[-1]
            state = self._read(path)
            if state is not None and not self.is_stale(*state):
                return False
            generation = newest + 1
        target = self.folder / f"{shard:05d}.{generation}"
        self.folder.mkdir(parents=True, exist_ok=True)  # another process may have just cleared it
        fd, tmp = tempfile.mkstemp(prefix=".claim.", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(asdict(self.owner), handle)
            os.link(tmp, target)  # atomic: fails when another process took this generation
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        with self._lock:
            self._held[shard] = target
        return True

    def release(self, shard: int) -> None:
        """The shard is published: remove every claim file of it (older generations too)."""
        with self._lock:
            self._held.pop(shard, None)
        for _, path in self._generations(shard):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def abandon(self, shard: int) -> None:
        """Give up ``shard`` without publishing it: remove this process's claim only."""
        with self._lock:
            path = self._held.pop(shard, None)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def held(self) -> Iterator[int]:
        """The shards this process holds."""
        with self._lock:
            return iter(list(self._held))

    def clear(self) -> None:
        """Remove ``claims/`` (the cache is complete: nothing is left to claim)."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.folder):
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / name).unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.folder.rmdir()

    def remove_if_empty(self) -> None:
        """Remove ``claims/`` when no claim is left in it (a run stopped early, nothing held)."""
        with contextlib.suppress(OSError):
            self.folder.rmdir()
