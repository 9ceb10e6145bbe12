"""The README's ROS 2 instructions: an install path that works under PEP 668 (Ubuntu 24.04,
Jazzy), and QoS statements that match the node's defaults."""

from __future__ import annotations

import re

from ros_testing import REPO

SENSOR_DATA_DEPTH = 5  # rclpy.qos.qos_profile_sensor_data: best effort, volatile, keep last 5


def ros_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## ROS 2\n") : text.index("### Topics and service")]


def quick_start_commands() -> list[str]:
    block = ros_section().split("### Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [
        line.strip()
        for line in block.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_quick_start_installs_pip_packages_only_into_a_venv_that_sees_the_ros_packages() -> None:
    commands = quick_start_commands()
    venv = next((i for i, c in enumerate(commands) if "python3 -m venv --system-site-packages" in c), None)
    assert venv is not None, "the ROS quick start creates no venv that sees the system's ROS packages"
    assert "source .venv/bin/activate" in commands[venv] and "COLCON_IGNORE" in commands[venv]
    pip = [i for i, c in enumerate(commands) if re.search(r"\bpip3? install\b", c)]
    assert pip and all(i > venv for i in pip), commands
    assert not any("--break-system-packages" in c or "--user" in c for c in commands)
    build = next(i for i, c in enumerate(commands) if "colcon build" in c)
    assert build > venv and "python3 -m colcon build" in commands[build]  # the venv's Python builds it


def test_package_xml_has_no_rosdep_pip_keys() -> None:
    """A ``*-pip`` key makes ``rosdep install`` run pip on the system Python, which PEP 668 refuses."""
    keys = re.findall(r"<(?:exec_|build_|test_)?depend>([^<]+)</", (REPO / "package.xml").read_text())
    assert keys and not [k for k in keys if k.endswith("-pip")]


def test_qos_paragraph_matches_the_node_defaults() -> None:
    from llmseg_ros.ros.params import INPUTS, NodeSettings

    section = ros_section()
    qos = section[section.index("**QoS.**") :]
    settings = NodeSettings()
    assert all(settings.input_qos(name) == ("best_effort", SENSOR_DATA_DEPTH) for name in INPUTS)
    assert re.search(r"sensor-data profile: best effort, volatile,\s+keep last 5", qos)
    assert re.search(r"outputs are published\s+reliable, volatile, keep last 1", qos)
    assert re.search(r"transient-local\s+\(\"latched\"\) subscriber does not", qos)


def test_parameter_table_is_the_generated_one() -> None:
    from llmseg_ros.ros.params import parameter_table_markdown

    assert parameter_table_markdown() in (REPO / "README.md").read_text(), (
        "README's parameter table is out of date; regenerate it with "
        "llmseg_ros.ros.params.parameter_table_markdown()"
    )
