"""A backend whose ``Session.truncate`` raises fails only the request it belongs to.

The engine empties a request's slots when it leaves (``StepDriver.remove``: ``truncate(slot, 0)``) and
the windowed schedule rolls its views back (a ``Truncate`` op in ``StepDriver.step``). A truncate that
raises there used to fail the request *and* hand its slot, still holding that request's KV, to the next
request: that one then decoded on top of another's context (wrong tokens, in silence) and failed at its
own end, and so on for every request the slot went to. Now the request fails alone, with the backend's
one-line :class:`PluginError`; the slot is quarantined until a later truncate empties it (the engine tries
again between steps, backing off) or the session is reopened; every other row gives exactly the tokens it
gives alone, and a server that is never idle gets its whole batch back.

The failing backend is a toy registered as a third-party plugin, so its session is the engine's guarded
one (``plugins.manager.open_session``), as a real plugin's would be.
"""

import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.decoding import StepDriver
from personajudge.core.errors import PluginError
from personajudge.engine import Job
from personajudge.plugins import hookimpl, register_plugin, unregister_plugin

PROMPTS = ["tell me about owls", "why is the sky blue", "how do bees make honey", "what is a prime number"]
PREFS = ["concise", "humor"]
KW = dict(lam=3, seed=0)


class TruncateFailsToy(ToyBackend):
    """A toy whose sessions' ``truncate`` of ``bad`` raises the first ``times`` times: to empty it (``length
    == 0``) or, with ``rollback``, to roll it back (``length > 0``). It records every forward into a slot
    whose truncate failed and that was not emptied since, on the session where it failed (a slot handed
    out dirty)."""

    name = "truncate-fails-toy"

    def __init__(self, config=None, bad: int = 2, rollback: bool = False, times: int = 1):
        super().__init__(config)
        self.bad, self.rollback, self.times = bad, rollback, times
        self.failed: list[tuple[int, int]] = []  # (slot, length) of each truncate that raised
        self.reused: list[int] = []  # slots fed after their truncate failed, on that session
        self.opened = 0

    def open(self, n_views):
        s = super().open(n_views)
        self.opened += 1
        truncate, forward_many, dirty = s._truncate, s._forward_many, set()

        def failing_truncate(view, length):
            if view == self.bad and (length > 0) == self.rollback and len(self.failed) < self.times:
                self.failed.append((view, length))
                dirty.add(view)
                raise RuntimeError(f"slot {view} is stuck")
            truncate(view, length)
            if length == 0:
                dirty.discard(view)

        def watched_forward_many(calls):
            self.reused += [c.view for c in calls if c.view in dirty]
            return forward_many(calls)

        s._truncate, s._forward_many = failing_truncate, watched_forward_many
        return s


class _Plugin:
    @hookimpl
    def register_backends(self, register):
        register(TruncateFailsToy)


@pytest.fixture(autouse=True)
def third_party():
    """``TruncateFailsToy`` registered as a third-party backend (its session's errors are PluginErrors)."""
    plugin = _Plugin()
    register_plugin(plugin, name="truncate-fails-plugin")
    yield
    unregister_plugin(plugin)


def _pj(backend, **kw):
    return PersonaJudge({"backend": {"name": "truncate-fails-toy"}, "encoder": "plain"}, backend=backend, **kw)


def _request(pj, prompt, seed, **kw):
    cfg, meth, views = pj._prepare(PREFS, None, None, {**KW, "seed": seed, **kw})
    return pj._request(pj.encode_views(prompt, cfg, meth, views), cfg, seed), meth


def _alone(prompt, seed, **kw):
    """The request decoded by the core alone, on its own session of a toy that never fails."""
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=ToyBackend())
    req, meth = _request(pj, prompt, seed, **kw)
    with pj.backend.open(len(req.contexts)) as s:
        meth.decode(s, req)
    return req.emitter.tokens


