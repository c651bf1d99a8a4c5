"""A plugin cannot break the tool (audit prefs2, findings D, E, J): what a third-party plugin raises when it
is imported, when its hook runs, when its backend loads or when its encoder or method is used is one line
naming its distribution and entry point (a warning, or a PluginError and exit 2 where the user picked it),
and every other command keeps working. ``SystemExit`` counts; ``KeyboardInterrupt`` still interrupts.

Each plugin is installed as a fake distribution (a ``*.dist-info`` folder with ``entry_points.txt``, which
is all importlib.metadata needs) on ``sys.path``, with a plugin manager that has not loaded yet.
"""

import itertools
import re
import textwrap
import warnings
from pathlib import Path

import pytest
from cli_lines import one_line, run_main

import personajudge as pj
from personajudge.core.errors import ConfigError, PluginError
from personajudge.plugins import PluginWarning, manager, registry

_numbers = itertools.count()
TOY_RUN = ["--max-new-tokens", "3", "--seed", "1", "--prefer", "concise", "--prefer", "humor"]

PLUGIN = """
import os
from personajudge import hookimpl
from personajudge.backends.toy import ToyBackend
from personajudge.core.errors import ConfigError

{at_import}

class Card:
    name = "card-{n}"
    description = "A test encoder."

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        {in_render}
        return " ".join(p.instruction for p in view) + " " + conversation[-1]["content"], True

    def stop_strings(self, tokenizer, options=None):
        {in_stop}
        return ["\\n"]

class Wrap(ToyBackend):
    name = "wrap-{n}"

    def __init__(self, config):
        {in_init}
        super().__init__(config)

    def open(self, n_views):
        session = super().open(n_views)
        inner = session._forward_many

        def forward_many(calls):
            {in_forward}
            return inner(calls)

        session._forward_many = forward_many
        return session

class Flat:
    name = "flat-{n}"
    description = "A test method."

    def __init__(self, strength=1):
        {in_method_init}
        self.strength = strength

    def plan(self, views):
        {in_plan}
        return [[p for v in views for p in v]]

    def loop(self, req):
        {in_loop_call}
        return self._run(req)

    def _run(self, req):
        from personajudge.core.decoding import plain_loop
        inner, value, steps = plain_loop(req), None, 0
        while True:
            try:
                op = inner.send(value)
            except StopIteration:
                return
            steps += 1
            if steps == 2:
                {in_loop_run}
            value = yield op

@hookimpl
def register_encoders(register):
    {in_hook}
    register(Card)

@hookimpl
def register_backends(register):
    register(Wrap)

@hookimpl
def register_methods(register):
    register(Flat)
"""


def install(
    site: Path,
    *,
    at_import="",
    in_render="",
    in_stop="",
    in_init="",
    in_forward="",
    in_plan="",
    in_hook="",
    in_method_init="",
    in_loop_call="",
    in_loop_run="",
) -> dict:
    """Install one plugin (distribution ``pj-prefs2-N`` 0.3, entry point ``p2 = pj_prefs2_N``); its names."""
    n = next(_numbers)
    module, dist = f"pj_prefs2_{n}", f"pj-prefs2-{n}"
    code = PLUGIN.format(
        n=n,
        at_import=at_import,
        in_render=in_render or "pass",
        in_stop=in_stop or "pass",
        in_init=in_init or "pass",
        in_forward=in_forward or "pass",
        in_plan=in_plan or "pass",
        in_hook=in_hook or "pass",
        in_method_init=in_method_init or "pass",
        in_loop_call=in_loop_call or "pass",
        in_loop_run=in_loop_run or "pass",
    )
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[personajudge]\np2 = {module}\n")
    return {
        "where": f"{dist} 0.3, entry point 'p2 = {module}'",
        "encoder": f"card-{n}",
        "backend": f"wrap-{n}",
        "method": f"flat-{n}",
    }


def _plugin_warnings(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, PluginWarning)]


def _load_all():
    manager.get_plugin_manager()
    for kind in ("backend", "encoder", "method", "preference"):
        registry(kind)


def _one_line_plugin_error(err, plugin, what):
    msg = str(err.value)
    assert "\n" not in msg and plugin["where"] in msg, msg
    assert re.search(what, msg), msg
    return msg


# -- D: an encoder's render, a backend's constructor, a method's plan, raising -----------------------------


@pytest.mark.parametrize("exc", ['ValueError("exploded")', 'SystemExit("exploded")'])
def test_an_encoder_whose_render_raises_is_one_plugin_error(site, exc):
    plugin = install(site, in_render=f"raise {exc}")
    with pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": plugin["encoder"]}) as m:
        with pytest.raises(PluginError) as err:
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1)
        # the encoder works otherwise: the other encoders of the run are unaffected
        assert m.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1, encoder="plain").tokens
    msg = _one_line_plugin_error(err, plugin, rf"encoder '{plugin['encoder']}' \(Card, from .*\)\.render raised ")
    assert msg.endswith(f"{exc.split('(')[0]}: exploded")
    assert err.value.__cause__ is not None  # the original, for a debugger


