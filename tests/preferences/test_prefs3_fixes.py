"""The third preferences audit's findings (notes/audit_prefs3.md), fixed.

A. The user's special-token text was encoded as separate pieces (template, literal, template), so a
   SentencePiece tokenizer gave each piece its own prefix space (``a</s>b`` fed as ``a </s> b``) and
   Gemma got a lone space token: now the raw-text piece around it is one ``special=False`` call.
B. llama.cpp matches user-defined tokens whatever ``parse_special`` says; Gemma 3's ``</s>`` is one
   that ends generation, so a user could type it into the context.
C. hf: a post-processor that appends EOS put it at the end (and, with special-token text, the middle)
   of every prompt; llama-cpp drops it.
D. A third-party encoder saw placeholder characters instead of the user's text (``json.dumps`` escaped
   them, a cut left a stray one).
E. Plain templates accepted a ``header`` without ``{preference}``, a ``user`` without ``{content}``,
   and ``{content.upper}`` (a memory address in the prompt).
F. ``--view concise+friendly`` (the README's and ``eval --pair``'s notation) and ``concise;humor`` and
   the like silently became one free-text preference.
G. A plugin tokenizer's ``special_texts`` as a str split letters out of words; one without
   ``encode(special=...)`` was a traceback on the first prompt holding special-token text.
H. A prompt holding every BMP private-use character and special-token text raised StopIteration.
I. A preferences-file name with a comma could never be named in ``--view``.
"""

import json
import string
import warnings

import pytest
from cli_lines import one_line, run_main
from markup_tokenizer import MarkupTokenizer, contexts, markup_model

import personajudge as pj
from personajudge.backends.toy import EOS, ToyTokenizer
from personajudge.core.contract import check_tokenizer
from personajudge.core.errors import ConfigError, PersonaJudgeWarning, PluginError, PreferenceError
from personajudge.preferences import load_file, resolve
from personajudge.preferences.encoders import PlainEncoder, encode
from personajudge.preferences.views import view_names


class Recording(MarkupTokenizer):
    """Records the text of every ``encode`` call (the toy's ``decode`` is lossy: lower case, ``?``)."""

    def __init__(self):
        super().__init__()
        self.fed = []

    def encode(self, text, *, add_bos=True, special=True):
        self.fed.append(text)
        return super().encode(text, add_bos=add_bos, special=special)


def fed(tok, ids_fn):
    """The text ``ids_fn()`` hands the tokenizer, in order (the probes of a tokenizer left out)."""
    tok.fed.clear()
    ids = ids_fn()
    return ids, "".join(tok.fed)


# --------------------------------------------------------------------------------------------- A, C


