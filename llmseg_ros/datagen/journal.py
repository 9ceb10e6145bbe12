"""Crash-safe progress journal (JSONL) of the generator.

The journal's first line is a header naming the run's sample (a digest of the sampled
file names); each further line is one finished image. Every line goes to disk with one
``write`` on an ``O_APPEND`` descriptor followed by ``fsync``, so a killed run leaves at
most a torn last line, which :meth:`Journal.open` cuts off. Reopening with a different
sample is refused, so a restart never mixes two runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

JOURNAL_VERSION = 1


def sample_digest(file_names: Iterable[str]) -> str:
    """SHA-256 of the sampled file names in order (identifies one sample)."""
    h = hashlib.sha256()
    for name in file_names:
        h.update(name.encode("utf-8") + b"\n")
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the data file itself is synced
    finally:
        os.close(fd)


def _check_image_record(record: Any, path: Path, number: int) -> str:
    """The file name of a well-formed image line; ``ValueError`` naming the line otherwise."""
    if (
        not isinstance(record, dict)
        or record.get("kind") != "image"
        or not isinstance(record.get("file_name"), str)
    ):
        raise ValueError(
            f"journal {path} line {number} is not an image record: {record!r:.120}; "
            "use another output path or delete the journal to start over"
        )
    return str(record["file_name"])


class Journal:
    """Append-only record of finished images.

    Use :meth:`open`; ``entries`` maps file name → the logged entry (first one wins).
    A failed append is rolled back (the file is cut to its previous length); when even
    that fails, the journal refuses further appends, so a torn line can only ever be the
    last one, which the next :meth:`open` drops.
    """

    def __init__(self, path: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.entries = entries
        self._lock = threading.Lock()
        self._broken: str | None = None

    @classmethod
    def open(cls, path: str | Path, digest: str, meta: Mapping[str, Any] | None = None) -> Journal:
        """Open (or create) the journal of the sample identified by ``digest``.

        Raises:
            ValueError: the file belongs to another sample or journal version, or a line
                before the last one is not a valid record (the file was not written by a
                crash of this generator but edited or corrupted).
        """
        path = Path(path)
        header = {"kind": "header", "version": JOURNAL_VERSION, "sample_digest": digest, **dict(meta or {})}
        if not path.exists() or path.stat().st_size == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            journal = cls(path, header, {})
            journal._append_line(header)
            _fsync_dir(path.parent)
            return journal
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            LOGGER.warning("journal %s ends in a torn line (%d bytes); dropping it", path, len(data) - cut)
            with path.open("r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
            data = data[:cut]
        lines = data.split(b"\n")[:-1] if data else []
        if not lines:
            journal = cls(path, header, {})
            journal._append_line(header)
            return journal
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(
                    f"journal {path} line {number} is not valid JSON ({exc}); it was not cut short by a crash "
                    "but corrupted: use another output path or delete the journal to start over"
                ) from exc
        found = records[0]
        if not isinstance(found, dict) or found.get("kind") != "header":
            raise ValueError(f"journal {path} does not start with a header line: {found!r:.120}")
        if found.get("version") != JOURNAL_VERSION:
            raise ValueError(
                f"journal {path} has version {found.get('version')!r}, this generator writes {JOURNAL_VERSION}; "
                "use another output path or delete the journal to start over"
            )
        if found.get("sample_digest") != digest:
            raise ValueError(
                f"journal {path} was written for a different sample (digest {found.get('sample_digest')!r}, "
                f"this run {digest!r}); use another output path or delete the journal to start over"
            )
        entries: dict[str, dict[str, Any]] = {}
        for number, record in enumerate(records[1:], start=2):
            entries.setdefault(_check_image_record(record, path, number), record)
        return cls(path, found, entries)

    def _append_line(self, record: Mapping[str, Any]) -> None:
        if self._broken is not None:
            raise OSError(f"journal {self.path} refuses appends after a failed write: {self._broken}")
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except BaseException as exc:
                try:  # take the partial line back, so later lines never follow a torn one
                    os.ftruncate(fd, start)
                    os.fsync(fd)
                except OSError as undo:
                    self._broken = f"{exc!r}, then {undo!r} while rolling back"
                raise
        finally:
            os.close(fd)

    def append(self, entry: Mapping[str, Any]) -> None:
        """Log one finished image (``entry["file_name"]`` required); duplicates are refused.

        Raises:
            ValueError: no file name, or an image already logged.
            OSError: the line could not be written (nothing of it is left in the file).
        """
        name = entry.get("file_name")
        if not isinstance(name, str):
            raise ValueError(f"journal entry needs a 'file_name' string, got {name!r}")
        record = {"kind": "image", **entry}
        with self._lock:
            if name in self.entries:
                raise ValueError(f"image {name!r} is already in the journal {self.path}")
            self._append_line(record)
            self.entries[name] = record