def test_an_encoder_whose_stop_strings_raise_is_one_plugin_error(site):
    plugin = install(site, in_stop='raise KeyError("oops")')
    with pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": plugin["encoder"]}) as m:
        with pytest.raises(PluginError) as err:
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1)
    _one_line_plugin_error(err, plugin, r"\.stop_strings raised KeyError: 'oops'")


def test_a_typed_error_the_plugin_raises_itself_passes_through(site):
    plugin = install(site, in_render='raise ConfigError("card: the option x is bad")')
    with pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": plugin["encoder"]}) as m:
        with pytest.raises(ConfigError, match=r"^card: the option x is bad$"):
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1)


@pytest.mark.parametrize("exc", ['RuntimeError("no weights")', 'SystemExit("no weights")'])
def test_a_backend_whose_constructor_raises_is_one_plugin_error(site, exc):
    plugin = install(site, in_init=f"raise {exc}")
    with pytest.raises(PluginError) as err:
        pj.PersonaJudge({"backend": {"name": plugin["backend"]}})
    msg = _one_line_plugin_error(err, plugin, rf"backend '{plugin['backend']}' \(Wrap, from .*\) failed to load: ")
    assert msg.endswith(f"{exc.split('(')[0]}: no weights")
    with pj.PersonaJudge({"backend": {"name": "toy"}}) as m:  # the built-in backends still load
        assert len(m.generate("hi", preferences=["concise", "humor"], max_new_tokens=3, seed=1).tokens) == 3


def test_a_backend_whose_forward_raises_fails_that_request_with_one_plugin_error(site, monkeypatch):
    """An exception inside a third-party backend's forward pass names the backend and its distribution
    (not a traceback that reads as this project's bug); that request fails, the next one is served."""
    plugin = install(site, in_forward='if os.environ.get("PJ_FORWARD_FAILS"): raise IndexError("row 7 of 2")')
    run = {"preferences": ["concise", "humor"], "max_new_tokens": 3, "seed": 1}
    with pj.PersonaJudge({"backend": {"name": plugin["backend"]}}) as m:
        monkeypatch.setenv("PJ_FORWARD_FAILS", "1")
        with pytest.raises(PluginError) as err:
            m.generate("hi", **run)
        monkeypatch.delenv("PJ_FORWARD_FAILS")
        assert len(m.generate("hi", **run).tokens) == 3  # the engine goes on
    msg = _one_line_plugin_error(
        err, plugin, rf"backend '{plugin['backend']}' \(Wrap, from .*\)'s session\.forward_many raised "
    )
    assert msg.endswith("IndexError: row 7 of 2")
    assert isinstance(err.value.__cause__, IndexError)


def test_a_backend_whose_forward_raises_is_one_line_and_exit_2_at_the_cli(site, capsys):
    plugin = install(site, in_forward='raise IndexError("row 7 of 2")')
    code, _, err = run_main(["generate", "hi", "--backend", plugin["backend"], *TOY_RUN], capsys)
    one_line(
        code, err, f"personajudge: error: backend '{plugin['backend']}'", plugin["where"], "IndexError: row 7 of 2"
    )


def test_a_builtin_backends_forward_error_keeps_its_traceback(monkeypatch):
    """A built-in backend's exception is this project's bug: it is not dressed up as a plugin's."""
    from personajudge.backends.toy import ToySession

    def broken(self, calls):
        raise IndexError("a bug of ours")

    monkeypatch.setattr(ToySession, "_forward_many", broken)
    with pj.PersonaJudge({"backend": {"name": "toy"}}) as m:
        with pytest.raises(IndexError, match="a bug of ours"):
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=3, seed=1)


def test_a_method_whose_plan_raises_is_one_plugin_error(site):
    plugin = install(site, in_plan='raise TypeError("bad views")')
    with pj.PersonaJudge({"backend": {"name": "toy"}, "method": plugin["method"]}) as m:
        with pytest.raises(PluginError) as err:
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1)
    _one_line_plugin_error(
        err, plugin, rf"method '{plugin['method']}' \(Flat, from .*\)\.plan raised TypeError: bad views"
    )


@pytest.mark.parametrize("exc", ['ValueError("no strength")', 'SystemExit("no strength")'])
def test_a_method_whose_constructor_raises_is_one_plugin_error(site, exc):
    plugin = install(site, in_method_init=f"raise {exc}")
    with pytest.raises(PluginError) as err:
        pj.PersonaJudge({"backend": {"name": "toy"}, "method": plugin["method"]})
    msg = _one_line_plugin_error(err, plugin, rf"method '{plugin['method']}' \(Flat, from .*\) failed to construct: ")
    assert msg.endswith(f"{exc.split('(')[0]}: no strength")


def test_a_plugin_methods_unknown_option_is_still_a_config_error(site):
    """The constructor's TypeError is the user's wrong option, in the config's words, not the plugin's bug."""
    plugin = install(site)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) strenght; its options are strength"):
        pj.PersonaJudge({"backend": {"name": "toy"}, "method": plugin["method"], "method_options": {"strenght": 2}})


