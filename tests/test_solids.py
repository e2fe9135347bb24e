"""The solids training renderer and the scene pools that cache it."""

import numpy as np
import pytest

from nextchat_ros.images import mask_box
from nextchat_ros.synthetic.samples import SyntheticTabletop
from nextchat_ros.synthetic.scenes import COLORS, KINDS, SIZES
from nextchat_ros.synthetic.shards import ScenePool
from nextchat_ros.synthetic.solids import render_solids


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_solids_are_seeded_with_exact_disjoint_masks_and_their_boxes(seed):
    scene = render_solids(seed, height=120, width=160)
    again = render_solids(seed, height=120, width=160)
    assert scene.image.shape == (120, 160, 3) and scene.image.dtype == np.uint8
    np.testing.assert_array_equal(scene.image, again.image)
    assert scene.objects
    covered = np.zeros((120, 160), int)
    for obj in scene.objects:
        assert obj.kind in KINDS and obj.color in COLORS and obj.size in SIZES
        assert obj.mask.sum() >= 12 and (obj.full_mask | ~obj.mask).all()
        assert obj.visible_fraction >= 0.4
        np.testing.assert_array_equal(obj.box, mask_box(obj.mask))
        assert (scene.depth[obj.mask] > 0).all() and obj.depth_m > 0
        covered += obj.mask
    assert covered.max() == 1
    assert set(scene.camera) == {"fx", "fy", "cx", "cy"}
    # Listed far to near.
    assert [o.depth_m for o in scene.objects] == sorted((o.depth_m for o in scene.objects), reverse=True)


def test_an_objects_pixels_are_drawn_in_its_shade_of_its_colour():
    """The mask is where the object was drawn: inside it the image is near the
    named colour's hue more often than in the rest of its box."""
    hits = 0
    for seed in range(6):
        scene = render_solids(seed)
        for obj in scene.objects:
            if obj.color in ("white", "black"):
                continue
            named = np.array(COLORS[obj.color], float)
            x0, y0, x1, y1 = obj.box.astype(int)
            pixels = scene.image.astype(float)
            inside = np.linalg.norm(pixels[obj.mask] / 255 - named / 255, axis=1).mean()
            box = np.zeros_like(obj.mask)
            box[y0:y1, x0:x1] = True
            ring = box & ~obj.mask
            if ring.sum() < 20:
                continue
            outside = np.linalg.norm(pixels[ring] / 255 - named / 255, axis=1).mean()
            hits += inside < outside
    assert hits >= 8


def test_a_pool_reads_back_the_scenes_its_renderer_draws(tmp_path):
    pool = ScenePool(tmp_path / "pool", render_solids, 100, 6, height=96, width=128)
    assert pool.missing() == 6
    first = pool.scene(2)  # not built yet: rendered on the spot
    pool.build(processes=1, progress=False)
    assert pool.missing() == 0
    for position in (0, 2, 5):
        read, drawn = pool.scene(position), render_solids(100 + position, height=96, width=128)
        np.testing.assert_array_equal(read.image, drawn.image)
        assert read.seed == drawn.seed and len(read.objects) == len(drawn.objects)
        for a, b in zip(read.objects, drawn.objects):
            assert (a.kind, a.color, a.size) == (b.kind, b.color, b.size)
            np.testing.assert_array_equal(a.mask, b.mask)
            np.testing.assert_array_equal(a.box, b.box)
        np.testing.assert_allclose(read.depth, drawn.depth, rtol=2e-3)
    np.testing.assert_array_equal(first.image, pool.scene(2).image)
    with pytest.raises(IndexError):
        pool.scene(6)
    with pytest.raises(ValueError, match="another format or size"):
        ScenePool(tmp_path / "pool", render_solids, 100, 6, height=120, width=160).scene(0)


def test_a_renderer_mix_draws_each_item_from_one_renderer_by_its_seed(tmp_path):
    mix = {"tabletop": 0.5, "solids": 0.5}
    stream = SyntheticTabletop("train", {"rec": 1.0}, height=96, width=128, renderer=mix)
    drawn = [stream.item(i)[0].background for i in range(12)]
    assert "solids" in drawn and any(b != "solids" for b in drawn)
    again = SyntheticTabletop("train", {"rec": 1.0}, height=96, width=128, renderer=mix)
    assert [again.item(i)[0].background for i in range(12)] == drawn
    pool = ScenePool(tmp_path / "pool", render_solids, 0, 4, height=96, width=128)
    pooled = SyntheticTabletop("train", {"rec": 1.0}, height=96, width=128, renderer="solids",
                               pools={"solids": pool})
    # Item i shows the pool's scene i % 4: item 5 is scene 1 with a question of its own.
    np.testing.assert_array_equal(pooled.item(5)[0].image, render_solids(1, height=96, width=128).image)
    with pytest.raises(ValueError, match="the heldout split at 128x96 starts at seed 1000000000"):
        SyntheticTabletop("heldout", height=96, width=128, renderer="solids", pools={"solids": pool})
    with pytest.raises(ValueError, match="held out"):
        SyntheticTabletop("train", renderer={"solids": 1.0, "raycast": 0.1})
    with pytest.raises(ValueError, match="no renderer"):
        SyntheticTabletop("train", renderer={"solids": 0})
