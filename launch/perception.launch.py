"""Launch the llmseg_ros perception node (a lifecycle node), configured and activated.

    ros2 launch llmseg_ros perception.launch.py
    ros2 launch llmseg_ros perception.launch.py namespace:=robot1 use_depth:=true \
        image_topic:=/camera/color/image_raw depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/aligned_depth_to_color/camera_info weights_dir:=/path/to/weights
    ros2 launch llmseg_ros perception.launch.py profile:=tiny    # tiny random models (demo)

The service is ``reason_segment`` relative to the namespace (``/reason_segment`` by
default, ``/robot1/reason_segment`` with ``namespace:=robot1``).
"""

import os

import lifecycle_msgs.msg
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue

ARGUMENTS = (
    ("namespace", "", "namespace of the node, its topics and its service"),
    ("node_name", "llmseg_perception", "name of the node"),
    ("image_topic", "/camera/color/image_raw", "colour image topic (sensor_msgs/Image)"),
    ("depth_topic", "/camera/aligned_depth_to_color/image_raw", "depth image registered to the colour image"),
    ("camera_info_topic", "/camera/aligned_depth_to_color/camera_info", "CameraInfo of the depth image"),
    ("use_depth", "false", "subscribe to depth + camera_info and publish masked depth and points"),
    ("device", "auto", "cpu, cuda, cuda:N or auto"),
    ("weights_dir", "", "directory of the trained llmseg_ros weights"),
    ("profile", "", "'' = models from the parameters file; 'tiny' = tiny random models (demo/tests)"),
    ("autostart", "true", "configure and activate the lifecycle node right away"),
    ("log_level", "info", "logging level of the node"),
)


def default_params_file() -> str:
    """The package's ``config/perception.yaml`` (installed share, else next to this file in a checkout)."""
    try:
        share = get_package_share_directory("llmseg_ros")
    except PackageNotFoundError:
        share = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(share, "config", "perception.yaml")


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=value, description=text) for name, value, text in ARGUMENTS
    ]
    declared.append(
        DeclareLaunchArgument(
            "params_file",
            default_value=default_params_file(),
            description="parameters file (config/perception.yaml)",
        )
    )
    node = LifecycleNode(
        package="llmseg_ros",
        executable="perception_node",
        name=LaunchConfiguration("node_name"),
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
                "models.weights_dir": ParameterValue(LaunchConfiguration("weights_dir"), value_type=str),
                "use_depth": ParameterValue(LaunchConfiguration("use_depth"), value_type=bool),
                "profile": ParameterValue(LaunchConfiguration("profile"), value_type=str),
            },
        ],
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
    return LaunchDescription([*declared, node, activate, configure])
