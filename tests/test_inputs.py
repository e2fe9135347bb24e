"""Bad images, regions and queries get a clear refusal; the predictor keeps working."""

import numpy as np
import pytest

from nextchat_ros.errors import ImageError, QueryError
from nextchat_ros.predictor import NextChatPredictor


@pytest.mark.parametrize("image,message", [
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((64, 64), np.uint8), "grayscale"),
    (np.zeros((64, 64, 1), np.uint8), "grayscale"),
    (np.zeros((64, 64, 4), np.uint8), "RGBA"),
    (np.zeros((64, 64, 3), np.uint16), "16-bit"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((4, 64, 3), np.uint8), "at least"),
    (np.zeros((64, 64, 5), np.uint8), "shape"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_are_refused(predictor, image, message):
    with pytest.raises(ImageError, match=message):
        predictor.set_image(image)
    assert predictor.ask("where is the cube?", mode="ground").objects  # the old frame still serves


def test_huge_image_is_refused(tiny_model):
    p = NextChatPredictor(tiny_model, max_image_pixels=1000 * 1000)
    with pytest.raises(ImageError, match="MP"):
        p.set_image(np.zeros((1200, 1000, 3), np.uint8))


def test_ask_before_any_image(tiny_model):
    with pytest.raises(ImageError, match="no image is set"):
        NextChatPredictor(tiny_model).ask("hello")


@pytest.mark.parametrize("regions,text,message", [
    ([[float("nan"), 0, 10, 10]], "what is [0]?", "non-finite"),
    ([[-5, 0, 10, 10]], "what is [0]?", "negative"),
    ([[0, 0, 1000, 10]], "what is [0]?", "outside"),
    ([[10, 10, 10, 30]], "what is [0]?", "no area"),
    ([[0, 0, 10, 10]], "what is this?", "never refers"),
    ([], "what is [1]?", "refers to \\[1\\]"),
    ([[0, 0, 10]], "what is [0]?", "x1, y1, x2, y2"),
    ("nonsense", "what is [0]?", "regions"),
])
def test_bad_regions_are_refused(predictor, regions, text, message):
    with pytest.raises(QueryError, match=message):
        predictor.ask(text, regions=regions)


@pytest.mark.parametrize("query,message", [
    ("", "empty"), ("   \n\t ", "empty"), ("x" * 5000, "characters"),
    ("cube " * 400, "tokens"), ("where\x00 is it", "NUL"), (None, "text"),
])
def test_bad_queries_are_refused(predictor, query, message):
    with pytest.raises(QueryError, match=message):
        predictor.ask(query)
    assert predictor.ask("where is the cube?", mode="ground").objects


def test_bad_options_are_refused(predictor):
    with pytest.raises(QueryError, match="mode"):
        predictor.ask("hi", mode="chat")
    with pytest.raises(QueryError, match="temperature"):
        predictor.ask("hi", temperature=-1)
    with pytest.raises(QueryError, match="max_new_tokens"):
        predictor.ask("hi", max_new_tokens=0)
