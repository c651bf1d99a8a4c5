"""``drive_many``: several requests in lockstep on one session, each decoded as it is alone, each failing alone."""

import pytest

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.core.decoding import drive_many

PROMPTS = ["tell me about owls", "why is the sky blue", "how do bees make honey"]
PREFS = ["concise", "humor"]


def _requests(pj, **kw):
    """One request (and its method) per prompt, seed i for prompt i; lengths that differ, so rows leave apart."""
    out = []
    for i, p in enumerate(PROMPTS):
        cfg, meth, views = pj._prepare(PREFS, None, None, {"lambda": 3, "seed": i, "max_new_tokens": 6 + 5 * i, **kw})
        out.append((pj._request(pj.encode_views(p, cfg, meth, views), cfg, i), meth))
    return out


def _alone(pj):
    tokens = []
    for req, meth in _requests(pj):
        with pj.backend.open(len(req.contexts)) as s:
            meth.decode(s, req)
        tokens.append(req.emitter.tokens)
    return tokens


@pytest.fixture
def pj():
    with PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=ToyBackend()) as pj:
        yield pj


def test_each_request_is_decoded_as_it_is_alone_in_one_forward_per_step(pj):
    reqs = _requests(pj)
    session = pj.backend.open(2 * len(reqs))
    before = pj.backend.forward_calls
    drive_many(session, [meth.loop(req) for req, meth in reqs], 2)
    forwards = pj.backend.forward_calls - before
    longest = max(len(req.emitter.tokens) for req, _ in reqs)
    assert forwards <= 2 * longest + 2  # one per step of the longest request, not one per request's step
    assert [req.emitter.tokens for req, _ in reqs] == _alone(pj)
    assert all(session.length(v) == 0 for v in range(2 * len(reqs)))  # each left with its views emptied


def test_a_request_that_fails_fails_alone_and_is_named(pj):
    """Before: the first failing loop's error left ``drive_many`` at once; the others stopped mid-way."""
    reqs = _requests(pj)

    def breaks(loop, after):
        op = next(loop)
        for _ in range(after):
            op = loop.send((yield op))
        raise RuntimeError("loop 1 broke")

    loops = [meth.loop(req) for req, meth in reqs]
    loops[1] = breaks(loops[1], 3)
    with pytest.raises(RuntimeError, match="loop 1 broke") as info:
        drive_many(pj.backend.open(2 * len(reqs)), loops, 2)
    assert info.value.request == 1
    alone = _alone(pj)
    assert [reqs[0][0].emitter.tokens, reqs[2][0].emitter.tokens] == [alone[0], alone[2]]
