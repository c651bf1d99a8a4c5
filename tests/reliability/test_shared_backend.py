"""Several PersonaJudge objects on one backend object share one engine, so the backend is driven by one thread.

Sessions of one backend share model state (llama.cpp's context, a transformers model's buffers), so
two engines driving one backend at once would race. The toy backend here records the thread of every
forward call; its logits are a pure function of each row's context, so a request that shares steps
with others gives exactly the tokens it gives alone.
"""

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend, ToySession
from personajudge.engine import EngineClosedError

CONFIG = {"backend": {"name": "toy"}, "encoder": "plain"}
PREFS = ["concise", "humor"]
KW = dict(max_new_tokens=16, lam=3)
PROMPTS = ["tell me about owls", "why is the sky blue", "how do bees make honey", "describe a sunset"]


class RecordingSession(ToySession):
    def _forward_many(self, calls):
        b = self.backend
        with b.lock:
            b.threads.add(threading.get_ident())
            b.busy += 1
            b.overlaps += b.busy > 1
        try:
            time.sleep(b.delay)
            return super()._forward_many(calls)
        finally:
            with b.lock:
                b.busy -= 1


class RecordingToy(ToyBackend):
    """A toy backend that records which threads call its sessions' forwards, whether two ever ran at
    once, and how often it is closed; ``delay`` seconds per forward widen the window for an overlap."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.lock = threading.Lock()
        self.threads: set[int] = set()
        self.closes = 0
        self.busy = self.overlaps = 0
        self.delay = delay

    def open(self, n_views):
        return RecordingSession(self, n_views)

    def close(self):
        self.closes += 1


def _serial():
    """Every (prompt, seed) run one after another on one object of a backend of its own."""
    pj = PersonaJudge(CONFIG, backend=ToyBackend())
    try:
        return {(p, s): pj.generate(p, preferences=PREFS, seed=s, **KW).tokens for p in PROMPTS for s in range(3)}
    finally:
        pj.close()


def _engine_thread(backend):
    (ident,) = backend.threads
    return next(t for t in threading.enumerate() if t.ident == ident)


def test_two_objects_on_one_backend_share_one_driving_thread_and_give_serial_results():
    expected = _serial()
    b = RecordingToy()
    pjs = [PersonaJudge(CONFIG, backend=b), PersonaJudge(CONFIG, backend=b)]
    with ThreadPoolExecutor(max_workers=4) as pool:  # four caller threads, the two objects alternating
        futures = {
            key: pool.submit(pjs[i % 2].generate, key[0], preferences=PREFS, seed=key[1], **KW)
            for i, key in enumerate(expected)
        }
        got = {key: f.result(timeout=60).tokens for key, f in futures.items()}
    assert got == expected
    assert len(b.threads) == 1 and threading.get_ident() not in b.threads  # one engine thread drove it
    assert pjs[0].engine is pjs[1].engine
    for pj in pjs:
        pj.close()


def test_closing_one_leaves_the_other_working_and_closing_both_stops_the_engine():
    expected = _serial()
    b = RecordingToy()
    first, second = PersonaJudge(CONFIG, backend=b), PersonaJudge(CONFIG, backend=b)
    p, s = PROMPTS[0], 1
    assert first.generate(p, preferences=PREFS, seed=s, **KW).tokens == expected[(p, s)]
    engine_thread = _engine_thread(b)

    first.close()
    assert b.closes == 0 and engine_thread.is_alive()
    with pytest.raises(EngineClosedError):
        first.generate(p, preferences=PREFS, seed=s, **KW)
    first.close()  # a second close does nothing
    p, s = PROMPTS[1], 2
    assert second.generate(p, preferences=PREFS, seed=s, **KW).tokens == expected[(p, s)]
    assert b.threads == {engine_thread.ident}

    second.close()
    engine_thread.join(10)
    assert not engine_thread.is_alive()
    assert b.closes == 1


def test_the_first_object_sets_the_limits_and_a_dropped_object_leaves_by_itself():
    b = RecordingToy()
    first = PersonaJudge(CONFIG, backend=b, max_batch=3, max_queue=7)
    second = PersonaJudge(CONFIG, backend=b, max_batch=5)
    assert second.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW).tokens  # second creates the engine...
    assert (second.engine.max_batch, second.engine.max_queue) == (3, 7)  # ...with the first object's limits
    engine_thread = _engine_thread(b)
    del first
    gc.collect()
    second.close()  # the last live user: the engine stops and the backend is closed
    engine_thread.join(10)
    assert not engine_thread.is_alive() and b.closes == 1


def test_the_last_object_dropped_without_close_finishes_its_work_then_frees_the_backend():
    expected = _serial()
    b = RecordingToy()
    pj = PersonaJudge(CONFIG, backend=b)
    assert pj.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW).tokens == expected[(PROMPTS[0], 0)]
    engine_thread = _engine_thread(b)
    job = pj.submit(PROMPTS[1], preferences=PREFS, seed=2, **KW)  # still queued or running when pj goes
    del pj
    gc.collect()
    assert job.result().tokens == expected[(PROMPTS[1], 2)]  # the caller's job is not lost
    engine_thread.join(10)
    assert not engine_thread.is_alive()  # no idle thread left behind...
    freed = weakref.ref(b)
    del b, job
    gc.collect()
    assert freed() is None  # ...and nothing holds the backend (the model's memory) any more


def test_a_new_engine_on_the_backend_waits_for_the_dropped_objects_engine_to_finish():
    expected = _serial()
    b = RecordingToy(delay=0.005)
    pj = PersonaJudge(CONFIG, backend=b)
    job = pj.submit(PROMPTS[0], preferences=PREFS, seed=0, **KW)
    del pj  # its engine still has the job to finish...
    gc.collect()
    again = PersonaJudge(CONFIG, backend=b)  # ...when a new object starts a new engine on the backend
    assert again.generate(PROMPTS[1], preferences=PREFS, seed=1, **KW).tokens == expected[(PROMPTS[1], 1)]
    assert job.result().tokens == expected[(PROMPTS[0], 0)]
    assert len(b.threads) == 2 and b.overlaps == 0  # two engines, one after the other, never both at once
    again.close()


def test_an_object_dropped_while_another_uses_the_backend_leaves_the_engine_running():
    b = RecordingToy()
    first, second = PersonaJudge(CONFIG, backend=b), PersonaJudge(CONFIG, backend=b)
    assert first.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW).tokens
    engine_thread = _engine_thread(b)
    del first
    gc.collect()
    assert engine_thread.is_alive()
    assert second.generate(PROMPTS[1], preferences=PREFS, seed=1, **KW).tokens
    assert b.threads == {engine_thread.ident}
    second.close()
    engine_thread.join(10)
    assert not engine_thread.is_alive() and b.closes == 1


def test_keep_backend_stops_the_engine_but_leaves_the_model_loaded():
    b = RecordingToy()
    pj = PersonaJudge(CONFIG, backend=b)
    pj.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW)
    engine_thread = _engine_thread(b)
    pj.close(keep_backend=True)
    engine_thread.join(10)
    assert not engine_thread.is_alive() and b.closes == 0
    b.threads.clear()
    again = PersonaJudge(CONFIG, backend=b)  # the backend is still usable: a new engine drives it
    assert again.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW).tokens
    assert len(b.threads) == 1
    again.close()
    assert b.closes == 1


def test_an_engine_closed_directly_stays_closed_for_its_users_and_is_replaced_for_new_ones():
    b = RecordingToy()
    user = PersonaJudge(CONFIG, backend=b)
    user.engine.close()  # as the server does on shutdown
    with pytest.raises(EngineClosedError):
        user.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW)
    newcomer = PersonaJudge(CONFIG, backend=b)
    assert newcomer.generate(PROMPTS[0], preferences=PREFS, seed=0, **KW).tokens
    assert newcomer.engine is not user.engine
    for pj in (user, newcomer):
        pj.close()
    assert b.closes == 1
