"""The training loop: freeze schedules, exact resume, DDP on CPU, and learning."""

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from nextchat_training.train import MODULES, StageConfig, apply_freeze_schedule, train_stage

from nextchat_ros.model import build_model
from tests.conftest import ROOT

CONFIGS = ROOT / "training" / "configs"


def trainable_modules(model):
    out = set()
    for name in MODULES:
        flags = {p.requires_grad for p in model.get_submodule(name).parameters()}
        assert len(flags) == 1, f"{name} is partly trainable"
        if flags == {True}:
            out.add(name)
    return out


def test_freeze_schedules_of_the_shipped_configs(tiny_model):
    expected = {
        "sam": {"sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder"},
        "vision": {"vision_tower"},
        # all but the vision tower (and SAM), as released; image_position and region_features
        # are the tiny preset's additions
        "stage1": {"projector", "image_position", "region_features", "llm", "box_decoder", "box_encoder"},
        "stage2": {"projector", "image_position", "region_features", "llm", "box_decoder", "box_encoder"},
        "stage3": {"seg_prompt_mlp", "sam.mask_decoder"},  # as released
    }
    pipeline = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    names = []
    for path in pipeline["stages"]:
        stage = StageConfig.load(CONFIGS / path)
        names.append(stage.name)
        apply_freeze_schedule(tiny_model, stage.trainable)
        assert trainable_modules(tiny_model) == expected[stage.name], stage.name
    assert names[-3:] == ["stage1", "stage2", "stage3"]
    for path in ("full/stage1.yaml", "full/stage2.yaml", "full/stage3.yaml"):
        stage = StageConfig.load(CONFIGS / path)
        apply_freeze_schedule(tiny_model, stage.trainable)
        assert "vision_tower" not in trainable_modules(tiny_model)
        assert stage.lr == 2e-5 and stage.mixed_precision == "bf16" and stage.warmup_ratio == 0.03
        assert stage.batch_size * stage.grad_accum * 8 == 64
    assert trainable_modules(tiny_model) == expected["stage3"]
    tiny_model.requires_grad_(True)


def small_stage(**overrides) -> StageConfig:
    values = dict(name="s", steps=6, batch_size=2, lr=1e-3, log_every=1, save_every=1, num_workers=0,
                  image_height=96, image_width=128,
                  trainable=["vision_tower", "projector", "llm", "box_decoder", "box_encoder"])
    values.update(overrides)
    return StageConfig(**values)


def losses(path: Path) -> list[str]:
    with open(path) as f:
        return [row["loss"] for row in csv.DictReader(f)]


RESUMABLE_STAGES = {
    "lm": {},
    "sam": {"kind": "sam", "trainable": ["sam.mask_decoder"]},
    # three samples per scene packed in a row, with masks (stage 3's mask loss checks
    # that a row's triggers and target masks pair up)
    "packed": {"turns_per_image": 3, "masks": True, "trainable": ["llm", "seg_prompt_mlp", "sam.mask_decoder"]},
    # the image-token attribute heads train beside the model and resume with it
    "attributes": {"image_attributes": 1.0, "turns_per_image": 2},
    # relations' anchor names look at their anchors
    "anchors": {"anchor_attention": True, "tasks": {"rec": 1.0}, "turns_per_image": 2},
    # LoRA adapters on the LLM: the checkpoint holds the base weights and the adapters
    "lora": {"lora": {"rank": 4, "alpha": 8}},
}


