"""Training at scale, on this machine: FSDP on two gloo ranks against one process,
a sharded checkpoint resumed on another number of ranks and converted to a model
directory, LoRA adapters (what trains, and merging), and the memory estimate checked
against a measured training step."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nextchat_training.lora import add_lora, has_lora, load_adapters
from nextchat_training.memory import GB, estimate, measured_step
from nextchat_training.train import StageConfig, apply_freeze_schedule, train_stage

from nextchat_ros.model import build_model, load_pretrained
from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.synthetic.scenes import render_scene
from tests.conftest import ROOT
from tests.test_training_loop import free_port, small_stage

CONFIGS = ROOT / "training" / "configs"
# FSDP reduce-scatters what one process sums: the same losses to float32 rounding.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

TRAIN = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from nextchat_training.train import StageConfig, init_distributed, train_stage
from nextchat_ros.model import build_model

init_distributed(torch.device("cpu"))
out, parallel, grad_accum, max_steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stage = StageConfig(name="s", steps=4, batch_size=2, grad_accum=grad_accum, lr=1e-3, log_every=1, save_every=1,
                    num_workers=0, image_height=96, image_width=128, parallel=parallel, image_attributes=1.0,
                    gradient_checkpointing=parallel == "fsdp",
                    trainable=["projector", "llm", "box_decoder", "box_encoder"])
model = train_stage(build_model("tiny", seed=0), stage, out, progress=False, max_steps=max_steps)
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "final.pt")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def run_training(script: Path, out: Path, parallel: str, grad_accum: int, max_steps: int, ranks: int) -> None:
    args = [str(script), str(out), parallel, str(grad_accum), str(max_steps)]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] if ranks > 1 else []
    run = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def logged_losses(path: Path) -> list[float]:
    with open(path / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_fsdp_on_two_ranks_equals_one_process_resumes_on_one_rank_and_converts(tmp_path):
    """Two FSDP ranks of batch 2 (with activation checkpointing) against one plain
    process of batch 2 x grad_accum 2 (the same samples a step): the same losses;
    stopped after 2 steps and resumed on one rank (grad_accum scaled to keep the
    global batch), the run continues as the single process did; its sharded
    checkpoint converts to a model directory that loads and answers like the
    trained model."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    run_training(script, tmp_path / "single", "ddp", 2, 4, ranks=1)
    run_training(script, tmp_path / "fsdp", "fsdp", 1, 2, ranks=2)
    reference = logged_losses(tmp_path / "single")
    np.testing.assert_allclose(logged_losses(tmp_path / "fsdp"), reference[:2], rtol=LOSS_RTOL)
    info = yaml.safe_load((tmp_path / "fsdp/checkpoint/trainer.json").read_text())
    assert info == {"step": 2, "parallel": "fsdp", "world_size": 2}
    assert len(list((tmp_path / "fsdp/checkpoint/shards").glob("*.distcp"))) == 2  # each rank its own shards

    run_training(script, tmp_path / "fsdp", "fsdp", 1, 4, ranks=1)
    np.testing.assert_allclose(logged_losses(tmp_path / "fsdp"), reference, rtol=LOSS_RTOL)
    single = torch.load(tmp_path / "single/final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "fsdp/final.pt", weights_only=True)
    for name, value in single.items():
        torch.testing.assert_close(resumed[name], value, atol=WEIGHT_ATOL, rtol=0, msg=name)

    from nextchat_ros.cli import main

    assert main(["train", "--convert", str(tmp_path / "fsdp/checkpoint"), "--out", str(tmp_path / "converted")]) == 0
    converted = load_pretrained(tmp_path / "converted")
    for name, value in converted.state_dict().items():
        torch.testing.assert_close(value, resumed[name], atol=0, rtol=0, msg=name)
    trained = build_model("tiny", seed=0)
    trained.load_state_dict(resumed)
    image = render_scene(5, height=96, width=128).image
    answers = []
    for model in (converted, trained.eval()):
        predictor = NextChatPredictor(model)
        predictor.set_image(image)
        answers.append(predictor.ask("where is the cube?", mode="ground"))
    assert answers[0].text == answers[1].text
    np.testing.assert_allclose(answers[0].objects[0].box, answers[1].objects[0].box, atol=1e-4)


def test_stage_configs_refuse_what_fsdp_and_lora_cannot_do(tmp_path):
    cases = {"kind: sam\nparallel: fsdp\ntrainable: [sam.mask_decoder]": "lm stages",
             "parallel: fsdp\neval_every: 10": "eval_every",
             "lora: {rank: 8}\ntrainable: [projector]": "add llm",
             "lora: {rank: 8}\nparallel: fsdp": "without parallel: fsdp",
             "lora: {size: 8}": "unknown lora keys",
             "parallel: zero3": "parallel must be",
             "object_weight: -1": "object_weight must be >= 0",
             "object_weight: 4": "this is a lm stage",
             "kind: vision\npatch_kind_weight: -0.5": "patch_kind_weight must be >= 0",
             "kind: sam\npatch_kind_weight: 0": "this is a sam stage",
             "kind: vision\npatch_weight: -1": "patch_weight must be >= 0",
             "kind: vision\nobject_colour_weight: -0.5": "object_colour_weight must be >= 0",
             "kind: lm\nobject_colour_weight: 0.25": "object_colour_weight weighs a term of a vision stage",
             "kind: vision\npatch_weight: 0\nobject_weight: 0": "all 0",
             "kind: vision\nexistence_weight: -1": "existence_weight must be >= 0",
             "kind: lm\nexistence_weight: 1": "existence_weight weighs a term of a vision stage",
             "max_grad_norm: 1.0e9": r"max_grad_norm must be a number, not '1.0e9' \(YAML read it as a string",
             "steps: 10.5": "steps must be an integer",
             "lr: true": "lr must be a number"}
    for text, message in cases.items():
        path = tmp_path / "stage.yaml"
        path.write_text("name: s\n" + text + "\n")
        with pytest.raises(ValueError, match=message):
            StageConfig.load(path)


def test_lora_trains_only_the_adapters_and_the_heads_and_merging_equals_the_adapted_model(tmp_path):
    stage = small_stage(steps=2, lr=1e-2, trainable=["projector", "llm", "box_decoder", "box_encoder"],
                        lora={"rank": 4, "alpha": 8})
    model = build_model("tiny", seed=0)
    apply_freeze_schedule(model, stage.trainable)
    add_lora(model, stage.lora)
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trains and all(("lora_" in n) == n.startswith("llm.") for n in trains), sorted(trains)[:5]
    assert {n.split(".")[0] for n in trains} == {"llm", "projector", "box_decoder", "box_encoder"}
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if "lora_" not in n)

    start = {k: v.clone() for k, v in build_model("tiny", seed=0).state_dict().items()}
    merged = train_stage(build_model("tiny", seed=0), stage, tmp_path / "lora", progress=False)
    assert not has_lora(merged) and set(merged.state_dict()) == set(start)
    # The checkpoint keeps the base: the LLM as it started, the heads as trained.
    base = load_pretrained(tmp_path / "lora/checkpoint")
    for name, value in base.state_dict().items():
        same = torch.equal(value, start[name])
        assert same == (not name.startswith(("projector.", "box_decoder.", "box_encoder."))), name
    load_adapters(base, tmp_path / "lora/adapters")
    embeds = torch.randn(2, 12, merged.config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = base.llm(inputs_embeds=embeds).logits
        folded = merged.llm(inputs_embeds=embeds).logits
    assert not torch.allclose(adapted, build_model("tiny", seed=0).llm(inputs_embeds=embeds).logits, atol=1e-3)
    torch.testing.assert_close(folded, adapted, atol=1e-5, rtol=1e-5)

    from nextchat_ros.cli import main

    save = tmp_path / "base"
    from nextchat_ros.model import save_pretrained

    save_pretrained(load_pretrained(tmp_path / "lora/checkpoint"), save)
    assert main(["train", "--merge-adapters", str(tmp_path / "lora/adapters"), "--base", str(save),
                 "--out", str(tmp_path / "merged")]) == 0
    for name, value in load_pretrained(tmp_path / "merged").state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[name], atol=1e-6, rtol=0, msg=name)


