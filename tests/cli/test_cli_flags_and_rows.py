"""Flags against the config file, flags and row fields that would do nothing, JSONL lines split on
"\\n" only, and ``settings`` complete enough to repeat a run (audit of the command line, findings B,
C, G and H)."""

import copy
import json

import pytest
from cli_lines import one_line, run_main
from replay import config_from_settings

from personajudge.api import PersonaJudge
from personajudge.batch import read_records
from personajudge.cli import main
from personajudge.core.errors import ConfigError
from personajudge.core.files import jsonl_lines
from personajudge.evaluation.dataset import read_prompts

TOY = ["--backend", "toy", "--max-new-tokens", "4", "--seed", "1"]
PREFS = ["--prefer", "concise", "--prefer", "humor"]
IGNORED = "the preferences given alongside views are ignored"


def toml(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- B: flags override the config file's preferences and views ----------------------------------------


def test_prefer_replaces_the_config_files_views(tmp_path, capsys):
    """The file's views ran and the flags were dropped, with a warning about preferences "given alongside"."""
    cfg = toml(tmp_path, 'views = [["concise", "humor"], ["expert"]]\n')
    code, out, err = run_main(
        ["generate", "hi", *TOY, "--config", cfg, "--prefer", "friendly", "--prefer", "sassy", "--json"], capsys
    )
    assert code == 0, err
    assert json.loads(out)["settings"]["views"] == [["friendly"], ["sassy"]] and IGNORED not in err


def test_a_preferences_file_replaces_the_config_files_views(tmp_path, capsys):
    cfg = toml(tmp_path, 'views = [["concise", "humor"], ["expert"]]\n')
    prefs = toml(tmp_path, 'preferences = ["friendly", "sassy"]\n', "prefs.toml")
    code, out, err = run_main(["generate", "hi", *TOY, "--config", cfg, "--preferences-file", prefs, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["settings"]["views"] == [["friendly"], ["sassy"]] and IGNORED not in err


def test_view_replaces_the_config_files_preferences_without_a_warning(tmp_path, capsys):
    """The flag views ran, but the warning blamed preferences the user never gave on the command line."""
    cfg = toml(tmp_path, 'preferences = ["concise", "humor"]\n')
    argv = ["generate", "hi", *TOY, "--config", cfg, "--view", "friendly,sassy", "--view", "concise", "--json"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert json.loads(out)["settings"]["views"] == [["friendly", "sassy"], ["concise"]]
    assert err == "", err


def test_the_warning_stays_for_what_the_user_gave_together_on_the_command_line(capsys):
    argv = ["generate", "hi", *TOY, "--prefer", "concise", "--view", "humor", "--view", "expert", "-q"]
    code, _, err = run_main(argv, capsys)
    assert code == 0 and IGNORED in err


def test_the_warning_stays_for_what_the_user_gave_together_in_the_file(tmp_path, capsys):
    cfg = toml(tmp_path, 'preferences = ["concise"]\nviews = [["humor"], ["expert"]]\n')
    code, _, err = run_main(["generate", "hi", *TOY, "--config", cfg, "-q"], capsys)
    assert code == 0 and IGNORED in err


# -- C: JSONL lines end at "\n" only ---------------------------------------------------------------


#: what str.splitlines splits on and JSON allows raw in a string (\x0b, \x0c, \x1c-\x1e must be escaped)
SEPARATORS = ["\u2028", "\u2029", "\u0085"]


def test_jsonl_lines_split_on_newline_only_and_drop_one_carriage_return():
    assert jsonl_lines('{"a": "x\u2028y"}\r\n{"b": 1}\n') == ['{"a": "x\u2028y"}', '{"b": 1}', ""]
    assert jsonl_lines("a\r\r\nb") == ["a\r", "b"]  # one "\r" per line, not every one


@pytest.mark.parametrize("sep", SEPARATORS)
def test_a_raw_separator_inside_a_string_is_one_valid_line(sep, tmp_path):
    """str.splitlines cut the line in two: "not valid JSON", and every later line number shifted."""
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": f"one{sep}two"}, ensure_ascii=False) + "\n" + '{"prompt": "b"}\n')
    assert sep in path.read_text()  # written raw, as the batch's own writer does (ensure_ascii=False)
    recs = read_records(path)
    assert [(r.id, r.prompt) for r in recs] == [(1, f"one{sep}two"), (2, "b")]
    assert [r.where for r in recs] == [f"{path}:1", f"{path}:2"]
    assert [p.prompt for p in read_prompts(path)] == [f"one{sep}two", "b"]  # eval --dataset reads alike


def test_the_batch_output_holds_raw_separators_and_reads_back_line_by_line(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "x", "prompt": "para one\\u2028para two"}\n')
    assert main(["generate", "--input", str(inp), "--output", str(out), *TOY, *PREFS, "-q"]) == 0
    text = out.read_text()
    assert "\u2028" in text
    rows = [json.loads(line) for line in jsonl_lines(text) if line]
    assert [(r["id"], r["prompt"]) for r in rows] == [("x", "para one\u2028para two")]
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps({"prompt": rows[0]["prompt"]}, ensure_ascii=False) + "\n")
    assert [r.prompt for r in read_records(again)] == ["para one\u2028para two"]


def test_a_json_error_names_the_column_once(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "abc\n')
    with pytest.raises(ConfigError) as info:
        read_records(path)
    msg = str(info.value)
    assert msg == f"{path}:1: not valid JSON (Unterminated string starting at: column 12)"


# -- G: flags and fields that would do nothing ---------------------------------------------------------


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    return path


@pytest.mark.parametrize(
    "flag, needle", [("--show-prompt", "--show-prompt does nothing with --input"), ("--json", "--json does nothing")]
)
def test_single_prompt_flags_with_input_warn(flag, needle, prompts, capsys):
    code, out, err = run_main(["generate", "--input", str(prompts), *TOY, *PREFS, flag, "-q"], capsys)
    assert code == 0 and json.loads(out)["prompt"] == "a"
    assert err.startswith("personajudge: warning: ") and needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--batch-size", "4"], ["--overwrite"], ["--force"]])
def test_batch_flags_without_input_are_refused_like_output(flags, capsys):
    code, out, err = run_main(["generate", "hi", *TOY, *PREFS, *flags], capsys)
    one_line(code, err, f"{flags[0]} needs --input FILE.jsonl")
    assert out == ""


@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "a", "seeed": 5}, 'unknown field "seeed"; did you mean "seed"?'),
        ({"promt": "a"}, 'unknown field "promt"; did you mean "prompt"?'),
        ({"prompt": "a", "ID": 3}, 'unknown field "ID"; did you mean "id"?'),
        ({"prompt": "a", "max_new_tokens": 3, "preferences": ["x"]}, 'unknown fields "max_new_tokens", "preferences"'),
        ({"id": 1, "prompt": "a", "text": "b", "finish_reason": "stop"}, "a result row, not a prompt line"),
    ],
)
def test_an_unknown_field_in_a_row_is_one_line_naming_the_line(row, needle, tmp_path, capsys):
    """``{"prompt": "a", "seeed": 5}`` ran with the default seed, the typo unnoticed."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fine"}\n' + json.dumps(row) + "\n")
    code, out, err = run_main(["generate", "--input", str(path), *TOY, *PREFS], capsys)
    one_line(code, err, f"{path}:2: ", needle)
    assert out == ""


def test_the_documented_fields_and_chat_messages_are_accepted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a", "id": "x", "seed": 3}\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
    recs = read_records(path)
    assert [(r.id, r.seed) for r in recs] == [("x", 3), (2, None)] and recs[1].prompt[0]["content"] == "hi"


# -- H: settings carry everything that decides the output ----------------------------------------------


FULL = {
    "system": "S",
    "method": "mod",
    "preferences": ["concise", "humor"],
    "method_options": {"weights": [0.9, 0.1]},
    "encoder": "plain",
    "encoder_options": {"template": "dialogue"},
    "backend": {"name": "toy", "options": {"view_strength": 0.5}},
    "decoding": {"repeat_lines": 0, "max_new_tokens": 24, "seed": 1},
}


def _tokens(config):
    with PersonaJudge(config) as pj:
        res = pj.generate("hi")
        return res.tokens, res.settings


def test_a_run_can_be_repeated_from_its_settings():
    tokens, settings = _tokens(FULL)
    assert settings["system"] == "S" and settings["method_options"] == {"weights": [0.9, 0.1]}
    assert settings["encoder_options"] == {"template": "dialogue"} and settings["decoding"]["repeat_lines"] == 0
    assert settings["backend_options"] == {"view_strength": 0.5}
    rebuilt = config_from_settings(settings)
    assert _tokens(rebuilt)[0] == tokens
    # negative control: each of the fields settings lacked before changes these tokens when left out
    for key in ("system", "method_options", "encoder_options"):
        assert _tokens({k: v for k, v in rebuilt.items() if k != key})[0] != tokens, key
    without = copy.deepcopy(rebuilt)
    del without["backend"]["options"]
    assert _tokens(without)[0] != tokens


@pytest.mark.parametrize(
    "flags, roles",
    [([], "alternate"), (["--method", "persona-judge-base"], "fixed"), (["--roles", "round-robin"], "round-robin")],
)
def test_settings_report_the_role_schedule_that_runs(flags, roles, capsys):
    code, out, err = run_main(["generate", "hi", *TOY, *PREFS, *flags, "--json"], capsys)
    assert code == 0, err and json.loads(out)["settings"]["decoding"]["roles"] == roles
    assert json.loads(out)["settings"]["decoding"]["roles"] == roles


def test_settings_report_no_views_for_a_method_that_uses_none(capsys):
    code, out, _ = run_main(["generate", "hi", *TOY, *PREFS, "--method", "base", "--json"], capsys)
    assert code == 0 and json.loads(out)["settings"]["views"] == []
    code, out, _ = run_main(["generate", "hi", *TOY, *PREFS, "--method", "prompt", "--json"], capsys)
    assert code == 0 and json.loads(out)["settings"]["views"] == [["concise"], ["humor"]]


@pytest.mark.parametrize(
    "flags",
    [
        ["--prefer", "talk like a pirate", "--prefer", "concise"],  # free text
        ["--prefer", "humor !", "--prefer", "concise"],  # free text whose slug is a built-in's name
        ["--preferences-file", "PIRATE", "--prefer", "pirate", "--prefer", "concise"],  # a file-defined preference
        ["--preferences-file", "ADJUSTED", "--prefer", "concise", "--prefer", "humor"],  # an adjusted built-in
        ["--preferences-file", "PIRATE", "--view", "pirate,humor", "--view", "concise"],
    ],
)
def test_a_run_with_its_own_preferences_can_be_repeated_from_its_settings(flags, tmp_path, capsys):
    """Audit prefs2 A: settings named views by a slug or by the file's name, so the replay failed or differed."""
    files = {
        "PIRATE": toml(tmp_path, '[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\n', "p.toml"),
        "ADJUSTED": toml(
            tmp_path, '[[preferences]]\nname = "concise"\nexamples = [{q = "2+2?", a = "4."}]\n', "a.toml"
        ),
    }
    argv = [files.get(f, f) for f in flags]
    code, out, err = run_main(
        ["generate", "hi", "--backend", "toy", "--max-new-tokens", "8", "--seed", "1", *argv, "--json"], capsys
    )
    assert code == 0, err
    res = json.loads(out)
    assert _tokens(config_from_settings(res["settings"]))[0] == res["tokens"]
