"""What the behaviour benchmarks share: their command line (the model options every
`nextchat` command takes, and --json)."""

from __future__ import annotations

import argparse

from nextchat_ros.commands.ground import add_model_arguments


def model_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)  # --model, --device, --backend, ... as every command takes them
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser
