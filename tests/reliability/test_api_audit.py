"""The Python API's audit findings (E, F, I): where warnings point, which keywords a call takes, the
public type hints, and errors that stay typed.

Each warning test calls an entry point on one line and checks the warning names *this file*: Python's
default filter shows a warning once per location, so a location inside the library would hide every
later warning of the same kind from any other call, and would not tell the user which call it was.
"""

import asyncio
import inspect
import warnings

import pytest
from typecheck import ROOT, run_mypy

import personajudge as pj
from personajudge.core.errors import ConfigError, ModelLoadError, PersonaJudgeWarning, PreferenceError
from personajudge.plugins import preference_library
from personajudge.preferences import build_views

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
ONE = dict(preferences=["concise"], max_new_tokens=2, seed=0)  # one view: the single-view warning
#: a model that cannot load: a call checked before loading fails with the call's own error, not this one
MISSING = {"backend": {"name": "llama-cpp", "model": "/nonexistent/model.gguf"}}


@pytest.fixture(scope="module")
def model():
    m = pj.PersonaJudge(TOY)
    yield m
    m.close()


def _here() -> int:
    """The line of the caller (the line the warning must name)."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def _warned_at(caught, line: int) -> None:
    ours = [w for w in caught if issubclass(w.category, PersonaJudgeWarning)]
    assert ours, "no PersonaJudgeWarning"
    for w in ours:
        assert (w.filename, w.lineno) == (__file__, line), f"{w.filename}:{w.lineno}: {w.message}"


def test_generate_warns_at_the_callers_line(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _here() + 1
        model.generate("hi", **ONE)
    _warned_at(caught, line)


def test_generate_batch_warns_at_the_callers_line(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _here() + 1
        model.generate_batch(["hi", "yo"], **ONE)
    _warned_at(caught, line)


def test_stream_warns_at_the_line_that_reads_it(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = model.stream("hi", **ONE)
        line = _here() + 1  # a generator's body runs on the first next(), here in list()
        pieces = list(gen)
    assert pieces
    _warned_at(caught, line)


def test_stream_duplicate_warning_at_the_callers_line(model):
    """The duplicate-preference warning (issued in preferences/, through warn_duplicates) too."""
    kw = dict(preferences=["concise", "concise"], max_new_tokens=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _here() + 1
        list(model.stream("hi", **kw))
    assert any("repeat" in str(w.message) for w in caught)
    _warned_at(caught, line)


def test_submit_warns_at_the_callers_line(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _here() + 1
        job = model.submit("hi", **ONE)
    assert job.result().tokens
    _warned_at(caught, line)


def test_astream_warns_at_the_async_for_line(model):
    """astream hands encoding to a worker thread, whose stack never reaches the caller: the request is
    planned (and warned about) on the loop's thread first."""
    lines = []

    async def consume():
        out = []
        async for piece in model.astream("hi", **ONE):
            lines.append(_here() - 1)  # the `async for` line, where the generator's body runs
            out.append(piece)
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(consume())
    _warned_at(caught, lines[0])


def test_one_shot_generate_and_stream_warn_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _here() + 1
        pj.generate("hi", config=TOY, **ONE)
    _warned_at(caught, line)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _here() + 1
        list(pj.stream("hi", config=TOY, **ONE))
    _warned_at(caught, line)


# F: per-call keywords


@pytest.mark.parametrize("spelling", ["lam", "lambda_", "lambda"])
def test_every_spelling_of_lambda_works_per_call(model, spelling):
    res = model.generate("hi", preferences=["concise", "humor"], max_new_tokens=2, seed=0, **{spelling: 2})
    assert res.settings is not None and res.settings["decoding"]["lambda"] == 2  # the default is 4


def test_two_spellings_of_lambda_in_one_call_are_refused(model):
    with pytest.raises(ConfigError, match="lam and lambda_ are the same setting"):
        model.generate("hi", preferences=["concise", "humor"], lam=2, lambda_=3)


