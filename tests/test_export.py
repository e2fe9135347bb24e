"""ONNX export with parity, the backends, broken files, and the TensorRT fallback."""

import json
import shutil

import numpy as np
import pytest
from nextchat_export.onnx_export import export_onnx
from nextchat_export.tensorrt_build import trtexec_commands

from nextchat_ros.backends import (
    BackendError,
    OnnxRuntimeBackend,
    TorchBackend,
    check_sidecar,
    load_backend,
    read_manifest,
)
from nextchat_ros.model import build_model
from nextchat_ros.predictor import NextChatPredictor


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    manifest = export_onnx(tiny_model, out, fp16=True, progress=False)
    return out, manifest


def test_export_writes_parity_checked_linted_graphs(exported):
    out, manifest = exported
    assert manifest["parity"]["all_passed"]
    assert set(manifest["parts"]) == {"vision", "sam_encoder", "mask"}
    assert manifest["parts"]["mask"]["input_shapes"]["boxes"][0] == "objects"  # dynamic number of objects
    assert manifest["parts"]["vision"]["input_shapes"]["pixel_values"][0] == "batch"
    report = json.loads((out / "parity.json").read_text())
    fp32 = [r for r in report["parity"] if r["precision"] == "fp32"]
    assert len(fp32) == 6 and all(r["max_abs_diff"] <= 1e-4 for r in fp32)
    assert {r["inputs"] for r in fp32} >= {"real scene"}
    assert [x["lint"] for x in report["lint"]] == ["passed"] * 6
    assert "| vision | fp32 | real scene |" in (out / "parity.md").read_text()


@pytest.mark.parametrize("precision,box_tol", [("fp32", 1e-3), ("fp16", 2.0)])
def test_switching_the_backend_gives_the_same_grounding(tiny_model, exported, scene, precision, box_tol):
    out, _ = exported
    answers = []
    for backend in (TorchBackend(tiny_model), OnnxRuntimeBackend(tiny_model, out, precision=precision)):
        predictor = NextChatPredictor(tiny_model, backend=backend)
        predictor.set_image(scene.image)
        answers.append((predictor.ask("where is the red cube?", mode="ground"),
                        predictor.ask("describe [0].", regions=[[10, 10, 60, 50]], max_new_tokens=8)))
    (g_torch, c_torch), (g_ort, c_ort) = answers
    assert c_ort.text == c_torch.text and g_ort.text == g_torch.text
    np.testing.assert_allclose(g_ort.objects[0].box, g_torch.objects[0].box, atol=box_tol)
    a, b = g_ort.objects[0].mask, g_torch.objects[0].mask
    union = (a | b).sum()
    assert union == 0 or (a & b).sum() / union > (0.999 if precision == "fp32" else 0.95)


