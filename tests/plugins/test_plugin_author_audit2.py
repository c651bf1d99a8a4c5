"""A second plugin-author audit (following the README as a third-party author): a backend's ``open``,
``context_length``, ``describe`` and tokenizer, and a method's constructor, were used unchecked, so a
plugin's slip was a traceback from the core (exit 1, an untyped exception in the API) instead of one
:class:`PluginError` naming the plugin, at load, before any request.

Each test failed before its fix; the negative controls show the built-in and well-formed plugins still load.
"""

from __future__ import annotations

import numpy as np
import pytest
from cli_lines import one_line, run_main
from plugin_modules import registering

import personajudge as pj
from personajudge.backends.toy import ToyBackend, ToyTokenizer
from personajudge.core.errors import ConfigError, PluginError
from personajudge.plugins import PluginWarning, register_plugin, registry, unregister_plugin

PREFS = ["concise", "humor"]


@pytest.fixture
def registered():
    """Register plugins for one test; unregister them all after it."""
    with registering("audit2_plugin") as reg:
        yield reg


def _backend(name, **attrs):
    """A toy backend registered as ``name``, with ``attrs`` set on it after the toy's own __init__."""

    def __init__(self, config=None):
        ToyBackend.__init__(self, pj.BackendConfig(name="toy"))
        for key, value in attrs.items():
            if value is _DELETE:
                delattr(self, key)
            else:
                setattr(self, key, value() if callable(value) and key == "tokenizer" else value)

    return type(f"B_{name.replace('-', '_')}", (ToyBackend,), {"name": name, "__init__": __init__})


_DELETE = object()


# -- open() must return a Session ---------------------------------------------------------------------------


class _Duck:
    """Has what a session is used for, but is no ``pj.Session``: the engine reads ``closed`` and lengths."""

    def forward_many(self, calls):
        return []

    def truncate(self, view, length):
        pass


@pytest.mark.parametrize("opened", [None, _Duck()], ids=["none", "duck"])
def test_open_returning_no_session_is_a_plugin_error_naming_the_backend(registered, opened, capsys):
    cls = type("OpenBad", (ToyBackend,), {"name": "audit2-open", "open": lambda self, n: opened})
    registered(register_backends=lambda register: register(cls))
    shown = "NoneType None" if opened is None else "_Duck"
    with pytest.raises(PluginError, match=rf"backend 'audit2-open' \(OpenBad, .*\)\.open returned {shown}"):
        pj.generate("hi", config={"backend": {"name": "audit2-open"}}, preferences=PREFS, max_new_tokens=2)
    argv = ["generate", "hi", "--backend", "audit2-open", "--prefer", "concise", "--prefer", "humor", "-q"]
    code, _, err = run_main(argv, capsys)
    one_line(code, err, "returns a personajudge.Session")


def test_a_registered_backends_real_session_still_opens(registered):
    """Negative control: a Session subclass is accepted and runs."""
    cls = type("OpenGood", (ToyBackend,), {"name": "audit2-good"})
    registered(register_backends=lambda register: register(cls))
    out = pj.generate("hi", config={"backend": {"name": "audit2-good"}}, preferences=PREFS, max_new_tokens=3)
    assert len(out.tokens) == 3


# -- context_length and describe, at load -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "got"),
    [(_DELETE, "no such attribute"), ("2048", "str '2048'"), (0, "int 0"), (True, "bool True")],
    ids=["missing", "str", "zero", "bool"],
)
def test_a_bad_context_length_is_refused_at_load(registered, value, got):
    cls = _backend("audit2-ctx", context_length=value)
    registered(register_backends=lambda register: register(cls))
    with pytest.raises(
        PluginError, match=rf"^backend 'audit2-ctx' \(.*\)\.context_length must be a positive int.*got {got}$"
    ):
        pj.PersonaJudge({"backend": {"name": "audit2-ctx"}})


def _describe_raises(self):
    raise RuntimeError("no facts today")


@pytest.mark.parametrize(
    ("describe", "says"),
    [
        (_describe_raises, r"\.describe raised RuntimeError: no facts today"),
        (lambda self: ["a", "list"], r"\.describe returned list \['a', 'list'\]; it returns a dict"),
        (lambda self: {1: "x"}, r"\.describe returned dict \{1: 'x'\}; it returns a dict of facts with str keys"),
    ],
    ids=["raises", "list", "int-keys"],
)
def test_a_bad_describe_is_a_plugin_error_at_load_not_after_the_text(registered, describe, says):
    """``describe()`` was first called for the settings, after the text was generated: the result was lost."""
    cls = type("DescBad", (ToyBackend,), {"name": "audit2-desc", "describe": describe})
    registered(register_backends=lambda register: register(cls))
    with pytest.raises(PluginError, match=rf"backend 'audit2-desc' \(DescBad.*\){says}"):
        pj.PersonaJudge({"backend": {"name": "audit2-desc"}})
    with pytest.raises(PluginError, match=says):  # a backend object passed in is checked the same way
        pj.PersonaJudge({"backend": {"name": "toy"}}, backend=cls())


