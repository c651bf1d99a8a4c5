"""The emitter decodes only as often as something reads the text, and the output does not depend on it.

With stop strings or a listener (``on_text``) the text is decoded after every
token; with only the repetition guard, every ``GUARD_EVERY`` tokens; with
neither, once at the end. The reference is the same emitter forced to look
after every token (a listener that ignores its pieces): tokens, text and
finish reason must be equal whatever the input, including runs the guard
cuts, EOS and the length limit arriving between two looks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personajudge.bench import text as text_bench
from personajudge.core.stopping import Emitter

EOS = 0


class CharTokenizer:
    """One token per character (ids are code points); ``strip`` drops one leading space of a whole
    decode, as SentencePiece decoders do, so the emitter's incremental decoding has to anchor."""

    eos_token_ids = frozenset({EOS})

    def __init__(self, strip: bool = False):
        self.strip = strip
        self.calls = 0
        self.decoded = 0  # tokens decoded, over all calls

    def decode(self, ids):
        self.calls += 1
        self.decoded += len(ids)
        text = "".join(chr(i) for i in ids if i)
        return text[1:] if self.strip and text.startswith(" ") else text


def run(tokens, *, eager: bool, tok=None, **kw):
    """Push ``tokens`` until the emitter refuses one; then end as a loop would (length)."""
    tok = tok or CharTokenizer()
    em = Emitter(tok, on_text=(lambda piece: None) if eager else None, **kw)
    pushed = 0
    for t in tokens:
        pushed += 1
        if not em.push(t):
            break
    em.finish("length")
    return em, pushed


# lines that repeat (so the guard fires), sentence ends, numbers, blank lines, and the odd EOS
PIECES = ["Buy milk\n", "buy milk.\n", "A cat. ", "\n", "2. ", "x", " ", "!", "Yes", "\x00"]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=40),
    repeat_lines=st.sampled_from([0, 2, 3]),
    max_new_tokens=st.integers(1, 200),
    stop=st.sampled_from([(), ("milk.",), ("\n",)]),
    strip=st.booleans(),
)
def test_looking_at_the_text_less_often_changes_nothing(pieces, repeat_lines, max_new_tokens, stop, strip):
    tokens = [ord(c) for c in "".join(pieces)]
    kw = dict(max_new_tokens=max_new_tokens, repeat_lines=repeat_lines, stop=stop)
    ref, _ = run(tokens, eager=True, tok=CharTokenizer(strip), **kw)
    lazy, _ = run(tokens, eager=False, tok=CharTokenizer(strip), **kw)
    assert (lazy.tokens, lazy.text, lazy.finish_reason) == (ref.tokens, ref.text, ref.finish_reason)
    assert lazy.text == CharTokenizer(strip).decode(lazy.tokens)


def test_a_run_the_guard_cuts_between_two_looks_ends_where_it_would_token_by_token():
    text = "Sure.\nBuy milk\nBuy milk\nBuy milk\nBuy bread and more bread and more"
    tokens = [ord(c) for c in text]
    ref, ref_pushed = run(tokens, eager=True, max_new_tokens=500, repeat_lines=3)
    lazy, lazy_pushed = run(tokens, eager=False, max_new_tokens=500, repeat_lines=3)
    assert ref.text == lazy.text == "Sure.\nBuy milk" and ref.finish_reason == lazy.finish_reason == "stop"
    # the lazy emitter saw the run later, by fewer than GUARD_EVERY tokens
    assert ref_pushed <= lazy_pushed < ref_pushed + Emitter.GUARD_EVERY


@pytest.mark.parametrize("end", ["eos", "length"])
def test_a_run_completed_just_before_eos_or_the_limit_is_still_cut(end):
    text = "Buy milk\nBuy milk\nBuy milk\nx"
    tokens = [ord(c) for c in text] + ([EOS] if end == "eos" else [])
    limit = len(text) if end == "length" else 500
    for eager in (True, False):
        em, _ = run(tokens, eager=eager, max_new_tokens=limit, repeat_lines=3)
        assert (em.text, em.finish_reason) == ("Buy milk", "stop"), eager


N = 400


def decodes(*, stop=(), repeat_lines=0, listen=False):
    tok = CharTokenizer()
    em = Emitter(
        tok, max_new_tokens=N + 1, stop=stop, repeat_lines=repeat_lines, on_text=(lambda p: None) if listen else None
    )
    for i in range(N):
        assert em.push(ord("a") + i % 26)
    em.finish("length")
    assert em.text == "".join(chr(ord("a") + i % 26) for i in range(N))
    return tok.calls


def test_the_text_is_decoded_only_as_often_as_something_reads_it():
    assert decodes() <= 2  # nobody reads it before the end: one decode (and its checkpoint's anchor)
    guard = decodes(repeat_lines=3)
    assert N // Emitter.GUARD_EVERY <= guard <= 2 * (N // Emitter.GUARD_EVERY + 1)
    assert decodes(stop=("zz",)) >= N  # a stop string may end at any token
    assert decodes(listen=True) >= N  # a listener gets text as it is committed


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--tokens", "0"], "argument --tokens: must be at least 1"),
        (["--repeats", "0"], "argument --repeats: must be at least 1"),
        (["--backend", "nosuch"], "error: unknown backend 'nosuch'"),
    ],
)
def test_the_text_benchmark_refuses_bad_flags_in_one_line(args, needle, capsys):
    """``--tokens 0`` divided by zero, ``--repeats 0`` printed inf, an unknown backend was a traceback."""
    try:
        code = text_bench.main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_the_text_benchmark_runs_every_regime(capsys):
    assert text_bench.main(["--backend", "toy", "--tokens", "300", "--repeats", "1"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line and "us/token" not in line]
    assert [r[0].strip() for r in rows] == [label for label, _, _ in text_bench.REGIMES]
    assert all(float(r[1]) > 0 for r in rows)