def test_the_memory_estimate_is_within_20_percent_of_a_measured_training_step():
    """The tiny preset's stage 2 (fp32 on the CPU): the estimate from the model's shapes
    against the peak of live tensor memory during a real step, and the activations
    against the bytes autograd saved."""
    import dataclasses

    stage = dataclasses.replace(StageConfig.load(CONFIGS / "tiny" / "stage2.yaml"), batch_size=4, eval_every=0)
    model = build_model("tiny", seed=0)
    measured = measured_step(model, stage)
    estimated = estimate(model.config, stage, 1, "ddp", tokens=measured["tokens_per_row"], device_type="cpu")
    assert estimated.total == pytest.approx(measured["peak_bytes"], rel=0.2), (estimated, measured)
    assert estimated.activations == pytest.approx(measured["saved_activation_bytes"], rel=0.25), (estimated, measured)


def test_the_full_preset_fits_80gb_only_sharded_or_with_lora(capsys):
    """What the issue says of the 7B model: DDP needs more than an 80 GB GPU on every
    rank; FSDP over 8 and 16 GPUs and LoRA on one fit."""
    from nextchat_ros.cli import main

    assert main(["train", "--config", str(CONFIGS / "full.yaml"), "--estimate-memory", "--gpus", "1", "8", "16"]) == 0
    out = capsys.readouterr().out
    stage1 = out.split("\nstage1:")[1].split("\nstage2:")[0]
    rows = {tuple(line.split()[:2]): float(line.split()[-1]) for line in stage1.splitlines()
            if line.split()[:1] and line.split()[0] in ("ddp", "fsdp", "lora")}
    assert rows[("ddp", "1")] > 80 and rows[("ddp", "8")] > 80, rows
    assert rows[("fsdp", "16")] < rows[("fsdp", "8")] < 80 < rows[("fsdp", "1")], rows
    assert rows[("lora", "1")] < 80, rows
    assert set(rows) == {("ddp", "1"), ("ddp", "8"), ("ddp", "16"), ("fsdp", "1"), ("fsdp", "8"), ("fsdp", "16"),
                         ("lora", "1")}
    assert GB == 1024**3


def test_a_recorded_bag_with_its_truth_is_a_training_source(tmp_path):
    """`nextchat bag record` -> `data: [{bag: ...}]`: every query with a reference
    answer becomes a sample about the frame it names, and a stage trains on them."""
    from nextchat_training.formats import read_bag

    from nextchat_ros.bag.replay import read_queries
    from nextchat_ros.cli import main

    bag = tmp_path / "bag"
    assert main(["bag", "record", "--dataset", "synthetic", "--count", "6", "--camera-rate", "4",
                 "--query-period", "0.5", "--out", str(bag)]) == 0
    queries = read_queries(bag)
    samples = read_bag(bag)
    assert len(samples) == sum(1 for q in queries if q.truth is not None and q.truth.answer) > 0
    for sample in samples:
        image = sample.image()
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        assert sample.answer and all(0 <= v <= max(image.shape) for box in sample.answer_boxes for v in box)
    stage = small_stage(steps=2, data=[{"bag": str(bag)}], trainable=["projector", "llm", "box_decoder",
                                                                     "box_encoder"])
    train_stage(build_model("tiny", seed=0), stage, tmp_path / "train", progress=False)
    losses = logged_losses(tmp_path / "train")
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
