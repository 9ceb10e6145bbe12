"""Fault injection for the generator's durable writes: the journal and the outputs built from it.

Killed or failing at any point, the next run either resumes to the identical result or
refuses with a clear message; nothing half-written is ever read as complete.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_datagen import SCRIPT, FakeChatServer, _cli_args, _journal_images, cli, server, workspace  # noqa: F401
from test_datagen import _no_proxy as _no_proxy

from llmseg_ros.datagen import journal as journal_module
from llmseg_ros.datagen.journal import Journal

ENTRIES = [
    {"file_name": f"{name}.jpg", "record": {"qa_pairs": []}, "note": "é" * k} for k, name in enumerate("abc")
]


def _written(path: Path) -> bytes:
    journal = Journal.open(path, "digest")
    for entry in ENTRIES:
        journal.append(entry)
    return path.read_bytes()


def test_a_journal_cut_at_any_byte_reopens_to_the_complete_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _written(tmp_path / "full.jsonl")
    monkeypatch.setattr(journal_module.os, "fsync", lambda fd: None)  # durability is not what is tested here
    line_ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]  # header, then one per entry
    path = tmp_path / "cut.jsonl"
    for cut in range(len(full) + 1):
        path.write_bytes(full[:cut])
        journal = Journal.open(path, "digest")
        complete = sum(1 for end in line_ends[1:] if end <= cut)
        assert list(journal.entries) == [e["file_name"] for e in ENTRIES[:complete]], cut
        journal.append({"file_name": "z.jpg", "record": {"qa_pairs": []}})  # and the journal goes on
        again = Journal.open(path, "digest")
        assert list(again.entries) == [*journal.entries], cut


def test_a_journal_of_another_version_or_with_a_corrupt_middle_line_is_refused(tmp_path: Path) -> None:
    full = _written(tmp_path / "j.jsonl")
    lines = full.split(b"\n")
    (tmp_path / "mid.jsonl").write_bytes(b"\n".join([lines[0], b'{"kind": "ima', *lines[2:]]))
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON .* corrupted: use another output path"):
        Journal.open(tmp_path / "mid.jsonl", "digest")
    header = json.loads(lines[0])
    (tmp_path / "v.jsonl").write_bytes(json.dumps({**header, "version": 99}).encode() + b"\n")
    with pytest.raises(ValueError, match="has version 99, this generator writes 1"):
        Journal.open(tmp_path / "v.jsonl", "digest")
    (tmp_path / "list.jsonl").write_bytes(b"[1, 2]\n")
    with pytest.raises(ValueError, match="does not start with a header line"):
        Journal.open(tmp_path / "list.jsonl", "digest")
    (tmp_path / "entry.jsonl").write_bytes(lines[0] + b'\n["not", "an", "image"]\n')
    with pytest.raises(ValueError, match="line 2 is not an image record"):
        Journal.open(tmp_path / "entry.jsonl", "digest")


@pytest.mark.parametrize("step", ["open", "write_half", "write_all_then_fail", "fsync"])
def test_a_failed_append_leaves_no_trace_and_the_journal_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.open(path, "digest")
    journal.append(ENTRIES[0])
    before = path.read_bytes()
    real_open, real_write, real_fsync = os.open, os.write, os.fsync

    def fail_open(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    def fail_write(fd: int, data: Any) -> int:
        if step == "write_half":
            real_write(fd, bytes(data)[: len(data) // 2])
        else:
            real_write(fd, data)
        raise OSError(errno.ENOSPC, "No space left on device")

    def fail_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    patches = {"open": ("open", fail_open), "fsync": ("fsync", fail_fsync)}
    name, fake = patches.get(step, ("write", fail_write))
    monkeypatch.setattr(journal_module.os, name, fake)
    if step == "fsync":  # the rollback's own fsync must work: fail only the first call
        calls = {"n": 0}

        def first_fsync_fails(fd: int) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                fail_fsync(fd)
            real_fsync(fd)

        monkeypatch.setattr(journal_module.os, "fsync", first_fsync_fails)
    with pytest.raises(OSError):
        journal.append(ENTRIES[1])
    monkeypatch.setattr(journal_module.os, "open", real_open)
    monkeypatch.setattr(journal_module.os, "write", real_write)
    monkeypatch.setattr(journal_module.os, "fsync", real_fsync)
    assert path.read_bytes() == before  # the failed line is gone, whole
    assert list(journal.entries) == ["a.jpg"]
    journal.append(ENTRIES[1])  # the same run goes on ...
    journal.append(ENTRIES[2])
    assert list(Journal.open(path, "digest").entries) == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
    ]  # ... and reads back whole


def test_when_even_the_rollback_fails_the_journal_refuses_more_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.open(path, "digest")
    real_write = os.write

    def half(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module.os, "write", half)
    monkeypatch.setattr(journal_module.os, "ftruncate", no_truncate)
    with pytest.raises(OSError):
        journal.append(ENTRIES[0])
    monkeypatch.undo()
    with pytest.raises(OSError, match="refuses appends after a failed write"):
        journal.append(ENTRIES[1])  # a line after the torn one would hide it in the middle of the file
    assert list(Journal.open(path, "digest").entries) == []  # the next run drops the torn tail


# -- the generator, end to end ---------------------------------------------------------------------
def _outputs(out: Path) -> tuple[bytes, dict[str, Any]]:
    stats = json.loads(out.with_name(f"{out.stem}.stats.json").read_text())
    stats.pop("usage_this_run")
    stats.pop("images_failed")
    return out.read_bytes(), stats


@pytest.fixture
def reference(workspace: dict[str, Any], server: FakeChatServer) -> tuple[bytes, dict[str, Any]]:  # noqa: F811
    out = workspace["dir"] / "reference.json"
    assert cli.main(_cli_args(workspace, server, out, "--workers", "1")) == 0
    server.requests.clear()
    return _outputs(out)


def test_journal_write_failures_during_a_run_resume_to_the_identical_result(
    workspace: dict[str, Any],  # noqa: F811
    server: FakeChatServer,  # noqa: F811
    reference: tuple[bytes, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = workspace["dir"] / "faulty.json"
    real_write = os.write
    count = {"n": 0}

    def every_third_fails(fd: int, data: Any) -> int:
        count["n"] += 1
        if count["n"] % 3 == 0:
            real_write(fd, bytes(data)[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", every_third_fails)
    assert cli.main(_cli_args(workspace, server, out, "--workers", "1")) == 1  # some images failed
    monkeypatch.undo()
    assert cli.main(_cli_args(workspace, server, out, "--workers", "2")) == 0
    assert _outputs(out) == reference


@pytest.mark.slow
def test_killed_at_random_points_the_generator_resumes_to_the_identical_result(
    workspace: dict[str, Any],  # noqa: F811
    server: FakeChatServer,  # noqa: F811
    reference: tuple[bytes, dict[str, Any]],
) -> None:
    out = workspace["dir"] / "killed.json"
    journal = Path(f"{out}.journal.jsonl")
    args = [sys.executable, str(SCRIPT), *_cli_args(workspace, server, out, "--workers", "2")]
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    server.reply_delay_s = 0.1
    rng = random.Random(11)
    for attempt in range(4):
        start, asked = time.monotonic(), sum(server.requests.values())
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while (
                time.monotonic() - start < 60
                and sum(server.requests.values()) == asked
                and proc.poll() is None
            ):
                time.sleep(0.01)  # until this run asks its first question (or has nothing left to ask)
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        if journal.exists():  # whatever it holds reads back: complete lines only
            names = _journal_images(journal) if journal.read_bytes().endswith(b"\n") else None
            assert names is None or len(names) == len(set(names)), attempt
        assert not out.exists() or _outputs(out)[0] == reference[0], attempt  # never a partial output
    server.reply_delay_s = 0.0
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _outputs(out) == reference