@pytest.mark.parametrize("kind", sorted(RESUMABLE_STAGES))
def test_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path, kind):
    stage = small_stage(**RESUMABLE_STAGES[kind])
    straight = train_stage(build_model("tiny", seed=0), stage, tmp_path / "straight", progress=False)
    train_stage(build_model("tiny", seed=0), stage, tmp_path / "stopped", max_steps=3, progress=False)
    assert losses(tmp_path / "stopped/metrics.csv") == losses(tmp_path / "straight/metrics.csv")[:3]
    resumed = train_stage(build_model("tiny", seed=1), stage, tmp_path / "stopped", progress=False)
    assert losses(tmp_path / "stopped/metrics.csv") == losses(tmp_path / "straight/metrics.csv")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_stages_1_and_2_do_not_read_sams_weights(tmp_path):
    """What lets a new SAM stage reuse finished stages 1 and 2 (training/README.md):
    from two models that differ only in SAM, they train the same weights, and SAM's
    weights pass through them unchanged."""
    for name in ("stage1", "stage2"):
        shipped = StageConfig.load(CONFIGS / "tiny" / f"{name}.yaml")
        assert not shipped.masks and shipped.kind == "lm"
        stage = small_stage(steps=2, trainable=shipped.trainable, image_attributes=shipped.image_attributes,
                            turns_per_image=2, tasks=shipped.tasks)
        plain = build_model("tiny", seed=0)
        other_sam = build_model("tiny", seed=0)
        with torch.no_grad():
            for param in other_sam.sam.parameters():
                param.add_(torch.randn_like(param))
        sam_before = {k: v.clone() for k, v in other_sam.sam.state_dict().items()}
        a = train_stage(plain, stage, tmp_path / f"{name}_a", progress=False).state_dict()
        b = train_stage(other_sam, stage, tmp_path / f"{name}_b", progress=False).state_dict()
        outside_sam = [k for k in a if not k.startswith("sam.")]
        start = build_model("tiny", seed=0).state_dict()
        assert any(not torch.equal(a[k], start[k]) for k in outside_sam)  # they did train
        for k in outside_sam:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
        for k, v in sam_before.items():
            torch.testing.assert_close(b[f"sam.{k}"], v, atol=0, rtol=0, msg=k)


def test_the_image_token_attribute_loss_asks_for_a_large_share_of_the_tokens_direction():
    """Tokens that carry colour and kind in a direction 30x smaller than the rest
    (what the projector made of colour) keep a high loss that scaling cannot
    lower; the same labels in a large direction are learnt."""
    from nextchat_training.train import ImageTokenAttributeHeads

    torch.manual_seed(0)
    dim, n = 64, 400
    colors, kinds = torch.randint(1, 9, (n,)), torch.randint(1, 7, (n,))
    code = torch.zeros(n, dim)
    code[torch.arange(n), colors - 1] = 1.0
    code[torch.arange(n), 8 + kinds - 1] = 1.0
    noise = torch.randn(n, dim)

    def trained_loss(tokens: torch.Tensor) -> float:
        torch.manual_seed(1)
        heads = ImageTokenAttributeHeads(dim)
        optimizer = torch.optim.Adam(heads.parameters(), lr=0.05)
        objects = [(torch.eye(n)[i:i + 50], colors[i:i + 50], kinds[i:i + 50]) for i in range(0, n, 50)]
        embeds = torch.stack([tokens] * len(objects))  # row b: object i of chunk b is token i
        for _ in range(150):
            optimizer.zero_grad()
            loss = heads(embeds, objects)
            loss.backward()
            optimizer.step()
        return loss.item()

    small, large = trained_loss(noise + 0.1 * code), trained_loss(noise + 3.0 * code)
    assert large < 0.3 < 1.0 < small, (small, large)
    assert trained_loss(100 * (noise + 0.1 * code)) == pytest.approx(small, rel=1e-3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_training_step_on_cpu(tmp_path):
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump(dict(name="ddp", steps=4, batch_size=2, log_every=1, save_every=1,
                                         num_workers=0, image_height=96, image_width=128, image_attributes=1.0,
                                         trainable=["projector", "llm", "box_decoder", "box_encoder"])))
    config = tmp_path / "train.yaml"
    # Both renderers, the solids read from a pool rank 0 renders while rank 1 waits.
    config.write_text(yaml.safe_dump(dict(name="ddp", out=str(tmp_path / "out"), stages=["stage.yaml"],
                                          final_eval_samples=0, renderers={"tabletop": 0.5, "solids": 0.5},
                                          scene_pools={"solids": 3})))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          str(Path(sys.executable).parent / "nextchat"), "train", "--config", str(config),
                          "--max-steps", "2", "--no-eval"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    step = yaml.safe_load((tmp_path / "out/ddp/checkpoint/trainer.json").read_text())["step"]
    assert step == 2
    pool = tmp_path / "out/scenes/solids-train-3-96x128"
    assert (pool / "shard-00000" / "scenes.json").is_file() and (pool / "wall_seconds.txt").is_file()
    rows = losses(tmp_path / "out/ddp/metrics.csv")
    assert len(rows) == 2 and all(float(r) > 0 for r in rows)


