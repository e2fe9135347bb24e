"""The synthetic tabletop data: deterministic, exact, and fitting the prompt template."""

import numpy as np
import pytest
from nextchat_training.data import TASKS, SyntheticTabletop, make_sample, referring_expressions

from nextchat_ros.scenes import COLORS, SIZES, render_scene


def test_scenes_and_samples_are_deterministic():
    a, b = render_scene(123), render_scene(123)
    np.testing.assert_array_equal(a.image, b.image)
    assert [(o.name, tuple(o.box)) for o in a.objects] == [(o.name, tuple(o.box)) for o in b.objects]
    assert not np.array_equal(a.image, render_scene(124).image)
    stream = SyntheticTabletop("train")
    for i in (0, 7, 99):
        (_, x1), (_, x2) = stream.item(i), stream.item(i)
        assert (x1.task, x1.question, x1.answer) == (x2.task, x2.question, x2.answer)
    heldout = SyntheticTabletop("heldout")
    assert heldout.item(0)[0].seed != stream.item(0)[0].seed


@pytest.mark.parametrize("seed", range(12))
def test_boxes_and_masks_are_exact_including_occlusion(seed):
    scene = render_scene(seed, num_objects=(4, 6))
    h, w = scene.image.shape[:2]
    union = np.zeros((h, w), bool)
    for obj in scene.objects:
        ys, xs = np.nonzero(obj.mask)
        assert tuple(obj.box) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # the tight box of the mask
        assert not (union & obj.mask).any()  # visible masks never overlap
        union |= obj.mask
        assert 0.4 <= obj.visible_fraction <= 1.0


def test_an_occluded_object_keeps_exactly_its_visible_pixels():
    occluded = 0
    for seed in range(40):
        scene = render_scene(seed, num_objects=(5, 6), min_visible=0.0)
        if scene.hidden:
            continue
        for k, obj in enumerate(scene.objects):  # far to near
            nearer = np.zeros_like(obj.mask)
            for other in scene.objects[k + 1:]:
                nearer |= other.full_mask
            np.testing.assert_array_equal(obj.mask, obj.full_mask & ~nearer)
            if obj.visible_fraction < 1.0:
                occluded += 1
                assert obj.mask.sum() < obj.full_mask.sum()
    assert occluded >= 5


@pytest.mark.parametrize("task", TASKS)
def test_every_task_fits_the_prompt_template(task, tiny_model):
    prompt, tok = tiny_model.prompt, tiny_model.tokenizer
    made = 0
    for seed in range(60):
        scene = render_scene(seed)
        sample = make_sample(scene, task, np.random.default_rng(seed))
        if sample is None:
            continue
        made += 1
        h, w = scene.image.shape[:2]
        example = prompt.training_example(sample.question, sample.answer,
                                          [r / max(h, w) for r in sample.regions],
                                          [b / max(h, w) for b in sample.answer_boxes])
        assert example.input_ids.count(tok.trigger_id) == len(sample.answer_boxes)
        assert example.input_ids.count(tok.location_id) == len(sample.regions) + example.input_ids.count(
            tok.trigger_id)
        assert len(example.input_ids) < tiny_model.config.llm.max_position_embeddings
    assert made >= 20


def test_referring_expressions_name_one_object():
    for seed in range(30):
        scene = render_scene(seed)
        for obj in scene.objects:
            for expr in referring_expressions(scene, obj):
                words = expr.split()
                if len(words) == 2 and words[0] in set(COLORS) | set(SIZES):  # "red cube", "small ball"
                    if words[1] == "object":
                        matches = [o for o in scene.objects if o.color == words[0]]
                    else:
                        matches = [o for o in scene.objects if (o.color, o.kind) == (words[0], words[1])
                                   or (o.size, o.kind) == (words[0], words[1])]
                    assert matches == [obj], expr
