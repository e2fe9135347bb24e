"""The ``nextchat`` command line: ``nextchat <command> --help`` explains each command."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import NextChatError

# command -> module under nextchat_ros.commands (each has HELP, DESCRIPTION,
# add_arguments and run). Modules are imported only when their command runs,
# so `nextchat --help` stays fast.
COMMANDS = {
    "ground": "ground",
    "demo": "demo",
    "train": "train",
    "evaluate": "evaluate",
    "convert-released": "convert",
    "export": "export",
    "bag": "bag",
}

DESCRIPTION = """\
nextchat: NExT-Chat (pixel2emb) for robots. Ask about an image in words; get an
answer with every mentioned object grounded as a box and a segmentation mask.

commands:
  ground    answer one query about an image file (text, boxes, masks, overlay)
  demo      the quick-start demo: generated tabletop scenes, scripted questions, overlays
  train     train a model stage by stage from a YAML config (training/configs/)
  evaluate  held-out metrics of a model (REC Acc@0.5, mask mIoU, POPE, captions, ...)
  export    ONNX graphs (parity-checked, linted) and TensorRT engines of the vision and mask parts
  bag       record evaluation rosbags; replay them through the live node and score them
  convert-released  a released nextchat-7b-336 checkpoint -> a model directory

Run `nextchat <command> --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextchat", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"nextchat_ros.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except NextChatError as exc:
        print(f"nextchat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
