"""The decode engine (static cache, batched queries, CUDA graphs, int8 / int4)
against the reference: transformers' own forward over a DynamicCache."""

import numpy as np
import pytest
import torch

from nextchat_ros.model import build_model
from nextchat_ros.model.build import DEFAULT_MODEL_DIR
from nextchat_ros.model.checkpoint import load_pretrained
from nextchat_ros.model.config import LLMConfig, SamConfig, VisionConfig, full_config
from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.queries import read_query
from nextchat_ros.synthetic.samples import EVAL_TASK_WEIGHTS, SyntheticTabletop

CUDA = torch.cuda.is_available()


def shipped_pair():
    """The shipped model twice (the engine fuses the LLM's projections in place)."""
    return (NextChatPredictor(load_pretrained(DEFAULT_MODEL_DIR), decoder="engine"),
            NextChatPredictor(load_pretrained(DEFAULT_MODEL_DIR), decoder="eager"))


def small_full_architecture():
    """The full preset's architecture at a size a test can run: a LLaMA LLM with as
    many KV heads as heads (Vicuna), CLIP's linear patch stem, the mlp2x projector,
    the released heads (no image position, no region features); the tiny tokenizer."""
    config = full_config()
    config.vision = VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=2)
    config.llm = LLMConfig(vocab_size=0, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    config.sam = SamConfig(image_size=64, patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                           encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32,
                           decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=2)
    config.box_head_hidden = 64
    config.tokens = type(config.tokens)()  # the tiny tokenizer's names for the trigger and location tokens
    config.system_prompt = "A chat."
    return config


def force_triggers(tok, steps, until):
    """A trigger at each of ``steps`` (counted in generated tokens), no end before ``until``."""
    def processor(generated, logits):
        logits = logits.clone()
        if len(generated) < until:
            logits[tok.eos_id] = -1e9
        if len(generated) in steps:
            logits = torch.full_like(logits, -1e9)
            logits[tok.trigger_id] = 0.0
        return logits
    return processor


def assert_same_answer(a, b, where=""):
    assert a.token_ids == b.token_ids, f"{where}: {a.text!r} != {b.text!r}"
    assert a.text == b.text and (a.truncated, a.cancelled) == (b.truncated, b.cancelled), where
    np.testing.assert_allclose(a.location_boxes, b.location_boxes, atol=1e-4, err_msg=where)
    for x, y in zip(a.objects, b.objects, strict=True):
        assert x.phrase == y.phrase, where
        assert x.score == pytest.approx(y.score, abs=1e-4), where
        np.testing.assert_allclose(x.box_normalized, y.box_normalized, atol=1e-4, err_msg=where)


def test_engine_answers_equal_the_eager_ones_on_held_out_questions_of_every_task():
    engine, eager = shipped_pair()
    stream = SyntheticTabletop("heldout", EVAL_TASK_WEIGHTS, height=240, width=320)
    tasks = {}
    for index in range(60):
        scene, samples = stream.scene_samples(index, 4)
        engine.set_image(scene.image)
        eager.set_image(scene.image)
        for sample in samples:
            mode = read_query(sample.question).mode
            asked = dict(regions=sample.regions or None, mode=mode, masks=False)
            assert_same_answer(engine.ask(sample.question, **asked), eager.ask(sample.question, **asked),
                               f"{sample.task}: {sample.question}")
            tasks[sample.task] = tasks.get(sample.task, 0) + 1
    assert sum(tasks.values()) >= 200 and set(tasks) == set(EVAL_TASK_WEIGHTS), tasks


def test_engine_equals_eager_on_a_random_model_of_the_full_architecture():
    config = small_full_architecture()
    engine = NextChatPredictor(build_model(config, seed=3).eval(), decoder="engine")
    eager = NextChatPredictor(build_model(config, seed=3).eval(), decoder="eager")
    assert engine.model.config.llm.num_key_value_heads == engine.model.config.llm.num_attention_heads
    assert not engine.model.config.region_features and engine.model.config.image_position_scale == 0
    tok = engine.model.tokenizer
    rng = np.random.default_rng(0)
    for seed in range(3):
        image = rng.integers(0, 256, (48 + 16 * seed, 64, 3), dtype=np.uint8)
        engine.set_image(image)
        eager.set_image(image)
        for query, regions in [("what is this?", None), ("describe [0] and [1].", [[2, 3, 30, 40], [10, 5, 60, 44]])]:
            for asked in (dict(max_new_tokens=12), dict(max_new_tokens=14, logits_processor=force_triggers(
                    tok, {1, 6}, until=14)), dict(mode="ground")):
                asked["min_score"] = 0.0  # a random model's presence scores are noise
                a, b = engine.ask(query, regions=regions, **asked), eager.ask(query, regions=regions, **asked)
                assert_same_answer(a, b, f"{query} {asked}")
                if "logits_processor" in asked:
                    assert len(a.objects) == 2 and a.truncated


def test_the_trigger_path_with_regions_and_masks_equals_eager():
    engine, eager = shipped_pair()
    scene = SyntheticTabletop("heldout", height=240, width=320).item(5)[0]
    tok = engine.model.tokenizer
    for p in (engine, eager):
        p.set_image(scene.image)
    regions = [[20, 30, 120, 140], [150, 60, 260, 200]]
    asked = dict(regions=regions, max_new_tokens=16, logits_processor=force_triggers(tok, {0, 4, 9}, until=16),
                 min_score=0.0)
    a, b = engine.ask("what is between [0] and [1]?", **asked), eager.ask("what is between [0] and [1]?", **asked)
    assert_same_answer(a, b)
    assert len(a.objects) == 3 and len(a.location_boxes) == 5
    for x, y in zip(a.objects, b.objects):
        assert (x.mask == y.mask).mean() > 0.999 and x.mask_score == pytest.approx(y.mask_score, abs=1e-4)


def test_queries_about_one_frame_never_see_each_other(predictor):
    asked = dict(max_new_tokens=20, min_score=0.0)
    first = predictor.ask("describe the table.", **asked)
    longer = predictor.ask("is there a red cube left of the small blue ball on the table?", **asked)
    predictor.ask("where is [0]?", regions=[[1, 2, 50, 60]], mode="ground")
    assert_same_answer(predictor.ask("describe the table.", **asked), first)
    assert_same_answer(predictor.ask("is there a red cube left of the small blue ball on the table?", **asked), longer)


def test_batched_answers_equal_unbatched_ones():
    engine, _ = shipped_pair()
    stream = SyntheticTabletop("heldout", EVAL_TASK_WEIGHTS, height=240, width=320)
    scene, samples = stream.scene_samples(11, 12)
    engine.set_image(scene.image)
    tok = engine.model.tokenizer
    queries = [(s.question, s.regions or None) for s in samples]
    for mode in ("generate", "ground"):
        alone = [engine.ask(q, regions=r, mode=mode, min_score=0.0) for q, r in queries]
        batched = engine.ask_batch(queries, mode=mode, min_score=0.0)  # 12 queries: batches of 8 and 4
        for (q, _), a, b in zip(queries, batched, alone, strict=True):
            assert_same_answer(a, b, f"{mode}: {q}")
            for x, y in zip(a.objects, b.objects):
                np.testing.assert_array_equal(x.mask, y.mask)
    # Rows that trigger and run to the token budget together.
    forced = force_triggers(tok, {2, 7}, until=10)
    texts = ["describe the image.", "what is on the left?", "count the cups."]
    alone = [engine.ask(t, max_new_tokens=10, logits_processor=forced, min_score=0.0) for t in texts]
    batched = engine.ask_batch(texts, max_new_tokens=10, logits_processor=forced, min_score=0.0)
    for a, b in zip(batched, alone):
        assert_same_answer(a, b)


def test_batched_sampling_gives_each_row_its_own_seed(predictor):
    texts = ["what do you see?"] * 3
    batched = predictor.ask_batch(texts, temperature=1.0, top_p=0.9, seed=5, max_new_tokens=10)
    for k, answer in enumerate(batched):
        alone = predictor.ask(texts[k], temperature=1.0, top_p=0.9, seed=5 + k, max_new_tokens=10)
        assert answer.token_ids == alone.token_ids


def test_the_cache_holds_a_frame_once_and_is_not_reallocated_between_queries(predictor):
    llama = predictor.decoder.llama
    pointer = llama.k_cache.data_ptr()
    for query in ("describe the table.", "where is the cup?", "is there a ball?"):
        predictor.ask(query, max_new_tokens=6)
    assert llama.k_cache.data_ptr() == pointer and llama.rows == 1
    predictor.ask_batch(["a?", "b?", "c?"], max_new_tokens=4)
    assert llama.rows == 3  # grown once for the batch, kept after


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8", "int4"])
def test_llm_precision_runs_and_stays_close_to_fp32(precision):
    from nextchat_ros.predictor import load_predictor

    reference = load_predictor()
    quantized = load_predictor(llm_precision=precision)
    layer = quantized.decoder.llama.layers[0]
    if precision in ("bf16", "fp16"):
        assert layer.qkv.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    else:
        assert type(layer.qkv.weight).__name__ != "Parameter"  # a torchao quantised tensor
    stream = SyntheticTabletop("heldout", {"rec": 1.0}, height=240, width=320)
    hits = 0
    for index in range(10):
        scene, sample = stream.item(index)
        for p in (reference, quantized):
            p.set_image(scene.image)
        a = reference.ask(sample.question, mode="ground", masks=False, min_score=0.0).objects[0].box_normalized
        b = quantized.ask(sample.question, mode="ground", masks=False, min_score=0.0).objects[0].box_normalized
        hits += np.abs(a - b).max() < 0.05
    assert hits >= 8, f"{precision}: {hits}/10 boxes within 0.05 of fp32"


def test_the_eager_reference_refuses_a_quantised_llm(tiny_model):
    with pytest.raises(ValueError, match="llm_precision applies to the engine"):
        NextChatPredictor(build_model("tiny", seed=0), decoder="eager", llm_precision="int8")
    with pytest.raises(ValueError, match="decoder 'fast'"):
        NextChatPredictor(tiny_model, decoder="fast")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_captured_decode_steps_equal_uncaptured_ones_on_cuda():
    stream = SyntheticTabletop("heldout", EVAL_TASK_WEIGHTS, height=240, width=320)
    graphs = NextChatPredictor(load_pretrained(DEFAULT_MODEL_DIR), device="cuda", cuda_graphs=True)
    plain = NextChatPredictor(load_pretrained(DEFAULT_MODEL_DIR), device="cuda", cuda_graphs=False)
    for index in range(10):
        scene, samples = stream.scene_samples(index, 3)
        for p in (graphs, plain):
            p.set_image(scene.image)
        queries = [(s.question, s.regions or None) for s in samples]
        for a, b in zip(graphs.ask_batch(queries), plain.ask_batch(queries)):
            assert_same_answer(a, b)
        for q, r in queries:
            assert_same_answer(graphs.ask(q, regions=r), plain.ask(q, regions=r))
    assert graphs.decoder._graphs  # steps were replayed from captured graphs
