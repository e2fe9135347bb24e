"""`colcon build` of a workspace holding this repository gives what `ros2 launch`
and `ros2 run` look for, and the installed node starts with a parameter file."""

import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, sourced

pytestmark = [pytest.mark.colcon, pytest.mark.ros]
def test_install_tree_has_what_ros2_launch_and_run_need(workspace):
    prefix = workspace / "install" / "nextchat_ros"
    assert (prefix / "share/ament_index/resource_index/packages/nextchat_ros").is_file()
    assert (prefix / "share/nextchat_ros/package.xml").is_file()
    assert (prefix / "share/nextchat_ros/launch/grounding.launch.py").is_file()
    assert (prefix / "share/nextchat_ros/config/grounding.yaml").is_file()
    assert (prefix / "share/nextchat_ros/config/fastdds_large_images.xml").is_file()
    for exe in ("nextchat_grounding", "nextchat"):
        path = prefix / "lib/nextchat_ros" / exe
        assert path.stat().st_mode & stat.S_IXUSR, exe
        assert path.read_text().splitlines()[0] == f"#!{sys.executable}"
    site = prefix / f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/nextchat_ros"
    assert (site / "predictor.py").is_file() and (site / "msg" / "__init__.py").is_file()
    assert (site / "assets/tokenizers/tiny/tokenizer.json").is_file()
    # our __init__ (which also finds the generated modules) replaced rosidl's empty one
    assert "extend_path" in (site / "__init__.py").read_text()
    compile(( prefix / "share/nextchat_ros/launch/grounding.launch.py").read_text(), "launch", "exec")


def test_installed_node_reads_its_parameter_file(workspace, tmp_path, saved_tiny):
    import rclpy
    from rcl_interfaces.srv import GetParameters

    params = yaml.safe_load((ROOT / "config/grounding.yaml").read_text())
    values = params["nextchat_grounding"]["ros__parameters"]
    values.update(queue_size=3, mode="ground", max_image_age=0.5, publish_masks=False, model_dir=str(saved_tiny))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    exe = workspace / "install/nextchat_ros/lib/nextchat_ros/nextchat_grounding"
    node = subprocess.Popen(sourced(workspace, f"'{exe}' --ros-args --params-file '{params_file}'"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        client_node = rclpy.create_node("nextchat_test_param_client", context=context)
        client = client_node.create_client(GetParameters, "/nextchat_grounding/get_parameters")
        assert client.wait_for_service(timeout_sec=60), "the node's parameter service never appeared"
        names = ["queue_size", "mode", "max_image_age", "publish_masks", "backend", "model_dir"]
        future = client.call_async(GetParameters.Request(names=names))
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(client_node)
        deadline = time.monotonic() + 30
        while not future.done() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.2)
        got = future.result().values
        assert [got[0].integer_value, got[1].string_value, got[2].double_value, got[3].bool_value,
                got[4].string_value, got[5].string_value] == [3, "ground", 0.5, False, "torch", str(saved_tiny)]
        client_node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        node.send_signal(signal.SIGINT)
        out, _ = node.communicate(timeout=30)
    assert node.returncode == 0, out
    assert "queue_size=3" in out


def test_bad_parameters_stop_the_node_with_a_clear_error(workspace, tmp_path):
    """Each bad parameter stops the installed node with a line naming it (the runs go at
    once: each pays its imports)."""
    cases = [
        ("-p backend:=cuda-magic", "parameter backend='cuda-magic' must be one of"),
        ("-p model_dir:=/nonexistent/model", "model directory not found: /nonexistent/model"),
        ("-p queue_size:=0", "queue_size=0 must be >= 1"),
        ("-p image_qos:=fast", "parameter image_qos='fast' must be one of"),
        ("-p backend:=onnxruntime", "no export manifest"),
    ]
    exe = workspace / "install/nextchat_ros/lib/nextchat_ros/nextchat_grounding"
    config = workspace / "install/nextchat_ros/share/nextchat_ros/config/grounding.yaml"
    runs = [subprocess.Popen(sourced(workspace, f"'{exe}' --ros-args --params-file '{config}' {override}"),
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for override, _ in cases]
    try:
        outputs = [run.communicate(timeout=120)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
    for (override, message), run, output in zip(cases, runs, outputs):
        assert run.returncode != 0, (override, output)
        assert message in output and "Traceback" not in output, (override, output)
