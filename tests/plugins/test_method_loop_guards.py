"""A method's loop that breaks the loop protocol fails its own request with one PluginError naming the method.

Why these tests exist (an audit of what a third-party ``loop(request)`` could do to the drivers):

- an op on a view the request does not have (``Forward([ForwardCall(7, [1], 1)])``, ``Truncate(9, 0)``)
  was a raw ``IndexError`` out of the engine's step, which failed *every* request in that step and
  was a traceback at the command line; view -1 silently named another view of the request;
- a token id the model has none for, or a negative truncate length, was the session's one line, but
  it named a slot of the shared session, not the method;
- a loop that returned before its answer was done was reported as ``finish_reason: "length"``;
- a loop that only ever truncated spun at 100% CPU for ever (the bound is lowered here, so that a
  test that would hang is stopped by the guard in milliseconds).

The built-in methods must meet none of these guards: they are run here with the idle bound at 2.
"""

import re

import numpy as np
import pytest
from cli_lines import one_line, run_main
from plugin_modules import hook_module

import personajudge as pj
from personajudge.backends.toy import ToyBackend
from personajudge.core import decoding
from personajudge.core.config import BackendConfig
from personajudge.core.decoding import Forward, StepDriver, Truncate, drive
from personajudge.core.errors import PluginError, SessionError
from personajudge.engine import Job
from personajudge.plugins import register_plugin, unregister_plugin

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
PREFS = ["concise", "humor"]  # two views
RUN = {"preferences": PREFS, "max_new_tokens": 50, "seed": 1}
#: the idle bound in these tests: a spinning loop is stopped after this many ops, not 10,000
LOW_BOUND = 50


def _plan(self, views):
    return [list(v) for v in views] or [[]]


def _method_class(name, body, **extra):
    """A method plugin class named ``name`` whose ``loop(req)`` is ``body(req)`` (a generator function)."""
    attrs = {"name": name, "description": "a loop that breaks the protocol (a test plugin)", "plan": _plan}
    return type(name, (), {"loop": lambda self, req: body(req), **attrs, **extra})


@pytest.fixture
def method():
    """Register a method plugin for one test (``method(name, body)``); unregister it after."""
    done = []

    def reg(name, body, **extra):
        cls = _method_class(name, body, **extra)
        plugin = hook_module("loop_guards", register_methods=lambda register: register(cls))
        register_plugin(plugin)
        done.append(plugin)
        return name

    yield reg
    for plugin in done:
        unregister_plugin(plugin)


@pytest.fixture
def low_bound(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_IDLE_OPS", LOW_BOUND)


def _feed(req):
    """Feed view 0 its prompt; the logits back (the first op of most loops here)."""
    return (yield Forward([pj.ForwardCall(0, list(req.contexts[0]), 1)]))


def _forward_view_7(req):
    yield Forward([pj.ForwardCall(7, [1], 1)])


def _truncate_view_9(req):
    yield from _feed(req)
    yield Truncate(9, 0)


def _forward_view_minus_1(req):
    yield Forward([pj.ForwardCall(-1, [1], 1)])


def _bad_token(req):
    yield Forward([pj.ForwardCall(0, list(req.contexts[0]) + [10**6], 1)])


def _negative_truncate(req):
    yield from _feed(req)
    yield Truncate(0, -1)


def _two_then_return(req):
    """Pushes two tokens, then returns with max_new_tokens still far off."""
    yield from _feed(req)
    for _ in range(2):
        assert req.emitter.push(5)  # "d": neither an end of text nor a stop
        yield Forward([pj.ForwardCall(0, [5], 1)])


def _returns_at_once(req):
    return
    yield  # a generator function all the same


def _truncates_forever(req):
    yield from _feed(req)
    while True:
        yield Truncate(0, 1)


def _forwards_nothing_forever(req):
    yield from _feed(req)
    while True:
        yield Forward([])


def _feeds_and_rolls_back_forever(req):
    """Each Forward is progress to the idle bound, but the Truncate after it undoes it: no token is ever committed."""
    yield from _feed(req)
    n = len(req.contexts[0])
    while True:
        yield Forward([pj.ForwardCall(0, [5], 1)])
        yield Truncate(0, n)


def _plain_to_the_end(req):
    """A correct loop: the plain sampler's, ended by the emitter."""
    yield from decoding.plain_loop(req)


def _one_plugin_error(err, name, pattern):
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"method '{name}' ({name}, from "), msg
    assert re.search(pattern, msg), msg


