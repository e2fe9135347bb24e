"""The ``nextchat`` command line: ``nextchat <command> --help`` explains each command."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import NextChatError

# command -> module under nextchat_ros.commands (each has HELP, DESCRIPTION,
# add_arguments and run). Only the module of the command being run is imported
# (`nextchat --help` imports none), so a command never pays for another's
# dependencies (torch, training/, export/).
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and given its arguments."""
    parser = argparse.ArgumentParser(prog="nextchat", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module_name in COMMANDS.items():
        if name != command:
            sub.add_parser(name, add_help=False)  # listed; its options are parsed only when it runs
            continue
        module = importlib.import_module(f"nextchat_ros.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (NextChatError, TimeoutError) as exc:
        print(f"nextchat {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