# -- the tokenizer's encode and decode, probed at load ------------------------------------------------------


class _EncodeRaises(ToyTokenizer):
    def encode(self, text, *, add_bos=True, special=True):
        raise ValueError("cannot encode")


class _EncodeNumpy(ToyTokenizer):
    def encode(self, text, *, add_bos=True, special=True):
        return np.asarray(super().encode(text, add_bos=add_bos, special=special))


class _DecodeBytes(ToyTokenizer):
    def decode(self, ids):
        return super().decode(ids).encode()


@pytest.mark.parametrize(
    ("tok", "says"),
    [
        (_EncodeRaises, r"\.encode\('Hello, world\.', add_bos=False\) raised ValueError: cannot encode"),
        (_EncodeNumpy, r"\.encode\('Hello, world\.', add_bos=False\) must return a list of token ids.*got ndarray"),
        (_DecodeBytes, r"\.decode must return str, got bytes b'"),
    ],
    ids=["encode-raises", "encode-numpy", "decode-bytes"],
)
def test_a_tokenizer_that_cannot_encode_or_decode_is_refused_at_load(registered, tok, says):
    """Each was a traceback from the core on the first request (``The truth value of an array`` in the
    context checks, a TypeError in the stop-string decoder)."""
    cls = _backend("audit2-tok", tokenizer=tok)
    registered(register_backends=lambda register: register(cls))
    with pytest.raises(PluginError, match=rf"backend 'audit2-tok' \(.*\): tokenizer {tok.__name__}{says}"):
        pj.PersonaJudge({"backend": {"name": "audit2-tok"}})


# -- a method's constructor -----------------------------------------------------------------------------------


def _method_class(init):
    from personajudge.core.decoding import plain_loop

    return type(
        "Buggy",
        (),
        {
            "name": "audit2-buggy",
            "__init__": init,
            "plan": lambda self, views: [list(v) for v in views] or [[]],
            "loop": lambda self, req: plain_loop(req),
        },
    )


def test_a_type_error_in_a_methods_own_code_is_the_plugins_not_the_options(registered):
    """``method_options for 'x': object of type 'int' has no len()`` blamed options nobody gave."""

    def init(self, alpha=1.0):
        self.table = len(5)

    cls = _method_class(init)
    registered(register_methods=lambda register: register(cls))
    with pytest.raises(PluginError, match=r"method 'audit2-buggy' \(Buggy.* failed to construct: TypeError: .*len"):
        pj.generate("hi", config={"backend": {"name": "toy"}, "method": "audit2-buggy"}, max_new_tokens=2)


def test_options_the_method_does_not_take_are_still_a_config_error(registered):
    """Negative control: an unknown option is the config's mistake, in the config's words."""

    def init(self, alpha=1.0):
        self.alpha = alpha

    cls = _method_class(init)
    registered(register_methods=lambda register: register(cls))
    cfg = {"backend": {"name": "toy"}, "method": "audit2-buggy", "method_options": {"beta": 2}}
    with pytest.raises(
        ConfigError, match=r"^method_options for 'audit2-buggy': unknown option\(s\) beta; its options are alpha$"
    ):
        pj.generate("hi", config=cfg, max_new_tokens=2)
    cfg["method_options"] = {"alpha": 2.0}
    assert len(pj.generate("hi", config=cfg, max_new_tokens=2).tokens) == 2


def test_a_type_error_behind_a_kwargs_signature_is_still_the_options(registered):
    """``__init__(self, **options)`` binds any options, so binding proves nothing: a TypeError for an option
    it then refuses stays the config's ConfigError, not the plugin's fault."""

    def init(self, **options):
        unknown = set(options) - {"alpha"}
        if unknown:
            raise TypeError(f"unexpected option(s) {sorted(unknown)}")

    cls = _method_class(init)
    registered(register_methods=lambda register: register(cls))
    cfg = {"backend": {"name": "toy"}, "method": "audit2-buggy", "method_options": {"alpah": 1}}
    with pytest.raises(ConfigError, match=r"^method_options for 'audit2-buggy': unexpected option\(s\) \['alpah'\]$"):
        pj.generate("hi", config=cfg, max_new_tokens=2)


