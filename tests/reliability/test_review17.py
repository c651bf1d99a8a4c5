"""Two refusals from the "noticed" list: unbounded stop strings, and numbers given as text.

Stop strings are bounded in the API, the CLI and config files, not only on the server.

After every token the emitter looks for each stop string in the text and, on a stream, holds back a
tail that may still grow into one, in the engine thread that every request in the batch shares. The
server took at most 4 (OpenAI's bound) of at most ``MAX_STOP_CHARS`` characters; ``decoding.stop``
itself took any number of any length. Now the config refuses more than ``MAX_STOP_STRINGS`` strings or
a string longer than ``MAX_STOP_CHARS``, as a ``ConfigError`` in the API and one line with exit
status 2 at the CLI, before the model loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_lines import one_line, run_main
from refuse import refuse_calls

import personajudge
import personajudge.cli.generate as cli_generate
from personajudge.core.config import MAX_STOP_CHARS, MAX_STOP_STRINGS, build_config
from personajudge.core.errors import ConfigError
from personajudge.serve.schemas import MAX_STOPS


def _stops(n: int) -> list[str]:
    return [f"zz{i}" for i in range(n)]


def test_the_readme_gives_the_bounds_and_the_server_s_fit_inside():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"at most {MAX_STOP_STRINGS}, each <= {MAX_STOP_CHARS} characters" in readme  # the config example
    assert f"config files take up to {MAX_STOP_STRINGS})" in readme  # the server's request fields
    assert MAX_STOPS <= MAX_STOP_STRINGS  # a request the server takes, the config takes


def test_more_stop_strings_than_the_bound_is_a_config_error():
    with pytest.raises(ConfigError, match=rf"at most {MAX_STOP_STRINGS} stop strings are allowed, got 17$"):
        build_config({"decoding": {"stop": _stops(MAX_STOP_STRINGS + 1)}})
    assert build_config({"decoding": {"stop": _stops(MAX_STOP_STRINGS)}}).decoding.stop == _stops(16)


def test_a_stop_string_longer_than_the_bound_is_a_config_error_naming_it():
    long = "z" * (MAX_STOP_CHARS + 1)
    with pytest.raises(ConfigError, match=rf"stop string 2 has 257 characters; at most {MAX_STOP_CHARS} are allowed"):
        build_config({"decoding": {"stop": ["a", long]}})
    at_limit = "z" * MAX_STOP_CHARS
    assert build_config({"decoding": {"stop": [at_limit]}}).decoding.stop == [at_limit]


def test_an_assignment_past_the_bound_is_refused_and_leaves_the_config_as_it_was():
    cfg = build_config({"decoding": {"stop": ["x"]}})
    with pytest.raises(ConfigError, match="at most 16 stop strings"):
        cfg.decoding.stop = _stops(MAX_STOP_STRINGS + 1)
    assert cfg.decoding.stop == ["x"]


def test_the_one_shot_api_refuses_before_the_model_loads(monkeypatch):
    import personajudge.api as api

    refuse_calls(monkeypatch, api.PersonaJudge, "__init__", "the model was loaded before the mistake was reported")
    with pytest.raises(ConfigError, match="at most 16 stop strings"):
        personajudge.generate("hi", config={"backend": {"name": "toy"}}, stop=_stops(MAX_STOP_STRINGS + 1))


def test_a_loaded_model_refuses_the_call_and_still_generates():
    with personajudge.PersonaJudge(
        {"backend": {"name": "toy"}, "preferences": ["concise", "humor"], "decoding": {"max_new_tokens": 4}}
    ) as pj:
        with pytest.raises(ConfigError, match="at most 16 stop strings"):
            pj.generate("hi", stop=_stops(40))
        res = pj.generate("hi", stop=_stops(MAX_STOP_STRINGS))
        assert res.stats.tokens >= 1  # the refused call broke nothing


@pytest.mark.parametrize(
    ("stops", "needle"),
    [
        (_stops(MAX_STOP_STRINGS + 1), "at most 16 stop strings are allowed, got 17"),
        (["z" * (MAX_STOP_CHARS + 1)], "stop string 1 has 257 characters"),
    ],
    ids=["count", "length"],
)
def test_the_cli_refuses_in_one_line_before_the_model_loads(monkeypatch, capsys, stops, needle):
    refuse_calls(monkeypatch, cli_generate, "PersonaJudge", "the model was loaded before the mistake was reported")
    argv = ["generate", "--backend", "toy", "hi"] + [a for s in stops for a in ("--stop", s)]
    code, _, err = run_main(argv, capsys)
    one_line(code, err, needle)


# Seeds (and every number of the config) given as text are refused, as the server and the CLI refuse
# them: pydantic's lax int took "5" as 5, so a seed from a text field ran, reported as the number.


@pytest.mark.parametrize("seeds", [["1", "2"], [1, "2"]], ids=["both", "second"])
def test_generate_batch_seeds_given_as_text_are_refused_naming_the_row(seeds):
    from personajudge.api import _seed_list

    bad = next(i for i, s in enumerate(seeds) if isinstance(s, str))
    with pytest.raises(ConfigError, match=rf"^seeds\[{bad}\] must be an integer >= 0, got '{seeds[bad]}'$"):
        _seed_list(seeds, 2)
    assert _seed_list([1, 2], 2) == [1, 2]


@pytest.mark.parametrize(
    ("section", "field", "text", "number"),
    [
        ("decoding", "seed", "5", 5),
        ("decoding", "temperature", "0.5", 0.5),
        ("decoding", "max_new_tokens", "8", 8),
        ("backend", "threads", "2", 2),
    ],
)
def test_a_number_given_as_text_is_a_config_error_and_the_number_is_taken(section, field, text, number):
    with pytest.raises(ConfigError, match=rf"{field} must be a number, got '{text}'$"):
        build_config({section: {field: text}})
    assert getattr(getattr(build_config({section: {field: number}}), section), field) == number


def test_a_seed_given_as_text_is_refused_by_the_api_before_the_model_loads(monkeypatch):
    import personajudge.api as api

    refuse_calls(monkeypatch, api.PersonaJudge, "__init__", "the model was loaded before the mistake was reported")
    with pytest.raises(ConfigError, match="seed must be a number, got '3'"):
        personajudge.generate("hi", config={"backend": {"name": "toy"}}, seed="3")