def _batch(pj, lengths, **kw):
    """One job per length, queued under one lock (the first ``max_batch`` join the same step, on slots
    in order; the rest as places free); each job's outcome: its tokens, or its exception."""
    jobs = []
    for i, n in enumerate(lengths):
        req, meth = _request(pj, PROMPTS[i % len(PROMPTS)], i, max_new_tokens=n, **kw)
        jobs.append(Job(req, meth))
    pj.engine.submit_many(jobs)
    out = []
    for job in jobs:
        try:
            out.append(job.result().tokens)
        except Exception as err:
            out.append(err)
    return out


@pytest.mark.parametrize(
    "rollback, schedule",
    [(False, "interleaved"), (False, "windowed"), (True, "windowed")],
    ids=["leaving", "leaving-windowed", "rollback"],
)
def test_a_truncate_that_raises_fails_its_request_alone_and_its_slot_is_never_reused(rollback, schedule):
    """Three requests of two views run together on a session of eight slots (request 1 on slots 2 and 3);
    a fourth waits for a place. Slot 2's truncate raises once: as request 1 leaves (it is the shortest),
    or at one of its rollbacks (``rollback``, the windowed schedule's ``Truncate``). Request 1 fails with
    the backend's PluginError; the others, the fourth included (it joins the same session as request 1
    leaves), give exactly their tokens alone, and nothing is fed into slot 2 again on that session."""
    be = TruncateFailsToy(rollback=rollback)
    pj = _pj(be, max_batch=3)
    assert pj.engine.reserve(8) == 8  # room for the fourth beside the two that still run
    lengths = [40, 8, 40, 30]
    out = _batch(pj, lengths, schedule=schedule)
    assert be.opened == 2  # reserve's, then the engine's: all four ran on one session
    assert len(be.failed) == 1 and be.failed[0][0] == 2
    err = out[1]
    assert isinstance(err, PluginError), err
    assert "'truncate-fails-toy'" in str(err) and "session.truncate raised RuntimeError: slot 2 is stuck" in str(err)
    for i in (0, 2, 3):
        assert out[i] == _alone(PROMPTS[i], i, max_new_tokens=lengths[i], schedule=schedule), i
    assert be.reused == []
    stats = pj.engine.stats()
    assert stats["running"] == stats["slots_in_use"] == stats["queued"] == 0
    assert pj.generate(PROMPTS[1], preferences=PREFS, **{**KW, "seed": 1, "max_new_tokens": 8}).tokens == _alone(
        PROMPTS[1], 1, max_new_tokens=8
    )  # the engine goes on, on a fresh session
    pj.close()


def test_generate_batch_raises_the_backends_plugin_error_and_the_next_call_is_exact():
    """The Python API's batch: a row whose truncate fails raises its PluginError (any error but a
    NumericalError fails ``generate_batch`` at once); the next call's rows are each as they are alone."""
    be = TruncateFailsToy(bad=0)
    pj = _pj(be)
    run = dict(preferences=PREFS, max_new_tokens=12, **KW)
    with pytest.raises(PluginError, match="session.truncate raised RuntimeError: slot 0 is stuck"):
        pj.generate_batch(PROMPTS, seeds=[0, 1, 2, 3], **run)
    res = pj.generate_batch(PROMPTS, seeds=[0, 1, 2, 3], **run)
    assert [r.tokens for r in res] == [_alone(p, s, max_new_tokens=12) for s, p in enumerate(PROMPTS)]
    assert be.reused == []
    pj.close()


def test_step_driver_empties_every_slot_and_quarantines_the_one_that_failed(toy):
    """``remove`` tries every slot of the request even after one fails, raises that failure (for this
    request alone), and refuses the failed slot to a later request on the same session."""
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=toy)
    req, meth = _request(pj, PROMPTS[0], 0, max_new_tokens=6)
    session = toy.open(4)
    truncate = session._truncate

    def failing(view, length):
        if view == 0:
            raise RuntimeError("slot 0 is stuck")
        truncate(view, length)

    session._truncate = failing
    driver = StepDriver(session)
    assert driver.add("a", meth.loop(req), [0, 1])
    driver.step()
    assert session.length(0) > 0 and session.length(1) > 0
    with pytest.raises(RuntimeError, match="slot 0 is stuck"):
        driver.remove("a")
    assert session.length(1) == 0  # emptied, though slot 0 before it failed
    assert driver.dirty == {0}
    req2, _ = _request(pj, PROMPTS[1], 1, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"slot\(s\) 0 could not be emptied"):
        driver.add("b", meth.loop(req2), [0, 2])
    assert "b" not in driver


