"""The real `ros2` tooling (../shared/ros2/install.sh) against the colcon-installed
package: ros2 launch, ros2 run, ros2 topic echo, as a robotics engineer runs them."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from nextchat_ros.synthetic.scenes import render_scene
from tests.conftest import ROOT, VENV, sourced

pytestmark = [pytest.mark.colcon, pytest.mark.ros,
              pytest.mark.skipif(shutil.which("ros2", path=str(VENV / "bin")) is None,
                                 reason="the ros2 command is not installed (../shared/ros2/install.sh VENV)")]
LAUNCH = "ros2 launch nextchat_ros grounding.launch.py"
ARGUMENTS = ("params_file", "model_dir", "backend", "export_dir", "precision", "device", "image_topic",
             "query_topic", "result_topic", "fastdds_profile")
TRACEBACK_SIGNS = ("Traceback", "KeyboardInterrupt", "process has died", "Error")


class Launched:
    """A command of the sourced workspace in a session of its own (so a Ctrl-C can go to
    its whole process group, as a terminal sends it), its output in a file."""

    def __init__(self, workspace, command: str, log_path, cwd=None):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(sourced(workspace, command), cwd=cwd or workspace, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{text!r} never appeared (exit {self.process.returncode}):\n{self.log[-3000:]}")
            time.sleep(0.2)

    def ctrl_c(self, timeout: float = 30.0) -> int:
        """SIGINT to the process group, as a terminal's Ctrl-C; the exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout:.0f} s:\n{self.log[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture(scope="module", autouse=True)
def ros2_daemon(workspace):
    """`ros2 topic` / `ros2 lifecycle` start the ros2 daemon (it keeps the graph, so each
    call needs no discovery of its own); it is stopped when these tests end."""
    yield
    subprocess.run(sourced(workspace, "ros2 daemon stop"), capture_output=True, timeout=60)


@pytest.fixture()
def launch(workspace, tmp_path):
    """Launched(...) for a test; whatever is still running at its end is killed."""
    started = []

    def start(command: str, name: str = "launch", cwd=None) -> Launched:
        started.append(Launched(workspace, command, tmp_path / f"{name}{len(started)}.log", cwd))
        return started[-1]

    yield start
    for launched in started:
        launched.kill()


def test_show_args_lists_every_argument(workspace):
    run = subprocess.run(sourced(workspace, f"{LAUNCH} --show-args"), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for name in ARGUMENTS:
        assert f"'{name}'" in run.stdout, name


def test_launch_remaps_answers_echoes_and_stops_cleanly_on_ctrl_c(launch, workspace, tmp_path):
    """Defaults plus remaps and Fast DDS's own defaults (fastdds_profile:=none): a
    client's query gets its answer on the remapped topic, `ros2 topic echo` shows it,
    and a Ctrl-C to the process group ends everything with status 0, no traceback."""
    import rclpy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from nextchat_ros.msg import GroundingResult
    from nextchat_ros.ros_client import image_msg

    ns = f"/launch_{os.getpid()}"
    launched = launch(f"{LAUNCH} image_topic:={ns}/image_raw query_topic:={ns}/ask "
                      f"result_topic:={ns}/answers fastdds_profile:=none")
    echo = launch(f"ros2 topic echo --once {ns}/answers nextchat_ros/msg/GroundingResult", "echo")
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("launch_test_client", context=context)
    results = []
    try:
        node.create_subscription(GroundingResult, f"{ns}/answers", results.append, 10)
        image_pub = node.create_publisher(Image, f"{ns}/image_raw", 10)
        query_pub = node.create_publisher(String, f"{ns}/ask", 10)
        launched.wait_for("nextchat_grounding ready")
        deadline = time.monotonic() + 30
        # Both the node's inputs and `ros2 topic echo`'s subscription to the results matched first.
        while (image_pub.get_subscription_count() == 0 or query_pub.get_subscription_count() == 0
               or node.count_subscribers(f"{ns}/answers") < 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        scene = render_scene(3, height=240, width=320)
        executor = rclpy.executors.SingleThreadedExecutor(context=context)
        executor.add_node(node)
        for _ in range(3):  # best effort camera QoS: a few frames
            image_pub.publish(image_msg(scene.image, time.time_ns()))
            executor.spin_once(timeout_sec=0.2)
        query_pub.publish(String(data="where is the blue cube?"))
        deadline = time.monotonic() + 60
        while not results and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.2)
        assert results and results[0].status == GroundingResult.STATUS_OK, results
        assert results[0].query == "where is the blue cube?" and len(results[0].objects) == 1
        # `ros2 topic echo --once` prints the first result it gets; ask again until it has one
        # (its subscription may match the node's publisher after the first result went out).
        deadline, asked = time.monotonic() + 60, 1
        while echo.process.poll() is None and time.monotonic() < deadline:
            # A fresh frame with each query: asked after max_image_age (2 s) without
            # one, the query is refused as stale (the echo once printed that refusal).
            image_pub.publish(image_msg(scene.image, time.time_ns()))
            executor.spin_once(timeout_sec=0.2)
            query_pub.publish(String(data="where is the blue cube?"))
            asked += 1
            for _ in range(25):
                executor.spin_once(timeout_sec=0.2)
                if echo.process.poll() is not None:
                    break
        assert echo.wait(10) == 0
        deadline = time.monotonic() + 60  # every query answered before the Ctrl-C below
        while len(results) < asked and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.2)
        assert "query: where is the blue cube?" in echo.log and "status: 0" in echo.log
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        echo.kill()
    status = launched.ctrl_c()
    assert status == 0, launched.log[-3000:]
    assert not [sign for sign in TRACEBACK_SIGNS if sign in launched.log], launched.log[-3000:]


