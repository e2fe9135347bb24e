"""The training loop for every stage of NExT-Chat, from one YAML config.

A config names an initial model and a list of stages (each a YAML file of its
own, see training/configs/). Each stage sets which modules train (the freeze
schedule), its steps, batch, learning rate schedule and tasks. The output of a
stage initialises the next. Stage kinds:

- ``lm``   : the NExT-Chat objective (``objective.NextChatObjective``): LM + box +
             cycle losses (stages 1 and 2), plus the mask loss when ``masks: true``
             (stage 3).
- ``sam``  : box-prompted mask training of SAM alone. The released model starts
             from SAM's pretrained weights; none exist offline for the tiny
             preset, so this stage stands in for SAM's own pretraining.
- ``vision``: dense per-patch training of the vision tower alone (objectness,
             colour, kind and box of the object under each patch), standing in
             for CLIP's pretraining in the same way; its heads are discarded.

Checkpoints hold model, optimizer, scheduler and step; the data stream is a pure
function of the sample index, so a resumed run continues exactly. Runs on one
process or under torchrun: DDP (every rank a replica), or with ``parallel: fsdp``
sharded over the ranks (``sharding``; gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from nextchat_ros.images import pixels_to_normalized
from nextchat_ros.model import NextChatModel, build_model, load_pretrained, save_pretrained
from nextchat_ros.model.config import NextChatConfig, get_preset
from nextchat_ros.model.sam import preprocess_image as sam_preprocess
from nextchat_ros.model.sam import target_masks
from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.synthetic.evaluate import evaluate, format_metrics
from nextchat_ros.synthetic.samples import RENDERERS, SPLIT_SEED, SyntheticTabletop, existence_pairs
from nextchat_ros.synthetic.scenes import COLORS, KINDS
from nextchat_ros.synthetic.shards import ScenePool

from .batches import Collator, RealItems, StreamSampler, SyntheticItems, object_patch_targets
from .formats import read_bag, read_coco_instances, read_jsonl
from .lora import add_lora, has_lora, load_adapters, load_plain_state, lora_spec, merge_lora, plain_state, save_adapters
from .losses import mask_loss
from .objective import LossWeights, NextChatObjective, jitter_boxes, loss_weights
from .sharding import (
    PARALLEL,
    fully_shard_stage,
    gathered_model,
    init_single_process_group,
    load_sharded,
    save_sharded,
)

COLOR_NAMES, KIND_NAMES = list(COLORS), list(KINDS)  # class k is the k-th name

# Loss terms logged to metrics.csv (a stage logs those its loss has).
LOSS_TERMS = ("loss", "lm", "box", "cycle", "mask", "attention", "answer_attention", "attributes", "patch", "object",
              "existence")
MODULES = ("vision_tower", "projector", "image_position", "region_features", "llm", "box_decoder", "box_encoder",
           "seg_prompt_mlp", "sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder")


@dataclass
class StageConfig:
    name: str
    kind: str = "lm"  # lm | sam | vision
    steps: int = 1000
    batch_size: int = 16  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    trainable: list[str] = field(default_factory=lambda: list(MODULES))
    masks: bool = False
    tasks: dict[str, float] | None = None  # synthetic task weights
    # Synthetic samples per scene, packed into one row (the image's tokens once);
    # batch_size counts rows.
    turns_per_image: int = 1
    # Real data instead of the synthetic stream: a list of
    # {jsonl: PATH, task: rec|reg|gc|vqa, image_root: DIR}, {coco: PATH, image_root: DIR}
    # or {bag: PATH} (a bag with its truth, `nextchat bag record`).
    data: list[dict] | None = None
    mask_box_jitter: float = 0.0  # SAM is prompted with boxes jittered by this fraction of their size
    # Loss weights over the preset's (objective.LossWeights), e.g. {box_giou: 0.2}.
    loss: dict[str, float] | None = None
    # Vision stage: weight of each object's colour and kind from its pooled patches
    # against the per-patch colour, kind and box terms (vision_stage_loss).
    object_weight: float = 1.0
    # Vision stage: weight of the colour against the kind inside the object term (below 1
    # leaves the tower more of its width for shape: benchmarks/kind_ceiling.py
    # --colour-weight, training/EXPERIMENTS.md).
    object_colour_weight: float = 1.0
    # Vision stage: weight of the per-patch kind term (0 leaves kind to the object term).
    patch_kind_weight: float = 1.0
    # Vision stage: weight of all the per-patch terms, colour, kind and box (0 teaches
    # the tower through the object term alone, as kind_ceiling.py's grid CNN is taught).
    patch_weight: float = 1.0
    # Vision stage: weight of the existence term (0 = off): "is there a {colour} {kind}?"
    # for every pair the scene holds and one absent pair per yes/no strategy, read off
    # the patches by one attention-like head (ExistenceHead), as the LLM must read it.
    existence_weight: float = 0.0
    # Weight of the image-token attribute loss (ImageTokenAttributeHeads; synthetic data only).
    image_attributes: float = 0.0
    # A relation's anchor name in the question looks at the anchor (grounding-attention
    # loss, weight loss.grounding_attention; synthetic data only).
    anchor_attention: bool = False
    mixed_precision: str = "auto"  # auto (bf16 where the device has it) | bf16 | no
    # ddp: every rank holds the whole model (its gradients and optimizer state too);
    # fsdp: all three sharded over the ranks (lm stages; see sharding.py).
    parallel: str = "ddp"
    # LoRA adapters on the LLM instead of training its weights: {rank, alpha, dropout,
    # targets} (lora.py); needs llm in trainable; the other trainable modules train in full.
    lora: dict | None = None
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_samples: int = 100
    save_every: int = 200
    log_every: int = 10
    num_workers: int = 1
    image_height: int = 240
    image_width: int = 320

    @classmethod
    def load(cls, path: Path) -> StageConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown stage keys {sorted(unknown)}")
        for key, value in data.items():
            wanted = cls.__dataclass_fields__[key].type  # "int", "float", ... (postponed annotations)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (wanted == "float" and not number) or (wanted == "int" and not (number and isinstance(value, int))):
                raise ValueError(f"{path}: {key} must be {'an integer' if wanted == 'int' else 'a number'}, "
                                 f"not {value!r}{_yaml_number_hint(value)}")
        stage = cls(**data)
        bad = [m for m in stage.trainable if m not in MODULES]
        if bad:
            raise ValueError(f"{path}: unknown modules in 'trainable': {bad}; known: {MODULES}")
        if stage.kind not in ("lm", "sam", "vision"):
            raise ValueError(f"{path}: kind must be 'lm', 'sam' or 'vision'")
        for key in ("object_weight", "object_colour_weight", "patch_kind_weight", "patch_weight"):
            if not getattr(stage, key) >= 0:
                raise ValueError(f"{path}: {key} must be >= 0")
            if getattr(stage, key) != 1.0 and stage.kind != "vision":
                raise ValueError(f"{path}: {key} weighs a term of a vision stage's loss; this is a "
                                 f"{stage.kind} stage")
        if not stage.existence_weight >= 0:
            raise ValueError(f"{path}: existence_weight must be >= 0")
        if stage.existence_weight and stage.kind != "vision":
            raise ValueError(f"{path}: existence_weight weighs a term of a vision stage's loss; this is a "
                             f"{stage.kind} stage")
        if stage.kind == "vision" and stage.patch_weight == stage.object_weight == stage.existence_weight == 0:
            raise ValueError(f"{path}: patch_weight, object_weight and existence_weight are all 0: the vision "
                             "stage would have no loss")
        if stage.turns_per_image < 1:
            raise ValueError(f"{path}: turns_per_image must be >= 1")
        if stage.parallel not in PARALLEL:
            raise ValueError(f"{path}: parallel must be one of {PARALLEL}")
        if stage.parallel == "fsdp" and stage.kind != "lm":
            raise ValueError(f"{path}: parallel: fsdp is for lm stages; the {stage.kind} stage trains one part "
                             "and runs with ddp")
        if stage.lora is not None:
            try:
                stage.lora = lora_spec(stage.lora)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            if "llm" not in stage.trainable:
                raise ValueError(f"{path}: lora adapts the LLM: add llm to trainable")
            if stage.parallel == "fsdp":
                raise ValueError(f"{path}: lora is the one-GPU way; use it without parallel: fsdp")
        if stage.parallel == "fsdp" and stage.eval_every:
            raise ValueError(f"{path}: eval_every needs the whole model on one rank; with parallel: fsdp set "
                             "eval_every: 0 (the stage's model is evaluated when it is written)")
        try:
            loss_weights("tiny", stage.loss)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return stage


@dataclass
class TrainConfig:
    name: str
    out: str
    stages: list[str]
    init_preset: str | None = "tiny"
    # Changes to init_preset's model config, in its config.json shape, e.g.
    # {vision: {image_size: 320, patch_size: 32}} (NextChatConfig.with_changes).
    model: dict | None = None
    init_checkpoint: str | None = None
    # Modules of init_checkpoint put back to their initialisation (build_model with
    # this run's seed, as a run from init_preset starts), e.g. to train the LLM
    # stages afresh over a trained tower and mask decoder. Names as in 'trainable'.
    init_reset: list[str] | None = None
    seed: int = 0
    final_eval_samples: int = 1000
    # How the synthetic scenes of every stage are drawn: weights over renderers
    # (samples.RENDERERS; None: the tabletop painter alone).
    renderers: dict[str, float] | None = None
    # Renderers too slow to draw per item: how many of their training scenes are
    # rendered once, to <out>/scenes, and read from there (shards.ScenePool).
    scene_pools: dict[str, int] | None = None

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        config = cls(**data)
        if config.model is not None:
            if config.init_checkpoint:
                raise ValueError(f"{path}: 'model' changes a preset; a run from init_checkpoint keeps its config")
            try:
                config.model_config()
            except ValueError as exc:
                raise ValueError(f"{path}: model: {exc}") from None
        if config.init_reset:
            if not config.init_checkpoint:
                raise ValueError(f"{path}: init_reset resets modules of init_checkpoint; there is none")
            bad = [m for m in config.init_reset if m not in MODULES]
            if bad:
                raise ValueError(f"{path}: unknown modules in 'init_reset': {bad}; known: {MODULES}")
        # stage files are relative to the config file
        config.stages = [str((path.parent / s).resolve()) for s in config.stages]
        return config

    def model_config(self) -> NextChatConfig:
        """init_preset's model config with this run's changes."""
        return get_preset(self.init_preset).with_changes(self.model or {})


# --- distributed ------------------------------------------------------------------

def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


# --- freeze schedule -------------------------------------------------------------

def apply_freeze_schedule(model: NextChatModel, trainable: list[str]) -> list[torch.nn.Parameter]:
    """requires_grad = True exactly for the parameters of the listed modules."""
    model.requires_grad_(False)
    params = []
    for name in trainable:
        module = model.get_submodule(name)
        module.requires_grad_(True)
        params += list(module.parameters())
    return params


def _yaml_number_hint(value) -> str:
    """Why a number may have arrived as a string: YAML 1.1 reads 1.0e9 (no sign in
    the exponent) as one."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML read it as a string: write an exponent with its sign, e.g. 1.0e+9)"


