"""Bad input to the Python API raises a typed error naming the argument, never a bare TypeError,
ValueError, AttributeError or pydantic ValidationError from deep inside; a config that can never
run fails before the model loads; every typed error the API can raise is exported."""

import json
import subprocess
import sys

import numpy as np
import pytest

import personajudge as pj
import personajudge.api as api

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
KW = {"max_new_tokens": 4}
pytestmark = pytest.mark.filterwarnings("ignore::personajudge.core.errors.PersonaJudgeWarning")  # single-view runs


@pytest.fixture(scope="module")
def model():
    with pj.PersonaJudge(TOY) as m:
        yield m


BAD = [
    # (label, call, error type, fragment of the message that names the argument)
    (
        "config list",
        lambda m: pj.PersonaJudge([1]),
        pj.ConfigError,
        "config must be a mapping, a RunConfig or a TOML file's path, got list",
    ),
    ("config str", lambda m: pj.PersonaJudge("toy"), pj.ConfigError, "config file not found: toy"),
    ("one-shot config", lambda m: pj.generate("hi", config=3), pj.ConfigError, "config must be a mapping"),
    ("build_config list", lambda m: pj.build_config([1]), pj.ConfigError, "config must be a mapping"),
    ("max_batch 0", lambda m: pj.PersonaJudge(TOY, max_batch=0), pj.ConfigError, "max_batch must be an integer >= 1"),
    ("max_batch str", lambda m: pj.PersonaJudge(TOY, max_batch="x"), pj.ConfigError, "max_batch must be an integer"),
    ("max_batch bool", lambda m: pj.PersonaJudge(TOY, max_batch=True), pj.ConfigError, "max_batch"),
    ("max_queue -1", lambda m: pj.PersonaJudge(TOY, max_queue=-1), pj.ConfigError, "max_queue must be an integer >= 0"),
    ("backend name", lambda m: pj.PersonaJudge(backend="toy"), pj.ConfigError, "got the string 'toy'; a backend name"),
    ("backend int", lambda m: pj.PersonaJudge(backend=3), pj.ConfigError, "got int without tokenizer, context_length"),
    ("preferences int", lambda m: m.generate("hi", preferences=3, **KW), pj.ConfigError, "preferences must be a list"),
    (
        "preference item int",
        lambda m: m.generate("hi", preferences=["concise", 3], **KW),
        pj.ConfigError,
        r"preferences\[1\] must be a preference name",
    ),
    ("views int", lambda m: m.generate("hi", views=3, **KW), pj.ConfigError, "views is a list of views"),
    ("views str", lambda m: m.generate("hi", views="concise", **KW), pj.ConfigError, "views is a list of views"),
    (
        "views list of str",
        lambda m: m.generate("hi", views=["concise", "humor"], **KW),
        pj.ConfigError,
        r"views\[0\] must be a list of preferences",
    ),
    (
        "view item int",
        lambda m: m.generate("hi", views=[["concise"], [3]], **KW),
        pj.ConfigError,
        r"views\[1\]\[0\] must be a preference name",
    ),
    ("stream views", lambda m: list(m.stream("hi", views=["humor"], **KW)), pj.ConfigError, r"views\[0\]"),
    ("on_text int", lambda m: m.generate("hi", on_text=3, **KW), pj.ConfigError, "on_text must be callable"),
    ("batch str", lambda m: m.generate_batch("hey", **KW), pj.ConfigError, "prompts must be a list of prompts"),
    ("batch None", lambda m: m.generate_batch(None, **KW), pj.ConfigError, "prompts must be a list of prompts"),
    (
        "batch conversation",
        lambda m: m.generate_batch([{"role": "user", "content": "hi"}], **KW),
        pj.ConfigError,
        r"prompts\[0\] is a message",
    ),
    ("seeds int", lambda m: m.generate_batch(["a", "b"], seeds=5, **KW), pj.ConfigError, "seeds must be a list"),
    ("seeds negative", lambda m: m.generate_batch(["a", "b"], seeds=[-1, 2], **KW), pj.ConfigError, r"seeds\[0\]"),
    ("seeds fraction", lambda m: m.generate_batch(["a", "b"], seeds=[1, 1.5], **KW), pj.ConfigError, r"seeds\[1\]"),
    ("seeds bool", lambda m: m.generate_batch(["a"], seeds=[True], **KW), pj.ConfigError, r"seeds\[0\]"),
    ("seeds count", lambda m: m.generate_batch(["a", "b"], seeds=[1], **KW), pj.ConfigError, "got 1 seeds for 2"),
    ("encoder int", lambda m: m.generate("hi", encoder=3, **KW), pj.ConfigError, "encoder"),
    ("encoder unknown", lambda m: m.generate("hi", encoder="nope", **KW), pj.UnknownPluginError, "encoder 'nope'"),
    (
        "batch encoder unknown",
        lambda m: m.generate_batch(["hi"], encoder="nope", **KW),
        pj.UnknownPluginError,
        "encoder 'nope'",
    ),
    ("method unknown", lambda m: pj.PersonaJudge({**TOY, "method": "nope"}), pj.UnknownPluginError, "method 'nope'"),
    (
        "method option unknown",
        lambda m: pj.PersonaJudge({**TOY, "method_options": {"zz": 1}}),
        pj.ConfigError,
        "method_options for 'persona-judge': unknown option",
    ),
    ("encoder in config", lambda m: pj.PersonaJudge({**TOY, "encoder": "nope"}), pj.UnknownPluginError, "nope"),
    (
        "preference in config",
        lambda m: pj.PersonaJudge({**TOY, "preferences": ["concize"]}),
        pj.UnknownPreferenceError,
        "concize",
    ),
]


