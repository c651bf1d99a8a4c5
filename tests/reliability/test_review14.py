"""``generate_batch`` when the engine fails many rows with one error (review of the row-error changes).

``_batch_results`` waits for every row and raises the first failed row's error with ``.row`` and
``.rows`` set on it. The engine can fail many jobs with one exception object: a step that raises as a
whole (``Engine._step``) fails every running job with it, and so did ``Engine._fail_all`` (the engine
thread broken) with its one ``EngineFailedError``. Two consequences, both fixed:

- each row's error was raised once while waiting (``Job.result``), so a shared one took in these
  frames again per row: a traceback as long as the batch, the same two lines over and over;
- ``_fail_all``'s one error, marked with ``.row``/``.rows`` by every ``generate_batch`` it failed,
  carried whichever call marked it last: another caller's rows, under a concurrent call.
"""

import traceback

import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.decoding import StepDriver
from personajudge.engine import Engine, EngineFailedError

PROMPTS = [f"question {i}" for i in range(12)]
RUN = dict(preferences=["concise", "humor"], seeds=list(range(len(PROMPTS))))


def _pj():
    return PersonaJudge(
        {"backend": {"name": "toy"}, "encoder": "plain", "decoding": {"max_new_tokens": 16, "lambda": 3}},
        backend=ToyBackend(),
    )


def _once(monkeypatch, cls, name, error, *, on_call=1):
    """``cls.name`` raises ``error`` on its ``on_call``-th call (in the engine thread), then is itself."""
    real, calls = getattr(cls, name), []

    def patched(self, *a, **kw):
        calls.append(1)
        if len(calls) == on_call:
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(cls, name, patched)


def test_a_step_that_fails_every_row_with_one_error_raises_it_with_a_traceback_that_does_not_repeat(monkeypatch):
    """Before: 7 rows shared the error and its traceback held 19 entries, ``_batch_results`` and
    ``Job.result`` once per row; now each frame once."""
    _once(monkeypatch, StepDriver, "step", RuntimeError("a bug in the step"), on_call=3)
    pj = _pj()
    with pytest.raises(RuntimeError, match="a bug in the step") as info:
        pj.generate_batch(PROMPTS, **RUN)
    pj.close()
    err = info.value
    failed = [r for r in err.rows if isinstance(r, BaseException)]
    assert len(failed) >= 2, "the test needs rows failed by the one step"
    assert all(type(r) is RuntimeError and str(r) == "a bug in the step" for r in failed)
    frames = [(f.filename, f.lineno, f.name) for f in traceback.extract_tb(err.__traceback__)]
    assert len(frames) == len(set(frames)), frames
    assert err.rows[err.row] is err


def test_an_engine_that_stops_gives_each_row_an_error_of_its_own(monkeypatch):
    """Before: one ``EngineFailedError`` for every job, in this call and any other: ``.rows``, set by
    each call it failed, could be another call's rows. Now each row's error is its own object (with
    the same message and cause), so ``.row``/``.rows`` are this call's."""
    _once(monkeypatch, Engine, "_reclaim", RuntimeError("a bug after the step"))
    pj = _pj()
    with pytest.raises(EngineFailedError, match="a bug after the step") as info:
        pj.generate_batch(PROMPTS, **RUN)
    err = info.value
    failed = [r for r in err.rows if isinstance(r, BaseException)]
    assert len(failed) >= 2, "the test needs several rows failed by the stop"
    assert len({id(r) for r in failed}) == len(failed)
    assert all(isinstance(r, EngineFailedError) and isinstance(r.__cause__, RuntimeError) for r in failed)
    assert err.rows[err.row] is err and err.row == err.rows.index(failed[0])
    # the engine starts over: the same call is whole
    assert len(pj.generate_batch(PROMPTS[:2], preferences=RUN["preferences"], seeds=[0, 1])) == 2
    pj.close()


def test_an_interrupt_delivered_as_a_rows_error_leaves_at_once_as_itself(monkeypatch):
    """An interrupt in the engine thread is no row's own error: raised as it arrives, not held for
    the other rows (the behaviour ``Job.result`` had, kept by the non-raising wait)."""

    class Interrupt(BaseException):
        pass

    _once(monkeypatch, StepDriver, "step", Interrupt("stop"), on_call=2)
    pj = _pj()
    # the engine thread re-raises it after failing its jobs; keep pytest's thread-exception hook quiet
    monkeypatch.setattr("threading.excepthook", lambda args: None)
    with pytest.raises(Interrupt) as info:
        pj.generate_batch(PROMPTS, **RUN)
    assert not hasattr(info.value, "rows")
    pj.close()