def test_ctrl_c_to_the_process_group_is_clean_every_time(launch, workspace, tmp_path, saved_tiny):
    """The terminal's Ctrl-C reaches the node twice (terminal and launch). Two runs
    here; NEXTCHAT_CTRL_C_RUNS=20 scripts/test.sh -k process_group runs twenty."""
    for _ in range(int(os.environ.get("NEXTCHAT_CTRL_C_RUNS", "2"))):
        launched = launch(f"{LAUNCH} model_dir:={saved_tiny}")
        launched.wait_for("nextchat_grounding ready")
        status = launched.ctrl_c()
        assert status == 0, launched.log[-3000:]
        assert not [sign for sign in TRACEBACK_SIGNS if sign in launched.log], launched.log[-3000:]


def params_file(path, **values):
    params = yaml.safe_load((ROOT / "config/grounding.yaml").read_text())
    params["nextchat_grounding"]["ros__parameters"].update(values)
    path.write_text(yaml.safe_dump(params))
    return path


def test_an_explicit_launch_argument_wins_over_the_params_file(launch, workspace, tmp_path, saved_tiny):
    params = params_file(tmp_path / "params.yaml", device="cuda:7", queue_size=3, model_dir="/nonexistent/model")
    launched = launch(f"{LAUNCH} params_file:={params} device:=cpu model_dir:={saved_tiny}")
    launched.wait_for("nextchat_grounding ready")
    log = launched.log
    assert f"model_dir='{saved_tiny}'" in log and "device='cpu'" in log and "queue_size=3" in log
    assert launched.ctrl_c() == 0, launched.log[-3000:]


def test_every_launch_whose_node_cannot_start_fails_with_one_line(launch, workspace, tmp_path):
    """A params file that sets a bad value wins over the launch file's defaults (before:
    the defaults overwrote its model_dir / device); bad launch arguments and bad params
    files stop the node with one line, and `ros2 launch` exits 1. The launches run at
    once: each pays its imports, and one after another they took a minute."""
    bad_yaml = tmp_path / "bad_yaml.yaml"
    bad_yaml.write_text("nextchat_grounding:\n  ros__parameters:\n    queue_size: [1, 2\n")
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text("nextchat_grounding:\n  ros__parameters:\n    queue_size: eight\n")
    cases = [
        (f"params_file:={params_file(tmp_path / 'params.yaml', device='cuda:7', queue_size=3)}",
         "parameter device='cuda:7'"),
        ("model_dir:=/nonexistent/model", "model directory not found: /nonexistent/model"),
        ("device:=0", "parameter device='0' must be cpu, cuda or cuda:N"),
        ("backend:=onnxruntime", "no export manifest"),
        (f"params_file:={bad_yaml}", "Couldn't parse params file"),
        (f"params_file:={bad_type}", "parameter queue_size='eight' must be an integer"),
    ]
    launched = [launch(f"{LAUNCH} {arguments}", f"case{k}_") for k, (arguments, _) in enumerate(cases)]
    for (arguments, message), run in zip(cases, launched):
        assert run.wait(120) == 1, (arguments, run.log[-3000:])
        assert message in run.log and "Traceback" not in run.log, (arguments, run.log[-3000:])
    for run in launched[:4]:  # the node started and exited with an error (a bad params file stops rcl first)
        assert "exited with status 1" in run.log, run.log[-3000:]


