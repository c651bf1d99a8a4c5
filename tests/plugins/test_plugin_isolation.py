"""A third-party plugin can never break the tool: broken or colliding ones are skipped with one line.

Each test installs fake distributions (a ``*.dist-info`` folder with an
``entry_points.txt``, which is all importlib.metadata needs) into a temporary
folder on ``PYTHONPATH`` and runs the real command in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

GOOD = """
import numpy as np
from personajudge import hookimpl

class Shout:
    name = "shout"
    description = "Every preference in capitals (a test encoder)."

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        return " ".join(p.instruction.upper() for p in view) + " " + conversation[-1]["content"], True

@hookimpl
def register_encoders(register):
    register(Shout)
"""
BROKEN = "import this_module_does_not_exist_anywhere\n"
COLLIDES = """
from personajudge import hookimpl
from personajudge.backends.toy import ToyBackend

class Impostor(ToyBackend):
    name = "toy"

@hookimpl
def register_backends(register):
    register(Impostor)
"""


def install(site, dist, version, entry, module, code):
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[personajudge]\n{entry} = {module}\n")


@pytest.fixture
def site(tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    install(d, "pj-shout", "1.2.0", "shout", "pj_shout", GOOD)
    install(d, "pj-broken", "0.0.1", "broken", "pj_broken", BROKEN)
    install(d, "pj-impostor", "3.0", "impostor", "pj_impostor", COLLIDES)
    return d


def run(site, *args, select=None):
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PERSONAJUDGE_PLUGINS", None)
    if select is not None:
        env["PERSONAJUDGE_PLUGINS"] = select
    return subprocess.run(
        [sys.executable, "-m", "personajudge", *args], capture_output=True, text=True, env=env, timeout=120
    )


GEN = [
    "generate",
    "hello",
    "--backend",
    "toy",
    "--prefer",
    "concise",
    "--prefer",
    "humor",
    "--max-new-tokens",
    "5",
    "--seed",
    "3",
    "--json",
]


def test_broken_and_colliding_plugins_are_skipped_with_one_line_each(site):
    proc = run(site, *GEN)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("personajudge: warning:")]
    assert len(warnings) == 2, proc.stderr
    broken = next(w for w in warnings if "pj-broken" in w)
    assert "pj-broken 0.0.1" in broken and "entry point 'broken = pj_broken'" in broken
    assert "ModuleNotFoundError" in broken
    impostor = next(w for w in warnings if "pj-impostor" in w)
    assert "backend 'toy'" in impostor and "already registered by persona-judge" in impostor
    assert "Traceback" not in proc.stderr
    # the built-in toy model ran, not the impostor: same output as without any plugin
    clean = run(site, *GEN, select="none")
    assert clean.returncode == 0 and clean.stderr == ""
    assert json.loads(proc.stdout)["tokens"] == json.loads(clean.stdout)["tokens"]


def test_the_working_plugin_is_listed_with_its_distribution_and_used(site):
    proc = run(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    enc = {r["name"]: r for r in json.loads(proc.stdout)["encoder"]}
    assert enc["shout"]["distribution"] == "pj-shout" and enc["shout"]["version"] == "1.2.0"
    assert enc["shout"]["entry_point"] == "shout = pj_shout"
    assert enc["plain"]["distribution"] == "persona-judge"
    text = run(site, "plugins").stdout
    assert "Every preference in capitals (a test encoder).  [pj-shout 1.2.0, entry point shout = pj_shout]" in text
    shown = run(
        site,
        "generate",
        "hi",
        "--backend",
        "toy",
        "--encoder",
        "shout",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--max-new-tokens",
        "3",
        "--show-prompt",
        select="shout",
    )
    assert shown.returncode == 0, shown.stderr
    assert "BE CONCISE AND TO THE POINT" in shown.stderr


@pytest.mark.parametrize(
    "select,present", [("none", set()), ("", set()), ("shout", {"shout"}), ("pj-shout,pj-broken", {"shout"})]
)
def test_personajudge_plugins_selects_third_party_plugins(site, select, present):
    proc = run(site, "plugins", "--json", select=select)
    assert proc.returncode == 0, proc.stderr
    names = {r["name"] for r in json.loads(proc.stdout)["encoder"]}
    assert names & {"shout"} == present
    assert {"plain", "chat-turn"} <= names  # built-ins are always there
    assert ("pj-broken" in proc.stderr) == ("pj-broken" in select)


def test_an_empty_selection_says_it_loads_nothing_and_none_is_any_case(site):
    """``PERSONAJUDGE_PLUGINS=${X}`` with X unset loaded no plugin without a word (every name a plugin
    registers then "unknown"); ``NONE`` was warned about as a plugin name no distribution provides."""
    empty = run(site, "plugins", "--json", select=" , ")
    assert empty.returncode == 0, empty.stderr
    (warning,) = [ln for ln in empty.stderr.splitlines() if "warning" in ln]
    assert "PERSONAJUDGE_PLUGINS is set but names no plugin, so no third-party plugin is loaded" in warning
    assert "shout" not in {r["name"] for r in json.loads(empty.stdout)["encoder"]}
    for spelling in ("NONE", "None"):
        off = run(site, "plugins", "--json", select=spelling)
        assert off.returncode == 0 and off.stderr == "", off.stderr
        assert "shout" not in {r["name"] for r in json.loads(off.stdout)["encoder"]}
