"""How well can an object's kind be told from its pixels alone, per renderer?

    .venv/bin/python benchmarks/kind_ceiling.py [--train-scenes 3000] [--test-scenes 300]
        [--variants full,half,masked,grid,stem,stem_position] [--epochs 10] [--norm batch|group]
        [--schedule one-cycle|stage] [--max-grad-norm N] [--weight-decay W] [--colour-weight W]
        [--loss-weight W] [--json out/kind_ceiling.json] [--plot out/kind_ceiling.png]

`kind_probe.py` reads the kind from the vision tower's mask-pooled patch features
and finds it mostly missing for 3D solids. This asks the question without the
tower: a small CNN (four 3x3 conv blocks, global pooling) is trained from scratch
on square crops around each listed object (its box grown by a fifth, resized to
40x40) of the solids training renderer's scenes (training split seeds, as the
training pools draw them), and tested on held-out seeds of every renderer, the
ray caster included (no training run ever sees it). If the crop CNN reads kinds
where the tower does not, the pixels hold the shape and the tower's
architecture, pooling or recipe loses it.

Variants, each its own CNN from the same seed:

- ``full``: crops of the 320x240 image;
- ``half``: the image first halved (antialiased), as the tiny tower's 160 px input
  sees it, then cropped and resized the same way: does the tower's resolution
  lose the shape?
- ``masked``: full resolution with everything outside the object's visible mask
  set to grey: the shape of the mask and the shading inside it, no context;
- ``grid``: no crops. The whole image as the tiny tower takes it (square-padded,
  160 px) through a CNN of the same four blocks down to the tower's 10x10 grid
  (and one more 3x3 conv there), each object's feature its cells pooled by mask
  coverage exactly as the vision stage pools the tower's patches
  (``object_patch_targets``), then a linear classifier: the tower's input and
  pooling with a CNN in place of the ViT. Between the crops and the tower, it says
  whether the 10x10 pooling or the tower itself loses the shape;
- ``stem``: ``grid`` with the tiny tower's own patch stem in place of the grid
  CNN's blocks (``CNNStem`` at the CNN-stem pilots' width, GroupNorm, its last
  convolution with no norm or ReLU after it) and the LayerNorm the tower puts after
  it, then the same pooling and classifier: taught by this script's recipe, does the
  stem read what the grid CNN reads? (``--norm`` does not apply: the stem has
  GroupNorm.)
- ``stem_position``: ``stem`` with the tower's learned position embedding between
  the stem and the LayerNorm, initialised as the tower's (``sincos_2d``, larger
  than the stem's output at the start): does the position signal the tower adds
  drown the shape?

``--norm group`` builds every CNN with GroupNorm (8 groups) where it has
BatchNorm, as the tower's ``CNNStem`` does (so that a frozen tower stays the same
function in train mode): does the tower's normalisation lose the shape?

The recipe (AdamW at 2e-3, weight decay 1e-4, one-cycle lr with its momentum
cycling, no gradient clipping, the kind loss alone) can be moved toward the vision
stage's one setting at a time, to find what keeps the stage from the kinds this
script's models read: ``--schedule stage`` (the stage's lr schedule, a linear
warm-up from 0 over the first tenth and a cosine to 0, AdamW's fixed betas),
``--max-grad-norm 1.0`` (the stage clips), ``--weight-decay 0`` (the stage's),
``--colour-weight 1`` (grid variants: each object's colour from the same pooled
features through a second linear head, its loss added with this weight, as the
stage's object term adds it at 1) and ``--loss-weight 4`` (the stage's ``object_weight``; it changes a step only
through clipping, since Adam's steps do not depend on the loss's scale).

Chance is 1/6. Runs on the CPU; no model is read or changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from common import RENDERERS, draw_scene, plot_heatmaps, run_info, write_json
from nextchat_training.batches import object_patch_targets
from nextchat_training.train import StageConfig, lr_lambda
from tqdm import tqdm

from nextchat_ros.model.config import get_preset
from nextchat_ros.model.vision import preprocess_image
from nextchat_ros.synthetic.samples import RENDERERS as RENDER_FUNCTIONS
from nextchat_ros.synthetic.samples import SPLIT_SEED
from nextchat_ros.synthetic.scenes import COLORS, KINDS

VARIANTS = ("full", "half", "masked", "grid", "stem", "stem_position")
# The whole image pooled over the 10x10 grid, not crops.
GRID_VARIANTS = ("grid", "stem", "stem_position")
CROP = 40
SEED_OFFSET = 3_200_000_000  # held-out seeds no other benchmark draws
GREY = 0.5


def object_crops(scene, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(objects, 3, CROP, CROP) float crops in [0, 1] and their kind labels."""
    image = torch.from_numpy(scene.image.copy()).permute(2, 0, 1).float() / 255
    scale = 0.5 if variant == "half" else 1.0
    if scale != 1.0:
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", antialias=True,
                              align_corners=False)[0]
    height, width = image.shape[1:]
    crops, kinds = [], []
    for obj in scene.objects:
        x0, y0, x1, y1 = (float(v) * scale for v in obj.box)
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        source = image
        if variant == "masked":
            mask = torch.from_numpy(obj.mask)[None].float()
            source = image * mask + GREY * (1 - mask)
        side = 1.2 * max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = round(cx - side / 2), round(cy - side / 2)
        size = max(2, round(side))
        # Pad with grey where the square leaves the image, then crop.
        pad = (max(0, -left), max(0, left + size - width), max(0, -top), max(0, top + size - height))
        padded = F.pad(source, pad, value=GREY)
        crop = padded[:, top + pad[2]:top + pad[2] + size, left + pad[0]:left + pad[0] + size]
        crops.append(F.interpolate(crop[None], size=(CROP, CROP), mode="bilinear", antialias=True,
                                   align_corners=False)[0])
        kinds.append(KINDS.index(obj.kind))
    if not crops:
        return torch.zeros(0, 3, CROP, CROP), torch.zeros(0, dtype=torch.long)
    return torch.stack(crops), torch.tensor(kinds)