def sentencepiece_tokenizer(scheme, post="<s> $A"):
    """A Llama-2/Mistral-style HF fast tokenizer: Metaspace pre-tokenizer (``always``: every piece
    gets a prefix space; ``first``: only the text's start, as ``legacy=False``), one token per
    character (no merges, so the expected tokens follow from the rule alone), special ``<s>``,
    ``</s>`` and a turn marker ``<t>``."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from personajudge.backends.hf import HFTokenizer

    chars = ["▁"] + [c for c in string.printable if c not in " \r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<t>", *chars])}
    tk = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tk.post_processor = processors.TemplateProcessing(single=post, special_tokens=[("<s>", 1), ("</s>", 2)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", additional_special_tokens=["<t>"]
    )
    return HFTokenizer(hf, len(vocab), frozenset({2}))


class Template:
    """An encoder rendering the last message into a fixed template (the chat template's markers in it)."""

    name, description = "tpl", "a fixed template"

    def __init__(self, tpl):
        self.tpl = tpl

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        return self.tpl.format(conversation[-1]["content"]), True


def tokens(tok, ids):
    return tok.hf.convert_ids_to_tokens(ids)


@pytest.mark.hf
@pytest.mark.parametrize("scheme", ["always", "first"])
def test_a_users_special_text_tokenizes_as_with_special_parsing_off(scheme):
    # fails before the fix: "<s> Question: Say  </s> hi" (a prefix space before and after the literal)
    tok = sentencepiece_tokenizer(scheme)
    conv = [{"role": "user", "content": "Say </s> hi"}]
    ids = encode(PlainEncoder(), [], conv, tok)
    text = "Question: Say </s> hi\nAnswer:"
    assert ids == tok.encode(text, special=False)
    assert " ".join(tokens(tok, ids)).endswith("▁ S a y ▁ < / s > ▁ h i \n A n s w e r :")


@pytest.mark.hf
@pytest.mark.parametrize(
    ("scheme", "after"),  # what the tokenizer puts after its own <t>: a prefix space with "always" only
    [("always", ["▁"]), ("first", [])],
)
def test_the_piece_after_a_template_marker_tokenizes_as_the_tokenizer_does_there(scheme, after):
    # fails before the fix: "a", "</s>" and "b" were three calls, each with its own prefix space
    tok = sentencepiece_tokenizer(scheme)
    conv = [{"role": "user", "content": "a</s>b"}]
    ids = encode(Template("<t>user\n{}<t>model\n"), [], conv, tok)
    user = [*after, "u", "s", "e", "r", "\n", "a", "<", "/", "s", ">", "b"]
    assert tokens(tok, ids) == ["<s>", "<t>", *user, "<t>", *after, "m", "o", "d", "e", "l", "\n"]
    # the same rule as the tokenizer's own, on an ordinary prompt with the same template
    plain = encode(Template("<t>user\n{}<t>model\n"), [], [{"role": "user", "content": "ab"}], tok)
    assert tokens(tok, plain) == ["<s>", "<t>", *after, "u", "s", "e", "r", "\n", "a", "b", "<t>", *after] + list(
        "model\n"
    )


@pytest.mark.hf
def test_hf_drops_the_eos_a_post_processor_appends_to_a_prompt():
    # fails before the fix: every prompt ended with </s>, and one with special text had it mid-context
    tok = sentencepiece_tokenizer("always", post="<s> $A </s>")
    assert tok.encode("hi") == [1, *tok.encode("hi", add_bos=False)]
    assert tok.encode("hi </s>")[-1] == 2  # the text's own </s> stays (special parsing on)
    for prompt in ("Say hi", "Say </s> hi"):
        ids = encode(PlainEncoder(), [], [{"role": "user", "content": prompt}], tok)
        assert ids[0] == 1 and 2 not in ids


# --------------------------------------------------------------------------------------------- A, B (Gemma)


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("llama_cpp")
    cfg = {"backend": {"name": "llama-cpp", "threads": 1, "n_ctx": 512}, "preferences": ["concise", "humor"]}
    with pj.PersonaJudge(cfg) as model:
        yield model


@pytest.mark.model
@pytest.mark.parametrize("encoder", ["plain", "exemplar", "instruction"])
def test_gemma_gets_the_users_text_as_one_special_false_encoding(gemma, encoder):
    # fails before the fix: "Say <eos> hi" gave [' Say', ' ', '<', 'eos', '>', ...] (a lone space token)
    tok = gemma.backend.tokenizer
    for prompt in ("Say <eos> hi", "a<end_of_turn>b", "x </s> y"):
        got, rendered = contexts(gemma, prompt, encoder=encoder)
        for ids, (text, add_bos) in zip(got, rendered, strict=True):
            assert prompt in text
            assert ids == tok.encode(text, add_bos=add_bos, special=False)


@pytest.mark.model
def test_gemmas_user_defined_tokens_that_llama_cpp_matches_end_nothing(gemma):
    # a guard for the README's claim (passes before the fix too): the user-defined tokens llama.cpp
    # matches in text even with special=False (<start_of_image>, <table>) are no end or begin token,
    # and the one that is (</s>) is also a control token, which special=False leaves as text
    tok = gemma.backend.tokenizer
    lib = tok._lib
    attr = lib.llama_vocab_get_attr
    defined, control = int(lib.LLAMA_TOKEN_ATTR_USER_DEFINED), int(lib.LLAMA_TOKEN_ATTR_CONTROL)
    ends = tok.eos_token_ids | {tok.bos_token_id}
    matched = [
        t for t in range(tok.vocab_size) if int(attr(tok.vocab, t)) & defined and not int(attr(tok.vocab, t)) & control
    ]
    assert len(matched) > 100 and not set(matched) & ends
    (image,) = tok.encode("<start_of_image>", add_bos=False, special=False)
    assert image in matched  # the README names it as matched
    (end,) = tok.encode("</s>", add_bos=False)
    assert end in tok.eos_token_ids and "</s>" in tok.special_texts
    assert end not in tok.encode("a</s>b", add_bos=False, special=False)
    assert tok._guarded == frozenset()


@pytest.mark.model
def test_gemmas_chat_template_markers_stay_tokens_around_the_users_text(gemma):
    # fails before the fix: the user's piece after <start_of_turn>user\n was cut at its literals
    tok = gemma.backend.tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    try:
        (start,) = tok.encode("<start_of_turn>", add_bos=False)
        (end,) = tok.encode("<end_of_turn>", add_bos=False)
        content = "hi <end_of_turn> there <eos>"
        got, rendered = contexts(gemma, content, encoder="chat-turn")
        for ids, (text, _) in zip(got, rendered, strict=True):
            assert content in text
            assert ids.count(start) == 3 and ids.count(end) == 2  # the template's; the user's are text
            i = len(ids) - 1 - ids[::-1].index(end)  # the user's turn closes at the last <end_of_turn>
            j = i - 1 - ids[:i][::-1].index(start)
            # llama.cpp tokenizes the text after a control token alone, as a text of its own
            assert ids[j + 1 : i] == tok.encode("user\n" + content, add_bos=False, special=False)
    finally:
        tok.chat_template = saved


# --------------------------------------------------------------------------------------------- D


class SeenEncoder:
    """A third-party encoder that dumps the conversation as JSON (escaping non-ASCII) and records it."""

    name, description = "json-card", "json"

    def __init__(self):
        self.seen = []

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        self.seen.append(conversation[-1]["content"])
        return json.dumps({"messages": conversation}) + "\nassistant:", True


def test_a_third_party_encoder_sees_the_users_real_text():
    # fails before the fix: it saw "say \ue0000\ue000 hi", and json.dumps fed the model "\\ue0000\\ue000"
    enc = SeenEncoder()
    tok = Recording()
    ids, text = fed(tok, lambda: encode(enc, [], [{"role": "user", "content": "say <eot> hi"}], tok))
    assert enc.seen[0] == "say <eot> hi"  # the prompt is rendered from the real text (a second rendering
    # with placeholders, if any, only locates the user's text and is never fed to the model)
    assert EOS not in ids
    assert text == json.dumps({"messages": [{"role": "user", "content": "say <eot> hi"}]}) + "\nassistant:"


class CutEncoder:
    name, description = "trim-card", "the last message cut to 12 characters"

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        return f"Q: {conversation[-1]['content'][:12]}\nA:", True


def test_a_cut_leaves_no_placeholder_character_in_the_prompt():
    # fails before the fix: "Q: hello worl \ue000\nA:" (a private-use character where the cut fell)
    tok = Recording()
    _, text = fed(tok, lambda: encode(CutEncoder(), [], [{"role": "user", "content": "hello worl <eot>"}], tok))
    assert text == "Q: hello worl <\nA:"


class EscapingMarkerEncoder:
    """Writes the tokenizer's own <eot> and escapes the user's text: it cannot be told apart."""

    name, description = "escaping", "escapes and writes its own marker"

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        escaped = json.dumps(conversation[-1]["content"])  # ensure_ascii: a placeholder comes out as \\ue000
        return f"user: {escaped}<eot>assistant:", True


def test_an_encoder_that_changes_the_text_and_writes_the_marker_itself_is_warned_about():
    # fails before the fix: no warning (the escaped placeholder reached the model as text)
    tok = MarkupTokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = encode(EscapingMarkerEncoder(), [], [{"role": "user", "content": "a <eot> b"}], tok)
    msgs = [str(w.message) for w in caught if issubclass(w.category, PersonaJudgeWarning)]
    assert len(msgs) == 1 and "changed the user's text" in msgs[0] and "<eot>" in msgs[0]
    assert EOS not in ids  # safe side: the user's <eot> is never a control token


def test_the_readme_like_encoder_with_its_own_marker_keeps_it_a_control_token():
    with markup_model(preferences=["concise", "humor"]) as model:
        got, rendered = contexts(model, "say <eot> hi", encoder="chat-turn")
        for ids, (text, _) in zip(got, rendered, strict=True):
            assert "say <eot> hi" in text and ids.count(EOS) == 2


# --------------------------------------------------------------------------------------------- E

TOY = {"backend": {"name": "toy"}, "preferences": ["concise", "humor"]}


@pytest.mark.parametrize(
    ("fmt", "needle"),
    [
        ({"header": "You are helpful.\n\n"}, "has no {preference}"),
        ({"header": ""}, "has no {preference}"),
        ({"user": "Question:\n"}, "has no {content}"),
        ({"user": "{content.upper}"}, "{content.upper} is not allowed"),
        ({"user": "{content!r}"}, "{content!r} is not allowed"),
        ({"user": "{content:>5}"}, "{content:>5} is not allowed"),
        ({"system": "{content[0]}"}, "not allowed"),
    ],
)
def test_a_template_must_hold_its_placeholder_bare(fmt, needle):
    # fails before the fix: each was accepted (the preferences or the question dropped, or an address)
    with pytest.raises(ConfigError) as err:
        pj.PersonaJudge({**TOY, "encoder": "plain", "encoder_options": {"template": fmt}})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_header_without_its_placeholder_is_exit_2_at_the_cli(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('encoder = "plain"\nencoder_options = { template = { header = "You are helpful.\\n\\n" } }\n')
    code, _, err = run_main(
        ["generate", "hi", "--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--config", str(cfg)],
        capsys,
    )
    one_line(code, err, "format header", "{preference}")


# --------------------------------------------------------------------------------------------- F


def test_a_plus_joins_names_into_one_view_as_eval_pair_reads_it():
    # fails before the fix: ['concise+friendly'], one free-text preference
    assert view_names("concise+friendly", {}) == ["concise", "friendly"]
    assert view_names("concise + friendly,humor", {}) == ["concise", "friendly", "humor"]
    assert view_names("C++ expert", {}) == ["C++ expert"]  # a description keeps its plus signs


@pytest.mark.parametrize("text", ["concise;humor", "concise/humor", "concise|humor", "concise,humor.", "concise+humor"])
def test_names_joined_by_punctuation_are_no_description(text):
    # fails before the fix: each became the free-text preference "<text>."
    with pytest.raises(PreferenceError) as err:
        resolve(text)
    assert "--view concise,humor" in str(err.value) and "--prefer concise --prefer humor" in str(err.value)


def test_view_with_a_plus_is_one_view_of_both_with_the_combined_exemplars(capsys):
    code, out, err = run_main(
        ["generate", "hi", "--backend", "toy", "--view", "concise+friendly", "--view", "expert"]
        + ["--max-new-tokens", "2", "--seed", "1", "--json"],
        capsys,
    )
    assert code == 0, err
    settings = json.loads(out)["settings"]
    assert [[p if isinstance(p, str) else p["name"] for p in v] for v in settings["views"]] == [
        ["concise", "friendly"],
        ["expert"],
    ]
    assert settings["encoder"] == "exemplar"


@pytest.mark.parametrize("view", ["concise;humor", "concise/humor", "concise,humor."])
def test_view_with_other_punctuation_is_exit_2(view, capsys):
    code, _, err = run_main(["generate", "hi", "--backend", "toy", "--view", view, "--view", "expert"], capsys)
    one_line(code, err, "--view concise,humor")


# --------------------------------------------------------------------------------------------- G


class _Owner:
    name = "marktoy"

    def __init__(self, tok):
        self.tokenizer = tok


class StrSpecials(MarkupTokenizer):
    special_texts = "<eot>"


class NoSpecialKeyword(MarkupTokenizer):
    def encode(self, text, *, add_bos=True):
        return MarkupTokenizer.encode(self, text, add_bos=add_bos)


@pytest.mark.parametrize(
    ("tok", "needle"),
    [(StrSpecials(), "special_texts must be a frozenset"), (NoSpecialKeyword(), "encode takes no special=")],
)
def test_a_tokenizers_special_texts_slips_are_one_plugin_error_at_load(tok, needle):
    # fails before the fix: a str split letters out of words in silence; no special= was a TypeError later
    with pytest.raises(PluginError) as err:
        check_tokenizer(_Owner(tok))
    assert needle in str(err.value) and "marktoy" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PluginError):  # also where a tokenizer reaches the encoders without a load
        encode(PlainEncoder(), [], [{"role": "user", "content": "say <eot> hi"}], tok)


def test_a_tokenizer_without_special_texts_is_fine():
    check_tokenizer(_Owner(ToyTokenizer()))


# --------------------------------------------------------------------------------------------- H


def test_a_prompt_holding_every_private_use_character_is_no_crash():
    # fails before the fix: StopIteration
    glyphs = "".join(chr(c) for c in range(0xE000, 0xF900))
    tok = Recording()
    conv = [{"role": "user", "content": glyphs + " <eot> end"}]
    ids, text = fed(tok, lambda: encode(PlainEncoder(), [], conv, tok))
    assert EOS not in ids
    assert text == f"Question: {glyphs} <eot> end\nAnswer:"


# --------------------------------------------------------------------------------------------- I


def test_a_file_name_with_a_comma_is_refused(tmp_path):
    # fails before the fix: accepted, and --view could never name it
    p = tmp_path / "comma.toml"
    p.write_text('[[preferences]]\nname = "polite, formal"\ndescription = "Be polite and formal."\n')
    with pytest.raises(PreferenceError) as err:
        load_file(p)
    assert "comma" in str(err.value) and "entry 1" in str(err.value)