def lr_lambda(stage: StageConfig):
    warmup = max(1, int(stage.warmup_ratio * stage.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, stage.steps - warmup)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def load_real_samples(sources: list[dict]) -> list:
    samples = []
    for source in sources:
        root = source.get("image_root", ".")
        if "jsonl" in source:
            samples += list(read_jsonl(source["jsonl"], source.get("task", "rec"), root))
        elif "coco" in source:
            samples += list(read_coco_instances(source["coco"], root))
        elif "bag" in source:
            samples += read_bag(source["bag"])
        else:
            raise ValueError(f"data source needs 'jsonl', 'coco' or 'bag': {source}")
    return samples


# --- the SAM stage's data -----------------------------------------------------------

class SamItems(Dataset):
    """Every object of scene i: SAM input, normalised boxes, low-res target masks."""

    def __init__(self, stream: SyntheticTabletop, config):
        self.stream, self.config = stream, config

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        scene, _ = self.stream.item(index)
        h, w = scene.image.shape[:2]
        boxes = torch.tensor(np.stack([pixels_to_normalized(o.box, h, w) for o in scene.objects]), dtype=torch.float32)
        masks = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
        return {"sam_pixels": sam_preprocess(torch.from_numpy(scene.image.copy()), self.config.sam),
                "boxes": boxes, "targets": target_masks(masks, self.config.sam)}


class VisionItems(Dataset):
    """Scene i for the dense vision stage: tower input and per-patch targets; with
    ``existence``, also its yes/no questions as pairs (samples.existence_pairs)."""

    def __init__(self, stream: SyntheticTabletop, config, existence: bool = False):
        self.stream, self.config, self.existence = stream, config, existence

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> dict:
        from nextchat_ros.model.vision import preprocess_image

        scene, _ = self.stream.item(index)  # always >= 1 object: item() refuses a scene without
        h, w = scene.image.shape[:2]
        cover, colors, kinds = object_patch_targets(scene, self.config)
        best, owner = cover.max(0)
        has = best > 0.15
        boxes = torch.tensor(np.stack([pixels_to_normalized(o.box, h, w) for o in scene.objects]),
                             dtype=torch.float32)
        item = {"pixels": preprocess_image(torch.from_numpy(scene.image.copy()), self.config.vision),
                "color": torch.where(has, colors[owner], 0), "kind": torch.where(has, kinds[owner], 0),
                "box": boxes[owner], "has": has,
                # per object: its share of each patch, normalised to sum to 1 (attention-like pooling)
                "objects": (cover / cover.sum(1, keepdim=True).clamp_min(1e-6), colors, kinds)}
        if self.existence:  # (questions, 3): colour, kind (from 0), present; drawn as item i's own
            pairs = existence_pairs(scene, np.random.default_rng(index))
            item["asked"] = torch.tensor([(COLOR_NAMES.index(c), KIND_NAMES.index(k), int(s == "positive"))
                                          for c, k, s in pairs])
        return item


class ExistenceHead(torch.nn.Module):
    """Is there a {colour} {kind} among an image's patches? One key per patch (a linear
    map), a query that adds the colour's and the kind's embeddings, and a soft max of
    their dot products over the patches: "yes" needs one patch that matches both, as
    one attention head of the LLM would find it. The vision stage's existence term
    trains the tower through it; benchmarks/existence_probe.py fits one on a frozen tower."""

    def __init__(self, dim: int, query_dim: int = 64):
        super().__init__()
        self.key = torch.nn.Linear(dim, query_dim)
        self.color = torch.nn.Embedding(len(COLOR_NAMES), query_dim)
        self.kind = torch.nn.Embedding(len(KIND_NAMES), query_dim)
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, patches: torch.Tensor, asked: torch.Tensor) -> torch.Tensor:
        """patches (images, P, dim); asked (questions, 3) of (image, colour, kind), colour
        and kind counted from 0: one logit per question."""
        keys = self.key(patches)[asked[:, 0]]  # each image's keys once, then one row per question
        query = self.color(asked[:, 1]) + self.kind(asked[:, 2])
        return torch.logsumexp(torch.einsum("qpd,qd->qp", keys, query), dim=1) + self.bias


