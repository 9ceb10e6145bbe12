"""Launch the llmseg_ros perception node (a lifecycle node), configured and activated.

    ros2 launch llmseg_ros perception.launch.py
    ros2 launch llmseg_ros perception.launch.py namespace:=robot1 use_depth:=true \
        image_topic:=/camera/color/image_raw depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/aligned_depth_to_color/camera_info weights_dir:=/path/to/weights
    ros2 launch llmseg_ros perception.launch.py profile:=tiny    # tiny random models (demo)
    ros2 launch llmseg_ros perception.launch.py --show-args       # every argument

Parameters come from ``params_file`` (default: the package's ``config/perception.yaml``).
A launch argument that names a parameter (``device``, ``use_depth``, ``precompute``, ...)
sets it only when given on the command line; left out, the params file's value applies.

The service is ``reason_segment`` relative to the namespace (``/reason_segment`` by
default, ``/robot1/reason_segment`` with ``namespace:=robot1``).
"""

import os

import lifecycle_msgs.msg
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState

# Arguments of the launch itself: (name, default, description).
ARGUMENTS = (
    ("namespace", "", "namespace of the node, its topics and its service"),
    ("node_name", "llmseg_perception", "name of the node"),
    ("image_topic", "/camera/color/image_raw", "colour image topic (sensor_msgs/Image)"),
    ("depth_topic", "/camera/aligned_depth_to_color/image_raw", "depth image registered to the colour image"),
    ("camera_info_topic", "/camera/aligned_depth_to_color/camera_info", "CameraInfo of the depth image"),
    ("autostart", "true", "configure and activate the lifecycle node right away"),
    ("log_level", "info", "logging level of the node"),
)

# Arguments that set one node parameter each, only when given: (name, parameter, type, description).
PARAMETER_ARGUMENTS = (
    ("profile", "profile", str, "'tiny' = tiny random models (demo/tests); '' = models from the parameters"),
    ("method", "method", str, "llmseg, lisa, grounded, vlm_grounding or vlm_marks"),
    ("device", "device", str, "cpu, cuda, cuda:N or auto"),
    ("weights_dir", "models.weights_dir", str, "directory of the trained llmseg_ros weights"),
    ("use_depth", "use_depth", bool, "subscribe to depth + camera_info; publish masked depth and points"),
    ("precompute", "precompute", bool, "compute the proposals of each new frame in the background"),
    ("publish_overlay", "publish_overlay", bool, "publish the bgr8 overlay topic"),
    ("request_timeout", "request_timeout", float, "seconds one request may take"),
    ("image_reliability", "qos.image.reliability", str, "image subscription QoS: best_effort or reliable"),
    ("depth_reliability", "qos.depth.reliability", str, "depth subscription QoS: best_effort or reliable"),
    (
        "camera_info_reliability",
        "qos.camera_info.reliability",
        str,
        "camera_info subscription QoS: best_effort or reliable",
    ),
)
NOT_GIVEN = ""


def default_params_file() -> str:
    """The package's ``config/perception.yaml`` (installed share, else next to this file in a checkout)."""
    try:
        share = get_package_share_directory("llmseg_ros")
    except PackageNotFoundError:
        share = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(share, "config", "perception.yaml")


def _typed(argument: str, text: str, value_type: type) -> object:
    """The value of launch argument ``argument``, converted to its parameter's type."""
    if value_type is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"launch argument {argument}:={text!r} must be true or false")
        return text.lower() == "true"
    if value_type is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"launch argument {argument}:={text!r} must be a number") from None
    return text


def given_parameters(context: LaunchContext) -> dict[str, object]:
    """Node parameters set by the launch arguments given on the command line."""
    given = {}
    for argument, parameter, value_type, _ in PARAMETER_ARGUMENTS:
        text = LaunchConfiguration(argument).perform(context)
        if text != NOT_GIVEN:
            given[parameter] = _typed(argument, text, value_type)
    return given


def _node_and_lifecycle(context: LaunchContext) -> list:
    given = given_parameters(context)
    node = LifecycleNode(
        package="llmseg_ros",
        executable="perception_node",
        name=LaunchConfiguration("node_name"),
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        # the params file first; the arguments given on the command line after it win
        parameters=[LaunchConfiguration("params_file"), *([given] if given else [])],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("depth", LaunchConfiguration("depth_topic")),
            ("camera_info", LaunchConfiguration("camera_info_topic")),
        ],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    autostart = IfCondition(LaunchConfiguration("autostart"))
    configure = EmitEvent(
        event=ChangeState(
            lifecycle_node_matcher=matches_action(node),
            transition_id=lifecycle_msgs.msg.Transition.TRANSITION_CONFIGURE,
        ),
        condition=autostart,
    )
    activate = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=node,
            start_state="configuring",
            goal_state="inactive",
            entities=[
                EmitEvent(
                    event=ChangeState(
                        lifecycle_node_matcher=matches_action(node),
                        transition_id=lifecycle_msgs.msg.Transition.TRANSITION_ACTIVATE,
                    )
                )
            ],
        ),
        condition=autostart,
    )
    return [node, activate, configure]


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=value, description=text) for name, value, text in ARGUMENTS
    ]
    declared += [
        DeclareLaunchArgument(
            name,
            default_value=NOT_GIVEN,
            description=f"{text} (sets parameter {parameter}; not given = the params file's value)",
        )
        for name, parameter, _, text in PARAMETER_ARGUMENTS
    ]
    declared.append(
        DeclareLaunchArgument(
            "params_file",
            default_value=default_params_file(),
            description="parameters file (config/perception.yaml)",
        )
    )
    return LaunchDescription([*declared, OpaqueFunction(function=_node_and_lifecycle)])
