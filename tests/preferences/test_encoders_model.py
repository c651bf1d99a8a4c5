"""Every encoder on the embedded model's real tokenizer (Gemma 3 via llama.cpp)."""

import pytest
from chat_tokenizers import STRICT

from personajudge.plugins import resolve_encoder
from personajudge.preferences import resolve
from personajudge.preferences.encoders import encode, normalize_conversation

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.model

MULTI = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Why that one?"},
]


@pytest.fixture(scope="module")
def pj():
    from personajudge.api import PersonaJudge

    with PersonaJudge({"backend": {"name": "llama-cpp", "threads": 1, "n_ctx": 1024}}) as pj:
        yield pj


@pytest.fixture
def tok(pj):
    t = pj.backend.tokenizer
    saved = t.chat_template
    yield t
    t.chat_template = saved


def ids(encoder, tok, prefs, conv="Why is the sky blue?"):
    enc = resolve_encoder(encoder, tok)
    return encode(enc, [resolve(p) for p in prefs], normalize_conversation(conv), tok)


def test_the_embedded_model_has_no_template_so_auto_is_plain(tok):
    assert tok.chat_template is None
    assert resolve_encoder("auto", tok).name == "plain"


@pytest.mark.parametrize("encoder", ["plain", "instruction"])
def test_plain_formats_round_trip_through_the_real_tokenizer(tok, encoder):
    out = ids(encoder, tok, ["concise", "humor"], MULTI)
    text = tok.decode(out)
    assert out[0] == tok.bos_token_id and out.count(tok.bos_token_id) == 1
    assert "Question: Name a colour.\nAnswer: Blue.\n\nQuestion: Why that one?" in text
    assert "never be verbose" in text and text.endswith("Answer:")


@pytest.mark.parametrize("encoder", ["chat-turn", "system", "instruction"])
def test_chat_encoders_with_a_gemma_style_template(tok, encoder):
    tok.chat_template = STRICT  # Gemma's turn markup; no system role, roles must alternate
    out = ids(encoder, tok, ["concise"], MULTI)
    start = tok.encode("<start_of_turn>", add_bos=False)
    assert len(start) == 1  # the markup is parsed as Gemma's special token, not as text
    assert out.count(start[0]) == 4  # three turns plus the generation prompt
    assert out.count(tok.bos_token_id) == 1  # BOS from the template only, never doubled
    text = tok.decode(out)
    assert "never be verbose" in text and "Why that one?" in text


def test_the_plain_default_gives_sensible_answers(pj):
    res = pj.generate("What is the capital of France?", method="base", temperature=0, max_new_tokens=32)
    assert "Paris" in res.text
    assert res.finish_reason == "stop" and "Question:" not in res.text  # the implied stop string
