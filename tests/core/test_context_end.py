"""Persona-judge at the end of the context: the window shrinks to what fits.

An iteration's window is ``min(lambda, free - 1, tokens left)`` where ``free``
is the room left in the fullest view (``core.decoding.window_length``); the
generation ends with ``context`` only when not one token fits, as plain
sampling does. These tests check, on the toy backend (logits a pure function
of the context, so every path can be compared bit for bit):

- the rule written out again here, from the algorithm's statement, with no
  session, KV cache or ``Views`` (:func:`textbook`): with ample room and a
  full window it is the pre-fix behaviour, and the loops equal it token for
  token; near the end the loops equal it with the shrunk window;
- both schedules, every roles value, the batched judge and the ``reference``
  oracle agree on prompts that leave 1 .. lambda + 2 tokens of room, use the
  room down to the last token, and never feed a session past its context
  (the toy session raises ContextLengthError if they did);
- a consequence of the randomness contract that needs no oracle: a run that
  hits the context end equals the same seed's run with ample room in every
  token but the last, and a run cut by ``max_new_tokens`` is a prefix of a
  longer one.
"""

from __future__ import annotations

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.acceptance import judge_draft, sample_dist
from personajudge.core.batched import BatchedJudge
from personajudge.core.config import BackendConfig
from personajudge.core.decoding import DecodeRequest, StepDriver, drive, persona_judge_loop, window_length
from personajudge.core.methods import Reference
from personajudge.core.result import Stats
from personajudge.core.sparse import candidates
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams
from personajudge.testing.exactness import roles_at, view_contexts

N_CTX = 48
PARAMS = {
    "top-k": SamplingParams(1.0, 3, 1.0),  # the windowed schedule judges row by row on the support
    "dense": SamplingParams(0.9, 0, 0.95),  # the windowed schedule judges the window in one vectorized call
    "greedy": SamplingParams(0.0),
}


def toy(n_ctx: int) -> ToyBackend:
    return ToyBackend(BackendConfig(name="toy", n_ctx=n_ctx))


def prompts(free: int, n_views: int, seed: int, n_ctx: int = N_CTX) -> list[list[int]]:
    """View contexts whose longest leaves ``free`` tokens of room; the views differ in length."""
    g = np.random.default_rng(500 + seed)
    lens = [n_ctx - free - (3 * v if seed % 2 else 3 * (n_views - 1 - v)) for v in range(n_views)]
    return [[int(x) for x in g.integers(1, 33, size=n)] for n in lens]


def request(contexts, *, n_ctx, lam, params, roles, schedule="interleaved", seed=0, max_new=40) -> DecodeRequest:
    return DecodeRequest(
        contexts=[list(c) for c in contexts],
        params=params,
        lam=lam,
        rng=np.random.default_rng(seed),
        emitter=Emitter(toy(n_ctx).tokenizer, max_new_tokens=max_new),
        context_length=n_ctx,
        roles=roles,
        schedule=schedule,
        stats=Stats(),
    )


def run_loop(backend, req):
    session = backend.open(len(req.contexts))
    drive(session, persona_judge_loop(req))
    session.close()
    return req


def run_reference(backend, req):
    Reference().decode(backend.open(len(req.contexts)), req)
    return req


def run_batched(backend, reqs):
    """All ``reqs`` as rows of one BatchedJudge in one StepDriver (one shared session)."""
    width = max(len(r.contexts) for r in reqs)
    session = backend.open(width * len(reqs))
    driver, judge = StepDriver(session), BatchedJudge()
    for k, r in enumerate(reqs):
        driver.add_row(k, judge, r, list(range(k * width, k * width + len(r.contexts))))
    while len(driver):
        _, failed = driver.step()
        assert not failed, failed
    session.close()
    return reqs


def result(req):
    return list(req.emitter.tokens), req.emitter.finish_reason


def stats(req):
    s = req.stats
    return s.iterations, s.forwards, s.drafted, s.accepted


def textbook(backend, contexts, *, n_ctx, lam, params, roles, seed, max_new, window):
    """Persona-judge as the algorithm states it, for one request; ``window(free, left)`` sizes each iteration.

    No session, no KV cache, no ``Views``: every distribution comes from
    ``backend.logits_after`` of the whole committed context, the role schedule
    is :func:`~personajudge.testing.exactness.roles_at`, and each iteration
    draws ``2 * lam + 1`` uniforms (u[i] drafts token i, u[lam + i] judges it,
    u[2 * lam] the emitted token). Only the acceptance rule's primitives come
    from the core, so tokens are comparable bit for bit.
    """
    rng = np.random.default_rng(seed)
    ctxs = [list(c) for c in contexts]
    eos = backend.tokenizer.eos_token_ids
    out: list[int] = []

    def dist(v):
        return candidates(backend.logits_after(ctxs[v]), params)

    def commit(t):  # False once the generation is over
        if t in eos:
            return False
        out.append(t)
        for c in ctxs:
            c.append(t)
        return len(out) < max_new

    it = 0
    while True:
        free = n_ctx - max(len(c) for c in ctxs)
        if free < 1:
            return out, "context"
        w = window(free, max_new - len(out))
        d, j = roles_at(roles, len(ctxs), it)
        u = rng.random(2 * lam + 1)
        going = True
        for i in range(w):
            q = dist(d)
            t = sample_dist(q, u[i])
            ok, emit = judge_draft(dist(j), q, t, u[lam + i], u[2 * lam])
            going = commit(t if ok else emit)
            if not ok or not going:
                break
        else:
            going = commit(sample_dist(dist(j), u[2 * lam]))
        if not going:
            return out, "eos" if len(out) < max_new else "length"
        it += 1


