"""The tokens kept at a stop string decode to (at least) the text kept, byte-level tokens included.

Gemma and Llama tokenizers spell rare characters as UTF-8 byte tokens; a prefix that ends inside
such a character decodes to U+FFFD. The emitter used to compare decoded *lengths*, so the
replacement character counted as the whole character and the kept tokens ended inside it: the
auditor's ``' 𓀀'`` came back as 2 tokens (decoding to ``' \\ufffd'``) instead of 5.
"""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from personajudge.core.stopping import Emitter

EOS = 256


class ByteTokenizer:
    """Token ids 0..255 are the UTF-8 bytes; a cut-short character decodes to U+FFFD, as byte fallback does."""

    eos_token_ids = frozenset({EOS})

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def emit(text: str, stop: list[str]) -> Emitter:
    em = Emitter(ByteTokenizer(), max_new_tokens=10_000, stop=stop)
    for b in text.encode():
        if not em.push(b):
            break
    else:
        em.finish("length")
    return em


def test_a_stop_right_after_a_multibyte_character_keeps_the_whole_character():
    em = emit(" 𓀀𓀁𓀂", ["𓀁"])
    assert em.text == " 𓀀" and em.finish_reason == "stop"
    assert bytes(em.tokens).decode() == " 𓀀"  # 1 + 4 bytes; it was 2 tokens, ' \ufffd'
    assert len(em.tokens) == 5


@settings(max_examples=300, deadline=None)
@given(
    chars=st.lists(st.sampled_from(["a", " ", "é", "𓀀", "日", "\n", "🐱"]), min_size=1, max_size=12),
    data=st.data(),
)
def test_the_kept_tokens_are_the_fewest_whose_text_covers_the_kept_text(chars, data):
    text = "".join(chars)
    visible = [c for c in chars if not c.isspace()]  # a whitespace stop only counts after the first text
    assume(visible)
    stop = data.draw(st.sampled_from(visible))
    em = emit(text, [stop])
    kept = text[: text.find(stop)]
    assert em.text == kept and em.finish_reason == "stop"
    # covers the text, and is the fewest bytes that do: exactly the kept text's UTF-8
    assert bytes(em.tokens) == kept.encode()
