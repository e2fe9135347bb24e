"""One training step of a preset with random weights, per strategy: peak memory and
step time against ``nextchat train --estimate-memory``'s figures.

    .venv/bin/python benchmarks/train_step.py --device cuda --preset full      # FSDP (one rank) and LoRA, a GPU
    .venv/bin/python benchmarks/train_step.py --device cpu --preset tiny --strategies ddp,fsdp,lora

The stage is the preset's first lm stage (training/configs/<preset>/stage1.yaml for
the full preset, tiny/stage2.yaml for tiny) on the synthetic stream (one sample a
row), with --batch-size rows. The step measured is the second (the first creates
AdamW's state). Peak memory: CUDA's max_memory_allocated on a GPU, the peak of live
tensor bytes on the CPU. Weights are random: memory and time do not depend on their
values; the tiny tokenizer stands in (the vocabulary's size is the preset's).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import torch
from common import write_json
from nextchat_training.memory import GB, estimate, measured_step
from nextchat_training.train import StageConfig

from nextchat_ros.model import build_model
from nextchat_ros.model.config import SpecialTokens, get_preset

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
STAGES = {"full": CONFIGS / "full" / "stage1.yaml", "tiny": CONFIGS / "tiny" / "stage2.yaml"}


def stage_for(preset: str, strategy: str, batch_size: int) -> StageConfig:
    stage = StageConfig.load(STAGES[preset])
    return dataclasses.replace(stage, data=None, tasks={"rec": 1.0}, turns_per_image=1, batch_size=batch_size,
                               grad_accum=1, eval_every=0, num_workers=0, image_attributes=0.0,
                               parallel="fsdp" if strategy == "fsdp" else "ddp",
                               lora={"rank": 16, "alpha": 32} if strategy == "lora" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", choices=sorted(STAGES))
    parser.add_argument("--strategies", default="fsdp,lora", help="comma-separated: ddp, fsdp, lora")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    config = copy.deepcopy(get_preset(args.preset))
    config.tokens = SpecialTokens()  # the tiny tokenizer's names
    rows = []
    for strategy in args.strategies.split(","):
        stage = stage_for(args.preset, strategy, args.batch_size)
        model = build_model(config, seed=0).to(args.device)
        measured = measured_step(model, stage)
        estimated = estimate(model.config, stage, 1, strategy, tokens=measured["tokens_per_row"],
                             device_type=torch.device(args.device).type)
        rows.append({"strategy": strategy, **measured, "estimate": dataclasses.asdict(estimated),
                     "estimate_total_bytes": estimated.total})
        print(f"{strategy:5s} step {measured['step_seconds']:.2f} s  peak {measured['peak_bytes'] / GB:.2f} GB  "
              f"estimate {estimated.total / GB:.2f} GB ({estimated.total / measured['peak_bytes']:.2f}x)  "
              f"saved activations {measured['saved_activation_bytes'] / GB:.2f} GB vs {estimated.activations / GB:.2f}"
              f"  ({measured['tokens_per_row']} tokens a row)")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if args.json:
        write_json(args.json, {"device": args.device, "preset": args.preset, "batch_size": args.batch_size,
                               "rows": rows})


if __name__ == "__main__":
    main()
