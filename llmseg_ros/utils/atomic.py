"""Atomic writes of files and directories.

Everything is written under a temporary name in the destination's folder and then moved
into place with ``os.replace``, so a reader never sees a half-written file or directory
and an interrupted write leaves the previous version (or nothing) behind. The result gets
the permissions a plain ``open`` / ``mkdir`` would give it (0666 / 0777 less the process's
umask), not the owner-only ones of Python's temporary files, so other users on the robot
(e.g. the account the ROS node runs as) can read weights and outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_stream",
    "atomic_write_text",
    "default_mode",
    "publish",
]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux ≥ 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (briefly visible to other threads)
        current = os.umask(0o022)
        os.umask(current)
    return current


def default_mode(directory: bool = False) -> int:
    """Permission bits ``open`` (0666) or ``mkdir`` (0777) would give under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def publish(tmp: str | Path, dest: str | Path, *, directory: bool = False) -> None:
    """Give a finished temporary file / folder the default permissions and rename it to ``dest``."""
    os.chmod(tmp, default_mode(directory))
    os.replace(tmp, dest)


def atomic_write_stream(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = False) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it into place.

    Missing parent folders are created; on any error the temporary file is removed and
    ``path`` is left as it was. ``fsync`` flushes the data to disk before the rename.
    Returns the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        publish(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    Missing parent folders are created. Returns the destination path.
    """
    return atomic_write_stream(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``data`` as JSON (UTF-8, non-ASCII kept) and write it atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_results(directory: str | Path, stem: str, data: Any, markdown: str) -> tuple[Path, Path]:
    """A benchmark's or report's results as ``stem.json`` and ``stem.md`` in ``directory``
    (each written atomically); returns both paths."""
    directory = Path(directory)
    return atomic_write_json(directory / f"{stem}.json", data), atomic_write_text(
        directory / f"{stem}.md", markdown
    )


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and move it into place on success.

    The body of the ``with`` block writes into the yielded temporary folder. When it
    finishes, an existing ``directory`` is moved aside, the new one renamed into place and
    the old one deleted; when it (or the swap) raises, the temporary folder is deleted and
    ``directory`` is left as it was (moved back if it had been moved aside). A previous
    version left aside by a process killed in the middle of the swap is moved back first.
    Missing parent folders are created.

        >>> with atomic_directory("weights/") as tmp:
        ...     model.save_pretrained(tmp)

    Yields:
        The temporary folder (a sibling of ``directory`` whose name starts with ``.``).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    old = directory.with_name(f".{directory.name}.old")
    if old.is_dir() and not directory.exists():
        os.replace(old, directory)  # a swap was interrupted after moving the previous version aside
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    moved = False
    try:
        yield tmp
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
            moved = True
            publish(tmp, directory, directory=True)
            shutil.rmtree(old, ignore_errors=True)  # the new version is in place either way
        else:
            publish(tmp, directory, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not directory.exists():
            os.replace(old, directory)
        raise
