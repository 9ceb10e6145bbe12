"""Start-up: the installed executable, its interpreter, parameters files, and ``colcon test``."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from harness import E2E, colcon, lifecycle_state, ros2, wait_for_state

pytestmark = E2E


def test_symlink_installed_executable_is_found(ros_env) -> None:
    result = ros2(ros_env, "pkg", "executables", "llmseg_ros")
    assert "llmseg_ros perception_node" in result.stdout, result.stdout


def test_launcher_runs_the_python_it_was_built_for(ros_workspace, ros_env, start_process, tmp_path) -> None:
    """A different ``python3`` first on PATH (another venv, conda) must not run the node."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'the python3 first on PATH ran the node' >&2\nexit 97\n")
    fake.chmod(0o755)
    launcher = ros_workspace / "install" / "llmseg_ros" / "lib" / "llmseg_ros" / "perception_node"
    proc = start_process(
        "interpreter",
        [str(launcher), "--ros-args", "-r", "__node:=llmseg_interpreter"],
        PATH=f"{fake.parent}{os.pathsep}{ros_env['PATH']}",
    )
    proc.wait_for_output(r"created; waiting for the lifecycle 'configure' transition", timeout=120)
    proc.interrupt()
    assert proc.wait(timeout=30) == 0, proc.output()[-3000:]


def test_params_file_values_win_unless_a_launch_argument_is_given(ros_env, start_process, tmp_path) -> None:
    params = tmp_path / "mine.yaml"
    params.write_text(
        "/**:\n"
        "  ros__parameters:\n"
        '    device: "cpu"\n'
        "    use_depth: true\n"
        '    profile: "tiny"\n'
        "    request_timeout: 12.5\n"
        "    models:\n"
        '      weights_dir: "/opt/llmseg/weights"\n'
    )
    proc = start_process(
        "params_file",
        [
            "ros2",
            "launch",
            "llmseg_ros",
            "perception.launch.py",
            f"params_file:={params}",
            "node_name:=llmseg_params",
            "autostart:=false",
            "request_timeout:=30",
        ],
    )
    wait_for_state(ros_env, "/llmseg_params", "unconfigured", 120.0, proc)
    for name, expected in (
        ("device", "String value is: cpu"),
        ("use_depth", "Boolean value is: True"),
        ("profile", "String value is: tiny"),
        ("models.weights_dir", "String value is: /opt/llmseg/weights"),
        ("request_timeout", "Double value is: 30.0"),  # the launch argument given wins
    ):
        result = ros2(ros_env, "param", "get", "/llmseg_params", name, "--no-daemon", "--spin-time", "2")
        assert expected in result.stdout, (name, result.stdout)


def test_misspelled_and_mistyped_parameters_are_reported_at_start_up(
    ros_env, start_process, tmp_path
) -> None:
    params = tmp_path / "typo.yaml"
    params.write_text(
        "/**:\n"
        "  ros__parameters:\n"
        '    profile: "tiny"\n'
        '    request_timeout: "soon"\n'  # a string for a number
        "    stamp_tolerance: 1\n"  # an integer for a number: accepted
        "    selection:\n"
        '      stratgy: "top1_iou"\n'  # misspelled
    )
    proc = start_process(
        "typo",
        [
            "ros2",
            "launch",
            "llmseg_ros",
            "perception.launch.py",
            f"params_file:={params}",
            "node_name:=llmseg_typo",
        ],
    )
    proc.wait_for_output(
        r"parameter request_timeout is set to 'soon' \(a string\) at start-up; expected a number", 120
    )
    proc.wait_for_output(
        r"unknown parameter\(s\) 'selection.stratgy' \(did you mean 'selection.strategy'\?\)", 30
    )
    proc.wait_for_output(r"configure failed: ValueError: ", 120)
    assert proc.proc.poll() is None, proc.output()[-3000:]
    assert lifecycle_state(ros_env, "/llmseg_typo") == "unconfigured"
    result = ros2(
        ros_env, "param", "get", "/llmseg_typo", "stamp_tolerance", "--no-daemon", "--spin-time", "2"
    )
    assert "Double value is: 1.0" in result.stdout, result.stdout


def _xunit_counts(path: Path) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }


def test_colcon_test_runs_pytest_on_the_installed_package(ros_workspace, ros_env) -> None:
    """``colcon test``'s pytest imports the installed package, generated interfaces included.

    (The launch test, the other ``colcon test`` test, repeats what test_e2e_node.py checks;
    CI runs it in its own ``colcon test``.)
    """
    ws = ros_workspace
    env = {**ros_env, "PYTEST_ADDOPTS": "-k test_generated_python_interfaces_match_the_definitions"}
    result = subprocess.run(
        colcon(ws, "test", "--event-handlers", "console_direct+", "--ctest-args", "-R", "^pytest$"),
        env=env,
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    counts = _xunit_counts(ws / "build" / "llmseg_ros" / "test_results" / "llmseg_ros" / "pytest.xunit.xml")
    assert counts == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}, (counts, result.stdout[-4000:])
