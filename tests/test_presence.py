"""Scores that mean presence, and answers that say an object is not there."""

import numpy as np
import pytest
import torch

from nextchat_ros.predictor import load_predictor
from nextchat_ros.queries import absent_answer, keep_references, phrase_from_query, presence_question, read_query
from nextchat_ros.synthetic.scenes import COLORS, KINDS, render_scene


@pytest.fixture(scope="module")
def shipped():
    return load_predictor()


def test_presence_questions_and_answers_are_worded_as_the_model_was_taught():
    assert presence_question("the red mug") == "is there a red mug in the image?"
    assert presence_question("an orange cup") == "is there an orange cup in the image?"
    assert phrase_from_query("Is there a blue ball in the image?") == "a blue ball"
    assert absent_answer("the purple ball") == "there is no purple ball."
    assert keep_references("a cube [0] and a ball [1] by [2].", [False, True, True]) == "a cube and a ball [0] by [1]."
    assert keep_references("x [0].", [True]) == "x [0]."


def present_and_absent(scene):
    there = {(o.color, o.kind) for o in scene.objects}
    unique = [o for o in scene.objects if sum((p.color, p.kind) == (o.color, o.kind) for p in scene.objects) == 1]
    missing = [(c, k) for c in COLORS for k in KINDS if (c, k) not in there]
    return unique, missing


def test_the_score_is_the_models_yes_to_the_presence_question(shipped):
    """Against an uncached forward of prefix + the presence question: P(yes) of yes vs no."""
    model = shipped.model
    scene = render_scene(8_200_000, height=240, width=320, photo_probability=0.0)
    shipped.set_image(scene.image)
    target = present_and_absent(scene)[0][0]
    answer = shipped.ask(f"where is the {target.color} {target.kind}?", mode="ground", min_score=0.0)
    obj = answer.objects[0]
    with torch.inference_mode():
        pixels = model.vision_tower.preprocess(torch.from_numpy(scene.image.copy()))[None]
        question = model.prompt.question(f"is there a {target.color} {target.kind} in the image?", 0).ids
        ids = torch.tensor([model.prompt.prefix() + question])
        hidden = model.llm.model(inputs_embeds=model.embed(ids, model.encode_image(pixels))).last_hidden_state
        logits = model.llm.lm_head(hidden[0, -1])
    tok = model.tokenizer
    p_yes = logits[[tok.encode(" yes")[0], tok.encode(" no")[0]]].softmax(-1)[0].item()
    assert obj.score == pytest.approx(p_yes, abs=1e-4)
    assert obj.trigger_score > 0.9  # the old score: the trigger the fixed answer forces


def test_absent_objects_are_refused_and_present_ones_kept_on_held_out_scenes(shipped):
    """min_score 0.5 on 20 scenes no benchmark or default choice used: "where is" and
    "pick up" about a colour + kind that is not there get no object and say so; most
    present ones are kept."""
    rng = np.random.default_rng(3)
    refused_absent, kept_present, asked, present = 0, 0, 0, 0
    for k in range(20):
        scene = render_scene(8_300_000 + k, height=240, width=320, photo_probability=0.0)
        if scene.hidden:
            continue
        shipped.set_image(scene.image)
        unique, missing = present_and_absent(scene)
        color, kind = missing[int(rng.integers(len(missing)))]
        for question in (f"where is the {color} {kind}?", f"pick up the {color} {kind}."):
            answer = shipped.ask(question, mode=read_query(question).mode, min_score=0.5)
            asked += 1
            if not answer.objects:
                refused_absent += 1
                assert answer.text in (f"there is no {color} {kind}.", f"picking up the {color} {kind}.") \
                    or "[" not in answer.text, answer.text
        if unique:
            target = unique[0]
            present += 1
            kept_present += bool(shipped.ask(f"where is the {target.color} {target.kind}?", mode="ground",
                                             min_score=0.5).objects)
    # Without the presence score none was refused; the rates over 300 scenes are in the model card.
    assert refused_absent >= 0.8 * asked, f"{refused_absent} of {asked} absent targets refused"
    assert kept_present >= 0.8 * present, f"{kept_present} of {present} present targets kept"


def test_min_score_zero_keeps_every_object_and_bad_values_are_refused(shipped):
    scene = render_scene(8_200_001, height=240, width=320, photo_probability=0.0)
    shipped.set_image(scene.image)
    kept = shipped.ask("where is the purple elephant?", mode="ground", min_score=0.0)
    assert len(kept.objects) == 1 and kept.objects[0].score < 0.5 and kept.text.endswith("[0]")
    dropped = shipped.ask("where is the purple elephant?", mode="ground", min_score=0.5)
    assert dropped.objects == [] and dropped.text == "there is no purple elephant."
    from nextchat_ros.errors import QueryError

    with pytest.raises(QueryError, match="min_score"):
        shipped.ask("where is the cup?", min_score=1.5)


def test_over_the_service_an_absent_target_is_ok_with_no_objects():
    """What the node publishes with min_score set: STATUS_OK, no objects (so no
    target_point), an answer that says so; an error would have its own status."""
    from nextchat_ros.service import Frame, GroundingService, Request, Status

    scene = render_scene(8_200_002, height=240, width=320, photo_probability=0.0)
    color, kind = present_and_absent(scene)[1][0]
    service = GroundingService(load_predictor(), min_score=0.5)
    try:
        service.add_frame(Frame(scene.image, 1))
        outcome = service.process(Request("absent", f"pick up the {color} {kind}."))
    finally:
        service.close()
    assert outcome.status == Status.OK and outcome.objects == [] and outcome.instruction
    assert outcome.text in (f"there is no {color} {kind}.",) or "[" not in outcome.text, outcome.text


def test_two_objects_at_one_box_are_one_object(shipped):
    """The shipped model names each object of this scene twice ("a small orange bottle
    [0], a small orange bottle [1], ..."): each pair is at one box; the answer keeps one
    of each, and the text names each once."""
    from nextchat_ros.images import box_iou, normalized_to_pixels
    from nextchat_ros.predictor import DUPLICATE_IOU

    scene = render_scene(3, height=240, width=320)
    shipped.set_image(scene.image)
    answer = shipped.ask("describe the image.")
    decoded = [normalized_to_pixels(b, 240, 320) for b in answer.location_boxes]
    assert len(decoded) == 4 and box_iou(decoded[0], decoded[1]) >= DUPLICATE_IOU  # what the model said
    assert [o.phrase for o in answer.objects] == ["a small orange bottle", "a small blue cube"]
    assert answer.text == "there is a small orange bottle [0], a small blue cube [1]."
    boxes = [o.decoder_box for o in answer.objects]
    assert box_iou(boxes[0], boxes[1]) < DUPLICATE_IOU


def test_a_repeated_mention_goes_with_its_object():
    text = "a cup [0], a cup [1] and a ball [2]."
    assert keep_references(text, [False, True, True], ["a cup", "", ""]) == "a cup [0] and a ball [1]."
    assert keep_references(text, [True, False, True], ["", "a cup", ""]) == "a cup [0] and a ball [1]."
    # a different name for the same box stays in the text, without its reference
    assert keep_references("a large cup [0] and a medium cup [1].", [True, False], ["", ""]) == \
        "a large cup [0] and a medium cup."
