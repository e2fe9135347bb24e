"""Evaluation bags: written by `nextchat bag record`, read back by rosbags and by
the mcap package's own reader, replayed through the real node process, scored
live and offline, and damaged bags handled without losing what was scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

NEXTCHAT = [sys.executable, "-m", "nextchat_ros.cli"]


def nextchat(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*NEXTCHAT, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


@pytest.fixture(scope="module")
def synthetic_bag(tmp_path_factory) -> Path:
    bag = tmp_path_factory.mktemp("bags") / "heldout8"
    done = nextchat("bag", "record", "--dataset", "synthetic", "--count", 8, "--camera-rate", 4,
                    "--query-period", 0.5, "--out", bag)
    assert done.returncode == 0, done.stderr
    assert "wrote 8 queries and 16 frames" in done.stdout
    return bag


def test_recorded_bag_reads_back_with_rosbags(synthetic_bag):
    from rosbags.highlevel import AnyReader

    from nextchat_ros.bag.io import typestore
    from nextchat_ros.ros_images import mono8_mask, stamp_to_ns
    from nextchat_ros.synthetic.evaluate import EVAL_TASK_WEIGHTS
    from nextchat_ros.synthetic.samples import SyntheticTabletop

    stream = SyntheticTabletop("heldout", EVAL_TASK_WEIGHTS)
    with AnyReader([synthetic_bag], default_typestore=typestore()) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == {"/camera/image_raw": "sensor_msgs/msg/Image",
                         "/camera/camera_info": "sensor_msgs/msg/CameraInfo",
                         "/nextchat/structured_query": "nextchat_ros/msg/Query",
                         "/nextchat/truth": "nextchat_ros/msg/QueryTruth"}
        messages = {t: [] for t in types}
        for connection, t, raw in reader.messages():
            messages[connection.topic].append((t, reader.deserialize(raw, connection.msgtype)))
    assert [len(messages[t]) for t in types] == [16, 16, 8, 8]
    frames = {stamp_to_ns(m.header.stamp): m for _, m in messages["/camera/image_raw"]}
    for k, ((t_query, query), (_, truth)) in enumerate(zip(messages["/nextchat/structured_query"],
                                                            messages["/nextchat/truth"], strict=True)):
        scene, sample = stream.item(k)
        assert query.id == truth.query_id == f"q{k:05d}" and query.text == sample.question
        stamp = stamp_to_ns(query.image_stamp)
        assert stamp < t_query and stamp in frames  # the query names a frame recorded before it
        image = frames[stamp]
        pixels = np.asarray(image.data, np.uint8).reshape(image.height, image.step)[:, :image.width * 3]
        assert np.array_equal(pixels.reshape(scene.image.shape), scene.image)
        assert truth.task == sample.task and truth.answer == sample.answer
        assert len(truth.boxes) == len(sample.answer_objects)
        for roi, obj in zip(truth.boxes, sample.answer_objects, strict=True):
            assert abs(roi.x_offset - obj.box[0]) <= 0.5 and abs(roi.x_offset + roi.width - obj.box[2]) <= 0.5
        for mask_msg, obj in zip(truth.masks, sample.answer_objects, strict=True):
            assert np.array_equal(mono8_mask(mask_msg), obj.mask)


def test_recorded_bag_reads_back_with_the_mcap_reader(synthetic_bag):
    from mcap.reader import make_reader

    files = list(synthetic_bag.glob("*.mcap"))
    assert len(files) == 1
    with open(files[0], "rb") as stream:
        reader = make_reader(stream)
        summary = reader.get_summary()
        schemas = {s.name for s in summary.schemas.values()}
        assert {"sensor_msgs/msg/Image", "nextchat_ros/msg/Query", "nextchat_ros/msg/QueryTruth"} <= schemas
        assert all(s.encoding == "ros2msg" for s in summary.schemas.values())
        counts = {}
        last = 0
        for _, channel, message in reader.iter_messages(log_time_order=False):
            counts[channel.topic] = counts.get(channel.topic, 0) + 1
            assert message.log_time >= last  # written in time order
            last = message.log_time
    assert counts == {"/camera/image_raw": 16, "/camera/camera_info": 16, "/nextchat/structured_query": 8,
                      "/nextchat/truth": 8}


def test_sqlite3_storage(tmp_path):
    from nextchat_ros.bag.io import bag_info, read_messages

    bag = tmp_path / "sq"
    done = nextchat("bag", "record", "--count", 3, "--storage", "sqlite3", "--out", bag)
    assert done.returncode == 0, done.stderr
    assert list(bag.glob("*.db3"))
    info = bag_info(bag)
    assert info.storage == "sqlite3" and info.counts["/nextchat/structured_query"] == 3
    assert sum(1 for _ in read_messages(bag)) == info.counts["/camera/image_raw"] * 2 + 6


def read_rows(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_live_replay_through_the_node_scores_like_offline(synthetic_bag, tmp_path):
    out = tmp_path / "eval"
    done = nextchat("bag", "eval", "--bag", synthetic_bag, "--compare", "--rate", 2.0, "--out", out, "--json")
    assert done.returncode == 0, done.stderr + (out / "node.log").read_text()
    metrics = json.loads(done.stdout)
    live, offline = metrics["live"], metrics["offline"]
    for run in (live, offline):
        assert run["queries"] == 8 and run["answered"] == 8 and run["dropped"] == 0
        assert run["status_counts"] == {"OK": 8}
        assert set(run["latency_ms"]) >= {"p50", "p95", "p99"}
        assert run["scores"]["task_counts"] == offline["scores"]["task_counts"]
    # The same frames and queries give the same answers whichever way they travel.
    assert metrics["live_minus_offline"]["score_differences"] == {}
    live_rows, offline_rows = read_rows(out / "queries_live.jsonl"), read_rows(out / "queries_offline.jsonl")
    assert live_rows.keys() == offline_rows.keys() and len(live_rows) == 8
    for key, row in live_rows.items():
        other = offline_rows[key]
        assert row["answer"] == other["answer"]
        assert np.allclose(row["boxes"], other["boxes"], atol=0.01) if row["boxes"] else not other["boxes"]
    # What the node published was recorded into an output bag, one result per query.
    from nextchat_ros.bag.io import bag_info

    results = Path(live["output_bag"])
    assert results.parent == out
    info = bag_info(results)
    assert list(info.counts.values()) == [8] and list(info.topics.values()) == ["nextchat_ros/msg/GroundingResult"]
    report = (out / "report.md").read_text()
    assert "Transport overhead" in report and "| rec_acc@0.5 |" in report
    for name in ("iou_histogram.png", "latency_cdf.png", "best.png", "worst.png", "metrics.json"):
        assert (out / name).stat().st_size > 0


def test_truncated_bag_keeps_what_was_scored(synthetic_bag, tmp_path):
    import shutil

    bag = tmp_path / "cut"
    shutil.copytree(synthetic_bag, bag)
    data = next(bag.glob("*.mcap"))
    data.write_bytes(data.read_bytes()[: int(data.stat().st_size * 0.6)])
    out = tmp_path / "eval"
    done = nextchat("bag", "eval", "--bag", bag, "--offline", "--out", out, "--json")
    assert done.returncode == 3
    assert "damaged" in done.stderr and "breaks off" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())["offline"]
    assert 0 < metrics["queries"] < 8 and metrics["answered"] == metrics["queries"]
    assert "damaged" in metrics["error"]
    assert "stopped early" in (out / "report.md").read_text()


def test_garbage_bags_missing_topics_and_unknown_types_are_clear_errors(tmp_path, synthetic_bag):
    from nextchat_ros.bag.io import BagWriter, msg_class, serialize
    from nextchat_ros.bag.record import camera_info_message
    from tests.test_cli import nextchat_each

    (tmp_path / "empty").mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "garbage.mcap").write_bytes(os.urandom(4096))
    no_images = tmp_path / "no_images"
    with BagWriter(no_images) as bag:
        bag.add("/camera/camera_info", "sensor_msgs/msg/CameraInfo")
        bag.write("/camera/camera_info", 1, serialize(camera_info_message(4, 4, None, 1, "c"),
                                                       "sensor_msgs/msg/CameraInfo"))
    cases = [([tmp_path / "empty"], "not a rosbag2 directory"), ([tmp_path / "nowhere"], "no bag at"),
             ([garbage], "cannot read the bag"), ([no_images], "no sensor_msgs/msg/Image topic"),
             ([synthetic_bag, "--image-topic", "/nope"], "has no topic '/nope'")]
    runs = nextchat_each(*[["bag", "eval", "--offline", "--out", tmp_path / f"e{k}", "--bag", *args]
                           for k, (args, _) in enumerate(cases)])
    for (args, message), done in zip(cases, runs):
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    with pytest.raises(Exception, match="unknown message type 'my_msgs/msg/Thing'"):
        msg_class("my_msgs/msg/Thing")
    assert msg_class("std_msgs/msg/String")(data="x").data == "x"


def test_robot_bag_without_truth_gives_latency_and_overlays(tmp_path):
    """A robot's own recording: camera frames and plain-text queries, nothing else."""
    from nextchat_ros.bag.io import BagWriter, msg_class, serialize
    from nextchat_ros.bag.record import image_message
    from nextchat_ros.synthetic.scenes import render_scene

    bag = tmp_path / "robot"
    t0 = 1_700_000_000 * 10**9
    with BagWriter(bag) as writer:
        writer.add("/head_camera/rgb", "sensor_msgs/msg/Image")
        writer.add("/planner/ask", "std_msgs/msg/String")
        for k in range(3):
            t = t0 + k * 500_000_000
            image = render_scene(k, height=120, width=160).image
            writer.write("/head_camera/rgb", t, serialize(image_message(image, t, "head", "rgb8"),
                                                          "sensor_msgs/msg/Image"))
            writer.write("/planner/ask", t + 100_000_000,
                         serialize(msg_class("std_msgs/msg/String")(data=f"where is the cup? ({k})"),
                                   "std_msgs/msg/String"))
    out = tmp_path / "eval"
    done = nextchat("bag", "eval", "--bag", bag, "--offline", "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)["offline"]
    assert metrics["queries"] == 3 and metrics["answered"] == 3 and metrics["with_truth"] == 0
    assert "scores" not in metrics and metrics["latency_ms"]["p50"] > 0 and metrics["throughput_qps"] > 0
    assert (out / "examples.png").stat().st_size > 0
    assert "no ground truth" in (out / "report.md").read_text()
