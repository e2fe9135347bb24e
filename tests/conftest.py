"""Shared fixtures: a tiny NExT-Chat model, a predictor, a scene, ROS isolation."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Every test run gets a DDS domain of its own and stays on this machine, so
# parallel runs (and CI) never hear each other.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 100)))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOG_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "nextchat_ros_test_logs"))
# Shared memory big enough for camera frames (see the profile for why).
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(ROOT / "config" / "fastdds_large_images.xml"))


@pytest.fixture(scope="session")
def tiny_model():
    from nextchat_ros.model import build_model

    return build_model("tiny", seed=0).eval()


@pytest.fixture(scope="session")
def scene():
    from nextchat_ros.synthetic.scenes import render_scene

    return render_scene(7, height=120, width=160)


@pytest.fixture()
def predictor(tiny_model, scene):
    from nextchat_ros.predictor import NextChatPredictor

    p = NextChatPredictor(tiny_model)
    p.set_image(scene.image)
    return p


@pytest.fixture(scope="session")
def saved_tiny(tiny_model, tmp_path_factory):
    from nextchat_ros.model import save_pretrained

    directory = tmp_path_factory.mktemp("tiny_model")
    save_pretrained(tiny_model, directory)
    return directory


def random_image(height=96, width=128, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


VENV = Path(sys.prefix)
_WORKSPACE_IGNORE = shutil.ignore_patterns(".venv", ".venv-numpy1", ".git", "build", "install", "log", "out",
                                           "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A colcon workspace holding this repository, built once for every test that needs it."""
    ws = tmp_path_factory.mktemp("colcon_ws")
    shutil.copytree(ROOT, ws / "src" / "nextchat_ros", ignore=_WORKSPACE_IGNORE)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV),
               PATH=f"{VENV / 'bin'}:{os.environ['PATH']}")
    build = subprocess.run(
        [str(VENV / "bin" / "colcon"), "build", "--event-handlers", "console_direct-",
         "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return ws


def sourced(workspace, command: str) -> list[str]:
    """``command`` in a shell that sourced the workspace, as a user's terminal does (with
    this venv's `ros2` on PATH, where an apt install has /opt/ros/<distro>)."""
    underlay = f"export PATH='{VENV / 'bin'}':\"$PATH\" AMENT_PREFIX_PATH='{VENV}'"
    return ["bash", "-c", f"{underlay} && source '{workspace}/install/setup.bash' && exec {command}"]
