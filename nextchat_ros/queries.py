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
# Words before an object's name in a query, dropped from the phrase of a ground-mode answer.
_QUERY_LEAD_VERBS = (*LOCATE_VERBS, "show", "ground", "give me", "look at", "pick up", "grab")


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


def normalize_query(text: str) -> str:
    """The text as the model was taught to read it: lower case, single spaces, and a
    closing "?" (a question) or "." (anything else) when it has no closing mark.

    The tokenizer is case-sensitive and the model only ever saw lower-case, punctuated
    questions, so "WHERE IS THE RED CUBE" has to reach it as "where is the red cube?".
    Region references ([0]) and typed special-token strings stay plain text. Anything
    that is not a string is returned as it is (the prompt refuses it with a sentence).
    """
    if not isinstance(text, str):
        return text
    text = _SPACES.sub(" ", text).strip().lower()
    if text and text[-1] not in ".?!":
        text += "?" if _QUESTION_START.match(text) else "."
    return text


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
    phrase = query.strip().rstrip("?.! ")
    return _QUERY_LEAD.sub("", phrase).strip() or query.strip()


def phrase_from_answer(text: str) -> str:
    """The object named just before a trigger in the model's answer so far."""
    clause = re.split(r"[.,;:!?\n]", text)[-1].strip()
    previous = None
    while previous != clause:
        previous, clause = clause, _ANSWER_LEAD.sub("", clause).strip()
    return clause