class VisionHeads(torch.nn.Module):
    """Per-patch heads of the dense vision stage (discarded afterwards); with
    ``existence``, also its ExistenceHead."""

    def __init__(self, dim: int, existence: bool = False):
        super().__init__()
        self.color = torch.nn.Linear(dim, len(COLOR_NAMES) + 1)
        self.kind = torch.nn.Linear(dim, len(KIND_NAMES) + 1)
        self.box = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 4))
        # built last, and only when asked for: the other heads' initial weights stay as they were
        self.existence = ExistenceHead(dim) if existence else None


def vision_stage_loss(model: NextChatModel, heads: VisionHeads, items, object_weight: float = 1.0,
                      patch_kind_weight: float = 1.0, patch_weight: float = 1.0,
                      object_colour_weight: float = 1.0, existence_weight: float = 0.0) -> dict[str, torch.Tensor]:
    batch = {k: torch.stack([i[k] for i in items]).to(model.device) for k in items[0] if k not in ("objects", "asked")}
    features = model.vision_tower(batch["pixels"])  # (B, g*g, C)
    ce = torch.nn.functional.cross_entropy
    patch = ce(heads.color(features).flatten(0, 1), batch["color"].flatten())
    patch = patch + patch_kind_weight * ce(heads.kind(features).flatten(0, 1), batch["kind"].flatten())
    has = batch["has"]
    if has.any():
        patch = patch + 5 * torch.nn.functional.l1_loss(heads.box(features)[has], batch["box"][has])
    # Each object's colour and kind from the coverage-weighted mean of its patches (the
    # weights sum to 1), through the same heads: what the LLM's attention over an
    # object's patches will read.
    pooled, colors, kinds = [], [], []
    for b, item in enumerate(items):
        cover, color, kind = item["objects"]
        if len(cover):
            pooled.append(cover.to(features.device, features.dtype) @ features[b])
            colors.append(color)
            kinds.append(kind)
    objects = features.new_zeros(())
    if pooled:
        pooled = torch.cat(pooled)
        objects = object_colour_weight * ce(heads.color(pooled), torch.cat(colors).to(model.device)) + \
            ce(heads.kind(pooled), torch.cat(kinds).to(model.device))
    terms = {"loss": patch_weight * patch + object_weight * objects, "patch": patch, "object": objects}
    if existence_weight:
        asked = torch.cat([torch.cat([torch.full((len(i["asked"]), 1), b), i["asked"]], 1)
                           for b, i in enumerate(items)]).to(model.device)
        logits = heads.existence(features, asked[:, :3])
        terms["existence"] = torch.nn.functional.binary_cross_entropy_with_logits(logits, asked[:, 3].to(logits.dtype))
        terms["loss"] = terms["loss"] + existence_weight * terms["existence"]
    return terms


