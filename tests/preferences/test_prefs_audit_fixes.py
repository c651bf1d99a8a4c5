"""Preferences and encoders: the fixes of the preferences audit (templates, views, names, repeats)."""

import warnings

import pytest
from chat_tokenizers import STRICT, ChatTokenizer
from own_preferences import OWN_CONCISE, PIRATE

import personajudge as pj
from personajudge.core.errors import ConfigError, PersonaJudgeWarning, PreferenceError, UnknownPreferenceError
from personajudge.plugins import preference_library
from personajudge.preferences import build_views, load_file, lookup, resolve
from personajudge.preferences.encoders import ChatTurnEncoder, ExemplarEncoder, PlainEncoder, SystemEncoder

TOY = {"backend": {"name": "toy"}}
KW = {"max_new_tokens": 2, "seed": 1}


@pytest.fixture(scope="module")
def model():
    with pj.PersonaJudge(TOY) as m:
        yield m


def _pj_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, PersonaJudgeWarning)]


# 1: a custom template's format strings are checked when the options are read


@pytest.mark.parametrize(
    ("fmt", "needle"),
    [
        ({"header": "{oops}"}, "format header: unknown placeholder {oops}; header takes only {preference}"),
        ({"user": "Q {"}, "format user: Single '{' encountered"),
        ({"user": "{0}"}, "format user: Replacement index 0 out of range"),
        ({"assistant": "{content.x}"}, "format assistant:"),
    ],
)
@pytest.mark.parametrize("encoder", ["plain", "instruction"])
def test_a_bad_template_format_is_a_one_line_config_error_before_the_model_loads(monkeypatch, encoder, fmt, needle):
    monkeypatch.setattr(pj.api, "load_backend", lambda cfg: pytest.fail("the backend was loaded"))
    with pytest.raises(ConfigError) as err:
        pj.PersonaJudge({**TOY, "encoder": encoder, "encoder_options": {"template": fmt}})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_good_template_still_renders_and_literal_braces_work():
    tpl = {"header": "Style {{strict}}: {preference}\n", "user": "Q: {content}\n", "prompt": "A {"}
    text, _ = PlainEncoder().render(
        [resolve("concise")], [{"role": "user", "content": "hi"}], None, options={"template": tpl}
    )
    assert text == "Style {strict}: Be concise and to the point; never be verbose.\nQ: hi\nA {"


# 2: the preferences a file or a caller defines are names the views may use


def test_views_resolve_names_the_given_preferences_define_and_adjusted_ones_win():
    views = build_views([PIRATE, OWN_CONCISE], [["pirate", "brief"], ["humor"]], preference_library())
    assert views[0][0] is PIRATE
    assert views[0][1] is OWN_CONCISE  # by its alias too, not the built-in concise
    assert views[1] == [resolve("humor")]
    with pytest.raises(UnknownPreferenceError, match="'pirate'"):  # the control: not without the definition
        build_views([], [["pirate"]], preference_library())


def test_api_views_use_the_call_preferences_without_the_ignored_warning(model):
    def run():
        res = model.generate(
            "hi", preferences=[PIRATE, OWN_CONCISE], views=[["pirate", "concise"], ["humor"]], encoder="exemplar", **KW
        )
        # the caller's definitions as tables, so the settings alone repeat the run (audit prefs2 A)
        assert res.settings["views"] == [[PIRATE.definition(), OWN_CONCISE.definition()], ["humor"]]

    assert not [w for w in _pj_warnings(run) if "ignored" in w]
    cfg, meth, views = model._prepare([PIRATE, OWN_CONCISE], [["pirate", "concise"], ["humor"]], None, {})
    text = model.render_views("hi", cfg.model_copy(update={"encoder": "exemplar"}), meth, views)[0][0]
    assert "Arr, in the harbour." in text and "Answer: Because." in text
    # a string next to views is still ignored, and said so
    assert any(
        "ignored" in w
        for w in _pj_warnings(lambda: model.generate("hi", preferences=["vivid"], views=[["humor"], ["expert"]], **KW))
    )


