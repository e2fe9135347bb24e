"""The predictor: encode a camera frame once, then answer any number of queries.

In the spirit of segment-anything's ``SamPredictor``: :meth:`set_image` runs the
vision tower, the SAM image encoder and the LLM over the system + image prefix,
and keeps all three (the last as a KV cache). :meth:`ask` then pays only for its
own tokens, the box heads and SAM's mask decoder; :meth:`ask_batch` answers
several queries about the frame in one pass. The LLM runs in a decoder
(``engine.decoders``): the static-cache engine, where each query is written after
the prefix by position, or transformers' eager forward, cropped back to the prefix
after each query. Either way, queries never see each other.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backends import TorchBackend, load_backend
from .engine.decoders import EagerDecoder, StaticDecoder
from .engine.quantize import FLOAT_DTYPES, llm_dtype, quantize_linears
from .errors import ImageError, ModelFileError, QueryError
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    box_iou,
    mask_box,
    normalized_to_pixels,
    pixels_to_normalized,
    validate_image,
    validate_regions,
)
from .model.nextchat import NextChatModel
from .options import DECODERS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_SCORE, LLM_PRECISIONS
from .queries import (
    MODES,
    absent_answer,
    keep_references,
    normalize_query,
    phrase_from_answer,
    phrase_from_query,
    presence_question,
    read_query,
    use_vocabulary,
)
from .records import GroundedObject

# Two objects of one answer whose decoder boxes overlap this much are one object: the
# one the model is surer is there stays (the tiny model names one object twice, "a large
# yellow cup [0] and a medium yellow cup [1]", in half its grounded captions).
DUPLICATE_IOU = 0.8

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
# Called after each generated token with the answer so far, the objects grounded so
# far (no masks yet) and the number of tokens generated (streamed answers).
ProgressCallback = Callable[[str, list[GroundedObject], int], None]


@dataclass
class Answer:
    text: str
    objects: list[GroundedObject]
    mode: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    # What the LLM saw after the cached prefix, for checks and debugging:
    # the query + answer token ids and the box every location token carried.
    token_ids: list[int] = field(default_factory=list)
    location_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    truncated: bool = False
    # Generation was stopped by the caller (``stop``) before the answer ended; the
    # text and objects are what had been generated, without masks.
    cancelled: bool = False


@dataclass
class _Frame:
    height: int
    width: int
    sam_embedding: torch.Tensor
    timings_ms: dict[str, float]
    image_embeds: torch.Tensor  # (1, N, D): what location tokens read their region from


@dataclass
class _Row:
    """One query's generation state, a row of the batch."""

    text: str  # the query, normalised
    question: list[int]
    region_boxes: torch.Tensor  # (R, 4) normalised
    limit: int  # tokens it may pick
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    pieces: list[list[int]] = field(default_factory=lambda: [[]])
    objects: list[GroundedObject] = field(default_factory=list)
    hiddens: list[torch.Tensor] = field(default_factory=list)
    loc_boxes: list[torch.Tensor] = field(default_factory=list)
    picked: int = 0
    last: int = -1  # the token picked this step
    trigger_score: float | None = None  # set when the last pick was a trigger
    location: torch.Tensor | None = None  # the location token's embedding, the next input
    done: bool = False
    truncated: bool = False
    cancelled: bool = False


