"""The Session base class against a backend that fails or breaks the contract.

- A ``_forward_many`` that raises after writing part of its calls is undone
  (each view truncated to its length before the call), so the engine's
  request-by-request retry of a failed batch decodes from clean contexts: the
  rows equal a clean run. Before, the retry appended the tokens a second time
  and the rows came back different, with no error.
- What ``_forward_many`` returns is checked once, in the base class: a wrong
  count or shape is a :class:`PluginError` naming the session class, not an
  ``IndexError`` deep in the core.
"""

from __future__ import annotations

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend, ToySession
from personajudge.core.errors import PluginError, SessionError

PREFS = ["concise", "humor"]
PROMPTS = ["hello there", "bye now", "x"]


class FlakySession(ToySession):
    """Writes every call's tokens, then raises on the backend's ``fail_on``-th forward of more than
    ``retried`` calls (so the engine's retries, one request's calls each, go through)."""

    def _forward_many(self, calls):
        outs = super()._forward_many(calls)
        b = self.backend
        if len(calls) > b.retried:
            b.batched += 1
            if b.batched in b.fail_on:
                raise RuntimeError(f"device lost at forward {b.forward_calls}")
        return outs


class FlakyToy(ToyBackend):
    def __init__(self, fail_on=(), retried=0):
        super().__init__()
        self.fail_on, self.retried, self.batched = set(fail_on), retried, 0

    def open(self, n_views):
        return FlakySession(self, n_views)


class ShapeBug(ToySession):
    """Returns what ``bug`` makes of the correct outputs."""

    bug = staticmethod(lambda outs, calls: outs)

    def _forward_many(self, calls):
        return type(self).bug(super()._forward_many(calls), calls)


def test_a_failed_forward_is_undone_view_by_view():
    b = FlakyToy(fail_on={2})
    with b.open(2) as s:
        s.forward_many([(0, [1, 2, 3], 1), (1, [4, 5], 1)])
        with pytest.raises(RuntimeError, match="device lost"):
            s.forward_many([(0, [6, 7], 1), (1, [8], 1)])
        assert [s.length(0), s.length(1)] == [3, 2] and s._ctx == [[1, 2, 3], [4, 5]]
        again = s.forward_many([(0, [6, 7], 1), (1, [8], 1)])  # the retry sees the contexts of before
    with ToyBackend().open(2) as clean:
        want = clean.forward_many([(0, [1, 2, 3, 6, 7], 1), (1, [4, 5, 8], 1)])
    for got, ref in zip(again, want):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("fail_on", [{3}, {2, 5, 9}])
def test_a_batch_whose_forward_fails_once_equals_a_clean_batch(fail_on):
    """The engine retries a failed batched forward request by request: the rows must be a clean run's."""
    cfg = {"backend": {"name": "toy"}, "encoder": "plain"}
    with PersonaJudge(cfg, backend=ToyBackend()) as pj:
        want = [r.text for r in pj.generate_batch(PROMPTS, preferences=PREFS, seed=1, max_new_tokens=16)]
    flaky = FlakyToy(fail_on=fail_on, retried=2)  # two views: a request's own forward has 2 calls
    with PersonaJudge(cfg, backend=flaky) as pj:
        got = [r.text for r in pj.generate_batch(PROMPTS, preferences=PREFS, seed=1, max_new_tokens=16)]
    assert flaky.batched > max(fail_on)  # the failures happened mid-batch, and the batch went on
    assert got == want


@pytest.mark.parametrize(
    "bug, needle",
    [
        (lambda outs, calls: outs[:-1], r"returned 1 result\(s\) for 2 call\(s\)"),
        (lambda outs, calls: outs[0], r"returned ndarray for 2 call\(s\)"),
        (lambda outs, calls: [o[0] for o in outs], r"returned logits of shape \(33,\) for view 0"),
        (
            lambda outs, calls: [np.zeros((3, 33), np.float32) for _ in outs],
            r"returned logits of shape \(3, 33\) for view 0; the contract is \(1, >= 33\)",
        ),
        (lambda outs, calls: [o[:, :10] for o in outs], r"returned logits of shape \(1, 10\)"),
        (lambda outs, calls: [o.tolist() for o in outs], "returned a list for view 0, not an array"),
    ],
    ids=["too-few", "not-a-list", "1-d", "all-positions", "narrow", "lists"],
)
def test_what_forward_many_returns_is_checked_and_undone(bug, needle):
    ShapeBug.bug = staticmethod(bug)
    s = ShapeBug(ToyBackend(), 2)
    with pytest.raises(PluginError, match=f"ShapeBug._forward_many {needle}"):
        s.forward_many([(0, [1, 2, 3], 1), (1, [4, 5], 1)])
    assert [s.length(0), s.length(1)] == [0, 0] and s._ctx == [[], []]


def test_a_session_whose_undo_fails_is_closed():
    class Stuck(FlakySession):
        def _truncate(self, view, length):
            raise RuntimeError("cannot roll back")

    b = FlakyToy(fail_on={1})
    s = Stuck(b, 1)
    with pytest.raises(RuntimeError, match="device lost"):  # the original error, not the undo's
        s.forward_many([(0, [1, 2], 1)])
    assert s.closed
    with pytest.raises(SessionError, match="closed"):
        s.forward_many([(0, [1, 2], 1)])


def test_a_closed_toy_backend_refuses_sessions_and_requests():
    """As llama.cpp and hf do: the README's "a closed backend raises SessionError" holds for the toy too."""
    backend = ToyBackend()
    with PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=backend) as pj:
        assert pj.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=0).tokens
    with pytest.raises(SessionError, match="closed"):  # the last close() closed the backend
        backend.open(2)
    with PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=backend) as pj:
        with pytest.raises(SessionError, match="closed"):
            pj.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=0)


def test_numpy_integers_are_integers_and_bools_are_not():
    """View numbers, ``n_logits`` and truncate lengths a caller computed with numpy are read as ints (they
    were refused: ``view np.int64(0) is out of range``); a bool is still no number, as in the engine."""
    b = ToyBackend()
    ids = b.tokenizer.encode("hello")
    with b.open(2) as s, b.open(2) as t:
        want = s.forward(1, ids, 2)
        got = t.forward(np.int64(1), [np.int32(i) for i in ids], np.int64(2))
        assert np.array_equal(np.asarray(want), np.asarray(got))
        t.truncate(np.int64(1), np.int64(2))
        assert t.length(np.int64(1)) == 2 and type(t.length(1)) is int
        for bad_view in (True, 1.0, "1", np.float64(1.0), np.int64(2), -1):
            with pytest.raises(SessionError, match="is out of range; the session has views 0..1"):
                t.truncate(bad_view, 0)
        for bad_length in (True, 1.5, np.int64(-1)):
            with pytest.raises(SessionError, match="truncate length must be a non-negative integer"):
                t.truncate(0, bad_length)
        with pytest.raises(SessionError, match=r"n_logits must be in 0\.\.1 for 1 token\(s\), got True"):
            t.forward(0, [1], True)
