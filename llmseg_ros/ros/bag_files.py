"""The files of ``llmseg replay-bag``: reading an input bag defensively, publishing the output atomically.

Reading. A recording is untrusted input: a truncated, garbled or empty sqlite3 / MCAP
file, a ``metadata.yaml`` that is not YAML or names a file that is missing, or a message
that does not deserialise makes the bag reader (``rosbags``) raise whatever its parser
met. :func:`open_bag`, :func:`read_messages` and :func:`deserialize` turn every such
failure into a :class:`BagError` (a ``ValueError``) naming the bag, so the CLI answers
with a clear message and exit code 2.

Writing. :class:`OutputStaging` builds the new bag in a hidden folder next to the
destination (``.{name}.partial-{pid}-{random}``) and renames it into place only once the
bag is complete, with SIGINT / SIGTERM held back during the swap. A crash or a kill at
any point leaves the destination either absent, unchanged (``--overwrite``) or complete;
a staging folder left behind by a killed run is removed by the next run that writes next
to it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

STORAGES = ("sqlite3", "mcap")
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class BagError(ValueError):
    """An input bag that cannot be read (malformed, truncated, missing parts)."""


def _bag_error(path: Path, exc: BaseException) -> BagError:
    detail = str(exc) or type(exc).__name__
    return BagError(f"cannot read the bag {path}: {detail} (is it a complete rosbag2 recording?)")


def detect_storage(path: str | Path) -> str:
    """``sqlite3`` or ``mcap`` for a rosbag2 directory (from its metadata) or a bare ``.db3`` / ``.mcap`` file.

    Raises:
        BagError: not a bag, unreadable or malformed metadata, or another storage plugin.
    """
    path = Path(path)
    if path.is_file():
        suffixes = {".db3": "sqlite3", ".mcap": "mcap"}
        if path.suffix not in suffixes:
            raise BagError(f"{path} is not a rosbag2 directory or a .db3/.mcap file")
        return suffixes[path.suffix]
    metadata = path / "metadata.yaml"
    if not metadata.is_file():
        raise BagError(f"{path} is not a rosbag2 bag: {metadata} does not exist")
    import yaml

    try:
        data = yaml.safe_load(metadata.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise BagError(f"cannot read the bag metadata {metadata}: {exc}") from exc
    info = data.get("rosbag2_bagfile_information") if isinstance(data, dict) else None
    if not isinstance(info, dict):
        raise BagError(f"{metadata} has no 'rosbag2_bagfile_information' mapping; is it a rosbag2 bag?")
    storage = str(info.get("storage_identifier", ""))
    if storage not in STORAGES:
        raise BagError(f"{path} uses storage {storage!r}; expected one of {list(STORAGES)}")
    return storage


@contextlib.contextmanager
def open_bag(path: str | Path) -> Iterator[Any]:
    """An open ``rosbags`` reader of the bag at ``path``.

    Raises:
        BagError: the bag cannot be opened (see the module docstring).
    """
    from rosbags.rosbag2 import Reader

    path = Path(path)
    detect_storage(path)
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # the third-party parser of an untrusted file: any failure means a bad bag
        raise _bag_error(path, exc) from exc
    try:
        yield reader
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def read_messages(reader: Any, path: Path, connections: Sequence[Any] | None = None) -> Iterator[Any]:
    """``reader.messages(connections)``, with a failure to read the file raised as :class:`BagError`.

    Only the reader's own work is wrapped: an exception raised by the caller's loop body
    passes through unchanged.
    """
    try:
        iterator = iter(
            reader.messages() if connections is None else reader.messages(connections=connections)
        )
    except Exception as exc:  # see open_bag
        raise _bag_error(path, exc) from exc
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # see open_bag
            raise _bag_error(path, exc) from exc
        yield item


def deserialize(typestore: Any, raw: Any, conn: Any, log_ns: int, path: Path) -> Any:
    """Decode one CDR message; :class:`BagError` naming the topic and log time when it is malformed."""
    try:
        return typestore.deserialize_cdr(raw, conn.msgtype)
    except Exception as exc:  # see open_bag
        raise BagError(
            f"cannot read the bag {path}: the {conn.msgtype} message on {conn.topic} logged at {log_ns} ns "
            f"does not deserialise ({exc})"
        ) from exc


def check_output_path(output: str | Path, input_path: str | Path, *, overwrite: bool) -> None:
    """Refuse an output path before any work: see the ``Raises`` list.

    Raises:
        ValueError: the output is the input; it exists and ``overwrite`` is off; it exists
            and is not a bag directory (``--overwrite`` replaces only a rosbag2 directory or
            an empty one); or its folder is not a directory.
    """
    output, input_path = Path(output), Path(input_path)
    if output.resolve() == input_path.resolve():
        raise ValueError("the output bag must differ from the input bag")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise ValueError(f"output bag {output} exists; choose another path or pass --overwrite")
        if not output.is_dir() or output.is_symlink():
            raise ValueError(
                f"output bag {output} exists and is not a directory; --overwrite replaces only a bag directory"
            )
        if not (output / "metadata.yaml").is_file() and any(output.iterdir()):
            raise ValueError(
                f"output {output} is a directory that is not a rosbag2 bag (no metadata.yaml); "
                "--overwrite replaces only a bag directory or an empty one"
            )
    parent = output.parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"cannot write the output bag {output}: {folder} is not a directory")
            break


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back (delivered on exit) so a short critical section runs to its end.

    Only the calling thread's mask changes; off the main thread or where the platform has
    no ``pthread_sigmask`` it does nothing.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class OutputStaging:
    """Build a bag next to ``destination`` and rename it into place when complete.

    Use as a context manager: entering removes stale staging folders of dead processes,
    creates this run's folder and returns the path the bag writer should create;
    :meth:`commit` publishes the finished bag; leaving removes whatever is left of the
    staging folder (everything, when :meth:`commit` was not reached).
    """

    def __init__(self, destination: str | Path) -> None:
        self.destination = Path(destination)
        self.folder: Path | None = None
        self.committed = False

    def _prefix(self) -> str:
        return f".{self.destination.name}.partial-"

    def remove_stale(self) -> list[Path]:
        """Delete staging folders next to the destination left by processes no longer running."""
        removed: list[Path] = []
        pattern = re.compile(re.escape(self._prefix()) + r"(\d+)-")
        parent = self.destination.parent
        if not parent.is_dir():
            return removed
        for entry in parent.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def __enter__(self) -> Path:
        parent = self.destination.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.remove_stale()
            self.folder = Path(tempfile.mkdtemp(prefix=f"{self._prefix()}{os.getpid()}-", dir=parent))
        except OSError as exc:
            raise ValueError(f"cannot write the output bag next to {self.destination}: {exc}") from exc
        return self.folder / self.destination.name

    def commit(self) -> None:
        """Move the finished bag to the destination (replacing an existing bag directory)."""
        if self.folder is None:
            raise RuntimeError("commit() called outside the staging context")
        built = self.folder / self.destination.name
        if not built.is_dir():
            raise RuntimeError(f"nothing to publish: {built} was not written")
        with signals_held():
            if self.destination.exists():
                os.replace(self.destination, self.folder / "previous")  # removed with the staging folder
            os.replace(built, self.destination)
            self.committed = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.folder is not None:
            with signals_held():
                shutil.rmtree(self.folder, ignore_errors=True)
