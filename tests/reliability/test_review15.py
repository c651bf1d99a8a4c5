"""Rows that fail together get an error object each (``core.errors.one_each``).

Two paths failed every row they held with one exception object: a step that raises as a whole
(``Engine._step``, a bug in the driver) and the batched judge raising for all its rows
(``StepDriver.step``, ``RowGroup.advance``). ``generate_batch`` marks the error it raises with
``.row`` and ``.rows``; with one object for two concurrent calls, the call that marked it last
overwrote the other's rows. Now each row's error is its own object of the same type and message.
"""

import threading
import time

import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.batched import BatchedJudge
from personajudge.core.decoding import StepDriver
from personajudge.core.errors import ContextLengthError, UnknownPluginError, one_each

RUN = dict(preferences=["concise", "humor"])


def _pj(backend=None):
    return PersonaJudge(
        {"backend": {"name": "toy"}, "encoder": "plain", "decoding": {"max_new_tokens": 64, "lambda": 3}},
        backend=backend or ToyBackend(),
    )


def _distinct_failures(err, message):
    failed = [r for r in err.rows if isinstance(r, BaseException)]
    assert len(failed) >= 2, "the test needs several rows failed together"
    assert len({id(r) for r in failed}) == len(failed)
    assert all(type(r) is type(err) and str(r) == message for r in failed)
    assert err.rows[err.row] is err
    return failed


def test_the_batched_judge_failing_gives_each_row_its_own_error(monkeypatch):
    real, calls = BatchedJudge.advance, []

    def advance(self, outs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a bug in the judge")
        return real(self, outs)

    monkeypatch.setattr(BatchedJudge, "advance", advance)
    pj = _pj()
    prompts = [f"question {i}" for i in range(6)]
    with pytest.raises(RuntimeError, match="a bug in the judge") as info:
        pj.generate_batch(prompts, seeds=list(range(6)), **RUN)
    _distinct_failures(info.value, "a bug in the judge")
    assert len(pj.generate_batch(prompts[:2], seeds=[0, 1], **RUN)) == 2  # the engine goes on
    pj.close()


def test_two_calls_failed_by_one_step_each_get_their_own_rows(monkeypatch):
    """Before: one object for both calls, so one call's ``.rows`` were the other call's."""
    release, real = threading.Event(), StepDriver.step
    state = {"first": True}

    def step(self):
        if state["first"]:  # hold the first step until both calls are queued
            state["first"] = False
            release.wait(30)
        elif len(self) == 5:  # both calls' rows in one step
            raise RuntimeError("a bug in the step")
        return real(self)

    monkeypatch.setattr(StepDriver, "step", step)
    pj = _pj()
    engine = pj.engine
    engine.reserve(10)  # room for both calls' rows (2 views each) in one session
    got: dict[str, BaseException] = {}

    def call(name, n):
        try:
            pj.generate_batch([f"{name} {i}" for i in range(n)], seeds=list(range(n)), **RUN)
        except RuntimeError as err:
            got[name] = err

    threads = [threading.Thread(target=call, args=(name, n)) for name, n in (("a", 2), ("b", 3))]
    threads[0].start()
    deadline = time.monotonic() + 30
    while engine.stats()["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads[1].start()
    while engine.stats()["queued"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(60)
    assert set(got) == {"a", "b"}
    assert len(got["a"].rows) == 2 and len(got["b"].rows) == 3
    assert got["a"] is not got["b"]
    pj.close()


@pytest.mark.parametrize(
    "err",
    [
        ValueError("x"),
        UnknownPluginError("backend", "nope", ["toy"]),
        ContextLengthError("too long", row=3),
        OSError(2, "no such file", "f"),
    ],
    ids=["plain", "init-with-other-parameters", "keyword-attributes", "oserror"],
)
def test_one_each_copies_keep_type_message_attributes_cause_and_traceback(err):
    try:
        raise err from KeyError("cause")
    except Exception as raised:
        err = raised
    errs = one_each(err, 3)
    assert errs[0] is err and len({id(e) for e in errs}) == 3
    for e in errs[1:]:
        assert type(e) is type(err) and str(e) == str(err) and vars(e) == vars(err)
        assert e.__cause__ is err.__cause__ and e.__traceback__ is err.__traceback__
    errs[1].rows = [1]
    assert not hasattr(err, "rows")


def test_one_each_shares_an_error_it_cannot_copy_rather_than_failing():
    """The failure path must not fail: a class whose ``__new__`` wants its own arguments is shared."""

    class Odd(Exception):
        def __new__(cls, a, b):
            return super().__new__(cls)

        def __init__(self, a, b):
            super().__init__(f"{a} and {b}")

    err = Odd(1, 2)
    assert one_each(err, 3) == [err, err, err]