RANKS_AGREE = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from nextchat_training.train import StageConfig, init_distributed, train_stage
from nextchat_ros.model import build_model

init_distributed(torch.device("cpu"))
stage = StageConfig(**{KIND_AND_TRAINABLE}, name="s", steps=2, batch_size=2, log_every=1, save_every=2,
                    num_workers=0, image_height=96, image_width=128)
model = train_stage(build_model("tiny", seed=0), stage, Path(sys.argv[1]) / str(dist.get_rank()), progress=False)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    print("max difference between ranks", float((gathered[0] - gathered[1]).abs().max()))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("kind", ["vision", "sam"])
def test_two_process_stages_outside_ddp_keep_the_ranks_identical(tmp_path, kind):
    """The vision and sam stages call the model directly (not through DDP); the loop
    averages their gradients itself, so both ranks, each on its own share of the
    data, end with the same weights."""
    trainable = {"vision": ["vision_tower"], "sam": ["sam.mask_decoder"]}[kind]
    script = tmp_path / "ranks_agree.py"
    script.write_text(RANKS_AGREE.replace("{KIND_AND_TRAINABLE}", repr({"kind": kind, "trainable": trainable})))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                          str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    difference = re.search(r"max difference between ranks (\S+)", run.stdout)
    assert difference and float(difference.group(1)) == 0.0, run.stdout[-2000:]


def test_a_short_training_run_lowers_the_loss_and_raises_held_out_iou(tmp_path):
    from nextchat_ros.predictor import NextChatPredictor
    from nextchat_ros.synthetic.evaluate import evaluate

    def rec_metrics(model):
        return evaluate(NextChatPredictor(model), "heldout", 24, task_weights={"rec": 1.0}, progress=False,
                        height=120, width=160)

    model = build_model("tiny", seed=0)
    before = rec_metrics(model)
    stage = small_stage(name="short", steps=60, batch_size=8, lr=1e-3, log_every=10, save_every=60,
                        image_height=120, image_width=160, tasks={"rec": 3.0, "region_caption": 1.0, "pope": 1.0})
    train_stage(model, stage, tmp_path / "short", progress=False)
    rows = losses(tmp_path / "short/metrics.csv")
    assert float(rows[-1]) < 0.6 * float(rows[0])
    after = rec_metrics(model)
    # The box decoder's own boxes: the stage trains it, not SAM, whose masks give the reported boxes.
    assert after["rec_decoder_mean_iou"] > before["rec_decoder_mean_iou"] + 0.02
    assert after["rec_decoder_acc@0.5"] >= before["rec_decoder_acc@0.5"]


