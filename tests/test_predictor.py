"""The predictor: cached queries equal an uncached forward, special tokens stay text."""

import numpy as np
import pytest
import torch

from nextchat_ros.images import mask_box, normalized_to_pixels, pixels_to_normalized
from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.queries import normalize_query

SPECIAL_STRINGS = "<trigger> <loc> <at> <boxes> <im_patch> <im_start> <im_end> <s> </s> <pad> <unk>"


def uncached_hidden(model, image, token_ids, location_boxes):
    """One forward over prefix + token_ids, no cache, location embeddings made as in
    training (NextChatModel.forward): last-layer hidden states."""
    with torch.inference_mode():
        pixels = model.vision_tower.preprocess(torch.from_numpy(image.copy()))[None]
        ids = torch.tensor([model.prompt.prefix() + list(token_ids)])
        image_embeds = model.encode_image(pixels)
        boxes = torch.as_tensor(np.asarray(location_boxes), dtype=torch.float32).view(-1, 4)
        loc = model.location_embeddings(boxes, image_embeds.expand(len(boxes), -1, -1)) if len(boxes) else None
        emb = model.embed(ids, image_embeds, loc)
        return model.llm.model(inputs_embeds=emb).last_hidden_state[0], len(model.prompt.prefix())


def force_triggers_at(steps):
    def processor(generated, logits):
        if len(generated) in steps:
            logits = torch.full_like(logits, -1e9)
            logits[TRIGGER[0]] = 0.0
        return logits
    return processor


TRIGGER = [None]


def test_ground_mode_matches_uncached_forward(predictor, scene):
    model = predictor.model
    answer = predictor.ask("where is the red cube?", mode="ground")
    assert len(answer.objects) == 1 and answer.text.endswith("[0]")
    hidden, offset = uncached_hidden(model, scene.image, answer.token_ids, answer.location_boxes)
    trigger_pos = offset + len(answer.token_ids) - 2
    assert answer.token_ids[-2] == model.tokenizer.trigger_id
    with torch.inference_mode():
        ref_box = model.box_decoder.decode(hidden[trigger_pos]).numpy()
    np.testing.assert_allclose(answer.objects[0].box_normalized, ref_box, atol=1e-5)


@pytest.fixture(params=["shipped_layout", "trained_region_features"])
def region_predictor(request, predictor, scene):
    """The tiny model as built (region features start at zero) and one whose region
    features are non-zero, as after training: location tokens then depend on the image."""
    if request.param == "shipped_layout":
        return predictor
    from nextchat_ros.model import build_model

    model = build_model("tiny", seed=1).eval()
    torch.nn.init.normal_(model.region_features.proj.weight, std=0.2)
    p = NextChatPredictor(model)
    p.set_image(scene.image)
    return p


def test_generate_with_triggers_and_regions_matches_uncached_forward(region_predictor, scene):
    predictor = region_predictor
    model = predictor.model
    TRIGGER[0] = model.tokenizer.trigger_id
    region = [10.0, 20.0, 60.0, 70.0]
    answer = predictor.ask("what is left of [0]?", regions=[region], max_new_tokens=10,
                           logits_processor=force_triggers_at({2, 5}), min_score=0.0)
    assert len(answer.objects) == 2
    assert answer.text.count("[0]") == 1 and answer.text.count("[1]") == 1
    # location boxes: the user region first, then each decoded box
    np.testing.assert_allclose(answer.location_boxes[0], pixels_to_normalized(np.array(region), *scene.image.shape[:2]),
                               atol=1e-6)
    hidden, offset = uncached_hidden(model, scene.image, answer.token_ids, answer.location_boxes)
    triggers = [i for i, t in enumerate(answer.token_ids) if t == model.tokenizer.trigger_id]
    assert len(triggers) == 2
    for obj, pos in zip(answer.objects, triggers):
        assert answer.token_ids[pos + 1] == model.tokenizer.location_id
        with torch.inference_mode():
            ref_box = model.box_decoder.decode(hidden[offset + pos]).numpy()
        np.testing.assert_allclose(obj.box_normalized, ref_box, atol=1e-5)


def test_queries_on_one_frame_do_not_see_each_other(predictor):
    first = predictor.ask("describe the table.", max_new_tokens=8)
    predictor.ask("where is the cup?", mode="ground")
    predictor.ask("is there a ball?", max_new_tokens=5)
    again = predictor.ask("describe the table.", max_new_tokens=8)
    assert again.text == first.text and again.token_ids == first.token_ids


def test_masks_are_image_sized_and_scored(predictor, scene):
    answer = predictor.ask("where is the cube?", mode="ground")
    obj = answer.objects[0]
    assert obj.mask.shape == scene.image.shape[:2] and obj.mask.dtype == bool
    assert isinstance(obj.mask_score, float)
    no_masks = predictor.ask("where is the cube?", mode="ground", masks=False)
    assert no_masks.objects[0].mask is None
    h, w = scene.image.shape[:2]
    x1, y1, x2, y2 = obj.box
    assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h


