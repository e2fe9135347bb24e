"""Launch the nextchat_grounding node.

    ros2 launch nextchat_ros grounding.launch.py
    ros2 launch nextchat_ros grounding.launch.py model_dir:=/models/nextchat device:=cuda:0 \
        image_topic:=/camera/color/image_raw
    ros2 launch nextchat_ros grounding.launch.py params_file:=my_params.yaml

Parameters: the params file first (default: the package's config/grounding.yaml),
then each of model_dir, backend, export_dir, precision, llm_precision and device given on
the command line. A launch argument left at its default ('') leaves the value to the
params file, so a file's model_dir or device is never overwritten by a default.

The launch ends when the node exits; a node that exits with an error (a bad
parameter, a missing model) makes `ros2 launch` exit with status 1, so scripts and
systemd units can tell.

lifecycle:=true starts the managed node (configure loads the model, activate
serves, deactivate refuses queries, cleanup frees the model); autostart:=true (the
default) takes it to active, autostart:=false leaves it unconfigured for
`ros2 lifecycle set /nextchat_grounding configure` and so on.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
    UnsetEnvironmentVariable,
)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from launch import LaunchDescription

# Node parameters that are also launch arguments; '' (the default) = not given.
PARAMETER_ARGUMENTS = {
    "model_dir": "model directory (default: the params file's; '' there = the shipped model)",
    "backend": "torch | onnxruntime | tensorrt (default: the params file's)",
    "export_dir": "`nextchat export` output (default: the params file's; '' there = model_dir/export)",
    "precision": "what the model runs in: fp32 | fp16 | bf16 (box heads fp32; default: the params file's)",
    "llm_precision": "the LLM's weights: auto | fp32 | fp16 | bf16 | int8 | int4 (default: the params file's)",
    "device": "torch device, e.g. cpu or cuda:0 (default: the params file's)",
}
NO_PROFILE = "none"


def _node_exited(event, context):
    if event.returncode != 0:
        # An exception in a launch event handler is how launch is made to exit non-zero.
        raise RuntimeError(f"nextchat_grounding exited with status {event.returncode}; see its log above")
    if context.is_shutdown:  # launch is already ending (Ctrl-C): a second Shutdown would fail
        return None
    return [EmitEvent(event=Shutdown(reason="nextchat_grounding exited"))]


def _launch_node(context):
    overrides = {name: LaunchConfiguration(name).perform(context) for name in PARAMETER_ARGUMENTS}
    overrides = {name: value for name, value in overrides.items() if value != ""}
    profile = LaunchConfiguration("fastdds_profile").perform(context)
    environment = (UnsetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE") if profile == NO_PROFILE
                   else SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", profile))
    node_arguments = dict(
        package="nextchat_ros",
        executable="nextchat_grounding",
        name="nextchat_grounding",
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), *([overrides] if overrides else [])],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("query", LaunchConfiguration("query_topic")),
            ("result", LaunchConfiguration("result_topic")),
        ],
    )
    managed = _true(LaunchConfiguration("lifecycle").perform(context))
    node = (LifecycleNode(namespace="", arguments=["--managed"], **node_arguments) if managed
            else Node(**node_arguments))
    actions = [environment, node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_node_exited))]
    if managed and _true(LaunchConfiguration("autostart").perform(context)):
        actions += _autostart(node)
    return actions


def _true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes")


def _transition(node, transition_id: int) -> EmitEvent:
    return EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda action: action is node,
                                       transition_id=transition_id))


def _autostart(node) -> list:
    """configure at once, then activate when the node reaches inactive."""
    return [
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, goal_state="inactive",
                                               entities=[_transition(node, Transition.TRANSITION_ACTIVATE)])),
        _transition(node, Transition.TRANSITION_CONFIGURE),
    ]


def generate_launch_description():
    share = get_package_share_directory("nextchat_ros")
    # Fast DDS's default 512 KB shared-memory segment loses most best-effort camera
    # frames above it (640x480 rgb8 is 921 KB); the camera driver needs the same
    # profile (see its comment). An explicit FASTDDS_DEFAULT_PROFILES_FILE wins.
    default_profile = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE",
                                     os.path.join(share, "config", "fastdds_large_images.xml"))
    args = [
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "grounding.yaml"),
                              description="parameter YAML (every parameter: config/grounding.yaml)"),
        *[DeclareLaunchArgument(name, default_value="", description=text)
          for name, text in PARAMETER_ARGUMENTS.items()],
        DeclareLaunchArgument("image_topic", default_value="image", description="camera image topic"),
        DeclareLaunchArgument("query_topic", default_value="query", description="plain-text query topic"),
        DeclareLaunchArgument("result_topic", default_value="result", description="GroundingResult topic"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: the managed (lifecycle) node"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="with lifecycle:=true, take the node to active (false: stay unconfigured)"),
        DeclareLaunchArgument("fastdds_profile", default_value=default_profile,
                              description=f"Fast DDS XML profile for the node ('{NO_PROFILE}': Fast DDS's defaults)"),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_launch_node)])