@pytest.mark.parametrize("where", ["in_loop_call", "in_loop_run"])
def test_a_method_whose_loop_raises_fails_its_own_request_with_one_plugin_error(site, where):
    """Raised when ``loop(req)`` is called or as the loop runs (after its first forward): a PluginError naming
    the method, delivered to that request; the engine goes on serving the next one."""
    plugin = install(site, **{where: 'raise IndexError("row 7")'})
    with pj.PersonaJudge({"backend": {"name": "toy"}, "method": plugin["method"]}) as m:
        with pytest.raises(PluginError) as err:
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=1)
        _one_line_plugin_error(
            err, plugin, rf"method '{plugin['method']}' \(Flat, from .*\)\.loop raised IndexError: row 7$"
        )
        assert isinstance(err.value.__cause__, IndexError)  # chained, for a debugger
        ok = m.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=1, method="persona-judge")
        assert len(ok.tokens) == 4


def test_a_method_whose_loop_ends_normally_is_not_an_error(site):
    """The loop's StopIteration is its end, not an exception to report (the wrapper must let it through)."""
    plugin = install(site)
    with pj.PersonaJudge({"backend": {"name": "toy"}, "method": plugin["method"]}) as m:
        out = m.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=1)
    assert len(out.tokens) == 4 and out.finish_reason == "length"


def test_at_the_cli_each_is_one_line_and_exit_2_and_other_commands_work(site, capsys):
    plugin = install(site, in_render='raise ValueError("exploded")', in_init='raise RuntimeError("no weights")')
    code, _, err = run_main(["generate", "hi", "--backend", "toy", "--encoder", plugin["encoder"], *TOY_RUN], capsys)
    one_line(code, err, plugin["where"], ".render raised ValueError: exploded")
    code, _, err = run_main(["generate", "hi", "--backend", plugin["backend"], *TOY_RUN], capsys)
    one_line(code, err, plugin["where"], "failed to load: RuntimeError: no weights")
    code, out, err = run_main(["generate", "hi", "--backend", "toy", *TOY_RUN], capsys)
    assert code == 0 and out.strip() and "error" not in err, err
    code, out, _ = run_main(["preferences"], capsys)
    assert code == 0 and "concise" in out


def test_a_builtin_bug_keeps_its_traceback(site, monkeypatch):
    """Only a plugin's exceptions are turned into a PluginError: the project's own are bugs, with their type."""
    _load_all()
    plain = registry("encoder")["plain"]
    monkeypatch.setattr(plain, "render", lambda self, *a, **k: {}["boom"])
    with pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}) as m:
        with pytest.raises(KeyError):
            m.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=1)


# -- E: SystemExit at import or in a hook skips the plugin; KeyboardInterrupt still interrupts -----------------


def test_a_plugin_that_exits_at_import_is_skipped_with_one_warning(site, capsys):
    plugin = install(site, at_import='raise SystemExit("needs the package X")')
    warned = _plugin_warnings(_load_all)
    assert len(warned) == 1, warned
    assert f"skipped plugin {plugin['where']}: SystemExit: needs the package X" == warned[0]
    assert plugin["encoder"] not in registry("encoder") and "concise" in registry("preference")
    code, out, err = run_main(["preferences"], capsys)  # the commands still work (one warning line)
    assert code == 0 and "concise" in out
    code, out, err = run_main(["generate", "hi", "--backend", "toy", *TOY_RUN], capsys)
    assert code == 0 and out.strip(), err


def test_a_hook_that_exits_skips_that_plugins_objects_of_that_kind(site):
    plugin = install(site, in_hook="raise SystemExit(3)")
    warned = _plugin_warnings(_load_all)
    assert warned == [f"skipped the encoders of plugin {plugin['where']}: SystemExit: 3"]
    assert plugin["encoder"] not in registry("encoder") and plugin["backend"] in registry("backend")


@pytest.mark.parametrize("where", ["at_import", "in_hook"])
def test_keyboard_interrupt_still_interrupts(site, where):
    install(site, **{where: "raise KeyboardInterrupt"})
    with pytest.raises(KeyboardInterrupt):
        _load_all()


# -- J: what a refused registration skips, and its wording -----------------------------------------------------


def test_a_refused_object_is_skipped_alone_with_one_warning_in_good_english(site):
    plugin = install(site, in_hook='register(type("NoRender", (), {"name": "no-render"}))')
    warned = _plugin_warnings(_load_all)
    assert len(warned) == 1 and warned[0].startswith(f"skipped an encoder of plugin {plugin['where']}: "), warned
    assert plugin["encoder"] in registry("encoder")  # the plugin's other encoder still registered
    assert "no-render" not in registry("encoder")


def test_the_readme_says_a_refused_object_is_skipped_alone():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Writing plugins", 1)[1].split("### A backend", 1)[0]
    flat = " ".join(section.split())
    assert "the plugin's other objects still register" in flat
    assert "skips that plugin's objects of that kind" not in flat  # what the code never did
    assert "skips that plugin's preferences" not in flat
