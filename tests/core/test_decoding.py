"""The decoding loops on the toy backend: schedules, greedy limit, seeds, stops, batching."""

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.config import BackendConfig
from personajudge.core.decoding import DecodeRequest, drive, persona_judge_loop, plain_loop
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams

PROMPT = "tell me a story"


@pytest.fixture
def pj(toy):
    return PersonaJudge({"backend": {"name": "toy"}}, backend=toy)


def greedy_decode(backend, context, n):
    """Argmax decoding straight from the backend's logits, no core code involved."""
    ctx, out = list(context), []
    for _ in range(n):
        t = int(np.argmax(backend.logits_after(ctx)))
        if t == 0:
            break
        out.append(t)
        ctx.append(t)
    return out


def test_greedy_persona_judge_base_equals_greedy_decoding_of_the_judge_view(pj, toy):
    res = pj.generate(
        PROMPT, preferences=["concise", "humor"], method="persona-judge-base", temperature=0, max_new_tokens=60, seed=0
    )
    judge_ctx = pj.encode_views(PROMPT, pj.config, pj_method("persona-judge-base"), [[_p("concise")], [_p("humor")]])[1]
    assert res.tokens == greedy_decode(toy, judge_ctx, 60)[: len(res.tokens)]
    assert res.stats.drafted > 0 and res.stats.accepted < res.stats.drafted  # the drafter was overruled


def test_greedy_alternating_roles_take_each_iterations_judge(pj, toy):
    res = pj.generate(
        PROMPT,
        preferences=["concise", "humor"],
        method="persona-judge",
        temperature=0,
        max_new_tokens=40,
        seed=0,
        lam=1,
    )
    ctxs = pj.encode_views(PROMPT, pj.config, pj_method("persona-judge"), [[_p("concise")], [_p("humor")]])
    # With lambda = 1 each iteration commits 1 or 2 tokens; each must be the argmax of the
    # judge of its iteration (view 1, then view 0, ...) after the committed prefix.
    replay, it, i = [], 0, 0
    while i < len(res.tokens):
        judge = 1 if it % 2 == 0 else 0
        drafter = 1 - judge
        t_draft = int(np.argmax(toy.logits_after(ctxs[drafter] + replay)))
        t_judge = int(np.argmax(toy.logits_after(ctxs[judge] + replay)))
        assert res.tokens[i] == t_judge
        replay.append(t_judge)
        i += 1
        if t_draft == t_judge and i < len(res.tokens):  # accepted: a bonus token from the judge
            assert res.tokens[i] == int(np.argmax(toy.logits_after(ctxs[judge] + replay)))
            replay.append(res.tokens[i])
            i += 1
        it += 1


def _p(name):
    from personajudge.preferences import resolve

    return resolve(name)


def pj_method(name):
    from personajudge.plugins.manager import get_method

    return get_method(name)()


