"""pip install for the quick start (a venv without ROS).

In a ROS workspace colcon builds this package with CMake instead (package.xml
says ament_cmake), because only CMake can generate the msg/srv interfaces; see
CMakeLists.txt. scripts/bootstrap.sh generates the interfaces into the venv and
then installs this file in editable mode.
"""

from setuptools import find_packages, setup

setup(
    name="nextchat_ros",
    version="0.1.0",
    description="NExT-Chat (pixel2emb) grounding for ROS 2: answers, boxes and masks",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nextchat_ros", "nextchat_ros.*"])
    + find_packages("training", include=["nextchat_training", "nextchat_training.*"])
    + find_packages("export", include=["nextchat_export", "nextchat_export.*"]),
    package_dir={"nextchat_training": "training/nextchat_training", "nextchat_export": "export/nextchat_export"},
    package_data={"nextchat_ros": ["assets/**/*"]},
    entry_points={
        "console_scripts": [
            "nextchat = nextchat_ros.cli:main",
            "nextchat_grounding = nextchat_ros.node:main",
        ]
    },
)
