"""Preferences: the library, resolution, files, views, and every encoder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_tokenizers import STRICT, ChatTokenizer

from personajudge.backends.toy import ToyTokenizer
from personajudge.cli import main
from personajudge.core.errors import ConfigError, PreferenceError
from personajudge.plugins import resolve_encoder
from personajudge.preferences import build_views, load_file, resolve
from personajudge.preferences.encoders import normalize_conversation
from personajudge.preferences.library import builtin_preferences

PAPER = ["helpful", "harmless", "humor", "correct", "informative", "professional", "creative", "touching", "vivid"]
PSOUPS = ["elementary", "expert", "concise", "informative", "friendly", "unfriendly", "sassy", "sarcastic"]
CONV = [{"role": "user", "content": "Why is the sky blue?"}]
MULTI = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Why that one?"},
]


def test_library_covers_the_paper_and_psoups_dimensions():
    names = {p.name for p in builtin_preferences()}
    assert set(PAPER) | set(PSOUPS) <= names
    for p in builtin_preferences():
        assert p.description and p.instruction and p.source


def test_resolution_by_name_alias_and_free_text():
    assert resolve("concise").name == "concise"
    assert resolve("Humorous").name == "humor"  # alias, case-insensitive
    free = resolve("explain it like I'm five, but stay correct")
    assert free.instruction == "explain it like I'm five, but stay correct" and free.source == "free text"


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("concize", "did you mean concise"),
        ("sarcastc", "did you mean sarcastic"),
        ("", "empty preference"),
        ("   ", "empty preference"),
        ("qwertyuiop", "unknown preference 'qwertyuiop'"),
    ],
)
def test_bad_preferences(bad, needle):
    with pytest.raises(PreferenceError, match=needle):
        resolve(bad)


@pytest.mark.parametrize("text", ["简洁明了地回答", "ユーモアを込めて", "prägnant", "wow!"])
def test_one_word_that_cannot_be_a_name_is_free_text(text):
    """Names are ASCII words; scripts written without spaces have no other way to say a description."""
    free = resolve(text)
    assert free.instruction == text and free.source == "free text"


def test_preference_files(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('preferences = ["concise", {name = "pirate", description = "Talk like a pirate.", weight = 2}]\n')
    got = load_file(toml)
    assert [p.name for p in got] == ["concise", "pirate"] and got[1].weight == 2
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["humor", {"description": "Answer in rhymes."}]))
    assert [p.instruction for p in load_file(js)][1] == "Answer in rhymes."
    yml = tmp_path / "p.yaml"
    yml.write_text("- expert\n- description: Use short sentences.\n")
    pytest.importorskip("yaml")
    assert load_file(yml)[1].instruction == "Use short sentences."


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("bad.json", "[1, 2", "does not parse"),
        ("bad.toml", "preferences = [", "does not parse"),
        ("empty.json", "[]", "non-empty list"),
        ("nodesc.json", '[{"name": "x", "description": ""}]', "entry 1"),
        ("typo.json", '["concize"]', "did you mean concise"),
    ],
)
def test_bad_preference_files(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(PreferenceError, match=needle):
        load_file(f)


def test_views_default_grouped_and_multi_objective():
    assert [[p.name for p in v] for v in build_views(["concise", "humor"])] == [["concise"], ["humor"]]
    grouped = build_views([], [["concise,humor"], ["expert"]])
    assert [[p.name for p in v] for v in grouped] == [["concise", "humor"], ["expert"]]
    three = build_views([], [["touching", "vivid", "creative"], ["helpful"]])
    assert len(three[0]) == 3
    assert build_views([]) == [[]]
    with pytest.raises(PreferenceError):
        build_views([], [[" , "]])


def render(encoder, tok, view, conv=CONV, **kw):
    enc = resolve_encoder(encoder, tok)
    return enc.render([resolve(p) for p in view], normalize_conversation(conv), tok, **kw)


def test_auto_picks_chat_turn_or_plain():
    assert resolve_encoder("auto", ChatTokenizer()).name == "chat-turn"
    assert resolve_encoder("auto", ToyTokenizer()).name == "plain"


def test_chat_turn_puts_the_preference_in_its_own_user_turn():
    text, add_bos = render("chat-turn", ChatTokenizer(), ["concise", "humor"])
    assert text == (
        "<|im_start|>user\nBe concise and to the point; never be verbose. Be humorous: keep the tone "
        "cheerful, playful and amusing.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert add_bos is False  # the template carries its own special tokens
    multi, _ = render("chat-turn", ChatTokenizer(), ["concise"], MULTI)
    assert (
        multi.index("never be verbose")
        < multi.index("Name a colour.")
        < multi.index("Blue.")
        < multi.index("Why that one?")
    )


def test_chat_turn_merges_into_the_first_turn_when_the_template_insists_on_alternation():
    tok = ChatTokenizer(STRICT)
    text, _ = render("chat-turn", tok, ["concise"], MULTI)
    assert text.startswith("<s><start_of_turn>user\nBe concise and to the point; never be verbose.\n\nName a colour.")
    assert text.endswith("<start_of_turn>model\n") and text.count("<start_of_turn>user") == 2


def test_system_encoder():
    text, _ = render("system", ChatTokenizer(), ["expert"], system="You are a physicist.")
    assert text.startswith("<|im_start|>system\nYou are a physicist.\n\nWrite for an expert")
    strict, _ = render("system", ChatTokenizer(STRICT), ["expert"])  # no system role: goes into the first turn
    assert "<start_of_turn>user\nWrite for an expert" in strict


def test_plain_encoder_templates():
    text, add_bos = render("plain", ToyTokenizer(), ["concise"])
    assert text == (
        "Instructions: Be concise and to the point; never be verbose.\n\nQuestion: Why is the sky blue?\nAnswer:"
    )
    assert add_bos is True
    multi, _ = render("plain", ToyTokenizer(), ["concise"], MULTI)
    assert multi.endswith("Question: Name a colour.\nAnswer: Blue.\n\nQuestion: Why that one?\nAnswer:")
    dia, _ = render("plain", ToyTokenizer(), [], MULTI, options={"template": "dialogue"})
    assert dia == "User: Name a colour.\nAssistant: Blue.\nUser: Why that one?\nAssistant:"
    with pytest.raises(ConfigError, match="unknown plain template"):
        render("plain", ToyTokenizer(), [], options={"template": "nope"})


def test_instruction_encoder_appends_to_the_last_user_turn():
    text, _ = render("instruction", ChatTokenizer(), ["sassy"], MULTI)
    assert "<|im_start|>user\nWhy that one? Answer in a sassy manner.<|im_end|>" in text
    assert "Name a colour.<|im_end|>" in text
    plain, _ = render("instruction", ToyTokenizer(), ["sassy"])
    assert plain == "Question: Why is the sky blue? Answer in a sassy manner.\nAnswer:"


def test_chat_encoders_need_a_chat_template():
    with pytest.raises(ConfigError, match="no chat template"):
        render("chat-turn", ToyTokenizer(), ["concise"])


def test_prompt_method_composes_all_preferences_with_the_same_encoder():
    from personajudge.plugins.manager import get_method

    views = build_views(["concise", "humor"])
    planned = get_method("prompt")().plan(views)
    assert [[p.name for p in v] for v in planned] == [["concise", "humor"]]
    assert get_method("base")().plan(views) == [[]]


@pytest.mark.parametrize(
    "conv, needle",
    [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "message 1"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with a user message"),
    ],
)
def test_bad_conversations(conv, needle):
    with pytest.raises(ConfigError, match=needle):
        normalize_conversation(conv)


def test_cli_preferences_listing_and_errors(capsys, tmp_path):
    assert main(["preferences", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert set(PAPER) | set(PSOUPS) <= names
    assert main(["generate", "hi", "--backend", "toy", "--prefer", "concize"]) == 2
    assert "did you mean concise" in capsys.readouterr().err
    assert main(["generate", "hi", "--backend", "toy", "--prefer", ""]) == 2
    assert "empty preference" in capsys.readouterr().err
    bad = tmp_path / "p.json"
    bad.write_text("{nope")
    assert main(["generate", "hi", "--backend", "toy", "--preferences-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not parse" in err and err.count("\n") == 1


def test_cli_views_and_preferences_file(capsys, tmp_path):
    f = tmp_path / "p.json"
    f.write_text('["concise", "humor", "expert"]')
    assert (
        main(["generate", "hi", "--backend", "toy", "--preferences-file", str(f), "--max-new-tokens", "5", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["stats"]["views"] == 3
    assert (
        main(
            [
                "generate",
                "hi",
                "--backend",
                "toy",
                "--view",
                "concise,humor",
                "--view",
                "expert",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["stats"]["views"] == 2


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_encoder"


@pytest.mark.slow
def test_third_party_encoder_package_installs_and_works_from_the_cli(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-m", "personajudge"]
    listed = subprocess.run(cli + ["plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    encoders = {r["name"]: r["plugin"] for r in json.loads(listed.stdout)["encoder"]}
    assert encoders.get("persona-card") == "persona_card"  # registered through the entry point
    out = subprocess.run(
        cli
        + [
            "generate",
            "Why is the sky blue?",
            "--backend",
            "toy",
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--encoder",
            "persona-card",
            "--max-new-tokens",
            "6",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    # the toy model's prompt length proves the persona card was the prefix
    card = "# Persona card\n- concise: Be concise and to the point; never be verbose.\n\nUser: Why is the sky blue?\nAssistant:"
    assert res["stats"]["prompt_tokens"][0] == len(card)


def test_plain_format_implies_a_stop_string(toy):
    from personajudge.api import PersonaJudge

    pj = PersonaJudge({"backend": {"name": "toy"}}, backend=toy)
    assert pj.stop_strings(pj.config) == ["\nQuestion:"]
    cfg = pj.config.model_copy(
        update={
            "encoder_options": {"template": "dialogue"},
            "decoding": pj.config.decoding.model_copy(update={"stop": ["!"]}),
        }
    )
    assert pj.stop_strings(cfg) == ["!", "\nUser:"]
    off = pj.config.model_copy(update={"encoder_options": {"stop": False}})
    assert pj.stop_strings(off) == []
