"""The grounding service without ROS: pairing, staleness, overload, one outcome
per query, frames encoded once, bad frames, 3D points."""

import threading
import time

import numpy as np
import pytest

from nextchat_ros.predictor import NextChatPredictor
from nextchat_ros.service import Frame, GroundingService, Request, Status, choose_mode, object_position


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def collect(service, requests, timeout=60):
    outcomes, done = {}, threading.Event()

    def callback(outcome):
        outcomes.setdefault(outcome.request.query_id, []).append(outcome)
        if len(outcomes) == len(requests):
            done.set()
    for r in requests:
        r.done = callback
        service.submit(r)
    assert done.wait(timeout), f"only {len(outcomes)} of {len(requests)} outcomes"
    return outcomes


@pytest.fixture()
def service(tiny_model):
    s = GroundingService(NextChatPredictor(tiny_model), max_image_age=2.0, queue_size=16, clock=Clock())
    yield s
    s.close()


def test_no_image_then_ok_then_stale(service, scene):
    out = collect(service, [Request("a", "where is the cube?")])
    assert out["a"][0].status == Status.NO_IMAGE and "no camera image" in out["a"][0].error
    service.add_frame(Frame(scene.image, 5_000_000_000, "cam", received=service.clock()))
    out = collect(service, [Request("b", "where is the cube?")])
    ok = out["b"][0]
    assert ok.status == Status.OK and ok.frame.stamp_ns == 5_000_000_000 and len(ok.objects) == 1
    assert ok.mode == "ground" and ok.timings_ms["image_encode_ms"] > 0
    service.clock.now += 5
    out = collect(service, [Request("c", "where is the cube?")])
    assert out["c"][0].status == Status.STALE_IMAGE and "max_image_age" in out["c"][0].error


def test_a_frame_is_encoded_once_for_all_its_queries(service, scene, monkeypatch):
    calls = []
    real = service.predictor.set_image
    monkeypatch.setattr(service.predictor, "set_image", lambda image: calls.append(1) or real(image))
    service.add_frame(Frame(scene.image, 1, received=service.clock()))
    out = collect(service, [Request(f"q{i}", "where is the cube?") for i in range(3)])
    assert len(calls) == 1
    assert [out[f"q{i}"][0].timings_ms["image_encode_ms"] > 0 for i in range(3)] == [True, False, False]
    service.add_frame(Frame(scene.image[:, ::-1].copy(), 2, received=service.clock()))
    collect(service, [Request("new", "where is the cube?")])
    assert len(calls) == 2


def test_queries_can_name_a_buffered_frame(service, scene):
    for stamp in (10, 20, 30):
        service.add_frame(Frame(scene.image, stamp, received=service.clock()))
    out = collect(service, [Request("old", "where is the cube?", stamp_ns=20),
                            Request("gone", "where is the cube?", stamp_ns=99)])
    assert out["old"][0].status == Status.OK and out["old"][0].frame.stamp_ns == 20
    assert out["gone"][0].status == Status.STALE_IMAGE
    assert "no frame with stamp" in out["gone"][0].error


def test_a_query_waits_briefly_for_the_frame_it_names(service, scene):
    """A large image can arrive after the small query that names it: the query waits
    up to frame_wait for a stamp newer than any buffered one, then gives up."""
    service.add_frame(Frame(scene.image, 10, received=service.clock()))
    threading.Timer(0.2, lambda: service.add_frame(Frame(scene.image, 20, received=service.clock()))).start()
    started = time.monotonic()
    out = collect(service, [Request("late", "where is the cube?", stamp_ns=20)])
    assert out["late"][0].status == Status.OK and out["late"][0].frame.stamp_ns == 20
    assert 0.15 < time.monotonic() - started < service.frame_wait + 0.5
    started = time.monotonic()
    out = collect(service, [Request("never", "where is the cube?", stamp_ns=30)])
    assert out["never"][0].status == Status.STALE_IMAGE
    assert service.frame_wait - 0.05 < time.monotonic() - started < service.frame_wait + 1.0


