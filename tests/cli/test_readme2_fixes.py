"""README audit 2 (findings A-F, H-J): what a new user met in the first two hours.

A: ``--preferences-file`` with ``--prefer`` repeated the file's preferences as views of their own; B: bench's
``view_preferences`` named a file's preferences by a name no config knows; C: a view too long for the
encoder's exemplars was told to "shorten the prompt"; D: ``bench-serve --max-new-tokens`` / ``--seed`` did
nothing; F: the README quoted the string entry's message for the table form; H: install hints named a
package index the project is not on; I: settings' tables were refused per call, and ``"views": []``
meant something else on the server; J: ``--help`` listed flags the command refuses.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from cli_lines import one_line, run_main
from own_preferences import PIRATE
from refuse import refuse_calls

import personajudge as pj
from personajudge.cli import main
from personajudge.core.decoding import check_contexts
from personajudge.core.errors import ConfigError, ContextLengthError, PersonaJudgeWarning

ROOT = Path(__file__).resolve().parents[2]
TOY = ["generate", "hi", "--backend", "toy", "--max-new-tokens", "2", "--seed", "1"]
PIRATE_TOML = '[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\n'
PARROT_TOML = '[[preferences]]\nname = "parrot"\ndescription = "Squawk like a parrot"\n'
ADJUSTED_TOML = '[[preferences]]\nname = "concise"\nexamples = [{q = "Q1?", a = "Short."}]\n'
MODEL = {"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}}


def _file(tmp_path, text, name="prefs.toml"):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


def _names(views):
    """A settings ``views`` list with each table shown as ``T:name``."""
    return [[p if isinstance(p, str) else "T:" + p["name"] for p in v] for v in views]


# ----------------------------------------------------------------------------- A


def test_a_file_next_to_prefer_only_defines_the_names_prefer_uses(tmp_path, capsys):
    f = _file(tmp_path, PIRATE_TOML)
    code, out, err = run_main(
        [*TOY, "--preferences-file", f, "--prefer", "pirate", "--prefer", "humor", "--json"], capsys
    )
    assert code == 0, err
    res = json.loads(out)
    assert _names(res["settings"]["views"]) == [["T:pirate"], ["humor"]]
    assert res["settings"]["views"][0][0]["description"] == "Talk like a pirate"
    assert len(res["stats"]["prompt_tokens"]) == 2 and "carry the same preferences" not in err


def test_the_files_entries_that_prefer_does_not_name_are_no_views(tmp_path, capsys):
    f = _file(tmp_path, PIRATE_TOML + PARROT_TOML)
    code, out, err = run_main(
        [*TOY, "--preferences-file", f, "--prefer", "humor", "--prefer", "concise", "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out)["settings"]["views"] == [["humor"], ["concise"]]
    # alone, the file's entries are the views, one each (unchanged)
    code, out, err = run_main([*TOY, "--preferences-file", f, "--json"], capsys)
    assert code == 0, err
    assert _names(json.loads(out)["settings"]["views"]) == [["T:pirate"], ["T:parrot"]]


def test_a_file_that_adjusts_a_builtin_is_what_prefer_names_once(tmp_path, capsys):
    f = _file(tmp_path, ADJUSTED_TOML)
    code, out, err = run_main(
        [*TOY, "--preferences-file", f, "--prefer", "concise", "--prefer", "humor", "--json"], capsys
    )
    assert code == 0, err
    views = json.loads(out)["settings"]["views"]
    assert len(views) == 2 and views[1] == ["humor"]
    assert views[0][0]["name"] == "concise" and views[0][0]["examples"] == [{"q": "Q1?", "a": "Short."}]


def test_a_typo_in_prefer_is_told_the_files_names(tmp_path, capsys):
    f = _file(tmp_path, PIRATE_TOML)
    code, _, err = run_main([*TOY, "--preferences-file", f, "--prefer", "pirat", "--prefer", "humor"], capsys)
    one_line(code, err, "unknown preference 'pirat'; did you mean pirate?")


def _views_of(**kw):
    with pj.PersonaJudge(MODEL) as model, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = model.generate("hi", seed=1, **kw)
    repeats = [
        w for w in caught if issubclass(w.category, PersonaJudgeWarning) and "same preferences" in str(w.message)
    ]
    return _names(res.settings["views"]), res.stats.prompt_tokens, repeats


def test_a_preference_object_that_a_string_of_the_list_names_defines_it_instead_of_adding_a_view():
    views, tokens, repeats = _views_of(preferences=[PIRATE, "pirate", "humor"])
    assert views == [["T:pirate"], ["humor"]] and len(tokens) == 2 and repeats == []
    # the order is the strings': the object takes the place of the name
    assert _views_of(preferences=["humor", PIRATE, "Pirate"])[0] == [["humor"], ["T:pirate"]]
    # an object no string names is a view of its own, as before
    assert _views_of(preferences=[PIRATE, "humor"])[0] == [["T:pirate"], ["humor"]]
    # next to views, the objects define the names the views use, and the views decide
    assert _views_of(preferences=[PIRATE], views=[["pirate", "concise"], ["humor"]])[0] == [
        ["T:pirate", "concise"],
        ["humor"],
    ]


# ----------------------------------------------------------------------------- B


BENCH = ["bench", "--backend", "toy", "--json", "--repeats", "1", "--no-memory", "--no-steps", "--max-new-tokens", "4"]


@pytest.mark.parametrize("text,prefer", [(PIRATE_TOML, "pirate"), (ADJUSTED_TOML, "concise")])
def test_bench_view_preferences_replay_in_a_config_as_the_run(text, prefer, tmp_path, capsys):
    """A file's ``pirate`` reported by name was an unknown preference in a config; a file's ``concise`` (own
    examples) reported by name replayed silently as the built-in one."""
    f = _file(tmp_path, text)
    flags = ["--preferences-file", f, "--prefer", prefer, "--prefer", "humor"]
    code, out, err = run_main([*BENCH, "--methods", "plain,persona-judge", *flags], capsys)
    assert code == 0, err
    groups = json.loads(out)["settings"]["view_preferences"]
    assert isinstance(groups[0][0], dict) and groups[1] == ["humor"]
    code, out, err = run_main([*TOY, *flags, "--json"], capsys)
    assert code == 0, err
    direct = json.loads(out)
    assert groups == direct["settings"]["views"]  # reported as generate reports them
    with pj.PersonaJudge({**MODEL, "views": groups}) as model:
        again = model.generate("hi", seed=1, max_new_tokens=2)
    assert again.stats.prompt_tokens == direct["stats"]["prompt_tokens"] and again.tokens == direct["tokens"]


# ----------------------------------------------------------------------------- C


def test_a_view_mostly_of_the_encoders_text_is_not_told_to_shorten_the_prompt():
    with pytest.raises(ContextLengthError) as e:
        check_contexts([[1] * 103, [1] * 110], 64, prompt_tokens=lambda: 6)
    msg = str(e.value)
    assert "103 tokens" in msg and "only 6 of them are your text" in msg
    assert "--encoder plain" in msg and "--encoder instruction" in msg and "--n-ctx" in msg
    assert "shorten the prompt" not in msg
    # at the model's own maximum a larger context is no remedy
    with pytest.raises(ContextLengthError) as e:
        check_contexts([[1] * 103, [1] * 110], 64, model_max=64, prompt_tokens=lambda: 6)
    assert "--encoder plain" in str(e.value) and "--n-ctx" not in str(e.value)


def test_a_view_mostly_of_the_users_prompt_is_still_told_to_shorten_it():
    with pytest.raises(ContextLengthError, match="shorten the prompt or raise the context size"):
        check_contexts([[1] * 103, [1] * 110], 64, prompt_tokens=lambda: 90)
    with pytest.raises(ContextLengthError, match="shorten the prompt"):  # the prompt alone does not fit
        check_contexts([[1] * 300, [1] * 310], 64, prompt_tokens=lambda: 100)


def test_the_prompt_is_counted_only_when_a_view_is_too_long():
    def never() -> int:
        raise AssertionError("counted although every view fits")

    check_contexts([[1] * 10, [1] * 12], 64, prompt_tokens=never)


def test_a_short_prompt_whose_exemplars_overflow_end_to_end(capsys):
    prompt = "Why is the sky blue?"
    with pj.PersonaJudge({"backend": {"name": "toy", "n_ctx": 200}}) as model:
        own = len(model.backend.tokenizer.encode(prompt, add_bos=False))
        with pytest.raises(ContextLengthError) as e:
            model.generate(prompt, preferences=["concise", "humor"], max_new_tokens=4)
        with pytest.raises(ContextLengthError, match=f"only {own} of them are your text"):
            model.generate_batch([prompt], preferences=["concise", "humor"], max_new_tokens=4)
        with pytest.raises(ContextLengthError, match=f"only {own} of them are your text"):
            model.submit(prompt, preferences=["concise", "humor"], wait=False)
    assert f"only {own} of them are your text" in str(e.value) and "shorten the prompt" not in str(e.value)
    code, _, err = run_main(
        ["generate", prompt, "--backend", "toy", "--n-ctx", "200", "--prefer", "concise", "--prefer", "humor"], capsys
    )
    one_line(code, err, "--encoder plain", f"only {own} of them are your text")


# ----------------------------------------------------------------------------- D


@pytest.mark.parametrize("flag", [["--max-new-tokens", "4"], ["--seed", "3"]])
def test_bench_serve_refuses_the_flags_each_request_overrides(flag, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import personajudge.serve.bench as serve_bench

    refuse_calls(monkeypatch, serve_bench, "direct_row", "the bench ran although a flag it ignores was given")
    code, _, err = run_main(["bench-serve", "--backend", "toy", "--requests", "2", "--concurrency", "1", *flag], capsys)
    one_line(code, err, "--max-tokens", "request i uses seed i", flag[0])


# ----------------------------------------------------------------------------- F


def test_the_readme_quotes_the_table_entrys_misspelt_name_message(tmp_path, capsys):
    readme = " ".join((ROOT / "README.md").read_text().split())
    f = _file(tmp_path, '[[preferences]]\nname = "concize"\n', "prefs.toml")
    code, _, err = run_main(["generate", "hi", "--backend", "toy", "--preferences-file", f], capsys)
    assert code == 2
    message = err.strip().removeprefix("personajudge: error: ").replace(f, "prefs.toml")
    assert f"`{message}`" in readme


# ----------------------------------------------------------------------------- H


def test_no_install_hint_names_a_package_index_the_project_is_not_on():
    """``pip install "persona-judge[x]"`` finds nothing; from a clone, ``pip install -e ".[x]"`` works."""
    pattern = re.compile(r"pip install [\"']?persona-judge\[")
    files = [ROOT / "README.md"]
    for folder in ("backends", "core", "plugins", "preferences", "personajudge", "examples"):
        files += sorted((ROOT / folder).rglob("*.py"))
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []


# ----------------------------------------------------------------------------- I


def test_a_calls_views_and_preferences_take_the_tables_settings_report(tmp_path, capsys):
    f = _file(tmp_path, PIRATE_TOML)
    code, out, err = run_main(
        [*TOY, "--preferences-file", f, "--view", "pirate,concise", "--view", "humor", "--json"], capsys
    )
    assert code == 0, err
    res = json.loads(out)
    with pj.PersonaJudge(MODEL) as model:
        again = model.generate("hi", views=res["settings"]["views"], seed=1, max_new_tokens=2)
        table = res["settings"]["views"][0][0]
        flat = model.generate("hi", preferences=[table, "humor"], seed=1, max_new_tokens=2)
        one = model.generate("hi", preferences=table, seed=1, max_new_tokens=2, method="prompt")
        with pytest.raises(ConfigError, match=r"preferences\[1\] must be a preference name, a description, a table"):
            model.generate("hi", preferences=["humor", 3])
    assert again.tokens == res["tokens"] and again.settings["views"] == res["settings"]["views"]
    assert _names(flat.settings["views"]) == [["T:pirate"], ["humor"]]
    assert _names(one.settings["views"]) == [["T:pirate"]]  # a bare table is one preference


def test_views_and_preferences_empty_mean_no_preferences_on_the_server(tmp_path):
    """Also A on the server: --preferences-file with --prefer gives the --prefer list's views."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_helpers import running_server

    f = _file(tmp_path, PIRATE_TOML + PARROT_TOML)
    flags = [
        "--backend",
        "toy",
        "--encoder",
        "plain",
        "--preferences-file",
        f,
        "--prefer",
        "pirate",
        "--prefer",
        "humor",
    ]
    body = {"model": "persona-judge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1}
    with running_server(flags, tmp_path / "server.log") as (base, _), httpx.Client(timeout=60) as c:
        got = {
            name: c.post(base + "/v1/chat/completions", json={**body, **extra})
            for name, extra in {
                "default": {},
                "named": {"preferences": ["pirate", "humor"]},
                "no views": {"views": []},
                "no preferences": {"preferences": []},
                "views empty, preferences given": {"views": [], "preferences": ["pirate", "humor"]},
                "an empty view": {"views": [[]]},
            }.items()
        }
    for name, r in got.items():
        assert r.status_code == (400 if name == "an empty view" else 200), (name, r.text)
    info = {name: r.json()["persona_judge"] for name, r in got.items() if r.status_code == 200}
    assert info["default"]["views"] == 2 and info["default"]["prompt_tokens"] == info["named"]["prompt_tokens"]
    assert info["views empty, preferences given"]["prompt_tokens"] == info["named"]["prompt_tokens"]
    for name in ("no views", "no preferences"):
        assert info[name]["views"] == 1 and info[name]["acceptance_rate"] is None
    assert info["no views"]["prompt_tokens"] == info["no preferences"]["prompt_tokens"]
    assert info["no views"]["prompt_tokens"][0] < min(info["default"]["prompt_tokens"])
    assert got["an empty view"].json()["error"]["message"] == "view 1 is empty"


# ----------------------------------------------------------------------------- J


def _help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "command,flags",
    [
        ("eval", ["--method METHOD", "--preferences-file FILE"]),
        ("bench", ["--method METHOD", "--stop STOP"]),
        ("bench-serve", ["--max-new-tokens MAX_NEW_TOKENS", "--seed SEED", "--host HOST", "--port PORT"]),
    ],
)
def test_help_says_which_flags_the_command_refuses(command, flags, capsys):
    text = _help([command], capsys)
    for flag in flags:
        described = text.split(f" {flag} ", 2)[-1]  # the option list's entry (the usage line comes first)
        assert re.match(r"(refused|not used)\b", described), (flag, described[:80])
