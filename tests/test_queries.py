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