# -- scorers, checked as they register ----------------------------------------------------------------------


def _scorer_warnings(registered, cls_or_obj):
    registered(register_scorers=lambda register: register(cls_or_obj))
    with pytest.warns(PluginWarning) as caught:
        names = registry("scorer").names()
    return names, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def test_a_scorer_that_scores_nothing_is_refused_when_it_registers(registered):
    """A misspelt ``scroe`` was listed by ``plugins`` and failed after ``eval`` had generated every answer,
    with an empty ``NotImplementedError``."""
    from personajudge.evaluation.scorers import PointwiseScorer

    class Misspelt(PointwiseScorer):
        name = "audit2-misspelt"

        def scroe(self, prompt, response):
            return 1.0

    names, said = _scorer_warnings(registered, Misspelt)
    assert "audit2-misspelt" not in names and "length" in names
    assert any("scorer 'audit2-misspelt' (class " in w and "implements neither score nor score_many" in w for w in said)


@pytest.mark.parametrize("kind", ["instance", "no-base"])
def test_a_scorer_instance_or_a_class_of_another_shape_is_refused(registered, kind):
    from personajudge.evaluation.scorers import PointwiseScorer

    class Fine(PointwiseScorer):
        name = "audit2-scorer"

        def score(self, prompt, response):
            return 1.0

    class Plain:
        name = "audit2-scorer"

        def score(self, prompt, response):
            return 1.0

    names, said = _scorer_warnings(registered, Fine() if kind == "instance" else Plain)
    says = "register the class, not an instance" if kind == "instance" else "subclass PointwiseScorer or PairwiseScorer"
    assert "audit2-scorer" not in names and any(says in w for w in said), said


def test_scorers_that_implement_one_of_the_pair_register(registered, recwarn):
    """Negative control: ``score`` alone, ``score_many`` alone, and a pairwise ``compare`` all register."""
    from personajudge.evaluation.scorers import PairwiseScorer, PointwiseScorer

    one = type("One", (PointwiseScorer,), {"name": "audit2-one", "score": lambda self, p, r: 1.0})
    many = type(
        "Many", (PointwiseScorer,), {"name": "audit2-many", "score_many": lambda self, items: [1.0] * len(items)}
    )
    pair = type("Pair", (PairwiseScorer,), {"name": "audit2-pair", "compare": lambda self, item: None})
    registered(register_scorers=lambda register: [register(c) for c in (one, many, pair)])
    assert {"audit2-one", "audit2-many", "audit2-pair"} <= set(registry("scorer").names())
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


# -- a reloaded plugin module ---------------------------------------------------------------------------------


def test_registering_a_reloaded_module_again_takes_its_new_code(tmp_path, monkeypatch):
    """``importlib.reload(m)`` keeps the module object, so ``register_plugin(m)`` did nothing and the
    registry kept the classes of before the edit (the notebook workflow the README points to)."""
    import importlib
    import sys

    source = tmp_path / "audit2_reload_mod.py"
    body = """
import personajudge as pj
from personajudge.backends.toy import ToyBackend

class Versioned(ToyBackend):
    name = "audit2-reload"
    description = "{version}"

@pj.hookimpl
def register_backends(register):
    register(Versioned)
"""
    source.write_text(body.format(version="first"))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("audit2_reload_mod")
    try:
        register_plugin(mod)
        assert registry("backend")["audit2-reload"].description == "first"
        register_plugin(mod)  # a cell run twice: nothing changes
        assert registry("backend")["audit2-reload"].description == "first"
        source.write_text(body.format(version="second"))
        importlib.invalidate_caches()
        mod = importlib.reload(mod)
        register_plugin(mod)
        assert registry("backend")["audit2-reload"].description == "second"
    finally:
        unregister_plugin(mod)
        sys.modules.pop("audit2_reload_mod", None)


def test_a_reload_whose_new_code_is_refused_leaves_no_stale_registration(tmp_path, monkeypatch):
    """The new code is registered through the same checks as a first registration: refused, the plugin is
    unregistered (its old functions are gone from the module) and the registry no longer lists it."""
    import importlib
    import sys

    from personajudge.core.errors import PluginError
    from personajudge.plugins import get_plugin_manager

    source = tmp_path / "audit2_reload_bad.py"
    good = (
        "import personajudge as pj\nfrom personajudge.backends.toy import ToyBackend\n"
        "class V(ToyBackend):\n    name = 'audit2-reload-bad'\n"
        "@pj.hookimpl\ndef register_backends(register):\n    register(V)\n"
    )
    source.write_text(good)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("audit2_reload_bad")
    try:
        register_plugin(mod)
        assert "audit2-reload-bad" in registry("backend")
        source.write_text(good.replace("def register_backends(register):", "def register_backends(register, extra):"))
        importlib.invalidate_caches()
        mod = importlib.reload(mod)
        with pytest.raises(PluginError, match="cannot register module 'audit2_reload_bad'"):
            register_plugin(mod)
        assert not get_plugin_manager().is_registered(mod) and "audit2-reload-bad" not in registry("backend")
    finally:
        unregister_plugin(mod)
        sys.modules.pop("audit2_reload_bad", None)


