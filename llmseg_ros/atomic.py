"""Atomic writes of files and directories.

Everything is written under a temporary name in the destination's folder and then moved
into place with ``os.replace``, so a reader never sees a half-written file or directory
and an interrupted write leaves the previous version (or nothing) behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``).

    Missing parent folders are created. Returns the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Serialise ``data`` as JSON (UTF-8, non-ASCII kept) and write it atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and move it into place on success.

    The body of the ``with`` block writes into the yielded temporary folder. When it
    finishes, an existing ``directory`` is moved aside, the new one renamed into place and
    the old one deleted; when it raises, the temporary folder is deleted and
    ``directory`` is left as it was. Missing parent folders are created.

        >>> with atomic_directory("weights/") as tmp:
        ...     model.save_pretrained(tmp)

    Yields:
        The temporary folder (a sibling of ``directory`` whose name starts with ``.``).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
