"""The engine: one owner of the backend, continuous batching, thread-safe API (toy backend, no server).

The reference output of a request is the core's loop driven alone on a session
of its own (``drive``), the path every other test of the loops checks; the toy
backend's logits are a pure function of each row's context, so a request that
shares steps with others must give exactly that output.
"""

import asyncio
import dataclasses
import threading

import pytest
from gated_toy import GatedToy

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.config import BackendConfig
from personajudge.core.decoding import StepDriver, drive
from personajudge.core.errors import ConfigError, ContextLengthError, TooManyViewsError
from personajudge.engine import Engine, Job, QueueFullError, RequestCancelled, is_batchable

PROMPTS = [
    "tell me about owls",
    "why is the sky blue",
    "how do bees make honey",
    "what is a prime number",
    "describe a sunset",
    "how do trains work",
    "what do cats eat",
    "why do leaves fall",
]
PREFS = ["concise", "humor"]
KW = dict(max_new_tokens=24, lam=3)


def _pj(**kw):
    return PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=ToyBackend(), **kw)


def _alone(pj, prompt, seed, method=None, **kw):
    """The request run by the core alone, on its own session (no engine)."""
    cfg, meth, views = pj._prepare(PREFS, None, method, {**KW, "seed": seed, **kw})
    contexts = pj.encode_views(prompt, cfg, meth, views)
    req = pj._request(contexts, cfg, seed)
    with pj.backend.open(len(contexts)) as s:
        meth.decode(s, req)
    return req.emitter.tokens, req.emitter.text


def test_step_driver_lets_requests_join_and_leave_between_steps():
    pj = _pj()
    cfg, meth, views = pj._prepare(PREFS, None, None, {**KW, "seed": 0, "max_new_tokens": 30})
    reqs = [pj._request(pj.encode_views(p, cfg, meth, views), cfg, seed) for seed, p in enumerate(PROMPTS[:4])]
    session = pj.backend.open(4)  # room for two requests of two views: the others must reuse freed slots
    driver = StepDriver(session)
    waiting = list(enumerate(reqs))
    free = [0, 1, 2, 3]
    slots = {}
    while waiting or len(driver):
        while waiting and len(free) >= 2:  # join at the next step
            key, r = waiting.pop(0)
            slots[key] = [free.pop(0), free.pop(0)]
            assert driver.add(key, meth.loop(r), slots[key])
        finished, failed = driver.step()
        assert not failed
        for key in finished:  # leave: slots emptied and reusable
            assert all(session.length(s) == 0 for s in slots[key])
            free += slots.pop(key)
    for seed, (p, r) in enumerate(zip(PROMPTS, reqs)):
        assert r.emitter.tokens == _alone(pj, p, seed, max_new_tokens=30)[0]


def test_four_threads_on_one_model_get_their_single_thread_outputs():
    pj = _pj(max_batch=3)  # fewer places than threads: some requests wait and join later
    expected = {(t, i): _alone(pj, PROMPTS[(t + i) % 8], 100 * t + i)[1] for t in range(4) for i in range(3)}
    got, errors = {}, []

    def worker(t):
        try:
            for i in range(3):
                got[(t, i)] = pj.generate(PROMPTS[(t + i) % 8], preferences=PREFS, seed=100 * t + i, **KW).text
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert got == expected
    assert pj.engine.stats()["slots_in_use"] == 0


def test_generate_batch_beyond_max_batch_equals_each_request_alone():
    pj = _pj(max_batch=2)
    res = pj.generate_batch(PROMPTS[:5], preferences=PREFS, seeds=[7, 8, 9, 10, 11], **KW)
    assert [r.tokens for r in res] == [_alone(pj, p, s)[0] for p, s in zip(PROMPTS[:5], [7, 8, 9, 10, 11])]


