"""The grounding service: frames and queries in, one outcome per query out.

ROS-agnostic (the node translates messages to and from it), so everything worth
testing here is tested without ROS. Callers never block: ``add_frame`` appends
to a bounded frame buffer, ``submit`` enqueues a request or refuses it at once
(OVERLOADED). One worker thread pairs each request with a frame, encodes a frame
only when it is not the one already encoded, asks the predictor, and hands the
outcome to the request's ``done`` callback. Every request gets exactly one.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from .errors import ImageError, QueryError
from .options import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MIN_SCORE
from .predictor import NextChatPredictor, ProgressCallback
from .queries import QueryReading, choose_mode, read_query
from .records import Frame, GroundedObject

log = logging.getLogger(__name__)


class Status(IntEnum):
    """Mirrors the STATUS_* constants of nextchat_ros/msg/GroundingResult."""

    OK = 0
    BAD_IMAGE = 1
    BAD_QUERY = 2
    NO_IMAGE = 3
    STALE_IMAGE = 4
    OVERLOADED = 5
    INTERNAL_ERROR = 6
    INACTIVE = 7
    CANCELLED = 8


@dataclass
class Request:
    query_id: str
    text: str
    regions: list = field(default_factory=list)  # pixel xyxy boxes, [k] in the text
    stamp_ns: int = 0  # 0 = the newest frame
    mode: str = ""  # auto | generate | ground; "" = the service's default_mode
    # The frame to answer about: an explicit image (the service call), or the buffered
    # camera frame the stamp names, pinned here as soon as it is buffered so that newer
    # frames cannot push it out of the buffer while the request waits in the queue.
    frame: Frame | None = None
    received: float | None = None  # the service's clock; set by submit when None
    done: Callable[[Outcome], None] | None = None
    # Streamed answers (the node's Ask action): called after each generated token with
    # the answer so far, the objects so far and the token count, on the worker thread.
    progress: ProgressCallback | None = None
    # Checked before the request starts and before each token: True cancels it.
    cancelled: Callable[[], bool] | None = None


# The service's objects are the predictor's records, with ``position`` filled in
# where depth is known. The old name stays for one release.
ObjectResult = GroundedObject


@dataclass
class Outcome:
    request: Request
    status: Status
    error: str = ""
    text: str = ""
    objects: list[GroundedObject] = field(default_factory=list)
    frame: Frame | None = None
    mode: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The query read as an instruction: the first object is its target (target_point).
    instruction: bool = False


__all__ = ["Frame", "GroundingService", "ObjectResult", "Outcome", "Request", "Status", "choose_mode",
           "object_position"]


def object_position(mask: np.ndarray, depth: np.ndarray, intrinsics) -> tuple[float, float, float] | None:
    """Median depth over the mask, back-projected at the mask's centroid (pinhole)."""
    if mask is None or depth is None or intrinsics is None or depth.shape != mask.shape:
        return None
    values = depth[mask]
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return None
    z = float(np.median(values))
    ys, xs = np.nonzero(mask)
    u, v = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    fx, fy, cx, cy = intrinsics
    return ((u - cx) * z / fx, (v - cy) * z / fy, z)


