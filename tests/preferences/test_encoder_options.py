"""encoder_options are declared per encoder (a pydantic Options model) and checked like a backend's options.

A mistyped or unknown option used to be ignored: ``{"nn": 1}`` ran with the default three exemplars and
``{"instruction": "yes"}`` with whatever the string's truth was. Now each is one typed line naming the
encoder and the option, at the API, the CLI (exit 2) and for a third-party encoder that declares its options.
"""

import pytest

import personajudge as pj
from personajudge.backends.toy import ToyTokenizer
from personajudge.cli import main
from personajudge.core.errors import ConfigError
from personajudge.plugins import PluginWarning, hookimpl, register_plugin, registry, resolve_encoder, unregister_plugin
from personajudge.preferences import BUILTIN_ENCODERS, EncoderOptions, encoder_options, lookup

CONCISE = [lookup("concise")]
CONVO = [{"role": "user", "content": "Why is the sky blue?"}]


def run(encoder, options):
    """One short generation on the toy backend with ``encoder`` and its ``encoder_options``."""
    with pj.PersonaJudge({"backend": {"name": "toy"}, "encoder": encoder, "encoder_options": options}) as j:
        return j.generate("Why?", preferences=["concise", "humor"], max_new_tokens=2, seed=0)


@pytest.mark.parametrize(
    ("encoder", "options", "words"),
    [
        ("exemplar", {"nn": 1}, ["unknown option(s) for the exemplar encoder: nn", "known: stop, n, instruction"]),
        ("exemplar", {"instruction": "yes"}, ["encoder_options.instruction", "boolean", "exemplar"]),
        ("exemplar", {"n": True}, ["encoder_options.n", "integer", "exemplar"]),
        ("exemplar", {"n": -1}, ["encoder_options.n", "greater than or equal to 0", "exemplar"]),
        ("plain", {"templat": "dialogue"}, ["unknown option(s) for the plain encoder: templat"]),
        ("plain", {"template": "nope"}, ["unknown plain template 'nope'", "plain"]),
        ("plain", {"template": {"heder": "x"}}, ["unknown format(s) heder", "plain"]),
        ("instruction", {"n": 2}, ["unknown option(s) for the instruction encoder: n"]),
        ("system", {"stop": "no"}, ["encoder_options.stop", "boolean", "system"]),
    ],
)
def test_a_bad_option_is_one_config_error_naming_the_encoder_and_the_option(encoder, options, words):
    with pytest.raises(ConfigError) as e:
        run(encoder, options)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_the_options_still_do_what_they_say():
    tok = ToyTokenizer()
    ex = registry("encoder").get("exemplar")()
    three, _ = ex.render(CONCISE, CONVO, tok)
    one, _ = ex.render(CONCISE, CONVO, tok, options={"n": 1, "instruction": False})
    assert three.count("Question:") == 4 and one.count("Question:") == 2
    assert "Instructions:" in three and "Instructions:" not in one
    plain = registry("encoder").get("plain")()
    assert plain.render(CONCISE, CONVO, tok, options={"template": "dialogue"})[0].endswith("Assistant:")
    assert plain.render(CONCISE, CONVO, tok, options={"template": {"prompt": "A>"}})[0].endswith("A>")
    assert plain.stop_strings(tok, {"stop": False}) == [] and plain.stop_strings(tok) == ["\nQuestion:"]


@pytest.mark.parametrize("cls", BUILTIN_ENCODERS)
def test_every_builtin_encoder_declares_options_and_takes_stop(cls):
    """The benchmark and the exactness kit pass ``stop = false`` whatever encoder ``auto`` picks."""
    assert issubclass(cls.Options, EncoderOptions)
    assert encoder_options(cls(), {"stop": False})["stop"] is False


def _cli(tmp_path, capsys, options):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'encoder = "exemplar"\nencoder_options = {options}\n[backend]\nname = "toy"\n')
    code = main(["generate", "hi", "--config", str(cfg), "--prefer", "concise", "--prefer", "humor", "-q"])
    return code, capsys.readouterr().err


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, "{ nn = 1 }")
    assert code == 2
    assert err == (
        "personajudge: error: encoder_options: unknown option(s) for the exemplar encoder: nn (did you mean n?); "
        "known: stop, n, instruction\n"
    )
    code, err = _cli(tmp_path, capsys, "{ n = 1 }")  # the control: a known option runs
    assert code == 0 and "error" not in err


class Recorder:
    """A third-party encoder that declares no options: it gets them as given (its own business)."""

    name = "recorder"
    description = "records the options it is given (a test plugin)"
    seen: list = []

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        Recorder.seen.append(options)
        return f"Q: {conversation[-1]['content']}\nA:", True


class Declared(Recorder):
    """A third-party encoder that declares its options and does not check them itself: the framework does."""

    name = "declared"

    class Options(EncoderOptions):
        style: str = "short"


class Plugin:
    @hookimpl
    def register_encoders(self, register):
        register(Recorder)
        register(Declared)


@pytest.fixture
def plugin():
    p = Plugin()
    register_plugin(p, name="encoder-options-test")
    Recorder.seen.clear()
    yield p
    unregister_plugin(p)


def test_a_third_party_encoder_without_options_gets_them_unchecked(plugin):
    run("recorder", {"anything": 1})
    assert Recorder.seen and all(o == {"anything": 1} for o in Recorder.seen)


def test_a_third_party_encoder_that_declares_options_gets_them_checked(plugin):
    with pytest.raises(
        ConfigError,
        match=r"unknown option\(s\) for the declared encoder: styl \(did you mean style\?\); known: stop, style",
    ):
        run("declared", {"styl": "x"})
    assert Recorder.seen == []  # refused before anything was rendered
    run("declared", {"style": "x"})
    assert Recorder.seen and all(o == {"stop": True, "style": "x"} for o in Recorder.seen)


def test_a_declared_encoder_renders_with_its_options_defaults_filled_in(plugin):
    """``render`` got the raw dict (``{}`` with no options given), so a plugin that declared ``Options``
    had to call ``encoder_options`` itself for its defaults; it gets the checked dict now."""
    run("declared", {})
    assert Recorder.seen and all(o == {"stop": True, "style": "short"} for o in Recorder.seen)
    with pytest.raises(ConfigError, match="encoder_options.style: .*string.* [(]the declared encoder[)]"):
        resolve_encoder("declared", ToyTokenizer(), options={"style": 3})


@pytest.mark.parametrize("kind", ["dict", "plain-model"])
def test_an_encoder_whose_options_are_no_encoder_options_is_skipped_with_a_warning(kind):
    """A plain pydantic model was accepted, and then refused ``stop = false``, which every encoder takes."""
    from pydantic import BaseModel

    class PlainModel(BaseModel):
        style: str = "short"

    class Bad(Recorder):
        name = "bad-options"
        Options = {"style": str} if kind == "dict" else PlainModel

    class BadPlugin:
        @hookimpl
        def register_encoders(self, register):
            register(Bad)

    p = BadPlugin()
    register_plugin(p, name="bad-options-plugin")
    try:
        with pytest.warns(
            PluginWarning, match="encoder 'bad-options': Options must subclass personajudge.preferences.EncoderOptions"
        ):
            names = registry("encoder").names()
        assert "bad-options" not in names and "exemplar" in names
    finally:
        unregister_plugin(p)
