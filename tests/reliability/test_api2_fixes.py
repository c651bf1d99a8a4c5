"""The Python API over a long session (audit api2): nothing a caller does may hang the object or leave
a request running that nobody reads.

Each test builds its own toy model (no weights); waits are bounded and fail with a message instead of
hanging the suite.
"""

import asyncio
import threading
import time

import numpy as np
import pytest
from bounded import until

import personajudge as pj
from personajudge.engine import Engine

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
CALL = dict(preferences=["concise", "humor"], max_new_tokens=6, seed=1)
ENDLESS = dict(preferences=["concise", "humor"], max_new_tokens=20000, temperature=0)  # no EOS on the toy


def _in_thread(fn, timeout=20.0):
    """``fn()`` in a thread, joined with a timeout: a hang fails the test instead of the suite."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def model():
    m = pj.PersonaJudge(TOY)
    yield m
    m.close()


# A: a bad loop, and an engine thread that fails


@pytest.mark.parametrize("loop", [5, "loop", object()])
def test_a_loop_that_is_no_event_loop_is_refused_in_the_callers_thread(model, loop):
    expected = model.generate("hello", **CALL).tokens
    with pytest.raises(pj.ConfigError, match="loop must be an asyncio event loop"):
        model.submit("hello", loop=loop, **CALL)
    assert _in_thread(lambda: model.generate("hello", **CALL)).tokens == expected


def test_a_sink_that_raises_loses_only_its_own_job(model):
    """A caller's own sink (``Job(..., sink=...)``) that raises: its job is dropped, the engine goes on."""
    expected = model.generate("hello", **CALL).tokens
    cfg, meth, views = model._plan(dict(CALL))
    req = model._request(model.encode_views("hello", cfg, meth, views), cfg, 1)

    def broken(event):
        raise AttributeError("the caller's sink is broken")

    bad = model.engine.submit(pj.engine.Job(req, meth, sink=broken))
    assert _in_thread(lambda: model.generate("hello", **CALL)).tokens == expected
    until(lambda: bad.cancelled or bad.done, what="the broken job's end")


