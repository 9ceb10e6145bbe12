"""Package metadata and interfaces, checked with real ROS 2 tools that install without ROS:
Debian's ``rosidl translate`` + ``rosidl_parser`` for msg/ and srv/, ``catkin_pkg`` for
package.xml, and ``rosbags`` for the message definitions the code builds."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ros_testing import REPO, msg_type

from llmseg_ros.ros.bag_replay import SEGMENTATION_MSG, SEGMENTATION_MSGTYPE

INTERFACES = sorted(
    p.relative_to(REPO).as_posix() for p in [*REPO.glob("msg/*.msg"), *REPO.glob("srv/*.srv")]
)

REQUEST_FIELDS = [
    "instruction",
    "image",
    "stamp",
    "selection_strategy",
    "iop_threshold",
    "return_overlay",
    "explain",
    "conversation_id",
    "track",
    "track_id",
]
RESPONSE_FIELDS = [
    "success",
    "message",
    "mask",
    "frame_stamp",
    "selected",
    "selected_similarity",
    "selected_iop",
    "num_proposals",
    "confidence",
    "method",
    "answer",
    "stage_names",
    "stage_seconds",
    "overlay",
    "track_id",
]
SEGMENTATION_FIELDS = [
    "header",
    "instruction",
    "conversation_id",
    *RESPONSE_FIELDS[2:13],
    "track_id",
    "track_state",
    "track_reason",
]
SEGMENTATION_FIELDS.remove("frame_stamp")
STOP_TRACK_REQUEST_FIELDS = ["track_id", "all"]
STOP_TRACK_RESPONSE_FIELDS = ["success", "message", "stopped"]

# Parses every IDL file given on the command line with rosidl_parser; prints
# {file: {struct: [[member, type, annotations]]}} as JSON.
PARSE_SCRIPT = """
import json, sys
from pathlib import Path
from rosidl_parser.definition import IdlLocator, Message, Service
from rosidl_parser.parser import parse_idl_file
out = {}
for rel in sys.argv[2:]:
    content = parse_idl_file(IdlLocator(Path(sys.argv[1]), Path(rel))).content
    structs = {}
    for element in content.elements:
        msgs = [element] if isinstance(element, Message) else (
            [element.request_message, element.response_message] if isinstance(element, Service) else [])
        for m in msgs:
            structs[m.structure.namespaced_type.name] = [
                [x.name, type(x.type).__name__, [[a.name, repr(a.value)] for a in x.annotations]]
                for x in m.structure.members]
    out[rel] = structs
print(json.dumps(out))
"""


def rosidl() -> str:
    exe = shutil.which("rosidl")
    if exe is None:
        pytest.skip("Debian's rosidl-tools are not installed (apt-get install rosidl-tools python3-rosidl)")
    return exe


def test_rosidl_translates_every_interface_and_rosidl_parser_reads_it(tmp_path: Path) -> None:
    exe = rosidl()
    assert INTERFACES == ["msg/Segmentation.msg", "srv/ReasonSegment.srv", "srv/StopTrack.srv"]
    run = subprocess.run(
        [
            exe,
            "translate",
            "--to",
            "idl",
            "-o",
            str(tmp_path),
            "llmseg_ros",
            *(f"{REPO}:{f}" for f in INTERFACES),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    idl = [str(Path(f).with_suffix(".idl")) for f in INTERFACES]
    missing = [f for f in idl if not (tmp_path / f).is_file()]
    assert not missing, f"rosidl translate wrote no {missing}: {run.stdout}{run.stderr}"
    # rosidl_parser lives with the interpreter the rosidl script runs on.
    interpreter = Path(exe).read_text().splitlines()[0].removeprefix("#!").strip().split()
    parsed = subprocess.run(
        [*interpreter, "-c", PARSE_SCRIPT, str(tmp_path), *idl], capture_output=True, text=True
    )
    assert parsed.returncode == 0, parsed.stderr
    structs = {name: members for f in json.loads(parsed.stdout).values() for name, members in f.items()}
    assert [m[0] for m in structs["ReasonSegment_Request"]] == REQUEST_FIELDS
    assert [m[0] for m in structs["ReasonSegment_Response"]] == RESPONSE_FIELDS
    assert [m[0] for m in structs["Segmentation"]] == SEGMENTATION_FIELDS
    assert [m[0] for m in structs["StopTrack_Request"]] == STOP_TRACK_REQUEST_FIELDS
    assert [m[0] for m in structs["StopTrack_Response"]] == STOP_TRACK_RESPONSE_FIELDS
    threshold = next(m for m in structs["ReasonSegment_Request"] if m[0] == "iop_threshold")
    assert ["default", "{'value': -1.0}"] in threshold[2]  # "unset" must not read as a threshold of 0
    for name, members in structs.items():  # every field is documented
        for member in members:
            assert any(a[0] == "verbatim" for a in member[2]), f"{name}.{member[0]} has no comment"


def test_rosbags_reads_the_same_definitions_the_code_builds() -> None:
    assert list(msg_type("ReasonSegment_Request").__dataclass_fields__)[:-1] == REQUEST_FIELDS
    assert list(msg_type("ReasonSegment_Response").__dataclass_fields__)[:-1] == RESPONSE_FIELDS
    assert list(msg_type(SEGMENTATION_MSGTYPE).__dataclass_fields__)[:-1] == SEGMENTATION_FIELDS
    assert list(msg_type("StopTrack_Request").__dataclass_fields__)[:-1] == STOP_TRACK_REQUEST_FIELDS
    assert list(msg_type("StopTrack_Response").__dataclass_fields__)[:-1] == STOP_TRACK_RESPONSE_FIELDS


def test_embedded_segmentation_definition_matches_msg_file() -> None:
    from rosbags.typesys import get_types_from_msg

    from_file = get_types_from_msg((REPO / "msg" / "Segmentation.msg").read_text(), SEGMENTATION_MSGTYPE)
    assert get_types_from_msg(SEGMENTATION_MSG, SEGMENTATION_MSGTYPE) == from_file


def imported_modules(path: Path) -> set[str]:
    """Top-level modules imported anywhere in a Python file."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