def test_missing_truncated_and_mismatched_files_name_the_file(tiny_model, exported, tmp_path):
    out, _ = exported
    with pytest.raises(BackendError, match="no export manifest"):
        OnnxRuntimeBackend(tiny_model, tmp_path)
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / "vision.onnx").unlink()
    with pytest.raises(BackendError, match=r"ONNX graph missing: .*vision\.onnx"):
        OnnxRuntimeBackend(tiny_model, missing)
    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    data = (truncated / "mask.onnx").read_bytes()
    (truncated / "mask.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(BackendError, match=r"cannot load ONNX graph .*mask\.onnx"):
        OnnxRuntimeBackend(tiny_model, truncated)
    with pytest.raises(BackendError, match="exported from another model"):
        OnnxRuntimeBackend(build_model("tiny", seed=5), out)
    bad = tmp_path / "bad-manifest"
    shutil.copytree(out, bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(BackendError, match="not a valid export manifest"):
        read_manifest(bad)


def test_tensorrt_falls_back_to_onnxruntime_with_a_reason(tiny_model, exported):
    out, _ = exported
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        backend = load_backend("tensorrt", tiny_model, out)
        assert isinstance(backend, OnnxRuntimeBackend) and "TensorRT is not installed" in backend.fallback_reason
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            load_backend("tensorrt", tiny_model, out, fallback=False)
    else:
        pytest.skip("TensorRT is installed: the engine tests below cover it")


def test_engine_sidecars_must_match_this_machine(tmp_path):
    sidecar = {"tensorrt": "10.3.0", "gpu": "Orin", "precision": "fp16"}
    check_sidecar(sidecar, {"tensorrt": "10.3.0", "gpu": "Orin"}, tmp_path / "vision.engine.json")
    with pytest.raises(BackendError, match=r"vision\.engine\.json was built for gpu 'Orin'"):
        check_sidecar(sidecar, {"tensorrt": "10.3.0", "gpu": "NVIDIA H100"}, tmp_path / "vision.engine.json")
    with pytest.raises(BackendError, match=r"tensorrt '10\.3\.0'"):
        check_sidecar(sidecar, {"tensorrt": "10.8.0", "gpu": "Orin"}, tmp_path / "vision.engine.json")


def test_a_stale_engine_says_why_and_what_rebuilds_it(tmp_path):
    from nextchat_ros.tensorrt_engines import stale_engine_reason

    here = {"tensorrt": "10.8.0", "gpu": "Orin"}
    sidecar = {"tensorrt": "10.8.0", "gpu": "Orin", "model_fingerprint": "abc"}
    assert stale_engine_reason(sidecar, here, "abc") is None
    assert stale_engine_reason(sidecar, here, "def") == "was built from another model's export"
    assert stale_engine_reason(dict(sidecar, gpu="NVIDIA H100"), here).startswith("was built for gpu 'NVIDIA H100'")
    with pytest.raises(BackendError, match="rebuild_engines"):
        check_sidecar(dict(sidecar, tensorrt="10.3.0"), here, tmp_path / "mask.engine.json")


def test_rebuilding_engines_needs_tensorrt_and_otherwise_falls_back(tiny_model, exported):
    """Testable here up to the import of tensorrt, which this machine lacks."""
    out, _ = exported
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        backend = load_backend("tensorrt", tiny_model, out, rebuild_engines=True)
        assert isinstance(backend, OnnxRuntimeBackend) and "TensorRT is not installed" in backend.fallback_reason
    else:
        pytest.skip("TensorRT is installed: the engine tests cover it")


def test_trtexec_commands_cover_every_part_with_profiles(exported):
    out, _ = exported
    commands = trtexec_commands(out)
    assert len(commands) == 3 and all(c.startswith("trtexec --onnx=") and "--fp16" in c for c in commands)
    mask = next(c for c in commands if "mask.onnx" in c)
    assert "--minShapes=image_embedding:1x" in mask and "boxes:16x4" in mask


def test_tensorrt_engines_build_and_match_onnxruntime(tiny_model, exported, scene):
    pytest.importorskip("tensorrt")
    from nextchat_export.tensorrt_build import build_engines

    out, _ = exported
    build_engines(out, fp16=False)
    trt_backend = load_backend("tensorrt", tiny_model, out, fallback=False)
    results = []
    for backend in (trt_backend, OnnxRuntimeBackend(tiny_model, out)):
        predictor = NextChatPredictor(tiny_model, backend=backend)
        predictor.set_image(scene.image)
        results.append(predictor.ask("where is the red cube?", mode="ground").objects[0].box)
    np.testing.assert_allclose(results[0], results[1], atol=1e-2)


def reduced_width(config):
    """The preset's input and output shapes, at a width and depth a test can export:
    the image sizes, patch grids, windows and the LLM width the mask graph takes stay."""
    config.vision.hidden_size, config.vision.intermediate_size = 64, 128
    config.vision.num_hidden_layers, config.vision.num_attention_heads = 2, 2
    config.sam.encoder_embed_dim, config.sam.encoder_depth, config.sam.encoder_num_heads = 32, 2, 2
    config.sam.encoder_global_attn_indexes = (1,)
    config.box_head_hidden = 64
    return config


def test_the_full_presets_shapes_export_with_parity_and_tensorrt_profiles(tmp_path):
    """`nextchat export --preset full` at a reduced width: CLIP-336's 24x24 patches,
    SAM's 1024 px input and 64x64 embedding with 14-patch windows, the 4096-wide
    trigger state; parity as for the shipped model; trtexec profiles at those shapes."""
    from nextchat_export.onnx_export import parts_model

    from nextchat_ros.model.config import get_preset

    config = reduced_width(get_preset("full"))
    model = parts_model(config, seed=0)
    assert model.config.llm.num_hidden_layers == 1 and model.config.llm.hidden_size == 4096
    manifest = export_onnx(model, tmp_path, fp16=False, lint=False, progress=False)
    assert manifest["parity"]["all_passed"], (tmp_path / "parity.md").read_text()
    shapes = {part: entry["input_shapes"] for part, entry in manifest["parts"].items()}
    assert shapes["vision"]["pixel_values"] == ["batch", 3, 336, 336]
    assert shapes["sam_encoder"]["pixels"] == ["batch", 3, 1024, 1024]
    assert shapes["mask"]["image_embedding"] == [1, 256, 64, 64]
    assert shapes["mask"]["trigger_hidden"] == ["objects", 4096]
    commands = trtexec_commands(tmp_path)
    sam = next(c for c in commands if "sam_encoder.onnx" in c)
    assert "--optShapes=pixels:1x3x1024x1024" in sam
    mask = next(c for c in commands if "mask.onnx" in c)
    assert "image_embedding:1x256x64x64" in mask and "trigger_hidden:16x4096" in mask


def test_a_cnn_stem_tower_exports_with_parity(tmp_path):
    """vision.patch_stem 'cnn' (GroupNorm, max-pool) is in the vision graph the
    backends run; its ONNX output matches torch's as the shipped stem's does."""
    import onnx
    from nextchat_export.onnx_export import parts_model

    from nextchat_ros.model.config import get_preset

    model = parts_model(get_preset("tiny").with_changes({"vision": {"patch_stem": "cnn"}}), seed=0)
    manifest = export_onnx(model, tmp_path, fp16=False, lint=False, progress=False)
    assert manifest["parity"]["all_passed"], (tmp_path / "parity.md").read_text()
    ops = {node.op_type for node in onnx.load(str(tmp_path / "vision.onnx")).graph.node}
    assert "MaxPool" in ops


def test_a_graph_over_protobufs_limit_keeps_its_weights_in_one_file_and_converts_to_fp16(tmp_path, monkeypatch):
    import onnx
    import onnxruntime as ort
    import torch
    from nextchat_export import onnx_export

    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    path = tmp_path / "big.onnx"
    torch.onnx.export(module, (torch.randn(2, 64),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    # What torch writes for a graph over 2 GB (SAM ViT-H in fp32): each weight in a file of its own.
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 5
    onnx_export._gather_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert onnx_export.polygraphy_lint(path)["lint"].startswith("not run: polygraphy cannot load a graph over")
    # The fp16 copy of such a graph: shapes inferred from the file, weights written beside it.
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    onnx_export.to_fp16(path, tmp_path / "big.fp16.onnx")
    assert (tmp_path / "big.fp16.onnx.data").is_file()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    for name, tolerance in (("big.onnx", 1e-5), ("big.fp16.onnx", 1e-2)):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=tolerance)