@pytest.mark.parametrize(("call", "error", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_a_typed_error_naming_it(model, call, error, fragment):
    assert issubclass(error, pj.PersonaJudgeError)
    with pytest.raises(error, match=fragment):
        call(model)


@pytest.mark.parametrize(
    "config",
    [
        {"method": "nope"},
        {"method_options": {"zz": 1}},
        {"method": "mod", "method_options": {"weights": "heavy"}},
        {"encoder": "nope"},
        {"preferences": ["concize"]},
        {"views": [["concise"], ["humr"]]},
    ],
)
def test_a_config_that_cannot_run_fails_before_the_backend_loads(monkeypatch, config):
    loads = []
    monkeypatch.setattr(api, "load_backend", lambda cfg: loads.append(cfg) or pytest.fail("the backend was loaded"))
    with pytest.raises(pj.PersonaJudgeError):
        pj.PersonaJudge({**TOY, **config})
    assert loads == []


def test_the_load_check_sees_loads(monkeypatch):
    """The control of the test above: a valid config does reach load_backend (so the patch is the one used)."""
    loads = []
    real = api.load_backend
    monkeypatch.setattr(api, "load_backend", lambda cfg: loads.append(cfg.name) or real(cfg))
    pj.PersonaJudge({**TOY, "method": "mod", "method_options": {"weights": [1, 1]}}).close()
    assert loads == ["toy"]


def test_a_bare_string_is_one_preference(model):
    one = model.generate("hi", preferences="concise", seed=3, **KW)
    listed = model.generate("hi", preferences=["concise"], seed=3, **KW)
    assert one.settings["views"] == [["concise"]] and one.text == listed.text
    free = model.generate("hi", preferences="explain like I'm five", seed=3, **KW)
    assert len(free.settings["views"]) == 1


def test_generate_and_generate_batch_take_encoder_like_stream(model):
    kw = dict(preferences=["concise", "humor"], seed=11, max_new_tokens=12)
    streamed = "".join(model.stream("tell me", encoder="instruction", **kw))
    res = model.generate("tell me", encoder="instruction", **kw)
    (row,) = model.generate_batch(["tell me"], encoder="instruction", seeds=[11], **kw)
    assert res.settings["encoder"] == row.settings["encoder"] == "instruction"  # the config says plain
    assert res.text == row.text == streamed
    assert model.generate("tell me", **kw).settings["encoder"] == "plain"  # per call: the config is unchanged


def test_seeds_take_numpy_integers(model):
    rows = model.generate_batch(["a", "b"], seeds=np.array([4, 9]), **KW)
    assert [r.stats.seed for r in rows] == [4, 9]


def test_every_typed_error_the_api_can_raise_is_exported():
    # in a fresh interpreter: exactly the classes that `import personajudge` brings in, none that other tests define
    code = (
        "import json, personajudge\n"
        "def walk(c):\n"
        "    for s in c.__subclasses__():\n"
        "        yield s\n"
        "        yield from walk(s)\n"
        "print(json.dumps(sorted({f'{c.__module__}:{c.__name__}' for c in walk(personajudge.PersonaJudgeError)})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    found = [s.split(":") for s in json.loads(out)]
    public = [(mod, name) for mod, name in found if not name.startswith("_") and mod.startswith("personajudge.")]
    assert {"QueueFullError", "EngineClosedError", "RequestCancelled", "UnknownPreferenceError"} <= {
        n for _, n in public
    }
    missing = [f"{mod}.{name}" for mod, name in public if name not in pj.__all__]
    assert missing == []
    for mod, name in public:
        assert getattr(pj, name) is getattr(sys.modules[mod], name)


def test_a_calls_views_replace_the_configured_preferences_without_a_warning():
    """A server's default preferences met every request's views: one "ignored" warning per request."""
    import warnings

    from personajudge.backends.toy import ToyBackend
    from personajudge.core.errors import PersonaJudgeWarning

    cfg = {"backend": {"name": "toy"}, "encoder": "plain", "preferences": ["concise", "humor"]}
    with pj.PersonaJudge(cfg, backend=ToyBackend()) as model:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PersonaJudgeWarning)
            res = model.generate("hi", views=[["expert"], ["vivid"]], max_new_tokens=4, seed=0)
        assert res.settings["views"] == [["expert"], ["vivid"]]
        with pytest.warns(PersonaJudgeWarning, match="alongside views are ignored"):  # both in one call
            model.generate("hi", preferences=["concise"], views=[["expert"], ["vivid"]], max_new_tokens=4, seed=0)