def _registered_twice_is_unchanged(plugin, name):
    """Register ``plugin`` twice under ``name``: the second time must leave its hook implementations as they were."""
    from personajudge.plugins import get_plugin_manager

    register_plugin(plugin, name=name)
    try:
        pm = get_plugin_manager()
        before = [c.get_hookimpls() for c in pm.get_hookcallers(plugin)]
        register_plugin(plugin, name=name)
        assert [c.get_hookimpls() for c in pm.get_hookcallers(plugin)] == before
    finally:
        unregister_plugin(plugin)


def test_a_hook_under_another_attribute_name_is_no_reload(recwarn):
    """``@hookimpl(specname=...)``: the attribute's name is not the hook's; registering twice changes nothing."""
    from personajudge.plugins import hookimpl

    class P:
        @hookimpl(specname="register_preferences")
        def my_preferences(self, register):
            pass

    _registered_twice_is_unchanged(P(), "audit2-specname")


def test_registering_a_class_plugin_instance_twice_keeps_it_registered_once(recwarn):
    """Negative control: an object's hook methods are bound anew at each lookup, which is no change."""
    from personajudge.plugins import hookimpl

    class P:
        @hookimpl
        def register_preferences(self, register):
            pass

    _registered_twice_is_unchanged(P(), "audit2-twice")


def test_an_unknown_name_under_a_plugin_selection_says_the_selection_may_be_why(monkeypatch):
    """With ``PERSONAJUDGE_PLUGINS=card`` set, ``unknown backend 'bigram'`` gave no hint that the variable
    had left the bigram plugin out."""
    from personajudge.core.errors import UnknownPluginError

    monkeypatch.setenv("PERSONAJUDGE_PLUGINS", "card")
    with pytest.raises(
        UnknownPluginError, match=r"registered backends: .*toy \(PERSONAJUDGE_PLUGINS='card' loads only"
    ):
        registry("backend").get("bigram")
    monkeypatch.delenv("PERSONAJUDGE_PLUGINS")
    with pytest.raises(UnknownPluginError, match=r"registered backends: [a-z, -]*toy$"):
        registry("backend").get("bigram")


def test_a_plugins_description_is_listed_on_one_printable_line(registered, capsys):
    """A description with newlines and an escape sequence reached the terminal as it was."""
    from personajudge.cli import main

    cls = type("Loud", (ToyBackend,), {"name": "audit2-loud", "description": "Line one\nline two \x1b[31mred\x1b[0m"})
    registered(register_backends=lambda register: register(cls))
    assert main(["plugins"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if "audit2-loud" in ln]
    assert "Line one line two [31mred [0m" in line and "\x1b" not in line


@pytest.mark.parametrize("name", ["a,b", "pirate, speak"])
def test_a_preference_name_with_a_comma_is_refused_when_it_registers(registered, name):
    """A preferences file refused a name with a comma; a plugin's was registered, yet ``--view`` split it."""
    pref = pj.Preference(name=name, description="Talk like a pirate.")
    ok = pj.Preference(name="pirate-speak", description="Talk like a pirate.")
    registered(register_preferences=lambda register: [register(pref), register(ok)])
    with pytest.warns(PluginWarning) as caught:
        names = registry("preference").names()
    assert name not in names and "pirate-speak" in names
    assert any(f"the preference name {name!r}, which holds a comma" in str(w.message) for w in caught)


def test_a_typed_refusal_of_the_tokenizer_passes_through_the_probe(registered):
    """A tokenizer that refuses with a typed error (a closed backend's SessionError) says what is wrong
    itself: the probe lets it through instead of wrapping it as the plugin's bug."""
    from personajudge.core.errors import SessionError

    class Closed(ToyTokenizer):
        def encode(self, text, *, add_bos=True, special=True):
            raise SessionError("this backend is closed")

    cls = _backend("audit2-closed", tokenizer=Closed)
    registered(register_backends=lambda register: register(cls))
    with pytest.raises(SessionError, match="^this backend is closed$"):
        pj.PersonaJudge({"backend": {"name": "audit2-closed"}})
