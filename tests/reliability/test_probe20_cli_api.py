"""Probe 20 (an audit of the command line and the API as the README tells a user to use them): configs
that can never run were reported only after the model had loaded.

1. ``--method mod --method-option weights=[1]`` with two views: the weights count was checked as the
   decoding loop started, after the model loaded (on a model path that does not load, the load error came
   first). The command line knows its views before it loads anything: the method plans them then, and
   ``mod``'s plan checks one weight per view. The constructor cannot (a call may bring other views), so a
   config whose weights fit only the calls' views still constructs.
2. ``method_options.reward_model`` naming a backend no plugin registered: a ``ConfigError`` only when PAD
   first decoded; now in the constructor, before either model loads.
"""

from __future__ import annotations

import json

import pytest
from cli_lines import one_line, run_main
from refuse import refuse_calls

import personajudge
import personajudge.api as api
import personajudge.cli.generate as cli_generate
from personajudge.api import PersonaJudge
from personajudge.core.errors import ConfigError

TOY = ["--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "3", "-q"]
ONE_WEIGHT = ["--method", "mod", "--method-option", "weights=[1]"]


@pytest.fixture
def no_model(monkeypatch):
    """The mistake must be reported before a model loads: constructing one fails the test."""
    refuse_calls(monkeypatch, cli_generate, "PersonaJudge", "the model was loaded before the mistake was reported")
    refuse_calls(monkeypatch, api, "load_backend", "a backend was loaded before the mistake was reported")


def test_mod_weights_that_do_not_match_the_views_are_refused_before_the_model(capsys, no_model):
    code, _, err = run_main(["generate", "hi", *TOY, *ONE_WEIGHT], capsys)
    one_line(code, err, "method_options.weights: got 1 weights for 2 views")


def test_so_in_batch_mode_before_the_model_and_before_any_output(tmp_path, capsys, no_model):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "a"}) + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = run_main(["generate", *TOY, *ONE_WEIGHT, "--input", str(src), "--output", str(out)], capsys)
    one_line(code, err, "got 1 weights for 2 views")
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_the_one_shot_api_refuses_them_before_the_model(no_model):
    cfg = {"backend": {"name": "toy"}, "method": "mod", "method_options": {"weights": [1.0]}}
    with pytest.raises(ConfigError, match="got 1 weights for 2 views"):
        personajudge.generate("hi", config=cfg, preferences=["concise", "humor"])


def test_a_config_whose_weights_fit_only_the_calls_views_constructs_and_runs():
    """Negative control: the constructor knows no call's views, so it does not plan (nor refuse)."""
    pj = PersonaJudge({"backend": {"name": "toy"}, "method": "mod", "method_options": {"weights": [0.7, 0.3]}})
    with pj:
        assert pj.generate("hi", preferences=["concise", "humor"], max_new_tokens=3, seed=1).tokens
        with pytest.raises(ConfigError, match="got 2 weights for 3 views"):
            pj.generate("hi", preferences=["concise", "humor", "expert"], max_new_tokens=3, seed=1)


def test_matching_weights_run_on_the_command_line(capsys):
    code, out, err = run_main(["generate", "hi", *TOY, "--method", "mod", "--method-option", "weights=[2,1]"], capsys)
    assert code == 0 and out.strip(), err


def test_an_unregistered_reward_model_backend_is_refused_by_the_constructor(no_model, capsys):
    options = {"reward_model": {"name": "nope"}}
    with pytest.raises(ConfigError) as info:
        PersonaJudge({"backend": {"name": "toy"}, "method": "pad", "method_options": options})
    assert str(info.value) == (
        "method_options.reward_model: unknown backend 'nope'; registered backends: hf, llama-cpp, toy"
    )
    argv = ["generate", "hi", *TOY, "--method", "pad", "--method-option", 'reward_model={"name": "nope"}']
    code, _, err = run_main(argv, capsys)
    one_line(code, err, "method_options.reward_model: unknown backend 'nope'")


# -- 3: the exemplar encoder and a preference with no examples ------------------------------------
NO_EXAMPLES = "the exemplar encoder needs examples for every preference; answer-in-rhymes has none"


def test_exemplar_with_a_free_text_preference_is_refused_before_the_model(capsys, no_model):
    """A free-text preference has no examples: ``--encoder exemplar`` refused it when the first view was
    rendered, after the model had loaded. The encoder's ``check_views`` now runs on the planned views."""
    argv = ["generate", "hi", "--backend", "toy", "--encoder", "exemplar", "-q"]
    code, _, err = run_main([*argv, "--prefer", "answer in rhymes", "--prefer", "humor"], capsys)
    one_line(code, err, NO_EXAMPLES)
    with pytest.raises(ConfigError, match=NO_EXAMPLES):
        personajudge.generate(
            "hi", config={"backend": {"name": "toy"}, "encoder": "exemplar"}, preferences=["answer in rhymes", "humor"]
        )


def test_exemplar_with_no_exemplars_or_built_ins_still_runs(capsys):
    """Negative controls: ``n = 0`` needs no examples, and built-in preferences bring their own."""
    cfg = {"backend": {"name": "toy"}, "encoder": "exemplar", "encoder_options": {"n": 0}}
    out = personajudge.generate("hi", config=cfg, preferences=["answer in rhymes", "humor"], max_new_tokens=2)
    assert out.tokens
    argv = ["generate", "hi", "--backend", "toy", "--encoder", "exemplar", "--max-new-tokens", "2", "-q"]
    code, _, err = run_main([*argv, "--prefer", "concise", "--prefer", "humor"], capsys)
    assert code == 0, err


def test_a_plugin_encoders_check_views_is_called_and_guarded(monkeypatch):
    """A third-party encoder's ``check_views`` sees the planned views; what it raises that is not a
    ConfigError is one PluginError naming it (as its render's would be)."""
    from personajudge.core.errors import PluginError
    from personajudge.plugins.manager import check_encoder_views

    seen = []

    class Picky:
        name = "picky"

        def check_views(self, views, options):
            seen.append([[p.name for p in v] for v in views])
            raise ValueError("no")

    monkeypatch.setattr("personajudge.plugins.manager._builtin", lambda *a: False)
    view = api.build_views(["concise"], None, api.preference_library())
    with pytest.raises(PluginError, match=r"encoder 'picky' \(.*Picky.*\.check_views raised ValueError: no"):
        check_encoder_views(Picky(), view, None)
    assert seen == [[["concise"]]]
    check_encoder_views(object(), view, None)  # no check_views: nothing to check


# -- 4: a folder given to the llama-cpp backend ------------------------------------------------------------
@pytest.mark.parametrize(
    ("files", "hint"),
    [
        (["config.json", "model.safetensors"], "(it holds config.json, a transformers model: add --backend hf)"),
        (["b.gguf", "a.gguf"], "(this folder holds a.gguf, b.gguf: give its path)"),
        ([], "needs a .gguf file"),
    ],
    ids=["hf-folder", "gguf-folder", "empty"],
)
def test_a_folder_as_the_gguf_model_says_what_it_holds(tmp_path, capsys, files, hint):
    """``--model FOLDER`` without ``--backend hf`` said only "is a directory"; the folder's contents say
    what the user meant."""
    pytest.importorskip("llama_cpp")
    for name in files:
        (tmp_path / name).write_text("{}")
    code, _, err = run_main(["generate", "hi", "--model", str(tmp_path), "--prefer", "concise", "-q"], capsys)
    one_line(code, err, f"model path {tmp_path} is a directory; the llama-cpp backend needs a .gguf file")
    assert err.rstrip("\n").endswith(hint), err