# 5: names and aliases match in any case, on both sides


def test_lookup_is_case_insensitive_on_the_library_side_too():
    lib = {"Pirate": PIRATE.model_copy(update={"name": "Pirate", "aliases": ("Buccaneer",)})}
    assert lookup("pirate", lib).name == "Pirate" and lookup("PIRATE", lib).name == "Pirate"
    assert lookup("buccaneer", lib).name == "Pirate"
    assert lookup("parrot", lib) is None


# 8: known names that only look like a description are refused, not made free text


@pytest.mark.parametrize("text", ["concise,humor", "concise, humor", "brief,funny,expert"])
def test_a_list_of_known_names_in_one_string_is_an_error_saying_what_to_write(text):
    with pytest.raises(PreferenceError) as err:
        resolve(text)
    msg = str(err.value)
    parts = [p.strip() for p in text.split(",")]
    assert "--prefer " + " --prefer ".join(parts) in msg and "--view " + ",".join(parts) in msg


@pytest.mark.parametrize("text", ["concise.", "humor!", '"expert"', "brief:"])
def test_a_known_name_with_punctuation_is_an_error_not_free_text(text):
    with pytest.raises(UnknownPreferenceError, match="did you mean"):
        resolve(text)


@pytest.mark.parametrize("text", ["short, sweet", "wow!", "e.g.", "concise and funny, please"])
def test_descriptions_with_commas_or_punctuation_stay_free_text(text):
    assert resolve(text).source == "free text"


def test_api_preferences_with_a_comma_list_fail_before_anything_runs(model):
    with pytest.raises(PreferenceError, match="in one string"):
        model.generate("hi", preferences=["concise,humor"], **KW)


# 12: chat-turn with --system on a template without a system role


def test_chat_turn_merges_the_system_text_as_the_system_encoder_does():
    tok = ChatTokenizer(STRICT)
    view, conv = [resolve("concise"), resolve("humor")], [{"role": "user", "content": "Why?"}]
    turn, _ = ChatTurnEncoder().render(view, conv, tok, system="Be nice.")
    system, _ = SystemEncoder().render(view, conv, tok, system="Be nice.")
    assert turn == system
    assert turn.index("Be nice.") < turn.index("Be concise") < turn.index("Why?")
    assert ChatTurnEncoder().render([], conv, tok, system="Be nice.")[0].count("Be nice.") == 1


def test_a_conversations_own_system_message_survives_the_merge():
    tok = ChatTokenizer(STRICT)
    conv = [{"role": "system", "content": "Context X."}, {"role": "user", "content": "Why?"}]
    for enc in (ChatTurnEncoder(), SystemEncoder()):
        text, _ = enc.render([resolve("concise")], conv, tok, system="Be nice.")
        assert "Context X." in text and "Be nice." in text and "Be concise" in text, enc.name


# 13: n = 0 means no exemplars, in every kind of view


@pytest.mark.parametrize(
    "view",
    [[resolve("concise")], [resolve("concise"), resolve("friendly")], [PIRATE, resolve("humor")], []],
    ids=["single", "combined", "interleaved", "none"],
)
def test_n_zero_shows_no_exemplars_in_any_view(view):
    assert ExemplarEncoder.examples(view, 0) == []
    text, _ = ExemplarEncoder().render(view, [{"role": "user", "content": "Why?"}], None, options={"n": 0})
    assert text.count("Question:") == 1  # only the prompt's
    assert ExemplarEncoder.examples(view, 1) or not view  # the control: n = 1 shows some


def test_n_zero_needs_no_examples_but_needs_the_instruction_line():
    free = resolve("answer like a pirate")
    text, _ = ExemplarEncoder().render([free], [{"role": "user", "content": "Why?"}], None, options={"n": 0})
    assert text.startswith("Instructions: answer like a pirate")
    with pytest.raises(ConfigError, match="n = 0 with instruction = false"):
        ExemplarEncoder().render(
            [free], [{"role": "user", "content": "Why?"}], None, options={"n": 0, "instruction": False}
        )