def test_different_methods_and_settings_share_steps():
    pj = _pj()
    calls = [
        dict(method="persona-judge", seed=1),
        dict(method="prompt", seed=2),
        dict(method="mod", seed=3),
        dict(method="persona-judge", seed=4, temperature=0.0, lam=2),
        dict(method="reference", seed=5),
    ]
    jobs = [pj.submit(PROMPTS[i], preferences=PREFS, **{**KW, **c}) for i, c in enumerate(calls)]
    for i, (c, job) in enumerate(zip(calls, jobs)):
        kw = {k: v for k, v in c.items() if k not in ("method", "seed")}
        assert job.result().tokens == _alone(pj, PROMPTS[i], c["seed"], method=c["method"], **kw)[0], c


def test_a_job_that_does_not_stream_sends_no_text_and_decodes_only_for_the_guard(monkeypatch):
    pj = _pj()
    tok = pj.backend.tokenizer
    calls = [0]
    decode = tok.decode

    def counting(ids):
        calls[0] += 1
        return decode(ids)

    monkeypatch.setattr(tok, "decode", counting)
    cfg, meth, views = pj._prepare(PREFS, None, None, {**KW, "max_new_tokens": 96, "seed": 5})
    contexts = pj.encode_views(PROMPTS[0], cfg, meth, views)
    results, events, decodes, firsts = [], [], [], []
    for stream in (True, False):
        req = pj._request(contexts, cfg, 5)
        req.emitter.stop = []  # no stop strings: only the repetition guard (on by default) reads the text
        calls[0] = 0
        job = pj.engine.submit(Job(req, meth, stream=stream), wait=True)
        events.append([ev[0] for ev in job.events()])
        results.append(job.result_value)
        decodes.append(calls[0])
        firsts.append(job.t_first)
    (streamed, silent), n = results, len(results[0].tokens)
    assert n > 3 * 8 and (silent.tokens, silent.text) == (streamed.tokens, streamed.text)
    assert "text" in events[0] and "text" not in events[1]
    assert decodes[0] >= n and decodes[1] <= 2 * (n // 8 + 2)
    assert all(t is not None for t in firsts)  # the time to first token is known without text events


def test_stream_pieces_concatenate_to_the_result_and_astream_matches():
    pj = _pj()
    gen = pj.stream(PROMPTS[0], preferences=PREFS, seed=3, **KW)
    pieces = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert "".join(pieces) == result.text == _alone(pj, PROMPTS[0], 3)[1]
    assert result.settings is not None and result.settings["decoding"]["seed"] == 3

    async def collect():
        return [p async for p in pj.astream(PROMPTS[0], preferences=PREFS, seed=3, **KW)]

    assert asyncio.run(collect()) == pieces


def test_a_stream_left_early_is_cancelled_and_frees_its_slots():
    pj = _pj()
    gen = pj.stream(PROMPTS[1], preferences=PREFS, seed=1, **{**KW, "max_new_tokens": 2000})
    next(gen)
    gen.close()  # the caller walks away
    other = pj.generate(PROMPTS[2], preferences=PREFS, seed=2, **KW)  # runs after the cancellation took effect
    assert other.text == _alone(pj, PROMPTS[2], 2)[1]
    st = pj.engine.stats()
    assert st["running"] == 0 and st["slots_in_use"] == 0 and st["queued"] == 0


def test_a_failing_request_fails_alone_with_its_typed_error():
    pj = PersonaJudge(
        {"backend": {"name": "toy", "n_ctx": 128}, "encoder": "plain"},
        backend=ToyBackend(BackendConfig(name="toy", n_ctx=128)),
    )
    ok = pj.submit("hi", preferences=PREFS, seed=1, max_new_tokens=10)
    with pytest.raises(ContextLengthError, match="context"):  # the API refuses it in the caller's thread
        pj.submit("x" * 300, preferences=PREFS, seed=2, max_new_tokens=10)
    # a job that fails inside the engine (here: past the API's check) fails alone too
    cfg, meth, views = pj._prepare(PREFS, None, None, {**KW, "seed": 2})
    req = pj._request(pj.encode_views("hi", cfg, meth, views), cfg, 2)
    bad = pj.engine.submit(Job(dataclasses.replace(req, contexts=[[5] * 300, [5] * 300]), meth))
    with pytest.raises(ContextLengthError, match="context"):
        bad.result()
    assert len(ok.result().tokens) > 0


class SmallToy(ToyBackend):
    """A toy that holds at most 4 views per session, as llama.cpp holds at most 256 sequences."""

    def open(self, n_views):
        if n_views > 4:
            raise TooManyViewsError(f"{n_views} views need more KV sequences than this backend supports (4)")
        return super().open(n_views)


def test_a_request_with_more_views_than_the_backend_holds_fails_alone():
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=SmallToy())
    want = pj.generate("hi", preferences=PREFS, seed=1, max_new_tokens=10).tokens
    with pytest.raises(ConfigError, match="more KV sequences"):
        pj.generate("hi", views=[["concise"]] * 6, seed=1, max_new_tokens=3)
    for _ in range(2):  # the refused size is not what later sessions ask for
        assert pj.generate("hi", preferences=PREFS, seed=1, max_new_tokens=10).tokens == want
    assert pj.engine.stats()["slots"] <= 4


