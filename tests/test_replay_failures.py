"""llmseg replay-bag under bad input, signals, kills and failing writes.

Malformed bags and settings end in a ``ValueError`` (exit code 2) naming the problem;
SIGINT / SIGTERM exit 130 / 143; and whatever happens, the destination is either absent,
the old bag unchanged, or the complete new bag, with no staging folder left behind.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ros_testing import FakeSegmenter
from test_bag_replay import COLOUR, DEPTH, INFO, TOPICS, read_bag, schedule, write_bag

from llmseg_ros.ros import bag_files
from llmseg_ros.ros.bag_files import OutputStaging
from llmseg_ros.ros.bag_replay import replay_bag
from llmseg_ros.ros.schedule import ReplaySchedule

DRIVER = Path(__file__).resolve().parent / "replay_driver.py"
REPO = Path(__file__).resolve().parents[1]
PLAN = "instruction: the red things"


def _storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))


def _leftovers(folder: Path) -> list[str]:
    """Staging folders (hidden ``.name.partial-...``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def _replay(bag: Path, out: Path, **kwargs: Any) -> Any:
    return replay_bag(
        bag, out, schedule(PLAN), FakeSegmenter(), TOPICS, progress=False, log=lambda line: None, **kwargs
    )


def _contents(bag: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every message as (log time, raw bytes); Segmentation messages without their stage timings."""

    def comparable(topic: str, log: int, msg: Any, raw: bytes) -> tuple[Any, ...]:
        if not topic.endswith("/segmentation"):
            return (log, raw)
        return (log, msg.header.stamp.sec, msg.header.stamp.nanosec, msg.instruction, bytes(msg.mask.data),
                list(msg.selected), msg.method, list(msg.stage_names))  # fmt: skip

    return {topic: [comparable(topic, *m) for m in msgs] for topic, msgs in read_bag(bag).items()}


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bags")
    return {storage: write_bag(root / storage, storage, frames=3) for storage in ("sqlite3", "mcap")}


# -- malformed input bags ----------------------------------------------------------------------
def _damage(data: bytes, kind: str) -> bytes:
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "garbled":
        return data[:64] + bytes((b * 7 + 13) % 256 for b in data[64:])
    assert kind == "empty"
    return b""


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@pytest.mark.parametrize(
    "kind", ["truncated", "garbled", "empty", "metadata_not_yaml", "metadata_list", "missing"]
)
def test_malformed_bags_are_refused_with_a_clear_error(
    bags: dict[str, Path], tmp_path: Path, storage: str, kind: str
) -> None:
    bag = tmp_path / "in"
    shutil.copytree(bags[storage], bag)
    data_file = _storage_file(bag)
    if kind == "metadata_not_yaml":
        (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed\n  :")
        message = "cannot read the bag metadata"
    elif kind == "metadata_list":
        (bag / "metadata.yaml").write_text("- a\n- b\n")
        message = "has no 'rosbag2_bagfile_information' mapping"
    elif kind == "missing":
        data_file.unlink()
        message = "cannot read the bag .*missing"
    else:
        data_file.write_bytes(_damage(data_file.read_bytes(), kind))
        message = f"cannot read the bag {bag}"
    with pytest.raises(ValueError, match=message):
        _replay(bag, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_message_that_does_not_deserialise_is_named(bags: dict[str, Path], tmp_path: Path) -> None:
    bag = tmp_path / "in"
    shutil.copytree(bags["sqlite3"], bag)
    with sqlite3.connect(_storage_file(bag)) as db:  # a valid container holding a garbage colour message
        (topic_id,) = db.execute("SELECT id FROM topics WHERE name = ?", (COLOUR,)).fetchone()
        db.execute(
            "UPDATE messages SET data = ? WHERE id = (SELECT MIN(id) FROM messages WHERE topic_id = ?)",
            (b"\x00\x01\x00\x00garbage", topic_id),
        )
    with pytest.raises(ValueError, match=rf"sensor_msgs/msg/Image message on {COLOUR} logged at \d+ ns"):
        _replay(bag, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_damaged_bags_replay_or_fail_cleanly(
    bags: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, storage: str, data: st.DataObject
) -> None:
    work = tmp_path_factory.mktemp("fuzz")
    bag = work / "in"
    shutil.copytree(bags[storage], bag)
    data_file = _storage_file(bag)
    raw = bytearray(data_file.read_bytes())
    how = data.draw(st.sampled_from(["flip", "cut", "splice"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del raw[at:]
    else:
        raw[at : at + 64] = data.draw(st.binary(min_size=64, max_size=64))
    data_file.write_bytes(bytes(raw))
    try:
        _replay(bag, work / "out")
    except ValueError as exc:
        assert str(exc).startswith(("cannot read the bag", "topic ", "the bag has"))
        assert not (work / "out").exists()
    else:
        assert (work / "out" / "metadata.yaml").is_file()
    assert _leftovers(work) == []


def test_cli_refuses_a_malformed_bag_before_loading_models(
    bags: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmseg_ros.cli import main

    bag = tmp_path / "in"
    shutil.copytree(bags["mcap"], bag)
    _storage_file(bag).write_bytes(b"")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    # no model options: loading would fail with exit code 3, so 2 means the bag was checked first
    assert main(["replay-bag", str(bag), "--instructions", str(plan), "--out", str(tmp_path / "o")]) == 2
    assert "seems to be empty" in capsys.readouterr().err


# -- output paths and settings ------------------------------------------------------------------
def test_output_that_is_a_file_or_not_a_bag_is_refused_even_with_overwrite(
    bags: dict[str, Path], tmp_path: Path
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a directory; --overwrite replaces only a bag"):
        _replay(bags["sqlite3"], existing, overwrite=True)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "source.py").write_text("keep me too")
    with pytest.raises(ValueError, match="is a directory that is not a rosbag2 bag"):
        _replay(bags["sqlite3"], folder, overwrite=True)
    with pytest.raises(ValueError, match=r"notes\.txt is not a directory"):
        _replay(bags["sqlite3"], existing / "out", overwrite=True)
    assert existing.read_text() == "keep me" and (folder / "source.py").read_text() == "keep me too"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _replay(bags["sqlite3"], empty, overwrite=True).processed == 3  # an empty folder may be replaced


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(bags: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write the output bag next to"):
            _replay(bags["sqlite3"], folder / "out")
    finally:
        folder.chmod(0o755)


def test_unwritable_output_folder_is_a_clear_error(
    bags: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(
        bag_files.tempfile, "mkdtemp", refuse
    )  # what a read-only folder does to a non-root user
    with pytest.raises(ValueError, match=r"cannot write the output bag next to .*Permission denied"):
        _replay(bags["sqlite3"], tmp_path / "out")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("instruction: a\ntolerance: .inf", "tolerance must be a finite number of seconds"),
        ("instruction: a\ntolerance: .nan", "tolerance must be a finite number of seconds"),
        ("instruction: a\ntolerance: -1", "tolerance must be a finite number of seconds >= 0"),
        ("at: [{stamp: .inf, instruction: a}]", r"at\[0\].stamp must be a finite number of seconds"),
        ("at: [{stamp: .nan, instruction: a}]", r"at\[0\].stamp must be a finite number of seconds"),
        (
            "instruction: a\nselection: {iop_threshold: .nan}",
            r"selection.iop_threshold must be a number in \[0, 1\]",
        ),
        (
            "instruction: a\nselection: {iop_threshold: -.inf}",
            r"selection.iop_threshold must be a number in \[0, 1\]",
        ),
        (
            "instruction: a\nselection: {iop_threshold: -0.5}",
            r"selection.iop_threshold must be a number in \[0, 1\]",
        ),
        (
            "instruction: a\nselection: {iop_threshold: high}",
            r"selection.iop_threshold must be a number in \[0, 1\]",
        ),
        ("instruction: a\nselection: {strategy: [1]}", "selection.strategy must be a string"),
        ("instruction: a\nat: 5", "at must be a list"),
    ],
)
def test_non_finite_and_mistyped_schedule_values_are_refused_up_front(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReplaySchedule.from_mapping(yaml.safe_load(text))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.dictionaries(
        st.sampled_from(ReplaySchedule.KEYS),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
            ),
            max_leaves=6,
        ),
    )
)
def test_any_instructions_mapping_gives_a_schedule_or_a_value_error(data: dict[str, Any]) -> None:
    try:
        plan = ReplaySchedule.from_mapping(data)
    except ValueError:
        return
    assert plan.tolerance_ns >= 0 and (plan.iop_threshold == -1.0 or 0.0 <= plan.iop_threshold <= 1.0)
    plan.plan([0, 10**9, 2 * 10**9])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_slop_s": float("nan")}, "sync_slop_s must be a finite number"),
        ({"sync_slop_s": float("inf")}, "sync_slop_s must be a finite number"),
        ({"timeout_s": float("inf")}, "timeout_s must be a finite number"),
        ({"timeout_s": 0.0}, "timeout_s must be a finite number"),
    ],
)
def test_replay_settings_are_validated(
    bags: dict[str, Path], tmp_path: Path, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _replay(bags["sqlite3"], tmp_path / "out", **kwargs)


# -- injected write failures ----------------------------------------------------------------------
class _Injected(Exception):
    pass


def test_a_failure_at_any_write_leaves_no_output_and_keeps_the_old_bag(
    bags: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rosbags.rosbag2 import Writer

    out = tmp_path / "out"
    _replay(bags["mcap"], out)
    old = _contents(out)
    real_write, real_close, real_replace = Writer.write, Writer.close, os.replace
    calls = {"n": 0}

    def failing_write(self: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise _Injected(f"write {calls['n']}")
        real_write(self, *args, **kwargs)

    total_writes = sum(len(msgs) for msgs in old.values())
    for fail_at in sorted({1, 2, total_writes // 2, total_writes}):
        calls.update(n=0, fail_at=fail_at)
        monkeypatch.setattr(Writer, "write", failing_write)
        with pytest.raises(_Injected):
            _replay(bags["mcap"], out, overwrite=True)
        monkeypatch.setattr(Writer, "write", real_write)
        assert _contents(out) == old and _leftovers(tmp_path) == [], fail_at

    def failing_close(self: Any) -> None:
        real_close(self)
        raise _Injected("close")

    monkeypatch.setattr(Writer, "close", failing_close)
    with pytest.raises(_Injected):
        _replay(bags["mcap"], out, overwrite=True)
    monkeypatch.setattr(Writer, "close", real_close)
    assert _contents(out) == old and _leftovers(tmp_path) == []

    replaced: list[tuple[str, str]] = []

    def failing_replace(src: Any, dst: Any) -> None:
        replaced.append((str(src), str(dst)))
        if Path(dst) == out:  # the old bag is already moved aside, the new one not yet in place
            raise _Injected("rename")
        real_replace(src, dst)

    monkeypatch.setattr(bag_files.os, "replace", failing_replace)
    with pytest.raises(_Injected):
        _replay(bags["mcap"], out, overwrite=True)
    monkeypatch.setattr(bag_files.os, "replace", real_replace)
    assert [Path(dst).name for _, dst in replaced[-2:]] == [
        "previous",
        "out",
    ]  # old moved aside, then the swap
    assert not out.exists() and _leftovers(tmp_path) == []  # no partial bag where the old one was
    _replay(bags["mcap"], out)
    assert _contents(out) == old  # the next run produces the identical bag


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_staging_folder_of_a_killed_run_is_removed_by_the_next_run(
    bags: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{_dead_pid()}-x1y2"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "half.mcap").write_bytes(b"\x89MCAP0\r\n")
    alive = tmp_path / f".out.partial-{os.getpid()}-a1b2"  # a run in progress (this process): kept
    alive.mkdir()
    other = tmp_path / ".other.partial-1-zz"  # another destination's folder: kept
    other.mkdir()
    _replay(bags["mcap"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.partial-1-zz", alive.name, "out"])
    assert OutputStaging(out).remove_stale() == []


# -- signals and kills (child processes) ---------------------------------------------------------
def _driver(marker: Path, bag: Path, out: Path, *, busy: bool = False) -> subprocess.Popen[str]:
    """``llmseg replay-bag`` in a child process (``--overwrite`` when ``out`` exists)."""
    plan = out.parent / "plan.yaml"
    plan.write_text(PLAN)
    args = [sys.executable, str(DRIVER), str(marker), *(["--busy"] if busy else []), "--", str(bag),
            "--instructions", str(plan), "--out", str(out), "--image-topic", COLOUR, "--depth-topic", DEPTH,
            "--camera-info-topic", INFO, "--no-progress", *(["--overwrite"] if out.exists() else [])]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(marker: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the replay never reached a frame"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_with_the_conventional_code_and_leave_no_output(
    bags: dict[str, Path], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = _driver(marker, bags["sqlite3"], out, busy=True)
    try:
        _wait_for(marker, proc)  # the request worker is now inside native code
        time.sleep(0.3)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, output
    assert "terminate called" not in output and f"{out} is not written" in output
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_killed_at_random_points_the_next_run_gives_the_identical_bag(
    bags: dict[str, Path], tmp_path: Path
) -> None:
    bag = write_bag(tmp_path / "long", "sqlite3", frames=8)
    reference = tmp_path / "reference"
    replay_bag(bag, reference, schedule(PLAN), FakeSegmenter(), TOPICS, progress=False)
    expected = _contents(reference)
    out, marker = tmp_path / "out", tmp_path / "marker"
    rng = random.Random(15)
    for attempt in range(3):
        marker.unlink(missing_ok=True)
        proc = _driver(marker, bag, out)
        try:
            _wait_for(marker, proc)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()  # SIGKILL: no cleanup code runs
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not out.exists() or _contents(out) == expected, attempt  # never a partial bag
    marker.unlink(missing_ok=True)
    proc = _driver(marker, bag, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert _contents(out) == expected and _leftovers(tmp_path) == []
