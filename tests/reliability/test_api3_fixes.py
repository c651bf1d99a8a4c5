"""The Python API embedded in an application (audit api3): a dropped object is freed even after a
failed call (A), a plugin loop that misbehaves when closed fails only its own request (B), exit is
quiet with daemon workers and an exit handler can still use its model (C, F), a plugin session whose
close raises loses no result (D), and the job handle's misuse raises typed errors (E).

Toy backends only (no weights). Every wait is bounded; subprocesses run with a timeout.
"""

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import numpy as np
import pytest
from bounded import until
from nan_backend import BAD, NanBackend

import personajudge as pj
from personajudge.backends.toy import ToyBackend, ToySession
from personajudge.core.decoding import Forward, StepDriver, Truncate, plain_loop
from personajudge.core.methods import Base
from personajudge.engine import RequestCancelled
from personajudge.plugins import PluginWarning, hookimpl, register_plugin, unregister_plugin

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
TWO = dict(preferences=["concise", "humor"])
ENDLESS = dict(preferences=["concise", "humor"], max_new_tokens=10**6, temperature=0)  # no EOS on the toy


# ----------------------------------------------------------------------------- A: freed after a failed call


def _nan(m):
    m.generate(BAD, **TWO, max_new_tokens=3)


def _nan_row(m):
    m.generate_batch(["hi", BAD], **TWO, max_new_tokens=3)


def _cancelled(m):
    job = m.submit("hi", **ENDLESS)
    until(lambda: job.t_start is not None, what="the job's start")
    job.cancel()
    job.result()


def _closed_backend(m):
    m.backend.close()  # the next session cannot open: SessionError, delivered by the engine
    m.generate("hi", **TWO, max_new_tokens=3)


@pytest.mark.parametrize(
    "last_call, error",
    [
        (_nan, pj.NumericalError),
        (_nan_row, pj.NumericalError),
        (_cancelled, RequestCancelled),
        (_closed_backend, pj.SessionError),
    ],
    ids=["nan", "nan-row-of-a-batch", "cancelled", "session-error"],
)
def test_an_object_dropped_after_a_failed_call_is_freed_and_its_thread_ends(last_call, error):
    """Before: the idle engine thread's loop locals held the last job, whose error's traceback (re-raised in
    the caller) held ``PersonaJudge.generate``'s frame: the object, its engine thread and the backend stayed
    for the life of the process. Fails on the old code at the join (thread still alive)."""
    m = pj.PersonaJudge(TOY, backend=NanBackend())
    m.generate("hi", **TWO, max_new_tokens=3)
    thread = m.engine._thread
    obj, backend = weakref.ref(m), weakref.ref(m.backend)
    with pytest.raises(error):
        last_call(m)
    del m
    gc.collect()
    thread.join(10)
    gc.collect()
    assert not thread.is_alive(), "the engine thread of a dropped object is still running"
    assert obj() is None and backend() is None


def test_the_control_a_successful_last_call_frees_the_object():
    m = pj.PersonaJudge(TOY, backend=NanBackend())
    m.generate("hi", **TWO, max_new_tokens=3)
    thread, backend = m.engine._thread, weakref.ref(m.backend)
    del m
    gc.collect()
    thread.join(10)
    gc.collect()
    assert not thread.is_alive() and backend() is None


# ----------------------------------------------------------------------------- B: a loop that fails when closed

STARTED = threading.Event()


class SlowToy(ToyBackend):
    """A toy whose every logits row takes 2 ms: a long request is still running seconds later (the plain
    toy reaches its context's end, 4000 tokens, in well under a second)."""

    def logits_after(self, context):
        time.sleep(0.002)
        return super().logits_after(context)


class _Tidy(Base):
    """A plugin method whose loop cleans up on the way out -- by yielding one more op (``Truncate``),
    or, with ``raises``, by raising."""

    uses_preferences = False
    raises = False

    def loop(self, req):
        inner = plain_loop(req)
        value = None
        try:
            while True:
                try:
                    op = inner.send(value)
                except StopIteration:
                    return
                STARTED.set()
                value = yield op
        finally:
            if self.raises:
                raise OSError("cleanup exploded")
            yield Truncate(0, 0)  # "free my KV cells": not allowed once closed


class TidyYields(_Tidy):
    name = "api3-tidy-yields"


class TidyRaises(_Tidy):
    name = "api3-tidy-raises"
    raises = True


class _Methods:
    @hookimpl
    def register_methods(self, register):
        register(TidyYields)
        register(TidyRaises)


@pytest.fixture
def tidy_methods():
    plugin = _Methods()
    register_plugin(plugin, name="api3-tidy-plugin")
    yield
    unregister_plugin(plugin)


