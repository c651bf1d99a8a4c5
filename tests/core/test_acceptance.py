"""Exactness of the acceptance rule, proven statistically.

Each committed token must follow the judge's (filtered) distribution p for its
position, whatever the draft distribution q is. We simulate many independent
Persona-judge runs at once with context-dependent toy tables (the next-token
distributions depend on the previous token), collect the first two committed
tokens of each run, and compare their joint histogram with p(t1) p(t2 | t1) by
a chi-square test. A deliberately wrong rule (always accept) must fail the same
test, so the test has power.
"""

import numpy as np
import pytest
from scipy import stats

from personajudge.core import acceptance
from personajudge.core.acceptance import judge_token, residual, sample_from, verify_window
from personajudge.core.transforms import SamplingParams, filtered_probs

V = 6
DRAWS = 20_000
FILTERS = {
    "none": SamplingParams(temperature=1.0, top_k=0, top_p=1.0),
    "topk_topp": SamplingParams(temperature=0.8, top_k=4, top_p=0.85),
}


def tables(seed=7):
    g = np.random.default_rng(seed)
    p_logits = g.normal(0, 1.5, size=(V, V))
    q_logits = g.normal(0, 1.5, size=(V, V))  # unrelated to p: acceptance is far from 1
    return p_logits, q_logits


def simulate(lam, params, rng, n_tokens=2, draws=DRAWS):
    """First ``n_tokens`` committed tokens of ``draws`` independent runs (batched)."""
    p_logits, q_logits = tables()
    P = filtered_probs(p_logits, params)  # P[prev] = judge distribution after token prev
    Q = filtered_probs(q_logits, params)
    out = np.full((draws, n_tokens), -1)
    count = np.zeros(draws, dtype=int)
    prev = np.zeros(draws, dtype=int)  # every run starts after token 0
    while (count < n_tokens).any():
        live = np.nonzero(count < n_tokens)[0]
        b = len(live)
        u = rng.random((b, 2 * lam + 1))
        ctx = prev[live]
        toks, qs, ps = [], [], [P[ctx]]
        for i in range(lam):
            q = Q[ctx]
            t = sample_from(q, u[:, i])
            toks.append(t)
            qs.append(q)
            ctx = t
            ps.append(P[ctx])
        tokens = np.stack(toks, axis=1)
        n, emitted = verify_window(
            np.stack(ps, axis=1), np.stack(qs, axis=1), tokens, u[:, lam : 2 * lam], u[:, 2 * lam]
        )
        for row, r in enumerate(live):
            committed = list(tokens[row, : n[row]]) + [int(emitted[row])]
            for t in committed:
                if count[r] < n_tokens:
                    out[r, count[r]] = t
                    count[r] += 1
            prev[r] = committed[-1]
    return out, P


def joint_pvalue(first_two, P):
    idx = first_two[:, 0] * V + first_two[:, 1]
    observed = np.bincount(idx, minlength=V * V).astype(float)
    expected = (P[0][:, None] * P).reshape(-1) * len(first_two)
    support = expected > 0
    assert observed[~support].sum() == 0, "a token outside the judge's filtered support was committed"
    return stats.chisquare(observed[support], expected[support]).pvalue


@pytest.mark.parametrize("lam", [1, 4])
@pytest.mark.parametrize("filt", sorted(FILTERS))
def test_committed_tokens_follow_judge_distribution(lam, filt):
    rng = np.random.default_rng(2025 + lam)
    first_two, P = simulate(lam, FILTERS[filt], rng)
    assert joint_pvalue(first_two, P) > 0.01


@pytest.mark.parametrize("lam", [1, 4])
@pytest.mark.parametrize("filt", sorted(FILTERS))
def test_always_accept_rule_is_detected(lam, filt, monkeypatch):
    monkeypatch.setattr(acceptance, "accept_mask", lambda p_at, q_at, u: u >= 0)
    rng = np.random.default_rng(2025 + lam)
    first_two, P = simulate(lam, FILTERS[filt], rng)
    observed = first_two[:, 0] * V + first_two[:, 1]
    expected = (P[0][:, None] * P).reshape(-1)
    # Either tokens outside p's support appear, or the histogram is far from p.
    if np.bincount(observed, minlength=V * V)[expected == 0].sum() > 0:
        return
    assert joint_pvalue(first_two, P) < 0.01


def test_greedy_limit_accepts_only_the_judges_argmax():
    g = np.random.default_rng(3)
    greedy = SamplingParams(temperature=0.0)
    for _ in range(200):
        p = filtered_probs(g.normal(size=V), greedy)
        q = filtered_probs(g.normal(size=V), greedy)
        t = int(np.argmax(q))
        ok, emit = judge_token(p, q, t, g.random(), g.random())
        if t == int(np.argmax(p)):
            assert ok
        else:
            assert not ok and emit == int(np.argmax(p))


def test_zero_probability_under_judge_is_always_rejected():
    p = np.array([0.0, 0.5, 0.5])
    q = np.array([0.9, 0.05, 0.05])
    for u in (0.0, 1e-12, 0.5):
        ok, emit = judge_token(p, q, 0, u, 0.3)
        assert not ok and emit in (1, 2)


def test_residual_with_zero_mass_falls_back_to_p():
    p = np.array([0.25, 0.25, 0.5])
    r = residual(p, p.copy())
    assert np.all(np.isfinite(r)) and np.allclose(r, p)
    batch = residual(np.stack([p, p]), np.stack([p, np.array([1.0, 0.0, 0.0])]))
    assert np.allclose(batch[0], p) and np.allclose(batch[1], [0, 1 / 3, 2 / 3])


def test_sample_from_never_returns_zero_probability_tokens():
    probs = np.array([0.0, 0.3, 0.0, 0.7, 0.0])
    u = np.array([0.0, 0.29999, 0.3, 0.5, 0.999999999999, np.nextafter(1.0, 0)])
    got = sample_from(np.broadcast_to(probs, (len(u), 5)), u)
    assert set(got.tolist()) <= {1, 3}
    assert got.tolist()[:4] == [1, 1, 3, 3]


def test_same_decisions_on_numpy_and_torch():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(11)
    lam, b, v = 4, 500, 50
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    base = g.normal(0, 2, size=(b, lam + 1, v))
    p = filtered_probs(base, params)
    q = filtered_probs(base[:, :lam] + g.normal(0, 0.7, size=(b, lam, v)), params)  # related views
    tokens = np.stack([sample_from(q[:, i], g.random(b)) for i in range(lam)], axis=1)
    ua, ue = g.random((b, lam)), g.random(b)
    n_np, e_np = verify_window(p, q, tokens, ua, ue)
    n_t, e_t = verify_window(
        torch.from_numpy(p), torch.from_numpy(q), torch.from_numpy(tokens), torch.from_numpy(ua), torch.from_numpy(ue)
    )
    assert np.array_equal(n_np, n_t.numpy()) and np.array_equal(e_np, e_t.numpy())
    assert 0 < (n_np == lam).mean() < 1 and (n_np == 0).any()  # the batch exercises every branch
    logits = g.normal(0, 3, size=(8, 1000)).astype(np.float32)
    for prm in (params, SamplingParams(temperature=0.0), SamplingParams(1.0, 0, 0.5), SamplingParams(1.3, 7, 1.0)):
        a = filtered_probs(logits, prm)
        t = filtered_probs(torch.from_numpy(logits), prm).numpy()
        assert np.allclose(a, t, atol=1e-6)
