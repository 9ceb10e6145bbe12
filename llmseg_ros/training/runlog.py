"""The run's JSON Lines logs (``metrics.jsonl``, ``validation.jsonl``), safe against crashes.

Each record is one line written with a single ``write`` on an ``O_APPEND`` descriptor and
flushed to disk, so a run killed mid-append leaves at most a torn last line (no
trailing newline). :meth:`RunLog.truncate`, called when a run starts or resumes, drops
that line with a warning — as the data generator's journal does
(:mod:`llmseg_ros.datagen.journal`) — and every record of steps after the checkpoint the
run resumes from, so the log matches the resumed run. A line other than the last that
is not a JSON object cannot come from a crash and is refused with its line number.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from llmseg_ros.data.io import atomic_write_text

logger = logging.getLogger(__name__)


class RunLog:
    """One append-only JSON Lines file of records holding an integer ``step``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in order (a torn last line is left out, with a warning).

        Raises:
            ValueError: a line before the last is not a JSON object with an integer ``step``.
        """
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            logger.warning(
                "%s ends in a torn line (%d bytes, a crash mid-append); dropping it",
                self.path,
                len(data) - cut,
            )
            data = data[:cut]
        records = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{self.path} line {number} is not valid JSON ({exc}); only a torn last line can come "
                    "from a crash: fix or delete the file to resume"
                ) from exc
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(
                    f"{self.path} line {number} is not a record with an integer 'step': {line:.120}"
                )
            records.append(record)
        return records

    def truncate(self, step: int) -> list[dict[str, Any]]:
        """Keep the records of steps ≤ ``step`` (atomic rewrite, only when something changes).

        Returns:
            The kept records.
        """
        if not self.path.is_file():
            return []
        kept = [r for r in self.records() if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if self.path.read_bytes() != text.encode("utf-8"):
            atomic_write_text(self.path, text)
        return kept

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (one ``write`` of the whole line, then ``fsync``)."""
        if not isinstance(record.get("step"), int):
            raise ValueError(f"a run log record needs an integer 'step', got {record.get('step')!r}")
        line = (json.dumps(record) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