# --- 1. a view the request does not have; a bad token id; a negative truncate length ------------------------

BAD_OPS = [
    (
        "guard-forward-7",
        _forward_view_7,
        r"\.loop yielded a Forward for view 7, but the request has 2 views \(0\.\.1\)$",
    ),
    ("guard-truncate-9", _truncate_view_9, r"\.loop yielded Truncate\(9, 0\) for view 9, but the request has 2 views"),
    ("guard-forward-neg", _forward_view_minus_1, r"\.loop yielded a Forward for view -1, but the request has 2 views"),
    (
        "guard-bad-token",
        _bad_token,
        r"\.loop yielded a Forward of token id 1000000 on view 0; the model's ids are 0\.\.32$",
    ),
    ("guard-neg-truncate", _negative_truncate, r"\.loop yielded Truncate\(0, -1\); a truncate length is an int >= 0"),
]


@pytest.mark.parametrize("name,body,pattern", BAD_OPS, ids=[b[0] for b in BAD_OPS])
def test_a_bad_op_is_one_plugin_error_naming_the_method_and_the_engine_goes_on(method, name, body, pattern):
    method(name, body)
    with pj.PersonaJudge(TOY) as m:
        with pytest.raises(PluginError) as err:
            m.generate("hi", method=name, **RUN)
        _one_plugin_error(err, name, pattern)
        assert len(m.generate("hi", **{**RUN, "max_new_tokens": 6}).tokens) == 6  # the engine still serves


def test_the_one_shot_api_raises_it_too(method):
    method("guard-oneshot", _forward_view_7)
    with pytest.raises(PluginError, match=r"method 'guard-oneshot' .*view 7, but the request has 2 views"):
        pj.generate("hi", config=TOY, method="guard-oneshot", **RUN)


def test_at_the_cli_it_is_one_line_and_exit_2(method, capsys):
    method("guard-cli", _forward_view_7)
    argv = ["generate", "hi", "--backend", "toy", "--method", "guard-cli", "--prefer", "concise", "--prefer", "humor"]
    code, _, err = run_main([*argv, "--max-new-tokens", "5", "--seed", "1"], capsys)
    one_line(code, err, "method 'guard-cli' (guard-cli, from ", "view 7, but the request has 2 views (0..1)")


def test_the_step_driver_fails_only_the_request_whose_op_names_a_view_it_lacks():
    """Below the engine, too: a raw loop's view out of range is its own SessionError, not the step's IndexError."""
    backend = ToyBackend()
    ctx = backend.tokenizer.encode("hello")

    def good():
        yield Forward([pj.ForwardCall(0, ctx, 1)])
        yield Forward([pj.ForwardCall(1, ctx, 1)])

    def bad():
        yield Forward([pj.ForwardCall(7, [1], 1)])

    with backend.open(4) as session:
        driver = StepDriver(session)
        assert driver.add("good", good(), [0, 1]) and driver.add("bad", bad(), [2, 3])
        finished, failed = driver.step()
        assert list(failed) == ["bad"] and isinstance(failed["bad"], SessionError), failed
        assert "view 7 is out of range; the request has views 0..1" in str(failed["bad"])
        assert driver.step() == (["good"], {})


def _numpy_ops(loop):
    """``loop``'s ops with every view number, token id, ``n_logits`` and truncate length a numpy int."""
    value = None
    try:
        while True:
            op = loop.send(value)
            if isinstance(op, Truncate):
                op = Truncate(np.int64(op.view), np.int64(op.length))
            else:
                op = Forward(
                    [pj.ForwardCall(np.int64(v), [np.int64(t) for t in ts], np.int64(n)) for v, ts, n in op.calls]
                )
            value = yield op
    except StopIteration:
        return


