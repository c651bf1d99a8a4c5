"""What a plugin author meets: a method with only plan + loop runs, mistakes are named in one typed line.

Each test is something the README's "Writing plugins" promises; a plugin author's mistake (an instance for a
class, a misspelt hook, a string for a module) must say what is wrong, never pass silently nor dump a
traceback of pluggy's internals.
"""

import itertools
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
from plugin_modules import hook_module

import personajudge as pj
from personajudge import preferences
from personajudge.core.decoding import plain_loop
from personajudge.core.errors import PluginError, PreferenceError, UnknownPluginError
from personajudge.plugins import PluginWarning, register_plugin, registry, unregister_plugin

PREFS = ["concise", "humor"]
_numbers = itertools.count()


class AllInOne:
    """A method as the README describes one: plan(views) and loop(request), no decode.

    It plans what the built-in ``prompt`` method plans (every preference in one view) and samples plainly, so
    its output must be ``prompt``'s token for token at the same seed."""

    name = "all-in-one"
    description = "every preference in one prompt, plain sampling (a test plugin)"

    def plan(self, views):
        return [[p for v in views for p in v]]

    def loop(self, req):
        return plain_loop(req)


def _plugin(**hooks):
    """A module-like plugin with the given hook implementations."""
    return hook_module("authoring_plugin", **hooks)


@pytest.fixture
def registered():
    """Register plugins for one test; unregister them all after it."""
    done = []

    def reg(plugin, name=None):
        register_plugin(plugin, name=name)
        done.append(plugin)
        return plugin

    yield reg
    for p in done:
        unregister_plugin(p)


@pytest.fixture(scope="module")
def judge():
    with pj.PersonaJudge({"backend": {"name": "toy"}}) as j:
        yield j


# -- a method with plan + loop only -------------------------------------------------------------------------


def test_a_method_with_only_plan_and_loop_runs_through_generate_stream_and_batch(registered, judge):
    registered(_plugin(register_methods=lambda register: register(AllInOne)))
    kw = {"preferences": PREFS, "max_new_tokens": 6}
    got = judge.generate("Why is the sky blue?", method="all-in-one", seed=3, **kw)
    want = judge.generate("Why is the sky blue?", method="prompt", seed=3, **kw)
    assert got.tokens == want.tokens and len(got.tokens) > 0
    assert got.stats.method == "all-in-one" and got.stats.views == 1
    streamed = "".join(judge.stream("Why is the sky blue?", method="all-in-one", seed=3, **kw))
    assert streamed == want.text
    prompts = ["Why is the sky blue?", "How do magnets work?", "Name a colour."]
    batch = judge.generate_batch(prompts, method="all-in-one", seed=10, **kw)
    ref = judge.generate_batch(prompts, method="prompt", seed=10, **kw)
    assert [r.tokens for r in batch] == [r.tokens for r in ref]


def test_a_method_registered_as_an_instance_is_refused_with_the_fix(registered, judge):
    registered(_plugin(register_methods=lambda register: register(AllInOne())))
    with pytest.warns(PluginWarning) as caught:
        names = registry("method").names()
    (w,) = [w for w in caught if "all-in-one" in str(w.message)]
    assert "register the class, not an instance" in str(w.message) and "\n" not in str(w.message)
    assert "all-in-one" not in names and "persona-judge" in names  # the tool keeps working
    with pytest.raises(UnknownPluginError, match="unknown method 'all-in-one'"):
        judge.generate("hi", method="all-in-one", preferences=PREFS, max_new_tokens=2)


def test_a_method_that_must_run_alone_needs_a_decode(registered):
    class Alone(AllInOne):
        name = "alone"
        batchable = False

    class AloneWithDecode(Alone):
        name = "alone-with-decode"

        def decode(self, session, req):
            from personajudge.core.decoding import drive

            drive(session, self.loop(req))

    registered(_plugin(register_methods=lambda register: register(Alone)))
    registered(_plugin(register_methods=lambda register: register(AloneWithDecode)))
    with pytest.warns(PluginWarning, match=r"method 'alone' says batchable = False but has no decode"):
        names = registry("method").names()
    assert "alone" not in names and "alone-with-decode" in names


# -- hooks and registration ---------------------------------------------------------------------------------


