"""``nextchat convert-released``: a released nextchat-7b-336 checkpoint -> our format."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a released nextchat-7b-336 checkpoint (+ CLIP dir) into a model directory"
DESCRIPTION = """\
Read a checkpoint in the released NExT-Chat layout (sharded pytorch_model-*.bin,
loaded weights-only; config.json; tokenizer) and the CLIP vision tower from its
own local directory, and write one model directory (config.json,
model.safetensors, tokenizer.json) that `--model` and the node accept.

example:
  nextchat convert-released --checkpoint /models/nextchat-7b-336 \\
      --clip /models/clip-vit-large-patch14-336 --out /models/nextchat-7b-336-converted
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="released checkpoint directory")
    parser.add_argument("--clip", type=Path, required=True, help="CLIP ViT-L/14-336 directory")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")


def run(args: argparse.Namespace) -> int:
    from ..model.checkpoint import load_released, save_pretrained

    model = load_released(args.checkpoint, args.clip)
    save_pretrained(model, args.out)
    print(f"wrote {args.out}")
    return 0