@pytest.mark.parametrize("own_decode", [False, True], ids=["loop", "decode-drive"])
def test_numpy_integers_in_ops_are_integers_in_the_engine_and_in_drive(method, monkeypatch, own_decode):
    """A loop that computes its view numbers or lengths with numpy (``np.argmax``, ``arr.size``): the engine
    took a numpy view but refused a numpy truncate length, and the session (``drive``, a method's own
    ``decode``) refused both. Now both read them as ints: the windowed schedule (which truncates) with every
    number a numpy int gives exactly the built-in's answer."""
    monkeypatch.setenv("PERSONAJUDGE_BATCHED", "0")
    extra = (
        {"batchable": False, "decode": lambda self, session, req: drive(session, self.loop(req))} if own_decode else {}
    )
    name = method(f"guard-numpy-{own_decode}", lambda req: _numpy_ops(decoding.persona_judge_loop(req)), **extra)
    run = {**RUN, "max_new_tokens": 24, "schedule": "windowed", "lam": 3}
    with pj.PersonaJudge(TOY) as m:
        want = m.generate("hi", **run)
        got = m.generate("hi", method=name, **run)
    assert want.stats.acceptance_rate < 1  # rollbacks happened: the truncates ran
    assert (got.tokens, got.finish_reason) == (want.tokens, want.finish_reason)


# --- 2. a loop that ends before its answer did -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body,told", [(_two_then_return, "2 of at most 50 tokens"), (_returns_at_once, "0 of at most 50 tokens")]
)
def test_a_loop_that_ends_early_is_an_error_not_a_length_finish(method, body, told):
    name = method(f"guard-early-{body.__name__.strip('_')}", body)
    with pj.PersonaJudge(TOY) as m, pytest.raises(PluginError) as err:
        m.generate("hi", method=name, **RUN)
    _one_plugin_error(err, name, rf"\.loop ended before the answer finished \({told}; no end of text, stop or full")


def test_a_loop_that_ends_with_its_emitter_is_fine(method):
    name = method("guard-plain", _plain_to_the_end)
    with pj.PersonaJudge(TOY) as m:
        out = m.generate("hi", method=name, **{**RUN, "max_new_tokens": 7})
    assert len(out.tokens) == 7 and out.finish_reason == "length"


def test_a_decode_of_its_own_that_ends_early_is_an_error_too(method):
    """A method that runs alone (its own ``decode``) is checked when its decode returns."""
    name = method(
        "guard-early-decode",
        _two_then_return,
        batchable=False,
        decode=lambda self, session, req: drive(session, self.loop(req)),
    )
    with pj.PersonaJudge(TOY) as m, pytest.raises(PluginError) as err:
        m.generate("hi", method=name, **RUN)
    _one_plugin_error(err, name, r"\.decode ended before the answer finished \(2 of at most 50 tokens")


def test_a_decode_of_its_own_that_raises_is_one_plugin_error_naming_it(method):
    """A third-party ``decode``'s exception reached the caller raw (a traceback at the command line)."""

    def decode(self, session, req):
        raise ValueError("no decoding today")

    name = method("guard-raising-decode", _two_then_return, batchable=False, decode=decode)
    with pj.PersonaJudge(TOY) as m, pytest.raises(PluginError) as err:
        m.generate("hi", method=name, **RUN)
    _one_plugin_error(err, name, r"\.decode raised ValueError: no decoding today")
    with pj.PersonaJudge(TOY) as m:  # the engine serves the next request
        assert len(m.generate("hi", **{**RUN, "max_new_tokens": 3}).tokens) == 3


# --- 3. a loop that never makes progress -----------------------------------------------------------------------


@pytest.mark.timeout(30)  # before the guard these spun for ever
@pytest.mark.parametrize("body", [_truncates_forever, _forwards_nothing_forever])
def test_a_loop_that_never_makes_progress_is_stopped(method, low_bound, body):
    name = method(f"guard-spin-{body.__name__.strip('_')}", body)
    with pj.PersonaJudge(TOY) as m, pytest.raises(PluginError) as err:
        m.generate("hi", method=name, **RUN)
    _one_plugin_error(err, name, rf"\.loop yielded {LOW_BOUND + 1} operations in a row without feeding a token")


