"""Preferences from plugins: case, names and aliases the built-ins hold, objects that are no Preference;
and the example encoder package is the README's plugin."""

import importlib.util
import re
import types
import warnings
from pathlib import Path

import pytest

import personajudge as pj
from personajudge.cli import main
from personajudge.plugins import PluginWarning, preference_library, register_plugin, unregister_plugin
from personajudge.preferences import resolve

ROOT = Path(__file__).resolve().parents[2]


def _pref(name, **kw):
    return pj.Preference(name=name, description=f"{name} description", instruction=f"Be {name}.", **kw)


@pytest.fixture
def plugin():
    """Register a module whose register_preferences registers what the test gives; the warnings it causes."""
    registered = []

    def add(*objs):
        mod = types.ModuleType(f"prefs_{len(registered)}")
        mod.register_preferences = pj.hookimpl(lambda register: [register(o) for o in objs])
        register_plugin(mod)
        registered.append(mod)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib = preference_library()
        return lib, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]

    yield add
    for mod in registered:
        unregister_plugin(mod)


def test_a_capitalised_plugin_name_and_alias_resolve(plugin):
    lib, warned = plugin(_pref("Pirate", aliases=("Buccaneer",)))
    assert not warned
    for spelling in ("Pirate", "pirate", "PIRATE", "buccaneer"):
        assert resolve(spelling, lib).instruction == "Be Pirate."


def test_a_plugin_cannot_take_a_builtin_alias_as_its_name(plugin):
    lib, warned = plugin(_pref("short"), _pref("Concise"))
    assert resolve("short", lib).name == "concise" and resolve("concise", lib).instruction.startswith("Be concise and")
    assert len(warned) == 2, warned
    assert any("skipped preference 'short'" in w and "an alias of preference 'concise'" in w for w in warned)
    assert any("skipped preference 'Concise'" in w and "the name of preference 'concise'" in w for w in warned)


def test_a_plugin_alias_that_is_taken_is_dropped_with_a_warning(plugin):
    lib, warned = plugin(_pref("jolly", aliases=("funny", "merry")))
    assert resolve("funny", lib).name == "humor"  # the built-in keeps its alias
    assert resolve("merry", lib).name == "jolly" and resolve("jolly", lib).aliases == ("merry",)
    assert len(warned) == 1, warned
    assert "dropped alias 'funny' of preference 'jolly'" in warned[0] and "an alias of preference 'humor'" in warned[0]


def test_a_free_name_and_alias_register_without_a_word(plugin):
    """The control: nothing taken, nothing dropped."""
    lib, warned = plugin(_pref("jolly", aliases=("merry",)))
    assert not warned and resolve("merry", lib).name == "jolly"


@pytest.mark.parametrize(
    "obj",
    [types.SimpleNamespace(name="pirate2", description="x", instruction="Talk like a pirate."), {"name": "pirate2"}],
    ids=["namespace", "dict"],
)
def test_an_object_that_is_no_preference_is_named_in_a_warning_and_the_cli_works(plugin, obj, capsys):
    lib, warned = plugin(obj)
    assert len(warned) == 1 and f"registered a {type(obj).__name__} as a preference" in warned[0], warned
    assert "pirate2" not in lib
    assert main(["preferences"]) == 0
    assert "concise" in capsys.readouterr().out


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_example_encoder_package_is_the_readme_plugin(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith("# my_encoder.py\n"))
    (tmp_path / "my_encoder_copy.py").write_text(block)
    readme = _load(tmp_path / "my_encoder_copy.py", "my_encoder_copy")
    example = _load(ROOT / "examples/custom_encoder/src/pj_persona_card/__init__.py", "pj_persona_card_copy")
    ours = next(v for v in vars(example).values() if getattr(v, "name", None) == "persona-card")()
    theirs = next(v for v in vars(readme).values() if getattr(v, "name", None) == "persona-card")()
    view, conv = [resolve("concise"), resolve("humor")], [{"role": "user", "content": "Why is the sky blue?"}]
    assert ours.render(view, conv, None) == theirs.render(view, conv, None)
    assert ours.stop_strings(None) == theirs.stop_strings(None)
    # an answer ends at its line's end: the invented card lines a base model writes next are cut
    assert "\n" in ours.stop_strings(None)
