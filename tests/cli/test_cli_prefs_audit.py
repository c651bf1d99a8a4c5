"""The CLI's preferences: a file's names in --view, bench's preferences and views, checks before the model
loads, the --encoder help."""

import json

import pytest

from personajudge.api import PersonaJudge
from personajudge.cli import build_parser, main

PIRATE_TOML = """[[preferences]]
name = "pirate"
description = "Talk like a pirate"
examples = [{q = "Where is the ship?", a = "Arr, she be in the harbour, matey."}]

[[preferences]]
name = "concise"
examples = [{q = "Why?", a = "Because."}]
"""
BENCH = ["bench", "--backend", "toy", "--json", "--repeats", "1", "--no-memory", "--no-steps", "--max-new-tokens", "4"]


@pytest.fixture
def prefs_file(tmp_path):
    f = tmp_path / "prefs.toml"
    f.write_text(PIRATE_TOML)
    return str(f)


def _names(views):
    """The preference names of reported views (a file's preference is reported as its table)."""
    return [[p if isinstance(p, str) else p["name"] for p in v] for v in views]


def _json_out(capsys):
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_views_use_the_names_a_preferences_file_defines_and_adjusts(prefs_file, capsys):
    rc = main(
        ["generate", "hi", "--backend", "toy", "--preferences-file", prefs_file, "--view", "pirate,concise"]
        + ["--view", "humor", "--max-new-tokens", "2", "--seed", "1", "--json", "--show-prompt"]
    )
    out, err = _json_out(capsys)
    assert rc == 0, err
    # the file's preferences are reported as their tables (audit prefs2 A: the settings alone repeat a run)
    assert _names(out["settings"]["views"]) == [["pirate", "concise"], ["humor"]]
    assert out["settings"]["views"][0][1]["examples"] == [{"q": "Why?", "a": "Because."}]
    view0 = err.split("# --- view 0")[1].split("# --- end of view 0")[0]
    assert "Arr, she be in the harbour" in view0 and "Answer: Because." in view0  # the file's concise, not the built-in
    assert "ignored" not in err


def test_a_preferences_file_replaces_a_config_files_views(prefs_file, tmp_path, capsys):
    """Flags override the config file: the file's preferences run, one view each; to group them, --view."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('views = [["expert"], ["concise", "humor"]]\n')
    rc = main(
        ["generate", "hi", "--backend", "toy", "--config", str(cfg), "--preferences-file", prefs_file]
        + ["--max-new-tokens", "2", "--json"]
    )
    out, err = _json_out(capsys)
    assert rc == 0, err
    assert _names(out["settings"]["views"]) == [["pirate"], ["concise"]] and "ignored" not in err


def test_a_view_description_with_a_comma_stays_one_preference(prefs_file, capsys):
    """--view splits at commas only where every piece could be a name (as views= does in Python):
    a description with a comma is one preference, and a file's name still splits from a built-in."""
    rc = main(
        [
            "generate",
            "hi",
            "--backend",
            "toy",
            "--preferences-file",
            prefs_file,
            "--view",
            "answer briefly, with humour",
        ]
        + ["--view", "pirate, humor", "--max-new-tokens", "2", "--json", "--show-prompt"]
    )
    out, err = _json_out(capsys)
    assert rc == 0, err
    assert out["settings"]["views"][0] == ["answer briefly, with humour"]  # free text: by its text
    assert _names(out["settings"]["views"])[1] == ["pirate", "humor"]
    view0 = err.split("# --- view 0")[1].split("# --- end of view 0")[0]
    assert "answer briefly, with humour" in view0


def test_a_view_name_no_file_defines_is_still_an_error(prefs_file, capsys):
    rc = main(
        ["generate", "hi", "--backend", "toy", "--preferences-file", prefs_file, "--view", "parrot", "--view", "humor"]
    )
    assert rc == 2 and "unknown preference 'parrot'" in capsys.readouterr().err


def test_bench_keeps_a_files_preferences_as_they_are(tmp_path, capsys):
    names = tmp_path / "p2.json"
    names.write_text('["concise", "humor"]')
    assert main(BENCH + ["--methods", "persona-judge", "--preferences-file", str(names)]) == 0
    out, _ = _json_out(capsys)
    assert out["settings"]["preferences"] == ["concise", "humor"]  # not their descriptions as free text


def test_bench_times_the_views_given_with_view(prefs_file, capsys):
    assert main(BENCH + ["--methods", "plain,persona-judge", "--view", "expert,vivid", "--view", "humor"]) == 0
    out, _ = _json_out(capsys)
    assert out["settings"]["preferences"] == ["expert,vivid", "humor"] and out["settings"]["views"] == 2
    rows = {r["method"]: r for r in out["results"]}
    assert rows["persona-judge"]["views"] == 2 and rows["plain"]["views"] == 1
    assert (
        main(
            BENCH
            + [
                "--methods",
                "persona-judge",
                "--preferences-file",
                prefs_file,
                "--view",
                "pirate,concise",
                "--view",
                "humor",
            ]
        )
        == 0
    )
    out, _ = _json_out(capsys)
    assert out["settings"]["preferences"] == ["pirate,concise", "humor"]


def test_bench_views_count_must_match_the_views_given(capsys):
    assert main(BENCH + ["--view", "expert", "--view", "humor", "--views", "3"]) == 2
    assert "--views 3 does not match the 2 --view groups" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--prefer", "concize", "--prefer", "humor"], "did you mean concise"),
        (["--view", "concise,humr", "--view", "humor"], "did you mean humor"),
        (["--prefer", "concise,humor"], "in one string"),
        (["--encoder", "exemplar", "--prefer", "concise", "--prefer", "humor"], None),
    ],
)
def test_preference_mistakes_are_reported_before_the_model_loads(monkeypatch, tmp_path, flags, needle, capsys):
    missing = str(tmp_path / "missing.gguf")
    rc = main(["generate", "hi", "--model", missing] + flags)
    err = capsys.readouterr().err
    assert rc == 2
    if needle is None:  # the control: with valid preferences, the missing model is what is reported
        assert "model file not found" in err
    else:
        assert needle in err and "model file not found" not in err


def test_a_named_encoders_options_are_checked_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import personajudge.api as api

    monkeypatch.setattr(api, "load_backend", lambda cfg: pytest.fail("the backend was loaded"))
    cfg = tmp_path / "c.toml"
    cfg.write_text('encoder = "exemplar"\nencoder_options = {nn = 1}\n')
    assert main(["generate", "hi", "--config", str(cfg), "--prefer", "concise", "--prefer", "humor"]) == 2
    assert "unknown option(s) for the exemplar encoder: nn" in capsys.readouterr().err
    with pytest.raises(pytest.fail.Exception, match="the backend was loaded"):  # the control: valid options do load
        PersonaJudge({"encoder": "exemplar", "encoder_options": {"n": 1}})


def test_encoder_help_names_every_builtin_and_what_auto_picks():
    gen = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions if a.dest == "encoder"
    )
    for word in ("auto", "chat-turn", "system", "plain", "instruction", "exemplar"):
        assert word in gen.help
    assert "else exemplar when every preference has examples, else plain" in gen.help
