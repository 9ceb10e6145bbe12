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


class Journal:
    """Append-only record of finished images.

    Use :meth:`open`; ``entries`` maps file name → the logged entry (first one wins).
    """

    def __init__(self, path: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.entries = entries
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, digest: str, meta: Mapping[str, Any] | None = None) -> Journal:
        """Open (or create) the journal of the sample identified by ``digest``.

        Raises:
            ValueError: the file belongs to another sample, or a line before the last one
                is not valid JSON.
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
        lines = data.decode("utf-8").splitlines()
        if not lines:
            journal = cls(path, header, {})
            journal._append_line(header)
            return journal
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"journal {path} line {number} is not valid JSON: {exc}") from exc
        found = records[0]
        if found.get("kind") != "header" or found.get("sample_digest") != digest:
            raise ValueError(
                f"journal {path} was written for a different sample (digest {found.get('sample_digest')!r}, "
                f"this run {digest!r}); use another output path or delete the journal to start over"
            )
        entries: dict[str, dict[str, Any]] = {}
        for record in records[1:]:
            name = record.get("file_name")
            if record.get("kind") != "image" or not isinstance(name, str):
                raise ValueError(
                    f"journal {path} holds an entry that is not an image record: {record!r:.120}"
                )
            entries.setdefault(name, record)
        return cls(path, found, entries)

    def _append_line(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, entry: Mapping[str, Any]) -> None:
        """Log one finished image (``entry["file_name"]`` required); duplicates are refused."""
        name = entry.get("file_name")
        if not isinstance(name, str):
            raise ValueError(f"journal entry needs a 'file_name' string, got {name!r}")
        record = {"kind": "image", **entry}
        with self._lock:
            if name in self.entries:
                raise ValueError(f"image {name!r} is already in the journal {self.path}")
            self._append_line(record)
            self.entries[name] = record