@pytest.mark.timeout(30)
def test_a_loop_that_feeds_and_rolls_back_for_ever_is_stopped(method, monkeypatch):
    """Before the per-token bound this spun for ever: every other op is a forward, so the idle bound never
    fired. It is stopped after ``MAX_OPS_PER_TOKEN`` ops without a committed token, and the engine goes on."""
    monkeypatch.setattr(decoding, "MAX_OPS_PER_TOKEN", LOW_BOUND)
    name = method("guard-spin-rollback", _feeds_and_rolls_back_forever)
    with pj.PersonaJudge(TOY) as m:
        with pytest.raises(PluginError) as err:
            m.generate("hi", method=name, **RUN)
        _one_plugin_error(err, name, rf"\.loop yielded {LOW_BOUND + 1} operations in a row without committing a token")
        assert f"within {LOW_BOUND} operations" in str(err.value)
        assert len(m.generate("hi", **{**RUN, "max_new_tokens": 4}).tokens) == 4


@pytest.mark.timeout(30)
def test_drive_stops_a_loop_that_never_makes_progress(low_bound):
    """A method's own ``decode`` drives its loop through ``drive``: the same bound, naming the loop."""
    backend = ToyBackend()
    req = type("Req", (), {"contexts": [backend.tokenizer.encode("hello")]})()
    with backend.open(1) as session, pytest.raises(PluginError, match=r"the loop _truncates_forever yielded 51 "):
        drive(session, _truncates_forever(req))


# --- the engine: the bad request fails alone ---------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [_forward_view_7, _truncate_view_9, _two_then_return, _truncates_forever])
def test_in_the_engine_the_bad_request_fails_alone(method, low_bound, body):
    """Submitted together, so both join the same step: before, a view out of range failed the good
    request with the bad one's IndexError."""
    name = method(f"guard-engine-{body.__name__.strip('_')}", body)
    with pj.PersonaJudge(TOY) as m:
        want = m.generate("hi", preferences=PREFS, max_new_tokens=40, seed=3)
        jobs = []
        for meth_name, seed in ((None, 3), (name, 1)):
            cfg, meth, views = m._prepare(PREFS, None, meth_name, {"max_new_tokens": 40, "seed": seed})
            jobs.append(Job(m._request(m.encode_views("hi", cfg, meth, views), cfg, seed), meth))
        m.engine.reserve(4)
        good, bad = m.engine.submit_many(jobs)
        with pytest.raises(PluginError, match=rf"method '{name}' "):
            bad.result()
        assert good.result().tokens == want.tokens


# --- no built-in method meets a guard ---------------------------------------------------------------------


BUILTINS = [
    ("persona-judge", {}),
    ("persona-judge", {"schedule": "windowed"}),  # the one that truncates: two rollbacks in a row at most
    ("persona-judge-base", {}),
    ("prompt", {}),
    ("base", {}),
    ("mod", {}),
    ("pad", {}),
    ("reference", {}),
]


@pytest.mark.parametrize("batched", ["1", "0"])
@pytest.mark.parametrize("name,kw", BUILTINS, ids=[f"{n}-{'-'.join(k.values()) or 'default'}" for n, k in BUILTINS])
def test_builtin_methods_end_as_before_with_the_tightest_idle_bound(monkeypatch, batched, name, kw):
    """At the length limit, exactly; and at the context's end, with "context". The idle bound at 2:
    no built-in loop yields more than two ops in a row without feeding or committing a token; and
    none yields more than 16 without committing one (``lam=3``: a window's forwards, its check, two rollbacks). (With
    ``PERSONAJUDGE_BATCHED=1`` persona-judge's interleaved schedule runs in the batched judge, which
    yields no loop ops, so there only the ends are checked.)"""
    monkeypatch.setattr(decoding, "MAX_IDLE_OPS", 2)
    monkeypatch.setattr(decoding, "MAX_OPS_PER_TOKEN", 16)
    monkeypatch.setenv("PERSONAJUDGE_BATCHED", batched)
    prefs = [] if name == "base" else PREFS
    with pj.PersonaJudge(TOY) as m:
        out = m.generate("hi", method=name, preferences=prefs, max_new_tokens=9, seed=2, lam=3, **kw)
        assert (len(out.tokens), out.finish_reason) == (9, "length")
        longest = max(m.view_lengths("hi", method=name, preferences=prefs, seed=2))
    small = {**TOY, "backend": {"name": "toy", "n_ctx": longest + 6}}
    with pj.PersonaJudge(small, backend=ToyBackend(BackendConfig(name="toy", n_ctx=longest + 6))) as m:
        out = m.generate("hi", method=name, preferences=prefs, max_new_tokens=50, seed=2, lam=3, **kw)
    assert (out.finish_reason, len(out.tokens)) == ("context", 6)
