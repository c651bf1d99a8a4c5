"""The one owner of a loaded model: an engine thread that batches every caller's requests.

A backend session is not safe to share: two threads interleaving forwards on
it corrupt each other's KV cache (or, on llama.cpp, close each other's
session). So nothing but the engine thread touches the backend once an
:class:`Engine` runs. Callers -- :class:`~personajudge.PersonaJudge` from any
thread, the HTTP server, ``stream``/``astream`` -- build a
:class:`~personajudge.core.decoding.DecodeRequest` in their own thread
(config, preferences and tokenization are theirs), wrap it in a :class:`Job`
and :meth:`Engine.submit` it; committed text and the final result come back
as events on the job.

Continuous batching: the engine keeps one session open while it has work,
with *slots* (session views) for many requests at once. Each request's views
are mapped onto free slots; every step is one batched ``forward_many`` for all
active requests (:class:`~personajudge.core.decoding.StepDriver`). A request
joins at the next step after it is submitted and leaves the step it finishes,
is cancelled or fails; its slots are emptied (``truncate(slot, 0)``, which
frees the KV cells on llama.cpp) and reused. Requests with different sampling
settings, seeds, methods, window sizes and prompt lengths share steps:
sampling happens in each request's own loop on its own rows, and each row is
as it would be alone (exactly on the toy backend; on llama.cpp and
transformers up to the floating-point differences that batched kernels of
other shapes can give).

Admission is first come, first served: the head of the queue is admitted when
enough slots are free and fewer than ``max_batch`` requests run, and nothing
overtakes it (no starvation of many-view requests). When the session is too
small for the head it is re-opened larger once the running requests have
finished. Methods that are not batchable (``reference``, whose point is to
run without a cache; ``pad`` with a separate reward model; any method that
says ``batchable = False`` or brings its own ``decode``) run alone between
steps, after the running requests finish, on a session of their own -- the
single-caller path, unchanged.

When idle the engine closes its session: a caller that opens its own session
on the backend (the benchmark's step timings, the exactness kit) never finds
the engine in the way, and the next request opens a fresh one (on llama.cpp
that is a cheap memory clear; the context is only re-created to grow).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import heapq
import itertools
import os
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import numpy as np

from personajudge.core import decoding
from personajudge.core.batched import BatchedJudge, batched_request, judge_rows
from personajudge.core.contract import MAX_SESSION_VIEWS, Backend, Session
from personajudge.core.decoding import (
    DecodeRequest,
    Forward,
    Loop,
    StepDriver,
    Truncate,
    makes_progress,
    not_an_op,
    op_problem,
    run_timed,
    spinning,
    uncommitted,
)
from personajudge.core.errors import (
    ConfigError,
    PersonaJudgeError,
    PersonaJudgeWarning,
    PluginError,
    SessionError,
    TooManyViewsError,
    one_each,
)
from personajudge.core.methods import Base, Pad
from personajudge.core.result import GenerationResult
from personajudge.plugins import manager
from personajudge.plugins.manager import PluginWarning, guarded, open_session, who

DEFAULT_MAX_BATCH = 8
#: the most requests a batch may hold: each takes at least one view, and a session holds at most
#: ``MAX_SESSION_VIEWS`` (a batch of 2**63 was taken, and every request then failed in the engine thread)
MAX_BATCH = MAX_SESSION_VIEWS
DEFAULT_MAX_QUEUE = 1024

#: how long the exit hook waits for one engine's thread (its step in flight, then its session's close)
EXIT_JOIN_S = 60.0
#: engines whose thread has started (the thread holds its engine, so a running one stays here)
_STARTED: weakref.WeakSet[Engine] = weakref.WeakSet()
_STARTED_LOCK = threading.Lock()
#: set by :func:`_stop_at_exit`: the interpreter is exiting
_EXITING = threading.Event()


def _stop_at_exit() -> None:
    """Stop every engine thread and join it before the interpreter finalizes.

    The engine thread is a daemon so that a forgotten :class:`PersonaJudge` never keeps a process
    alive, but a daemon thread must not be inside a C++ extension when finalization starts: once
    the interpreter is finalizing, a daemon thread that releases the GIL and takes it back is ended
    with ``pthread_exit``, whose forced unwind through torch's ``noexcept`` tensor destructor calls
    ``std::terminate`` ("terminate called without an active exception", SIGABRT, exit 134). The
    engine does exactly that right after the caller's last result: it closes its idle session,
    freeing the KV cache tensors (``THPVariable_clear`` drops the GIL). So at exit -- after the
    non-daemon threads are joined, before finalization -- every engine drops what it still runs and
    its thread is joined (each up to :data:`EXIT_JOIN_S`; one stuck longer is left to end with the
    process, as before).

    What runs then is a daemon thread's (every other thread has been joined; the main thread is
    here): those requests are dropped *quietly*, without waking their callers, which end with the
    process as daemon threads always did (a ``RequestCancelled`` would print a traceback in each
    of them as the interpreter shuts down). A daemon thread that submits after this waits for the
    end too. Any other thread -- an exit handler of the user's, on the main thread -- still gets a
    working engine: it serves the request, its thread ends once idle, and the caller joins it when
    it reads the final event (:meth:`Engine._join_at_exit`), so nothing runs in it at finalization.

    Registered when ``personajudge.engine`` is imported: exit handlers run last in, first out, so a
    handler the user registers after importing personajudge runs before this one, with every engine
    as it was (a worker's requests still served). One registered earlier runs after it, and is
    served as above. (torch's own exit hooks only log; they may run on either side.)
    """
    _EXITING.set()
    with _STARTED_LOCK:
        engines = list(_STARTED)
    for engine in engines:
        with engine._cv:
            engine._drop_all_quietly()
            engine._cv.notify_all()
    for engine in engines:
        thread = engine._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(EXIT_JOIN_S)


atexit.register(_stop_at_exit)


def _parked_at_exit() -> bool:
    """Whether the calling thread is a daemon thread asking for work after the exit hook: it waits for
    the end of the process (:func:`_park`) instead of starting a request that would run into
    finalization, or raising in a thread the interpreter is about to drop."""
    return _EXITING.is_set() and threading.current_thread().daemon


def _park() -> None:
    """Block the calling (daemon) thread until the process ends."""
    threading.Event().wait()


def check_flag(name: str, value: Any) -> bool:
    """A yes/no argument, checked: ``wait='no'`` is truthy and would wait, silently."""
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
    return bool(value)


class QueueFullError(PersonaJudgeError):
    """The engine's queue is full; try again after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(PersonaJudgeError):
    """The engine is shutting down or closed and takes no new requests (HTTP 503)."""


class EngineFailedError(PersonaJudgeError):
    """The engine's thread failed (a bug, or an interrupt in it): every request it held gets this,
    and the next request starts a fresh engine thread."""


class RequestCancelled(PersonaJudgeError):
    """The request was cancelled (its caller went away, timed out or cancelled it)."""


def is_batchable(method: Any) -> bool:
    """Whether ``method`` can share steps with other requests.

    An explicit ``batchable`` attribute decides. Otherwise a method is
    batchable when its ``decode`` is the plain "drive my loop" one; a method
    with its own ``decode`` (a session wrapper, a second model) runs alone.
    """
    explicit = getattr(method, "batchable", None)
    if explicit is not None:
        return bool(explicit)
    # no decode at all (a plugin with only plan + loop): the engine drives its loop, as Base.decode would
    decode = getattr(type(method), "decode", Base.decode)
    if decode is Base.decode:
        return True
    if decode is Pad.decode:  # only the training-free variant: a reward model is a second session
        return type(method).reward_session is Pad.reward_session or getattr(method, "weight", 1.0) == 0
    return False


def checked_loop(method: Any, req: DecodeRequest, *, vocab_size: int | None = None) -> Loop:
    """``method.loop(req)``, checked where it enters the engine: a generator that yields only
    ``Forward`` / ``Truncate`` operations. Otherwise the step driver fails on it with an
    ``AttributeError`` or "not an iterator" that never names the method; here it is a
    :class:`PluginError` naming it, and only that request fails. So is what a third-party loop
    raises, when it is called or as it runs (a built-in's exception keeps its traceback: a bug here),
    and each way its operations break the loop protocol (see :func:`_checked_ops`; ``vocab_size``: the
    session's, to check the token ids it feeds)."""
    loop = guarded("method", req.stats.method, method, ".loop raised", lambda: method.loop(req))
    if not isinstance(loop, Generator):
        raise PluginError(
            f"{who('method', req.stats.method, method)}.loop returned {type(loop).__name__}, not a "
            "generator; loop(request) yields Forward and Truncate operations (personajudge.core.decoding)"
        )
    return _checked_ops(method, req.stats.method, loop, req, vocab_size)


def _loop_fault(method: Any, name: str, what: str) -> Exception:
    """The error for a method whose loop (or decode) broke the loop protocol, ``what`` saying how (it
    follows the method's name: ``.loop yielded ...``): a :class:`PluginError`, one line naming the
    method and its distribution, for a third-party plugin; a ``RuntimeError`` with the same words for
    one of this project's methods, whose fault is a bug here and keeps its traceback (as
    :func:`~personajudge.plugins.manager.guarded` keeps a built-in's exception)."""
    message = f"{who('method', name, method)}{what}"
    return RuntimeError(message) if manager._builtin("method", name, method) else PluginError(message)


def unfinished(req: DecodeRequest) -> str:
    """How far an answer got whose loop ended with its emitter not finished, for the error that says so."""
    em = req.emitter
    return (
        f"ended before the answer finished ({len(em.tokens)} of at most {em.max_new_tokens} tokens; no end "
        "of text, stop or full context): a loop returns once req.emitter.push(token) returns False, or after "
        "it calls req.emitter.finish(reason)"
    )


_DONE = object()  # what _resume returns for a loop that has ended


def _resume(loop: Loop, value: Any) -> Any:
    """``loop.send(value)``, with the loop's end as ``_DONE``: a ``StopIteration`` must not reach
    :func:`guarded`, which would report a finished loop as a plugin that raised."""
    try:
        return loop.send(value)
    except StopIteration:
        return _DONE


#: the spellings of ``PERSONAJUDGE_BATCHED`` (case aside), and what each means
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _batched_from_environment() -> bool:
    """``PERSONAJUDGE_BATCHED``: on unless ``0``/``false``/``no``/``off``. Anything else (``flase``,
    ``disable``) left it on without a word, so the user's A/B comparison compared nothing: it is named
    in a warning, and batching stays on. Unset or empty: on."""
    raw = os.environ.get("PERSONAJUDGE_BATCHED", "").strip()
    if not raw:
        return True
    on = _SWITCH.get(raw.lower())
    if on is None:
        warnings.warn(
            f"PERSONAJUDGE_BATCHED={raw!r:.40} is none of 1, 0, true, false, yes, no, on, off: batched "
            "acceptance stays on",
            PersonaJudgeWarning,
            stacklevel=2,
        )
        return True
    return on


def _checked_ops(method: Any, name: str, loop: Loop, req: DecodeRequest, vocab_size: int | None = None) -> Loop:
    """The loop's operations, checked; and its ``stats.forwards``, which the built-in loops count
    themselves (one per ``Forward``) and a plugin's loop may not: the larger of the two counts stands.

    Each op of a third-party loop is checked before the step driver runs it, in the request's own view numbers
    (:func:`~personajudge.core.decoding.op_problem`): a view the request does not have was an
    ``IndexError`` out of the batched step, which failed every request in it; a bad token id or
    truncate length was the session's error, naming a slot the author never used. A loop that makes
    no progress -- no token fed, none committed -- for :data:`~personajudge.core.decoding.MAX_IDLE_OPS`
    ops in a row is stopped: it would spin for ever; so is one that commits no token for
    :data:`~personajudge.core.decoding.MAX_OPS_PER_TOKEN` ops (it feeds tokens and rolls them back). And a loop that ends before its emitter did is an
    error: its result would have said ``length`` (:func:`result_of`) of an answer cut short for no
    reason the user could see. Ended by a cancel or the engine's close (``close()``, a
    ``GeneratorExit`` at the ``yield``), it never reaches that check. Each is a :func:`_loop_fault`."""
    forwards, idle, since_commit, committed = 0, 0, 0, len(req.emitter.tokens)
    n_views = len(req.contexts)
    # this project's loops are trusted with their ops (a slip is a bug here, its IndexError a traceback):
    # the per-op check, about a microsecond, is for third-party loops only
    plugin = not manager._builtin("method", name, method)
    try:
        value = None  # send(None) starts a fresh generator, as next() does
        while (
            op := guarded("method", name, method, ".loop raised", functools.partial(_resume, loop, value))
        ) is not _DONE:
            if not isinstance(op, Forward | Truncate):
                raise not_an_op(op, f"{who('method', name, method)}.loop")
            if isinstance(op, Forward) and not isinstance(op.calls, list | tuple):
                # read once here, as the driver would read an iterator of calls once
                op = Forward(
                    guarded("method", name, method, ".loop's Forward calls raised", functools.partial(list, op.calls))
                )
            problem = op_problem(op, n_views, vocab_size) if plugin else None
            if problem is not None:
                raise _loop_fault(method, name, f".loop yielded {problem}")
            if len(req.emitter.tokens) != committed:
                idle, since_commit, committed = 0, 0, len(req.emitter.tokens)
            else:
                since_commit += 1
                if since_commit > decoding.MAX_OPS_PER_TOKEN:
                    raise _loop_fault(method, name, "." + uncommitted("loop", since_commit))
                idle = 0 if makes_progress(op) else idle + 1
                if idle > decoding.MAX_IDLE_OPS:
                    raise _loop_fault(method, name, "." + spinning("loop", idle, op))
            forwards += isinstance(op, Forward)
            value = yield op
        if not req.emitter.done:
            raise _loop_fault(method, name, f".loop {unfinished(req)}")
    finally:
        req.stats.forwards = max(req.stats.forwards, forwards)
        # a loop that yields or raises as it is closed (cleanup in its ``finally``) fails its own request
        # with a PluginError naming it (StepDriver.remove hands it to that request only)
        guarded("method", name, method, ".loop.close() raised", loop.close)


def _close_reporting(session: Any) -> None:
    """``session.close()``; a third-party backend's session that fails to close (a :class:`PluginError`
    from :func:`~personajudge.plugins.manager.open_session`) is reported as a :class:`PluginWarning`
    with that line, and the engine goes on: the request it served keeps its result, and an idle
    engine's thread does not end on it. A built-in session's failure is a bug and propagates."""
    try:
        session.close()
    except PluginError as err:
        warnings.warn(str(err), PluginWarning, stacklevel=2)


# Events a job delivers, in order: ("start",) once admitted, ("text", piece)*, then
# ("done", GenerationResult) or ("error", exception).
Event = tuple


class Job:
    """One request inside the engine, and its caller's handle on it.

    ``sink`` receives the events in the engine thread; by default they go to
    a queue that :meth:`events` / :meth:`result` read in the caller's thread
    (user callbacks never run on the engine thread). :meth:`for_asyncio`
    builds a job whose events arrive on an asyncio loop instead.
    """

    _ids = itertools.count(1)
    #: where a :meth:`for_asyncio` job's events arrive (None: a plain job)
    _aqueue: asyncio.Queue | None = None

    def __init__(
        self,
        req: DecodeRequest,
        method: Any,
        *,
        sink: Callable[[Event], None] | None = None,
        stream: bool = True,
        label: str = "python",
        finish: Callable[[GenerationResult], GenerationResult] | None = None,
    ):
        self.id = next(self._ids)
        self.req = req
        #: who submitted the job, for the engine's hooks (the server's metrics: its HTTP path). Given at
        #: construction, since the engine may finish a short job before ``submit`` returns to its caller
        self.label = label
        #: deliver ("text", piece) events as text is committed; without, the text is decoded only as
        #: often as the stop strings and the repetition guard need it, and arrives with the result
        self.stream = stream
        self.method = method
        #: applied to the result before it is delivered (the API attaches the run's settings, so a
        #: result read from ``job.result()`` or a ``("done", result)`` event carries them as
        #: ``generate``'s does); it runs in the engine thread and must not raise
        self._finish = finish
        self.n_views = len(req.contexts)
        self.batchable = is_batchable(method)
        self._queue: queue.SimpleQueue | None = None
        if sink is None:
            self._queue = queue.SimpleQueue()
            sink = self._queue.put
        self._sink = sink
        self.cancelled = False
        self.engine: Engine | None = None
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.result_value: GenerationResult | None = None
        self.error: BaseException | None = None
        self._final_taken = False
        #: dropped by the exit hook: its events are no longer delivered (see ``_stop_at_exit``)
        self._quiet = False

    @classmethod
    def for_asyncio(
        cls,
        req: DecodeRequest,
        method: Any,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        stream: bool = True,
        label: str = "python",
        finish: Callable[[GenerationResult], GenerationResult] | None = None,
    ) -> Job:
        """A job whose events go to an ``asyncio.Queue`` (read with :meth:`aevents`)."""
        ev_loop = loop or asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()

        def sink(ev: Event) -> None:
            ev_loop.call_soon_threadsafe(aq.put_nowait, ev)

        job = cls(req, method, sink=sink, stream=stream, label=label, finish=finish)
        job._aqueue = aq
        return job

    # ------------------------------------------------------------------ engine side

    def _emit(self, event: Event) -> None:
        self._deliver(self._settle(event))

    def _settle(self, event: Event) -> Event:
        """Record what ``event`` means for the job (its times, its result or error); return the event
        to deliver. Split from :meth:`_deliver` so that the engine's ``on_finish`` hook sees a finished
        job before its caller does (a metrics scrape after a response counts that response)."""
        kind = event[0]
        now = time.perf_counter()
        if kind == "start":
            self.t_start = now
        elif kind == "text" and self.t_first is None:
            self.t_first = now
        elif kind in ("done", "error"):
            self.t_end = now
            if kind == "done":
                if self._finish is not None:
                    event = ("done", self._finish(event[1]))
                self.result_value = event[1]
            else:
                self.error = event[1]
        return event

    def _deliver(self, event: Event) -> None:
        if self._quiet:
            return
        try:
            self._sink(event)
        except Exception:  # the caller's event loop is gone (server shutting down), or a caller's own
            # sink failed: nobody listens, and the engine (every other request) must go on
            self.cancelled = True

    @property
    def done(self) -> bool:
        return self.t_end is not None

    # ------------------------------------------------------------------ caller side

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (its slots are freed then); one still
        waiting in the queue ends now, in this thread (:meth:`Engine._unqueue`)."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            if self.engine is not None:
                self.engine._unqueue(self)
                self.engine._wake()
                if _EXITING.is_set():  # an exit handler's stream left early: its engine thread ends, joined
                    self.engine._join_at_exit()

    def _final(self) -> Event | None:
        """The final event once a reader has taken it from the queue (None before): a second
        :meth:`result` or :meth:`events` gets it again instead of waiting for an event that never comes."""
        if not self._final_taken:
            return None
        return ("done", self.result_value) if self.error is None else ("error", self.error)

    def _took_final(self) -> None:
        self._final_taken = True
        if _EXITING.is_set() and self.engine is not None:  # an exit handler's request: its engine thread
            self.engine._join_at_exit()  # ends once idle, and must not be running at finalization

    def events(self) -> Iterator[Event]:
        """The job's events in the caller's thread, up to and including the final one (read again
        after the end: the final one alone). Several threads may wait on one job's result; its text
        events go to whichever reads first, the final event to each."""
        if self._queue is None:  # checked before the first next(): a plain function returning the generator
            raise ConfigError("this job delivers its events to asyncio (Job.for_asyncio): read them with aevents()")
        return self._events()

    def _events(self) -> Iterator[Event]:
        assert self._queue is not None
        final = self._final()
        if final is not None:
            yield final
            return
        while True:
            ev = self._queue.get()
            if ev[0] in ("done", "error"):
                self._took_final()
                # passed on: another thread blocked in result() on this job (as on a Future) waited for
                # ever, the one final event taken by the first; a later reader uses _final()
                self._queue.put(ev)
            yield ev
            if ev[0] in ("done", "error"):
                return

    def _async_queue(self) -> asyncio.Queue:
        if self._aqueue is None:
            raise ConfigError(
                "this job was not built with Job.for_asyncio (submit without loop=): read it with events()"
            )
        return self._aqueue

    async def next_event(self) -> Event:
        """The next event of a :meth:`for_asyncio` job (safe to cancel, e.g. by a timeout)."""
        return await self._async_queue().get()

    def aevents(self) -> AsyncIterator[Event]:
        """:meth:`events` for a :meth:`for_asyncio` job, on its event loop."""
        return self._aevents(self._async_queue())

    async def _aevents(self, aq: asyncio.Queue) -> AsyncIterator[Event]:
        final = self._final()
        if final is not None:
            yield final
            return
        while True:
            ev = await aq.get()
            if ev[0] in ("done", "error"):
                self._took_final()
                aq.put_nowait(ev)  # for another task waiting on this job, as in _events
            yield ev
            if ev[0] in ("done", "error"):
                return

    def result(self, on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Wait for the result (calling ``on_text`` with each piece, in this thread); raise its error.

        The error raised is the job's own (a second call raises it again), so as it leaves, its
        traceback takes in the caller's frames, and whatever they hold (the ``PersonaJudge``): as
        with ``concurrent.futures.Future.result``, whoever keeps the job keeps those. The engine
        keeps no job it has finished (see :meth:`Engine._serve_round`)."""
        out = self.outcome(on_text)
        if isinstance(out, BaseException):
            raise out
        return out

    def outcome(self, on_text: Callable[[str], None] | None = None) -> GenerationResult | BaseException:
        """Like :meth:`result`, but the error is returned, not raised: a caller that collects many jobs'
        outcomes (``generate_batch``) raises one error at the end, and an error object several jobs share
        (a step that failed as a whole) does not gain a traceback entry per job that returned it."""
        if on_text is not None and not callable(on_text):
            raise ConfigError(
                f"on_text must be callable (it receives each piece of text), got {type(on_text).__name__}"
            )
        for ev in self.events():
            if ev[0] == "text" and on_text is not None:
                on_text(ev[1])
            elif ev[0] in ("done", "error"):
                return ev[1]
        raise AssertionError("unreachable")


def result_of(req: DecodeRequest) -> GenerationResult:
    """The :class:`GenerationResult` of a finished request."""
    em = req.emitter
    if em.finish_reason is None:
        em.finish("length")
    req.stats.tokens = len(em.tokens)
    return GenerationResult(text=em.text, tokens=list(em.tokens), finish_reason=em.finish_reason, stats=req.stats)


class Engine:
    """The scheduler that owns a backend: one thread, one session, continuous batching.

    ``max_batch`` requests run at once at most; ``max_queue`` more may wait
    beyond the batch's free places (past that :meth:`submit` raises
    :class:`QueueFullError`, or waits). ``on_step``
    (optional) is called in the engine thread after every batched step with
    the number of requests in it and the step's seconds, ``on_finish`` with
    every job that ends and its error (None on success), before the job's
    caller gets its final event: metrics. Both run in the engine thread,
    except ``on_finish`` for a request cancelled while it waits, which ends
    at once in the thread that cancelled it (so the hook must be thread-safe,
    as ``prometheus_client``'s metrics are).

    ``batched`` (default True): Persona-judge requests with the interleaved
    schedule are decided together, per step, by one
    :class:`~personajudge.core.batched.BatchedJudge` (same tokens as their
    generator loops, one host read per step for all of them). False -- or the
    environment variable ``PERSONAJUDGE_BATCHED=0`` -- runs every request
    through its own generator loop (for debugging and comparison).

    ``after``: an engine that drove this backend before and may still be
    finishing its last requests; this one's thread waits for that one's to
    end before its first step, so two threads never drive one backend.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        on_step: Callable[[int, float], None] | None = None,
        on_finish: Callable[[Job, BaseException | None], None] | None = None,
        batched: bool = True,
        after: Engine | None = None,
    ):
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be between 1 and {MAX_BATCH}")
        if max_queue < 0:
            raise ValueError("max_queue must be at least 0")
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_step = on_step
        self.on_finish = on_finish
        self.batched = batched and _batched_from_environment()
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._slots: dict[int, list[int]] = {}
        self._free: list[int] = []
        self._capacity = 0  # slots the next session opens with (grows, unless the backend sizes sessions)
        self._reserved = 0  # what reserve() asked for: the floor of every session
        self._session: Session | None = None
        self._driver: StepDriver | None = None
        compile_kernel = getattr(backend, "compile_kernel", None)  # a duck-typed backend may lack it
        self._kernel = judge_rows if compile_kernel is None else compile_kernel(judge_rows)
        self._judge = BatchedJudge(self._kernel)
        self._alone: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        #: the thread has decided to end (under the lock): a request queued now needs a new thread
        self._ending = False
        self._after = after
        self._latency = 1.0  # running mean of request seconds, for Retry-After
        self.steps = 0
        self.completed = 0
        self.cancelled = 0

    # ------------------------------------------------------------------ public

    def submit(self, job: Job, *, wait: bool = False) -> Job:
        """Queue ``job``; it joins the running batch at the next step with room.

        A full queue raises :class:`QueueFullError` (the server's 429), or,
        with ``wait=True`` (the Python API), blocks until there is room.
        """
        self._listen(job)
        with self._cv:
            while not _parked_at_exit():
                if self._closing:
                    raise EngineClosedError("the engine is shutting down and takes no new requests")
                if self._room() > 0:
                    job.engine = self
                    self._queue.append(job)
                    self._ensure_thread()
                    self._cv.notify_all()
                    return job
                if not wait:
                    raise QueueFullError(
                        f"the request queue is full ({self.max_queue} waiting); retry later",
                        retry_after=self.retry_after(),
                    )
                self._cv.wait()
        _park()  # a daemon thread at exit (see _stop_at_exit)
        return job

    def submit_many(self, jobs: list[Job]) -> list[Job]:
        """Queue ``jobs`` together, blocking for room (the Python API's ``generate_batch``).

        As many as the queue takes are appended under one lock, so rows that
        fit join the batch at the same step whatever the threads' timing: a
        backend whose logits depend on the batch shape (llama.cpp on a CPU)
        then gives the same rows on every run, as long as no other caller's
        requests share those steps.
        """
        pending = list(jobs)
        for job in pending:
            self._listen(job)
        with self._cv:
            while pending:
                if _parked_at_exit():
                    break
                if self._closing:
                    raise EngineClosedError("the engine is shutting down and takes no new requests")
                room = self._room()
                if room <= 0:
                    self._cv.wait()
                    continue
                for job in pending[:room]:
                    job.engine = self
                    self._queue.append(job)
                del pending[:room]
                self._ensure_thread()
                self._cv.notify_all()
        if pending:
            _park()  # a daemon thread at exit (see _stop_at_exit)
        return jobs

    def _room(self) -> int:
        """How many more requests the queue takes now (called under the lock): ``max_queue`` waiting
        beyond the places the running batch still has. A request running alone holds the places of a
        whole batch: nothing joins it, so what arrives meanwhile waits, and counts against ``max_queue``."""
        running = self.max_batch if self._alone is not None else len(self._active)
        return self.max_queue + max(0, self.max_batch - running) - len(self._queue)

    def reserve(self, slots: int) -> int:
        """Size the session for ``slots`` views up front (the server does this at start-up); returns the
        capacity reserved.

        On llama.cpp this creates the context with that many sequences now,
        so that the first requests do not wait for it to be re-created. A
        backend that cannot hold ``slots`` views (``TooManyViewsError``, as
        the contract tells it to say) gets half as many, down to one: what it
        can hold is reserved, and a request too large for it fails alone,
        later, with its own 400. As in :meth:`_open`, a capacity is kept only
        once a session of that size opened, so a refused size never makes
        every later session ask for it. With a session open or requests
        running nothing is reopened (the next session sizes itself to its
        batch), and the current capacity is returned.
        """
        with self._cv:
            if self._active or self._session is not None or self._alone is not None:
                return self._capacity
            want = max(self._capacity, slots, 1)
            while True:
                try:
                    open_session(self.backend, want).close()
                except TooManyViewsError:
                    smaller = want // 2
                    if smaller <= self._capacity:  # what opened before (or nothing): no size of ours fits
                        if self._capacity:
                            return self._capacity
                        raise
                    want = smaller
                    continue
                self._capacity = self._reserved = want
                return want

    def retry_after(self) -> float:
        """Seconds until a queue slot is likely to free up (for HTTP 429 Retry-After)."""
        waves = (len(self._queue) + 1) / max(1, self.max_batch)
        return max(1.0, min(60.0, self._latency * waves))

    def stats(self) -> dict[str, Any]:
        """Queue depth, running requests and slots in use (for /health and /metrics)."""
        with self._cv:
            used = sum(len(s) for s in self._slots.values())
            return {
                "queued": len(self._queue),
                "running": len(self._active) + (self._alone is not None),
                "slots_in_use": used + (self._alone.n_views if self._alone else 0),
                "slots": self._capacity,
                "max_batch": self.max_batch,
                "steps": self.steps,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "closing": self._closing,
                "session_open": self._session is not None and not self._session.closed,
            }

    def close(self, timeout: float | None = None, *, cancel: bool = True) -> None:
        """Stop taking requests; cancel (or, with ``cancel=False``, finish) the others; join the thread.

        With ``cancel=False`` running and queued requests get up to
        ``timeout`` seconds to finish, and are cancelled after it.
        """
        with self._cv:
            self._closing = True
            if cancel:
                self._cancel_all()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._cv:
                    self._cancel_all()
                    self._cv.notify_all()
                thread.join()
        with self._cv:
            self._thread = None

    def stop_when_idle(self) -> None:
        """Take no new requests, finish the ones submitted, then end the thread; returns at once.

        For a finalizer (see ``PersonaJudge``): it may run on any thread,
        this engine's own included, so it must not join.
        """
        with self._cv:
            self._closing = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ internals

    def _jobs(self) -> list[Job]:
        return list(self._queue) + list(self._active.values()) + ([self._alone] if self._alone else [])

    def _cancel_all(self) -> None:
        for job in self._jobs():
            job.cancelled = True

    def _drop_all_quietly(self) -> None:
        """At exit: cancel every request without delivering it anything (see :func:`_stop_at_exit`)."""
        for job in self._jobs():
            job.cancelled = True
            job._quiet = True

    def _join_at_exit(self) -> None:
        """After the exit hook, in a caller that has its final event (or cancelled): once no live request
        is left, the engine thread ends (see :meth:`_serve_round`); wait for it, so that it is not
        running (closing its session) when the interpreter finalizes."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        with self._cv:
            if any(not j.cancelled for j in self._jobs()):
                return  # another request of this exit handler's: its own final event joins
        thread.join(EXIT_JOIN_S)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _unqueue(self, job: Job) -> None:
        """End a cancelled ``job`` that is still waiting, at once, in the cancelling thread.

        Left for the engine thread, it kept its place in the queue (and its caller waited) until the
        next round: for as long as a request running alone (``reference``) takes, or a step, during
        which a client that had gone still counted against ``max_queue`` and new ones got 429. Under
        the lock a job is either here, or taken by :meth:`_take` (then the engine drops it)."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:  # taken already (or never queued): the engine drops it at its next step
                return
            self._cv.notify_all()  # room in the queue for blocked submitters
        self._finish(job, RequestCancelled("the request was cancelled before it started"))

    def _ensure_thread(self) -> None:
        """Start the thread unless one runs and has not decided to end (called under the lock)."""
        if self._thread is None or not self._thread.is_alive() or self._ending:
            with _STARTED_LOCK:
                _STARTED.add(self)
            previous = self._thread if self._ending else None  # ending, but maybe still unwinding
            self._ending = False
            self._thread = threading.Thread(
                target=self._loop, args=(previous,), name="personajudge-engine", daemon=True
            )
            self._thread.start()

    def _listen(self, job: Job) -> None:
        """Route the job's committed text to its events: when it streams, or runs alone (where a text
        piece is also the point at which a cancelled request stops)."""
        if job.stream or not job.batchable:
            job.req.emitter.on_text = lambda piece: self._text(job, piece)

    def _text(self, job: Job, piece: str) -> None:
        if job.cancelled and self._alone is job:
            raise RequestCancelled("cancelled")  # aborts a request running alone at its next token
        job._emit(("text", piece))

    def wait_stopped(self) -> None:
        """Wait for the engine's thread to end (it ends once closing and out of work)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self, previous: threading.Thread | None = None) -> None:
        if previous is not None:  # this engine's last thread, on its way out: one thread at a time
            previous.join()
        after, self._after = self._after, None
        if after is not None:
            after.wait_stopped()
        context = getattr(self.backend, "decoding_context", None)  # a duck-typed backend may lack it
        try:
            with context() if context is not None else contextlib.nullcontext():
                self._serve()
        except BaseException as err:  # a bug (or an interrupt) in the engine thread: nobody may wait for ever
            self._fail_all(err)  # every caller gets it, with this error as the cause
            if not isinstance(err, Exception):
                raise

    def _fail_all(self, err: BaseException) -> None:
        """Give every queued and running job an error after the engine thread failed, and start over:
        the next :meth:`submit` starts a fresh thread with a fresh session."""
        with self._cv:
            jobs = list(self._queue) + list(self._active.values()) + ([self._alone] if self._alone else [])
            self._queue.clear()
            self._active.clear()
            self._slots.clear()
            self._alone = None
            self._ending = True  # this thread returns next: a request queued from now on starts another
            try:
                self._close_session()
            except Exception:
                self._session, self._driver, self._free = None, None, []
            self._cv.notify_all()
        for job in jobs:  # one error each: a caller marks its own (generate_batch's .row, .rows)
            if not job.done:
                error = EngineFailedError(f"the engine stopped: {type(err).__name__}: {err}")
                error.__cause__ = err
                job._deliver(job._settle(("error", error)))

    def _serve(self) -> None:
        while self._serve_round():
            pass

    def _serve_round(self) -> bool:
        """Wait for work, then admit, drop and step once; False when the thread is to end.

        A method of its own so that its locals -- the jobs it delivered, whose errors' tracebacks
        hold their callers' frames once re-raised there (a ``PersonaJudge`` among them) -- are gone
        when the thread next waits: an idle engine thread holds no finished job, and so never keeps
        a dropped object (and through its finalizer, the model) alive.

        The thread ends when closing, or after the exit hook (:func:`_stop_at_exit`), once it has
        nothing to do; a request queued after that starts a new one (:meth:`_ensure_thread`).
        """
        with self._cv:
            while not self._queue and not self._active and not self._closing and not _EXITING.is_set():
                self._close_session()
                self._cv.wait()
            if (self._closing or _EXITING.is_set()) and not self._queue and not self._active:
                self._ending = True
                self._close_session()
                return False
            dropped = [j for j in self._queue if j.cancelled]
            for j in dropped:
                self._queue.remove(j)
            cancelled = [j for j in self._active.values() if j.cancelled]
            admit, alone, failed = self._take()
            if admit or alone or failed or dropped:
                self._cv.notify_all()  # room in the queue for blocked submitters
        for j, err in failed:
            self._finish(j, err)
        for j in dropped:  # counted as cancelled (the server's metrics and /health), like the others
            self._finish(j, RequestCancelled("the request was cancelled before it started"))
        for j in cancelled:
            self._leave(j, error=RequestCancelled("the request was cancelled"))
        if alone is not None:
            self._run_alone(alone)
            return True
        for j in admit:
            self._join(j)
        if self._active:
            self._step()
            self._reclaim()
        elif not admit and not cancelled and not dropped and not failed:
            with self._cv:  # the head waits for something (cannot happen when idle; be safe)
                self._cv.wait(0.05)
        return True

    def _take(self) -> tuple[list[Job], Job | None, list[tuple[Job, BaseException]]]:
        """Pop the jobs to admit now, first come first served (called under the lock).

        Returns the jobs to admit, a job to run alone (or None), and jobs
        that failed because no session could be opened for them.
        """
        admit: list[Job] = []
        failed: list[tuple[Job, BaseException]] = []
        while self._queue and len(self._active) + len(admit) < self.max_batch:
            head = self._queue[0]
            if not head.batchable:
                if self._active or admit:
                    break
                self._queue.popleft()
                self._alone = head  # set here, under the lock: running from now on, for submit's room and close
                return [], head, failed
            want = sum(j.n_views for j in itertools.islice(self._queue, self.max_batch) if j.batchable)
            if (
                self._session is None
                or len(self._free) < head.n_views
                or (not self._active and not admit and self._size_for(want) < self._capacity)
            ):
                if self._active or admit:
                    break
                # idle (or too small, or too large for a backend whose unused rows cost): sized for the waiting batch
                try:
                    try:
                        self._open(self._size_for(max(want, head.n_views)))
                    except PersonaJudgeError:
                        self._open(self._size_for(head.n_views))
                except Exception as err:  # e.g. more views than the backend can hold
                    self._close_session()
                    failed.append((self._queue.popleft(), err))
                    continue
            self._queue.popleft()
            slots = [heapq.heappop(self._free) for _ in range(head.n_views)]
            self._slots[head.id] = slots
            self._active[head.id] = head
            admit.append(head)
        return admit, None, failed

    def _size_for(self, views: int) -> int:
        """The capacity of a session opened for ``views`` waiting views.

        As large as any session before (a burst's session lets later requests join without a reopen,
        and llama.cpp only re-creates its context to grow), unless the backend says otherwise
        (``backend.session_size(views)``, duck-typed): the hf static cache runs every forward on all
        rows, so one large batch would make every later request pay for its rows. What
        :meth:`reserve` asked for stays the floor either way (the server's sessions)."""
        size_of = getattr(self.backend, "session_size", None)
        size = size_of(views) if callable(size_of) else None
        return max(self._capacity, views) if size is None else max(self._reserved, size, views)

    def _open(self, capacity: int) -> None:
        """A session of ``capacity`` views; the size is kept (later sessions open as large) only once it opened.

        Kept before, a request the backend refused (more views than it can
        hold) would have made every later session ask for as many, and fail.
        """
        self._close_session()
        self._session = open_session(self.backend, capacity)
        self._capacity = capacity
        self._driver = StepDriver(self._session)
        self._judge = BatchedJudge(self._kernel)
        self._free = list(range(capacity))

    def _close_session(self) -> None:
        session = self._session
        self._session = None
        self._driver = None
        self._free = []
        if session is not None:
            _close_reporting(session)

    def _join(self, job: Job) -> None:
        job.req.stats.wall_time_s = 0.0
        try:
            if self._session is None or self._driver is None or self._session.closed:  # set together
                raise SessionError("the engine's session was closed by another user of the backend")
            breq = batched_request(job.method, job.req) if self.batched else None
            if breq is not None:
                started = self._driver.add_row(job.id, self._judge, breq, self._slots[job.id])
            else:
                loop = checked_loop(job.method, job.req, vocab_size=getattr(self._session, "vocab_size", None))
                started = self._driver.add(job.id, loop, self._slots[job.id])
        except Exception as err:
            self._leave(job, error=err)
            return
        job._emit(("start",))
        if not started:
            self._leave(job)

    def _step(self) -> None:
        t0 = time.perf_counter()
        n = len(self._active)
        try:
            assert self._driver is not None  # a step runs only with jobs active, so a session is open
            finished, failed = self._driver.step()
        except BaseException as err:  # a bug in the driver: fail everyone, start over with a fresh session
            jobs = list(self._active.values())
            for job, own in zip(jobs, one_each(err, len(jobs))):  # an error each: callers mark theirs
                self._leave(job, error=own)
            with self._cv:
                self._close_session()
            if not isinstance(err, Exception):
                raise
            return
        self.steps += 1
        now = time.perf_counter()
        for job in self._active.values():  # the time to first token, also of jobs that send no text events
            if job.t_first is None and job.req.emitter.tokens:
                job.t_first = now
        if self.on_step is not None:
            try:
                self.on_step(n, time.perf_counter() - t0)
            except Exception:  # metrics must never stop the engine
                pass
        for key in finished:
            self._leave(self._active[key])
        for key, job_err in failed.items():
            self._leave(self._active[key], error=job_err)

    def _leave(self, job: Job, error: BaseException | None = None) -> None:
        """Take ``job`` out of the batch, free its slots, deliver its result or error.

        A loop that fails as it is closed (a plugin's cleanup that yields or raises: a
        :class:`PluginError` from :func:`checked_loop`) fails this request only; its slots are
        emptied all the same (:meth:`StepDriver.remove`). So does a backend's ``truncate`` that
        raises as its slots are emptied (a third-party backend's is a :class:`PluginError` from
        :func:`~personajudge.plugins.manager.open_session`): the slot it failed on is quarantined,
        left out of the free list, since it may still hold this request's tokens, until it is emptied:
        by a later try of its truncate between steps (:meth:`_reclaim`), or by a reopened session, every
        slot clean (when the engine is next idle, or once nothing runs and the free slots are too few
        for the head of the queue)."""
        if self._driver is not None and job.id in self._driver:
            try:
                self._driver.remove(job.id)
            except Exception as err:
                if error is None or isinstance(error, RequestCancelled):
                    error = err
        dirty = self._driver.dirty if self._driver is not None else set()  # also of a step's own removals
        with self._cv:
            self._active.pop(job.id, None)
            slots = self._slots.pop(job.id, [])
            if self._session is not None:
                for s in slots:
                    if s not in dirty:
                        heapq.heappush(self._free, s)
            self._cv.notify_all()  # a place in the batch is a place in the queue for blocked submitters
        self._finish(job, error)

    def _reclaim(self) -> None:
        """After a step (and the leaves it caused): the quarantined slots whose truncate now succeeds
        (:meth:`StepDriver.reclaim`, backing off) go back to the free list.

        Without this a stuck slot came back only with a new session, which opens when the engine is
        idle or has nothing running: a server under steady load is neither, and each failed truncate
        shrank its batch for good. Retrying the truncate, rather than reopening the session, leaves the
        running requests where they are; a slot is freed only once emptied, so no request is ever
        started on another's tokens. One a request still holds (not yet through :meth:`_leave`) is
        left to that, which frees it once it is no longer dirty: never two entries for one slot."""
        driver = self._driver
        if driver is None or not driver.dirty:
            return
        clean = driver.reclaim()
        with self._cv:
            if self._driver is not driver:  # the session was closed meanwhile; its successor is all clean
                return
            held = {s for slots in self._slots.values() for s in slots}
            for s in clean:
                if s not in held:
                    heapq.heappush(self._free, s)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        now = time.perf_counter()
        if job.t_start is not None:
            job.req.stats.wall_time_s = now - job.t_start
        if job.cancelled and (error is None or (self._closing and isinstance(error, RequestCancelled))):
            error = RequestCancelled(
                "the engine is shutting down; the request was cancelled"
                if self._closing
                else "the request was cancelled"
            )
        if error is not None:
            with self._cv:  # a queued request's cancel finishes it in its caller's thread (_unqueue)
                self.cancelled += isinstance(error, RequestCancelled)
            event = job._settle(("error", error))
        else:
            res = result_of(job.req)
            dt = now - job.t_submit
            with self._cv:
                self.completed += 1
                self._latency = dt if self.completed == 1 else 0.9 * self._latency + 0.1 * dt
            event = job._settle(("done", res))
        # the hook first, then the caller: whoever reads the metrics after a response sees it counted
        try:
            if self.on_finish is not None:
                self.on_finish(job, error)
        except Exception:  # metrics must never stop the engine, nor keep a result from its caller
            pass
        finally:
            job._deliver(event)

    def _run_alone(self, job: Job) -> None:
        """A method that cannot share steps: its own session, nothing else running (the single-caller path)."""
        with self._cv:  # self._alone is job: _take set it, under the lock that popped it
            self._close_session()
        job._emit(("start",))
        error: BaseException | None = None
        try:
            session = open_session(self.backend, job.n_views)
            try:
                # a third-party decode's exception is one PluginError naming it (a built-in's keeps its traceback)
                name = job.req.stats.method
                guarded(
                    "method", name, job.method, ".decode raised", lambda: run_timed(job.method.decode, session, job.req)
                )
            finally:  # a close that fails is reported, and the request keeps its result (or its own error)
                _close_reporting(session)
            if not job.req.emitter.done and not job.cancelled:  # as a loop that ends early (_checked_ops)
                raise _loop_fault(job.method, job.req.stats.method, f".decode {unfinished(job.req)}")
        except Exception as err:
            error = err
        finally:
            with self._cv:
                self._alone = None
        self._finish(job, error)