def test_a_full_queue_raises_queue_full_with_a_retry_hint_or_waits():
    be = GatedToy()
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be, max_batch=1, max_queue=1)
    running = pj.submit("a", preferences=PREFS, seed=1, max_new_tokens=5, wait=False)
    assert be.entered.wait(10)  # the first request is in its first step
    queued = pj.submit("b", preferences=PREFS, seed=2, max_new_tokens=5, wait=False)
    with pytest.raises(QueueFullError) as info:
        pj.submit("c", preferences=PREFS, seed=3, max_new_tokens=5, wait=False)
    assert info.value.retry_after >= 1
    be.gate.set()
    assert running.result().tokens and queued.result().tokens


def test_a_request_running_alone_holds_the_batch_places_of_the_queue_limit():
    """A method that cannot share steps (``reference``) runs alone: nothing joins it, so with
    ``max_queue=0`` the next request is refused, as it is beside a full batch (it used to be queued,
    one beyond the limit, since the count looked only at the batch)."""
    be = GatedToy()
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be, max_batch=1, max_queue=0)
    alone = pj.submit("a", preferences=PREFS, method="reference", seed=1, max_new_tokens=5, wait=False)
    assert be.entered.wait(10)  # running alone, in its first forward
    assert pj.engine.stats()["running"] == 1
    with pytest.raises(QueueFullError):
        pj.submit("b", preferences=PREFS, seed=2, max_new_tokens=5, wait=False)
    assert pj.engine.stats()["queued"] == 0
    be.gate.set()
    assert len(alone.result().tokens) == 5
    assert pj.submit("b", preferences=PREFS, seed=2, max_new_tokens=5, wait=False).result().tokens  # room again
    pj.close()


@pytest.mark.parametrize("how", ["batch", "threads"])
def test_blocked_submitters_wake_when_a_place_frees_with_no_queue(how):
    """``max_queue=0``: a submitter waits for a place in the batch, and a request leaving it wakes the waiter.

    Without the wake-up the engine went idle and the waiter slept for ever (a hang, bounded here)."""
    pj = _pj(max_batch=1, max_queue=0)
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = pj.generate(PROMPTS[i], preferences=PREFS, seed=i, **KW).tokens

    if how == "batch":
        callers = [
            threading.Thread(
                target=lambda: got.update(
                    enumerate(r.tokens for r in pj.generate_batch(PROMPTS[:3], preferences=PREFS, seed=0, **KW))
                )
            )
        ]
    else:
        callers = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(30)
    assert not any(t.is_alive() for t in callers), "a submitter never woke up"
    assert got == {i: _alone(pj, PROMPTS[i], i)[0] for i in range(3)}
    pj.close()