def test_a_training_config_changes_its_presets_model_and_the_change_is_saved(tmp_path):
    from nextchat_training.train import TrainConfig

    from nextchat_ros.model import load_pretrained, save_pretrained
    from nextchat_ros.model.config import get_preset

    def write(body: str) -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(f"name: run\nout: {tmp_path / 'out'}\nstages: [{CONFIGS / 'tiny/vision.yaml'}]\n{body}")
        return path

    config = TrainConfig.load(write("model: {vision: {image_size: 320, patch_size: 32}}\n")).model_config()
    tiny = get_preset("tiny")
    assert (config.vision.image_size, config.vision.patch_size) == (320, 32)
    assert config.vision.num_patches == tiny.vision.num_patches  # the same 10x10 token grid
    assert config.llm == tiny.llm and config.vision.hidden_size == tiny.vision.hidden_size
    model = build_model(config, seed=0)
    assert len([m for m in model.vision_tower.clip.embeddings.patch_embedding if isinstance(m, torch.nn.Conv2d)]) == 5
    with torch.no_grad():
        tokens = model.encode_image(torch.zeros(1, 3, 320, 320))
    assert tokens.shape == (1, tiny.vision.num_patches, tiny.llm.hidden_size)
    save_pretrained(model, tmp_path / "model")
    assert load_pretrained(tmp_path / "model").config.vision.image_size == 320

    with pytest.raises(ValueError, match=r"run\.yaml: model: unknown config key 'vision\.image_sise'"):
        TrainConfig.load(write("model: {vision: {image_sise: 320}}\n"))
    with pytest.raises(ValueError, match="init_checkpoint keeps its config"):
        TrainConfig.load(write(f"init_checkpoint: {tmp_path}\nmodel: {{seed_text: 1}}\n"))


def test_a_run_from_a_checkpoint_resets_the_modules_it_names_to_their_initialisation(tmp_path):
    """init_reset: a trained tower kept, the LLM stages' modules as a run from the preset
    has them before stage 1 (the pilots that train the LLM afresh over a shipped tower)."""
    from nextchat_training.train import TrainConfig, initial_model

    from nextchat_ros.model import save_pretrained

    trained = build_model("tiny", seed=0)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.5)  # stands in for training: every weight moved
    save_pretrained(trained, tmp_path / "trained")

    def write(body: str) -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(f"name: run\nout: {tmp_path / 'out'}\nstages: [{CONFIGS / 'tiny/stage1.yaml'}]\n{body}")
        return path

    reset = ["projector", "llm", "box_decoder"]
    config = TrainConfig.load(write(f"init_checkpoint: {tmp_path / 'trained'}\ninit_reset: {reset}\nseed: 3\n"))
    model, fresh = initial_model(config), build_model("tiny", seed=3)
    for name in MODULES:
        for key, value in model.get_submodule(name).state_dict().items():
            expected = (fresh if name in reset else trained).get_submodule(name).state_dict()[key]
            assert torch.equal(value, expected), f"{name}.{key}"

    with pytest.raises(ValueError, match="init_reset resets modules of init_checkpoint; there is none"):
        TrainConfig.load(write("init_reset: [llm]\n"))
    with pytest.raises(ValueError, match=r"unknown modules in 'init_reset': \['lm'\]"):
        TrainConfig.load(write(f"init_checkpoint: {tmp_path / 'trained'}\ninit_reset: [lm]\n"))
    for pilot in ("tiny_shipped_tower_stage1.yaml", "tiny_solids_shipped_tower_stage1.yaml"):
        assert set(TrainConfig.load(CONFIGS / pilot).init_reset) >= set(
            StageConfig.load(CONFIGS / "tiny/stage1.yaml").trainable)