class ImageTokenAttributeHeads(torch.nn.Module):
    """Cosine classifiers of each object's colour and kind from its image tokens in
    LLM space (pooled by coverage), with a fixed scale: the image-token attribute
    loss of the lm stages (training only; discarded afterwards).

    Why: within the first minutes of stage 1 the projector shrinks colour to a
    small share of the LLM-space image tokens (the LLM first learns to find
    objects by kind, and the projector serves that): a linear probe still reads
    colour, but from a direction so small that the LLM's attention and answers
    learn colour last. A cosine classifier cannot make up for a small direction
    with a large weight: the loss falls only if the tokens themselves keep colour
    and kind a large share of their direction (figures: training/EXPERIMENTS.md).
    """

    def __init__(self, dim: int, scale: float = 10.0):
        super().__init__()
        self.scale = scale
        self.color = torch.nn.Parameter(torch.randn(len(COLORS), dim) * dim ** -0.5)
        self.kind = torch.nn.Parameter(torch.randn(len(KINDS), dim) * dim ** -0.5)

    def logits(self, weight: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        pooled = pooled - pooled.mean(0, keepdim=True).detach()  # what tells objects apart, not what they share
        return self.scale * torch.nn.functional.normalize(pooled, dim=-1) @ \
            torch.nn.functional.normalize(weight, dim=-1).T

    def forward(self, image_embeds: torch.Tensor, objects: list) -> torch.Tensor:
        """image_embeds (B, N, D); objects[b] = object_patch_targets of row b -> mean of the two losses."""
        pooled = []
        for b, (cover, _color, _kind) in enumerate(objects):  # every scene has >= 1 object
            weights = cover.to(image_embeds.device, image_embeds.dtype)
            pooled.append((weights / weights.sum(1, keepdim=True).clamp_min(1e-6)) @ image_embeds[b])
        pooled = torch.cat(pooled).float()
        colors = torch.cat([color for _, color, _ in objects]).to(pooled.device)
        kinds = torch.cat([kind for _, _, kind in objects]).to(pooled.device)
        ce = torch.nn.functional.cross_entropy
        return 0.5 * (ce(self.logits(self.color, pooled), colors - 1) + ce(self.logits(self.kind, pooled), kinds - 1))


def sam_stage_loss(model: NextChatModel, items, stage: StageConfig, weights: LossWeights,
                   generator) -> dict[str, torch.Tensor]:
    sam = model.sam
    pixels = torch.stack([i["sam_pixels"] for i in items]).to(model.device)
    embeddings = sam.encode_image(pixels)
    logits, ious, targets = [], [], []
    for b, item in enumerate(items):
        boxes = jitter_boxes(item["boxes"], stage.mask_box_jitter, generator).to(model.device)
        box_tokens, dense = sam.prompt_encoder(points=None, boxes=boxes * sam.config.image_size, masks=None)
        low, iou = sam.mask_decoder(image_embeddings=embeddings[b:b + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=box_tokens, dense_prompt_embeddings=dense,
                                    multimask_output=False)
        logits.append(low)
        ious.append(iou)
        targets.append(item["targets"].to(low.device))
    loss = mask_loss(torch.cat(logits), torch.cat(ious), torch.cat(targets),
                     weights.mask_focal, weights.mask_dice, weights.mask_iou)
    return {"loss": loss, "mask": loss}


# --- checkpoints ---------------------------------------------------------------------

def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, heads=None,
                    lora: dict | None = None) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    save_pretrained(model, tmp, plain_state(model) if lora else None)
    if lora:
        save_adapters(model, tmp / "adapters", lora)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "heads": heads.state_dict() if heads is not None else None}, tmp / "trainer.pt")
    (tmp / "trainer.json").write_text(json.dumps({"step": step, "parallel": "ddp", "world_size": dist_info()[1]}))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)  # a checkpoint is either complete or absent


