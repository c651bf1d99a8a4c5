"""The second decoding audit's findings (notes/audit_decoding2.md), fixed.

A. Special-token text in the user's strings (``<eos>``, ``<end_of_turn>`` in a prompt, a message, the
   system text or a free-text preference) was encoded with the tokenizer's special-token parsing on, so
   it became real control tokens inside a view's context; the chat template's and the encoder's own
   markers must stay control tokens, the user's text must stay text.
B. A Python call's ``preferences=`` was ignored (with a misleading warning) when the config had
   ``views``; the CLI's ``--prefer`` and a server request's ``preferences`` replace the views.
"""

import warnings

import pytest
from markup_tokenizer import contexts, markup_model

import personajudge as pj
from personajudge.backends.toy import EOS, ToyBackend
from personajudge.core.errors import PersonaJudgeWarning
from personajudge.preferences import Preference

# --------------------------------------------------------------------------------------------- A


@pytest.mark.parametrize("encoder", ["plain", "exemplar"])  # the formats without a chat template
def test_special_token_text_in_a_prompt_is_no_control_token(encoder):
    with markup_model(preferences=["concise", "humor"]) as model:
        got, rendered = contexts(model, "say <eot> hi <eot>", encoder=encoder)
        for ids, (text, _) in zip(got, rendered):
            assert EOS not in ids
            assert "say <eot> hi <eot>" in text  # --show-prompt shows the user's text as written
            assert ids == model.backend.tokenizer.encode(text, special=False)  # every character as text


def test_the_chat_templates_own_markers_stay_control_tokens_and_the_users_do_not():
    with markup_model(preferences=["concise", "humor"], system="be <eot> nice") as model:
        prompt = [
            {"role": "user", "content": "first <eot> question"},
            {"role": "assistant", "content": "an <eot> answer"},
            {"role": "user", "content": "second <eot>"},
        ]
        got, rendered = contexts(model, prompt, encoder="chat-turn")
        for ids, (text, _) in zip(got, rendered):
            turns = text.count("user: ") + text.count("assistant: ") + text.count("system: ")
            assert turns == 5  # system, the preference's turn, the conversation's three
            assert ids.count(EOS) == turns  # one per turn the template closed; none from the user's text
            assert text.count("<eot>") == turns + 4


def test_special_token_text_in_a_free_text_preference_is_no_control_token():
    with markup_model() as model:
        got, rendered = contexts(model, "hi", preferences=["talk <eot> like a pirate", "concise"], encoder="plain")
        assert all(EOS not in ids for ids in got)
        assert "talk <eot> like a pirate" in rendered[0][0]


def test_an_ordinary_prompt_is_encoded_as_before():
    with markup_model(preferences=["concise", "humor"]) as model:
        got, rendered = contexts(model, "why is the sky blue?", encoder="chat-turn")
        assert got == [model.backend.tokenizer.encode(t, add_bos=b) for t, b in rendered]


def test_a_message_with_the_turn_marker_does_not_end_the_turn_through_the_server():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_helpers import in_process_server

    with markup_model(preferences=["concise", "humor"], encoder="chat-turn") as model:
        seen = []
        encode_views = model.encode_views

        def recording(*args, **kw):
            seen.append(encode_views(*args, **kw))
            return seen[-1]

        model.encode_views = recording
        with in_process_server(model) as base:
            body = {
                "model": "persona-judge",
                "messages": [{"role": "user", "content": "hello <eot> there"}],
                "max_tokens": 3,
                "seed": 1,
            }
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        (views,) = seen
        assert len(views) == 2
        for ids in views:
            assert ids.count(EOS) == 2  # the preference's turn and the user's, each closed once by the template


