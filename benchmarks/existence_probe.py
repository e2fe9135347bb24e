"""Can "is there a {colour} {kind}?" be read off a vision tower's patch features by attention?

    .venv/bin/python benchmarks/existence_probe.py [--model DIR ...] [--num-scenes 300]
        [--json out/existence_probe.json] [--plot out/existence_probe.png]

A model answers a yes/no question by attending from the question's words to the
image tokens. Whether its tower hands the LLM the answer in a form that attention
reads is what this measures, apart from anything the LLM stages learn. For each
tower (every --model's, and the first's architecture at its random initialisation),
a probe (train.ExistenceHead, the head of the vision stage's existence term) is fit
on the patch features the LLM reads (the tower's vision.select_layer, standardised on
the probe's training set):

    key_p  = W z_p                          (one linear map for every patch)
    query  = colour_embedding + kind_embedding
    logit  = logsumexp_p(key_p . query) + b (a soft max over the patches)

so "yes" needs one patch whose features match the colour and the kind together, as
one attention head would find it. The questions are those of the yes/no task, as
pairs: every (colour, kind) the scene holds ("yes") and, per scene, one absent pair
of each of `nextchat evaluate --task pope`'s strategies ("no": random, popular,
adversarial; samples.existence_pairs). The probe is fit on one renderer's scenes and tested
on held-out scenes of every renderer (disjoint halves of held-out seeds): the
diagonal says whether the tower's features hold the answer for those drawings in
that form, off the diagonal whether it carries over. No weight of a model changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from absence import auroc
from common import RENDERERS, draw_scene, plot_heatmaps, run_info, write_json
from kind_probe import patch_features
from nextchat_training.train import COLOR_NAMES, KIND_NAMES, ExistenceHead
from tqdm import tqdm

from nextchat_ros.model import build_model
from nextchat_ros.model.build import DEFAULT_MODEL_DIR
from nextchat_ros.model.checkpoint import load_pretrained
from nextchat_ros.synthetic.samples import POPE_STRATEGIES, existence_pairs

SEED_OFFSET = 3_200_000_000  # held-out seeds no other benchmark draws
PROBE_STEPS = 400


def questions(scenes) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Each scene's samples.existence_pairs: (questions, 3) of (scene, colour, kind),
    (questions,) 1 where the pair is present, and each question's strategy."""
    rows = [(index, COLOR_NAMES.index(c), KIND_NAMES.index(k), strategy)
            for index, scene in enumerate(scenes)
            for c, k, strategy in existence_pairs(scene, np.random.default_rng(index))]
    return (torch.tensor([r[:3] for r in rows]), torch.tensor([int(r[3] == "positive") for r in rows]),
            [r[3] for r in rows])


def fit(patches: torch.Tensor, asked: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """Fit an ExistenceHead (AdamW, full batch, a little weight decay); returns a function
    from (patches, asked) to logits, standardising as on the training set."""
    mean, std = patches.mean((0, 1)), patches.std((0, 1)) + 1e-6
    torch.manual_seed(seed)
    probe = ExistenceHead(patches.shape[-1])
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-2)
    z = (patches - mean) / std
    with torch.enable_grad():
        for _ in range(PROBE_STEPS):
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(probe(z, asked), labels.float()).backward()
            optimizer.step()
    return lambda p, a: probe((p - mean) / std, a).detach()


def scores(logits: torch.Tensor, labels: torch.Tensor, strategies: list[str]) -> dict:
    said = logits > 0
    out = {"accuracy": float((said == labels.bool()).float().mean()),
           "auroc": auroc(logits.numpy(), labels.numpy() == 1),
           "recall": float(said[labels == 1].float().mean())}
    for strategy in POPE_STRATEGIES:  # how often each kind of absent pair is refused
        chosen = torch.tensor([s == strategy for s in strategies])
        out[f"refused_{strategy}"] = float((~said[chosen]).float().mean())
    return out


def label(name: str) -> str:
    """A tower's short name: its model directory's last three parts."""
    return "/".join(Path(name).parts[-3:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="a model directory whose tower to probe; repeat to compare towers (default: the "
                             "shipped tiny model); runs on the CPU")
    parser.add_argument("--num-scenes", type=int, default=300,
                        help="held-out scenes per renderer, half to fit the probe, half to test it (default 300)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--plot", default=None, help="also draw the accuracy matrices to this PNG")
    args = parser.parse_args(argv)
    if args.num_scenes < 4:
        parser.error("--num-scenes must be at least 4 (half fits the probe, half tests it)")
    models = {str(path): load_pretrained(path) for path in (args.model or [DEFAULT_MODEL_DIR])}
    first = next(iter(models.values()))
    towers = {name: (m.vision_tower.eval(), m.config.vision.select_layer) for name, m in models.items()}
    towers["random"] = (build_model(first.config, seed=0).vision_tower.eval(), first.config.vision.select_layer)

    half = args.num_scenes // 2
    scenes = {r: [draw_scene(r, SEED_OFFSET + k) for k in tqdm(range(args.num_scenes), desc=r, unit="scene")]
              for r in RENDERERS}
    parts = {(r, part): chosen for r in RENDERERS
             for part, chosen in (("train", scenes[r][:half]), ("test", scenes[r][half:]))}
    asked = {key: questions(chosen) for key, chosen in parts.items()}
    results = {}
    for name, (tower, layer) in towers.items():
        with torch.no_grad():
            patches = {key: torch.stack([patch_features(tower, s, layer) for s in chosen])
                       for key, chosen in tqdm(parts.items(), desc=f"features {label(name)}")}
        results[name] = {}
        for source in RENDERERS:
            pairs, labels, strategies = asked[source, "train"]
            probe = fit(patches[source, "train"], pairs, labels)
            # how well the probe fits its own training questions: a low figure here is the
            # probe's limit, not the tower's
            results[name][source] = {"fit": scores(probe(patches[source, "train"], pairs), labels, strategies)}
            for target in RENDERERS:
                pairs, labels, strategies = asked[target, "test"]
                results[name][source][target] = scores(probe(patches[target, "test"], pairs), labels, strategies)
        print(f"\n{name}: accuracy / AUROC, rows = fit on, columns = tested on")
        print(" " * 10 + "".join(f"{t:>16}" for t in ("fit", *RENDERERS)))
        for source, row in results[name].items():
            print(f"{source:>10}" + "".join(f"{row[t]['accuracy']:>9.3f} /{row[t]['auroc']:.3f}"
                                            for t in ("fit", *RENDERERS)))
    counts = {f"{r} {part}": len(labels) for (r, part), (_, labels, _) in asked.items()}
    present = {r: float(asked[r, "test"][1].float().mean()) for r in RENDERERS}
    majority = {r: max(share, 1 - share) for r, share in present.items()}
    print(f"\nquestions: {counts}; the commoner answer's share of each test set: "
          + ", ".join(f"{r} {v:.3f}" for r, v in majority.items()))
    write_json(args.json, {**run_info(torch.device("cpu"), first.config.preset, "fp32"), "questions": counts,
                           "majority": majority, "probe_steps": PROBE_STEPS, "towers": results})
    if args.plot:
        plot_heatmaps(args.plot, [[{"values": [[results[name][s][t]["accuracy"] for t in RENDERERS]
                                                for s in RENDERERS],
                                     "xticks": RENDERERS, "yticks": RENDERERS, "annotate": True,
                                     "title": f"existence, {label(name)} tower", "xlabel": "tested on",
                                     "ylabel": "fit on"}] for name in results])


if __name__ == "__main__":
    main()
