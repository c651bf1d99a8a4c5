"""The exemplar encoder on the embedded base model (Gemma 3 270M via llama.cpp): auto picks it, answers are clean."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.model

PROMPTS = ["How do airplanes stay in the air?", "What should I cook for dinner tonight?"]


@pytest.fixture(scope="module")
def pj():
    from personajudge.api import PersonaJudge

    with PersonaJudge({"backend": {"name": "llama-cpp", "threads": 1}, "decoding": {"max_new_tokens": 48}}) as pj:
        yield pj


def test_auto_picks_exemplar_on_the_base_model_and_reports_it(pj):
    cfg = pj.config.model_copy(update={"preferences": ["concise", "friendly"]})
    assert pj.backend.tokenizer.chat_template in (None, "")  # the embedded model is a base model
    assert pj.resolved_encoder(cfg) == "exemplar"
    res = pj.generate(PROMPTS[0], preferences=["concise", "friendly"], seed=0)
    assert res.settings["encoder"] == "exemplar"


@pytest.mark.parametrize(
    "method,prefs",
    [("base", []), ("prompt", ["concise"]), ("prompt", ["informative"]), ("persona-judge", ["concise", "friendly"])],
)
def test_answers_end_where_the_format_says(pj, method, prefs):
    for i, prompt in enumerate(PROMPTS):
        res = pj.generate(prompt, preferences=prefs, method=method, seed=i)
        text = res.text.strip()
        assert text, "an empty answer"
        assert "\n" not in text and "Question:" not in text and "Answer:" not in text
        assert res.finish_reason in ("stop", "eos", "length")
