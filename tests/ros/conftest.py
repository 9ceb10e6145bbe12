"""Fixtures of the end-to-end tier (tests/ros/test_e2e_*.py).

The session builds the package once with colcon (``--symlink-install``, tests enabled)
in a temporary workspace, from a copy of this checkout in its ``src/``
(CMake refuses a build whose include directories lie inside the source tree, which they
do when the Python running the tests lives in a virtual environment inside the checkout),
with the Python that runs pytest, and runs every ROS process
with that workspace sourced, on a ROS domain of its own (derived from the pid, so
parallel sessions do not hear each other).

Set ``LLMSEG_ROS_TEST_WORKSPACE`` to a directory to build there instead (colcon then
rebuilds only what changed, so repeated runs start faster).

The tier needs a sourced ROS 2 (``source /opt/ros/$ROS_DISTRO/setup.bash``) and colcon;
without ROS 2 it is skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Peer, RosProcess, colcon, copy_checkout

# A launch_testing file, run by `colcon test` (CI runs it), not by pytest.
collect_ignore = ["test_perception_launch.py"]


def ros_domain_id() -> int:
    """A ROS domain for this test session: ``LLMSEG_ROS_TEST_DOMAIN_ID`` when set, else 50-99
    from the pid (0-101 are safe on Linux)."""
    given = os.environ.get("LLMSEG_ROS_TEST_DOMAIN_ID")
    return int(given) if given else 50 + os.getpid() % 50


def _python_path() -> str:
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def ros_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A colcon workspace with this checkout built (symlink install, tests enabled); its root."""
    probe = subprocess.run([sys.executable, "-c", "import rclpy"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(
            f"ROS 2 is sourced but rclpy does not import in {sys.executable}:\n{probe.stderr[-2000:]}"
        )
    if shutil.which("colcon", path=_python_path()) is None:
        pytest.fail("ROS 2 is sourced but colcon is missing: pip install colcon-common-extensions")
    given = os.environ.get("LLMSEG_ROS_TEST_WORKSPACE")
    ws = Path(given) if given else tmp_path_factory.mktemp("colcon_ws")
    src = ws / "src" / "llmseg_ros"
    shutil.rmtree(src, ignore_errors=True)
    copy_checkout(src)
    env = {**os.environ, "PATH": _python_path()}
    cmd = colcon(
        ws,
        "build",
        "--symlink-install",
        "--cmake-args",
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DPYTHON_EXECUTABLE={sys.executable}",
        "-DBUILD_TESTING=ON",
    )
    result = subprocess.run(cmd, env=env, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        pytest.fail(f"colcon build failed ({result.returncode}):\n{result.stdout[-8000:]}")
    return ws


@pytest.fixture(scope="session")
def ros_env(
    ros_workspace: Path, tiny_profile_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The environment of every ROS process: the workspace sourced, an own domain, the tiny models."""
    result = subprocess.run(
        ["bash", "-c", 'source "$1/setup.bash" && env -0', "_", str(ros_workspace / "install")],
        env={**os.environ, "PATH": _python_path()},
        stdout=subprocess.PIPE,
        check=True,
    )
    env = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    env.update(
        ROS_DOMAIN_ID=str(ros_domain_id()),
        ROS_LOG_DIR=str(tmp_path_factory.mktemp("ros_log")),
        RCUTILS_COLORIZED_OUTPUT="0",
        PYTHONUNBUFFERED="1",
        LLMSEG_CACHE=str(tiny_profile_dir.parent),  # the node's tiny profile: the one this session built
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@pytest.fixture(scope="session")
def ros_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ros_processes")


@pytest.fixture(scope="module")
def start_process(ros_env: dict[str, str], ros_logs: Path) -> Iterator[Callable[..., RosProcess]]:
    """``start_process(name, cmd, **env)``: a process in its own group; those a test module
    started are stopped when the module ends (a node left running would slow every later
    test and hold its memory)."""
    started: list[RosProcess] = []

    def start(name: str, cmd: list[str], **extra_env: str) -> RosProcess:
        proc = RosProcess(cmd, {**ros_env, **extra_env}, ros_logs / f"{name}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    subprocess.run(
        ["ros2", "daemon", "stop"],
        env=ros_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )


@pytest.fixture(scope="session")
def peer(ros_env: dict[str, str], ros_logs: Path) -> Iterator[Peer]:
    client = Peer(ros_env, ros_logs / "peer.log")
    yield client
    client.close()
