"""Prompt layout of NExT-Chat, built token id by token id.

One conversation turn, vicuna_v1.1 style::

    <s>{system} USER: <im_start><im_patch>*N<im_end>\\n{question} ASSISTANT: {answer}</s>
    \\________________________ prefix ________________/\\____ query _____/

The *prefix* depends only on the image, so the predictor runs it once per frame
and keeps its KV cache. In the question, a user region written ``[k]`` becomes
one location token whose embedding is ``box_encoder(region k)``. In an answer,
``phrase [k]`` (how answers are written in training data and how they read
back to the user) becomes ``phrase<trigger><loc>``: the trigger's hidden state
is decoded into box k, and the location token carries that box back in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import QueryError
from ..queries import REFERENCE
from .config import NextChatConfig
from .tokenizer import TextTokenizer

GROUNDING_ANSWER = "Answer:"


@dataclass
class Segment:
    """Token ids plus which of them are location tokens and which box each takes."""

    ids: list[int] = field(default_factory=list)
    # index into ids -> index of the box that location token carries
    locations: dict[int, int] = field(default_factory=dict)

    def extend(self, other: Segment) -> None:
        offset = len(self.ids)
        self.ids.extend(other.ids)
        self.locations.update({offset + i: b for i, b in other.locations.items()})


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    loc_boxes: list[list[float]]  # one normalised xyxy box per location token, in order
    # Which turn each token belongs to: 0 for the image prefix, k >= 1 for turn k.
    # Turns of a packed example see the prefix and themselves, never each other.
    turns: list[int] = field(default_factory=list)
    # (token index, normalised xyxy box): question tokens that should look at a box
    # (training only: the last token of a relation's anchor name, at the anchor).
    look: list[tuple[int, list[float]]] = field(default_factory=list)


def pack_turns(examples: list[Example], prefix_len: int) -> Example:
    """Several single-turn examples about one image as one row: the shared prefix
    once, then each question + answer as its own turn.

    Why: the image's tokens are most of a row (100 of ~160 in the tiny preset);
    packing 4 turns per image trains on 2.8x the samples per second
    (training/README.md). Each turn is masked from the others and starts at the
    position the prefix ends at, so it computes exactly what the predictor
    computes for that question alone on the frame's cached prefix (checked by
    test_packed_turns_compute_what_single_turns_do).
    """
    first = examples[0]
    packed = Example(list(first.input_ids[:prefix_len]), list(first.labels[:prefix_len]), [], [0] * prefix_len)
    for k, e in enumerate(examples, start=1):
        if e.input_ids[:prefix_len] != packed.input_ids[:prefix_len] or any(t > 1 for t in e.turns):
            raise ValueError("only single-turn examples with the same image prefix can be packed")
        packed.look += [(len(packed.input_ids) + i - prefix_len, box) for i, box in e.look]
        packed.input_ids += e.input_ids[prefix_len:]
        packed.labels += e.labels[prefix_len:]
        packed.loc_boxes += e.loc_boxes
        packed.turns += [k] * (len(e.input_ids) - prefix_len)
    return packed


class PromptBuilder:
    def __init__(self, tokenizer: TextTokenizer, config: NextChatConfig, num_image_tokens: int):
        self.tok = tokenizer
        self.config = config
        self.num_image_tokens = num_image_tokens

    # --- pieces --------------------------------------------------------------------
    def prefix(self) -> list[int]:
        c, t = self.config, self.tok
        ids = [t.bos_id] if t.bos_id is not None else []
        ids += t.encode(f"{c.system_prompt} {c.user_role}: ")
        ids += [t.image_start_id] + [t.image_patch_id] * self.num_image_tokens + [t.image_end_id]
        return ids

    def question(self, text: str, num_regions: int) -> Segment:
        """User text (with [k] region references) + the assistant role marker."""
        text = self.validate_text(text)
        seg = Segment(self.tok.encode("\n"))
        seg.extend(self._with_references(text, num_regions, role="question", trigger=False))
        seg.ids += self.tok.encode(f" {self.config.assistant_role}:")
        return seg

    def answer(self, text: str, num_boxes: int) -> Segment:
        """Training answer: ``phrase [k]`` -> phrase<trigger><loc k>, then </s>."""
        seg = self._with_references(" " + text.strip(), num_boxes, role="answer", trigger=True)
        seg.ids.append(self.tok.eos_id)
        return seg

    def grounding_answer(self) -> list[int]:
        """The fixed answer of the grounding fast path, up to and including the trigger."""
        return [*self.tok.encode(f" {GROUNDING_ANSWER}"), self.tok.trigger_id]

    def training_example(self, question: str, answer: str, regions, answer_boxes, look=()) -> Example:
        """Token ids, LM labels and location boxes of one supervised turn.

        ``regions`` / ``answer_boxes``: normalised xyxy boxes referred to as [k] in
        the question / the answer. Only answer tokens are labelled; location tokens
        never are (they are forced at inference), trigger tokens always are.
        ``look``: (character offset in the question, normalised box) pairs: the
        token that ends there should look at the box (``Example.look``); pairs
        whose offset is not a token boundary, or in a question with regions, are
        dropped.
        """
        prefix = self.prefix()
        q = self.question(question, len(regions))
        a = self.answer(answer, len(answer_boxes))
        context = len(prefix) + len(q.ids)
        ids = prefix + q.ids + a.ids
        labels = [-100] * context + [-100 if t == self.tok.location_id else t for t in a.ids]
        boxes = [list(map(float, regions[i])) for _, i in sorted(q.locations.items())]
        boxes += [list(map(float, answer_boxes[i])) for _, i in sorted(a.locations.items())]
        example = Example(ids, labels, boxes, [0] * len(prefix) + [1] * (len(ids) - len(prefix)))
        if look and not regions:  # the question segment is "\n" + the stripped text + the role marker
            text, start = question.strip(), len(self.tok.encode("\n"))
            for end, box in look:
                head = self.tok.encode(text[:end])
                if head and q.ids[start:start + len(head)] == head:
                    example.look.append((len(prefix) + start + len(head) - 1, list(map(float, box))))
        return example

    # --- helpers -------------------------------------------------------------------
    def validate_text(self, text: str) -> str:
        if not isinstance(text, str):
            raise QueryError(f"the query must be text, not {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise QueryError("the query is empty; ask a question or give an instruction")
        if len(stripped) > self.config.max_query_chars:
            raise QueryError(
                f"the query is {len(stripped)} characters long; the limit is {self.config.max_query_chars}")
        if "\x00" in stripped:
            raise QueryError("the query contains a NUL character")
        n_tokens = len(self.tok.encode(stripped))
        if n_tokens > self.config.max_query_tokens:
            raise QueryError(
                f"the query is {n_tokens} tokens long; the limit is {self.config.max_query_tokens}")
        return stripped

    def _with_references(self, text: str, num_boxes: int, role: str, trigger: bool) -> Segment:
        seg = Segment()
        used: set[int] = set()
        pos = 0
        for match in REFERENCE.finditer(text):
            index = int(match.group(1))
            if index >= num_boxes:
                have = f"only {num_boxes} region(s) were given" if role == "question" else f"{num_boxes} box(es)"
                raise QueryError(f"the {role} refers to [{index}] but {have}")
            seg.ids += self.tok.encode(text[pos:match.start()])
            if trigger:
                seg.ids.append(self.tok.trigger_id)
            seg.locations[len(seg.ids)] = index
            seg.ids.append(self.tok.location_id)
            used.add(index)
            pos = match.end()
        seg.ids += self.tok.encode(text[pos:])
        if role == "question" and len(used) != num_boxes:
            unused = sorted(set(range(num_boxes)) - used)
            raise QueryError(
                f"region(s) {unused} were given but the text never refers to them; write [k] for region k")
        return seg

