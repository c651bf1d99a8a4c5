"""A dropped PersonaJudge's finalizer never waits for the lock its own thread holds.

The garbage collector runs finalizers in whichever thread allocates. One that allocates inside
``with _SHARED_LOCK`` (the ``engine`` property builds an Engine there) could collect a dropped
PersonaJudge, whose finalizer took the same, non-reentrant lock: the thread waited for itself for
ever. A clean-clone CI run stalled on it for 900 s, until pytest-timeout's alarm broke the wait.
"""

import threading
import time

from personajudge import api
from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend


def _wait(cond, bound=10.0):
    deadline = time.monotonic() + bound
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _used():
    pj = PersonaJudge({"backend": {"name": "toy"}}, backend=ToyBackend())
    pj.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1)  # its engine exists, runs
    return pj, pj._shared, pj._engine


def test_the_finalizer_inside_the_lock_returns_and_the_engine_stops_once_the_lock_is_free():
    pj, shared, engine = _used()
    done = threading.Event()

    def collected_inside_the_lock():
        with api._SHARED_LOCK:  # as the engine property holds it while it builds an engine
            pj._finalizer()  # what the collector runs when an allocation there collects a dropped object
            assert shared.users == 1  # not yet: the lock is this thread's
        done.set()

    threading.Thread(target=collected_inside_the_lock, daemon=True).start()
    assert done.wait(10), "the finalizer waited for the lock its own thread held"
    assert _wait(lambda: shared.users == 0 and engine.stats()["closing"]), "the engine was never released"


def test_with_the_lock_free_the_finalizer_releases_at_once():
    pj, shared, engine = _used()
    pj._finalizer()
    assert shared.users == 0 and engine.stats()["closing"]  # synchronously, as before
