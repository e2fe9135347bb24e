"""The nextchat_grounding ROS 2 node.

A thin translation layer: ROS messages in, the ROS-agnostic predictor in the
core, ROS messages out. Parameters are declared, typed and validated here; a bad
value stops the node at start with a message that names it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

BACKENDS = ("torch", "onnxruntime", "tensorrt")
MODES = ("auto", "generate", "ground")


@dataclass
class NodeParameters:
    model_dir: str = ""
    backend: str = "torch"
    device: str = "cpu"
    max_image_age: float = 2.0
    frame_buffer: int = 8
    queue_size: int = 8
    mode: str = "auto"
    max_new_tokens: int = 48
    publish_masks: bool = True
    max_image_pixels: int = 16777216

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        if self.backend not in BACKENDS:
            raise ValueError(f"parameter backend='{self.backend}' must be one of {BACKENDS}")
        if self.mode not in MODES:
            raise ValueError(f"parameter mode='{self.mode}' must be one of {MODES}")
        if not self.max_image_age > 0:
            raise ValueError(f"parameter max_image_age={self.max_image_age} must be > 0 seconds")
        for name in ("frame_buffer", "queue_size", "max_new_tokens", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name}={getattr(self, name)} must be >= 1")
        if self.model_dir and not Path(self.model_dir).is_dir():
            raise ValueError(f"parameter model_dir: model directory not found: {self.model_dir}")


def declare_parameters(node) -> NodeParameters:
    """Declare every NodeParameters field on ``node`` (typed by its default) and read them."""
    values = {}
    for f in fields(NodeParameters):
        values[f.name] = node.declare_parameter(f.name, f.default).value
    params = NodeParameters(**values)
    params.validate()
    return params


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node

    rclpy.init(args=argv if argv is not None else sys.argv)
    node = Node("nextchat_grounding")
    try:
        try:
            params = declare_parameters(node)
        except ValueError as exc:
            node.get_logger().fatal(str(exc))
            return 1
        node.get_logger().info(
            "nextchat_grounding parameters: " + ", ".join(f"{k}={v!r}" for k, v in vars(params).items()))
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