def crops_of(scenes, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every listed object's crop and kind over ``scenes``."""
    parts = [object_crops(scene, variant) for scene in scenes]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


NORMS = ("batch", "group")


def conv_block(width_in: int, width_out: int, pool: bool, norm: str) -> list[torch.nn.Module]:
    """3x3 convolution, BatchNorm (or GroupNorm of 8 groups, as the tower's CNNStem
    has), ReLU and, if ``pool``, a 2x2 max-pool."""
    normalise = torch.nn.BatchNorm2d(width_out) if norm == "batch" else torch.nn.GroupNorm(8, width_out)
    layers = [torch.nn.Conv2d(width_in, width_out, 3, padding=1), normalise, torch.nn.ReLU()]
    return [*layers, torch.nn.MaxPool2d(2)] if pool else layers


WIDTHS = [3, 32, 64, 128, 128]


class CropCNN(torch.nn.Sequential):
    """Four conv blocks (a 2x2 max-pool after the first three), global average
    pooling and a linear classifier."""

    def __init__(self, classes: int, norm: str):
        layers = [layer for k in range(4) for layer in conv_block(WIDTHS[k], WIDTHS[k + 1], k < 3, norm)]
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(WIDTHS[-1], classes)]
        super().__init__(*layers)


class CoveragePooled(torch.nn.Module):
    """Features on the tiny tower's 10x10 grid (``cells``, each subclass its own),
    pooled per object by mask coverage as the vision stage pools the tower's
    patches, and a linear kind classifier (``classify``); with ``colour`` also a
    linear colour classifier on the same pooled features (``--colour-weight``)."""

    def __init__(self, width: int, classes: int, colour: bool):
        super().__init__()
        self.classify = torch.nn.Linear(width, classes)
        self.colour = torch.nn.Linear(width, len(COLORS)) if colour else None

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, cells, C) features."""
        raise NotImplementedError

    def pooled(self, images: torch.Tensor, covers: list[torch.Tensor]) -> torch.Tensor:
        """(B, 3, S, S) images and per image (objects, cells) pooling weights ->
        (all objects, C) features."""
        return torch.cat([cover @ cell for cover, cell in zip(covers, self.cells(images))])

    def forward(self, images: torch.Tensor, covers: list[torch.Tensor]) -> torch.Tensor:
        """-> (all objects, classes) kind logits."""
        return self.classify(self.pooled(images, covers))


class GridCNN(CoveragePooled):
    """The same four conv blocks down to the tiny tower's 10x10 grid, one more 3x3
    conv there, mask-coverage pooling per object and a linear classifier."""

    def __init__(self, classes: int, norm: str, colour: bool = False):
        super().__init__(WIDTHS[-1], classes, colour)
        layers = [layer for k in range(4) for layer in conv_block(WIDTHS[k], WIDTHS[k + 1], True, norm)]
        self.features = torch.nn.Sequential(*layers, *conv_block(WIDTHS[-1], WIDTHS[-1], False, norm))

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).flatten(2).transpose(1, 2)


class StemGrid(CoveragePooled):
    """The tiny tower's CNN patch stem, with ``position`` its learned position
    embedding (initialised as the tower's), and the LayerNorm after it (the tower's
    pre-LayerNorm), mask-coverage pooling per object and a linear classifier."""

    def __init__(self, classes: int, position: bool = False, colour: bool = False):
        from nextchat_ros.model.vision import CNNStem, sincos_2d

        vision = get_preset("tiny").vision
        super().__init__(vision.hidden_size, classes, colour)
        self.features = CNNStem(vision.patch_size, vision.hidden_size)
        grid = vision.image_size // vision.patch_size
        self.position = torch.nn.Parameter(sincos_2d(grid, vision.hidden_size)) if position else None
        self.norm = torch.nn.LayerNorm(vision.hidden_size)

    def cells(self, images: torch.Tensor) -> torch.Tensor:
        cells = self.features(images).flatten(2).transpose(1, 2)
        return self.norm(cells if self.position is None else cells + self.position)


def grid_inputs(scenes) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Tower-preprocessed images (fp16, to keep thousands in memory), each image's
    objects' coverage weights (normalised to sum to 1), kind labels and colour
    labels."""
    config = get_preset("tiny")
    images, covers, kinds, colours = [], [], [], []
    for scene in scenes:
        cover, colour, kind = object_patch_targets(scene, config)
        keep = cover.sum(1) > 0
        images.append(preprocess_image(torch.from_numpy(scene.image.copy()), config.vision).half())
        covers.append(cover[keep] / cover[keep].sum(1, keepdim=True))
        kinds.append(kind[keep] - 1)  # object_patch_targets counts kinds and colours from 1
        colours.append(colour[keep] - 1)
    if tuple(cover.shape[1:]) != (100,):
        raise RuntimeError(f"the tiny tower's grid changed: {cover.shape[1]} cells, the CNN makes 100")
    return torch.stack(images), covers, kinds, colours