def full_window(lam):
    """The pre-fix rule where room is ample: every window is lambda long."""
    return lambda free, left: lam


def shrunk_window(lam):
    """The rule as specified, written out again: what fits in the context, nothing past the budget."""
    return lambda free, left: min(lam, free - 1, left)


# ----------------------------------------------------------------------------- the rule itself


def test_window_length_rule():
    assert window_length(4, 0, 10) is None and window_length(4, -3, 10) is None  # not one token fits
    assert [window_length(4, f, 100) for f in range(1, 8)] == [0, 1, 2, 3, 4, 4, 4]
    assert [window_length(4, 100, r) for r in range(1, 6)] == [1, 2, 3, 4, 4]
    assert window_length(4, 3, 1) == 1 and window_length(1, 1, 1) == 0
    assert window_length(4, 100) == 4  # no budget known: only the context bounds the window


# ----------------------------------------------------------------------------- far from the end: as before


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("schedule", ["interleaved", "windowed", "reference", "batched"])
@pytest.mark.parametrize("lam,n_views,roles", [(4, 2, "alternate"), (3, 3, "round-robin"), (2, 3, "fixed")])
def test_ample_room_gives_the_pre_fix_tokens(name, schedule, lam, n_views, roles):
    """With room for every full window (the old ``room(lam + 2)`` never fails) the seeds give the old tokens."""
    max_new = 40
    n_ctx = 4096
    for seed in range(3):
        ctxs = prompts(n_ctx - 30, n_views, seed, n_ctx=n_ctx)  # 30-token prompts: ample room
        assert n_ctx - max(map(len, ctxs)) >= max_new + lam + 2
        kw = dict(n_ctx=n_ctx, lam=lam, params=PARAMS[name], roles=roles, seed=seed, max_new=max_new)
        want = textbook(toy(n_ctx), ctxs, window=full_window(lam), **kw)
        req = request(
            ctxs, schedule="windowed" if schedule == "reference" else schedule.replace("batched", "interleaved"), **kw
        )
        if schedule == "batched":
            run_batched(toy(n_ctx), [req])
        elif schedule == "reference":
            run_reference(toy(n_ctx), req)
        else:
            run_loop(toy(n_ctx), req)
        assert result(req) == want, (seed, schedule)
        assert want[1] in ("length", "eos")


# ----------------------------------------------------------------------------- near the end


FREES = {lam: list(range(1, lam + 3)) for lam in (1, 3, 4)}


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("lam", sorted(FREES))
@pytest.mark.parametrize("n_views,roles", [(2, "alternate"), (2, "fixed"), (3, "round-robin"), (3, "fixed")])
def test_every_path_agrees_near_the_context_end(name, lam, n_views, roles):
    """Prompts leaving 1 .. lambda + 2 tokens: every path makes the textbook's tokens and uses all the room."""
    cases = [(free, seed, max_new) for free in FREES[lam] for seed in range(2) for max_new in (1, 40)]
    batched = run_batched(
        toy(N_CTX),
        [
            request(
                prompts(free, n_views, seed),
                n_ctx=N_CTX,
                lam=lam,
                params=PARAMS[name],
                roles=roles,
                seed=seed,
                max_new=m,
            )
            for free, seed, m in cases
        ],
    )
    for (free, seed, max_new), breq in zip(cases, batched):
        ctxs = prompts(free, n_views, seed)
        kw = dict(n_ctx=N_CTX, lam=lam, params=PARAMS[name], roles=roles, seed=seed, max_new=max_new)
        want = textbook(toy(N_CTX), ctxs, window=shrunk_window(lam), **kw)
        inter = run_loop(toy(N_CTX), request(ctxs, schedule="interleaved", **kw))
        wind = run_loop(toy(N_CTX), request(ctxs, schedule="windowed", **kw))
        ref = run_reference(toy(N_CTX), request(ctxs, schedule="windowed", **kw))
        case = (free, seed, max_new)
        assert result(inter) == result(wind) == result(ref) == result(breq) == want, case
        assert stats(breq) == stats(inter), case  # the batched judge's claim: same Stats as the interleaved loop
        tokens, reason = want
        if reason != "eos":  # the room is used down to the last token, as plain sampling uses it
            assert len(tokens) == min(free, max_new), case
            assert reason == ("length" if max_new <= free else "context"), case


