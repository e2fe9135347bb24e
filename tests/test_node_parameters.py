"""The node's parameters: the YAML shipped for ros2 launch names every one, with its default."""

from dataclasses import asdict, fields

import pytest
import yaml

from nextchat_ros.node import GroundingNode, NodeParameters
from tests.conftest import ROOT


def test_the_params_file_sets_every_parameter_to_its_default():
    shipped = yaml.safe_load((ROOT / "config/grounding.yaml").read_text())["nextchat_grounding"]["ros__parameters"]
    assert shipped == asdict(NodeParameters())
    assert [f.name for f in fields(NodeParameters)] == list(shipped)


@pytest.mark.parametrize("field,value,message", [
    ("backend", "cuda", "parameter backend='cuda' must be one of"),
    ("precision", "int8", "parameter precision='int8' must be one of"),
    ("llm_precision", "int3", "parameter llm_precision='int3' must be one of"),
    ("mode", "chat", "parameter mode='chat'"),
    ("queue_size", 0, "parameter queue_size=0 must be >= 1"),
    ("model_dir", "/nonexistent/model", "model directory not found: /nonexistent/model"),
])
def test_a_bad_parameter_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        NodeParameters(**{field: value}).validate()


def test_the_node_class_is_defined_where_it_can_be_read():
    assert GroundingNode.__module__ == "nextchat_ros.node" and GroundingNode.__qualname__ == "GroundingNode"
