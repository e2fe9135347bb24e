"""The whole grounding path, stage by stage: the reference implementations against
this project's, in one run on the same inputs.

    python benchmarks/fullscale.py --device cuda --preset full --dtype bf16 [--compile] [--json out.json]
    python benchmarks/fullscale.py --device cpu --preset tiny [--export-dir out/export] [--json out.json]

Per stage, median ms over --repeats calls after a warm-up:

- vision: CLIP tower + projector, transformers' eager attention against SDPA;
- sam_encoder: SAM's image encoder, segment-anything's attention (explicit scores
  plus the decomposed relative-position term) against one fused SDPA call with it
  as the additive bias (``model.sam.RelPosAttention``), ``--compile`` adds
  ``torch.compile`` of the fused encoder;
- prefix_prefill: the system + image prefix into the LLM's cache;
- first_query / second_query: a grounding question on a new frame (both encoders,
  prefix, query, box, mask) and a second one on the same frame;
- masks_1 / masks_8: SAM's mask decoder for 1 and 8 objects, one object per call
  (the reference) against all of them in one call;
- answer_16_tokens: a 16-token answer with one trigger and its mask.

The reference path is the eager decoder (transformers' forward over a
DynamicCache) with the reference encoders; this project's path is the
static-cache engine with SDPA / fused attention. With ``--export-dir`` (an
``nextchat export`` of the same model) the ONNX graphs run on ONNX Runtime's CPU
provider beside torch on the CPU. On CUDA it reports peak GPU memory.

``--preset full`` builds the released shapes (CLIP ViT-L/14-336, Vicuna-7B, SAM
ViT-H) with random weights, as ``benchmarks/engine.py`` does: latency does not
depend on the values. ``--preset tiny`` runs the shipped model.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from common import run_info, write_json
from engine import DTYPES, Timer, build, one_trigger_no_end
from segment_anything.modeling.image_encoder import Attention

from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.synthetic.scenes import render_scene

QUESTION = "where is the red cube?"


def reference_towers(model):
    """Copies of the vision tower with eager attention and of SAM's encoder with
    segment-anything's own attention (the same weights)."""
    vision = copy.deepcopy(model.vision_tower)
    vision.clip.set_attn_implementation("eager")
    encoder = copy.deepcopy(model.sam.image_encoder)
    for block in encoder.blocks:
        block.attn.__class__ = Attention
    return vision, encoder


@torch.inference_mode()
def encoder_stages(model, image: np.ndarray, timer: Timer, compiled: bool) -> dict:
    device, dtype = model.device, model.dtype
    pixels = torch.from_numpy(image.copy())
    vision_in = model.vision_tower.preprocess(pixels)[None].to(device, dtype)
    sam_in = model.sam.preprocess(pixels)[None].to(device, dtype)
    ref_vision, ref_encoder = reference_towers(model)

    def vision(tower):
        return lambda: model.image_position(model.projector(tower(vision_in).to(dtype)))
    out = {"reference": {}, "project": {}}
    out["reference"]["vision_ms"] = timer.median_ms(vision(ref_vision))
    out["project"]["vision_ms"] = timer.median_ms(vision(model.vision_tower))
    out["reference"]["sam_encoder_ms"] = timer.median_ms(lambda: ref_encoder(sam_in))
    out["project"]["sam_encoder_ms"] = timer.median_ms(lambda: model.sam.image_encoder(sam_in))
    if compiled:
        fast = torch.compile(model.sam.image_encoder, fullgraph=True)
        out["project"]["sam_encoder_compiled_ms"] = timer.median_ms(lambda: fast(sam_in))
    # Equal to the reference: the largest difference, relative to the output's scale.
    for name, ref, ours in (("vision", vision(ref_vision)(), vision(model.vision_tower)()),
                            ("sam_encoder", ref_encoder(sam_in), model.sam.image_encoder(sam_in))):
        out[f"{name}_max_relative_difference"] = float((ref - ours).abs().max() / ref.abs().max().clamp_min(1e-6))

    embedding = model.sam.image_encoder(sam_in)
    generator = torch.Generator().manual_seed(0)
    for count in (1, 8):  # the segmentation prompt MLP + SAM's prompt encoder and mask decoder
        xy = torch.rand(count, 2, generator=generator) * 0.5
        boxes = torch.cat([xy, xy + 0.3], 1).to(device)  # boxes are fp32 (nextchat.FP32_PARTS)
        hidden = torch.randn(count, model.config.llm.hidden_size, generator=generator).to(device, dtype)

        def one_at_a_time(boxes=boxes, hidden=hidden, count=count):
            for k in range(count):
                model.trigger_hidden_to_masks(hidden[k:k + 1], boxes[k:k + 1], embedding)
        out["reference"][f"masks_{count}_ms"] = timer.median_ms(one_at_a_time)
        out["project"][f"masks_{count}_ms"] = timer.median_ms(
            lambda boxes=boxes, hidden=hidden: model.trigger_hidden_to_masks(hidden, boxes, embedding))
    return out


