"""Can the vision tower's patch features tell an object's kind, colour and size, per renderer?

    .venv/bin/python benchmarks/kind_probe.py [--model DIR] [--num-scenes 300] [--layer K] [--stage-heads DIR]
        [--json out/kind_probe.json] [--plot out/kind_probe.png]

Why the model grounds the ray-cast renderer's objects so much worse than its own
could lie in two places: the image features (the tower cannot see a cup as a cup
in those drawings) or what is learnt on top of them. This separates the two. Each
listed object's feature is the mean of the tower's patch features (by default the
layer the LLM reads; ``--layer`` picks another) over the patches its mask covers,
weighted by how much of each patch it covers. A linear probe (multinomial logistic
regression, features standardised on its training set) is trained on the objects of
one renderer and tested on held-out scenes of every renderer:

- the diagonal (train and test on one renderer, disjoint scenes) says whether the
  features hold the attribute for those drawings at all;
- off the diagonal, whether what separates the attribute in one renderer's
  features carries over to another's.

The same is done with the tower at its random initialisation (same architecture,
seed 0): what training the tower added over its architecture and the mask pooling.
Chance is 1/6 for kinds, 1/8 for colours, 1/3 for sizes. Scenes are held-out seeds
(``common.draw_scene``); the probe's own training scenes and its test scenes are
disjoint halves. No weight of the model changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RENDERERS, draw_scene, plot_heatmaps, run_info, write_json
from nextchat_training.batches import object_patch_targets
from tqdm import tqdm

from nextchat_ros.model import build_model
from nextchat_ros.model.build import DEFAULT_MODEL_DIR
from nextchat_ros.model.checkpoint import load_pretrained
from nextchat_ros.synthetic.scenes import COLORS, KINDS, SIZES

ATTRIBUTES = {"kind": list(KINDS), "color": list(COLORS), "size": list(SIZES)}
SEED_OFFSET = 3_100_000_000  # held-out seeds no other benchmark draws
PROBE_STEPS = 300


def patch_features(tower, scene, layer: int) -> torch.Tensor:
    """(grid*grid, hidden) the tower's hidden state ``layer`` on ``scene``, without the CLS token."""
    pixels = tower.preprocess(torch.from_numpy(scene.image.copy()))[None]
    return tower.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][0, 1:].float()


