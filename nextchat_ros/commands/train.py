"""``nextchat train``: run the training stages of a config (training/configs/)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a model: every stage of a training config, then a held-out evaluation"
DESCRIPTION = """\
Train a NExT-Chat model stage by stage from a YAML config (see training/configs/):
each stage sets its freeze schedule, steps, batch and learning-rate schedule.
A stopped run resumes from each stage's last checkpoint when started again,
also on another number of ranks (the global batch is kept by scaling grad_accum).
Multi-GPU / multi-process: run the same command under torchrun: DDP, or FSDP for
stages that say `parallel: fsdp` (parameters, gradients and optimizer state sharded).

examples:
  nextchat train --config training/configs/tiny.yaml          # the shipped tiny model, 2 CPU cores
  torchrun --nproc_per_node 8 "$(which nextchat)" train --config training/configs/full.yaml --device cuda
  nextchat train --config training/configs/full.yaml --estimate-memory --gpus 1 8 16  # what fits, before renting
  nextchat train --convert out/train/full/stage1/checkpoint --out models/stage1   # FSDP shards -> model dir
  nextchat train --merge-adapters out/train/lora/stage1/adapters --base models/base --out models/merged
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="training config YAML")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (with torchrun: each rank its own GPU)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop each stage after this many steps (keeps the schedule; for tests and debugging)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="print each stage's memory per GPU (parameters, gradients, optimizer state, "
                             "activations) for DDP, FSDP and LoRA from the model's shapes, and exit")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1],
                        help="GPU counts for --estimate-memory, e.g. --gpus 1 8 16 (default 1; LoRA is for one)")
    parser.add_argument("--convert", type=Path, metavar="CHECKPOINT",
                        help="turn a sharded (FSDP) stage checkpoint into a model directory (--out) and exit")
    parser.add_argument("--merge-adapters", type=Path, metavar="ADAPTERS",
                        help="merge LoRA adapters (a stage's adapters/ directory) into --base, write --out, and exit")
    parser.add_argument("--base", type=Path, help="the model directory the adapters were trained on")
    parser.add_argument("--out", type=Path, help="the model directory --convert / --merge-adapters writes")


def run(args: argparse.Namespace) -> int:
    import os

    import torch
    from nextchat_training.train import run as train

    if args.convert is not None:
        from nextchat_training.sharding import convert_checkpoint

        if args.out is None:
            raise SystemExit("nextchat train --convert: give the model directory to write with --out")
        print(f"model: {convert_checkpoint(args.convert, args.out)}")
        return 0
    if args.merge_adapters is not None:
        from nextchat_training.lora import merge_adapters

        if args.base is None or args.out is None:
            raise SystemExit("nextchat train --merge-adapters: give the base model (--base) and the output (--out)")
        print(f"model: {merge_adapters(args.base, args.merge_adapters, args.out)}")
        return 0
    if args.config is None:
        raise SystemExit("nextchat train: --config is required (or --convert / --merge-adapters)")
    if args.estimate_memory:
        from nextchat_training.memory import print_estimates

        print_estimates(args.config, args.gpus)
        return 0

    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    final = train(args.config, device=device, max_steps=args.max_steps, final_eval=not args.no_eval)
    print(f"model: {final}")
    return 0