class NextChatPredictor:
    def __init__(self, model: NextChatModel, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 backend=None, decoder: str = "engine", llm_precision: str = "auto",
                 cuda_graphs: bool | None = None, max_batch: int = 8):
        """``dtype``: the precision of every part of the model (``NextChatModel.set_precision``:
        the box heads and SAM's prompt encoder stay fp32).
        ``backend``: where the vision and mask parts run (``backends.load_backend``);
        default torch. The LLM always runs in torch, through ``decoder``
        (``options.DECODERS``): ``engine``, the static-cache engine (queries batched,
        its decode step captured as a CUDA graph where ``cuda_graphs``, default: on
        CUDA), or ``eager``, transformers' forward over a DynamicCache (the reference).
        ``llm_precision`` (``options.LLM_PRECISIONS``): the LLM's weights
        (``engine.quantize``; the engine only)."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder '{decoder}' is not one of {DECODERS}")
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device).set_precision(dtype).eval()
        self.backend = backend if backend is not None else TorchBackend(self.model)
        self.max_image_pixels = max_image_pixels
        self.decoder = self._make_decoder(decoder, llm_precision, cuda_graphs, max_batch)
        self._frame: _Frame | None = None
        self._lock = threading.Lock()
        tok = model.tokenizer
        vocab = model.config.llm.vocab_size
        # Tokens the LLM may never sample: image slots, the location token (it is
        # forced after a trigger), BOS and padding rows of the embedding matrix.
        banned = torch.zeros(vocab, dtype=torch.bool)
        banned[tok.vocab_size:] = True
        for token_id in tok.special_ids - {tok.eos_id, tok.trigger_id}:
            banned[token_id] = True
        self._banned = banned.to(self.device)
        # How the model's yes/no answers start: what a presence score compares.
        self._yes_no = [tok.encode(" yes")[0], tok.encode(" no")[0]]

    def _make_decoder(self, decoder: str, precision: str, cuda_graphs: bool | None, max_batch: int):
        llm = self.model.llm
        dtype = llm_dtype(precision, self.model.dtype, self.device)
        if decoder == "eager":
            if (precision != "auto" and dtype != self.model.dtype) or precision in ("int8", "int4"):
                raise ValueError("llm_precision applies to the engine; the eager decoder runs the model's dtype")
            return EagerDecoder(llm)
        llm.to(dtype)
        engine = StaticDecoder(llm, llm.config.max_position_embeddings, max_rows=max_batch,
                               cuda_graphs=self.device.type == "cuda" if cuda_graphs is None else cuda_graphs)
        quantize_linears([engine.llama.layers, llm.lm_head], precision, self.device)
        return engine

    # --- frames -----------------------------------------------------------------------
    @property
    def is_image_set(self) -> bool:
        return self._frame is not None

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> dict[str, float]:
        """Encode an RGB uint8 image (H, W, 3). Returns stage timings in ms."""
        image = validate_image(image, self.max_image_pixels)
        model = self.model
        with self._lock:
            self._frame = None  # the decoder's cache is rewritten below
            t0 = time.perf_counter()
            pixels = torch.from_numpy(image)
            vision_pixels = model.vision_tower.preprocess(pixels)[None].to(self.device, self.model.dtype)
            image_embeds = self.backend.vision(vision_pixels)
            t1 = time.perf_counter()
            sam_pixels = model.sam.preprocess(pixels)[None].to(self.device, self.model.dtype)
            sam_embedding = self.backend.sam_encoder(sam_pixels)
            t2 = time.perf_counter()
            prefix = torch.tensor([model.prompt.prefix()], device=self.device)
            self.decoder.set_prefix(model.embed(prefix, image_embeds))
            self._sync()
            t3 = time.perf_counter()
            timings = {"vision_ms": (t1 - t0) * 1e3, "sam_encoder_ms": (t2 - t1) * 1e3,
                       "prefix_ms": (t3 - t2) * 1e3, "set_image_ms": (t3 - t0) * 1e3}
            self._frame = _Frame(image.shape[0], image.shape[1], sam_embedding, timings, image_embeds)
        return timings

    # --- queries ----------------------------------------------------------------------
    def ask(self, query: str, regions=None, mode: str = "generate", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            masks: bool = True, logits_processor: LogitsProcessor | None = None,
            on_progress: ProgressCallback | None = None, stop: Callable[[], bool] | None = None,
            min_score: float = DEFAULT_MIN_SCORE) -> Answer:
        """Answer ``query`` about the current image.

        The query is read as ``queries.normalize_query`` writes it (case, spacing and a
        closing mark do not change the answer), in the model's own words
        (``config.synonyms``: "block" is read as "cube" by the tiny model).
        regions: user boxes in pixels (x1, y1, x2, y2), referred to as [0], [1], ...
        mode: ``generate`` (free generation, greedy unless temperature > 0) or
        ``ground`` (the fixed answer ``Answer: <trigger>``: one forward, one box).
        logits_processor: ``f(generated_ids, logits) -> logits`` applied before each
        pick in ``generate`` mode (constrained decoding, e.g. forcing a grounding).
        on_progress: called after each generated token (``ProgressCallback``), on this thread.
        stop: checked before each token; when it returns True generation ends there and
        the answer comes back with ``cancelled`` set (no masks are computed for it).
        min_score: objects whose score (the probability that the object named is there)
        is below it are dropped, with their references in the text; when that leaves a
        grounding question or an instruction with no object, the text says the object is
        not there ("there is no red mug.").
        """
        return self.ask_batch([(query, regions)], mode, max_new_tokens, temperature, top_p, seed, masks,
                              logits_processor, on_progress, stop, min_score)[0]

    @torch.inference_mode()
    def ask_batch(self, queries, mode: str = "generate", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  masks: bool = True, logits_processor: LogitsProcessor | None = None,
                  on_progress: ProgressCallback | None = None,
                  stop: Callable[[], bool] | None = None, min_score: float = DEFAULT_MIN_SCORE) -> list[Answer]:
        """Several queries about the current image in one pass (``ask`` for the
        arguments): ``queries`` are texts or (text, regions) pairs. The engine runs
        them as one batch over the frame's cached prefix (up to its ``max_batch``;
        the eager decoder one after another); each answer is the one ``ask`` gives
        alone. Row k samples with ``seed + k``; ``on_progress`` and ``stop`` apply to
        a batch of one."""
        if mode not in MODES:
            raise QueryError(f"unknown mode '{mode}'; use one of {MODES}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise QueryError("temperature must be >= 0 and top_p in (0, 1]")
        if max_new_tokens < 1:
            raise QueryError("max_new_tokens must be at least 1")
        if not 0 <= min_score <= 1:
            raise QueryError(f"min_score must be in [0, 1], not {min_score}")
        if len(queries) != 1 and (on_progress is not None or stop is not None):
            raise QueryError("on_progress and stop apply to one query at a time")
        specs = [(q, None) if isinstance(q, str) else tuple(q) for q in queries]
        # The model is asked in its own words; phrases keep the user's.
        texts = [normalize_query(text) for text, _ in specs]
        with self._lock:
            frame = self._frame
            if frame is None:
                raise ImageError("no image is set; call set_image() first")
            regions = [validate_regions(r, frame.height, frame.width) for _, r in specs]
            synonyms = self.model.config.synonyms
            questions = [self.model.prompt.question(use_vocabulary(t, synonyms), len(r))
                         for t, r in zip(texts, regions)]
            answers = []
            step = self.decoder.max_rows
            for first in range(0, len(specs), step):
                chunk = slice(first, first + step)
                answers += self._answer_batch(frame, texts[chunk], questions[chunk], regions[chunk], mode,
                                              max_new_tokens, temperature, top_p, seed, first, masks,
                                              logits_processor, on_progress, stop, min_score)
        return answers

    def _answer_batch(self, frame, texts, questions, regions, mode, max_new_tokens, temperature, top_p, seed,
                      first, masks, logits_processor, on_progress, stop, min_score) -> list[Answer]:
        try:
            t0 = time.perf_counter()
            if stop is not None and stop():
                answers = [Answer(text="", objects=[], mode=mode, cancelled=True)]
                hiddens: list[list[torch.Tensor]] = [[]]
            elif mode == "ground":
                answers, hiddens = self._ground(frame, texts, questions, regions)
                if on_progress is not None:
                    on_progress(answers[0].text, list(answers[0].objects), 1)
            else:
                rows = [self._row(frame, t, q, r, max_new_tokens, seed, first + k, temperature)
                        for k, (t, q, r) in enumerate(zip(texts, questions, regions))]
                answers, hiddens = self._generate(frame, rows, temperature, top_p, logits_processor,
                                                  on_progress, stop)
            instructions = [read_query(t).instruction for t in texts]
            self._score_presence(frame, [(t, i, a) for t, i, a in zip(texts, instructions, answers) if not a.cancelled])
            hiddens = [self._keep_objects(a, h, min_score, i) for a, h, i in zip(answers, hiddens, instructions)]
            self._sync()
            t1 = time.perf_counter()
            if masks:
                self._add_masks(frame, [(a, h) for a, h in zip(answers, hiddens) if a.objects and not a.cancelled])
            self._sync()
            t2 = time.perf_counter()
        finally:
            self.decoder.end()
        for answer in answers:
            answer.timings_ms = {"llm_ms": (t1 - t0) * 1e3, "mask_ms": (t2 - t1) * 1e3, "ask_ms": (t2 - t0) * 1e3,
                                 "batch": float(len(answers))}
        return answers

    def _region_boxes(self, frame: _Frame, region_px: np.ndarray) -> torch.Tensor:
        normalized = pixels_to_normalized(region_px, frame.height, frame.width)
        return torch.as_tensor(normalized, dtype=torch.float32, device=self.device).view(-1, 4)

    def _embed_query(self, frame: _Frame, ids: list[int], region_boxes: torch.Tensor) -> torch.Tensor:
        """Token ids with their location slots filled from the region boxes -> (Q, D)."""
        model = self.model
        ids_t = torch.tensor([ids], device=self.device)
        loc_embeds = model.location_embeddings(region_boxes, frame.image_embeds) if len(region_boxes) else None
        return model.embed(ids_t, loc_embeds=loc_embeds)[0]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.llm.lm_head(hidden)

    def _ground(self, frame, texts, questions, regions) -> tuple[list[Answer], list[list[torch.Tensor]]]:
        """The grounding fast path: the fixed answer ``Answer: <trigger>`` after each
        question, one prefill for the batch."""
        model, tok = self.model, self.model.tokenizer
        tail = model.prompt.grounding_answer()
        ids = [q.ids + tail for q in questions]
        region_boxes = [self._region_boxes(frame, r) for r in regions]
        hidden = self.decoder.prefill([self._embed_query(frame, i, b) for i, b in zip(ids, region_boxes)])
        p_trigger = self._logits(torch.stack([h[-2] for h in hidden])).float().softmax(-1)[:, tok.trigger_id]
        trigger_hidden = torch.stack([h[-1] for h in hidden]).to(model.dtype)
        boxes = model.box_decoder.decode(trigger_hidden)
        answers = []
        for k, (text, score) in enumerate(zip(texts, p_trigger.tolist())):
            obj = self._make_object(frame, phrase_from_query(text), boxes[k], score)
            answers.append(Answer(text=f"{obj.phrase} [0]", objects=[obj], mode="ground",
                                  token_ids=[*ids[k], tok.location_id],
                                  location_boxes=torch.cat([region_boxes[k], boxes[k][None]]).float().cpu().numpy()))
        return answers, [[h] for h in trigger_hidden]

    def _row(self, frame, text, question, region_px, max_new_tokens, seed, index, temperature) -> _Row:
        room = self.decoder.context - self.decoder.prefix_len - len(question.ids)
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(seed + index)
        boxes = self._region_boxes(frame, region_px)
        return _Row(text, list(question.ids), boxes, min(max_new_tokens, room - 2), generator,
                    token_ids=list(question.ids), loc_boxes=list(boxes))

    def _generate(self, frame, rows: list[_Row], temperature, top_p, logits_processor, on_progress=None,
                  stop=None) -> tuple[list[Answer], list[list[torch.Tensor]]]:
        """Free generation for a batch of rows, one decode step for all of them at a
        time. A trigger's step decodes its box; the row's next input is then the
        location token (the box, embedded), after which it picks again."""
        model, tok = self.model, self.model.tokenizer
        embed_tokens = model.llm.get_input_embeddings()
        hidden = self.decoder.prefill([self._embed_query(frame, r.question, r.region_boxes) for r in rows])
        logits = self._logits(torch.stack([h[-1] for h in hidden]))
        width, dtype = hidden[0].shape[-1], hidden[0].dtype
        for row in rows:
            row.done = row.truncated = row.limit < 1
        while not all(row.done for row in rows):
            picking = [b for b, row in enumerate(rows) if not row.done and row.location is None]
            if stop is not None and picking and stop():
                for row in rows:
                    row.done = row.cancelled = True
                break
            picks = self._pick_rows(logits, rows, picking, temperature, top_p, logits_processor)
            inputs = torch.zeros(len(rows), width, device=self.device, dtype=dtype)
            token_rows, trigger_rows = [], []
            for b, row in enumerate(rows):
                if row.done:
                    continue
                if row.location is not None:  # the forced location token
                    inputs[b] = row.location
                    row.location = None
                    continue
                token = picks[b]
                row.picked += 1
                if token == tok.eos_id:
                    row.done = True
                    continue
                (trigger_rows if token == tok.trigger_id else token_rows).append(b)
                row.last = token
            if all(row.done for row in rows):
                break
            picked_rows = token_rows + trigger_rows
            if picked_rows:
                ids = torch.tensor([rows[b].last for b in picked_rows], device=self.device)
                inputs[picked_rows] = embed_tokens(ids).to(inputs.dtype)
            step_hidden = self.decoder.step(inputs)
            for b in token_rows:
                row = rows[b]
                row.token_ids.append(row.last)
                row.generated.append(row.last)
                row.pieces[-1].append(row.last)
            if trigger_rows:
                self._triggered(frame, rows, trigger_rows, step_hidden)
            for b in picked_rows:
                row = rows[b]
                if row.picked >= row.limit and not row.done:
                    row.done = row.truncated = True  # the token budget ran out before the end of the answer
                if on_progress is not None:
                    on_progress(_answer_text(tok, row.pieces), list(row.objects), len(row.generated))
            logits = self._logits(step_hidden)
        answers = []
        for row in rows:
            boxes = torch.stack(row.loc_boxes).float().cpu().numpy() if row.loc_boxes else np.zeros((0, 4))
            answers.append(Answer(text=_answer_text(tok, row.pieces), objects=row.objects, mode="generate",
                                  token_ids=row.token_ids, location_boxes=boxes, truncated=row.truncated,
                                  cancelled=row.cancelled))
        return answers, [row.hiddens for row in rows]

    def _triggered(self, frame, rows: list[_Row], trigger_rows: list[int], step_hidden: torch.Tensor) -> None:
        """Rows whose input was a trigger: decode its box, make the object, and embed
        the box as the location token, the row's next input."""
        model, tok = self.model, self.model.tokenizer
        trigger_hidden = step_hidden[trigger_rows].to(model.dtype)
        boxes = model.box_decoder.decode(trigger_hidden)
        locations = model.location_embeddings(boxes, frame.image_embeds).to(step_hidden.dtype)
        for k, b in enumerate(trigger_rows):
            row = rows[b]
            # "Answer: [0]" names nothing: the object is the one the query names.
            phrase = phrase_from_answer(tok.decode(row.pieces[-1])) or phrase_from_query(row.text)
            row.objects.append(self._make_object(frame, phrase, boxes[k], row.trigger_score))
            row.hiddens.append(trigger_hidden[k])
            row.location = locations[k]
            row.token_ids += [tok.trigger_id, tok.location_id]
            row.generated += [tok.trigger_id, tok.location_id]
            row.loc_boxes.append(boxes[k])
            row.pieces.append([])

    def _score_presence(self, frame: _Frame, answered: list[tuple[str, bool, Answer]]) -> None:
        """Each object's score: the model's P(yes) to ``queries.presence_question`` about
        its phrase on this frame (yes against no, the two ways such answers start),
        the questions of a batch in one prefill. An instruction's target is asked about
        by the name the query gives it: the answer may have picked another object."""
        objects, questions = [], []
        for text, instruction, answer in answered:
            for k, obj in enumerate(answer.objects):
                name = phrase_from_query(text) if instruction and k == 0 else obj.phrase
                question = presence_question(use_vocabulary(name, self.model.config.synonyms))
                if question is None:  # "the leftmost object": there is one; the trigger's score stays
                    continue
                objects.append(obj)
                questions.append(question)
        if not objects:
            return
        prompt = self.model.prompt
        no_regions = torch.zeros(0, 4, device=self.device)
        for first in range(0, len(objects), self.decoder.max_rows):
            chunk = objects[first:first + self.decoder.max_rows]
            ids = [prompt.question(q, 0).ids for q in questions[first:first + self.decoder.max_rows]]
            hidden = self.decoder.prefill([self._embed_query(frame, i, no_regions) for i in ids])
            self.decoder.end()
            logits = self._logits(torch.stack([h[-1] for h in hidden])).float()
            for obj, p_yes in zip(chunk, logits[:, self._yes_no].softmax(-1)[:, 0].tolist()):
                obj.score = p_yes

    def _keep_objects(self, answer: Answer, hiddens: list[torch.Tensor], min_score: float,
                      instruction: bool) -> list[torch.Tensor]:
        """Drop the objects scored below ``min_score`` and the second of two at one box
        (``DUPLICATE_IOU``; the higher score stays); returns the hidden states kept."""
        objects = answer.objects
        keep = [obj.score >= min_score for obj in objects]
        repeats = [""] * len(objects)  # a dropped duplicate named as the object it repeats
        kept: list[int] = []
        # Higher score first; scores equal to 1e-4 (one name asked twice) keep the earlier
        # object, whatever rounding a batched prefill adds.
        for k in sorted(range(len(keep)), key=lambda k: (-round(objects[k].score, 4), k)):
            same = [j for j in kept if box_iou(objects[k].box_normalized, objects[j].box_normalized) >= DUPLICATE_IOU]
            if keep[k] and same:
                keep[k] = False
                repeats[k] = objects[k].phrase if objects[k].phrase == objects[same[0]].phrase else ""
            elif keep[k]:
                kept.append(k)
        if all(keep):
            return hiddens
        rest = keep_references(answer.text, keep, repeats)
        # Nothing left to say ("Answer: ." once its object is gone), or a grounding
        # question or instruction without its object: the object is not there.
        says_nothing = not re.sub(r"answer:|[\s.,;:!?]", "", rest, flags=re.I)
        if not any(keep) and (answer.mode == "ground" or instruction or says_nothing):
            answer.text = absent_answer(answer.objects[0].phrase)
        else:
            answer.text = rest
        answer.objects = [obj for obj, k in zip(answer.objects, keep) if k]
        return [h for h, k in zip(hiddens, keep) if k]

    def _pick_rows(self, logits, rows, picking, temperature, top_p, logits_processor) -> dict[int, int]:
        """The next token of each picking row: greedy over the batch in one host sync,
        or row by row where a logits processor or sampling needs it."""
        tok = self.model.tokenizer
        if not picking:
            return {}
        if logits_processor is None and temperature == 0:
            chosen = logits[picking].float().masked_fill(self._banned, float("-inf")).argmax(-1).tolist()
            picks = dict(zip(picking, chosen))
            for b in picking:
                if picks[b] == tok.trigger_id:
                    rows[b].trigger_score = logits[b].float().softmax(-1)[tok.trigger_id].item()
            return picks
        picks = {}
        for b in picking:
            row_logits = logits[b]
            if logits_processor is not None:
                row_logits = logits_processor(list(rows[b].generated), row_logits)
            picks[b] = self._pick(row_logits, temperature, top_p, rows[b].generator)
            if picks[b] == tok.trigger_id:
                rows[b].trigger_score = row_logits.float().softmax(-1)[tok.trigger_id].item()
        return picks

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
        logits = logits.float().masked_fill(self._banned, float("-inf"))
        if temperature == 0:
            return int(logits.argmax())
        probs = (logits / temperature).softmax(-1)
        if top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _make_object(self, frame, phrase, box, score) -> GroundedObject:
        normalized = box.float().cpu().numpy()
        pixels = normalized_to_pixels(normalized, frame.height, frame.width)
        # The score is the trigger's until _score_presence asks whether the object is there.
        return GroundedObject(phrase=phrase, box=pixels.copy(), score=float(score), decoder_box=pixels,
                              box_normalized=normalized, trigger_score=float(score))

    def _add_masks(self, frame: _Frame, answered: list[tuple[Answer, list[torch.Tensor]]]) -> None:
        """Each object's mask from SAM, prompted by its box and its trigger's hidden
        state; the objects of every answer in the batch in one call."""
        if not answered:
            return
        model = self.model
        objects = [obj for answer, _ in answered for obj in answer.objects]
        hidden = torch.stack([h for _, hiddens in answered for h in hiddens])
        boxes = torch.stack([torch.as_tensor(o.box_normalized) for o in objects]).to(self.device, torch.float32)
        low, iou = self.backend.masks(frame.sam_embedding, boxes, hidden)
        logits = model.sam.postprocess_masks(low, frame.height, frame.width)
        masks = (logits > model.config.sam.mask_threshold).cpu().numpy()
        for obj, mask, score in zip(objects, masks, iou[:, 0].float().cpu().tolist()):
            obj.mask = mask
            obj.mask_score = score
            # SAM's mask outlines the object more tightly than the box decoder's box
            # (held-out REC accuracy is higher with the mask's box: see the model card).
            tight = mask_box(mask)
            if tight is not None:
                obj.box = tight

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _answer_text(tok, pieces: list[list[int]]) -> str:
    """The answer's text: the pieces between triggers, each object's index after its phrase."""
    text = tok.decode(pieces[0])
    for k, piece in enumerate(pieces[1:]):
        text += f" [{k}]" + tok.decode(piece)
    return text.strip()