@dataclass(frozen=True)
class Recipe:
    """How :func:`fit` trains. The defaults are this script's own; the vision stage's
    pilots train with ``Recipe("stage", 1.0, 0.0, 1.0, 4.0)`` (see the module's
    docstring)."""

    schedule: str = "one-cycle"  # or "stage": the vision stage's warm-up and cosine, fixed betas
    max_grad_norm: float | None = None  # clip the gradient's norm to this (None: no clipping)
    weight_decay: float = 1e-4
    colour_weight: float = 0.0  # grid variants: each object's colour loss from the same pooled features, weighed
    loss_weight: float = 1.0  # the loss is multiplied by this


SCHEDULES = ("one-cycle", "stage")
LR = 2e-3


def fit(model: torch.nn.Module, epochs: int, steps_per_epoch: int, batches, seed: int, desc: str,
        recipe: Recipe = Recipe()) -> torch.nn.Module:
    """Train ``model`` with AdamW as ``recipe`` says; ``batches(generator)`` yields
    one epoch's losses in a seeded random order, each computed when it is asked
    for."""
    steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=recipe.weight_decay)
    if recipe.schedule == "stage":  # the stage's own schedule function, as its pilots set it
        schedule = lr_lambda(StageConfig("kind_ceiling", kind="vision", steps=steps, lr=LR, min_lr_ratio=0.0,
                                         warmup_ratio=0.1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(epochs):
            for loss in batches(generator):
                optimizer.zero_grad()
                (recipe.loss_weight * loss).backward()
                if recipe.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return model.eval()


def train_grid_cnn(inputs, epochs: int, batch_size: int, seed: int, norm: str,
                   variant: str = "grid", recipe: Recipe = Recipe()) -> CoveragePooled:
    """The grid CNN, or for the ``stem`` variants the tower's patch stem in its place."""
    images, covers, kinds, colours = inputs
    torch.manual_seed(seed)
    stem = variant != "grid"
    colour = recipe.colour_weight > 0
    model = StemGrid(len(KINDS), variant == "stem_position", colour) if stem else \
        GridCNN(len(KINDS), norm, colour)
    batch_size = max(1, batch_size // 4)  # scenes of ~3.5 objects each

    def batches(generator):
        order = torch.randperm(len(images), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            pooled = model.pooled(images[index].float(), [covers[i] for i in index])
            loss = F.cross_entropy(model.classify(pooled), torch.cat([kinds[i] for i in index]))
            if model.colour is not None:  # as the stage's object term: colour and kind, summed
                loss = loss + recipe.colour_weight * F.cross_entropy(model.colour(pooled),
                                                                     torch.cat([colours[i] for i in index]))
            yield loss

    return fit(model, epochs, (len(images) + batch_size - 1) // batch_size, batches, seed,
               "tower stem" if stem else "grid CNN", recipe)


def scored(truth: torch.Tensor, predicted: torch.Tensor) -> tuple[float, np.ndarray]:
    """Accuracy and the (true, predicted) kind confusion counts."""
    confusion = np.zeros((len(KINDS), len(KINDS)), dtype=int)
    np.add.at(confusion, (truth.numpy(), predicted.numpy()), 1)
    return float((predicted == truth).float().mean()), confusion


@torch.no_grad()
def grid_accuracy(model: CoveragePooled, inputs) -> tuple[float, np.ndarray]:
    images, covers, kinds, _ = inputs
    predicted = torch.cat([model(images[s:s + 64].float(), covers[s:s + 64]).argmax(-1)
                           for s in range(0, len(images), 64)])
    return scored(torch.cat(kinds), predicted)


def train_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, seed: int, norm: str,
              desc: str, recipe: Recipe = Recipe()) -> CropCNN:
    torch.manual_seed(seed)
    model = CropCNN(len(KINDS), norm)

    def batches(generator):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            batch = x[index]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # a kind is the same mirrored
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            yield F.cross_entropy(model(batch), y[index])

    return fit(model, epochs, (len(x) + batch_size - 1) // batch_size, batches, seed, desc, recipe)


@torch.no_grad()
def accuracy(model: CropCNN, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    return scored(y, torch.cat([model(x[s:s + 512]).argmax(-1) for s in range(0, len(x), 512)]))


def plot(path: str, results: dict) -> None:
    """Each variant's confusion matrix on each renderer, rows normalised to sum to 1."""
    def rows(confusion) -> np.ndarray:
        confusion = np.array(confusion, dtype=float)
        return confusion / np.maximum(confusion.sum(1, keepdims=True), 1)

    plot_heatmaps(path, [[{"values": rows(results[variant][renderer]["confusion"]), "xticks": KINDS,
                           "yticks": KINDS, "rotate_x": True,
                           "title": f"{variant} on {renderer}: {results[variant][renderer]['accuracy']:.2f}",
                           "xlabel": "predicted", "ylabel": "true"}
                          for renderer in RENDERERS] for variant in results], cell=(3.8, 3.6))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-scenes", type=int, default=3000,
                        help="solids training-split scenes to train each CNN on (default 3000)")
    parser.add_argument("--test-scenes", type=int, default=300, help="held-out scenes per renderer (default 300)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs over the training crops (default 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm", choices=NORMS, default="batch",
                        help="the CNNs' normalisation: batch (default), or group (GroupNorm, 8 groups), "
                             "as the tower's CNNStem has")
    parser.add_argument("--schedule", choices=SCHEDULES, default="one-cycle",
                        help="the lr schedule: one-cycle (default; with its momentum cycling), or stage (the "
                             "vision stage's: linear warm-up over a tenth, cosine to 0, AdamW's fixed betas)")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="clip the gradient's norm to this, as the stage does at 1.0 (default: no clipping)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's (default 1e-4; the stage's: 0)")
    parser.add_argument("--colour-weight", type=float, default=0.0,
                        help="grid variants: add each object's colour loss from the same pooled features with "
                             "this weight, as the stage's object term does at 1 (default 0: none)")
    parser.add_argument("--loss-weight", type=float, default=1.0,
                        help="multiply the loss by this (the stage's object_weight is 4; it matters only "
                             "with clipping)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--plot", default=None, help="also draw each variant's confusion matrices to this PNG")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"unknown --variants {unknown}; use some of {', '.join(VARIANTS)}")
    if args.train_scenes < 1 or args.test_scenes < 1 or args.epochs < 1:
        parser.error("--train-scenes, --test-scenes and --epochs must be at least 1")
    if args.colour_weight and set(variants) - set(GRID_VARIANTS):
        parser.error(f"--colour-weight applies to the grid variants only ({', '.join(GRID_VARIANTS)})")
    if (args.max_grad_norm is not None and not args.max_grad_norm > 0) or not args.weight_decay >= 0 \
            or not args.loss_weight > 0 or not args.colour_weight >= 0:
        parser.error("--max-grad-norm and --loss-weight must be above 0, --weight-decay and --colour-weight "
                     "at least 0")
    recipe = Recipe(args.schedule, args.max_grad_norm, args.weight_decay, args.colour_weight, args.loss_weight)

    render_solids = RENDER_FUNCTIONS["solids"]
    train_scenes = [render_solids(SPLIT_SEED["train"] + k, height=240, width=320)
                    for k in tqdm(range(args.train_scenes), desc="solids (train split)", unit="scene")]
    test_scenes = {r: [draw_scene(r, SEED_OFFSET + k) for k in tqdm(range(args.test_scenes), desc=r, unit="scene")]
                   for r in RENDERERS}
    results, counts = {}, {}
    for variant in variants:
        t0 = time.perf_counter()
        if variant in GRID_VARIANTS:
            inputs = grid_inputs(train_scenes)
            model = train_grid_cnn(inputs, args.epochs, args.batch_size, args.seed, args.norm, variant, recipe)
            measure = grid_accuracy
            test_inputs = {r: grid_inputs(test_scenes[r]) for r in RENDERERS}
        else:
            inputs = crops_of(train_scenes, variant)
            model = train_cnn(*inputs, args.epochs, args.batch_size, args.seed, args.norm, f"{variant} crops",
                              recipe)
            measure = lambda model, inputs: accuracy(model, *inputs)  # noqa: E731
            test_inputs = {r: crops_of(test_scenes[r], variant) for r in RENDERERS}
        train_accuracy, train_confusion = measure(model, inputs)
        counts[f"solids train ({variant})"] = int(train_confusion.sum())
        results[variant] = {"train_s": round(time.perf_counter() - t0, 1), "train_accuracy": train_accuracy}
        for renderer in RENDERERS:
            acc, confusion = measure(model, test_inputs[renderer])
            counts[f"{renderer} test"] = int(confusion.sum())
            results[variant][renderer] = {"accuracy": acc, "confusion": confusion.tolist()}
        print(f"{variant:>7}: train {results[variant]['train_accuracy']:.3f}  " +
              "  ".join(f"{r} {results[variant][r]['accuracy']:.3f}" for r in RENDERERS) +
              f"  ({results[variant]['train_s']:.0f} s)")
    print(f"objects: {counts}; kinds in confusion order: {list(KINDS)}")
    write_json(args.json, {**run_info(torch.device("cpu"), "none", "fp32"), "objects": counts,
                           "epochs": args.epochs, "norm": args.norm, "recipe": dataclasses.asdict(recipe), "crop": CROP,
                           "results": results})
    if args.plot:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