@torch.no_grad()  # the probe trains on these: not inference tensors
def object_features(tower, scenes, config, layer: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(objects, hidden) mask-pooled patch features of the tower's hidden state
    ``layer`` (0: the patch embedding, as the first transformer layer takes it),
    and each attribute's labels."""
    features, labels = [], {name: [] for name in ATTRIBUTES}
    for scene in scenes:
        patches = patch_features(tower, scene, layer)
        # Each object's share of each patch on the square-padded image the tower sees,
        # as the vision stage pools them.
        covers = object_patch_targets(scene, config)[0]
        for obj, cover in zip(scene.objects, covers):
            if cover.sum() <= 0:
                continue
            features.append(cover @ patches / cover.sum())
            for name, values in ATTRIBUTES.items():
                labels[name].append(values.index(getattr(obj, name)))
    return torch.stack(features), {name: torch.tensor(v) for name, v in labels.items()}


def train_probe(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int = 0):
    """A standardised linear probe fit by full-batch L-BFGS with a little weight decay;
    returns a function from features to predicted classes."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(z), y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    return lambda features: linear((features - mean) / std).argmax(-1)


def probe_matrix(features: dict, labels: dict) -> dict:
    """{attribute: {train renderer: {test renderer: accuracy}}}."""
    out = {}
    for name, values in ATTRIBUTES.items():
        out[name] = {}
        for source in RENDERERS:
            predict = train_probe(features[source]["train"], labels[source]["train"][name], len(values))
            out[name][source] = {
                target: float((predict(features[target]["test"]) == labels[target]["test"][name]).float().mean())
                for target in RENDERERS}
    return out


@torch.no_grad()
def stage_head_accuracy(heads, features: torch.Tensor, labels: dict) -> dict[str, float]:
    """The vision stage's own colour and kind heads on object_features' objects,
    each object's patches pooled as the stage pools them in training (the
    coverage-weighted mean): what its loss reached on drawings it never saw. The
    heads count classes from 1 (0 is 'no object')."""
    return {name: float((getattr(heads, name)(features).argmax(-1) - 1 == labels[name]).float().mean())
            for name in ("kind", "color")}


def load_stage_heads(checkpoint: Path, hidden: int):
    """The per-patch heads a vision stage saved beside its checkpoint (trainer.pt)."""
    from nextchat_training.train import VisionHeads

    path = checkpoint / "trainer.pt"
    if not path.is_file():
        raise SystemExit(f"--stage-heads: no {path}; give a vision stage's checkpoint directory "
                         "(<out>/vision/checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not state.get("heads"):
        raise SystemExit(f"--stage-heads: {path} holds no heads; it is not a vision stage's checkpoint")
    heads = VisionHeads(hidden, existence=any(k.startswith("existence.") for k in state["heads"]))
    heads.load_state_dict(state["heads"])
    return heads.eval()


def print_matrix(title: str, matrix: dict) -> None:
    print(f"\n{title}: probe accuracy, rows = trained on, columns = tested on")
    for name, rows in matrix.items():
        print(f"  {name:<6}" + "".join(f"{r:>10}" for r in RENDERERS))
        for source, row in rows.items():
            print(f"  {source:>8}" + "".join(f"{row[t]:>10.3f}" for t in RENDERERS))


def plot(path: str, results: dict) -> None:
    plot_heatmaps(path, [[{"values": [[results[tower][name][s][t] for t in RENDERERS] for s in RENDERERS],
                           "xticks": RENDERERS, "yticks": RENDERERS, "annotate": True,
                           "title": f"{name}, {tower} tower (chance {1 / len(ATTRIBUTES[name]):.2f})",
                           "xlabel": "tested on", "ylabel": "trained on"}
                          for name in ATTRIBUTES] for tower in results])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR,
                        help="model directory (default: the shipped tiny model); runs on the CPU")
    parser.add_argument("--num-scenes", type=int, default=300,
                        help="held-out scenes per renderer, half to train the probe, half to test it (default 300)")
    parser.add_argument("--layer", type=int, default=None,
                        help="the tower's hidden state to probe: 0 is the patch embedding, k the output of "
                             "transformer layer k, negative counts from the end (default: the layer the LLM "
                             "reads, the model's vision.select_layer)")
    parser.add_argument("--stage-heads", type=Path, default=None,
                        help="a vision stage's checkpoint directory (<out>/vision/checkpoint): also score that "
                             "stage's own colour and kind heads on every renderer's held-out objects. --model "
                             "must hold the tower those heads were trained with (a vision-only run's final "
                             "model, or this directory)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--plot", default=None, help="also draw the accuracy matrices to this PNG")
    args = parser.parse_args(argv)
    if args.num_scenes < 4:
        parser.error("--num-scenes must be at least 4 (half trains the probe, half tests it)")

    model = load_pretrained(args.model)
    depth = model.config.vision.num_hidden_layers
    layer = model.config.vision.select_layer if args.layer is None else args.layer
    if not -(depth + 1) <= layer <= depth:
        parser.error(f"--layer must be between {-(depth + 1)} and {depth}: the tower has {depth} transformer layers")
    heads = None if args.stage_heads is None else load_stage_heads(args.stage_heads, model.config.vision.hidden_size)
    random_model = build_model(model.config, seed=0)
    towers = {"trained": model.vision_tower.eval(), "random": random_model.vision_tower.eval()}
    half = args.num_scenes // 2
    scenes = {r: [draw_scene(r, SEED_OFFSET + k) for k in tqdm(range(args.num_scenes), desc=r, unit="scene")]
              for r in RENDERERS}
    results, counts, trained_objects = {}, {}, {}
    for tower_name, tower in towers.items():
        features, labels = {}, {}
        for renderer in RENDERERS:
            features[renderer], labels[renderer] = {}, {}
            for part, chosen in (("train", scenes[renderer][:half]), ("test", scenes[renderer][half:])):
                objects = object_features(tower, chosen, model.config, layer)
                features[renderer][part], labels[renderer][part] = objects
                counts[f"{renderer} {part}"] = len(labels[renderer][part]["kind"])
                if tower_name == "trained":
                    trained_objects[renderer, part] = objects
        results[tower_name] = probe_matrix(features, labels)
        print_matrix(f"{tower_name} tower", results[tower_name])
    print(f"\nobjects: {counts}; tower hidden state {layer} of {-(depth + 1)}..{depth}")
    figures = {**run_info(torch.device("cpu"), model.config.preset, "fp32"), "objects": counts, "layer": layer,
               "probes": results}
    if heads is not None:
        figures["stage_heads"] = {}
        for r in RENDERERS:  # all of the renderer's held-out objects, the probe's training half too
            both = [trained_objects[r, part] for part in ("train", "test")]
            figures["stage_heads"][r] = stage_head_accuracy(
                heads, torch.cat([o[0] for o in both]),
                {name: torch.cat([o[1][name] for o in both]) for name in ("kind", "color")})
        print("\nthe vision stage's own heads, all held-out objects:")
        for renderer, scores in figures["stage_heads"].items():
            print(f"  {renderer:>8}  kind {scores['kind']:.3f}  colour {scores['color']:.3f}")
    write_json(args.json, figures)
    if args.plot:
        plot(args.plot, results)


if __name__ == "__main__":
    main()
