"""The emitter's repetition guard and its whitespace-only stop rule: where a response ends, never what is sampled."""

from __future__ import annotations

import pytest

from personajudge.api import PersonaJudge
from personajudge.core.config import DecodingConfig, build_config
from personajudge.core.errors import ConfigError
from personajudge.core.stopping import Emitter


class CharTokenizer:
    """One token per character (ids are code points), so cuts land exactly where the text says."""

    eos_token_ids = frozenset({0})

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


def emit(text: str, *, repeat_lines: int = 3, stop=()):
    """Push ``text`` character by character; the final text, finish reason, tokens kept, streamed text."""
    pieces: list[str] = []
    em = Emitter(CharTokenizer(), max_new_tokens=10_000, stop=stop, repeat_lines=repeat_lines, on_text=pieces.append)
    for c in text:
        if not em.push(ord(c)):
            break
    em.finish("length")
    assert "".join(pieces) == em.text, "the streamed pieces must concatenate to the final text"
    assert CharTokenizer().decode(em.tokens) == em.text, "the kept tokens must decode to the text"
    return em.text, em.finish_reason


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Sure.\nBuy milk\nBuy milk\nBuy milk\nBuy bread", "Sure.\nBuy milk"),
        ("1. Buy milk\n2. buy milk.\n3. Buy milk!\n4. x", "1. Buy milk"),  # same up to digits, case, punctuation
        (" Your skin is so soft. Your skin is so soft. Your skin is so soft. Your", " Your skin is so soft."),
        ("1. The game is changing. 2. The game is changing. 3. The game is changing. 4.", "1. The game is changing."),
        ("line\n\nline\n\n\nline\nmore", "line"),  # blank lines neither count nor break a run
    ],
)
def test_a_run_of_repeated_lines_or_sentences_ends_after_its_first(text, expected):
    assert emit(text) == (expected, "stop")


@pytest.mark.parametrize(
    "text",
    [
        "Buy milk\nBuy milk\nBuy bread\nBuy milk\n",  # two in a row is not a run of three
        "A. B. A. B. A. B. A. B.",  # alternation is not a run
        "yes yes yes yes yes yes yes yes",  # a repeated word is not a repeated line
        "It is 3.5 m long. It is 4.5 m long.",  # numbers inside a sentence do not split it
    ],
)
def test_text_that_is_not_a_run_is_never_cut(text):
    assert emit(text) == (text, "length")


def test_the_run_length_is_configurable_and_zero_turns_the_guard_off():
    text = "x\nx\nx\nx\ny"
    assert emit(text, repeat_lines=2) == ("x", "stop")
    assert emit(text, repeat_lines=4) == ("x", "stop")
    assert emit(text, repeat_lines=5) == (text, "length")
    assert emit(text, repeat_lines=0) == (text, "length")


def test_the_guard_works_with_stop_strings():
    # the stop string comes first: the guard never sees the text after it
    assert emit("a. a. STOP a. a.", stop=["STOP"]) == ("a. a. ", "stop")
    assert emit("a. a. a. STOP", stop=["STOP"]) == ("a.", "stop")


def test_a_whitespace_stop_string_counts_only_after_the_answer_began():
    assert emit("\n Hello there\nmore", stop=["\n"], repeat_lines=0) == ("\n Hello there", "stop")
    assert emit("  \n\n", stop=["\n"], repeat_lines=0) == ("  \n\n", "length")
    # other stop strings still match anywhere
    assert emit("Answer: hi", stop=["Answer:"], repeat_lines=0) == ("", "stop")


def test_config_default_validation_and_the_reference_oracle():
    assert DecodingConfig().repeat_lines == 3
    with pytest.raises(ConfigError, match="decoding.repeat_lines"):
        build_config({"decoding": {"repeat_lines": -1}})
    pj = PersonaJudge({"backend": {"name": "toy"}, "decoding": {"repeat_lines": 4}})
    ctx = [[1, 2, 3], [1, 2, 4]]
    assert pj._request(ctx, pj.config, 0).emitter.repeat_lines == 4
    ref = build_config(pj.config.model_dump(by_alias=True), method="reference")
    assert pj._request(ctx, ref, 0).emitter.repeat_lines == 0  # the oracle is never cut
    assert Emitter(CharTokenizer(), max_new_tokens=4).repeat_lines == 0  # off unless asked for