def load_checkpoint(directory: Path, model, optimizer, scheduler, heads=None) -> int:
    loaded = load_pretrained(directory)
    if has_lora(model):
        load_plain_state(model, loaded.state_dict())
        load_adapters(model, directory / "adapters")
    else:
        model.load_state_dict(loaded.state_dict())
    state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=True)
    if heads is not None:
        heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(json.loads((directory / "trainer.json").read_text())["step"])


# --- one stage -----------------------------------------------------------------------

@dataclass
class StageParts:
    """What a stage of one kind brings to the shared loop: its data, its loss of one
    batch, the training-only heads beside the model (saved in its checkpoints) and
    the parameters whose gradients the loop averages itself under torchrun (DDP
    averages those of the module it wraps)."""

    dataset: Dataset
    collate_fn: Callable
    losses: Callable[[object], dict[str, torch.Tensor]]
    heads: torch.nn.Module | None = None
    averaged_by_loop: list[torch.nn.Parameter] = field(default_factory=list)


def vision_stage(model: NextChatModel, stage: StageConfig, stream: SyntheticTabletop, params: list,
                 seed: int) -> StageParts:
    torch.manual_seed(seed)
    existence = stage.existence_weight > 0
    heads = VisionHeads(model.config.vision.hidden_size, existence).to(model.device)
    return StageParts(VisionItems(stream, model.config, existence), list_of_items,
                      lambda items: vision_stage_loss(model, heads, items, stage.object_weight,
                                                      stage.patch_kind_weight, stage.patch_weight,
                                                      stage.object_colour_weight, stage.existence_weight), heads,
                      params + list(heads.parameters()))


def sam_stage(model: NextChatModel, stage: StageConfig, stream: SyntheticTabletop, params: list,
              seed: int, generator: torch.Generator) -> StageParts:
    weights = loss_weights(model.config.preset, stage.loss)
    return StageParts(SamItems(stream, model.config), list_of_items,
                      lambda items: sam_stage_loss(model, items, stage, weights, generator), None, params)