@pytest.mark.parametrize("batched", ["1", "0"])
@pytest.mark.parametrize("method, why", [("api3-tidy-yields", "GeneratorExit"), ("api3-tidy-raises", "cleanup")])
def test_a_loop_that_fails_when_closed_fails_only_its_own_request(tidy_methods, monkeypatch, batched, method, why):
    """Before: ``loop.close()`` raised out of the engine, which failed every request it held with
    ``EngineFailedError`` -- another caller's included."""
    monkeypatch.setenv("PERSONAJUDGE_BATCHED", batched)
    STARTED.clear()
    with pj.PersonaJudge(TOY, backend=SlowToy()) as m:
        m.engine.reserve(4)  # room for both at once, whatever the timing of the two submits
        other = m.submit("hi", **ENDLESS, seed=1)  # another caller's request, sharing the steps
        tidy = m.submit("hi", method=method, max_new_tokens=10**6, seed=2)
        assert STARTED.wait(20)
        tidy.cancel()
        with pytest.raises(pj.PluginError, match=f"{method}.*loop.close\\(\\) raised .*{why}"):
            tidy.result()
        assert not other.done  # still decoding
        other.cancel()
        with pytest.raises(RequestCancelled):
            other.result()
        assert m.engine.stats()["running"] == 0
        assert len(m.generate("hi", **TWO, max_new_tokens=4, seed=1).tokens) == 4  # the engine still serves


def test_closing_the_engine_cancels_the_others_when_one_loop_fails_when_closed(tidy_methods):
    STARTED.clear()
    m = pj.PersonaJudge(TOY, backend=SlowToy())
    m.engine.reserve(4)
    other = m.submit("hi", **ENDLESS, seed=1)
    tidy = m.submit("hi", method="api3-tidy-yields", max_new_tokens=10**6, seed=2)
    assert STARTED.wait(20)
    m.close()
    with pytest.raises(pj.PluginError):
        tidy.result()
    with pytest.raises(RequestCancelled):  # before: EngineFailedError
        other.result()


def test_step_driver_remove_empties_the_slots_of_a_loop_that_fails_when_closed():
    """The slots go back clean although the loop's close raised (and the error is the caller's to route)."""
    b = ToyBackend()
    ctx = b.tokenizer.encode("hello there")

    def bad_loop():
        try:
            yield Forward([(0, ctx, 1)])
            yield Forward([(0, [5], 1)])
        finally:
            yield Truncate(0, 0)

    with b.open(2) as session:
        driver = StepDriver(session)
        assert driver.add("k", bad_loop(), [1])
        driver.step()
        assert session.length(1) == len(ctx)
        with pytest.raises(RuntimeError, match="ignored GeneratorExit"):
            driver.remove("k")
        assert session.length(1) == 0 and "k" not in driver


# ----------------------------------------------------------------------------- D: a session whose close raises

CLOSE_RAISES = {"on": False}


class _RaisingCloseSession(ToySession):
    def _close(self):
        if CLOSE_RAISES["on"]:
            raise OSError("close exploded")


class CloseRaisesBackend(ToyBackend):
    name = "api3-close-raises"

    def open(self, n_views):
        return _RaisingCloseSession(self, n_views)


class _Backends:
    @hookimpl
    def register_backends(self, register):
        register(CloseRaisesBackend)


@pytest.fixture
def close_raises():
    plugin = _Backends()
    register_plugin(plugin, name="api3-backend-plugin")
    CLOSE_RAISES["on"] = False
    m = pj.PersonaJudge({"backend": {"name": "api3-close-raises"}, "encoder": "plain"})
    yield m
    CLOSE_RAISES["on"] = False
    m.close()
    unregister_plugin(plugin)


def test_a_method_run_alone_keeps_its_result_when_the_session_close_raises(close_raises):
    """Before: ``reference`` (run alone) decoded to the end, then the close failure became its error."""
    m = close_raises
    want = m.generate("hi", method="reference", **TWO, max_new_tokens=5, seed=1)
    CLOSE_RAISES["on"] = True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = m.generate("hi", method="reference", **TWO, max_new_tokens=5, seed=1)
    assert got.tokens == want.tokens
    msgs = [str(w.message) for w in seen if issubclass(w.category, PluginWarning)]
    assert any("api3-close-raises" in s and "session.close raised OSError: close exploded" in s for s in msgs), msgs


def test_an_idle_engine_whose_session_close_raises_reports_it_and_keeps_running(close_raises):
    """Before: the failure, raised when the engine went idle, ended the engine thread in silence."""
    m = close_raises
    CLOSE_RAISES["on"] = True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = m.generate("hi", **TWO, max_new_tokens=5, seed=1)
        until(lambda: not m.engine.stats()["session_open"], what="the idle close")
        until(lambda: any(issubclass(w.category, PluginWarning) for w in seen), what="the PluginWarning")
        assert len(res.tokens) == 5
        assert m.engine._thread.is_alive()  # idle, waiting for the next request
        assert any("session.close raised OSError" in str(w.message) for w in seen)
        assert m.generate("hi", **TWO, max_new_tokens=5, seed=1).tokens == res.tokens
        until(lambda: not m.engine.stats()["session_open"], what="the second idle close")


# ----------------------------------------------------------------------------- E: the job handle's misuse


@pytest.fixture
def model():
    m = pj.PersonaJudge(TOY)
    yield m
    m.close()


