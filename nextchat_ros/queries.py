"""How a query is read: the text the model is given (``normalize_query``), which
answer mode it gets, whether it is an instruction, and the phrase an answer's
object is named by. One place, used by the predictor and the service (so the
node), `nextchat evaluate` and `nextchat bag eval --offline`, so every path asks
the same question the same way.

The model answers in English; the patterns below only route a query (they never
change what the model is asked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODES = ("generate", "ground")
# Polite openings that may come before any verb below.
_POLITE = r"(?:(?:please|can you|could you)\s+)*"
# Questions that ask where one thing is: answered by the grounding fast path.
LOCATE_VERBS = ("where's", "where is", "where are", "find", "locate", "point to", "point at", "show me", "detect",
                "segment", "which object is")
# Instructions to act on an object: the first object of the answer is the target.
INSTRUCTION_VERBS = ("pick up", "pick", "grab", "grasp", "take", "put", "place", "move", "push", "bring", "fetch",
                     "hand me", "go to", "reach")
# Words before an object's name in a query, dropped from the phrase of a ground-mode
# answer (and from the name an instruction's target is scored by).
_QUERY_LEAD_VERBS = (*LOCATE_VERBS, *INSTRUCTION_VERBS, "show", "ground", "give me", "look at", "is there",
                     "are there")
# Words after an object's name in a query that are not part of it.
_QUERY_TAIL = re.compile(r"\s+(?:in|on) (?:the|this) (?:image|picture|photo|view|scene)$", re.I)


def _alternatives(phrases) -> str:
    # Longest first, so "pick up" wins over "pick" and "show me" over "show".
    return "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in sorted(phrases, key=len, reverse=True))


_LOCATE = re.compile(rf"^\s*{_POLITE}(?:{_alternatives(LOCATE_VERBS)})\b", re.I)
_MANY = re.compile(r"\b(?:all|every|each)\b", re.I)  # "find all the cups": several objects, free generation
_INSTRUCTION = re.compile(rf"^\s*{_POLITE}(?:{_alternatives(INSTRUCTION_VERBS)})\b", re.I)
_QUERY_LEAD = re.compile(rf"^{_POLITE}(?:{_alternatives(_QUERY_LEAD_VERBS)})\s+", re.I)
# Words before an object's name in the model's own answer text.
_ANSWER_LEAD = re.compile(r"^(?:answer:|and|or|with|then|also|is|are|it is|there is|there are|yes|"
                          r"picking up|grabbing|pushing|moving|placing|putting|next to)\s+", re.I)


_SPACES = re.compile(r"\s+")
_QUESTION_START = re.compile(r"^(?:where|what|which|who|whose|how|is|are|was|were|can|could|do|does|did|will|would|"
                             r"should|has|have)\b")


# "could you please find ... for me?": the courtesy around a request, and the verbs
# that make what is left a request of its own.
_COURTESY_LEAD = re.compile(r"^(?:(?:please|kindly|hey|ok|okay),?\s+|(?:could|can|would|will) you\s+(?:please\s+)?"
                            r"|i(?:'d| would) like you to\s+)+")
_COURTESY_TAIL = re.compile(r"(?:\s+for me|,?\s+please)+(?=\s*[.?!]?$)")
_REQUEST_VERBS = (*LOCATE_VERBS, *INSTRUCTION_VERBS, "show", "tell me", "describe", "count")
_REQUEST_VERB = re.compile(rf"^(?:{_alternatives(_REQUEST_VERBS)})\b")


def normalize_query(text: str) -> str:
    """The text as the model was taught to read it: lower case, single spaces, no
    courtesy words around a request, and a closing "?" (a question) or "." (anything
    else) when it has no closing mark.

    The tokenizer is case-sensitive and the model only ever saw lower-case, punctuated
    questions, so "WHERE IS THE RED CUBE" has to reach it as "where is the red cube?",
    and "Could you please find the cup for me?" as "find the cup." (the words carry no
    request of their own; the tiny model answered such requests right a third as often).
    Region references ([0]) and typed special-token strings stay plain text. Anything
    that is not a string is returned as it is (the prompt refuses it with a sentence).
    """
    if not isinstance(text, str):
        return text
    text = _SPACES.sub(" ", text).strip().lower()
    plain = _COURTESY_TAIL.sub("", _COURTESY_LEAD.sub("", text)).strip()
    if plain != text:  # what is left is a question (as asked) or a request (closed with ".")
        if _QUESTION_START.match(plain):
            text = plain
        elif _REQUEST_VERB.match(plain):
            text = plain.rstrip("?").rstrip()
    if text and text[-1] not in ".?!":
        text += "?" if _QUESTION_START.match(text) else "."
    return text


def use_vocabulary(text: str, synonyms: dict[str, str]) -> str:
    """The normalised query in the model's own words: each whole word that
    ``synonyms`` lists is replaced ("the red block" -> "the red cube" for a model
    taught "cube"). Region references and punctuation are untouched."""
    if not synonyms or not isinstance(text, str):
        return text
    # Not inside a typed special-token string ("<boxes>" stays as typed).
    return re.sub(r"(?<![<\w])[a-z]+(?![\w>])", lambda m: synonyms.get(m.group(0), m.group(0)), text)


@dataclass(frozen=True)
class QueryReading:
    mode: str  # generate | ground
    instruction: bool  # an instruction: the answer's first object is its target


def choose_mode(text: str) -> str:
    """``ground`` for questions that ask where one thing is, ``generate`` otherwise."""
    text = text or ""
    return "ground" if _LOCATE.match(text) and not _MANY.search(text) else "generate"


def is_instruction(text: str) -> bool:
    return bool(_INSTRUCTION.match(text or ""))


def read_query(text: str, mode: str = "auto") -> QueryReading:
    """The reading of ``text``; ``mode`` other than ``auto`` is kept as asked."""
    return QueryReading(choose_mode(text) if mode == "auto" else mode, is_instruction(text))


def phrase_from_query(query: str) -> str:
    """The object a ground-mode query names: "where is the red cup?" -> "the red cup"."""
    phrase = _QUERY_TAIL.sub("", query.strip().rstrip("?.! "))
    return _QUERY_LEAD.sub("", phrase).strip() or query.strip()


def phrase_from_answer(text: str) -> str:
    """The object named just before a trigger in the model's answer so far."""
    clause = re.split(r"[.,;:!?\n]", text)[-1].strip()
    previous = None
    while previous != clause:
        previous, clause = clause, _ANSWER_LEAD.sub("", clause).strip()
    return clause


