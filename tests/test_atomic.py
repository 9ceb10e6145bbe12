"""Atomic file and directory writes (llmseg_ros.utils.atomic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmseg_ros.utils.atomic import atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_file_writes_create_parents_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    assert atomic_write_json(target, {"k": "é"}, indent=None) == target
    assert target.read_bytes() == '{"k": "é"}\n'.encode()
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert json.loads(atomic_write_json(target, [1, 2]).read_text(encoding="utf-8")) == [1, 2]
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_failed_file_write_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "x.bin", b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_directory_is_built_aside_and_replaces_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.") and not target.exists()
        (tmp / "a.txt").write_text("1", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("2", encoding="utf-8")
        assert (target / "a.txt").is_file()  # the old one is still complete while writing
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_failed_directory_write_leaves_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "partial.txt").write_text("x", encoding="utf-8")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "fresh"):
        raise RuntimeError("nothing written")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_results_get_the_permissions_of_plain_writes(tmp_path: Path, umask: int) -> None:
    """Not the owner-only modes of temporary files: the node may run as another user."""
    import os
    import stat

    from llmseg_ros.utils.atomic import atomic_write_stream, default_mode

    old = os.umask(umask)
    try:
        assert default_mode() == 0o666 & ~umask and default_mode(directory=True) == 0o777 & ~umask
        written = atomic_write_bytes(tmp_path / "a.bin", b"x")
        streamed = atomic_write_stream(tmp_path / "b.bin", lambda fh: fh.write(b"y"), fsync=True)
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("z")
        for path, expected in ((written, 0o666), (streamed, 0o666), (tmp_path / "d", 0o777)):
            assert stat.S_IMODE(path.stat().st_mode) == expected & ~umask, path
        assert streamed.read_bytes() == b"y"
    finally:
        os.umask(old)
