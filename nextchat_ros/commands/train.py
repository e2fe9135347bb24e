"""``nextchat train``: run the training stages of a config (training/configs/)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a model: every stage of a training config, then a held-out evaluation"
DESCRIPTION = """\
Train a NExT-Chat model stage by stage from a YAML config (see training/configs/):
each stage sets its freeze schedule, steps, batch and learning-rate schedule.
A stopped run resumes from each stage's last checkpoint when started again.
Multi-GPU / multi-process: run the same command under torchrun (DDP).

examples:
  nextchat train --config training/configs/tiny.yaml          # the shipped tiny model, 2 CPU cores
  torchrun --nproc_per_node 8 "$(which nextchat)" train --config training/configs/full.yaml --device cuda
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training config YAML")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (with torchrun: each rank its own GPU)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop each stage after this many steps (keeps the schedule; for tests and debugging)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")


def run(args: argparse.Namespace) -> int:
    import os

    import torch
    from nextchat_training.train import run as train

    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    final = train(args.config, device=device, max_steps=args.max_steps, final_eval=not args.no_eval)
    print(f"model: {final}")
    return 0