_ARTICLE = re.compile(r"^(?:the|a|an|this|that)\s+", re.I)
# "[3]" with at most one space before it (the space belongs to the reference): a user
# region in a question, an object in an answer (model/prompt.py reads them with it too).
REFERENCE = re.compile(r" ?\[(\d{1,3})\]")


def bare_phrase(phrase: str) -> str:
    """"the red mug" -> "red mug": an object's name without its article."""
    return _ARTICLE.sub("", phrase.strip()).strip() or phrase.strip()


# Where an object's relation to others starts ("the cup left of the ball"), and the
# words that pick one of several ("the largest cube") rather than name a thing.
_RELATION = re.compile(r"\s+(?:(?:to the )?(?:left|right) of|behind|in front of|next to|near(?:est)?(?: to)?|"
                       r"closest to|beside|between|above|below|under|on top of|on|in|with)\b.*$", re.I)
_SELECTORS = re.compile(r"\b(?:large|small|medium|big|little|tiny|largest|smallest|biggest|leftmost|"
                        r"rightmost|nearest|farthest|closest|first|second|third|last|other)\b\s*", re.I)
GENERIC_NAMES = ("object", "objects", "thing", "things", "one", "item")


def presence_name(phrase: str) -> str:
    """What a yes/no about presence asks for: the thing's name without its article,
    its relations to others or the words that pick one of several: "the large red
    cube left of the ball" -> "red cube". "" when only a generic word is left
    ("the leftmost object": every scene has one)."""
    name = REFERENCE.sub("", phrase)
    name = _SELECTORS.sub("", _RELATION.sub("", bare_phrase(name))).strip()
    name = bare_phrase(_SPACES.sub(" ", name))
    return "" if not name or name.lower() in GENERIC_NAMES else name[:80]


def presence_question(phrase: str) -> str | None:
    """The yes/no question whose answer scores an object: "is there a red mug in the
    image?" (the wording the model's yes/no answers were taught on); None when the
    phrase names nothing a yes/no can be about (``presence_name``)."""
    name = presence_name(phrase)
    if not name:
        return None
    article = "an" if name[:1] in "aeiou" else "a"
    return normalize_query(f"is there {article} {name} in the image?")


def absent_answer(phrase: str) -> str:
    """What an answer says when the object it names is not there."""
    return f"there is no {bare_phrase(phrase)}."


def keep_references(text: str, keep: list[bool], repeats: list[str] | None = None) -> str:
    """The answer text with the references of the objects not kept removed and the
    rest renumbered in order: keep [False, True] turns "a [0] and b [1]" into
    "a and b [0]". ``repeats``: per object, a phrase when a dropped object only
    repeats a kept one's mention ("a cup [0] and a cup [1]" at one box): that mention
    goes too, with its separator."""
    for index, phrase in enumerate(repeats or []):
        if phrase and not keep[index]:
            mention = rf"{re.escape(phrase)} \[{index}\]"
            shorter = re.sub(rf"(?:,\s*|\s+and\s+){mention}", "", text, count=1)
            text = shorter if shorter != text else re.sub(rf"{mention}(?:,\s*|\s+and\s+)", "", text, count=1)
    numbers = {}
    for index, kept in enumerate(keep):
        if kept:
            numbers[index] = len(numbers)

    def renumber(match: re.Match) -> str:
        index = int(match.group(1))
        return f" [{numbers[index]}]" if index in numbers else ""
    return REFERENCE.sub(renumber, text)
