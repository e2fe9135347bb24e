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


def nextchat_each(*arg_lists, cwd=ROOT) -> list[subprocess.CompletedProcess]:
    """Several independent `nextchat` runs at once (each pays torch's import and a
    model load; run one after another they cost most of these tests' time)."""
    processes = [subprocess.Popen([NEXTCHAT, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in arg_lists]
    done = []
    for args, process in zip(arg_lists, processes):
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess([NEXTCHAT, *map(str, args)], process.returncode, out, err))
    return done


def test_help_explains_the_commands():
    out = nextchat("--help")
    assert out.returncode == 0
    for command in ("ground", "demo"):
        assert command in out.stdout
    ground = nextchat("ground", "--help")
    assert ground.returncode == 0 and "--region" in ground.stdout and "--overlay" in ground.stdout
    assert "--llm-precision" in ground.stdout and "int4" in ground.stdout


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
                        "--mode", "ground", "--json", "--llm-precision", "int8")
    objects = json.loads(grounded.stdout)["objects"]
    assert len(objects) == 1 and objects[0]["phrase"] == "the cup" and len(objects[0]["box_xyxy"]) == 4


def test_ground_errors_are_one_clear_line(saved_tiny, scene, tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    cases = [
        (["--model", saved_tiny, "--image", tmp_path / "missing.png", "--query", "hi"], "image file not found"),
        (["--model", saved_tiny, "--image", image, "--query", "   "], "the query is empty"),
        (["--model", saved_tiny, "--image", image, "--query", "what is [0]?", "--region", "1,2,3"], "four numbers"),
        (["--model", saved_tiny, "--image", image, "--query", "what is [0]?", "--region", "0,0,9999,10"], "outside"),
        (["--model", tmp_path / "no-model", "--image", image, "--query", "hi"], "model directory not found"),
    ]
    for (_, message), out in zip(cases, nextchat_each(*[["ground", *args] for args, _ in cases])):
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_evaluate_one_task_on_its_own_questions(saved_tiny):
    from nextchat_ros.synthetic.samples import TASKS

    helped, out, raycast, refused = nextchat_each(
        ["evaluate", "--help"],  # the choices a user is offered: every task the data makes
        ["evaluate", "--model", saved_tiny, "--task", "pope", "--num-samples", 5, "--json"],
        ["evaluate", "--model", saved_tiny, "--dataset", "raycast", "--task", "rec", "--num-samples", 3, "--json"],
        ["evaluate", "--model", saved_tiny, "--task", "juggling"])
    assert helped.returncode == 0 and "{" + ",".join(TASKS) + "}" in helped.stdout, helped.stdout
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["task_counts"] == {"pope": 5} and 0.0 <= metrics["pope_accuracy"] <= 1.0
    assert raycast.returncode == 0, raycast.stderr
    assert json.loads(raycast.stdout)["task_counts"] == {"rec": 3} and "raycast" in helped.stdout
    assert refused.returncode != 0 and "invalid choice" in refused.stderr
