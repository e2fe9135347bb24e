"""The held-out ray-cast renderer: exact masks and boxes, seeded, never for training."""

import numpy as np
import pytest

from nextchat_ros.images import mask_box
from nextchat_ros.synthetic.raycast import render_raycast
from nextchat_ros.synthetic.samples import SyntheticTabletop
from nextchat_ros.synthetic.scenes import COLORS, KINDS, SIZES


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scenes_are_seeded_with_exact_disjoint_masks_and_their_boxes(seed):
    scene = render_raycast(seed, height=120, width=160)
    again = render_raycast(seed, height=120, width=160)
    assert scene.image.shape == (120, 160, 3) and scene.image.dtype == np.uint8
    np.testing.assert_array_equal(scene.image, again.image)
    assert scene.objects, "every test seed has visible objects"
    covered = np.zeros((120, 160), int)
    for obj in scene.objects:
        assert obj.kind in KINDS and obj.color in COLORS and obj.size in SIZES
        assert obj.mask.sum() >= 12 and (obj.full_mask | ~obj.mask).all()  # the visible part of the whole shape
        np.testing.assert_array_equal(obj.box, mask_box(obj.mask))
        assert (scene.depth[obj.mask] > 0).all() and obj.depth_m > 0
        covered += obj.mask
    assert covered.max() == 1  # one object per pixel
    assert set(scene.camera) == {"fx", "fy", "cx", "cy"}


def test_the_raycast_renderer_never_draws_the_training_split():
    with pytest.raises(ValueError, match="held out"):
        SyntheticTabletop("train", renderer="raycast")
    with pytest.raises(ValueError, match="unknown renderer"):
        SyntheticTabletop("heldout", renderer="oil paint")
    scene, sample = SyntheticTabletop("heldout", {"rec": 1.0}, height=120, width=160, renderer="raycast").item(0)
    assert scene.background.startswith("raycast:")
    assert any(np.array_equal(sample.answer_objects[0].box, o.box) for o in scene.objects)