CALLS = {
    "generate": lambda m, **kw: m.generate("hi", **kw),
    "generate_batch": lambda m, **kw: m.generate_batch(["hi"], **kw),
    "stream": lambda m, **kw: next(m.stream("hi", **kw)),
    "submit": lambda m, **kw: m.submit("hi", **kw).result(),
    "astream": lambda m, **kw: asyncio.run(m.astream("hi", **kw).__anext__()),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"system": "Be nice"}, "system is not a per-call keyword: it is a setting of the run; set it in the config"),
        ({"method_options": {"weights": [1]}}, "method_options is not a per-call keyword: it is a setting of the run"),
        ({"threads": 2}, "threads is not a per-call keyword: the backend is loaded with it; set it in the config's"),
        ({"max_tokens": 4}, "max_tokens is not a per-call keyword; did you mean max_new_tokens?"),
        ({"xyzzy": 4}, "xyzzy is not a per-call keyword; the keywords are preferences, views, method, temperature, "),
    ],
)
def test_a_keyword_the_call_does_not_take_is_named_as_such(model, call, kw, says):
    with pytest.raises(ConfigError) as err:
        CALLS[call](model, preferences=["concise", "humor"], max_new_tokens=2, **kw)
    assert str(err.value).startswith(says), str(err.value)
    assert "decoding." not in str(err.value) and "Extra inputs" not in str(err.value)


def test_one_shot_refuses_a_bad_keyword_before_loading_the_model():
    with pytest.raises(ConfigError, match="system is not a per-call keyword"):
        pj.generate("hi", config=MISSING, preferences=["concise", "humor"], system="Be nice")


@pytest.mark.parametrize("kw", ["max_new_tokens", "top_k", "seed", "repeat_lines", "lam", "temperature"])
def test_a_bool_is_not_a_number_per_call(model, kw):
    with pytest.raises(ConfigError, match=f"^{kw} must be a number, got True$"):
        model.generate("hi", preferences=["concise", "humor"], **{kw: True})


def test_the_generate_docstring_names_the_call_spellings_of_lambda():
    doc = pj.PersonaJudge.generate.__doc__ or ""
    assert "``lam=``" in doc and "``lambda_=``" in doc and "not per-call" in doc


# I: types and typed errors


def test_resolved_encoder_takes_names_as_views_does():
    m = pj.PersonaJudge({"backend": {"name": "toy"}})  # encoder auto: decided on the views
    try:
        by_name = m.resolved_encoder(m.config, [["concise"], ["humor"]])
        objects = build_views([], [["concise"], ["humor"]], preference_library())
        assert all(isinstance(p, pj.Preference) for v in objects for p in v)
        assert by_name == m.resolved_encoder(m.config, objects)
        with pytest.raises(PreferenceError, match="unknown preference 'concize'"):
            m.resolved_encoder(m.config, [["concize"]])
        with pytest.raises(ConfigError, match="views"):
            m.resolved_encoder(m.config, "concise")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="views"):
            m.resolved_encoder(m.config, ["concise"])  # type: ignore[list-item]
    finally:
        m.close()


def test_a_missing_model_names_the_python_setting_too():
    pytest.importorskip("llama_cpp")
    with pytest.raises(ModelLoadError, match=r"--model PATH / backend\.model"):
        pj.PersonaJudge(MISSING)


SNIPPET = """\
import personajudge as pj

m = pj.PersonaJudge({"backend": {"name": "toy"}})
one = pj.Preference(name="pirate", description="Talk like a pirate", instruction="Talk like a pirate.")
r1 = m.generate("hi", preferences=one)
r2 = m.generate("hi", preferences="concise")
r3 = m.generate_batch(["a"], preferences=one, seeds=[1])
m.resolved_encoder(m.config, [["concise"], [one]])
"""


def test_the_public_hints_take_what_the_api_takes(tmp_path):
    """mypy passes a bare Preference as ``preferences=`` (the API takes it as one preference), names as
    ``resolved_encoder``'s views, and the README's Python block as written."""
    pytest.importorskip("mypy")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Python\n\n```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "snippet.py").write_text(SNIPPET)
    (tmp_path / "readme_python.py").write_text(block)
    proc = run_mypy([tmp_path / "snippet.py", tmp_path / "readme_python.py"], tmp_path)
    assert proc.returncode == 0 and "Success" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_a_submitted_jobs_result_carries_the_settings_generate_reports(model):
    """``submit(...).result()`` and a job's ``("done", result)`` event give the same settings as
    ``generate`` for the same call, the seed drawn for an unseeded call included."""
    call = dict(preferences=["concise", "humor"], max_new_tokens=3, seed=7, top_k=5)
    want = model.generate("hi", **call)
    got = model.submit("hi", **call).result()
    assert got.settings == want.settings and got.tokens == want.tokens
    events = list(model.submit("hi", **call).events())
    assert events[-1][0] == "done" and events[-1][1].settings == want.settings
    unseeded = model.submit("hi", **{**call, "seed": None}).result()
    assert unseeded.settings is not None and unseeded.settings["decoding"]["seed"] == unseeded.stats.seed
