"""Helpers of the end-to-end tier: processes in their own group, the ``ros2`` CLI, the peer.

Every ROS process (``ros2 launch``, the nodes, the ``ros2`` CLI, the peer) runs with the
environment of the workspace the session built; the pytest process itself imports no ROS.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEER = HERE / "peer.py"
FAULTY_NODE = HERE / "faulty_node.py"
NS = 1_000_000_000


class RosProcess:
    """A process (and its children) in its own process group, output appended to a log file.

    Ctrl-C in a terminal sends SIGINT to the whole foreground group; :meth:`interrupt` does
    the same. :meth:`stop` ends whatever is left (SIGINT, then SIGTERM, then SIGKILL).
    """

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd = cmd
        self.log = log
        self._file = open(log, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first match of regex ``pattern`` in the output (from offset ``start``)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            match = re.search(pattern, text[start:])
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "running"
                raise AssertionError(
                    f"{pattern!r} not in the output of {' '.join(self.cmd[:4])} ({state}) after "
                    f"{timeout:g} s; output:\n{text[-6000:]}"
                )
            time.sleep(0.1)

    def interrupt(self) -> None:
        """SIGINT to the process group, as Ctrl-C does."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or ``None`` if still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """End the group: SIGINT, SIGTERM, SIGKILL, waiting in between; leaves nothing running."""
        for sig, wait_s in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.1)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()
        self._file.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of the leader still count as members until reaped; check real members
    result = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True)
    return any(state and not state.startswith("Z") for state in result.stdout.split())


SKIPPED_NAMES = {
    ".git",
    "build",
    "install",
    "log",
    "runs",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
}


def copy_checkout(destination: Path) -> None:
    """Copy this checkout to ``destination`` without build outputs, caches and virtual environments."""

    def ignored(directory: str, names: list[str]) -> set[str]:
        return {
            name
            for name in names
            if name in SKIPPED_NAMES
            or name.endswith(".egg-info")
            or (Path(directory, name) / "pyvenv.cfg").exists()
            or (Path(directory, name) / "COLCON_IGNORE").exists()
        }

    shutil.copytree(REPO, destination, ignore=ignored, symlinks=True)


def colcon(ws: Path, verb: str, *args: str) -> list[str]:
    """``colcon <verb>`` on the package in ``ws/src/llmseg_ros`` (build/, install/, log/ in ``ws``)."""
    return [
        "colcon",
        "--log-base",
        str(ws / "log"),
        verb,
        "--paths",
        str(ws / "src" / "llmseg_ros"),
        "--build-base",
        str(ws / "build"),
        "--install-base",
        str(ws / "install"),
        *args,
    ]


def ros2(env: dict[str, str], *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``ros2 <args>``; the result carries stdout + stderr in ``stdout``."""
    try:
        return subprocess.run(
            ["ros2", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(
            f"ros2 {' '.join(args)} did not finish within {timeout:g} s; output:\n{output}"
        ) from None


def shell(env: dict[str, str], command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command line in bash, as a user types it."""
    return subprocess.run(
        ["bash", "-c", command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def lifecycle_state(env: dict[str, str], node: str, timeout: float = 10.0) -> str:
    """``ros2 lifecycle get <node>``: the state label (``active``, ``configuring``, ...)."""
    try:
        result = ros2(env, "lifecycle", "get", node, "--no-daemon", "--spin-time", "1", timeout=timeout)
    except AssertionError:
        return f"<no answer within {timeout:g} s>"
    return result.stdout.strip().split(" ")[0] if result.returncode == 0 else f"<{result.stdout.strip()}>"


def wait_for_state(env: dict[str, str], node: str, state: str, timeout: float, proc: RosProcess) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = lifecycle_state(env, node)
        if seen == state:
            return
        if proc.proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(
        f"{node} is '{seen}', not '{state}', after {timeout:g} s; output:\n{proc.output()[-6000:]}"
    )


def lifecycle_set(env: dict[str, str], node: str, transition: str, timeout: float = 60.0) -> str:
    return ros2(env, "lifecycle", "set", node, transition, "--no-daemon", timeout=timeout).stdout


class Peer:
    """The rclpy peer process (tests/ros/peer.py): camera publisher, subscribers, service client."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._stderr = open(log, "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._answer(60.0)  # ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _answer(self, timeout: float) -> Any:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the test peer gave no answer within {timeout:g} s") from None
        answer = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"test peer: {answer['error']}\n{answer.get('traceback', '')}")
        return answer["ok"]

    def __call__(self, op: str, timeout: float = 120.0, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.poll() is None, "the test peer is not running"
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def publish(self, image_topic: str, stamps_ns: list[int], **args: Any) -> dict[str, int]:
        matched: dict[str, int] = self("publish", image_topic=image_topic, stamps_ns=stamps_ns, **args)[
            "matched"
        ]
        return matched

    def call(
        self, service: str, timeout: float = 120.0, service_type: str = "ReasonSegment", **request: Any
    ) -> dict[str, Any]:
        answer: dict[str, Any] = self(
            "call",
            timeout=timeout + 10,
            service=service,
            type=service_type,
            request=request,
            timeout_s=timeout,
        )
        assert answer.get("answered", True), f"{service} gave no answer within {timeout:g} s"
        return answer

    def call_async(self, service: str, **request: Any) -> int:
        call_id: int = self("call", service=service, request=request, wait=False)["id"]
        return call_id

    def result(self, call_id: int, timeout: float = 120.0) -> dict[str, Any]:
        answer: dict[str, Any] = self("result", timeout=timeout + 10, id=call_id, timeout_s=timeout)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, BrokenPipeError, OSError):
                self("quit", timeout=10.0)
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5.0)
        self._stderr.close()


def stamps(first_s: float, count: int, period_s: float = 0.1) -> list[int]:
    """``count`` header stamps (ns) from ``first_s`` seconds, ``period_s`` apart."""
    return [round((first_s + i * period_s) * NS) for i in range(count)]


def ros_missing() -> str | None:
    """Why the end-to-end tier cannot run here (no sourced ROS 2), or ``None``."""
    if shutil.which("ros2") is None or not os.environ.get("AMENT_PREFIX_PATH"):
        return (
            "no ROS 2 found (no `ros2` on PATH / AMENT_PREFIX_PATH unset): source /opt/ros/$ROS_DISTRO/setup.bash "
            "to run the end-to-end tier"
        )
    return None


requires_ros = pytest.mark.skipif(ros_missing() is not None, reason=ros_missing() or "")
# Marks of every end-to-end test module.
E2E = [requires_ros, pytest.mark.ros, pytest.mark.slow]
