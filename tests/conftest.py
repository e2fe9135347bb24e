"""Shared fixtures: a tiny NExT-Chat model, a predictor, a scene, ROS isolation."""

from __future__ import annotations

import os
import random
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
    from nextchat_ros.scenes import render_scene

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
