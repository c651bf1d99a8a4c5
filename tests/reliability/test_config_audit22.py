"""Findings of the configuration audit of session 22 (a helper following the README as a user), each
checked against the behaviour it asked for; every test here fails on the code before its fix.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from cli_lines import one_line, run_main
from replay import config_from_settings

import personajudge as pj
from personajudge.core.errors import ConfigError
from personajudge.core.files import read_text
from personajudge.preferences import resolve

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
PREFS = ["concise", "humor"]


# ---------------------------------------------------------------- F1: mod weights whose sum overflows


@pytest.mark.parametrize("huge,small", [([1e308, 1e308], [1, 1]), ([1e308, 0.0], [1, 0])])
def test_mod_weights_whose_sum_overflows_are_the_same_mixture_as_small_ones(huge, small):
    """Two weights of 1e308 sum to inf; each weight over the sum was 0, no view was active, and the
    mixture summed an empty list: a raw TypeError (a traceback at the CLI). Only the ratios matter."""
    run = {"preferences": PREFS, "method": "mod", "max_new_tokens": 12, "seed": 4}
    outs = []
    for weights in (small, huge):
        with pj.PersonaJudge({**TOY, "method": "mod", "method_options": {"weights": weights}}) as m:
            outs.append(m.generate("hi", **run).tokens)
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_huge_weights_from_a_preferences_file_at_the_cli(tmp_path, capsys):
    """``mod``'s default weights are the preferences' ``weight``s, which have no upper bound."""
    entries = "".join(
        f'[[preferences]]\nname = "{n}"\ndescription = "Talk like a {n}"\nweight = 1e308\n' for n in ("pirate", "robot")
    )
    (tmp_path / "p.toml").write_text(entries)
    argv = ["generate", "hi", "--backend", "toy", "--method", "mod", "--preferences-file", str(tmp_path / "p.toml")]
    code, out, err = run_main([*argv, "--max-new-tokens", "3", "--seed", "1"], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert out.strip()


def test_non_finite_mod_weights_are_still_refused():
    with pytest.raises(ConfigError, match="weights"):
        with pj.PersonaJudge({**TOY, "method": "mod", "method_options": {"weights": [float("inf"), 1]}}) as m:
            m.generate("hi", preferences=PREFS)


# ---------------------------------------------------------------- F4, F11: what an unknown name's error says


def test_an_unknown_preference_names_the_plugin_selection_as_a_likely_cause(monkeypatch):
    """Unknown backends, encoders and methods named ``PERSONAJUDGE_PLUGINS`` when it was set; an unknown
    preference (a plugin's, left out by the selection) did not."""
    monkeypatch.setenv("PERSONAJUDGE_PLUGINS", "none")
    with pytest.raises(
        pj.UnknownPreferenceError, match=r"unknown preference 'pirat'.*\(PERSONAJUDGE_PLUGINS='none' loads"
    ):
        resolve("pirat")
    with pytest.raises(pj.PreferenceError, match=r"'pirat' is no preference name.*PERSONAJUDGE_PLUGINS='none'"):
        resolve({"name": "pirat"})
    monkeypatch.delenv("PERSONAJUDGE_PLUGINS")
    with pytest.raises(pj.UnknownPreferenceError) as err:
        resolve("pirat")
    assert "PERSONAJUDGE_PLUGINS" not in str(err.value)


@pytest.mark.parametrize(
    "flag,given,meant",
    [
        ("--backend", "llama_cpp", "llama-cpp"),
        ("--method", "persona_judge", "persona-judge"),
        ("--method", "Persona-Judge", "persona-judge"),
        ("--encoder", "chat_turn", "chat-turn"),
        ("--encoder", "plian", "plain"),
    ],
)
def test_an_unknown_plugin_name_gets_a_did_you_mean(capsys, flag, given, meant):
    """``llama_cpp`` is the Python package's own spelling of the backend; keys and preferences had a
    did-you-mean, plugin names had only the list."""
    code, _, err = run_main(["generate", "hi", "--backend", "toy", flag, given, "--max-new-tokens", "2"], capsys)
    one_line(code, err, f"unknown {flag[2:]} '{given}' (did you mean {meant}?); registered {flag[2:]}s: ")


def test_no_did_you_mean_for_a_name_like_none():
    with pytest.raises(pj.UnknownPluginError) as err:
        pj.PersonaJudge({"backend": {"name": "nope"}})
    assert "did you mean" not in str(err.value)


# ---------------------------------------------------------------- F5: a number where an option takes text


@pytest.mark.parametrize("value,text", [("1234567", "1234567"), ("1.0", "1.0")])
def test_a_number_for_a_text_option_says_how_to_quote_it(tmp_path, capsys, value, text):
    """``--backend-option`` parses VALUE as JSON, so an all-digit commit or tag is a number, refused as "Input
    should be a valid string" with no word on how to pass it as text."""
    argv = ["generate", "hi", "--backend", "hf", "--model", str(tmp_path), "--backend-option", f"revision={value}"]
    code, _, err = run_main(argv, capsys)
    one_line(
        code,
        err,
        f"""backend.options.revision: Input should be a valid string (got {text}); to give it as text, quote it: revision='"{text}"' on the command line""",
    )
    quoted = [*argv[:-1], f'revision="{value}"']
    code, _, err = run_main(quoted, capsys)  # taken: the run goes on to the (empty) model folder
    assert code == 2 and f"backend.options.revision='{text}' picks a hub revision" in err, err
    assert "valid string" not in err and err.strip().endswith("is it a transformers model folder?"), err


def test_a_bool_for_a_text_option_gets_no_quoting_hint(tmp_path, capsys):
    argv = ["generate", "hi", "--backend", "hf", "--model", str(tmp_path), "--backend-option", "revision=true"]
    code, _, err = run_main(argv, capsys)
    one_line(code, err, "backend.options.revision: Input should be a valid string (got True)")
    assert "quote" not in err


# ---------------------------------------------------------------- F6: PERSONAJUDGE_BATCHED


@pytest.mark.parametrize(
    "value,batched", [("0", False), ("OFF", False), (" no ", False), ("1", True), ("on", True), ("", True)]
)
def test_batched_switch_values(monkeypatch, recwarn, value, batched):
    monkeypatch.setenv("PERSONAJUDGE_BATCHED", value)
    with pj.PersonaJudge(TOY) as m:
        assert m.engine.batched is batched
    assert not [w for w in recwarn if "PERSONAJUDGE_BATCHED" in str(w.message)]


@pytest.mark.parametrize("value", ["flase", "disable", "0 # off"])
def test_an_unknown_batched_switch_is_named_in_a_warning_and_stays_on(monkeypatch, value):
    """Any value but the four "off" spellings silently meant on, so a user's A/B comparison compared nothing."""
    monkeypatch.setenv("PERSONAJUDGE_BATCHED", value)
    with pj.PersonaJudge(TOY) as m:
        with pytest.warns(pj.PersonaJudgeWarning, match=rf"PERSONAJUDGE_BATCHED='{value}' is none of 1, 0, true"):
            assert m.engine.batched is True


# ---------------------------------------------------------------- F7: a named pipe nothing writes to


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag,what", [("--config", "config file"), ("--preferences-file", "preferences file")])
def test_a_fifo_without_a_writer_is_refused_not_waited_on(tmp_path, capsys, flag, what):
    """``open()`` of a FIFO waits for a writer: the command hung for ever. Model files and outputs were
    already refused that way; the readers of configs, preferences files and prompt sets now are too."""
    fifo = tmp_path / "cfg.toml"
    os.mkfifo(fifo)
    code, _, err = run_main(["generate", "hi", "--backend", "toy", flag, str(fifo)], capsys)
    one_line(code, err, f"cannot read {what} {fifo}: it is a named pipe (FIFO) that nothing writes to")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("late", [False, True], ids=["written", "writer-waits"])
def test_a_pipe_with_a_writer_is_read_whole(late):
    """Process substitution (``--config <(...)``): a pipe whose writer has written and closed, or holds it
    open and writes later (the first read finds nothing yet, and must wait, not refuse)."""
    text = "encoder = 'plain'\n" + "# padding\n" * 20000  # more than one pipe buffer
    r, w = os.pipe()

    def write():
        if late:
            time.sleep(0.3)
        with os.fdopen(w, "w") as f:
            f.write(text)

    t = threading.Thread(target=write)
    t.start()
    try:
        assert read_text(f"/dev/fd/{r}", "config file", ConfigError) == text
    finally:
        t.join()
        os.close(r)


# ---------------------------------------------------------------- F8, F9: a config's path


def test_the_api_takes_a_config_files_path_as_the_cli_does(tmp_path, monkeypatch):
    """``PersonaJudge("run.toml")`` was "config must be a mapping or RunConfig, got str", with no word of
    ``load_config_file``; the README's configs are files."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('encoder = "plain"\n[backend]\nname = "toy"\n[decoding]\nmax_new_tokens = 5\nseed = 3\n')
    with pj.PersonaJudge(pj.load_config_file(cfg)) as m:
        want = m.generate("hi", preferences=PREFS)
    for given in (cfg, str(cfg)):
        with pj.PersonaJudge(given) as m:
            got = m.generate("hi", preferences=PREFS)
        assert got.tokens == want.tokens and len(got.tokens) == 5
    assert pj.generate("hi", config=cfg, preferences=PREFS).tokens == want.tokens
    monkeypatch.setenv("HOME", str(tmp_path))  # ``~``, as a model path already takes it
    with pj.PersonaJudge("~/run.toml") as m:
        assert m.generate("hi", preferences=PREFS).tokens == want.tokens


def test_a_tilde_in_config_and_preferences_file_flags_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """``--config=~/run.toml`` reaches the program unexpanded (the shell expands only a word that starts
    with ``~``): "config file not found: ~/run.toml", while ``--model ~/...`` was expanded."""
    (tmp_path / "run.toml").write_text('encoder = "plain"\n[decoding]\nmax_new_tokens = 4\n')
    (tmp_path / "p.toml").write_text('[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["generate", "hi", "--backend", "toy", "--config=~/run.toml", "--preferences-file=~/p.toml", "--json"]
    code, out, err = run_main([*argv, "--seed", "1"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 4


# ---------------------------------------------------------------- F3: two tables of one name


PIRATE = {"name": "pirate", "description": "Talk like a pirate"}
ROBOT = {"name": "Pirate", "description": "Talk like a robot"}  # names match in any case


@pytest.mark.parametrize(
    "where",
    [
        {"preferences": [PIRATE, ROBOT]},
        {"views": [[PIRATE], [ROBOT, "concise"]]},
        {"preferences": [pj.Preference(**PIRATE)], "views": [["pirate"], [ROBOT]]},
    ],
    ids=["preferences", "views", "object-and-table"],
)
def test_two_tables_of_one_name_that_prompt_differently_are_refused_as_two_objects_are(where):
    """Two ``Preference`` objects (or two entries of a preferences file) of one name were refused; the same
    two as tables (a config's ``preferences``, a call's) ran, each view's label then naming either."""
    with pj.PersonaJudge(TOY) as m, pytest.raises(pj.PreferenceError, match="two preferences are named"):
        m.generate("hi", max_new_tokens=2, **where)


def test_the_same_table_twice_is_one_preference():
    with pj.PersonaJudge(TOY) as m:
        out = m.generate("hi", views=[[PIRATE], [dict(PIRATE), "concise"]], max_new_tokens=3, seed=1)
    assert len(out.tokens) == 3


# ---------------------------------------------------------------- F10: 1.0 where an integer is due


@pytest.mark.parametrize(
    "data,field",
    [
        ({"decoding": {"seed": 1.0}}, "seed"),
        ({"decoding": {"max_new_tokens": 4.0}}, "max_new_tokens"),
        ({"decoding": {"seed": 1e20}}, "seed"),
        ({"backend": {"name": "toy", "n_ctx": 512.0}}, "n_ctx"),
    ],
)
def test_a_float_where_an_integer_is_due_is_refused_as_elsewhere(data, field):
    """pydantic's lax int took 1.0 as 1, while a batch row's seed, an option's integer and a request's
    ``max_tokens`` refuse it; 1e20 was "unable to parse input string"."""
    with pytest.raises(ConfigError, match=rf"{field} must be an integer, got "):
        pj.build_config(data)


def test_a_float_per_call_keyword_is_refused_and_an_integer_still_runs():
    with pj.PersonaJudge(TOY) as m:
        with pytest.raises(ConfigError, match="max_new_tokens must be an integer, got 4.0"):
            m.generate("hi", preferences=PREFS, max_new_tokens=4.0)
        assert len(m.generate("hi", preferences=PREFS, max_new_tokens=4, seed=1).tokens) == 4


# ---------------------------------------------------------------- F12: a flag that replaces the file's name

MOD_TOML = """method = "mod"
preferences = ["concise", "humor"]
method_options = { weights = [0.7, 0.3] }
encoder = "exemplar"
encoder_options = { n = 1 }
[backend]
name = "toy"
options = { view_strength = 0.5 }
"""


@pytest.mark.parametrize(
    "flags,warned",
    [
        (
            ["--method", "prompt"],
            "--method prompt replaces the config file's method 'mod': its method_options (weights)",
        ),
        (
            ["--encoder", "plain"],
            "--encoder plain replaces the config file's encoder 'exemplar': its encoder_options (n)",
        ),
        (
            ["--backend", "llama-cpp"],
            "--backend llama-cpp replaces the config file's backend.name 'toy': its backend.options",
        ),
    ],
)
def test_a_flag_that_replaces_the_files_name_leaves_its_options_out(tmp_path, capsys, monkeypatch, flags, warned):
    """``--config mod.toml --method prompt`` failed on ``weights``, an option the user never typed: one config
    could not serve a comparison of methods. Now the file's table for the replaced name is left out, with a
    warning; the run goes on (to the model: the llama-cpp case stops there, with a missing model)."""
    cfg = tmp_path / "mod.toml"
    cfg.write_text(MOD_TOML)
    monkeypatch.chdir(tmp_path)
    extra = ["--model", "nosuch.gguf"] if "llama-cpp" in flags else []
    code, _, err = run_main(["generate", "hi", "--config", str(cfg), *flags, *extra, "--max-new-tokens", "3"], capsys)
    (line,) = [ln for ln in err.splitlines() if "replaces the config file's" in ln]
    assert line.startswith("personajudge: warning: ") and warned in line, err
    assert "unknown option" not in err
    assert code == (2 if extra else 0), err


def test_the_flags_own_options_for_the_new_name_are_kept(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "persona-judge"\nmethod_options = {}\npreferences = ["concise", "humor"]\n')
    argv = ["generate", "hi", "--config", str(cfg), "--backend", "toy", "--method", "mod"]
    code, _, err = run_main([*argv, "--method-option", "weights=[1,0]", "--max-new-tokens", "3"], capsys)
    assert code == 0 and "replaces" not in err, err  # an empty table: nothing to leave out
    code, _, err = run_main([*argv, "--method-option", "weights=[1]", "--max-new-tokens", "3"], capsys)
    one_line(code, err, "weights")  # the flag's options still reach the method


# ---------------------------------------------------------------- README audit: a run repeated from its settings


def test_a_run_with_sixteen_stop_strings_is_repeated_from_its_settings():
    """``settings.decoding.stop`` held the run's stop strings and the encoder's: with 16 of the run's own
    and the exemplar encoder's 3, a config rebuilt from the settings was refused (at most 16). Now
    ``decoding.stop`` is the run's own and ``encoder_stop`` the encoder's, which it adds again."""
    stops = [f"zz{i}qq" for i in range(16)]  # never generated: the run goes to max_new_tokens
    run = {**TOY, "encoder": "exemplar", "decoding": {"stop": stops, "max_new_tokens": 12, "seed": 5}}
    with pj.PersonaJudge(run) as m:
        first = m.generate("hi", preferences=PREFS)
    s = first.settings
    assert s["decoding"]["stop"] == stops and s["encoder_stop"] and not set(s["encoder_stop"]) & set(stops)
    rebuilt = config_from_settings(s)
    with pj.PersonaJudge(rebuilt) as m:
        again = m.generate("hi")
    assert again.tokens == first.tokens and again.settings == s
