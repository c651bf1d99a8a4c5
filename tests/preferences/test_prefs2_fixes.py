"""Bringing your own preferences (audit prefs2, findings A, B, C, F, G, H, I): a run's settings repeat it
whatever its preferences were, a file's names mean the file's preferences everywhere, and the file's
mistakes are one line naming the entry."""

import json
import warnings

import numpy as np
import pytest
from chat_tokenizers import STRICT, ChatTokenizer
from own_preferences import OWN_CONCISE, PIRATE
from replay import config_from_settings

import personajudge as pj
from personajudge.core.config import RunConfig
from personajudge.core.errors import PersonaJudgeWarning, PreferenceError, UnknownPreferenceError
from personajudge.core.methods import Pad, Prompt
from personajudge.plugins import preference_library
from personajudge.preferences import (
    Preference,
    build_views,
    duplicates,
    load_file,
    reported,
    resolve,
    with_definitions,
)
from personajudge.preferences.encoders import ChatTurnEncoder, InstructionEncoder, SystemEncoder

TOY = {"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 8, "seed": 1}}
#: the built-in humor with its own instruction, and one with its own weight
OWN_HUMOR = resolve("humor").model_copy(update={"instruction": "Tell a joke first."})
HEAVY_CONCISE = resolve("concise").model_copy(update={"weight": 10.0})


@pytest.fixture(scope="module")
def model():
    with pj.PersonaJudge(TOY) as m:
        yield m


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PersonaJudgeWarning)
        return fn(*args, **kwargs)


def _replayed(settings, method="persona-judge"):
    """The tokens of a run whose config is built from ``settings`` alone (JSON round trip included)."""
    cfg = RunConfig.model_validate(config_from_settings(settings))
    with pj.PersonaJudge(cfg) as m:
        return _quiet(m.generate, "hi").tokens


# -- A: settings repeat a run, whatever its preferences ----------------------------------------------------


@pytest.mark.parametrize(
    ("preferences", "views", "method", "encoder", "before"),
    [
        # free text, by its text (it was reported by its slug, which is no name, or a built-in's)
        (["talk like a pirate", "concise"], None, "persona-judge", "plain", [["talk-like-a-pirate"], ["concise"]]),
        (["简洁明了地回答", "humor"], None, "persona-judge", "plain", [["custom"], ["humor"]]),
        (["humor !", "concise"], None, "persona-judge", "plain", [["humor"], ["concise"]]),
        # a caller's (a file's) own preference, and built-ins adjusted: own examples, instruction, weight
        ([PIRATE, "concise"], None, "persona-judge", "auto", [["pirate"], ["concise"]]),
        ([OWN_CONCISE, "humor"], None, "persona-judge", "auto", [["concise"], ["humor"]]),
        ([OWN_HUMOR, "concise"], None, "persona-judge", "plain", [["humor"], ["concise"]]),
        ([HEAVY_CONCISE, "humor"], None, "mod", "plain", [["concise"], ["humor"]]),  # mod weighs by it
        # views naming them
        (
            [PIRATE, OWN_CONCISE],
            [["pirate", "concise"], ["humor"]],
            "persona-judge",
            "exemplar",
            [["pirate", "concise"], ["humor"]],
        ),
    ],
)
def test_a_run_is_repeated_from_its_settings_alone(model, preferences, views, method, encoder, before):
    res = _quiet(model.generate, "hi", preferences=preferences, views=views, method=method, encoder=encoder)
    assert json.loads(json.dumps(res.settings)) == res.settings  # JSON-serialisable as it is
    assert _replayed(res.settings) == res.tokens
    # the control: with what the settings reported before, the run is not repeated (an unknown name, or
    # other tokens), so the case has the power to fail
    try:
        again = _replayed({**res.settings, "views": before})
    except PreferenceError:
        return
    assert again != res.tokens