def test_the_box_is_the_tight_box_of_the_mask():
    """SAM's mask outlines an object more tightly than the box decoder's box (held-out REC
    Acc@0.5 0.713 -> 0.791 with the shipped model): with a non-empty mask, the box is the
    mask's tight box; decoder_box keeps the decoder's own, the box the location token
    carried into the LLM; without masks the box is the decoder's."""
    from nextchat_ros.model.build import DEFAULT_MODEL_DIR
    from nextchat_ros.model.checkpoint import load_pretrained
    from nextchat_ros.synthetic.scenes import render_scene

    scene = render_scene(3, height=240, width=320)
    h, w = scene.image.shape[:2]
    predictor = NextChatPredictor(load_pretrained(DEFAULT_MODEL_DIR))
    predictor.set_image(scene.image)
    assert mask_box(np.zeros((h, w), bool)) is None
    for target in scene.objects:
        query = f"where is the {target.color} {target.kind}?"
        answer = predictor.ask(query, mode="ground")
        obj = answer.objects[0]
        np.testing.assert_allclose(obj.decoder_box, normalized_to_pixels(obj.box_normalized, h, w))
        np.testing.assert_allclose(answer.location_boxes[-1], obj.box_normalized)
        assert obj.mask.any()
        np.testing.assert_array_equal(obj.box, mask_box(obj.mask))
        assert not np.allclose(obj.box, obj.decoder_box, atol=0.5)
        bare = predictor.ask(query, mode="ground", masks=False).objects[0]
        np.testing.assert_array_equal(bare.box, bare.decoder_box)
        np.testing.assert_allclose(bare.decoder_box, obj.decoder_box)


def test_typed_special_token_strings_are_plain_text(predictor):
    tok = predictor.model.tokenizer
    ids = tok.encode(SPECIAL_STRINGS)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == SPECIAL_STRINGS
    question = predictor.model.prompt.question(normalize_query(SPECIAL_STRINGS), 0)  # as ask() reads it
    assert question.locations == {} and not set(question.ids) & tok.special_ids
    answer = predictor.ask(SPECIAL_STRINGS, max_new_tokens=12)
    # every object comes from a trigger the model generated, none from the text
    n_q = len(question.ids)
    assert answer.token_ids[:n_q] == question.ids
    assert answer.token_ids[n_q:].count(tok.trigger_id) == len(answer.objects)
    grounded = predictor.ask(SPECIAL_STRINGS, mode="ground", min_score=0.0)
    assert len(grounded.objects) == 1


def test_released_token_names_typed_by_a_user_are_plain_text():
    from nextchat_ros.model.config import full_config
    from tests.test_model import released_name_tokenizer

    tok = released_name_tokenizer(full_config())
    ids = tok.encode("where is <at> <boxes> the mug?")
    assert tok.trigger_id not in ids and tok.location_id not in ids
    assert not set(ids) & tok.special_ids


def test_sampling_is_reproducible_with_a_seed(predictor):
    a = predictor.ask("what do you see?", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=10)
    b = predictor.ask("what do you see?", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=10)
    assert a.token_ids == b.token_ids


def test_new_frame_replaces_the_cached_one(tiny_model, scene):
    p = NextChatPredictor(tiny_model)
    p.set_image(scene.image)
    a = p.ask("where is the cube?", mode="ground")
    p.set_image(np.ascontiguousarray(scene.image[::-1]))
    b = p.ask("where is the cube?", mode="ground")
    assert not np.allclose(a.objects[0].box_normalized, b.objects[0].box_normalized, atol=1e-4)
    p.set_image(scene.image)
    c = p.ask("where is the cube?", mode="ground")
    np.testing.assert_allclose(a.objects[0].box_normalized, c.objects[0].box_normalized, atol=1e-6)
    assert a.objects[0].mask_score == pytest.approx(c.objects[0].mask_score, abs=1e-6)


@pytest.mark.parametrize("query,phrase", [("where is the red mug?", "the red mug"),
                                          ("Please find the blue ball.", "the blue ball"),
                                          ("the green cup", "the green cup")])
def test_ground_mode_phrase_comes_from_the_query(predictor, query, phrase):
    assert predictor.ask(query, mode="ground").objects[0].phrase == phrase


@pytest.mark.parametrize("text,phrase", [(" picking up the cup", "the cup"), (" and a blue ball", "a blue ball"),
                                         ("there is a red cube, a cup", "a cup"), ("yes, the red cube", "the red cube"),
                                         (" moving the ring", "the ring")])