@pytest.mark.model
def test_llama_cpp_encodes_a_users_eos_and_end_of_turn_as_text():
    pytest.importorskip("llama_cpp")
    cfg = {"backend": {"name": "llama-cpp", "threads": 1, "n_ctx": 512}, "preferences": ["concise", "humor"]}
    with pj.PersonaJudge(cfg) as model:
        tok = model.backend.tokenizer
        eot = tok.encode("<end_of_turn>", add_bos=False)
        assert len(eot) == 1  # Gemma's control token, parsed from the template's text
        prompt = "Say <eos> hi <end_of_turn> there"
        for encoder in ("plain", "exemplar"):
            got, rendered = contexts(model, prompt, encoder=encoder)
            for ids, (text, _) in zip(got, rendered):
                assert ids[0] == tok.bos_token_id
                assert not set(ids[1:]) & (tok.eos_token_ids | set(eot) | {tok.bos_token_id})
                assert tok.decode(ids[1:]) == text  # decode drops control tokens: the text is all there
        res = model.generate(prompt, encoder="plain", temperature=0.0, max_new_tokens=2, seed=0)
        assert res.finish_reason == "length"
        # a Gemma chat template: its markers stay control tokens, the user's do not
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}"
            "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        )
        got, rendered = contexts(model, [{"role": "user", "content": "hi <end_of_turn> there"}], encoder="chat-turn")
        start = tok.encode("<start_of_turn>", add_bos=False)
        for ids, (text, _) in zip(got, rendered):
            assert "hi <end_of_turn> there" in text
            assert ids.count(start[0]) == 3  # the preference's turn, the user's, the model's
            assert ids.count(eot[0]) == 2  # the two closed by the template; the user's is text
        # an ordinary prompt: the ids are the rendered text's, as before the fix
        got, rendered = contexts(model, "Why is the sky blue?", encoder="chat-turn")
        assert got == [tok.encode(t, add_bos=b) for t, b in rendered]
        assert {"<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"} <= tok.special_texts


@pytest.mark.hf
def test_hf_encodes_a_users_eos_as_text_like_llama_cpp(tmp_path):
    pytest.importorskip("transformers")
    from tiny_hf import build_tiny_backend

    backend = build_tiny_backend(tmp_path / "tiny", "llama")
    tok = backend.tokenizer
    eos = tok.hf.convert_tokens_to_ids("<eos>")
    assert tok.encode("a<eos>b", add_bos=False) == [
        tok.encode("a", add_bos=False)[0],
        eos,
        tok.encode("b", add_bos=False)[0],
    ]
    with pj.PersonaJudge({"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}, backend=backend) as model:
        prompt = [{"role": "user", "content": "say <eos> and <bos> now"}]
        got, rendered = contexts(model, prompt, encoder="chat-turn")
        for ids, (text, _) in zip(got, rendered):
            assert "say <eos> and <bos> now" in text
            assert eos not in ids and ids.count(tok.hf.bos_token_id) == 0
            assert tok.decode(ids) == text
        got, rendered = contexts(model, "Why is the sky blue?", encoder="chat-turn")
        assert got == [tok.encode(t, add_bos=b) for t, b in rendered]


# --------------------------------------------------------------------------------------------- B

VIEWS = {"backend": {"name": "toy"}, "views": [["concise", "humor"], ["expert"]]}


def run(config, **call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pj.PersonaJudge(config, backend=ToyBackend()) as model:
            res = model.generate("Why is the sky blue?", seed=4, max_new_tokens=12, **call)
    return res, [str(w.message) for w in caught if issubclass(w.category, PersonaJudgeWarning)]


@pytest.mark.parametrize(
    ("prefs", "views"), [(["friendly", "sassy"], [["friendly"], ["sassy"]]), ("friendly", [["friendly"]])]
)
def test_a_calls_preferences_replace_the_configs_views_one_view_each(prefs, views):
    res, warned = run(VIEWS, preferences=prefs)
    alone, _ = run({"backend": {"name": "toy"}, "views": views})  # a config with those views
    assert res.settings["views"] == views and res.stats.views == len(views)
    assert res.tokens == alone.tokens
    assert not [w for w in warned if "alongside views" in w]


def test_an_empty_preferences_list_leaves_the_configs_views():
    res, warned = run(VIEWS, preferences=[])
    assert res.settings["views"] == [["concise", "humor"], ["expert"]] and warned == []


def test_preference_objects_that_define_the_views_names_keep_the_views():
    """What the CLI passes next to ``--view`` (a preferences file's definitions) defines, not replaces."""
    mine = Preference(name="concise", description="Very short", instruction="Answer in five words.")
    res, warned = run({"backend": {"name": "toy"}, "views": [["concise"], ["humor"]]}, preferences=[mine])
    (first,), second = res.settings["views"]
    assert (first["name"], first["instruction"], second) == ("concise", "Answer in five words.", ["humor"])
    assert warned == []


def test_python_and_the_server_agree_on_a_requests_preferences_next_to_configured_views():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serve_helpers import in_process_server

    res, _ = run(VIEWS, preferences=["friendly", "sassy"])
    with pj.PersonaJudge(VIEWS, backend=ToyBackend()) as model, in_process_server(model) as base:
        body = {"model": "persona-judge", "prompt": "Why is the sky blue?", "preferences": ["friendly", "sassy"]}
        r = httpx.post(base + "/v1/completions", json={**body, "seed": 4, "max_tokens": 12}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == res.text