def test_settings_report_names_texts_and_tables(model):
    res = _quiet(
        model.generate,
        "hi",
        preferences=["brief", "talk like a pirate", "humor !", PIRATE],
    )
    brief, text, humor, pirate = (v[0] for v in res.settings["views"])
    assert (brief, text, humor) == ("concise", "talk like a pirate", "humor !")
    assert pirate == PIRATE.definition() and pirate["instruction"] == "Talk like a pirate."
    res = _quiet(model.generate, "hi", preferences=[OWN_CONCISE, "humor"])
    own, humor = (v[0] for v in res.settings["views"])
    assert own["examples"] == [{"q": "Why?", "a": "Because."}] and own["name"] == "concise" and humor == "humor"
    res = _quiet(model.generate, "hi", preferences=["humor", HEAVY_CONCISE], method="mod")
    humor, heavy = (v[0] for v in res.settings["views"])
    assert humor == "humor" and heavy["weight"] == 10.0
    assert heavy["examples"] == [e.model_dump() for e in resolve("concise").examples]


def test_a_free_text_named_like_a_builtin_is_not_labelled_as_it():
    """``"humor !"`` was named by its slug ``humor``: its --show-prompt header and its settings then said the
    built-in humor, which a replay would have used."""
    lib = preference_library()
    p = resolve("humor !", lib)
    assert p.instruction == "humor !" and p.name == "humor !" and p.source == "free text"
    assert reported(p, lib) == "humor !" and resolve(reported(p, lib), lib) == p
    assert resolve("talk like a pirate", lib).name == "talk-like-a-pirate"  # the slug, where it is free
    # a free-text object made directly keeps the slug name; then its full table is what resolves back
    direct = Preference.free_text("humor !")
    assert direct.name == "humor" and resolve(reported(direct, lib), lib).definition() == direct.definition()
    weighted = Preference.free_text("talk like a pirate", weight=2.0)  # its text alone would lose the weight
    assert resolve(reported(weighted, lib), lib).weight == 2.0


def test_a_table_in_a_config_is_read_as_a_file_entry():
    cfg = RunConfig.model_validate({"views": [[PIRATE.definition(), "humor"]], "preferences": [{"name": "YODA"}]})
    assert build_views([], cfg.views, preference_library())[0][0].definition() == PIRATE.definition()
    with pytest.raises(UnknownPreferenceError, match=r"preferences\[0\]: 'YODA' is no preference name"):
        build_views(cfg.preferences, None, preference_library())
    with pytest.raises(PreferenceError, match=r"views\[0\]\[0\]: weight"):
        build_views([], [[{**PIRATE.definition(), "weight": True}]])


# -- B: a file's (a caller's) definitions win for preferences as for views -----------------------------


def test_a_name_next_to_its_definition_means_the_definition():
    views = build_views([OWN_CONCISE, "concise", "brief"], None, preference_library())
    assert [v[0] for v in views] == [OWN_CONCISE, OWN_CONCISE, OWN_CONCISE]
    with pytest.raises(UnknownPreferenceError):  # the control: without the definition, no pirate
        build_views(["pirate"], None, preference_library())
    assert build_views([PIRATE, "pirate"], None, preference_library())[1][0] is PIRATE


def test_the_repeat_warning_compares_what_decides_the_prompt():
    builtin = resolve("concise")
    for other in (OWN_CONCISE, HEAVY_CONCISE):  # same name and instruction; other examples or weight
        assert duplicates([[builtin], [other]]) is None
        assert duplicates([[builtin, other]]) is None
    assert "views 1 and 2 carry the same preferences (concise)" in duplicates([[OWN_CONCISE], [OWN_CONCISE]])


def test_two_definitions_of_one_name_are_refused():
    with pytest.raises(
        PreferenceError, match="two preferences are named 'concise' and 'Concise' and prompt differently"
    ):
        with_definitions(None, [OWN_CONCISE, HEAVY_CONCISE.model_copy(update={"name": "Concise"})])
    assert with_definitions(None, [OWN_CONCISE, OWN_CONCISE])["concise"] is OWN_CONCISE  # the same twice: fine


# -- C, H, I: a preferences file's mistakes, one line naming the file and the entry ------------------------


def _file(tmp_path, text, name="prefs.toml"):
    f = tmp_path / name
    f.write_text(text)
    return f


