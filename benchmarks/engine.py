"""The decode engine against the eager predictor, in one run, on the same inputs.

    .venv/bin/python benchmarks/engine.py --device cpu                 # the shipped tiny model
    python benchmarks/engine.py --device cuda --preset full --dtype bf16 [--llm-precision int8]

Per stage, median ms: the frame's prefix prefill, a query's prefill on the cached
prefix, one decode step (ms/token), the trigger step (box decoder -> box encoder
-> the location token), and a 16-token answer with one trigger (the LLM only;
masks off). Then the greedy-answer agreement of the two over held-out questions
(tiny) or random images and questions (full), throughput of 8 queries about one
frame batched against one at a time, and peak GPU memory. ``--preset full`` builds
the released shapes (Vicuna-7B LLM, CLIP ViT-L/14-336, SAM ViT-H) with random
weights: latency does not depend on the values, and the tiny tokenizer stands in
for the real one (the LLM keeps the released 32,005-token vocabulary).
``--llm-precision fp16 | bf16 | int8 | int4`` casts or quantises the engine's LLM;
the eager reference then runs a copy in the model's dtype. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from common import median_ms, run_info

from nextchat_ros.model import build_model
from nextchat_ros.model.build import DEFAULT_MODEL_DIR
from nextchat_ros.model.checkpoint import load_pretrained
from nextchat_ros.model.config import SpecialTokens, get_preset
from nextchat_ros.options import LLM_PRECISIONS
from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.synthetic.samples import EVAL_TASK_WEIGHTS, SyntheticTabletop

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ANSWER_TOKENS = 16


def build(preset: str, device: str, dtype: torch.dtype):
    if preset == "tiny":
        return load_pretrained(DEFAULT_MODEL_DIR, device=device).set_precision(dtype)
    config = get_preset(preset)
    config.tokens = SpecialTokens()  # the tiny tokenizer's names
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in place on the device, in its dtype
    try:
        with torch.device(device):
            return build_model(config, seed=0).set_precision(dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def one_trigger_no_end(tok, at: int = 5):
    """Every answer runs to the token budget, with one object (the trigger path)."""
    def processor(generated, logits):
        logits = logits.clone()
        logits[[tok.eos_id, tok.trigger_id]] = float("-inf")
        if len(generated) == at:
            logits = torch.full_like(logits, float("-inf"))
            logits[tok.trigger_id] = 0.0
        return logits
    return processor


class Timer:
    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn) -> float:
        return median_ms(fn, (), self.repeats, self.sync, warmup=2)


@torch.inference_mode()
def stages(predictor: NextChatPredictor, image: np.ndarray, query: str, timer: Timer) -> dict[str, float]:
    """Per-stage ms of one predictor, each stage through the predictor's own decoder."""
    model, decoder = predictor.model, predictor.decoder
    predictor.set_image(image)
    frame = predictor._frame
    prefix = model.embed(torch.tensor([model.prompt.prefix()], device=predictor.device), frame.image_embeds)
    question = model.prompt.question(query, 0).ids
    query_embeds = predictor._embed_query(frame, question, torch.zeros(0, 4, device=predictor.device))
    token = model.llm.get_input_embeddings()(torch.tensor([model.tokenizer.eos_id], device=predictor.device))
    out = {"query_tokens": float(len(question)), "prefix_tokens": float(prefix.shape[1])}
    out["prefix_prefill_ms"] = timer.median_ms(lambda: decoder.set_prefix(prefix))

    def prefill():
        decoder.prefill([query_embeds])
        decoder.end()
    out["query_prefill_ms"] = timer.median_ms(prefill)

    steps = 32
    decoder.prefill([query_embeds])
    decoder.step(token)
    timer.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        hidden = decoder.step(token)
        int(predictor._logits(hidden).argmax())  # the one host sync per token
    timer.sync()
    out["ms_per_token"] = (time.perf_counter() - t0) * 1e3 / steps

    def trigger_step():
        box = model.box_decoder.decode(hidden.to(model.dtype))
        location = model.location_embeddings(box, frame.image_embeds).to(hidden.dtype)
        decoder.step(location)
        box.cpu()
    out["trigger_step_ms"] = timer.median_ms(trigger_step)
    decoder.end()
    forced = one_trigger_no_end(model.tokenizer)
    answers = []

    def answer():
        answers.append(predictor.ask("describe the image.", max_new_tokens=ANSWER_TOKENS, masks=False,
                                     logits_processor=forced))
    out["answer_16_tokens_ms"] = timer.median_ms(answer)
    assert len(answers[-1].objects) == 1 and answers[-1].truncated
    return out


