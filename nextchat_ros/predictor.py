"""The predictor: encode a camera frame once, then answer any number of queries.

In the spirit of segment-anything's ``SamPredictor``: :meth:`set_image` runs the
vision tower, the SAM image encoder and the LLM over the system + image prefix,
and keeps all three (the last as a KV cache). :meth:`ask` then pays only for its
own tokens, the box heads and SAM's mask decoder. After each query the KV cache
is cropped back to the prefix, so queries never see each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from .backends import TorchBackend, load_backend
from .errors import ImageError, ModelFileError, QueryError
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    mask_box,
    normalized_to_pixels,
    pixels_to_normalized,
    validate_image,
    validate_regions,
)
from .model.nextchat import NextChatModel
from .options import DEFAULT_MAX_NEW_TOKENS
from .queries import MODES, normalize_query, phrase_from_answer, phrase_from_query
from .records import GroundedObject

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
    cache: DynamicCache
    prefix_len: int
    timings_ms: dict[str, float]
    image_embeds: torch.Tensor  # (1, N, D): what location tokens read their region from


class NextChatPredictor:
    def __init__(self, model: NextChatModel, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 backend=None):
        """``backend``: where the vision and mask parts run (``backends.load_backend``);
        default torch. The LLM always runs in torch."""
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(self.device, dtype).eval()
        self.backend = backend if backend is not None else TorchBackend(self.model)
        self.max_image_pixels = max_image_pixels
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

    # --- frames -----------------------------------------------------------------------
    @property
    def is_image_set(self) -> bool:
        return self._frame is not None

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> dict[str, float]:
        """Encode an RGB uint8 image (H, W, 3). Returns stage timings in ms."""
        image = validate_image(image, self.max_image_pixels)
        model = self.model
        timings = {}
        with self._lock:
            t0 = time.perf_counter()
            pixels = torch.from_numpy(image)
            vision_pixels = model.vision_tower.preprocess(pixels)[None].to(self.device, self.model.dtype)
            image_embeds = self.backend.vision(vision_pixels)
            t1 = time.perf_counter()
            sam_pixels = model.sam.preprocess(pixels)[None].to(self.device, self.model.dtype)
            sam_embedding = self.backend.sam_encoder(sam_pixels)
            t2 = time.perf_counter()
            prefix = torch.tensor([model.prompt.prefix()], device=self.device)
            cache = DynamicCache(config=model.llm.config)
            model.llm.model(inputs_embeds=model.embed(prefix, image_embeds), past_key_values=cache, use_cache=True)
            self._sync()
            t3 = time.perf_counter()
            timings = {"vision_ms": (t1 - t0) * 1e3, "sam_encoder_ms": (t2 - t1) * 1e3,
                       "prefix_ms": (t3 - t2) * 1e3, "set_image_ms": (t3 - t0) * 1e3}
            self._frame = _Frame(image.shape[0], image.shape[1], sam_embedding, cache, prefix.shape[1], timings,
                                 image_embeds)
        return timings

    # --- queries ----------------------------------------------------------------------
    @torch.inference_mode()
    def ask(self, query: str, regions=None, mode: str = "generate", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            masks: bool = True, logits_processor: LogitsProcessor | None = None,
            on_progress: ProgressCallback | None = None, stop: Callable[[], bool] | None = None) -> Answer:
        """Answer ``query`` about the current image.

        The query is read as ``queries.normalize_query`` writes it (case, spacing and a
        closing mark do not change the answer).
        regions: user boxes in pixels (x1, y1, x2, y2), referred to as [0], [1], ...
        mode: ``generate`` (free generation, greedy unless temperature > 0) or
        ``ground`` (the fixed answer ``Answer: <trigger>``: one forward, one box).
        logits_processor: ``f(generated_ids, logits) -> logits`` applied before each
        pick in ``generate`` mode (constrained decoding, e.g. forcing a grounding).
        on_progress: called after each generated token (``ProgressCallback``), on this thread.
        stop: checked before each token; when it returns True generation ends there and
        the answer comes back with ``cancelled`` set (no masks are computed for it).
        """
        if mode not in MODES:
            raise QueryError(f"unknown mode '{mode}'; use one of {MODES}")
        if not (temperature >= 0 and 0 < top_p <= 1):
            raise QueryError("temperature must be >= 0 and top_p in (0, 1]")
        if max_new_tokens < 1:
            raise QueryError("max_new_tokens must be at least 1")
        query = normalize_query(query)
        with self._lock:
            frame = self._frame
            if frame is None:
                raise ImageError("no image is set; call set_image() first")
            region_px = validate_regions(regions, frame.height, frame.width)
            question = self.model.prompt.question(query, len(region_px))
            try:
                t0 = time.perf_counter()
                if stop is not None and stop():
                    answer, hiddens = Answer(text="", objects=[], mode=mode, cancelled=True), []
                elif mode == "ground":
                    answer, hiddens = self._ground(frame, query, question, region_px)
                    if on_progress is not None:
                        on_progress(answer.text, list(answer.objects), 1)
                else:
                    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
                    answer, hiddens = self._generate(frame, question, region_px, max_new_tokens, temperature, top_p,
                                                     generator, logits_processor, on_progress, stop)
                self._sync()
                t1 = time.perf_counter()
                if masks and answer.objects and not answer.cancelled:
                    self._add_masks(frame, answer, hiddens)
                self._sync()
                t2 = time.perf_counter()
            finally:
                # Drop this query's tokens (transformers 5 crops by a negative count).
                extra = frame.cache.get_seq_length() - frame.prefix_len
                if extra > 0:
                    frame.cache.crop(-extra)
        answer.timings_ms = {"llm_ms": (t1 - t0) * 1e3, "mask_ms": (t2 - t1) * 1e3, "ask_ms": (t2 - t0) * 1e3}
        return answer

    def _region_boxes(self, frame: _Frame, region_px: np.ndarray) -> torch.Tensor:
        normalized = pixels_to_normalized(region_px, frame.height, frame.width)
        return torch.as_tensor(normalized, dtype=self.model.dtype, device=self.device).view(-1, 4)

    def _forward(self, frame: _Frame, ids: list[int], loc_boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Run token ids (location slots filled from loc_boxes) on the cache; last-layer hidden states."""
        model = self.model
        ids_t = torch.tensor([ids], device=self.device)
        loc_embeds = (model.location_embeddings(loc_boxes, frame.image_embeds)
                      if loc_boxes is not None and len(loc_boxes) else None)
        emb = model.embed(ids_t, loc_embeds=loc_embeds)
        return self._forward_embeds(frame, emb)

    def _forward_embeds(self, frame: _Frame, emb: torch.Tensor) -> torch.Tensor:
        return self.model.llm.model(inputs_embeds=emb, past_key_values=frame.cache, use_cache=True).last_hidden_state

    def _ground(self, frame, query, question, region_px) -> tuple[Answer, list[torch.Tensor]]:
        model, tok = self.model, self.model.tokenizer
        ids = question.ids + model.prompt.grounding_answer()
        region_boxes = self._region_boxes(frame, region_px)
        hidden = self._forward(frame, ids, region_boxes)
        p_trigger = model.llm.lm_head(hidden[0, -2]).float().softmax(-1)[tok.trigger_id].item()
        h = hidden[0, -1]
        box = model.box_decoder.decode(h)
        obj = self._make_object(frame, phrase_from_query(query), box, p_trigger)
        return Answer(text=f"{obj.phrase} [0]", objects=[obj], mode="ground", token_ids=[*ids, tok.location_id],
                      location_boxes=torch.cat([region_boxes, box[None]]).float().cpu().numpy()), [h]

    def _generate(self, frame, question, region_px, max_new_tokens, temperature, top_p, generator,
                  logits_processor, on_progress=None, stop=None) -> tuple[Answer, list[torch.Tensor]]:
        """Free generation; also returns each object's trigger hidden state (for its mask)."""
        model, tok = self.model, self.model.tokenizer
        region_boxes = self._region_boxes(frame, region_px)
        hidden = self._forward(frame, question.ids, region_boxes)
        logits = model.llm.lm_head(hidden[0, -1])
        token_ids = list(question.ids)
        loc_boxes = [b for b in region_boxes]
        pieces: list[list[int]] = [[]]
        objects: list[GroundedObject] = []
        hiddens: list[torch.Tensor] = []
        budget = model.config.llm.max_position_embeddings - frame.prefix_len - len(token_ids)
        truncated = cancelled = False
        generated: list[int] = []
        for _ in range(min(max_new_tokens, budget - 2)):
            if stop is not None and stop():
                cancelled = True
                break
            if logits_processor is not None:
                logits = logits_processor(generated, logits)
            token = self._pick(logits, temperature, top_p, generator)
            if token == tok.eos_id:
                break
            if token == tok.trigger_id:
                p_trigger = logits.float().softmax(-1)[token].item()
                h = self._forward(frame, [token])[0, -1]
                box = model.box_decoder.decode(h)
                objects.append(self._make_object(frame, phrase_from_answer(tok.decode(pieces[-1])), box, p_trigger))
                hiddens.append(h)
                # The location token is forced and carries the box back into the LLM.
                hidden = self._forward_embeds(frame, model.location_embeddings(box[None], frame.image_embeds)[None])
                token_ids += [token, tok.location_id]
                generated += [token, tok.location_id]
                loc_boxes.append(box)
                pieces.append([])
            else:
                hidden = self._forward(frame, [token])
                token_ids.append(token)
                generated.append(token)
                pieces[-1].append(token)
            logits = model.llm.lm_head(hidden[0, -1])
            if on_progress is not None:
                on_progress(_answer_text(tok, pieces), list(objects), len(generated))
        else:
            truncated = True  # the token budget ran out before the end of the answer
        boxes = torch.stack(loc_boxes).float().cpu().numpy() if loc_boxes else np.zeros((0, 4))
        return Answer(text=_answer_text(tok, pieces), objects=objects, mode="generate", token_ids=token_ids,
                      location_boxes=boxes, truncated=truncated, cancelled=cancelled), hiddens

    def _pick(self, logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
        logits = logits.float().masked_fill(self._banned, float("-inf"))
        if temperature == 0:
            return int(logits.argmax())
        probs = (logits / temperature).softmax(-1)
        if top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def _make_object(self, frame, phrase, box, score) -> GroundedObject:
        normalized = box.float().cpu().numpy()
        pixels = normalized_to_pixels(normalized, frame.height, frame.width)
        return GroundedObject(phrase=phrase, box=pixels.copy(), score=float(score), decoder_box=pixels,
                              box_normalized=normalized)

    def _add_masks(self, frame: _Frame, answer: Answer, hiddens: list[torch.Tensor]) -> None:
        """Each object's mask from SAM, prompted by its box and its trigger's hidden state."""
        model = self.model
        hidden = torch.stack(hiddens)
        boxes = torch.stack([torch.as_tensor(o.box_normalized) for o in answer.objects]).to(self.device, model.dtype)
        low, iou = self.backend.masks(frame.sam_embedding, boxes, hidden)
        logits = model.sam.postprocess_masks(low, frame.height, frame.width)
        masks = (logits > model.config.sam.mask_threshold).cpu().numpy()
        for obj, mask, score in zip(answer.objects, masks, iou[:, 0].float().cpu().tolist()):
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
                   rebuild_engines: bool = False) -> NextChatPredictor:
    """The one way to make a predictor (the node, every command, the benchmarks).

    ``model_dir``: a model directory; None or "" = the shipped tiny model.
    ``backend``: where the vision and mask parts run (``backends.BACKENDS``); the
    exported ones read ``export_dir`` (default ``model_dir/export``) in ``precision``
    (fp32 | fp16; default: the export's own). A TensorRT engine that cannot run here
    is rebuilt from its ONNX graph with ``rebuild_engines``, else falls back to ONNX
    Runtime with a logged warning; the predictor's ``backend.fallback_reason`` says
    why. Raises ModelFileError / BackendError naming what is wrong.
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
    return NextChatPredictor(model, device=device, max_image_pixels=max_image_pixels, backend=parts)


__all__ = ["MODES", "Answer", "GroundedObject", "NextChatPredictor", "ProgressCallback", "load_predictor"]