@pytest.mark.parametrize("times", [1, 3])
def test_under_steady_load_a_stuck_slot_comes_back_once_its_truncate_succeeds(times):
    """Two requests of two views run at once, on a session of four slots (request 1 on slots 2 and 3); ten
    more wait, so the engine is never idle until the end. Slot 2's truncate raises as request 1 leaves,
    and ``times - 1`` more times after (the engine's retries between steps). Before, slot 2 stayed out
    until the engine was idle: three clean slots, so one request at a time for the whole queue. Now two
    run at once again once a retry empties it, on the same session; request 1 alone fails, every other
    request gives exactly its tokens alone, and nothing is fed into slot 2 while it may hold request 1's."""
    be = TruncateFailsToy(times=times)
    pj = _pj(be, max_batch=2)
    sizes: list[tuple[int, int]] = []  # per step: the requests in it, and the truncates failed by its end
    pj.engine.on_step = lambda n, _seconds: sizes.append((n, len(be.failed)))
    lengths = [40, 8] + [12] * 10
    out = _batch(pj, lengths)
    assert be.failed == [(2, 0)] * times  # the retries of a failed truncate are counted there too
    assert isinstance(out[1], PluginError), out[1]
    for i, n in enumerate(lengths):
        if i != 1:
            assert out[i] == _alone(PROMPTS[i % len(PROMPTS)], i, max_new_tokens=n), i
    assert be.reused == []
    assert be.opened == 1  # one session throughout: never idle, never reopened
    first = next(i for i, (_n, failed) in enumerate(sizes) if failed)  # the step request 1 left in
    assert max(n for n, _failed in sizes[first + 1 :]) == 2  # the whole batch again, after the failure
    pj.close()


def test_step_driver_reclaims_a_dirty_slot_backing_off_while_its_truncate_fails(toy):
    """``reclaim`` tries a dirty slot's truncate one step after it failed, then after 2, 4, 8 steps while it
    still fails (never twice without a step between), and returns the slot, clean, once it succeeds."""
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=toy)
    session = toy.open(4)
    truncate = session._truncate
    tries: list[int] = []  # the driver step of each try to empty slot 0

    def failing(view, length):
        if view == 0 and length == 0:
            tries.append(driver.steps)
            if len(tries) <= 4:
                raise RuntimeError("slot 0 is stuck")
        truncate(view, length)

    session._truncate = failing
    driver = StepDriver(session)
    req, meth = _request(pj, PROMPTS[0], 0, max_new_tokens=6)
    assert driver.add("a", meth.loop(req), [0, 1])
    driver.step()
    with pytest.raises(RuntimeError, match="slot 0 is stuck"):
        driver.remove("a")
    assert driver.dirty == {0} and tries == [1]
    req2, _ = _request(pj, PROMPTS[1], 1, max_new_tokens=40)
    assert driver.add("b", meth.loop(req2), [2, 3])
    reclaimed = {}
    while "b" in driver and driver.steps < 20:
        driver.step()
        for _ in range(3):  # called again without a step: nothing is due
            if clean := driver.reclaim():
                reclaimed[driver.steps] = clean
    assert tries == [1, 2, 4, 8, 16]
    assert reclaimed == {16: [0]} and driver.dirty == set()
    assert session.length(0) == 0
    req3, _ = _request(pj, PROMPTS[2], 2, max_new_tokens=6)
    assert driver.add("c", meth.loop(req3), [0, 1])  # clean again: it may be handed out