@torch.inference_mode()
def agreement(engine, eager, preset: str, count: int, seed: int = 0) -> dict[str, float]:
    """Greedy answers token for token, and the largest box difference."""
    if preset == "tiny":
        stream = SyntheticTabletop("heldout", EVAL_TASK_WEIGHTS, height=240, width=320)
        items = [(scene, s.question, s.regions or None) for scene, s in (stream.item(i) for i in range(count))]
    else:
        rng = np.random.default_rng(seed)
        texts = ["describe the image.", "where is the red mug?", "what is left of the cup?", "is there a ball?"]
        items = [(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), texts[i % len(texts)], None)
                 for i in range(count)]
    same, box_diff = 0, 0.0
    for image, text, regions in items:
        image = getattr(image, "image", image)
        answers = []
        for p in (engine, eager):
            p.set_image(image)
            answers.append(p.ask(text, regions=regions, masks=False, max_new_tokens=ANSWER_TOKENS))
        a, b = answers
        same += a.token_ids == b.token_ids
        if a.token_ids == b.token_ids and len(a.location_boxes):
            box_diff = max(box_diff, float(np.abs(a.location_boxes - b.location_boxes).max()))
    return {"questions": float(count), "same_tokens": same / count, "max_box_diff": box_diff}


@torch.inference_mode()
def throughput(predictor, image, batch: int, timer: Timer) -> dict[str, float]:
    """Queries per second: ``batch`` queries about one frame, batched vs one at a time."""
    predictor.set_image(image)
    texts = [f"describe the {w} of the table." for w in ("left", "right", "middle", "front", "back",
                                                          "edge", "top", "corner")][:batch]
    asked = dict(max_new_tokens=ANSWER_TOKENS, masks=False)
    one = timer.median_ms(lambda: [predictor.ask(t, **asked) for t in texts])
    together = timer.median_ms(lambda: predictor.ask_batch(texts, **asked))
    return {"batch": float(batch), "one_at_a_time_qps": batch / one * 1e3, "batched_qps": batch / together * 1e3,
            "speedup": one / together}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--llm-precision", default="auto", choices=LLM_PRECISIONS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--questions", type=int, default=100, help="questions for the agreement check")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    timer = Timer(device, args.repeats)
    dtype = DTYPES[args.dtype]

    model = build(args.preset, args.device, dtype)
    # Another LLM precision than the model's casts or quantises the engine's LLM in place.
    reference = copy.deepcopy(model) if args.llm_precision != "auto" else model
    # The eager predictor first: the engine then makes the LLM's projections views
    # of its fused matrices, which the eager forward reads as they are.
    eager = NextChatPredictor(reference, device=device, dtype=dtype, decoder="eager")
    engine = NextChatPredictor(model, device=device, dtype=dtype, decoder="engine", llm_precision=args.llm_precision)
    image = SyntheticTabletop("heldout", height=480, width=640).item(0)[0].image
    query = "is the small red cube left of the large blue ball, and which of them is nearer to the green cup?"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures = {**run_info(device, args.preset, args.dtype), "llm_precision": args.llm_precision,
               "eager": stages(eager, image, query, timer), "engine": stages(engine, image, query, timer)}
    figures["engine_vs_eager"] = {k: figures["eager"][k] / figures["engine"][k] for k in figures["eager"]
                                  if k.endswith("_ms") or k == "ms_per_token"}
    figures["agreement"] = agreement(engine, eager, args.preset, args.questions)
    figures["throughput"] = throughput(engine, image, args.batch, timer)
    if device.type == "cuda":
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{figures['machine']}; {figures['device']}; torch {figures['torch']}; preset {args.preset} "
          f"{args.dtype}, LLM {args.llm_precision}; {args.repeats} repeats")
    print(f"{'stage':<26}{'eager':>10}{'engine':>10}{'ratio':>8}")
    for key, ratio in figures["engine_vs_eager"].items():
        print(f"{key:<26}{figures['eager'][key]:>10.2f}{figures['engine'][key]:>10.2f}{ratio:>7.1f}x")
    a, t = figures["agreement"], figures["throughput"]
    print(f"greedy answers identical: {a['same_tokens']:.3f} of {a['questions']:.0f}; "
          f"largest box difference {a['max_box_diff']:.1e}")
    print(f"{t['batch']:.0f} queries on one frame: {t['one_at_a_time_qps']:.1f} q/s one at a time, "
          f"{t['batched_qps']:.1f} q/s batched ({t['speedup']:.1f}x)")
    if "peak_gpu_memory_gb" in figures:
        print(f"peak GPU memory: {figures['peak_gpu_memory_gb']:.1f} GB (both predictors)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