@pytest.mark.parametrize("method", ["persona-judge", "persona-judge-base", "prompt", "base"])
def test_same_seed_same_output_and_different_seed_differs(pj, method):
    kw = dict(preferences=["concise", "humor"], method=method, max_new_tokens=50)
    a = pj.generate(PROMPT, seed=42, **kw)
    b = pj.generate(PROMPT, seed=42, **kw)
    c = pj.generate(PROMPT, seed=43, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("lam", [1, 3, 4])
@pytest.mark.parametrize("roles", ["alternate", "fixed"])
def test_interleaved_windowed_and_reference_agree(pj, temperature, lam, roles):
    kw = dict(
        preferences=["concise", "humor"], max_new_tokens=80, seed=7, temperature=temperature, lam=lam, roles=roles
    )
    fast = pj.generate(PROMPT, schedule="interleaved", **kw)
    windowed = pj.generate(PROMPT, schedule="windowed", **kw)
    ref = pj.generate(PROMPT, method="reference", **kw)
    assert fast.tokens == windowed.tokens == ref.tokens
    # same decisions; only the last window may be cut short differently when the budget runs out
    assert abs(fast.stats.accepted - ref.stats.accepted) <= lam
    assert abs(fast.stats.drafted - ref.stats.drafted) <= lam
    assert fast.stats.forwards < ref.stats.forwards  # and it needs fewer model calls


def test_three_views_rotate_and_agree_with_reference(pj):
    kw = dict(preferences=["concise", "humor", "expert"], max_new_tokens=60, seed=3)
    fast = pj.generate(PROMPT, **kw)
    ref = pj.generate(PROMPT, method="reference", **kw)
    assert fast.stats.views == 3 and fast.tokens == ref.tokens


def test_stats_are_consistent(pj):
    res = pj.generate(PROMPT, preferences=["concise", "humor"], max_new_tokens=100, seed=1)
    s = res.stats
    assert s.tokens == len(res.tokens) == 100 and res.finish_reason == "length"
    assert 0 < s.accepted <= s.drafted and s.iterations > 0
    assert 0.0 <= s.acceptance_rate <= 1.0
    # each iteration commits its accepted tokens plus one emitted token
    assert s.tokens <= s.accepted + s.iterations
    assert s.wall_time_s > 0 and s.tokens_per_s > 0 and s.seed == 1
    assert len(s.prompt_tokens) == 2


def test_stop_string_cuts_text_and_never_emits_after_it(pj):
    full = pj.generate(PROMPT, preferences=["concise", "humor"], max_new_tokens=80, seed=5)
    stop = full.text[20:23]
    assert len(stop) == 3
    streamed = []
    res = pj.generate(
        PROMPT, preferences=["concise", "humor"], max_new_tokens=80, seed=5, stop=[stop], on_text=streamed.append
    )
    cut = full.text.find(stop)
    assert res.finish_reason == "stop" and res.text == full.text[:cut]
    assert "".join(streamed) == res.text
    assert res.tokens == full.tokens[:cut]  # one character per toy token


def test_eos_ends_generation(toy):
    # bias the toy model towards EOS so it is reached quickly

    be = ToyBackend(BackendConfig(name="toy", options={"seed": 3}))
    be._bigram[:, 0] += 9.0
    pj = PersonaJudge({"backend": {"name": "toy"}}, backend=be)
    res = pj.generate(PROMPT, preferences=["concise", "humor"], max_new_tokens=200, seed=0)
    assert res.finish_reason == "eos" and 0 not in res.tokens and len(res.tokens) < 200


def test_streaming_concatenates_to_text(pj):
    parts = []
    res = pj.generate(PROMPT, preferences=["concise", "humor"], max_new_tokens=64, seed=9, on_text=parts.append)
    assert "".join(parts) == res.text and len(parts) > 1


def test_generate_batch_rows_equal_single_runs(pj):
    prompts = ["hello there", "what is up", "a b c", "zzz top"]
    for temperature in (0.0, 0.7):
        batch = pj.generate_batch(
            prompts, preferences=["concise", "humor"], seed=11, max_new_tokens=40, temperature=temperature
        )
        for i, (p, r) in enumerate(zip(prompts, batch)):
            alone = pj.generate(
                p, preferences=["concise", "humor"], seed=11 + i, max_new_tokens=40, temperature=temperature
            )
            assert r.tokens == alone.tokens


def test_context_overflow_stops_with_reason(toy):

    be = ToyBackend(BackendConfig(name="toy", n_ctx=160))
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be)  # short contexts
    res = pj.generate(PROMPT, preferences=["concise", "humor"], max_new_tokens=500, seed=0)
    assert res.finish_reason == "context" and 0 < len(res.tokens) < 100


def test_prompt_longer_than_context_is_a_typed_error(toy):
    from personajudge.core.errors import ContextLengthError

    be = ToyBackend(BackendConfig(name="toy", n_ctx=64))
    pj = PersonaJudge({"backend": {"name": "toy"}}, backend=be)
    with pytest.raises(ContextLengthError, match="context"):
        pj.generate("x" * 100, preferences=["concise"], max_new_tokens=5)


def test_loops_without_the_api(toy):
    """The core loops run on any Session; the API is only convenience."""
    tok = toy.tokenizer
    ctxs = [tok.encode("be brief. hi"), tok.encode("be funny. hi")]
    for loop in (plain_loop, persona_judge_loop):
        em = Emitter(tok, max_new_tokens=20)
        req = DecodeRequest(
            contexts=ctxs,
            params=SamplingParams(),
            lam=4,
            rng=np.random.default_rng(0),
            emitter=em,
            context_length=toy.context_length,
        )
        with toy.open(2) as s:
            drive(s, loop(req))
        assert len(em.tokens) == 20 and em.finish_reason == "length"


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_windowed_dense_path_without_top_k_agrees(pj, top_p):
    kw = dict(preferences=["concise", "humor"], max_new_tokens=60, seed=4, top_k=0, top_p=top_p)
    fast = pj.generate(PROMPT, schedule="interleaved", **kw)
    windowed = pj.generate(PROMPT, schedule="windowed", **kw)
    assert fast.tokens == windowed.tokens


def test_emitter_text_is_incremental_but_exact(toy):
    """Long outputs are decoded from a checkpoint, with the same text as a full decode."""
    from emitter_check import assert_incremental_text_matches

    tok = toy.tokenizer
    rng = np.random.default_rng(0)
    text = tok.encode("A long answer, with punctuation; spaces  and\nnewlines. " * 8, add_bos=False)
    assert_incremental_text_matches(tok, [text, [int(x) for x in rng.integers(0, tok.vocab_size, 300)]])


def test_drive_names_an_op_that_is_neither_forward_nor_truncate(toy):
    """A method's own ``decode`` runs its loop through ``drive``; a loop yielding anything else is a
    PluginError naming the loop, not an AttributeError from the session."""
    from personajudge.core.errors import PluginError

    def stray_loop():
        yield "forward please"

    with toy.open(1) as session, pytest.raises(PluginError, match=r"stray_loop yielded a str \('forward please'\)"):
        drive(session, stray_loop())
