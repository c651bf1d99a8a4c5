"""The public face: `import personajudge as pj`, --version, warnings, --show-prompt, --json settings, pipes."""

import importlib.metadata
import json
import subprocess
import sys
import warnings

import pytest
from refuse import refuse_calls

import personajudge as pj
from personajudge.cli import main

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}


def test_the_top_level_package_exports_the_api():
    for name in pj.__all__:
        assert getattr(pj, name) is not None, name
    assert pj.__version__ == importlib.metadata.version("persona-judge")
    assert {
        "PersonaJudge",
        "generate",
        "stream",
        "hookimpl",
        "Backend",
        "Session",
        "Tokenizer",
        "Preference",
        "RunConfig",
        "PersonaJudgeError",
        "ConfigError",
        "SessionError",
    } <= set(pj.__all__)
    assert issubclass(pj.SessionError, pj.PersonaJudgeError) and issubclass(pj.PluginWarning, pj.PersonaJudgeWarning)


def test_one_shot_generate_and_stream_agree():
    kw = dict(config=TOY, preferences=["concise", "humor"], max_new_tokens=24, seed=5)
    res = pj.generate("tell me", **kw)
    pieces = list(pj.stream("tell me", **kw))
    assert len(pieces) > 1 and "".join(pieces) == res.text
    assert res.settings["method"] == "persona-judge" and res.settings["views"] == [["concise"], ["humor"]]
    assert res.settings["decoding"]["seed"] == 5 and res.settings["encoder"] == "plain"


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(preferences=["concize", "humor"]), pj.PreferenceError, "did you mean concise"),
        (dict(views=[["concise"], ["humr"]]), pj.PreferenceError, "did you mean humor"),
        (dict(method="persona-jduge"), pj.UnknownPluginError, "persona-judge"),
        (dict(encoder="chat-trun"), pj.UnknownPluginError, "chat-turn"),
        (dict(temperature=-1), pj.ConfigError, "temperature"),
        (dict(tempreature=0.5), pj.ConfigError, "tempreature"),
    ],
)
@pytest.mark.parametrize("call", ["generate", "stream"])
def test_one_shot_calls_refuse_their_arguments_before_loading_the_model(monkeypatch, call, kwargs, error, needle):
    import personajudge.api as api

    refuse_calls(monkeypatch, api, "load_backend", "the model was loaded before the call's arguments were checked")
    with pytest.raises(error, match=needle):
        out = getattr(pj, call)("hi", config=TOY, **kwargs)
        list(out) if call == "stream" else None


def test_stream_errors_surface_in_the_caller():
    with pj.PersonaJudge(TOY) as model:
        with pytest.raises(pj.PreferenceError, match="concize"):
            list(model.stream("hi", preferences=["concize", "humor"]))


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"personajudge {pj.__version__}"


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(preferences=["concise"]), "single view is plain sampling"),
        (dict(preferences=[]), "single view is plain sampling"),
        (dict(preferences=["concise", "humor"], method="base"), "'base' ignores preferences"),
        (dict(preferences=["concise"], views=[["humor"], ["expert"]]), "preferences given alongside views are ignored"),
    ],
)
def test_silent_degradations_warn(kwargs, needle):
    with pj.PersonaJudge(TOY) as model:
        with pytest.warns(pj.PersonaJudgeWarning, match=needle):
            model.generate("hi", max_new_tokens=2, seed=0, **kwargs)


def test_a_proper_run_does_not_warn():
    with pj.PersonaJudge(TOY) as model, warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=0)


def test_show_prompt_prints_every_view(capsys):
    assert (
        main(
            [
                "generate",
                "why",
                "--backend",
                "toy",
                "--encoder",
                "plain",
                "--view",
                "concise,humor",
                "--view",
                "expert",
                "--max-new-tokens",
                "2",
                "--seed",
                "1",
                "--show-prompt",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "# method persona-judge, encoder plain, 2 view(s)" in err
    assert "# --- view 0 (concise, humor) ---" in err and "# --- view 1 (expert) ---" in err
    assert "Be concise and to the point" in err and "Question: why" in err


def test_json_has_the_effective_settings_and_rounded_numbers(capsys):
    assert (
        main(
            [
                "generate",
                "why",
                "--backend",
                "toy",
                "--encoder",
                "plain",
                "--prefer",
                "concise",
                "--prefer",
                "humor",
                "--max-new-tokens",
                "6",
                "--top-k",
                "5",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    s = out["settings"]
    assert s["backend"] == "toy" and s["model"] == "toy(seed=0)" and s["method"] == "persona-judge"
    assert s["views"] == [["concise"], ["humor"]] and s["encoder"] == "plain"
    assert s["decoding"]["top_k"] == 5 and s["decoding"]["lambda"] == 4
    assert s["decoding"]["seed"] == out["stats"]["seed"] is not None  # the drawn seed is reported
    st = out["stats"]
    assert st["wall_time_s"] == round(st["wall_time_s"], 3) and st["tokens_per_s"] == round(st["tokens_per_s"], 1)


def test_text_streams_through_a_pipe_and_matches_json():
    base = [
        sys.executable,
        "-m",
        "personajudge",
        "generate",
        "why",
        "--backend",
        "toy",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--max-new-tokens",
        "12",
        "--seed",
        "9",
        "-q",
    ]
    with subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=120)
    js = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and err == "", err
    assert out == json.loads(js.stdout)["text"] + "\n"


def test_validation_errors_name_the_field_and_rule(capsys):
    assert main(["generate", "why", "--backend", "toy", "--top-p", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decoding.top_p" in err and "less than or equal to 1" in err
    assert "errors.pydantic.dev" not in err


def test_generate_batch_names_a_row_too_long_before_decoding_any(monkeypatch):
    """A row that does not fit is a ContextLengthError naming ``prompts[i]`` (``.row``), raised before
    any row is queued: the rows that fit are not decoded and then thrown away."""
    with pj.PersonaJudge(TOY) as model:
        queued = []
        monkeypatch.setattr(model.engine, "submit_many", lambda jobs: queued.extend(jobs))
        with pytest.raises(pj.ContextLengthError, match=r"^prompts\[1\]: the prompt of view 0 is \d+ tokens") as e:
            model.generate_batch(["hi", "ab " * 3000, "yo"], preferences=["concise", "humor"], seed=1)
        assert e.value.row == 1 and queued == []
        assert e.value.located(["in.jsonl:3", "in.jsonl:4", "in.jsonl:5"]).args[0].startswith("in.jsonl:4: the prompt")


def test_submit_refuses_a_prompt_too_long_in_the_callers_thread_for_every_method():
    with pj.PersonaJudge(TOY) as model:
        for method in ("persona-judge", "reference", "mod"):
            with pytest.raises(pj.ContextLengthError, match="shorten the prompt"):
                model.submit("ab " * 3000, preferences=["concise", "humor"], method=method, wait=False)
        assert model.engine.stats()["queued"] == 0