# 14: repeats are said once


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"preferences": ["concise", "brief"]}, "views 1 and 2 carry the same preferences (concise)"),
        ({"views": [["concise", "short"], ["humor"]]}, "view 1 lists concise twice"),
        ({"views": [["humor", "concise"], ["concise", "humor"]]}, "views 1 and 2 carry the same preferences"),
    ],
)
def test_repeated_preferences_or_views_warn_once(model, kwargs, needle):
    got = _pj_warnings(lambda: model.generate("hi", **kwargs, **KW))
    assert len([w for w in got if needle in w]) == 1, got


def test_distinct_views_do_not_warn_about_repeats(model):
    got = _pj_warnings(lambda: model.generate("hi", views=[["concise", "humor"], ["concise"]], **KW))
    assert not [w for w in got if "repeat" in w], got


# 16: clearer errors


def test_a_file_table_with_a_misspelt_name_suggests_the_name(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[preferences]]\nname = "concize"\n')
    with pytest.raises(UnknownPreferenceError, match="entry 1: 'concize' is no preference name; did you mean concise"):
        load_file(f)


def test_encoder_options_is_a_per_call_keyword(model):
    res = model.generate("hi", preferences=["concise", "humor"], encoder="exemplar", encoder_options={"n": 1}, **KW)
    assert res.settings["encoder"] == "exemplar"
    with pytest.raises(ConfigError, match="unknown option.*exemplar encoder: nn") as err:
        model.generate("hi", preferences=["concise", "humor"], encoder="exemplar", encoder_options={"nn": 1}, **KW)
    assert "decoding." not in str(err.value)


@pytest.mark.parametrize("out", ["prompt text", ("text", 1), None])
def test_encode_refuses_a_render_that_is_not_text_and_add_bos(out):
    """``preferences.encode`` is the public one-view helper; a plugin encoder's wrong ``render`` result is a
    PluginError naming it there too, not letters unpacked from a str."""
    from personajudge.backends.toy import ToyTokenizer
    from personajudge.core.errors import PluginError
    from personajudge.preferences.encoders import encode

    class Odd:
        name = "odd"

        def render(self, view, conversation, tokenizer, *, system=None, options=None):
            return out

    with pytest.raises(PluginError, match=r"encoder 'odd' \(.*Odd\)\.render returned .*it returns \(text, add_bos\)"):
        encode(Odd(), [], [{"role": "user", "content": "hi"}], ToyTokenizer())


@pytest.mark.parametrize(
    "first, joined",
    [
        ("Talk like a pirate", "Talk like a pirate. Be concise"),  # a file's description without a period
        ("Talk like a pirate!", "Talk like a pirate! Be concise"),
        ('Say "arr."', 'Say "arr." Be concise'),  # the period inside the quote ends it
        ("Talk like a pirate.  ", "Talk like a pirate. Be concise"),
    ],
)
def test_instructions_in_one_view_are_separate_sentences(first, joined):
    from personajudge.preferences.model import compose

    assert compose([resolve(first), resolve("concise")]).startswith(joined + " and to the point")
    assert compose([resolve(first)]) == first.strip()  # one preference is left as written


@pytest.mark.parametrize(
    "item, names",
    [
        ("concise,humor", ["concise", "humor"]),  # names in one string, as documented
        ("concise, humor", ["concise", "humor"]),
        ("answer briefly, with humour", ["answer-briefly-with-humour"]),  # a sentence with a comma is one preference
        ("简洁, 幽默地回答", ["custom"]),
    ],
)
def test_a_string_in_a_view_splits_at_commas_only_into_names(item, names):
    assert [p.name for p in build_views(views=[[item], ["expert"]])[0]] == names


def test_a_typo_among_comma_separated_names_is_still_an_error():
    from personajudge.core.errors import UnknownPreferenceError

    with pytest.raises(UnknownPreferenceError, match="unknown preference 'concize'; did you mean concise"):
        build_views(views=[["concize,humor"], ["expert"]])