class GroundingService:
    def __init__(self, predictor: NextChatPredictor, *, max_image_age: float = 2.0, frame_buffer: int = 8,
                 queue_size: int = 8, default_mode: str = "auto", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 masks: bool = True, frame_wait: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 max_batch: int | None = None, min_score: float = DEFAULT_MIN_SCORE):
        """``default_mode``: the answer mode of requests that name none (auto reads the
        query, ``queries.read_query``). ``masks``: compute masks (without them there are
        no masks' tight boxes and no 3D positions). ``max_batch``: most queued requests
        answered in one batch (default: what the predictor's decoder takes; 1 = none).
        ``min_score``: objects scored below it are dropped (``NextChatPredictor.ask``)."""
        self.predictor = predictor
        self.max_batch = max_batch or predictor.decoder.max_rows
        self.max_image_age = max_image_age
        # A query may name a frame that is still on its way (a large image travels
        # slower than a small query): wait up to this long, from the query's
        # arrival, for a stamp newer than any buffered one before refusing.
        self.frame_wait = frame_wait
        self.default_mode = default_mode
        self.max_new_tokens = max_new_tokens
        self.min_score = min_score
        self.masks = masks
        self.clock = clock
        self._frames: deque[Frame] = deque(maxlen=frame_buffer)
        self._frames_lock = threading.Lock()
        self._frame_added = threading.Condition(self._frames_lock)
        self._awaiting: dict[int, list[Request]] = {}  # queued requests naming a frame not yet buffered
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=queue_size)
        self._encoded_key: int | None = None
        self.counts = {"frames": 0, "queries": 0, "ok": 0, "refused": 0, "cancelled": 0, "errors": 0}
        self.last_timings: dict[str, float] = {}
        self._worker = threading.Thread(target=self._run, name="nextchat-grounding", daemon=True)
        self._worker.start()

    # --- inputs (never block) ---------------------------------------------------------
    def add_frame(self, frame: Frame) -> None:
        if frame.received is None:
            frame.received = self.clock()
        with self._frame_added:
            self._frames.append(frame)
            for request in self._awaiting.pop(frame.stamp_ns, []) if frame.stamp_ns else []:
                request.frame = frame
            self._frame_added.notify_all()
        self.counts["frames"] += 1

    def submit(self, request: Request) -> bool:
        """Queue a request. When the queue is full the request is answered at once
        with OVERLOADED (and False is returned)."""
        self.counts["queries"] += 1
        if request.received is None:
            request.received = self.clock()
        awaiting = request.stamp_ns and request.frame is None
        if awaiting:
            self._pin_frame(request)
        try:
            self._queue.put_nowait(request)
            return True
        except queue.Full:
            if awaiting:
                self._unpin(request)
            self._finish(Outcome(request, Status.OVERLOADED,
                                 f"the node is busy: {self._queue.maxsize} queries are waiting; ask again later"))
            return False

    def _pin_frame(self, request: Request) -> None:
        """Attach the buffered frame the request names, or await it (add_frame attaches it)."""
        with self._frames_lock:
            request.frame = next((f for f in reversed(self._frames) if f.stamp_ns == request.stamp_ns), None)
            if request.frame is None:
                self._awaiting.setdefault(request.stamp_ns, []).append(request)

    def _unpin(self, request: Request) -> None:
        with self._frames_lock:
            waiting = self._awaiting.get(request.stamp_ns, [])
            if request in waiting:
                waiting.remove(request)
            if not waiting:
                self._awaiting.pop(request.stamp_ns, None)

    def process(self, request: Request) -> Outcome:
        """Answer one request now, in the caller's thread (offline evaluation; not
        to be mixed with ``submit`` on the same service)."""
        if request.received is None:
            request.received = self.clock()
        self.counts["queries"] += 1
        outcome = self._answer(request)
        self._finish(outcome)
        return outcome

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still queued get INTERNAL_ERROR (never silence)."""
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                self._finish(Outcome(pending, Status.INTERNAL_ERROR, "the node is shutting down"))
        self._queue.put(None)
        self._worker.join(timeout)

    # --- worker -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            # What else is waiting now joins it: queries about one frame in one mode
            # are answered as one batch (the engine's pass over the cached prefix).
            batch, closing = [request], False
            while len(batch) < self.max_batch:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    closing = True
                    break
                batch.append(waiting)
            self._answer_batch(batch)
            if closing:
                return

    def _answer(self, request: Request) -> Outcome:
        try:
            return self._handle(request)
        except Exception as exc:  # the node keeps serving whatever happens to one query
            log.exception("query %s failed", request.query_id)
            return _internal_error(request, exc)

    def _answer_batch(self, batch: list[Request]) -> None:
        """Each request's outcome, finished as soon as it is known: refusals first,
        then each group of requests about one frame in one mode (streamed or
        cancellable requests stay alone)."""
        groups: dict[tuple, list[_Prepared]] = {}
        for request in batch:
            try:
                prepared = self._prepare(request)
            except Exception as exc:
                log.exception("query %s failed", request.query_id)
                prepared = _internal_error(request, exc)
            if isinstance(prepared, Outcome):
                self._finish(prepared)
            elif request.progress is None and request.cancelled is None:
                groups.setdefault((prepared.frame.key, prepared.reading.mode), []).append(prepared)
            else:
                groups[(id(request),)] = [prepared]
        for group in groups.values():
            try:
                outcomes = self._ask(group)
            except Exception as exc:
                log.exception("queries %s failed", [p.request.query_id for p in group])
                outcomes = [_internal_error(p.request, exc) for p in group]
            for outcome in outcomes:
                self._finish(outcome)

    def _finish(self, outcome: Outcome) -> None:
        request = outcome.request
        outcome.timings_ms.setdefault("total_ms", (self.clock() - request.received) * 1e3)
        key = {Status.OK: "ok", Status.OVERLOADED: "refused", Status.CANCELLED: "cancelled"}.get(
            outcome.status, "errors")
        self.counts[key] += 1
        if outcome.status == Status.OK:
            self.last_timings = dict(outcome.timings_ms)
        if request.done is not None:
            try:
                request.done(outcome)
            except Exception:  # a failing consumer must not kill the worker
                log.exception("result callback for %s failed", request.query_id)

    def _pick_frame(self, request: Request) -> tuple[Frame | None, Outcome | None]:
        with self._frame_added:
            if request.stamp_ns and request.frame is None:
                # The budget is measured on the service's clock, the waiting in real time.
                end = time.monotonic() + max(0.0, self.frame_wait - (self.clock() - request.received))
                while request.frame is None and not any(f.stamp_ns >= request.stamp_ns for f in self._frames) \
                        and time.monotonic() < end:
                    self._frame_added.wait(end - time.monotonic())
            frames = list(self._frames)
        if request.stamp_ns:
            self._unpin(request)
        if request.frame is not None:
            return request.frame, None
        if not frames:
            return None, Outcome(request, Status.NO_IMAGE, "no camera image has arrived yet")
        if request.stamp_ns:
            match = next((f for f in reversed(frames) if f.stamp_ns == request.stamp_ns), None)
            if match is None:
                return None, Outcome(
                    request, Status.STALE_IMAGE,
                    f"no frame with stamp {_seconds(request.stamp_ns)} s in the buffer (it holds "
                    f"{_seconds(frames[0].stamp_ns)} .. {_seconds(frames[-1].stamp_ns)} s)")
            return match, None
        frame = frames[-1]
        age = self.clock() - frame.received
        if age > self.max_image_age:
            return None, Outcome(request, Status.STALE_IMAGE,
                                 f"the newest camera image is {age:.1f} s old; the limit is "
                                 f"{self.max_image_age:.1f} s (max_image_age)", frame=frame)
        return frame, None

    def _handle(self, request: Request) -> Outcome:
        prepared = self._prepare(request)
        return prepared if isinstance(prepared, Outcome) else self._ask([prepared])[0]

    def _prepare(self, request: Request) -> _Prepared | Outcome:
        """The request's frame and reading, or the outcome that refuses it."""
        timings = {"queue_ms": (self.clock() - request.received) * 1e3, "image_encode_ms": 0.0}
        if request.cancelled is not None and request.cancelled():
            return Outcome(request, Status.CANCELLED, "cancelled by the client before it was answered")
        frame, refusal = self._pick_frame(request)
        if refusal is not None:
            return refusal
        if frame.image is None:
            return Outcome(request, Status.BAD_IMAGE, frame.error or "the image could not be used", frame=frame)
        return _Prepared(request, frame, read_query(request.text, request.mode or self.default_mode), timings)

    def _ask(self, group: list[_Prepared]) -> list[Outcome]:
        """Answer requests about one frame in one mode: one alone (streamed and
        cancellable where it asks to be), several as one batch."""
        frame, mode = group[0].frame, group[0].reading.mode
        if frame.key != self._encoded_key:
            try:
                self._encoded_key = None
                encode = self.predictor.set_image(frame.image)
            except ImageError as exc:
                return [Outcome(p.request, Status.BAD_IMAGE, str(exc), frame=frame) for p in group]
            self._encoded_key = frame.key
            group[0].timings["image_encode_ms"] = encode["set_image_ms"]  # as when asked one after another
        try:
            if len(group) == 1:
                request = group[0].request
                answers = [self.predictor.ask(request.text, regions=request.regions or None, mode=mode,
                                              max_new_tokens=self.max_new_tokens, masks=self.masks,
                                              min_score=self.min_score,
                                              on_progress=request.progress, stop=request.cancelled)]
            else:
                answers = self.predictor.ask_batch([(p.request.text, p.request.regions or None) for p in group],
                                                   mode=mode, max_new_tokens=self.max_new_tokens, masks=self.masks,
                                                   min_score=self.min_score)
        except (QueryError, ImageError) as exc:
            if len(group) > 1:  # one bad query: the others are answered, it gets its own error
                return [outcome for p in group for outcome in self._ask([p])]
            status = Status.BAD_QUERY if isinstance(exc, QueryError) else Status.BAD_IMAGE
            return [Outcome(group[0].request, status, str(exc), frame=frame, mode=mode)]
        return [self._outcome(p, answer) for p, answer in zip(group, answers)]

    def _outcome(self, prepared: _Prepared, answer) -> Outcome:
        request, frame, reading, timings = prepared.request, prepared.frame, prepared.reading, prepared.timings
        timings["llm_ms"] = answer.timings_ms["llm_ms"]
        timings["mask_ms"] = answer.timings_ms["mask_ms"]
        timings["batch"] = answer.timings_ms.get("batch", 1.0)
        objects = [dataclasses.replace(o, position=object_position(o.mask, frame.depth, frame.intrinsics))
                   for o in answer.objects]
        timings["total_ms"] = (self.clock() - request.received) * 1e3
        if answer.cancelled:
            return Outcome(request, Status.CANCELLED, "cancelled by the client while it was being answered",
                           answer.text, objects, frame, reading.mode, timings, reading.instruction)
        return Outcome(request, Status.OK, "", answer.text, objects, frame, reading.mode, timings,
                       reading.instruction)


@dataclass
class _Prepared:
    """A request with its frame and reading, waiting for the model."""

    request: Request
    frame: Frame
    reading: QueryReading
    timings: dict[str, float]


def _seconds(stamp_ns: int) -> str:
    """A stamp as seconds, every nanosecond exact (a float has 16 digits, a stamp 19)."""
    return f"{stamp_ns // 1_000_000_000}.{stamp_ns % 1_000_000_000:09d}"


def _internal_error(request: Request, exc: Exception) -> Outcome:
    return Outcome(request, Status.INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
