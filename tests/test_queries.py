"""How a query is read (queries.py): one reading for the node, evaluate and the bag replay."""

import pytest

from nextchat_ros.queries import is_instruction, normalize_query, phrase_from_answer, phrase_from_query, read_query


@pytest.mark.parametrize("text,mode,instruction", [
    ("where is the red cup?", "ground", False),
    ("Could you please find the ball", "ground", False),
    ("which object is the cube?", "ground", False),
    ("find all the red objects.", "generate", False),
    ("pick up the cup.", "generate", True),
    ("please put the cube next to the ring.", "generate", True),
    ("is there a cup in the image?", "generate", False),
    ("describe [0].", "generate", False),
])
def test_auto_reading(text, mode, instruction):
    reading = read_query(text)
    assert (reading.mode, reading.instruction) == (mode, instruction)


def test_an_explicit_mode_is_kept_and_instructions_are_still_recognised():
    assert read_query("pick up the cup", "ground").mode == "ground"
    assert read_query("pick up the cup", "ground").instruction
    assert not is_instruction("picky cup")  # whole words only


@pytest.mark.parametrize("query,phrase", [
    ("where is the red cup?", "the red cup"),
    ("Can you show me the ball.", "the ball"),
    ("which object is the cylinder?", "the cylinder"),
    ("pick up the mug", "the mug"),
    ("the red cup", "the red cup"),
    ("where is?", "where is"),  # nothing after the verb: the query itself
])
def test_the_phrase_of_a_ground_mode_answer(query, phrase):
    assert phrase_from_query(query) == phrase


def test_the_phrase_before_a_trigger_in_an_answer():
    assert phrase_from_answer("yes, there is the red cube") == "the red cube"
    assert phrase_from_answer("Answer: ") == ""
    assert phrase_from_answer("moving the cup next to the ball") == "the cup next to the ball"


@pytest.mark.parametrize("typed,normalized", [
    ("where is the red cube?", "where is the red cube?"),
    ("WHERE IS THE RED CUBE", "where is the red cube?"),
    ("  Where   is\tthe red  cube ?", "where is the red cube ?"),
    ("Pick up the Mug", "pick up the mug."),
    ("red cube", "red cube."),
    ("Is there a BLUE ball", "is there a blue ball?"),
    ("describe [0]", "describe [0]."),
    ("what is <TRIGGER>?", "what is <trigger>?"),
    ("wow!", "wow!"),
    ("   ", ""),
])
def test_queries_are_normalized_before_the_model_reads_them(typed, normalized):
    assert normalize_query(typed) == normalized
    assert normalize_query(normalized) == normalized  # once is enough


def test_everyday_names_are_read_in_the_models_own_words():
    from nextchat_ros.model.config import TINY_SYNONYMS, NextChatConfig, tiny_config
    from nextchat_ros.queries import use_vocabulary

    assert use_vocabulary("where is the red block?", TINY_SYNONYMS) == "where is the red cube?"
    assert use_vocabulary("can you find the mugs left of [0]?", TINY_SYNONYMS) == "can you find the cups left of [0]?"
    assert use_vocabulary("where is the blockade?", TINY_SYNONYMS) == "where is the blockade?"  # whole words only
    assert use_vocabulary("where is the red block?", {}) == "where is the red block?"
    config = tiny_config()
    assert NextChatConfig.from_dict(config.to_dict()).synonyms == TINY_SYNONYMS
    assert NextChatConfig().synonyms == {}  # the released model reads open English


def test_the_shipped_model_reads_a_block_as_the_cube_it_was_taught():
    """Asked in its own words, named in the user's."""
    from nextchat_ros.predictor import load_predictor
    from nextchat_ros.synthetic.scenes import render_scene

    predictor = load_predictor()
    predictor.set_image(render_scene(3, height=240, width=320).image)
    cube = predictor.ask("where is the blue cube?", mode="ground", masks=False)
    block = predictor.ask("Where is the BLUE block", mode="ground", masks=False)
    assert (cube.text, block.text) == ("the blue cube [0]", "the blue block [0]")  # the user's words
    assert block.objects[0].box.tolist() == cube.objects[0].box.tolist()
    assert block.objects[0].score == cube.objects[0].score  # scored in the model's words


@pytest.mark.parametrize("typed,read", [
    ("Could you please find the red cube for me?", "find the red cube."),
    ("can you pick up the cup please", "pick up the cup."),
    ("Would you grab the ball, please?", "grab the ball."),
    ("please describe the image", "describe the image."),
    ("Can you see a cup?", "can you see a cup?"),  # a question, not a request: kept as asked
    ("please", "please."),
    ("Please, where is the cup?", "where is the cup?"),
])
def test_courtesy_around_a_request_is_not_part_of_it(typed, read):
    assert normalize_query(typed) == read