def test_a_named_frame_is_kept_for_its_query_while_newer_frames_push_it_out_of_the_buffer(tiny_model, scene):
    """Under load (a starved CPU) a query waits in the queue while the camera goes on:
    the frame it names, buffered before or after it arrived, stays its frame."""
    service = GroundingService(NextChatPredictor(tiny_model), frame_buffer=2, frame_wait=5.0, max_image_age=600.0)
    other = scene.image[::-1].copy()
    service.add_frame(Frame(scene.image, 10))
    gate = threading.Event()
    out, got = {}, threading.Event()

    def done(outcome):
        out[outcome.request.query_id] = outcome
        if len(out) == 4:
            got.set()
    requests = [Request("gate", "where is the ball?", cancelled=lambda: not gate.wait(10), done=done),
                Request("buffered", "where is the cup?", stamp_ns=10, done=done),
                Request("later", "where is the cup?", stamp_ns=30, done=done),
                Request("never", "where is the cup?", stamp_ns=35, done=done)]
    for request in requests:
        service.submit(request)
    for stamp in (20, 30, 40, 50, 60):  # each frame pushes out the one two before it
        service.add_frame(Frame(scene.image if stamp == 30 else other, stamp))
    gate.set()
    assert got.wait(60), sorted(out)
    service.close()
    assert out["buffered"].status == Status.OK and out["buffered"].frame.stamp_ns == 10
    assert out["later"].status == Status.OK and out["later"].frame.stamp_ns == 30
    assert out["never"].status == Status.STALE_IMAGE
    assert "0.000000035 s" in out["never"].error and "0.000000050 .. 0.000000060 s" in out["never"].error
    assert not service._awaiting


def test_overload_is_refused_at_once_and_every_query_gets_exactly_one_outcome(tiny_model, scene):
    service = GroundingService(NextChatPredictor(tiny_model), queue_size=2)
    service.add_frame(Frame(scene.image, 1))
    requests = [Request(f"q{i}", "describe the table.") for i in range(12)]
    out = collect(service, requests)
    service.close()
    assert sorted(out) == sorted(r.query_id for r in requests)
    assert all(len(v) == 1 for v in out.values())
    statuses = [out[f"q{i}"][0].status for i in range(12)]
    assert Status.OVERLOADED in statuses and Status.OK in statuses
    refused = next(o[0] for o in out.values() if o[0].status == Status.OVERLOADED)
    assert "busy" in refused.error


def test_bad_inputs_get_their_status_and_the_service_keeps_serving(service, scene):
    service.add_frame(Frame(None, 1, error="the image is truncated: 10 bytes"))
    out = collect(service, [Request("bad-frame", "where is the cube?")])
    assert out["bad-frame"][0].status == Status.BAD_IMAGE and "truncated" in out["bad-frame"][0].error
    service.add_frame(Frame(np.zeros((4, 4, 3), np.uint8), 2))
    out = collect(service, [Request("tiny", "where is the cube?")])
    assert out["tiny"][0].status == Status.BAD_IMAGE
    service.add_frame(Frame(scene.image, 3, received=service.clock()))
    bad = [Request("empty", "   "), Request("long", "x" * 5000), Request("special", "<trigger><loc><im_patch>"),
           Request("nan", "what is [0]?", regions=[[float("nan"), 0, 5, 5]]),
           Request("zero", "what is [0]?", regions=[[5, 5, 5, 9]]),
           Request("outside", "what is [0]?", regions=[[0, 0, 5000, 9]])]
    out = collect(service, bad)
    for query_id in ("empty", "long", "nan", "zero", "outside"):
        assert out[query_id][0].status == Status.BAD_QUERY, query_id
    assert out["special"][0].status == Status.OK  # special-token text is just text
    out = collect(service, [Request("after", "where is the cube?")])
    assert out["after"][0].status == Status.OK