def lm_stage(model: NextChatModel, stage: StageConfig, stream: SyntheticTabletop, seed: int,
             world: int, bf16: bool) -> StageParts:
    heads = None
    if stage.image_attributes > 0:
        if stage.data:
            raise ValueError(f"stage {stage.name}: image_attributes needs the synthetic data (its objects' labels)")
        torch.manual_seed(seed)
        heads = ImageTokenAttributeHeads(model.config.llm.hidden_size).to(model.device)
    if stage.data:
        dataset = RealItems(load_real_samples(stage.data), model.prompt, model.config, stage.masks, seed)
    else:
        dataset = SyntheticItems(stream, model.prompt, model.config, with_masks=stage.masks,
                                 turns_per_image=stage.turns_per_image, with_objects=heads is not None,
                                 with_looks=stage.anchor_attention)
    objective = NextChatObjective(model, loss_weights(model.config.preset, stage.loss), stage.mask_box_jitter)
    if stage.parallel == "fsdp":  # the heads are a unit of their own: FSDP averages their gradients
        fully_shard_stage(objective, model, stage.trainable, bf16, heads)
        wrapped = objective
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    else:
        wrapped = objective

    def losses(batch) -> dict[str, torch.Tensor]:
        batch, objects = batch
        out = wrapped(batch)
        if heads is not None:
            out["attributes"] = heads(out["image_embeds"], objects)
            out["loss"] = out["loss"] + stage.image_attributes * out["attributes"]
        return out

    return StageParts(dataset, Collator(model.tokenizer.eos_id), losses, heads,
                      list(heads.parameters()) if heads is not None and stage.parallel != "fsdp" else [])


def list_of_items(items):
    return items


@dataclass
class PreparedStage:
    """A model set up for one stage: what the loop trains and what it steps with."""

    parts: StageParts
    trained: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def scene_pools(config: TrainConfig, height: int = 240, width: int = 320) -> dict[str, ScenePool]:
    """The training config's pooled renderers, each pool in <out>/scenes."""
    root = Path(config.out) / "scenes"
    return {name: ScenePool(root / f"{name}-train-{count}-{height}x{width}", RENDERERS[name], SPLIT_SEED["train"],
                            count, height, width)
            for name, count in (config.scene_pools or {}).items()}


def prepare_stage(model: NextChatModel, stage: StageConfig, seed: int = 0, start: int = 0,
                  renderers: dict[str, float] | None = None, pools: dict[str, ScenePool] | None = None
                  ) -> PreparedStage:
    """Freeze, adapt (LoRA) and shard (FSDP) ``model`` for ``stage`` and build its data,
    loss, optimizer and schedule: what train_stage runs and memory.measured_step
    measures. ``start``: the step a resumed run starts from (it seeds the stage's
    generator). ``renderers``, ``pools``: how the synthetic scenes are drawn
    (SyntheticTabletop)."""
    if stage.parallel == "fsdp":
        init_single_process_group(model.device)
    world = dist_info()[1]
    params = apply_freeze_schedule(model, stage.trainable)
    if stage.lora:  # the LLM's own weights freeze; its adapters train
        add_lora(model, stage.lora)
        params = [p for p in model.parameters() if p.requires_grad]
    stream = SyntheticTabletop("train", stage.tasks, height=stage.image_height, width=stage.image_width,
                               renderer=renderers or "tabletop", pools=pools)
    generator = torch.Generator().manual_seed(seed * 1000 + start)
    if stage.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    if stage.kind == "vision":
        parts = vision_stage(model, stage, stream, params, seed)
    elif stage.kind == "sam":
        parts = sam_stage(model, stage, stream, params, seed, generator)
    else:
        parts = lm_stage(model, stage, stream, seed, world, uses_bf16(stage, model.device))
    if stage.parallel == "fsdp":  # FSDP replaced the parameters with sharded ones
        params = [p for p in model.parameters() if p.requires_grad]
    trained = params + (list(parts.heads.parameters()) if parts.heads is not None else [])
    model.train()
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": stage.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=stage.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    return PreparedStage(parts, trained, optimizer, scheduler)


def train_stage(model: NextChatModel, stage: StageConfig, out_dir: Path, seed: int = 0,
                max_steps: int | None = None, progress: bool = True, renderers: dict[str, float] | None = None,
                pools: dict[str, ScenePool] | None = None) -> NextChatModel:
    """Train ``model`` for one stage; resumes from ``out_dir/checkpoint`` if present.

    ``max_steps`` stops early (after that many optimizer steps in total) while
    keeping the schedule of ``stage.steps`` -- used to test resumption.
    """
    sharded = stage.parallel == "fsdp"
    if sharded:
        init_single_process_group(model.device)
    rank, world = dist_info()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint"
    saved = json.loads((ckpt / "trainer.json").read_text()) if (ckpt / "trainer.json").is_file() else None
    start = int(saved["step"]) if saved else 0
    stage = _resumable(stage, saved, world, ckpt)
    prepared = prepare_stage(model, stage, seed, start, renderers, pools)
    parts, trained, optimizer, scheduler = prepared.parts, prepared.trained, prepared.optimizer, prepared.scheduler
    step = 0
    if start and sharded:
        step = load_sharded(ckpt, model, parts.heads, optimizer, scheduler)
    elif start:
        step = load_checkpoint(ckpt, model, optimizer, scheduler, parts.heads)
    per_step = stage.batch_size * stage.grad_accum * world
    sampler = StreamSampler(step * per_step, rank, world, stage.batch_size, stage.grad_accum)
    loader = DataLoader(parts.dataset, batch_size=stage.batch_size, sampler=sampler,
                        collate_fn=parts.collate_fn, num_workers=stage.num_workers,
                        prefetch_factor=4 if stage.num_workers else None, persistent_workers=False)
    try:
        _train_steps(model, stage, parts, loader, optimizer, scheduler, trained, step, out_dir, progress, max_steps)
    finally:
        if stage.gradient_checkpointing:
            model.llm.gradient_checkpointing_disable()
    if sharded:  # the next stage, the model directory and the evaluation take a whole model
        model = gathered_model(model)
    if stage.lora:  # the adapters on their own, then folded in: the stage's model is a plain one
        if rank == 0:
            save_adapters(model, out_dir / "adapters", stage.lora)
        merge_lora(model)
    model.requires_grad_(True)
    model.eval()
    return model