def test_the_room_is_used_like_plain_sampling():
    """The auditor's case: lambda 64 and 1 .. 66 tokens of room; base sampling and Persona-judge both fill it."""
    lam, prompt, prefs = 64, "hello there", ["concise", "humor"]
    probe = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"})
    longest = max(map(len, view_contexts(probe, prompt, method="persona-judge", preferences=prefs)))
    plain_len = len(view_contexts(probe, prompt, method="base", preferences=[])[0])
    for free in (1, 2, 3, 33, 65, 66):
        gen = dict(max_new_tokens=200, seed=free, stop=[], repeat_lines=0)
        pj = PersonaJudge({"backend": {"name": "toy", "n_ctx": longest + free}, "encoder": "plain"})
        res = [pj.generate(prompt, preferences=prefs, lam=lam, schedule=s, **gen) for s in ("interleaved", "windowed")]
        res.append(pj.generate(prompt, preferences=prefs, lam=lam, method="reference", **gen))
        assert res[0].tokens == res[1].tokens == res[2].tokens
        base = PersonaJudge({"backend": {"name": "toy", "n_ctx": plain_len + free}, "encoder": "plain"})
        res.append(base.generate(prompt, method="base", **gen))
        for r in res:
            if r.finish_reason != "eos":
                assert (len(r.tokens), r.finish_reason) == (free, "context"), (free, r.finish_reason)
        one = pj.generate(prompt, preferences=prefs, lam=lam, **{**gen, "max_new_tokens": 1})
        assert len(one.tokens) == 1 or one.finish_reason == "eos"


# ----------------------------------------------------------------------------- the randomness contract


@pytest.mark.parametrize("schedule", ["interleaved", "windowed", "batched"])
@pytest.mark.parametrize("lam,roles", [(4, "alternate"), (3, "fixed")])
def test_a_run_at_the_context_end_differs_from_ample_room_at_most_in_its_last_token(schedule, lam, roles):
    """The first w decisions of a shrunk window are the full window's: only a fully accepted cut window's
    emitted token (drawn from p_{w+1} instead of judging draft w + 1) can differ."""
    differs = 0
    for free in range(1, 3 * lam):
        for seed in range(4):
            small_ctx = prompts(free, 2, seed)
            kw = dict(lam=lam, params=PARAMS["top-k"], roles=roles, seed=seed, max_new=200)
            sched = schedule.replace("batched", "interleaved")
            small = request(small_ctx, n_ctx=N_CTX, schedule=sched, **kw)
            big = request(small_ctx, n_ctx=4096, schedule=sched, **kw)
            if schedule == "batched":
                run_batched(toy(N_CTX), [small])
                run_batched(toy(4096), [big])
            else:
                run_loop(toy(N_CTX), small)
                run_loop(toy(4096), big)
            got, want = small.emitter.tokens, big.emitter.tokens
            if small.emitter.finish_reason == "eos":
                assert got == want[: len(got)]
                continue
            assert small.emitter.finish_reason == "context" and len(got) == free
            assert got[:-1] == want[: free - 1], (free, seed)
            differs += got[-1] != want[free - 1]
    assert differs > 0  # the last token is a fresh draw, not a copy: the check above is not vacuous


@pytest.mark.parametrize("schedule", ["interleaved", "windowed", "reference", "batched"])
def test_a_shorter_budget_is_a_prefix_of_a_longer_one(schedule):
    """Capping the window at the emitter's budget changes no committed token."""
    lam = 4
    ctxs = prompts(4000, 2, 1, n_ctx=4096)
    outs = {}
    for max_new in (1, 2, 3, 5, 9, 60):
        req = request(
            ctxs,
            n_ctx=4096,
            lam=lam,
            params=PARAMS["dense"],
            roles="alternate",
            seed=11,
            max_new=max_new,
            schedule="interleaved" if schedule == "batched" else "windowed" if schedule == "reference" else schedule,
        )
        {"batched": lambda r: run_batched(toy(4096), [r]), "reference": lambda r: run_reference(toy(4096), r)}.get(
            schedule, lambda r: run_loop(toy(4096), r)
        )(req)
        outs[max_new] = req.emitter.tokens
    assert len(outs[60]) > 9  # no early EOS for this seed: every shorter budget is cut by its length
    for m, toks in outs.items():
        assert toks == outs[60][:m], m


def test_a_window_past_the_budget_only_wastes_forwards():
    """The windowed schedule with a budget of one token drafts one token, not lambda."""
    ctxs = prompts(4000, 2, 0, n_ctx=4096)
    req = request(ctxs, n_ctx=4096, lam=6, params=PARAMS["top-k"], roles="alternate", schedule="windowed", max_new=1)
    run_loop(toy(4096), req)
    assert len(req.emitter.tokens) == 1 and req.stats.drafted == 1 and req.stats.forwards == 2