def test_an_engine_thread_that_fails_gives_every_waiting_caller_a_typed_error_then_starts_over(model, monkeypatch):
    expected = model.generate("hello", **CALL).tokens
    real = Engine._take
    calls = {"n": 0}

    def take_once_broken(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the scheduler")
        return real(self)

    monkeypatch.setattr(Engine, "_take", take_once_broken)
    job = model.submit("hello", **CALL)
    with pytest.raises(pj.EngineFailedError, match="a bug in the scheduler"):
        _in_thread(job.result)
    assert isinstance(job.error, pj.PersonaJudgeError)
    assert _in_thread(lambda: model.generate("hello", **CALL)).tokens == expected  # a fresh engine thread


# B: astream cancelled before its first piece


def test_astream_cancelled_while_its_request_is_queued_cancels_the_request(monkeypatch):
    """Cancelling the consumer while the worker thread encodes and queues (``asyncio.wait_for`` timing
    out) must not leave the request running to its end, holding the only batch place."""
    m = pj.PersonaJudge(TOY, max_batch=1)
    try:
        real = m._enqueue
        queued = threading.Event()

        def slow_enqueue(*args, **kwargs):
            time.sleep(0.3)  # the consumer is cancelled in here
            out = real(*args, **kwargs)
            queued.set()
            return out

        monkeypatch.setattr(m, "_enqueue", slow_enqueue)

        async def consume():
            async for _ in m.astream("hi", **ENDLESS):
                pass

        async def main():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(consume(), timeout=0.05)
            await asyncio.to_thread(queued.wait, 20)

        asyncio.run(main())
        assert queued.is_set()
        until(lambda: m.engine.stats()["cancelled"] == 1, what="the abandoned request's cancellation")
        assert m.engine.stats()["completed"] == 0
        assert _in_thread(lambda: m.generate("hi", **CALL)).finish_reason in ("length", "eos", "stop")
    finally:
        m.close()


# C: a job's result read twice


def test_a_jobs_result_can_be_read_again(model):
    job = model.submit("hello", **CALL)
    first = _in_thread(job.result)
    assert _in_thread(job.result) is first
    events = _in_thread(lambda: list(job.events()))
    assert events == [("done", first)]


def test_a_cancelled_jobs_error_can_be_read_again(model):
    job = model.submit("hello", **ENDLESS)
    job.cancel()
    for _ in range(2):
        with pytest.raises(pj.RequestCancelled):
            _in_thread(job.result)


def test_an_asyncio_jobs_events_can_be_read_again(model):
    async def main():
        job = model.submit("hello", loop=asyncio.get_running_loop(), **CALL)
        first = [ev async for ev in job.aevents()]
        again = [ev async for ev in job.aevents()]
        return first, again

    first, again = asyncio.run(asyncio.wait_for(main(), 20))
    assert first[-1][0] == "done" and again == [first[-1]]


# D: numpy integers as seeds


def test_a_numpy_seed_is_the_seed_not_a_rounded_one(model):
    big = 3717377837946358015  # above 2**53: a float would round it
    want = model.generate("hi", **{**CALL, "seed": big})
    for seed in (np.uint64(big), np.int64(big)):
        got = model.generate("hi", **{**CALL, "seed": seed})
        assert got.stats.seed == big and got.settings["decoding"]["seed"] == big and got.tokens == want.tokens
    rows = model.generate_batch(["hi"], seeds=[np.int64(2**53 + 1)], **{k: v for k, v in CALL.items() if k != "seed"})
    assert rows[0].stats.seed == 2**53 + 1
    assert pj.DecodingConfig(seed=np.uint64(2**63 - 1)).seed == 2**63 - 1  # no "input string" refusal
    with pytest.raises(pj.ConfigError, match="seed"):
        pj.DecodingConfig(seed=np.int64(-1))


# G: on_text where the call yields the text itself


@pytest.mark.parametrize(
    "call",
    [lambda m, **kw: next(m.stream("hi", **kw)), lambda m, **kw: m.submit("hi", **kw)],
    ids=["stream", "submit"],
)
def test_on_text_outside_generate_says_where_the_text_comes_from(model, call):
    with pytest.raises(pj.ConfigError, match="on_text is generate's keyword: stream and astream yield the text"):
        call(model, on_text=print, **CALL)


def test_a_keyword_given_as_none_keeps_the_configs_value():
    """Documented in ``generate``: a caller passes optional fields through (the server does)."""
    m = pj.PersonaJudge({**TOY, "decoding": {"seed": 5, "max_new_tokens": 3}})
    try:
        res = m.generate("hi", preferences=["concise", "humor"], seed=None, max_new_tokens=None)
        assert res.stats.seed == 5 and len(res.tokens) <= 3
    finally:
        m.close()


# E: a run without preferences (or of base) repeats from its settings


@pytest.mark.filterwarnings("ignore:method 'persona-judge' with a single view")
@pytest.mark.parametrize("method", ["persona-judge", "base"])
def test_a_run_without_views_repeats_from_its_settings(model, method):
    res = model.generate("hi", method=method, max_new_tokens=5, seed=2)
    views = res.settings["views"]
    assert views == ([[]] if method == "persona-judge" else [])
    cfg = pj.RunConfig(**TOY, method=method, views=views, decoding={"seed": 2, "max_new_tokens": 5})
    assert cfg.views is None  # the default: no views given
    again = pj.PersonaJudge(cfg)
    try:
        assert again.generate("hi").tokens == res.tokens
    finally:
        again.close()
    assert model.generate("hi", method=method, views=views, max_new_tokens=5, seed=2).tokens == res.tokens


def test_an_empty_view_among_others_is_still_refused():
    with pytest.raises(pj.ConfigError, match="every view needs at least one preference"):
        pj.RunConfig(views=[["concise"], []])
