"""Exemplar preferences: the library's demonstrations, the exemplar encoder, `auto`, and user-given examples."""

from __future__ import annotations

import json

import pytest
from chat_tokenizers import ChatTokenizer

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyTokenizer
from personajudge.core.errors import ConfigError, PreferenceError
from personajudge.evaluation.dataset import builtin_prompts
from personajudge.plugins import registry, resolve_encoder
from personajudge.preferences import Preference, build_views, load_file, resolve
from personajudge.preferences.encoders import ExemplarEncoder, auto_encoder_name
from personajudge.preferences.library import builtin_preferences, combined_examples, neutral_examples
from personajudge.preferences.model import Example

CONV = [{"role": "user", "content": "Why is the sky blue?"}]
TOK = ToyTokenizer()  # no chat template: a "base model"


def render(view, conversation=CONV, **kw):
    return ExemplarEncoder().render(view, conversation, TOK, **kw)[0]


# -- the library --------------------------------------------------------------------------------------


def test_every_builtin_preference_has_one_line_exemplars():
    for p in builtin_preferences():
        assert len(p.examples) >= 3, p.name
        assert all("\n" not in e.q + e.a and e.q.endswith("?") for e in p.examples), p.name
    assert len(neutral_examples()) >= 3


def test_exemplar_questions_are_not_evaluation_prompts():
    """The evaluation measures the encoder on P-Soups prompts; none of them may be shown as an exemplar."""
    prompts = {" ".join(item.prompt.lower().split()) for item in builtin_prompts()}
    shown = [e.q for p in builtin_preferences() for e in p.examples] + [e.q for e in neutral_examples()]
    shown += [e.q for a in ("concise", "informative") for e in combined_examples([a, "friendly"])]
    for q in shown:
        assert " ".join(q.lower().split()) not in prompts, q


def test_exemplars_differ_in_the_preferred_direction():
    """Independent of the model: concise exemplars are short, informative ones long (their purpose)."""
    words = lambda name: sum(len(e.a.split()) for e in resolve(name).examples) / len(resolve(name).examples)  # noqa
    neutral = sum(len(e.a.split()) for e in neutral_examples()) / len(neutral_examples())
    assert words("concise") < neutral < words("informative")


def test_combined_exemplars_are_keyed_by_sorted_names():
    assert combined_examples(["friendly", "concise"]) == combined_examples(["concise", "friendly"])
    assert combined_examples(["concise", "friendly"])
    assert combined_examples(["concise", "creative"]) is None


# -- the encoder -------------------------------------------------------------------------------------


def test_single_preference_view_shows_instruction_exemplars_then_the_prompt():
    concise = resolve("concise")
    text = render([concise])
    assert text.startswith(
        f"Instructions: {concise.instruction}\n\nQuestion: {concise.examples[0].q}\nAnswer: {concise.examples[0].a}\n\n"
    )
    assert text.endswith("Question: Why is the sky blue?\nAnswer:")
    assert text.count("Question:") == 4  # three exemplars + the prompt
    assert "Instructions" not in render([concise], options={"instruction": False})
    assert render([concise], options={"n": 1}).count("Question:") == 2


def test_a_view_with_no_preference_gets_the_neutral_exemplars():
    text = render([])
    assert "Instructions" not in text
    for e in neutral_examples():
        assert f"Question: {e.q}\nAnswer: {e.a}\n\n" in text


def test_two_preferences_use_combined_exemplars_when_they_exist():
    text = render([resolve("friendly"), resolve("concise")])
    for e in combined_examples(["concise", "friendly"]):
        assert f"Answer: {e.a}\n" in text
    assert resolve("friendly").instruction in text and resolve("concise").instruction in text


def test_two_preferences_without_combined_exemplars_interleave_their_own():
    a, b = resolve("concise"), resolve("creative")
    shown = ExemplarEncoder.examples([a, b], n=3)
    assert shown == [a.examples[0], b.examples[0], a.examples[1]]
    three = [resolve("concise"), resolve("creative"), resolve("vivid"), resolve("expert")]
    assert len(ExemplarEncoder.examples(three, n=3)) == 4  # at least one per preference


def test_own_examples_take_precedence_over_combined_ones():
    mine = resolve("concise").model_copy(update={"examples": (Example(q="Is it raining?", a="Yes."),)})
    shown = ExemplarEncoder.examples([mine, resolve("friendly")], n=3)
    assert shown[0] == mine.examples[0] and resolve("friendly").examples[0] in shown


def test_multi_turn_and_system_keep_working():
    conv = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue.\nReally."},
        {"role": "user", "content": "Why that one?"},
    ]
    text = render([resolve("concise")], conv, system="You are terse.")
    assert text.startswith("You are terse.\n\nInstructions:")
    assert text.endswith("Question: Name a colour.\nAnswer: Blue. Really.\n\nQuestion: Why that one?\nAnswer:")


def test_a_preference_without_examples_is_a_clear_error():
    with pytest.raises(ConfigError, match="has none"):
        render([resolve("answer like a pirate would")])
    with pytest.raises(ConfigError, match="encoder_options.n"):
        render([], options={"n": -1})


def test_stop_strings_end_the_answer_at_its_line_and_at_labels():
    stops = ExemplarEncoder().stop_strings(TOK)
    assert "\n" in stops and "Question:" in stops and "Answer:" in stops
    assert ExemplarEncoder().stop_strings(TOK, {"stop": False}) == []


