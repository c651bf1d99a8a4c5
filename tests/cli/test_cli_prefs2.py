"""The command line with your own preferences (audit prefs2, findings A, B, C, H): a file's names mean the
file's preferences in --prefer as in --view, its mistakes are one line naming the entry, and a free text
is never labelled as a built-in."""

import json

import pytest
from cli_lines import one_line, run_main

TOY = ["generate", "hi", "--backend", "toy", "--max-new-tokens", "2", "--seed", "1"]
ADJUSTED = '[[preferences]]\nname = "concise"\nexamples = [{q = "What is 2+2?", a = "4."}]\n'
COLLIDE = '[[preferences]]\nname = "Concise"\ndescription = "Write a very long answer"\n'
PIRATE = '[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\n'


def _file(tmp_path, text, name="prefs.toml"):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


def _views(err):
    """Each view's text in a --show-prompt output."""
    blocks = err.split("# --- view ")[1:]
    return [b.split("\n", 1)[1].split("# --- end of view")[0] for b in blocks]


def test_prefer_names_the_files_adjusted_preference(tmp_path, capsys):
    """``--prefer concise`` next to a file that adjusts concise is the file's (as in --view), and the file
    only defines it: one view of it, not the file's entry and then the --prefer again (audit readme2 A)."""
    f = _file(tmp_path, ADJUSTED)
    flags = ["--preferences-file", f, "--prefer", "concise", "--prefer", "humor", "--show-prompt", "--json"]
    code, out, err = run_main([*TOY, *flags], capsys)
    assert code == 0, err
    views = _views(err)
    assert len(views) == 2 and "Question: What is 2+2?\nAnswer: 4." in views[0], err
    assert "Question: What is 2+2?" not in views[1] and "carry the same preferences" not in err
    assert len(json.loads(out)["stats"]["prompt_tokens"]) == 2


def test_prefer_names_the_files_definition_in_any_case(tmp_path, capsys):
    f = _file(tmp_path, COLLIDE)
    code, _, err = run_main([*TOY, "--preferences-file", f, "--prefer", "concise", "--show-prompt"], capsys)
    assert code == 0, err
    assert [v.count("Instructions: Write a very long answer") for v in _views(err)] == [1], err
    f = _file(tmp_path, PIRATE, "pirate.toml")
    code, out, err = run_main(
        [*TOY, "--preferences-file", f, "--prefer", "Pirate", "--prefer", "humor", "--json"], capsys
    )
    assert code == 0, err
    views = json.loads(out)["settings"]["views"]
    assert len(views) == 2 and views[1] == ["humor"]
    assert views[0][0]["name"] == "pirate" and views[0][0]["description"] == "Talk like a pirate"


def test_a_name_twice_in_a_file_is_one_line_naming_the_file_and_both_entries(tmp_path, capsys):
    f = _file(tmp_path, PIRATE + PIRATE.replace("pirate", "ninja", 1).replace('name = "ninja"', 'name = "Pirate"'))
    for flags in (["--prefer", "concise"], ["--view", "pirate,humor", "--view", "concise"]):
        code, _, err = run_main([*TOY, "--preferences-file", f, *flags], capsys)
        one_line(code, err, f"preferences file {f}: entries 1 and 2 are both named 'Pirate'")


def test_a_typo_in_a_string_entry_names_the_file_and_the_entry(tmp_path, capsys):
    f = _file(tmp_path, 'preferences = ["concize"]\n')
    code, _, err = run_main([*TOY, "--preferences-file", f], capsys)
    one_line(code, err, f"preferences file {f}, entry 1: unknown preference 'concize'; did you mean concise?")


def test_a_free_text_whose_slug_is_a_builtin_name_is_labelled_and_reported_by_its_text(capsys):
    code, out, err = run_main([*TOY, "--prefer", "humor !", "--prefer", "concise", "--show-prompt", "--json"], capsys)
    assert code == 0, err
    assert "# --- view 0 (humor !) ---" in err and "# --- view 0 (humor) ---" not in err
    assert json.loads(out)["settings"]["views"] == [["humor !"], ["concise"]]


@pytest.mark.parametrize("prefer", ["talk like a pirate", "简洁明了地回答"])
def test_free_text_is_reported_by_its_text(prefer, capsys):
    code, out, err = run_main([*TOY, "--prefer", prefer, "--prefer", "concise", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["settings"]["views"] == [[prefer], ["concise"]]