def test_ros2_run_with_the_installed_params_file_from_the_workspace_root(launch, workspace, tmp_path):
    """The README's `ros2 run` line, run where the line before it leaves the user."""
    launched = launch("ros2 run nextchat_ros nextchat_grounding --ros-args --params-file "
                      "\"$(ros2 pkg prefix nextchat_ros)/share/nextchat_ros/config/grounding.yaml\"", "run", workspace)
    launched.wait_for("nextchat_grounding ready")
    assert launched.ctrl_c() == 0, launched.log[-3000:]
    assert "Traceback" not in launched.log



def lifecycle(workspace, verb: str) -> str:
    deadline = time.monotonic() + 30
    while True:  # the daemon may not have seen the node yet: "Node not found"
        run = subprocess.run(sourced(workspace, f"ros2 lifecycle {verb}"), capture_output=True, text=True,
                             timeout=60)
        if run.returncode == 0 or "Node not found" not in run.stderr or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def logged_rss(log: str, state: str) -> float:
    match = re.findall(rf"nextchat_grounding {state}; RSS (\d+) MB", log)
    assert match, f"no {state!r} line in:\n{log[-2000:]}"
    return float(match[-1])


def test_the_lifecycle_node_through_ros2_lifecycle(launch, workspace, tmp_path):
    """configure loads and checks the model, activate serves, deactivate refuses
    (STATUS_INACTIVE), cleanup frees the model; each via `ros2 lifecycle set`."""
    from nextchat_ros.msg import GroundingResult
    from nextchat_ros.ros_client import GroundingClient, image_msg

    launched = launch(f"{LAUNCH} lifecycle:=true autostart:=false")
    launched.wait_for("(managed) unconfigured")
    client = GroundingClient("")
    try:
        assert "unconfigured" in lifecycle(workspace, "get /nextchat_grounding")
        assert "Transitioning successful" in lifecycle(workspace, "set /nextchat_grounding configure")
        assert "Transitioning successful" in lifecycle(workspace, "set /nextchat_grounding activate")
        assert "active" in lifecycle(workspace, "get /nextchat_grounding")
        client.wait_for_node(timeout=60)
        scene = render_scene(4, height=240, width=320)
        stamp = 1_700_000_050_000_000_000
        client.publish_frame(image_msg(scene.image, stamp), settle=0.5)
        assert client.ask("active-1", "where is the cube?").status == GroundingResult.STATUS_OK
        assert "Transitioning successful" in lifecycle(workspace, "set /nextchat_grounding deactivate")
        refused = client.ask("inactive-1", "where is the cube?")
        assert refused.status == GroundingResult.STATUS_INACTIVE and "not active" in refused.error
        assert "Transitioning successful" in lifecycle(workspace, "set /nextchat_grounding cleanup")
        launched.wait_for("cleaned up; RSS")
        configured, inactive = logged_rss(launched.log, "configured"), logged_rss(launched.log, "inactive")
        cleaned = logged_rss(launched.log, "cleaned up")
        print(f"RSS configured {configured:.0f} MB, inactive after a query {inactive:.0f} MB, "
              f"after cleanup {cleaned:.0f} MB")
        assert cleaned < inactive
    finally:
        client.close()
    assert launched.ctrl_c() == 0, launched.log[-3000:]
    assert "Traceback" not in launched.log


def test_the_lifecycle_node_autostarts_to_active(launch, workspace, tmp_path):
    from nextchat_ros.msg import GroundingResult
    from nextchat_ros.ros_client import GroundingClient, image_msg

    launched = launch(f"{LAUNCH} lifecycle:=true")
    launched.wait_for("nextchat_grounding active: serving")
    client = GroundingClient("")
    try:
        client.wait_for_node(timeout=60)
        client.publish_frame(image_msg(render_scene(5, height=240, width=320).image, 1_700_000_060_000_000_000),
                             settle=0.5)
        assert client.ask("auto-1", "where is the ball?").status == GroundingResult.STATUS_OK
    finally:
        client.close()
    assert launched.ctrl_c() == 0, launched.log[-3000:]
