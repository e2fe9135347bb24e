"""Launch the nextchat_grounding node.

    ros2 launch nextchat_ros grounding.launch.py
    ros2 launch nextchat_ros grounding.launch.py model_dir:=/models/nextchat device:=cuda:0 \
        image_topic:=/camera/color/image_raw
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("nextchat_ros"), "config", "grounding.yaml")
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
    return LaunchDescription([*args, node])