# Python modules that are not ROS packages → their rosdep keys.
PYTHON_KEYS = {
    "numpy": "python3-numpy",
    "yaml": "python3-yaml",
    "cv2": "python3-opencv",
    "pytest": "python3-pytest",
}
ROS_MODULES = {
    "rclpy", "rcl_interfaces", "builtin_interfaces", "std_msgs", "sensor_msgs", "lifecycle_msgs", "message_filters",
    "launch", "launch_ros", "launch_testing", "launch_testing_ros", "ament_index_python", "cv_bridge",
}  # fmt: skip


def test_package_xml_parses_and_lists_what_the_ros_code_imports() -> None:
    from catkin_pkg.package import parse_package

    package = parse_package(str(REPO / "package.xml"))
    package.validate()
    assert (package.name, package.package_format, package.get_build_type()) == (
        "llmseg_ros",
        3,
        "ament_cmake",
    )
    assert [g.name for g in package.member_of_groups] == ["rosidl_interface_packages"]
    buildtool = {d.name for d in package.buildtool_depends}
    run = {d.name for d in package.exec_depends}
    test = {d.name for d in package.test_depends}
    assert {"ament_cmake", "rosidl_default_generators"} <= buildtool
    assert "rosidl_default_runtime" in run
    assert {"launch_testing", "launch_testing_ros", "python3-pytest"} <= test
    assert {"builtin_interfaces", "sensor_msgs", "std_msgs"} <= {d.name for d in package.build_depends}
    ours = {"llmseg_ros", "__future__"}
    stdlib = set(sys.stdlib_module_names)
    for path, allowed in (
        (REPO / "llmseg_ros" / "node.py", run),
        (REPO / "launch" / "perception.launch.py", run),
        (REPO / "tests" / "ros" / "test_perception_launch.py", run | test),
    ):
        for module in sorted(imported_modules(path) - stdlib - ours):
            key = PYTHON_KEYS.get(module, module)
            assert key in allowed, (
                f"{path.relative_to(REPO)} imports {module}; package.xml must depend on {key}"
            )
    for module in ("numpy", "yaml", "cv2"):  # the library, which the node imports
        assert PYTHON_KEYS[module] in run


def test_only_the_node_imports_ros() -> None:
    offenders = []
    for path in sorted((REPO / "llmseg_ros").rglob("*.py")):
        if path.name == "node.py" and path.parent.name == "llmseg_ros":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ROS_MODULES or name in ("llmseg_ros.msg", "llmseg_ros.srv"):
                    offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_cmakelists_generates_every_interface_and_avoids_the_python_install_collision() -> None:
    text = (REPO / "CMakeLists.txt").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "rosidl_generate_interfaces(${PROJECT_NAME}" in code
    assert (
        'GLOB _msg_files RELATIVE "${CMAKE_CURRENT_SOURCE_DIR}" "${CMAKE_CURRENT_SOURCE_DIR}/msg/*.msg"'
        in code
    )
    assert "ament_python_install_package" not in code  # ros2/rosidl_python#141
    assert code.index("rosidl_generate_interfaces(") < code.index("DIRECTORY llmseg_ros/")
    assert 'DESTINATION "${PYTHON_INSTALL_DIR}/${PROJECT_NAME}"' in code
    assert (
        "DESTINATION lib/${PROJECT_NAME}" in code
        and "install(DIRECTORY launch config DESTINATION share" in code
    )
    assert "add_launch_test(tests/ros/test_perception_launch.py" in code
    assert not (REPO / "llmseg_ros" / "msg").exists() and not (REPO / "llmseg_ros" / "srv").exists()


def test_launch_file_builds_its_description() -> None:
    pytest.importorskip(
        "launch_ros", reason="ROS 2 launch_ros is not installed here; the launch file needs ROS 2"
    )
    spec = importlib.util.spec_from_file_location(
        "perception_launch", REPO / "launch" / "perception.launch.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    arguments = {a.name for a in description.get_launch_arguments()}
    assert {
        "namespace",
        "image_topic",
        "depth_topic",
        "camera_info_topic",
        "use_depth",
        "device",
        "weights_dir",
    } <= arguments
    assert {"params_file", "profile", "autostart"} <= arguments


def test_generated_python_interfaces_match_the_definitions() -> None:
    pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed here; needs the colcon-built package")
    srv = pytest.importorskip("llmseg_ros.srv", reason="llmseg_ros.srv is generated by colcon build")
    msg = pytest.importorskip("llmseg_ros.msg", reason="llmseg_ros.msg is generated by colcon build")
    assert list(srv.ReasonSegment.Request.get_fields_and_field_types()) == REQUEST_FIELDS
    assert list(srv.ReasonSegment.Response.get_fields_and_field_types()) == RESPONSE_FIELDS
    assert list(msg.Segmentation.get_fields_and_field_types()) == SEGMENTATION_FIELDS
    assert srv.ReasonSegment.Request().iop_threshold == -1.0