@pytest.mark.parametrize(
    ("text", "entries", "name"),
    [
        (
            '[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\n'
            '[[preferences]]\nname = "pirate"\ndescription = "Talk like a ninja"\n',
            "entries 1 and 2",
            "pirate",
        ),
        (
            'preferences = ["humor", {name = "Pirate", description = "x"}, {name = "pirate", description = "y"}]\n',
            "entries 2 and 3",
            "pirate",
        ),
        ('preferences = ["concise", "brief"]\n', "entries 1 and 2", "concise"),  # an alias counts as its name
        (
            'preferences = ["concise", {name = "concise", examples = [{q = "a", a = "b"}]}]\n',
            "entries 1 and 2",
            "concise",
        ),
    ],
)
def test_a_name_twice_in_a_file_is_one_line_naming_both_entries(tmp_path, text, entries, name):
    f = _file(tmp_path, text)
    with pytest.raises(PreferenceError) as err:
        load_file(f, preference_library())
    msg = str(err.value)
    assert msg.startswith(f"preferences file {f}: {entries} are both named '") and "\n" not in msg
    assert f"'{name}'" in msg.lower()


def test_a_typo_in_a_string_entry_names_the_file_and_the_entry(tmp_path):
    f = _file(tmp_path, 'preferences = ["humor", "concize"]\n')
    with pytest.raises(UnknownPreferenceError) as err:  # still the unknown-name type (the server's code)
        load_file(f, preference_library())
    assert str(err.value).startswith(f"preferences file {f}, entry 2: unknown preference 'concize'; did you mean")
    f = _file(tmp_path, 'preferences = ["concise,humor"]\n', "two.toml")
    with pytest.raises(PreferenceError, match=r"two.toml, entry 1: 'concise,humor' lists the preferences"):
        load_file(f, preference_library())
    # a table with neither a name nor a description is named too (it was an unlocated "free-text preference")
    f = _file(tmp_path, '[{"description": "   "}]', "blank.json")
    with pytest.raises(PreferenceError, match=r"blank.json, entry 1: a preference table needs a name"):
        load_file(f, preference_library())


@pytest.mark.parametrize("weight", ["true", '"2"'])
def test_a_files_weight_is_a_number_not_a_bool_or_a_string(tmp_path, weight):
    f = _file(tmp_path, f'[{{"name": "pirate", "description": "Talk like a pirate", "weight": {weight}}}]', "w.json")
    with pytest.raises(PreferenceError, match=r"w.json, entry 1: weight: Input should be a valid number"):
        load_file(f)
    with pytest.raises(PreferenceError, match="weight"):
        Preference(name="x", description="x", instruction="x", weight=json.loads(weight))
    # numbers of any kind still are: an int, a float, numpy's
    for w in (2, 0.5, np.float64(1.5), np.int64(3)):
        assert Preference(name="x", description="x", instruction="x", weight=w).weight == float(w)


# -- F: the instruction encoder folds the system text where the template has no system role -----------------


CONVERSATION = [
    {"role": "system", "content": "Conv system."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Why?"},
]


@pytest.mark.parametrize(("conversation", "system"), [(CONVERSATION, None), (CONVERSATION[1:], "Be terse.")])
def test_the_instruction_encoder_folds_the_system_text_as_chat_turn_does(conversation, system):
    tok = ChatTokenizer(STRICT)
    view = [resolve("concise")]
    text, add_bos = InstructionEncoder().render(view, conversation, tok, system=system)
    sys_text = system or "Conv system."
    assert add_bos is False and "System role" not in text
    assert text.startswith(f"<s><start_of_turn>user\n{sys_text}\n\nName a colour.<end_of_turn>")
    assert text.endswith("Why? Be concise and to the point; never be verbose.<end_of_turn>\n<start_of_turn>model\n")
    # the same placement as the encoders that already fell back: the system text before the first user turn
    for enc in (ChatTurnEncoder(), SystemEncoder()):
        other, _ = enc.render(view, conversation, tok, system=system)
        assert other.index(sys_text) < other.index("Name a colour.")


# -- G: prompt and pad carry a preference two views share once ----------------------------------------------


def test_the_flattened_view_carries_each_preference_once(model):
    concise, humor = resolve("concise"), resolve("humor")
    views = [[concise, humor], [concise], [humor, OWN_CONCISE]]
    assert Prompt().plan(views) == [[concise, humor, OWN_CONCISE]]  # equal preferences once, first place kept
    assert Pad().plan(views) == [[], [concise, humor, OWN_CONCISE]]
    cfg, meth, user_views = _quiet(model._prepare, None, [["concise", "humor"], ["brief"]], "prompt", {})
    ((text, _),) = model.render_views("hi", cfg.model_copy(update={"encoder": "plain"}), meth, user_views)
    assert text.count("Be concise") == 1 and text.count("Be humorous") == 1