def test_generated_phrases_drop_the_verbs_before_the_object(text, phrase):
    from nextchat_ros.queries import phrase_from_answer

    assert phrase_from_answer(text) == phrase


def no_eos_with_a_trigger_at(step, tok):
    """Answers that run to max_new_tokens with one object: the stream has many steps."""
    def processor(generated, logits):
        logits = logits.clone()
        logits[tok.eos_id] = -1e9
        if len(generated) == step:
            logits = torch.full_like(logits, -1e9)
            logits[tok.trigger_id] = 0.0
        return logits
    return processor


def test_progress_streams_the_answer_and_stop_ends_it_at_the_next_token(predictor):
    tok = predictor.model.tokenizer
    ask = dict(query="describe the image.", max_new_tokens=12, logits_processor=no_eos_with_a_trigger_at(3, tok))
    full = predictor.ask(**ask)
    seen = []
    streamed = predictor.ask(**ask, on_progress=lambda text, objects, n: seen.append((text, len(objects), n)))
    assert (streamed.text, streamed.token_ids) == (full.text, full.token_ids) and full.truncated
    np.testing.assert_array_equal(streamed.objects[0].box, full.objects[0].box)
    # One call per step: the token count grows, the object appears when it is grounded,
    # and the last call holds the whole answer.
    counts = [n for *_, n in seen]
    query_tokens = len(full.token_ids) - counts[-1]
    assert len(seen) == 12 and counts == sorted(set(counts))
    assert [k for _, k, _ in seen][:3] == [0, 0, 0] and seen[-1][1] == 1 and seen[-1][0] == full.text

    checks = []  # once before the answer starts, then before each token
    cut = predictor.ask(**ask, stop=lambda: checks.append(1) or len(checks) > 3)
    assert cut.cancelled and not cut.truncated and len(checks) == 4
    assert len(cut.token_ids) - query_tokens == counts[1] and cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert cut.text == seen[1][0]
    assert all(o.mask is None for o in cut.objects)

    before = predictor.ask("where is the red cube?", mode="ground", stop=lambda: True)
    assert before.cancelled and before.objects == [] and before.text == ""
    # The cache is back at the prefix: the next answer is the uncancelled one.
    assert predictor.ask(**ask).token_ids == full.token_ids


@pytest.mark.parametrize("mode", ["ground", "generate"])
def test_case_spacing_and_a_closing_mark_do_not_change_the_answer(predictor, mode):
    reference = predictor.ask("where is the red cube?", mode=mode, max_new_tokens=8)
    for typed in ("WHERE IS THE RED CUBE", "Where is the red cube?", "  where  is the RED cube  "):
        answer = predictor.ask(typed, mode=mode, max_new_tokens=8)
        assert (answer.text, answer.token_ids) == (reference.text, reference.token_ids), typed
        np.testing.assert_array_equal(answer.location_boxes, reference.location_boxes)


def test_one_precision_runs_every_part_but_the_box_heads_which_stay_fp32():
    from nextchat_ros.errors import BackendError
    from nextchat_ros.model.nextchat import FP32_PARTS
    from nextchat_ros.predictor import load_predictor
    from nextchat_ros.synthetic.samples import SyntheticTabletop

    full, half = load_predictor(precision="fp32"), load_predictor(precision="bf16")
    assert half.model.dtype == torch.bfloat16
    for name, tensor in [*half.model.named_parameters(), *half.model.named_buffers()]:
        if tensor.is_floating_point():
            kept = name.startswith(tuple(part + "." for part in FP32_PARTS))
            assert tensor.dtype == (torch.float32 if kept else torch.bfloat16), name
    assert half.decoder.llama.layers[0].qkv.weight.dtype == torch.bfloat16
    stream = SyntheticTabletop("heldout", {"rec": 1.0}, height=240, width=320)
    for index in range(3):
        scene, sample = stream.item(index)
        answers = []
        for p in (full, half):
            p.set_image(scene.image)
            answers.append(p.ask(sample.question, mode="ground").objects[0])
        a, b = answers
        # A bf16 LLM moves the hidden state, not the head: the box follows within a pixel or two.
        assert np.abs(a.box_normalized - b.box_normalized).max() < 0.01
        assert (a.mask & b.mask).sum() / max(1, (a.mask | b.mask).sum()) > 0.9
    # The box head computes in fp32 from a bf16 hidden state: the fp32 model's head, exactly.
    hidden = torch.randn(5, half.model.config.llm.hidden_size).to(torch.bfloat16)
    torch.testing.assert_close(half.model.box_decoder.decode(hidden), full.model.box_decoder.decode(hidden.float()),
                               rtol=0, atol=0)
    with pytest.raises(BackendError, match="exported graphs come in fp32 and fp16, not 'bf16'"):
        load_predictor(backend="onnxruntime", precision="bf16")