def uses_bf16(stage: StageConfig, device: torch.device) -> bool:
    return stage.mixed_precision == "bf16" or (stage.mixed_precision == "auto" and device.type == "cuda"
                                               and torch.cuda.is_bf16_supported())


def _resumable(stage: StageConfig, saved: dict | None, world: int, checkpoint: Path) -> StageConfig:
    """The stage as a resumed run must take it: a checkpoint written by another number
    of ranks continues with the same global batch (grad_accum scaled)."""
    if saved is None:
        return stage
    parallel, old_world = saved.get("parallel", "ddp"), int(saved.get("world_size", world))
    if parallel != stage.parallel:
        raise ValueError(f"{checkpoint} was written with parallel: {parallel}; the stage says {stage.parallel}")
    if old_world == world:
        return stage
    micro_batches = stage.grad_accum * old_world
    if micro_batches % world:
        raise ValueError(f"{checkpoint} was written by {old_world} ranks with grad_accum {stage.grad_accum}: "
                         f"{world} ranks cannot keep its global batch of {micro_batches} micro-batches per step")
    if dist_info()[0] == 0:
        print(f"resuming {checkpoint} (written by {old_world} ranks) on {world}: grad_accum {stage.grad_accum} -> "
              f"{micro_batches // world} keeps the global batch")
    return dataclasses.replace(stage, grad_accum=micro_batches // world)


def _train_steps(model, stage: StageConfig, parts: StageParts, loader, optimizer, scheduler, trained: list,
                 step: int, out_dir: Path, progress: bool, max_steps: int | None = None) -> None:
    """The optimizer steps of one stage from ``step``, with logging, evaluation and checkpoints."""
    rank, world = dist_info()
    device = model.device
    use_bf16 = uses_bf16(stage, device)
    end = min(stage.steps, max_steps) if max_steps else stage.steps
    log = StageLog(out_dir / "metrics.csv", fresh=step == 0) if rank == 0 else None
    bar = tqdm(total=stage.steps, initial=step, desc=f"{stage.name}", disable=not progress or rank != 0,
               unit="step", dynamic_ncols=True)
    batches = iter(loader)
    t_last, samples = time.perf_counter(), 0
    window: list[dict[str, float]] = []  # per-step loss terms since the last log line
    try:
        while step < end:
            optimizer.zero_grad(set_to_none=True)
            running: dict[str, float] = {}
            for _ in range(stage.grad_accum):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    losses = parts.losses(next(batches))
                (losses["loss"] / stage.grad_accum).backward()
                for k in LOSS_TERMS:
                    if k in losses:
                        running[k] = running.get(k, 0.0) + losses[k].item() / stage.grad_accum
                samples += stage.batch_size * world * stage.turns_per_image
            if world > 1:
                running = _mean_over_ranks(running, device)
            if world > 1:
                for p in parts.averaged_by_loop:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(trained, stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            window.append(running)
            if step % stage.log_every == 0 or step == end:
                mean = {k: sum(h.get(k, 0.0) for h in window) / len(window) for k in window[-1]}
                window = []
                rate = samples / (time.perf_counter() - t_last)
                t_last, samples = time.perf_counter(), 0
                bar.set_postfix({k: f"{v:.3f}" for k, v in mean.items()})
                eval_text = _periodic_eval(model, stage, step, bar) if rank == 0 else ""
                if log:
                    log.write(step, scheduler.get_last_lr()[0], mean, rate, eval_text)
            if step % stage.save_every == 0 or step == end:
                if stage.parallel == "fsdp":  # every rank writes its shards
                    save_sharded(out_dir / "checkpoint", model, parts.heads, optimizer, scheduler, step)
                elif rank == 0:
                    save_checkpoint(out_dir / "checkpoint", model, optimizer, scheduler, step, parts.heads,
                                    stage.lora)
    finally:
        bar.close()
        if log:
            log.close()


def _mean_over_ranks(running: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each loss term's mean over the ranks that have it (what metrics.csv logs): the
    loss of the global batch, as one process with the same samples would log it."""
    values = torch.zeros(2, len(LOSS_TERMS), dtype=torch.float64, device=device)
    for i, k in enumerate(LOSS_TERMS):
        if k in running:
            values[0, i], values[1, i] = running[k], 1.0
    dist.all_reduce(values)
    return {k: float(values[0, i] / values[1, i]) for i, k in enumerate(LOSS_TERMS) if values[1, i] > 0}


def _periodic_eval(model, stage: StageConfig, step: int, bar) -> str:
    if not (stage.eval_every and step % stage.eval_every == 0 and stage.kind == "lm"):
        return ""
    model.eval()
    metrics = evaluate(NextChatPredictor(model), "heldout", stage.eval_samples, task_weights={"rec": 1.0},
                       progress=False)
    model.train()
    text = f"rec_acc@0.5={metrics['rec_acc@0.5']:.3f}"
    bar.write(f"[{stage.name} step {step}] held-out {text}")
    return text


class StageLog:
    """metrics.csv of a stage: one row per log step (appended to when resumed)."""

    def __init__(self, path: Path, fresh: bool):
        new = fresh or not path.exists()
        self.file = open(path, "w" if new else "a", newline="")  # noqa: SIM115 (closed by close())
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "lr", *LOSS_TERMS, "samples_per_s", "eval"])

    def write(self, step: int, lr: float, mean: dict[str, float], rate: float, eval_text: str) -> None:
        terms = [f"{mean[k]:.5f}" if k in mean else "" for k in LOSS_TERMS]
        self.writer.writerow([step, f"{lr:.3e}", *terms, f"{rate:.1f}", eval_text])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def initial_model(config: TrainConfig) -> NextChatModel:
    """The model a run's first stage starts from: init_checkpoint's, with the modules
    of init_reset given back the weights build_model(its config, seed) starts with;
    or else init_preset's (with the config's changes), built with the run's seed."""
    if not config.init_checkpoint:
        return build_model(config.model_config(), seed=config.seed)
    model = load_pretrained(config.init_checkpoint)
    if config.init_reset:
        fresh = build_model(model.config, seed=config.seed)
        for name in config.init_reset:
            model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())
    return model


def run(config_path: str | Path, device: str = "cpu", max_steps: int | None = None, progress: bool = True,
        final_eval: bool = True) -> Path:
    """Run every stage of a training config; returns the final model directory."""
    config = TrainConfig.load(config_path)
    device_t = torch.device(device)
    init_distributed(device_t)
    rank, _ = dist_info()
    out = Path(config.out)
    torch.manual_seed(config.seed)
    model = initial_model(config).to(device_t)
    t0 = time.perf_counter()
    timings = {}
    stages = [StageConfig.load(Path(p)) for p in config.stages]
    sizes = {(s.image_height, s.image_width) for s in stages if s.data is None}
    pools = {size: scene_pools(config, *size) for size in sizes}
    for size_pools in pools.values():
        for name, pool in size_pools.items():
            if pool.missing():
                if rank == 0:  # the other ranks wait, then read the same shards
                    ts = time.perf_counter()
                    pool.build(progress=progress)
                    timings[f"scenes:{name}"] = timings.get(f"scenes:{name}", 0.0) + time.perf_counter() - ts
                    (pool.root / "wall_seconds.txt").write_text(f"{timings[f'scenes:{name}']:.1f}\n")
                if dist.is_initialized():
                    dist.barrier()
            elif (pool.root / "wall_seconds.txt").is_file():
                timings[f"scenes:{name}"] = float((pool.root / "wall_seconds.txt").read_text())
    for stage in stages:
        stage_dir = out / stage.name
        final = stage_dir / "model"
        wall = stage_dir / "wall_seconds.txt"  # so a run resumed after this stage still reports its time
        if (final / "model.safetensors").is_file():
            loaded = load_pretrained(final).to(device_t)
            model.load_state_dict(loaded.state_dict())
            if wall.is_file():
                timings[stage.name] = float(wall.read_text())
            continue
        ts = time.perf_counter()
        model = train_stage(model, stage, stage_dir, seed=config.seed, max_steps=max_steps, progress=progress,
                            renderers=config.renderers, pools=pools.get((stage.image_height, stage.image_width)))
        timings[stage.name] = time.perf_counter() - ts
        if max_steps and max_steps < stage.steps:
            return stage_dir  # stopped early on purpose
        if rank == 0:
            save_pretrained(model, final)
            wall.write_text(f"{timings[stage.name]:.1f}\n")
    final_dir = out / "final"
    if rank == 0:
        save_pretrained(model, final_dir)
        report = {"config": str(config_path), "stages": [asdict(StageConfig.load(Path(s))) for s in config.stages],
                  "train_seconds": timings, "total_seconds": sum(timings.values()),
                  "this_invocation_seconds": time.perf_counter() - t0,
                  "torch_threads": torch.get_num_threads(), "device": device}
        if final_eval and config.final_eval_samples:
            metrics = evaluate(NextChatPredictor(model), "heldout", config.final_eval_samples, progress=progress)
            report["heldout_metrics"] = metrics
            print(format_metrics(metrics))
        (out / "report.json").write_text(json.dumps(report, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return final_dir
