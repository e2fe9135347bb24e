"""The `nextchat` command line, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import ROOT

NEXTCHAT = str(Path(sys.executable).parent / "nextchat")


def nextchat(*args, cwd=ROOT):
    return subprocess.run([NEXTCHAT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_explains_the_commands():
    out = nextchat("--help")
    assert out.returncode == 0
    for command in ("ground", "demo"):
        assert command in out.stdout
    ground = nextchat("ground", "--help")
    assert ground.returncode == 0 and "--region" in ground.stdout and "--overlay" in ground.stdout


def test_ground_json_and_overlay(saved_tiny, scene, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    overlay = tmp_path / "overlay.png"
    out = nextchat("ground", "--model", saved_tiny, "--image", image, "--query", "describe [0].",
                   "--region", "10,10,60,50", "--json", "--overlay", overlay, "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == "generate" and isinstance(result["answer"], str)
    assert {"set_image_ms", "ask_ms"} <= set(result["timings_ms"])
    assert np.asarray(Image.open(overlay)).shape == scene.image.shape
    grounded = nextchat("ground", "--model", saved_tiny, "--image", image, "--query", "where is the cup?",
                        "--mode", "ground", "--json")
    objects = json.loads(grounded.stdout)["objects"]
    assert len(objects) == 1 and objects[0]["phrase"] == "the cup" and len(objects[0]["box_xyxy"]) == 4


def test_ground_errors_are_one_clear_line(saved_tiny, scene, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    cases = [
        (["--image", tmp_path / "missing.png", "--query", "hi"], "image file not found"),
        (["--image", image, "--query", "   "], "the query is empty"),
        (["--image", image, "--query", "what is [0]?", "--region", "1,2,3"], "four numbers"),
        (["--image", image, "--query", "what is [0]?", "--region", "0,0,9999,10"], "outside"),
    ]
    for args, message in cases:
        out = nextchat("ground", "--model", saved_tiny, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = nextchat("ground", "--model", tmp_path / "no-model", "--image", image, "--query", "hi")
    assert out.returncode == 2 and "model directory not found" in out.stderr


def test_evaluate_one_task_on_its_own_questions(saved_tiny):
    from nextchat_training.data import TASKS

    helped = nextchat("evaluate", "--help")  # the choices a user is offered: every task the data makes
    assert helped.returncode == 0 and "{" + ",".join(TASKS) + "}" in helped.stdout, helped.stdout
    out = nextchat("evaluate", "--model", saved_tiny, "--task", "pope", "--num-samples", 5, "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["task_counts"] == {"pope": 5} and 0.0 <= metrics["pope_accuracy"] <= 1.0
    refused = nextchat("evaluate", "--model", saved_tiny, "--task", "juggling")
    assert refused.returncode != 0 and "invalid choice" in refused.stderr