def load_predictor(model_dir: str | Path | None = None, backend: str = "torch", export_dir: str | Path | None = None,
                   device: str = "cpu", precision: str | None = None,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   rebuild_engines: bool = False, llm_precision: str = "auto",
                   decoder: str = "engine") -> NextChatPredictor:
    """The one way to make a predictor (the node, every command, the benchmarks).

    ``model_dir``: a model directory; None or "" = the shipped tiny model.
    ``precision`` (``options.PRECISIONS``, default fp32): what every part runs in, the
    box heads and SAM's prompt encoder excepted (fp32 always); the LLM too unless
    ``llm_precision`` says otherwise.
    ``backend``: where the vision and mask parts run (``backends.BACKENDS``); the
    exported ones read ``export_dir`` (default ``model_dir/export``) and run its graphs
    of ``precision`` (fp32 | fp16; when not given, the export's own graphs, with the
    parts in torch in fp32). A TensorRT engine that cannot run here
    is rebuilt from its ONNX graph with ``rebuild_engines``, else falls back to ONNX
    Runtime with a logged warning; the predictor's ``backend.fallback_reason`` says
    why. ``llm_precision`` / ``decoder``: how the LLM runs (``NextChatPredictor``).
    Raises ModelFileError / BackendError naming what is wrong.
    """
    from .model.build import DEFAULT_MODEL_DIR
    from .model.checkpoint import load_pretrained

    model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if model_dir == DEFAULT_MODEL_DIR and not (model_dir / "model.safetensors").is_file():
        raise ModelFileError(f"no model directory given and the shipped model is missing: {model_dir}")
    model = load_pretrained(model_dir, device=device)
    if backend != "torch" and not export_dir:
        export_dir = model_dir / "export"
    parts = load_backend(backend, model, export_dir, precision=precision, rebuild_engines=rebuild_engines)
    return NextChatPredictor(model, device=device, dtype=FLOAT_DTYPES[precision or "fp32"],
                             max_image_pixels=max_image_pixels, backend=parts, decoder=decoder,
                             llm_precision=llm_precision)


__all__ = ["DECODERS", "DUPLICATE_IOU", "LLM_PRECISIONS", "MODES", "Answer", "GroundedObject", "NextChatPredictor",
           "ProgressCallback", "load_predictor"]