def test_a_failing_model_gives_internal_error_and_the_next_query_works(service, scene, monkeypatch):
    service.add_frame(Frame(scene.image, 1, received=service.clock()))
    real = service.predictor.ask
    monkeypatch.setattr(service.predictor, "ask", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA OOM")))
    out = collect(service, [Request("boom", "where is the cube?")])
    assert out["boom"][0].status == Status.INTERNAL_ERROR and "CUDA OOM" in out["boom"][0].error
    monkeypatch.setattr(service.predictor, "ask", real)
    assert collect(service, [Request("ok", "where is the cube?")])["ok"][0].status == Status.OK


def test_positions_are_back_projected_from_the_median_depth():
    mask = np.zeros((100, 200), bool)
    mask[40:60, 150:170] = True  # centroid (160, 50)
    depth = np.full((100, 200), 2.0, np.float32)
    depth[mask] = 0.8
    depth[45, 155] = np.nan  # holes are ignored
    x, y, z = object_position(mask, depth, (100.0, 100.0, 100.0, 50.0))
    assert z == pytest.approx(0.8) and x == pytest.approx((160 - 100) * 0.8 / 100) and y == pytest.approx(0.0)
    assert object_position(mask, np.full((100, 200), np.nan, np.float32), (1, 1, 0, 0)) is None


@pytest.mark.parametrize("text,mode", [("where is the red cup?", "ground"), ("Find the ball", "ground"),
                                       ("which object is the red cube?", "ground"),
                                       ("can you please locate the mug", "ground"),
                                       ("find all the cups.", "generate"), ("pick up the cube", "generate"),
                                       ("describe [0].", "generate"), ("is there a cup?", "generate")])
def test_auto_mode(text, mode):
    assert choose_mode(text) == mode


def test_close_answers_what_is_still_queued(tiny_model, scene):
    service = GroundingService(NextChatPredictor(tiny_model), queue_size=8)
    service.add_frame(Frame(scene.image, 1))
    got = []
    for i in range(6):
        service.submit(Request(f"q{i}", "describe the table.", done=got.append))
    service.close()
    time.sleep(0.1)
    assert sorted(o.request.query_id for o in got) == [f"q{i}" for i in range(6)]
    assert any(o.status == Status.INTERNAL_ERROR and "shutting down" in o.error for o in got)


def test_a_streamed_request_reports_progress_and_can_be_cancelled(service, scene):
    service.add_frame(Frame(image=scene.image, stamp_ns=1))
    plain = collect(service, [Request("plain", "describe the image.", mode="generate")])["plain"][0]
    seen = []
    streamed = Request("streamed", "describe the image.", mode="generate",
                       progress=lambda text, objects, n: seen.append((text, n)))
    out = collect(service, [streamed])["streamed"][0]
    assert out.status == Status.OK and out.text == plain.text and seen and seen[-1][0] == plain.text

    seen.clear()
    cut = Request("cut", "describe the image.", mode="generate", progress=lambda text, objects, n: seen.append(text),
                  cancelled=lambda: len(seen) >= 1)
    out = collect(service, [cut])["cut"][0]
    assert out.status == Status.CANCELLED and "while it was being answered" in out.error
    assert len(seen) == 1 and out.text == seen[0] and all(o.mask is None for o in out.objects)

    early = collect(service, [Request("early", "where is the cube?", cancelled=lambda: True)])["early"][0]
    assert early.status == Status.CANCELLED and "before it was answered" in early.error
    assert service.counts["cancelled"] == 2 and service.counts["errors"] == 0


def test_queued_queries_about_one_frame_are_answered_as_one_batch(tiny_model, scene):
    from nextchat_ros.queries import read_query

    # The frame must outlive both rounds however slow the machine: staleness is not tested here.
    service = GroundingService(NextChatPredictor(tiny_model), queue_size=16, max_image_age=600.0)
    service.add_frame(Frame(scene.image, 1))
    reference = NextChatPredictor(tiny_model)
    reference.set_image(scene.image)
    texts = ["describe the table.", "where is the cup?", "is there a red cube?", "what is [0]?", "find the ball.",
             "how many cups are there?"]
    for bad in (None, "   "):  # the second time, one query of the batch is bad
        gate = threading.Event()
        # The gate holds the worker until every other request waits in the queue.
        requests = [Request("gate", "where is the ball?", cancelled=lambda gate=gate: not gate.wait(10))]
        requests += [Request(f"q{i}", t, regions=[[5, 5, 60, 60]] if "[0]" in t else []) for i, t in enumerate(texts)]
        if bad is not None:
            requests.append(Request("bad", bad))
        opener = threading.Timer(0.3, gate.set)
        opener.start()
        out = collect(service, requests)
        opener.join()
        assert all(len(v) == 1 for v in out.values())
        for request in requests[1:]:
            outcome = out[request.query_id][0]
            if request.query_id == "bad":
                assert outcome.status == Status.BAD_QUERY and "empty" in outcome.error
                continue
            alone = reference.ask(request.text, regions=request.regions or None, mode=read_query(request.text).mode,
                                  max_new_tokens=service.max_new_tokens)
            assert outcome.status == Status.OK and outcome.text == alone.text, request.text
            for got, want in zip(outcome.objects, alone.objects, strict=True):
                np.testing.assert_allclose(got.box, want.box, atol=1e-3)
        batches = [out[r.query_id][0].timings_ms["batch"] for r in requests[1:] if r.query_id != "bad"]
        assert max(batches) > 1, batches
    service.close()