def test_a_misspelt_hook_is_named_in_a_warning_and_the_tool_keeps_working(registered, judge):
    def register_backend(register):  # singular: no such hook
        raise AssertionError("never called")

    plugin = _plugin(register_backend=register_backend)
    with pytest.warns(PluginWarning) as caught:
        registered(plugin, name="typo-plugin")
    (msg,) = [str(w.message) for w in caught]
    assert "'typo-plugin'" in msg and "'register_backend'" in msg and "did you mean register_backends?" in msg
    assert "\n" not in msg
    assert "toy" in registry("backend").names()
    assert judge.generate("hi", preferences=PREFS, max_new_tokens=2, seed=0).tokens


def test_a_hook_without_hookimpl_is_named_in_a_warning(registered):
    """A plugin with one marked hook and ``register_encoders`` left unmarked: pluggy skipped the unmarked one
    in silence (the encoder never appeared); now a warning names it."""

    def register_encoders(register):  # no @hookimpl
        raise AssertionError("never called")

    plugin = hook_module("half_marked", register_methods=lambda register: None)  # marked
    plugin.register_encoders = register_encoders
    with pytest.warns(PluginWarning) as caught:
        registered(plugin, name="half-marked")
    assert [str(w.message) for w in caught] == [
        "plugin 'half-marked' (registered at run time) defines 'register_encoders' without @personajudge.hookimpl, "
        "so it is never called"
    ]


def test_a_plugin_whose_getattr_answers_everything_is_not_warned_about(registered, recwarn):
    """Negative control: names are looked up statically; an object whose ``__getattr__`` returns a callable
    for any name (a mock) does not define the hooks it does not implement."""
    from personajudge.plugins import hookimpl

    class Anything:
        @hookimpl
        def register_methods(self, register):
            pass

        def __getattr__(self, name):
            return lambda *a, **k: None

    registered(Anything(), name="anything")
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


def test_registering_twice_is_idempotent_and_a_taken_name_is_a_typed_error(registered):
    plugin = registered(_plugin(register_methods=lambda register: register(AllInOne)), name="twice")
    register_plugin(plugin)  # a notebook cell run again: nothing happens
    register_plugin(plugin, name="twice")
    assert registry("method").origin("all-in-one") == "twice"
    other = _plugin(register_methods=lambda register: None)
    with pytest.raises(PluginError) as e:
        register_plugin(other, name="twice")
    assert "a plugin named 'twice' is already registered" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PluginError, match="already registered as 'twice'"):
        register_plugin(plugin, name="renamed")


def test_unregistering_twice_is_a_no_op():
    plugin = _plugin(register_methods=lambda register: register(AllInOne))
    register_plugin(plugin)
    assert "all-in-one" in registry("method")
    unregister_plugin(plugin)
    unregister_plugin(plugin)
    assert "all-in-one" not in registry("method")


@pytest.mark.parametrize("bad", ["my_backend", None])
def test_a_string_or_none_is_not_a_plugin(bad):
    for fn in (register_plugin, unregister_plugin):
        with pytest.raises(PluginError, match="takes the plugin module or object") as e:
            fn(bad)
        assert "import the module first" in str(e.value)


def test_an_object_without_hooks_is_refused_and_not_left_registered():
    from personajudge.plugins.manager import get_plugin_manager

    empty = types.ModuleType("no_hooks_here")
    empty.register_backends = lambda register: None  # forgot @hookimpl
    with pytest.raises(PluginError, match="module 'no_hooks_here' implements no hooks.*@personajudge.hookimpl"):
        register_plugin(empty)
    assert not get_plugin_manager().is_registered(empty)


def test_a_hook_with_the_wrong_argument_name_is_one_line():
    def register_backends(reg):  # the hook passes `register`
        pass

    with pytest.raises(PluginError) as e:
        register_plugin(_plugin(register_backends=register_backends))
    assert "register_backends(reg)" in str(e.value) and "\n" not in str(e.value)


