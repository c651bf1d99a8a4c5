"""The public config models raise typed errors when built directly, one line naming the field.

README: "the typed errors, all subclasses of PersonaJudgeError. A bad argument raises one naming it".
Users build ``BackendConfig``/``DecodingConfig``/``RunConfig``/``EvalSpec`` themselves (the README's plugin
test does), so a pydantic ValidationError with its multi-line text and URL is not what they may get."""

import pytest
from pydantic import ValidationError

import personajudge as pj
from personajudge.core.config import DecodingConfig, RunConfig
from personajudge.evaluation import EvalSpec, pair_experiment
from personajudge.evaluation.errors import EvalError


@pytest.mark.parametrize(
    "build, error, line",
    [
        (lambda: pj.DecodingConfig(top_p=2), pj.ConfigError, "invalid DecodingConfig: top_p: Input should be less"),
        (lambda: pj.BackendConfig(threads=-1), pj.ConfigError, "invalid BackendConfig: threads: Input should be"),
        (lambda: pj.RunConfig(method=5), pj.ConfigError, "invalid RunConfig: method: Input should be a valid string"),
        (lambda: pj.RunConfig(decoding={"lambda": 0}), pj.ConfigError, "invalid RunConfig: decoding.lambda: "),
        (lambda: pj.Preference(name=""), pj.PreferenceError, "invalid preference: name: String should have"),
        (
            lambda: EvalSpec(methods=["prompt"], experiments=[pair_experiment("concise,humor")], limit=0),
            EvalError,
            "invalid evaluation: limit: Input should be greater than or equal to 1",
        ),
    ],
)
def test_building_a_public_model_with_a_bad_value_raises_a_typed_one_line_error(build, error, line):
    with pytest.raises(error) as e:
        build()
    assert isinstance(e.value, pj.PersonaJudgeError)
    assert str(e.value).startswith(line) and "\n" not in str(e.value) and "pydantic.dev" not in str(e.value)


def test_assigning_a_bad_value_is_a_config_error_and_leaves_the_value():
    cfg = RunConfig()
    with pytest.raises(pj.ConfigError, match=r"invalid DecodingConfig: top_p: .*less than or equal to 1 \(got 2\)"):
        cfg.decoding.top_p = 2
    assert cfg.decoding.top_p == RunConfig().decoding.top_p
    cfg.decoding.top_p = 0.5  # a good value is still assigned
    assert cfg.decoding.top_p == 0.5


def test_model_validate_keeps_pydantics_error_with_its_location():
    """Readers format it with where the value came from (a config file's field, a request's parameter)."""
    with pytest.raises(ValidationError) as e:
        RunConfig.model_validate({"decoding": {"top_p": 2}})
    assert e.value.errors()[0]["loc"] == ("decoding", "top_p")
    with pytest.raises(ValidationError):
        DecodingConfig.model_validate({"top_p": 2})


@pytest.mark.parametrize(
    "data, line",
    [
        ({"decoding": {"lam": 2}}, "decoding: unknown setting 'lam'; did you mean lambda?"),  # the per-call spelling
        ({"decodng": {}}, "unknown setting 'decodng'; did you mean decoding?"),
        ({"decoding": {"top-k": 3}}, "decoding: unknown setting 'top-k'; did you mean top_k?"),
        ({"backend": {"thread": 2}}, "backend: unknown setting 'thread'; did you mean threads?"),
        ({"decoding": {"zzz": 1}}, "decoding: unknown setting 'zzz'; known: lambda, max_new_tokens, "),
        ({"decoding": {"max_new_tokens": True}}, "decoding: max_new_tokens must be a number, got True"),
        ({"decoding": {"temperature": False}}, "decoding: temperature must be a number, got False"),
        ({"backend": {"threads": True}}, "backend: threads must be a number, got True"),
    ],
)
def test_a_config_names_an_unknown_key_with_its_closest_spelling_and_refuses_bools_as_numbers(data, line):
    with pytest.raises(pj.ConfigError) as e:
        pj.build_config(data)
    assert str(e.value).startswith("invalid config: " + line), str(e.value)


def test_good_spellings_still_pass():
    cfg = pj.build_config({"decoding": {"lambda": 3, "max_new_tokens": 5, "temperature": 0.5}})
    assert (cfg.decoding.lambda_, cfg.decoding.max_new_tokens, cfg.decoding.temperature) == (3, 5, 0.5)
    assert pj.build_config({"decoding": {"lambda_": 3}}).decoding.lambda_ == 3  # the field name, as before
