"""What a README reader met (audit readme3, findings B and D): a plugin method written from the README's
description reports the forwards its loop ran, and an error about a plugin object registered at run time
names its class, not pluggy's ``str(id(obj))``."""

import re

import numpy as np
import pytest
from plugin_modules import hook_module

import personajudge as pj
from personajudge.core.decoding import Forward
from personajudge.core.errors import PluginError
from personajudge.plugins import register_plugin, unregister_plugin

PREFS = ["concise", "humor"]


class GreedyAll:
    """A greedy method as the README describes one (plan + loop, no decode), which keeps no stats of its
    own: it counts the ``Forward`` operations it yields in ``self.yielded``, independently of the engine."""

    name = "greedy-uncounted"
    description = "every preference in one view, argmax (a test plugin)"

    def __init__(self):
        self.yielded = 0

    def plan(self, views):
        return [[p for v in views for p in v]]

    def loop(self, req):
        self.yielded += 1
        out = yield Forward([pj.ForwardCall(0, list(req.contexts[0]), 1)])
        while True:
            tok = int(np.argmax(np.asarray(out[0])[-1]))
            if not req.emitter.push(tok):
                return
            self.yielded += 1
            out = yield Forward([pj.ForwardCall(0, [tok], 1)])


@pytest.fixture
def greedy():
    """GreedyAll registered for one test; the list of the instances the runs made of it."""
    made = []
    cls = type("GreedyAll", (GreedyAll,), {"__init__": lambda self: (GreedyAll.__init__(self), made.append(self))[0]})
    plugin = hook_module("readme3_method", register_methods=lambda register: register(cls))
    register_plugin(plugin)
    yield made
    unregister_plugin(plugin)


def test_a_plugin_loop_that_keeps_no_count_reports_the_forwards_it_ran(greedy):
    with pj.PersonaJudge({"backend": {"name": "toy"}}) as m:
        res = m.generate("hi", preferences=PREFS, method="greedy-uncounted", max_new_tokens=7, seed=1)
    assert len(res.tokens) == 7
    (method,) = greedy
    assert method.yielded == 7  # the prompt, then one per token pushed before the last
    assert res.stats.forwards == method.yielded


def test_a_builtin_loops_own_count_is_unchanged():
    """``prompt`` runs the built-in plain loop, which counts one forward per ``Forward`` it yields: the
    engine's count agrees with it, so taking the larger adds nothing (one forward per token, as before)."""
    with pj.PersonaJudge({"backend": {"name": "toy"}}) as m:
        res = m.generate("hi", preferences=PREFS, method="prompt", max_new_tokens=6, seed=1)
    assert len(res.tokens) == 6 and res.stats.forwards == 6


class _BadStopPlugin:
    """A plugin *instance* (registered without ``name=``) whose encoder returns a bare string from stop_strings."""

    @pj.hookimpl
    def register_encoders(self, register):
        class BadStop:
            name = "badstop-readme3"
            description = "returns a str where a list is expected (a test plugin)"

            def render(self, view, conversation, tokenizer, *, system=None, options=None):
                return conversation[-1]["content"], True

            def stop_strings(self, tokenizer, options=None):
                return "\n"

        register(BadStop())


def test_an_error_about_an_instance_registered_at_run_time_names_its_class():
    plugin = _BadStopPlugin()
    register_plugin(plugin)
    try:
        with pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": "badstop-readme3"}) as m:
            with pytest.raises(PluginError) as err:
                m.generate("hi", preferences=PREFS, max_new_tokens=2, seed=1)
    finally:
        unregister_plugin(plugin)
    msg = str(err.value)
    assert "from _BadStopPlugin object (registered at run time)" in msg, msg
    assert not re.search(r"'\d{6,}'", msg), msg  # not pluggy's str(id(plugin))