def test_cancelling_a_queued_request_reports_cancelled_and_counts_it():
    """A request cancelled while queued ends through the same path as the others: counted in the
    engine's ``cancelled`` (the server's /health and cancelled-requests metric) and passed to
    ``on_finish`` with its label. Before, it was dropped with an error event and counted nowhere."""
    be = GatedToy()
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be, max_batch=1)
    ended: list[tuple[str, type | None]] = []
    pj.engine.on_finish = lambda job, err: ended.append((job.label, type(err) if err else None))
    first = pj.submit("a", preferences=PREFS, seed=1, max_new_tokens=5)
    assert be.entered.wait(10)
    second = pj.submit("b", preferences=PREFS, seed=2, max_new_tokens=5, label="/v1/completions")
    second.cancel()
    be.gate.set()
    with pytest.raises(RequestCancelled, match="before it started"):
        second.result()
    assert first.result().tokens
    stats = pj.engine.stats()
    assert (stats["completed"], stats["cancelled"]) == (1, 1)
    assert sorted(ended, key=str) == sorted([("python", None), ("/v1/completions", RequestCancelled)], key=str)
    pj.close()


@pytest.mark.parametrize("method", [None, "reference"])
def test_a_request_cancelled_while_queued_frees_its_place_before_the_running_one_ends(method):
    """The running request (batched, or ``reference``, which runs alone and holds the engine thread
    for its whole decode) is held inside a forward; the queued one is cancelled meanwhile. It ends at
    once, and its place in the queue goes to the next caller, who got a 429 before. Before, the engine
    thread dropped it only at its next round: after the whole ``reference`` run."""
    be = GatedToy()
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be, max_batch=1, max_queue=1)
    running = pj.submit("a", preferences=PREFS, seed=1, max_new_tokens=5, lam=3, method=method, wait=False)
    assert be.entered.wait(10)
    queued = pj.submit("b", preferences=PREFS, seed=2, max_new_tokens=5, lam=3, wait=False)
    with pytest.raises(QueueFullError):
        pj.submit("c", preferences=PREFS, seed=3, max_new_tokens=5, lam=3, wait=False)
    queued.cancel()
    assert queued.done and not running.done and not be.gate.is_set()
    with pytest.raises(RequestCancelled, match="before it started"):
        queued.result()
    assert pj.engine.stats()["queued"] == 0 and pj.engine.stats()["cancelled"] == 1
    third = pj.submit("c", preferences=PREFS, seed=3, max_new_tokens=5, lam=3, wait=False)  # the place freed
    be.gate.set()
    assert running.result().tokens == _alone(pj, "a", 1, method=method, max_new_tokens=5)[0]
    assert third.result().tokens == _alone(pj, "c", 3, max_new_tokens=5)[0]
    assert (pj.engine.stats()["completed"], pj.engine.stats()["cancelled"]) == (2, 1)
    pj.close()


def test_close_cancels_in_flight_requests_and_refuses_new_ones():
    be = GatedToy()
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be)
    job = pj.submit("a", preferences=PREFS, seed=1, max_new_tokens=50)
    assert be.entered.wait(10)
    closer = threading.Thread(target=pj.engine.close)
    closer.start()
    be.gate.set()
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(RequestCancelled):
        job.result()
    from personajudge.engine import EngineClosedError

    with pytest.raises(EngineClosedError):
        pj.submit("b", preferences=PREFS, seed=1, max_new_tokens=5)


def test_which_methods_share_steps():
    from personajudge.core.methods import Base, Pad, Reference
    from personajudge.core.methods import PersonaJudge as PJMethod

    assert is_batchable(PJMethod()) and is_batchable(Base()) and is_batchable(Pad())
    assert not is_batchable(Reference())

    class WithRewardModel(Pad):
        def reward_session(self):
            return None

    class OwnDecode(Base):
        def decode(self, session, req):
            drive(session, self.loop(req))

    assert not is_batchable(WithRewardModel()) and not is_batchable(OwnDecode())


def test_engine_without_a_model_object(toy):
    """The engine is usable on its own: a Job from a DecodeRequest, a result back."""
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=toy)
    cfg, meth, views = pj._prepare(PREFS, None, None, {**KW, "seed": 5, "max_new_tokens": 12})
    req = pj._request(pj.encode_views("hello", cfg, meth, views), cfg, 5)
    engine = Engine(toy, max_batch=2)
    try:
        res = engine.submit(Job(req, meth)).result()
    finally:
        engine.close()
    assert res.tokens == _alone(pj, "hello", 5, max_new_tokens=12)[0]