def test_job_result_with_a_non_callable_on_text_is_a_config_error(model):
    job = model.submit("hi", **TWO, max_new_tokens=3)
    with pytest.raises(pj.ConfigError, match="on_text must be callable"):
        job.result(on_text=5)  # before: TypeError: 'int' object is not callable
    assert len(job.result().tokens) == 3


def test_events_of_an_asyncio_job_and_aevents_of_a_plain_job_are_config_errors(model):
    plain = model.submit("hi", **TWO, max_new_tokens=3)
    with pytest.raises(pj.ConfigError, match="not built with Job.for_asyncio"):
        plain.aevents()  # before: RuntimeError, and only once iterated
    with pytest.raises(pj.ConfigError, match="not built with Job.for_asyncio"):
        asyncio.run(plain.next_event())
    plain.result()

    async def main():
        job = model.submit("hi", loop=asyncio.get_running_loop(), **TWO, max_new_tokens=3)
        with pytest.raises(pj.ConfigError, match="use aevents|read them with aevents"):
            job.events()
        return [ev[0] async for ev in job.aevents()]

    assert asyncio.run(main())[-1] == "done"


@pytest.mark.parametrize("name, value", [("wait", "no"), ("stream", None), ("wait", 1), ("label", 5)])
def test_submit_flags_must_be_booleans(model, name, value):
    with pytest.raises(pj.ConfigError, match=name):
        model.submit("hi", **TWO, max_new_tokens=3, **{name: value})
    assert model.engine.stats()["queued"] == 0


def test_close_keep_backend_must_be_a_boolean():
    m = pj.PersonaJudge(TOY)
    with pytest.raises(pj.ConfigError, match="keep_backend must be True or False"):
        m.close(keep_backend="x")  # before: truthy, the backend kept
    m.close(keep_backend=np.bool_(False))
    with pytest.raises(pj.SessionError):
        m.backend.open(1)  # closed


# ----------------------------------------------------------------------------- C, F: exit


def _run(src: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(src)], capture_output=True, text=True, timeout=120
    )


def test_a_daemon_worker_inside_generate_at_exit_is_dropped_quietly():
    """Before: the exit hook cancelled the daemon worker's request, which woke up and raised
    ``RequestCancelled`` as the interpreter shut down (a traceback, or a torn "Exception in thread"),
    and a worker that retries then spun on ``EngineClosedError``. The exit handler registered before
    personajudge is imported runs after its hook, and gives the worker time to react."""
    p = _run(
        """
        import atexit, threading, time
        seen = []
        atexit.register(lambda: (time.sleep(0.5), print("worker saw", seen[:3], len(seen))))
        import personajudge as pj
        m = pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"})
        def worker():
            while True:
                try:
                    m.generate("hi", preferences=["concise", "humor"], max_new_tokens=10**6)
                except BaseException as err:
                    seen.append(type(err).__name__)
        threading.Thread(target=worker, daemon=True).start()
        time.sleep(0.3)
        print("main done")
        """
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "worker saw [] 0" in p.stdout, p.stdout
    assert p.stderr == "", p.stderr[-2000:]


def test_an_exit_handler_registered_before_the_first_engine_can_use_its_model():
    """Before: the exit hook was registered when the first engine started, after this handler, so it ran
    first and the handler got ``EngineClosedError``. Now it is registered on import."""
    p = _run(
        """
        import atexit, personajudge as pj
        m = pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"})
        atexit.register(lambda: print("at exit:", len(m.generate("hi", preferences=["concise", "humor"],
                                                                  max_new_tokens=4, seed=0).tokens)))
        m.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=0)
        print("main done")
        """
    )
    assert p.returncode == 0 and "at exit: 4" in p.stdout, (p.stdout, p.stderr[-2000:])


def test_an_exit_handler_that_runs_after_the_hook_gets_a_working_engine_that_is_joined():
    """A handler registered before personajudge is imported runs after its exit hook: the model it uses
    (used before, or never) still works, and no engine thread is left running for finalization. Before:
    ``EngineClosedError`` for the used object, and an unjoined new engine thread for the other."""
    p = _run(
        """
        import atexit, threading
        objs = {}
        def late():
            for name in ("used", "unused"):
                try:
                    n = len(objs[name].generate("hi", preferences=["concise", "humor"], max_new_tokens=4).tokens)
                except Exception as err:
                    n = type(err).__name__
                alive = sum(t.name == "personajudge-engine" and t.is_alive() for t in threading.enumerate())
                print(name, n, "alive", alive)
            g = objs["used"].stream("hi", preferences=["concise", "humor"], max_new_tokens=10**6)
            next(g)
            g.close()  # left early: the request is cancelled, and its engine thread joined
            print("stream alive", sum(t.name == "personajudge-engine" and t.is_alive() for t in threading.enumerate()))
        atexit.register(late)
        import personajudge as pj
        objs["used"] = pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"})
        objs["unused"] = pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"})
        objs["used"].generate("hi", preferences=["concise", "humor"], max_new_tokens=4)
        print("main done")
        """
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    assert "used 4 alive 0" in out and "unused 4 alive 0" in out and "stream alive 0" in out, out