@torch.inference_mode()
def query_stages(predictor: NextChatPredictor, image: np.ndarray, other: np.ndarray, timer: Timer) -> dict:
    model = predictor.model
    out = {}
    predictor.set_image(image)
    frame = predictor._frame
    prefix = model.embed(torch.tensor([model.prompt.prefix()], device=predictor.device), frame.image_embeds)
    out["prefix_prefill_ms"] = timer.median_ms(lambda: predictor.decoder.set_prefix(prefix))
    images = [image, other]

    def first_query():  # a new frame each call: both encoders, prefix, query, box, mask
        images.reverse()
        predictor.set_image(images[0])
        predictor.ask(QUESTION, mode="ground")
    out["first_query_ms"] = timer.median_ms(first_query)
    out["second_query_ms"] = timer.median_ms(lambda: predictor.ask(QUESTION, mode="ground"))
    forced = one_trigger_no_end(model.tokenizer)
    answers = []

    def answer():
        answers.append(predictor.ask("describe the image.", max_new_tokens=16, logits_processor=forced))
    out["answer_16_tokens_ms"] = timer.median_ms(answer)
    assert len(answers[-1].objects) == 1 and answers[-1].objects[0].mask is not None
    return out


def onnx_stages(model, export_dir: str, image: np.ndarray, timer: Timer) -> dict:
    """ONNX Runtime's CPU provider against torch on the CPU, per exported graph."""
    from nextchat_ros.backends import OnnxRuntimeBackend, TorchBackend

    cpu_model = model if model.device.type == "cpu" and model.dtype == torch.float32 else \
        copy.deepcopy(model).to("cpu", torch.float32)
    backends = {"torch_cpu": TorchBackend(cpu_model), "onnxruntime_cpu": OnnxRuntimeBackend(cpu_model, export_dir)}
    pixels = torch.from_numpy(image.copy())
    vision_in = cpu_model.vision_tower.preprocess(pixels)[None]
    sam_in = cpu_model.sam.preprocess(pixels)[None]
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(8, 2, generator=generator) * 0.5
    boxes = torch.cat([xy, xy + 0.3], 1)
    hidden = torch.randn(8, cpu_model.config.llm.hidden_size, generator=generator)
    cpu_timer = Timer(torch.device("cpu"), timer.repeats)
    out = {}
    for name, backend in backends.items():
        with torch.inference_mode():
            embedding = backend.sam_encoder(sam_in)
            out[name] = {"vision_ms": cpu_timer.median_ms(lambda b=backend: b.vision(vision_in)),
                         "sam_encoder_ms": cpu_timer.median_ms(lambda b=backend: b.sam_encoder(sam_in)),
                         "masks_8_ms": cpu_timer.median_ms(lambda b=backend, e=embedding: b.masks(e, boxes, hidden))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the fused SAM encoder")
    parser.add_argument("--export-dir", default=None, help="an `nextchat export` of the same model: ONNX Runtime CPU")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = Timer(device, args.repeats)
    dtype = DTYPES[args.dtype]
    model = build(args.preset, args.device, dtype)
    image = render_scene(11, height=480, width=640).image
    other = render_scene(12, height=480, width=640).image
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures = run_info(device, args.preset, args.dtype)
    figures.update(encoder_stages(model, image, timer, args.compile))
    # The eager predictor first: the engine then makes the LLM's projections views of
    # its fused matrices, which the eager forward reads as they are.
    eager = NextChatPredictor(model, device=device, dtype=dtype, decoder="eager")
    ref_vision, ref_encoder = reference_towers(model)
    project_vision, project_encoder = model.vision_tower, model.sam.image_encoder
    model.vision_tower, model.sam.image_encoder = ref_vision, ref_encoder  # the reference path, whole
    figures["reference"].update(query_stages(eager, image, other, timer))
    model.vision_tower, model.sam.image_encoder = project_vision, project_encoder
    del eager
    engine = NextChatPredictor(model, device=device, dtype=dtype, decoder="engine")
    figures["project"].update(query_stages(engine, image, other, timer))
    if args.export_dir:
        figures["onnx"] = onnx_stages(model, args.export_dir, image, timer)
    if device.type == "cuda":
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    ref, ours = figures["reference"], figures["project"]
    figures["speedup"] = {k: ref[k] / ours[k] for k in ref if k in ours}
    print(f"{figures['machine']}; {figures['device']}; torch {figures['torch']}; preset {args.preset} "
          f"{args.dtype}; {args.repeats} repeats")
    print(f"{'stage':<24}{'reference':>11}{'project':>10}{'ratio':>8}")
    for key, ratio in figures["speedup"].items():
        print(f"{key:<24}{ref[key]:>11.2f}{ours[key]:>10.2f}{ratio:>7.2f}x")
    if "sam_encoder_compiled_ms" in ours:
        print(f"{'sam_encoder_compiled_ms':<24}{'':>11}{ours['sam_encoder_compiled_ms']:>10.2f}")
    print(f"largest relative difference to the reference: vision {figures['vision_max_relative_difference']:.1e}, "
          f"SAM encoder {figures['sam_encoder_max_relative_difference']:.1e}")
    for name, stages in figures.get("onnx", {}).items():
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    if "peak_gpu_memory_gb" in figures:
        print(f"peak GPU memory: {figures['peak_gpu_memory_gb']:.1f} GB")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