def _fake_distribution(root, select):
    """An installed plugin distribution (dist-info with an entry point) in ``root``, found through PYTHONPATH;
    its module misspells one hook. Returns the CLI's ``plugins`` run with ``PERSONAJUDGE_PLUGINS=select``."""
    (root / "fake_plug_mod.py").write_text(
        textwrap.dedent(
            """
            import personajudge as pj

            @pj.hookimpl
            def register_encoder(register):
                pass
            """
        )
    )
    info = root / "pj_fake_plugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pj-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[personajudge]\nfakeplug = fake_plug_mod\n")
    env = {**os.environ, "PYTHONPATH": str(root), "PERSONAJUDGE_PLUGINS": select}
    code = "from personajudge.cli import main; raise SystemExit(main(['plugins']))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_plugin_selection_names_a_missing_plugin_and_an_entry_points_misspelt_hook(tmp_path):
    out = _fake_distribution(tmp_path, "fakeplg")  # a typo
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("personajudge: warning:")]
    assert len(lines) == 1, out.stderr
    assert "PERSONAJUDGE_PLUGINS names 'fakeplg'" in lines[0]
    assert lines[0].endswith("installed plugins: fakeplug, pj-fake-plugin")
    # selected by its distribution's name, spelt as pip normalises it: loaded, and its misspelt hook named
    out = _fake_distribution(tmp_path, "pj_fake_plugin")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("personajudge: warning:")]
    assert len(lines) == 1 and "PERSONAJUDGE_PLUGINS" not in lines[0], out.stderr
    assert "pj-fake-plugin 0.1, entry point 'fakeplug = fake_plug_mod'" in lines[0]
    assert "'register_encoder'" in lines[0] and "did you mean register_encoders?" in lines[0]
    out = _fake_distribution(tmp_path, "none")  # the control: nothing selected, nothing to warn about
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr


# -- preferences a plugin (or a notebook) builds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: pj.Preference(name="", description="d", instruction="i"), ["name"]),
        (lambda: pj.Preference(name="mine", description="d", instruction="i", weight=-1), ["'mine'", "weight"]),
        (
            lambda: pj.Preference(name="mine", description="d", instruction="i", examples=[{"q": "a\nb", "a": "c"}]),
            ["'mine'", "examples.0.q", "one line"],
        ),
        (lambda: preferences.Example(q="", a="x"), ["example", "q"]),
        (lambda: pj.Preference.free_text(None), ["free-text", "NoneType"]),
        (lambda: pj.Preference.free_text("  "), ["free-text", "empty"]),
        (lambda: pj.Preference.free_text("be nice", weight=0), ["'be nice'", "weight"]),
        (lambda: preferences.lookup(3), ["name", "int"]),
        (lambda: preferences.resolve(3), ["preference", "int"]),
    ],
)
def test_an_invalid_preference_is_a_one_line_preference_error(build, words):
    with pytest.raises(PreferenceError) as e:
        build()
    msg = str(e.value)
    assert isinstance(e.value, pj.PersonaJudgeError) and "\n" not in msg
    assert all(w in msg for w in words), msg


def test_a_valid_preference_still_builds_and_a_file_entry_keeps_its_location(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = pj.Preference(name="mine", description="d", instruction="i", examples=[{"q": "a", "a": "b"}])
    assert p.examples[0].a == "b" and pj.Preference.free_text("be nice").name == "be-nice"
    f = tmp_path / "prefs.json"
    f.write_text('[{"name": "x", "description": "d", "weight": -1}]')
    with pytest.raises(PreferenceError, match=r"entry 1: weight: Input should be greater than 0"):
        preferences.load_file(f)


# -- the conformance kit's failure messages -----------------------------------------------------------------


def test_a_conformance_failure_shows_the_compared_values(tmp_path):
    """pytest rewrites asserts only in test files and registered modules; the installed kit registers its own,
    so a backend whose batched ``forward_many`` scrambles its rows (each row's vocabulary reversed: right shapes,
    which the Session base accepts, wrong values) fails with the values compared, not a bare AssertionError."""
    (tmp_path / "test_reversed_backend.py").write_text(
        textwrap.dedent(
            """
            import pytest

            from personajudge.backends.toy import ToyBackend
            from personajudge.core.config import BackendConfig
            from personajudge.testing import BackendConformance


            class Reversed(ToyBackend):
                def open(self, n_views):
                    session = super().open(n_views)
                    rows = session._forward_many

                    def scrambled(calls):
                        outs = rows(calls)
                        return outs if len(calls) == 1 else [out[:, ::-1] for out in outs]

                    session._forward_many = scrambled
                    return session


            @pytest.fixture(scope="module")
            def backend():
                return Reversed(BackendConfig(name="toy"))


            class TestReversed(BackendConformance):
                check_exactness = False
            """
        )
    )
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "forward_many_equals", str(tmp_path)]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    # the first assert that fails compares a batched row with the same row alone: its values are shown
    assert re.search(r"assert \d+\.\d+(e-?\d+)? <= 0\.001\n.*where \S+ = total_variation\(", out.stdout), out.stdout