def test_exemplar_is_registered():
    assert "exemplar" in registry("encoder").names()
    assert resolve_encoder("exemplar", TOK).name == "exemplar"


# -- auto ------------------------------------------------------------------------------------------------


def test_auto_picks_exemplar_for_base_models_when_every_preference_has_examples():
    with_examples = build_views(["concise", "friendly"])
    assert auto_encoder_name(TOK, with_examples) == "exemplar"
    assert auto_encoder_name(TOK, [[]]) == "exemplar"  # no preference: neutral exemplars
    assert auto_encoder_name(TOK, build_views(["concise", "talk like a pirate"])) == "plain"
    assert auto_encoder_name(TOK) == "plain"  # views unknown
    assert auto_encoder_name(ChatTokenizer(), with_examples) == "chat-turn"
    assert resolve_encoder("auto", TOK, with_examples).name == "exemplar"


def test_the_api_reports_and_uses_the_resolved_encoder():
    pj = PersonaJudge({"backend": {"name": "toy"}, "preferences": ["concise", "friendly"]})
    assert pj.resolved_encoder(pj.config) == "exemplar"
    assert pj.resolved_encoder(pj.config, build_views(["a free-text wish"])) == "plain"
    cfg, meth, views = pj._prepare(None, None, None, {})
    assert cfg.encoder == "exemplar" and "\n" in pj.stop_strings(cfg)
    res = pj.generate("Why is the sky blue?", max_new_tokens=4, seed=0)
    assert res.settings["encoder"] == "exemplar"
    # the contexts are the exemplar encoder's, view by view
    text, _ = ExemplarEncoder().render([resolve("concise")], CONV, TOK)
    assert pj.encode_views("Why is the sky blue?", cfg, meth, views)[0] == TOK.encode(text)
    # every method of one run is encoded alike: base gets the neutral exemplars, not the plain template
    base = pj.encode_views("Why is the sky blue?", pj.config, pj_method(pj, "base"), views)[0]
    assert base == TOK.encode(ExemplarEncoder().render([], CONV, TOK)[0])


def pj_method(pj, name):
    from personajudge.api import make_method
    from personajudge.core.config import build_config

    return make_method(build_config(pj.config.model_dump(by_alias=True), method=name))


# -- user-given examples in preferences files ------------------------------------------------------------


def test_toml_file_with_examples(tmp_path):
    f = tmp_path / "prefs.toml"
    f.write_text(
        '[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\n'
        'examples = [{q = "Where is the ship?", a = "Arr, she be in the harbour, matey."},\n'
        '            {q = "Is it late?", a = "Aye, the moon be up."}]\n'
        '[[preferences]]\nname = "concise"\nexamples = [{q = "Is water wet?", a = "Yes."}]\n'
    )
    pirate, concise = load_file(f)
    assert pirate.examples[0] == Example(q="Where is the ship?", a="Arr, she be in the harbour, matey.")
    assert len(pirate.examples) == 2
    # a library name without a description adjusts the built-in: own examples, same instruction
    assert concise.instruction == resolve("concise").instruction and concise.examples == (
        Example(q="Is water wet?", a="Yes."),
    )
    assert auto_encoder_name(TOK, [[pirate], [concise]]) == "exemplar"


def test_json_and_yaml_files_with_examples(tmp_path):
    data = [{"name": "pirate", "description": "Talk like a pirate", "examples": [{"q": "Hi?", "a": "Ahoy!"}]}]
    (tmp_path / "p.json").write_text(json.dumps(data))
    assert load_file(tmp_path / "p.json")[0].examples == (Example(q="Hi?", a="Ahoy!"),)
    pytest.importorskip("yaml")
    (tmp_path / "p.yaml").write_text(
        "- name: pirate\n  description: Talk like a pirate\n  examples:\n    - {q: 'Hi?', a: 'Ahoy!'}\n"
    )
    assert load_file(tmp_path / "p.yaml")[0].examples == (Example(q="Hi?", a="Ahoy!"),)


@pytest.mark.parametrize(
    "examples,match",
    [
        ('[{q = "Hi?", a = "line one\\nline two"}]', r"entry 1: examples\.0\.a: .*one line"),
        ('[{q = "Hi?"}]', r"entry 1: examples\.0\.a: Field required"),
        ('[{q = "Hi?", a = ""}]', r"examples\.0\.a"),
        ('[{q = "Hi?", a = "Yo", mood = "x"}]', r"examples\.0\.mood"),
        ('"Hi? Yo"', r"entry 1: examples must be a list of tables"),
    ],
)
def test_bad_examples_are_one_line_errors_naming_the_field(tmp_path, examples, match):
    f = tmp_path / "prefs.toml"
    f.write_text(f'[[preferences]]\nname = "pirate"\ndescription = "Talk like a pirate"\nexamples = {examples}\n')
    with pytest.raises(PreferenceError, match=match) as e:
        load_file(f)
    assert "\n" not in str(e.value)


def test_unknown_keys_in_a_preference_table_are_named(tmp_path):
    f = tmp_path / "prefs.json"
    f.write_text(json.dumps([{"name": "x", "description": "be x", "exemples": []}]))
    with pytest.raises(PreferenceError, match="unknown key.*exemples"):
        load_file(f)


def test_example_model_rejects_multi_line_text():
    with pytest.raises(ValueError, match="one line"):
        Example(q="a?", a="b\nc")
    assert Preference(name="x", description="y", instruction="y").examples == ()
