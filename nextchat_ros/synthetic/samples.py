"""Samples for every NExT-Chat task, made from procedural tabletop scenes.

Each scene (``scenes.render_scene``) gives exact boxes and masks;
this module turns it into question/answer pairs whose answers are written the
way the model writes them: ``phrase [k]`` for each grounded mention. Every
sample is a pure function of (split, index): the held-out split uses seeds the
training split never touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..scoring import NUMBERS
from .raycast import render_raycast
from .scenes import COLORS, KINDS, SIZES, Scene, SceneObject, render_scene
from .shards import ScenePool
from .solids import render_solids

# Every task of the synthetic tabletop data.
TASKS = ("rec", "multi", "region_caption", "grounded_caption", "count", "pope", "instruction", "color_vqa")
# Relative frequency of each task in training.
DEFAULT_TASK_WEIGHTS = {"rec": 4.0, "multi": 1.0, "region_caption": 2.0, "grounded_caption": 1.0, "count": 1.0,
                        "pope": 2.0, "instruction": 2.0, "color_vqa": 1.0}
# ... and in `nextchat evaluate`'s default mix.
EVAL_TASK_WEIGHTS = {"rec": 3.0, "pope": 2.0, "region_caption": 2.0, "instruction": 1.0, "multi": 1.0,
                     "grounded_caption": 1.0, "count": 1.0, "color_vqa": 1.0}
SPLIT_SEED = {"train": 0, "heldout": 1_000_000_000, "test": 2_000_000_000}
# How scenes are drawn: the project's 2D painter, 3D solids splatted through a
# perspective camera (solids.py), or the ray caster kept for measuring (held out:
# SyntheticTabletop never draws the training split with it).
RENDERERS = {"tabletop": render_scene, "solids": render_solids, "raycast": render_raycast}
HELD_OUT_RENDERERS = ("raycast",)
# The negatives of yes/no questions (POPE): any absent object, one of the popular
# kinds, or a look-alike of a present object (its kind or its colour).
POPE_STRATEGIES = ("random", "popular", "adversarial")
POPULAR_KINDS = ("cube", "ball", "cup")
POPE_QUESTION = "is there a {color} {kind} in the image?"
REC_QUESTIONS = ["where is the {ref}?", "find the {ref}.", "point to the {ref}.", "locate the {ref}.",
                 "show me the {ref}.", "which object is the {ref}?"]


@dataclass
class Sample:
    task: str
    question: str
    answer: str
    regions: list[np.ndarray] = field(default_factory=list)  # pixel xyxy, referred to as [k] in the question
    answer_objects: list[SceneObject] = field(default_factory=list)  # referred to as [k] in the answer
    truth: dict = field(default_factory=dict)  # what evaluation checks (label, attributes, count, ...)
    # (character offset in the question, object): the question's words that end
    # there name that object (a relation's anchor); training may supervise them.
    question_looks: list[tuple[int, SceneObject]] = field(default_factory=list)

    @property
    def answer_boxes(self) -> list[np.ndarray]:
        return [o.box for o in self.answer_objects]


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def _others(scene: Scene, target: SceneObject) -> list[SceneObject]:
    return [o for o in scene.objects if o is not target]


def referring_expressions(scene: Scene, target: SceneObject) -> list[str]:
    """Every expression from our grammar that names ``target`` and nothing else."""
    return [expr for expr, _anchor in anchored_expressions(scene, target)]


def anchored_expressions(scene: Scene, target: SceneObject) -> list[tuple[str, SceneObject | None]]:
    """referring_expressions with, for each, the object it is relative to (None
    for those that need none): an expression with an anchor ends with its name."""
    objs, others = scene.objects, _others(scene, target)
    exprs: list[tuple[str, SceneObject | None]] = []

    def unique(pred) -> bool:
        return pred(target) and not any(pred(o) for o in others)

    if unique(lambda o: o.kind == target.kind):
        exprs.append((target.kind, None))
    if unique(lambda o: o.kind == target.kind and o.color == target.color):
        exprs.append((f"{target.color} {target.kind}", None))
    if unique(lambda o: o.color == target.color):
        exprs.append((f"{target.color} object", None))
    if unique(lambda o: o.kind == target.kind and o.size == target.size):
        exprs.append((f"{target.size} {target.kind}", None))
    same_kind = [o for o in objs if o.kind == target.kind]
    if len(same_kind) >= 2:
        xs = sorted(same_kind, key=lambda o: o.center[0])
        if target is xs[0]:
            exprs.append((f"leftmost {target.kind}", None))
        if target is xs[-1]:
            exprs.append((f"rightmost {target.kind}", None))
    if len(objs) >= 2:
        if target is max(objs, key=lambda o: o.area):
            exprs.append(("largest object", None))
        if target is min(objs, key=lambda o: o.area):
            exprs.append(("smallest object", None))
        if target is min(objs, key=lambda o: o.center[0]):
            exprs.append(("leftmost object", None))
        if target is max(objs, key=lambda o: o.center[0]):
            exprs.append(("rightmost object", None))
        if target is max(objs, key=lambda o: o.center[1]):
            exprs.append(("nearest object", None))
    for anchor in others:
        aname = _simple_name(scene, anchor)
        if aname is None:
            continue
        left = [o for o in others if o is not anchor and o.center[0] < anchor.center[0]]
        if target.center[0] < anchor.center[0] and not any(o.kind == target.kind for o in left):
            exprs.append((f"{target.kind} left of the {aname}", anchor))
        right = [o for o in others if o is not anchor and o.center[0] > anchor.center[0]]
        if target.center[0] > anchor.center[0] and not any(o.kind == target.kind for o in right):
            exprs.append((f"{target.kind} right of the {aname}", anchor))
        behind = [o for o in others if o is not anchor and o.center[1] < anchor.center[1]]
        if target.center[1] < anchor.center[1] and not any(o.kind == target.kind for o in behind):
            exprs.append((f"{target.kind} behind the {aname}", anchor))
        def dist(o, a=anchor):
            return float(np.hypot(o.center[0] - a.center[0], o.center[1] - a.center[1]))
        rest = [o for o in objs if o is not anchor]
        if len(rest) >= 2 and target is min(rest, key=dist):
            exprs.append((f"object nearest to the {aname}", anchor))
    return exprs


def _simple_name(scene: Scene, obj: SceneObject) -> str | None:
    """The shortest attribute-only name of ``obj`` in ``scene``, or None."""
    others = _others(scene, obj)
    if not any(o.kind == obj.kind for o in others):
        return obj.kind
    if not any(o.kind == obj.kind and o.color == obj.color for o in others):
        return f"{obj.color} {obj.kind}"
    return None


def _caption(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.color} {obj.kind}"


def absent_pair(scene: Scene, rng: np.random.Generator, strategy: str) -> tuple[str, str]:
    """A (colour, kind) no object of ``scene`` has, as a yes/no negative of ``strategy``
    (POPE_STRATEGIES) asks about."""
    present = {(o.color, o.kind) for o in scene.objects}
    kinds_present = {o.kind for o in scene.objects}
    colors_present = {o.color for o in scene.objects}
    pool = [(c, k) for c in COLORS for k in KINDS if (c, k) not in present]
    if strategy == "adversarial":  # a present kind in another colour, or a present colour on another kind
        near = [(c, k) for c, k in pool if k in kinds_present or c in colors_present]
        pool = near or pool
    elif strategy == "popular":  # POPE's frequent objects; here a fixed set, see _pope_sample
        popular = [(c, k) for c, k in pool if k in POPULAR_KINDS]
        pool = popular or pool
    return pool[int(rng.integers(len(pool)))]


def existence_pairs(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """The yes/no task's questions about ``scene`` as (colour, kind, strategy): every pair
    the scene holds ("positive", as _pope_sample's truth names a yes), and one absent
    pair of each of POPE_STRATEGIES."""
    present = [(c, k, "positive") for c, k in sorted({(o.color, o.kind) for o in scene.objects})]
    return present + [(*absent_pair(scene, rng, strategy), strategy) for strategy in POPE_STRATEGIES]


def _rec_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    choices = [(o, e, a) for o in objs for e, a in anchored_expressions(scene, o)]
    if not choices:
        return None
    target, expr, anchor = choices[int(rng.integers(len(choices)))]
    q = REC_QUESTIONS[int(rng.integers(len(REC_QUESTIONS)))].format(ref=expr)
    looks = [(q.index(expr) + len(expr), anchor)] if anchor is not None else []
    return Sample("rec", q, "Answer: [0] .", answer_objects=[target], truth={"expression": expr},
                  question_looks=looks)


def _multi_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    if rng.random() < 0.5:
        color = objs[int(rng.integers(len(objs)))].color
        group = [o for o in objs if o.color == color]
        q = f"find all the {color} objects."
    else:
        kind = objs[int(rng.integers(len(objs)))].kind
        group = [o for o in objs if o.kind == kind]
        q = f"find all the {_plural(kind)}."
    group = sorted(group, key=lambda o: o.center[0])
    parts = [f"the {o.color} {o.kind} [{k}]" for k, o in enumerate(group)]
    return Sample("multi", q, _join(parts) + ".", answer_objects=group, truth={"count": len(group)})


def _region_caption_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    target = objs[int(rng.integers(len(objs)))]
    q = ["describe [0].", "what is [0]?", "what object is in [0]?"][int(rng.integers(3))]
    return Sample("region_caption", q, _caption(target) + ".", regions=[target.box.copy()],
                  truth={"color": target.color, "kind": target.kind, "size": target.size})


def _grounded_caption_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    group = sorted(objs, key=lambda o: o.center[0])
    parts = [f"{_caption(o)} [{k}]" for k, o in enumerate(group)]
    q = ["describe the image.", "what is on the table?", "describe the scene and ground every object."][
        int(rng.integers(3))]
    return Sample("grounded_caption", q, "there is " + _join(parts) + ".", answer_objects=group,
                  truth={"count": len(group)})


def _count_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    kind = (objs[int(rng.integers(len(objs)))].kind if rng.random() < 0.8
            else KINDS[int(rng.integers(len(KINDS)))])
    n = sum(o.kind == kind for o in objs)
    verb, noun = ("is", kind) if n == 1 else ("are", _plural(kind))
    return Sample("count", f"how many {_plural(kind)} are there?", f"there {verb} {NUMBERS[n]} {noun}.",
                  truth={"count": n, "kind": kind})


def _pope_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    # A "yes" asks what a "no" of the same strategy would: in POPE the popular
    # objects are the dataset's most frequent, so they are asked about present as
    # often as absent. Our scenes draw every kind equally often; were only the
    # popular negatives to favour POPULAR_KINDS, the question alone would answer
    # (a cube: more often "no") and a model that ignores the image would learn it.
    strategy = POPE_STRATEGIES[int(rng.integers(len(POPE_STRATEGIES)))]
    if rng.random() < 0.5:
        popular = [o for o in objs if o.kind in POPULAR_KINDS] if strategy == "popular" else []
        candidates = popular or objs
        target = candidates[int(rng.integers(len(candidates)))]
        color, kind = target.color, target.kind
        matches = [o for o in objs if o.color == color and o.kind == kind]
        parts = [f"the {color} {kind} [{k}]" for k, _ in enumerate(matches)]
        return Sample("pope", POPE_QUESTION.format(color=color, kind=kind), "yes, " + _join(parts) + ".",
                      answer_objects=matches, truth={"label": "yes", "strategy": "positive"})
    color, kind = absent_pair(scene, rng, strategy)
    # A "no" grounds the look-alikes it was told apart from (the asked kind in
    # another colour, else the asked colour on another kind), so the decision is
    # made looking at them, as a "yes" is made looking at its matches.
    alike = ([o for o in objs if o.kind == kind] or [o for o in objs if o.color == color])[:3]
    answer = "no." if not alike else "no. there is " + _join(
        [f"the {o.color} {o.kind} [{k}]" for k, o in enumerate(alike)]) + "."
    return Sample("pope", POPE_QUESTION.format(color=color, kind=kind), answer, answer_objects=alike,
                  truth={"label": "no", "strategy": strategy})


def pope_asked(question: str) -> tuple[str, str]:
    """The (colour, kind) a yes/no question of ``_pope_sample`` asks about."""
    before, after = POPE_QUESTION.split("{color} {kind}")
    color, kind = question.removeprefix(before).removesuffix(after).split(" ", 1)
    return color, kind


def _instruction_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    named = [(o, n) for o in objs if (n := _simple_name(scene, o))]
    if not named:
        return None
    target, name = named[int(rng.integers(len(named)))]
    others = [(o, n) for o, n in named if o is not target]
    if others and rng.random() < 0.4:
        dest, dname = others[int(rng.integers(len(others)))]
        return Sample("instruction", f"put the {name} next to the {dname}.",
                      f"moving the {name} [0] next to the {dname} [1].", answer_objects=[target, dest],
                      truth={"target": name})
    verb = ["pick up", "grab", "push"][int(rng.integers(3))]
    gerund = {"pick up": "picking up", "grab": "grabbing", "push": "pushing"}[verb]
    return Sample("instruction", f"{verb} the {name}.", f"{gerund} the {name} [0].", answer_objects=[target],
                  truth={"target": name})


def _color_vqa_sample(scene: Scene, objs: list[SceneObject], rng: np.random.Generator) -> Sample | None:
    named = [(o, o.kind) for o in objs if sum(p.kind == o.kind for p in objs) == 1]
    if not named:
        return None
    target, kind = named[int(rng.integers(len(named)))]
    return Sample("color_vqa", f"what color is the {kind}?", f"the {kind} [0] is {target.color}.",
                  answer_objects=[target], truth={"color": target.color})


_SAMPLERS = {"rec": _rec_sample, "multi": _multi_sample, "region_caption": _region_caption_sample,
             "grounded_caption": _grounded_caption_sample, "count": _count_sample, "pope": _pope_sample,
             "instruction": _instruction_sample, "color_vqa": _color_vqa_sample}


def make_sample(scene: Scene, task: str, rng: np.random.Generator) -> Sample | None:
    """One sample of ``task`` about ``scene`` (None when the scene cannot give one)."""
    if task not in _SAMPLERS:
        raise ValueError(f"unknown task {task}")
    return _SAMPLERS[task](scene, scene.objects, rng) if scene.objects else None


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class SyntheticTabletop:
    """An endless, seekable stream of (scene, sample) for one split.

    Item ``i`` is rendered from seed ``SPLIT_SEED[split] + i`` and its task is
    drawn from ``task_weights`` with the same seed, so a run resumed at item i
    sees exactly the items an uninterrupted run would.

    ``renderer``: one renderer's name, or weights over several ({"tabletop": 0.4,
    "solids": 0.6}): then item i's renderer is drawn with its seed too. ``pools``:
    renderers whose scenes are read from a ScenePool of the split's first seeds;
    item i then shows the pool's scene ``i % pool.count``.
    """

    def __init__(self, split: str = "train", task_weights: dict[str, float] | None = None,
                 height: int = 240, width: int = 320, tasks: tuple[str, ...] | None = None,
                 renderer: str | dict[str, float] = "tabletop", pools: dict[str, ScenePool] | None = None):
        if split not in SPLIT_SEED:
            raise ValueError(f"unknown split '{split}'; use one of {sorted(SPLIT_SEED)}")
        mix = {renderer: 1.0} if isinstance(renderer, str) else {k: float(v) for k, v in renderer.items() if v > 0}
        for name in mix:
            if name not in RENDERERS:
                raise ValueError(f"unknown renderer '{name}'; use one of {sorted(RENDERERS)}")
            if name in HELD_OUT_RENDERERS and split == "train":
                raise ValueError(f"the {name} renderer is held out: it draws evaluation splits only, never 'train'")
        if not mix:
            raise ValueError("no renderer has a weight above 0")
        self.split = split
        self.renderers = list(mix)
        self.renderer_probs = np.array([mix[r] for r in self.renderers]) / sum(mix.values())
        self.pools = dict(pools or {})
        for name, pool in self.pools.items():
            # A pool holds one split's seeds: another split's pool would hand, say, a
            # held-out stream the training scenes.
            if pool.first != SPLIT_SEED[split] or (pool.height, pool.width) != (height, width):
                raise ValueError(f"the {name} pool starts at seed {pool.first} at {pool.width}x{pool.height}; "
                                 f"the {split} split at {width}x{height} starts at seed {SPLIT_SEED[split]}")
        weights = dict(task_weights or DEFAULT_TASK_WEIGHTS)
        if tasks is not None:
            weights = {t: weights.get(t, 1.0) for t in tasks}
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0]
        total = sum(weights[t] for t in self.tasks)
        self.probs = np.array([weights[t] / total for t in self.tasks])
        self.height, self.width = height, width

    def scene(self, index: int, rng: np.random.Generator) -> Scene:
        """Scene ``index`` (``rng``: the item's generator, which picks the renderer of a mix)."""
        name = self.renderers[0]
        if len(self.renderers) > 1:
            name = self.renderers[int(rng.choice(len(self.renderers), p=self.renderer_probs))]
        pool = self.pools.get(name)
        if pool is not None:
            return pool.scene(index % pool.count)
        # Each renderer seeds its own generator from the seed.
        return RENDERERS[name](SPLIT_SEED[self.split] + index, height=self.height, width=self.width)

    def item(self, index: int) -> tuple[Scene, Sample]:
        scene, samples = self.scene_samples(index, 1)
        return scene, samples[0]

    def scene_samples(self, index: int, count: int) -> tuple[Scene, list[Sample]]:
        """Scene ``index`` and ``count`` samples about it, each of a task drawn anew;
        the first is ``item(index)``'s sample."""
        seed = SPLIT_SEED[self.split] + index
        rng = np.random.default_rng([seed, 17])
        scene = self.scene(index, rng)
        samples = []
        for _ in range(count):
            first = int(rng.choice(len(self.tasks), p=self.probs))
            for k in range(len(self.tasks)):  # fall back to the next task if a scene cannot give this one
                sample = make_sample(scene, self.tasks[(first + k) % len(self.tasks)], rng)
                if sample is not None:
                    samples.append(sample)
                    break
            else:
                raise RuntimeError(f"scene {seed} gives no sample")  # a scene always has >= 1 object
        return scene, samples


def expression_type(expression: str) -> str:
    """The kind of one of this grammar's referring expressions, e.g. "ring left of
    the red cube" -> "relation", "green object" -> "color object", "smallest object"
    -> "smallest object", "leftmost cup" -> "leftmost kind"."""
    said = expression.split()
    if any(f" {r} the " in f" {expression} " for r in ("left of", "right of", "behind")):
        return "relation"
    if expression.startswith("object nearest to"):
        return "nearest to anchor"
    if said[0] in ("leftmost", "rightmost", "largest", "smallest", "nearest"):
        return f"{said[0]} " + ("object" if said[-1] == "object" else "kind")
    if said[-1] == "object":
        return "color object"
    if len(said) == 1:
        return "kind"
    return "size kind" if said[0] in SIZES else "color kind"