def test_the_vision_stage_weights_its_per_patch_and_object_terms_as_its_keys_say():
    """patch_weight scales the per-patch colour, kind and box terms together; at 0 the
    tower learns from the object term alone and the per-patch heads get no gradient;
    object_colour_weight scales the object term's colour half."""
    from nextchat_training.train import VisionHeads, VisionItems, vision_stage_loss

    from nextchat_ros.synthetic.samples import SyntheticTabletop

    model = build_model("tiny", seed=0)
    items = VisionItems(SyntheticTabletop("train", height=120, width=160), model.config)
    batch = [items[i] for i in range(3)]
    torch.manual_seed(0)
    heads = VisionHeads(model.config.vision.hidden_size)
    plain = vision_stage_loss(model, heads, batch)
    torch.testing.assert_close(plain["loss"], plain["patch"] + plain["object"])
    assert plain["patch"].item() > 0 and plain["object"].item() > 0
    weighted = vision_stage_loss(model, heads, batch, object_weight=2.0, patch_weight=0.5)
    torch.testing.assert_close(weighted["loss"], 0.5 * plain["patch"] + 2.0 * plain["object"])

    alone = vision_stage_loss(model, heads, batch, object_weight=1.0, patch_weight=0.0)
    torch.testing.assert_close(alone["loss"], plain["object"])
    alone["loss"].backward()
    assert all(float(p.grad.abs().max()) == 0 for p in heads.box.parameters())
    assert float(heads.kind.weight.grad.abs().max()) > 0  # the object term reads the kind head
    assert any(float(p.grad.abs().max()) > 0 for p in model.vision_tower.parameters() if p.grad is not None)

    # object_colour_weight scales the colour half of the object term alone: the object
    # term is linear in it, and at 0 (with no per-patch terms) the colour head is not taught.
    heads.zero_grad()
    kind_only = vision_stage_loss(model, heads, batch, patch_weight=0.0, object_colour_weight=0.0)
    quarter = vision_stage_loss(model, heads, batch, object_colour_weight=0.25)
    colour = plain["object"] - kind_only["object"]
    assert colour.item() > 0 and kind_only["object"].item() > 0
    torch.testing.assert_close(quarter["object"], kind_only["object"] + 0.25 * colour)
    torch.testing.assert_close(quarter["loss"], plain["patch"] + quarter["object"])
    kind_only["loss"].backward()
    assert float(heads.color.weight.grad.abs().max()) == 0 and float(heads.kind.weight.grad.abs().max()) > 0


def test_the_vision_stages_existence_term_asks_the_yes_no_pairs_and_teaches_the_tower():
    """existence_weight adds "is there a {colour} {kind}?" over the patches (ExistenceHead)
    for every pair the scene holds and one absent pair per yes/no strategy; its gradient
    reaches the tower, and a few steps on a fixed batch lower it."""
    from nextchat_training.train import COLOR_NAMES, KIND_NAMES, VisionHeads, VisionItems, vision_stage_loss

    from nextchat_ros.synthetic.samples import POPE_STRATEGIES, SyntheticTabletop

    model = build_model("tiny", seed=0)
    stream = SyntheticTabletop("train", height=120, width=160)
    items = VisionItems(stream, model.config, existence=True)
    batch = [items[i] for i in range(4)]
    for index, item in enumerate(batch):
        scene, _ = stream.item(index)
        held = {(o.color, o.kind) for o in scene.objects}
        asked = [(COLOR_NAMES[c], KIND_NAMES[k], bool(p)) for c, k, p in item["asked"].tolist()]
        assert {(c, k) for c, k, p in asked if p} == held  # every pair the scene holds, once
        absent = [(c, k) for c, k, p in asked if not p]
        assert len(absent) == len(POPE_STRATEGIES) and not set(absent) & held
        assert asked == [(COLOR_NAMES[c], KIND_NAMES[k], bool(p)) for c, k, p in items[index]["asked"].tolist()]
    assert "asked" not in VisionItems(stream, model.config)[0]
    # without the term the heads are as before (old vision stages' checkpoints load)
    assert not any(k.startswith("existence.") for k in VisionHeads(8).state_dict())

    torch.manual_seed(0)
    heads = VisionHeads(model.config.vision.hidden_size, existence=True)
    plain = vision_stage_loss(model, heads, batch)
    assert "existence" not in plain
    both = vision_stage_loss(model, heads, batch, existence_weight=0.5)
    torch.testing.assert_close(both["loss"], plain["loss"] + 0.5 * both["existence"])
    alone = vision_stage_loss(model, heads, batch, object_weight=0.0, patch_weight=0.0, existence_weight=1.0)
    alone["loss"].backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in heads.color.parameters())
    assert float(heads.existence.key.weight.grad.abs().max()) > 0
    assert any(float(p.grad.abs().max()) > 0 for p in model.vision_tower.parameters() if p.grad is not None)

    params = list(model.vision_tower.parameters()) + list(heads.existence.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    first = None
    for _ in range(25):
        optimizer.zero_grad()
        loss = vision_stage_loss(model, heads, batch, object_weight=0.0, patch_weight=0.0,
                                 existence_weight=1.0)["existence"]
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first, (first, loss.item())
