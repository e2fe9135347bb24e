"""Safetensors round trip, the released-layout loader, and broken model files."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from nextchat_ros.errors import ModelFileError
from nextchat_ros.model import load_pretrained, load_released, save_released_layout
from nextchat_ros.model.checkpoint import RELEASED_KEY_MAP, released_to_ours
from nextchat_ros.predictor import NextChatPredictor


def outputs(model, image):
    p = NextChatPredictor(model)
    p.set_image(image)
    g = p.ask("where is the red cube?", mode="ground")
    c = p.ask("describe [0].", regions=[[5, 5, 60, 50]], max_new_tokens=8)
    return g, c


def assert_same_outputs(a, b):
    for x, y in zip(a, b):
        assert x.text == y.text and x.token_ids == y.token_ids
        for ox, oy in zip(x.objects, y.objects):
            np.testing.assert_array_equal(ox.box, oy.box)
            np.testing.assert_array_equal(ox.mask, oy.mask)


def test_safetensors_round_trip(tiny_model, saved_tiny, scene):
    loaded = load_pretrained(saved_tiny)
    original = tiny_model.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=0, rtol=0)
    assert loaded.config == tiny_model.config
    assert_same_outputs(outputs(tiny_model, scene.image), outputs(loaded, scene.image))


@pytest.fixture(scope="module")
def released_shaped_tiny():
    """The tiny preset without its additions the released model lacks (a conv patch
    stem, a position embedding on the image tokens, region features)."""
    from nextchat_ros.model import build_model
    from nextchat_ros.model.config import get_preset

    config = get_preset("tiny")
    config.image_position_scale = 0.0
    config.vision.patch_stem = "linear"
    config.region_features = False
    return build_model(config, seed=0).eval()


def test_released_layout_refuses_tiny_only_parts(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"no place for this model's image_position_scale > 0 and vision\.patch_stem"):
        save_released_layout(tiny_model, tmp_path / "ckpt", tmp_path / "clip")


def test_released_layout_loads_and_gives_identical_outputs(released_shaped_tiny, tmp_path, scene):
    tiny_model = released_shaped_tiny
    ckpt, clip = tmp_path / "nextchat-tiny", tmp_path / "clip"
    save_released_layout(tiny_model, ckpt, clip, max_shard_bytes=4 * 1024**2)
    shards = sorted(ckpt.glob("pytorch_model-*.bin"))
    assert len(shards) > 1  # really sharded
    keys = set(json.loads((ckpt / "pytorch_model.bin.index.json").read_text())["weight_map"])
    for prefix in RELEASED_KEY_MAP:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith(("llm.", "box_", "vision_tower")) for k in keys)
    loaded = load_released(ckpt, clip, base=tiny_model.config)
    assert loaded.config.sam == tiny_model.config.sam  # inferred from the weights
    assert loaded.config.vision == tiny_model.config.vision
    assert_same_outputs(outputs(tiny_model, scene.image), outputs(loaded, scene.image))


def test_released_key_map_examples():
    assert released_to_ours("model.layers.3.self_attn.q_proj.weight") == "llm.model.layers.3.self_attn.q_proj.weight"
    assert released_to_ours("model.mm_projector.2.bias") == "projector.2.bias"
    assert released_to_ours("loc_decoder.0.weight") == "box_decoder.0.weight"
    assert released_to_ours("sam.model.mask_decoder.iou_token.weight") == "sam.mask_decoder.iou_token.weight"
    assert released_to_ours("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") is None
    with pytest.raises(ModelFileError, match="not in RELEASED_KEY_MAP"):
        released_to_ours("mystery.weight")


def test_missing_and_corrupt_files_name_the_file(saved_tiny, tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_pretrained(tmp_path / "nope")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        broken = tmp_path / f"missing-{name}"
        shutil.copytree(saved_tiny, broken)
        (broken / name).unlink()
        with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
            load_pretrained(broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_tiny, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*corrupt or truncated"):
        load_pretrained(truncated)
    bad_json = tmp_path / "bad-json"
    shutil.copytree(saved_tiny, bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"config\.json"):
        load_pretrained(bad_json)
    wrong_shape = tmp_path / "wrong-shape"
    shutil.copytree(saved_tiny, wrong_shape)
    cfg = json.loads((wrong_shape / "config.json").read_text())
    cfg["box_head_hidden"] = 128
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    shape_error = r"model\.safetensors: .box_decoder\.0\..* has shape \(256,?.*the config needs \(128"
    with pytest.raises(ModelFileError, match=shape_error):
        load_pretrained(wrong_shape)
    bad_tok = tmp_path / "bad-tokenizer"
    shutil.copytree(saved_tiny, bad_tok)
    (bad_tok / "tokenizer.json").write_text("[]")
    with pytest.raises(ModelFileError, match="tokenizer"):
        load_pretrained(bad_tok)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_released_loader_refuses_pickled_code(released_shaped_tiny, tmp_path, capsys):
    ckpt, clip = tmp_path / "evil", tmp_path / "clip"
    save_released_layout(released_shaped_tiny, ckpt, clip)
    shard = next(ckpt.glob("pytorch_model-*.bin"))
    torch.save({"loc_decoder.0.weight": Exploit()}, shard)
    with pytest.raises(ModelFileError, match=shard.name):
        load_released(ckpt, clip, base=released_shaped_tiny.config)
    with open(shard, "wb") as f:
        pickle.dump({"loc_decoder.0.weight": Exploit()}, f)
    with pytest.raises(ModelFileError, match="not weights-only"):
        load_released(ckpt, clip, base=released_shaped_tiny.config)
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(ModelFileError, match="CLIP vision tower not found"):
        load_released(ckpt, tmp_path / "no-clip", base=released_shaped_tiny.config)
