"""Launch the nextchat_grounding node.

    ros2 launch nextchat_ros grounding.launch.py
    ros2 launch nextchat_ros grounding.launch.py model_dir:=/models/nextchat device:=cuda:0 \
        image_topic:=/camera/color/image_raw
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    share = get_package_share_directory("nextchat_ros")
    default_params = os.path.join(share, "config", "grounding.yaml")
    # Fast DDS's default 512 KB shared-memory segment loses most best-effort camera
    # frames above it (640x480 rgb8 is 921 KB); the camera driver needs the same
    # profile (see its comment). An explicit FASTDDS_DEFAULT_PROFILES_FILE wins.
    default_profile = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE",
                                     os.path.join(share, "config", "fastdds_large_images.xml"))
    args = [
        DeclareLaunchArgument("params_file", default_value=default_params, description="parameter YAML"),
        DeclareLaunchArgument("model_dir", default_value="", description="model directory ('' = shipped model)"),
        DeclareLaunchArgument("backend", default_value="torch", description="torch | onnxruntime | tensorrt"),
        DeclareLaunchArgument("export_dir", default_value="",
                              description="`nextchat export` output (empty = model_dir/export)"),
        DeclareLaunchArgument("device", default_value="cpu", description="torch device, e.g. cpu or cuda:0"),
        DeclareLaunchArgument("image_topic", default_value="image", description="camera image topic"),
        DeclareLaunchArgument("query_topic", default_value="query", description="plain-text query topic"),
        DeclareLaunchArgument("result_topic", default_value="result", description="GroundingResult topic"),
        DeclareLaunchArgument("fastdds_profile", default_value=default_profile,
                              description="Fast DDS XML profile for the processes this launch starts"),
    ]
    node = Node(
        package="nextchat_ros",
        executable="nextchat_grounding",
        name="nextchat_grounding",
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "model_dir": LaunchConfiguration("model_dir"),
                "backend": LaunchConfiguration("backend"),
                "export_dir": LaunchConfiguration("export_dir"),
                "device": LaunchConfiguration("device"),
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("query", LaunchConfiguration("query_topic")),
            ("result", LaunchConfiguration("result_topic")),
        ],
    )
    profile = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"))
    return LaunchDescription([*args, profile, node])
