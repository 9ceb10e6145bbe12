"""Fault injection for the precompute cache's durable writes.

A forked process fills a cache and is killed (SIGKILL, no clean-up) just before its k-th
file-system change — every file created, opened for writing, linked, renamed, removed,
chmod-ed or touched, seen through Python's audit hooks — for every k of a whole run. After
each kill, whatever a reader finds complete is exact, and the next run finishes the cache
to the bytes of an uninterrupted run (or refuses with a clear message).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from precompute_testing import fill_fake, tree_bytes, write_images

from llmseg_ros.training.cache import MANIFEST_NAME, ProposalCache, finished_shards, shard_path

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHANGES = {
    "os.rename",
    "os.remove",
    "os.link",
    "os.mkdir",
    "os.rmdir",
    "os.chmod",
    "os.utime",
    "tempfile.mkstemp",
}


def fill(paths: list[Path], out: Path) -> None:
    fill_fake(paths, out, shard_size=2)


def is_change(event: str, args: tuple, root: str) -> bool:
    """Whether an audit event changes a file under ``root``."""
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        return bool(writes) and str(path).startswith(root)
    return event in CHANGES and bool(args) and str(args[0]).startswith(root)


def in_child(run: Callable[[], None], root: Path, kill_at: int | None) -> tuple[int, int]:
    """Run ``run`` in a forked process that SIGKILLs itself before its ``kill_at``-th change
    under ``root`` (never with ``None``). Returns (changes seen, signal that ended it or 0)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count, maybe die, report the count
        os.close(read)
        count = 0

        def hook(event: str, args: tuple) -> None:
            nonlocal count
            if is_change(event, args, str(root)):
                count += 1
                if count == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        try:
            sys.addaudithook(hook)
            run()
            os.write(write, str(count).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    return (int(reported) if reported else -1), (os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0)


def test_killed_at_any_write_the_next_run_finishes_the_identical_cache(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 3)
    fill(paths, tmp_path / "reference")
    expected = tree_bytes(tmp_path / "reference")
    total, died = in_child(lambda: fill(paths, tmp_path / "counted"), tmp_path / "counted", None)
    assert died == 0 and total >= 20  # manifest, 2 shards x (claim, NPZ, JSONL, release), summary
    assert tree_bytes(tmp_path / "counted") == expected
    for k in range(1, total + 1):
        out = tmp_path / f"killed_{k:03d}"
        _, died = in_child(lambda out=out: fill(paths, out), out, k)
        assert died == signal.SIGKILL, k
        # nothing half-written reads as complete: every finished shard is exact
        if (out / MANIFEST_NAME).is_file():
            assert (out / MANIFEST_NAME).read_bytes() == expected[MANIFEST_NAME], k
            cache = ProposalCache(out)
            for shard in finished_shards(out, True):
                for suffix in (".jsonl", ".npz"):
                    name = str(shard_path(out, shard, suffix).relative_to(out))
                    assert (out / name).read_bytes() == expected[name], (k, name)
            for key in cache:
                cache.get(key)
        else:
            with pytest.raises(FileNotFoundError, match="no proposal cache"):
                ProposalCache(out)
        fill(paths, out)  # the next run
        assert tree_bytes(out) == expected, k  # claims and temporary files gone too
        assert ProposalCache(out).is_complete


def test_a_damaged_manifest_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images", 3)
    out = tmp_path / "cache"
    fill(paths, out)
    manifest = out / MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:40])  # damaged outside precompute
    with pytest.raises(
        ValueError, match=r"cache\.json is unreadable .* restore it, or write to a new directory"
    ):
        fill(paths, out)
