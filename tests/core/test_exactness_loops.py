"""Exactness of the production Persona-judge loops, through the public API.

Sequences of lambda + 2 (or more) tokens are sampled with
``PersonaJudge.generate_batch`` (and ``generate``) on the toy backend and
compared by chi-square with the exact law of the committed sequence, which
:mod:`personajudge.testing.exactness` derives from the acceptance rule and the
toy model's logits (its own filtering, role schedule and dynamic program; no
core function computes the expected side). The law is a mixture over where
windows end -- not one view's distribution -- and the tests show that both
simpler laws and planted bugs are rejected (the check has power).

The seeds are fixed, so each case is deterministic: a correct loop passes
unless its p-value happens to fall below ``ALPHA`` for these seeds (about one
case in a thousand, once, when the loops change how they consume uniforms).
The full matrix (2 methods x 2 schedules x lambda in {1, 4} x 2 or 3 views,
plus the ``reference`` method) is marked ``slow``; a representative subset runs
by default.
"""

from __future__ import annotations

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.testing.exactness import (
    SessionOracle,
    check_exactness,
    chi_square,
    expected_law,
    filtered_distribution,
    roles_at,
    token_law,
    view_contexts,
)

PROMPT = "hello there"
PREFS = {2: ["concise", "humor"], 3: ["concise", "humor", "expert"]}
ALPHA = 1e-3  # a correct loop's p-value is uniform; below this we call it broken
POWER = 1e-6  # a planted bug or a wrong law must be rejected far below ALPHA
N = 1500  # sequences per case (2-8 s on the toy backend, 2 shared CPU cores)

#: Per lambda: filtering small enough to enumerate the law, and a length >= lambda + 2 so that a
#: fully accepted window's bonus token (from p_{lambda+1}) and the next iteration's swapped roles
#: fall inside every sequence that gets that far.
SETTINGS = {
    1: dict(temperature=0.8, top_k=3, top_p=0.9, length=4),
    4: dict(temperature=1.0, top_k=2, top_p=1.0, length=6),
}

CASES = [
    (m, s, lam, nv)
    for m in ("persona-judge", "persona-judge-base")
    for s in ("interleaved", "windowed")
    for lam in (1, 4)
    for nv in (2, 3)
] + [("reference", "windowed", 4, 2), ("reference", "windowed", 1, 3)]
DEFAULT = {
    ("persona-judge", "interleaved", 4, 2),
    ("persona-judge", "windowed", 4, 3),
    ("persona-judge-base", "windowed", 1, 2),
}


def _param(case):
    return pytest.param(*case, id="-".join(map(str, case)), marks=() if case in DEFAULT else pytest.mark.slow)


@pytest.fixture(scope="module")
def model():
    return PersonaJudge({"backend": {"name": "toy"}})


def run(model, method="persona-judge", schedule="interleaved", lam=4, n_views=2, n=N, **kw):
    s = dict(SETTINGS[lam])
    return check_exactness(
        model, PROMPT, preferences=PREFS[n_views], method=method, schedule=schedule, lam=lam, n=n, **s, **kw
    )


# ---------------------------------------------------------------------------------------- the loops


@pytest.fixture(scope="module")
def pj_samples(model):
    """The default case's samples, shared by the tests that use them against wrong laws."""
    return run(model, "persona-judge", "interleaved", 4, 2)


@pytest.mark.parametrize("method,schedule,lam,n_views", [_param(c) for c in CASES])
def test_committed_sequences_follow_the_exact_law(model, pj_samples, method, schedule, lam, n_views):
    if (method, schedule, lam, n_views) == ("persona-judge", "interleaved", 4, 2):
        res = pj_samples
    else:
        res = run(model, method, schedule, lam, n_views)
    assert res.impossible == 0, "a sequence the law gives probability 0 was generated"
    assert res.dof >= 5 and res.n == N
    assert res.pvalue > ALPHA, f"p = {res.pvalue:.3g} (chi2 {res.statistic:.1f}, {res.dof} dof)"
    assert sum(res.law.values()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("lam,n_views", [(1, 2), (4, 2), (4, 3)])
def test_sequences_are_long_enough_to_exercise_every_branch(model, lam, n_views):
    """The bonus draw, rejections and role swaps each happen often in the tested sequences."""
    s = SETTINGS[lam]
    contexts = view_contexts(model, PROMPT, method="persona-judge", preferences=PREFS[n_views])
    events: dict[str, float] = {}
    expected_law(
        model.backend,
        contexts,
        roles="alternate",
        lam=lam,
        temperature=s["temperature"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        length=s["length"],
        events=events,
    )
    assert s["length"] >= lam + 2
    assert events["bonus"] > 0.05 and events["rejection"] > 0.2 and events["role_swap"] > 0.5, events


def test_the_single_request_path_too(model):
    """``generate`` one seed at a time (not batched) follows the same law."""
    res = run(model, "persona-judge", "windowed", 4, 2, n=400, batch=False)
    assert res.impossible == 0 and res.pvalue > ALPHA, res


# ---------------------------------------------------------------------------------------- power


def test_a_wrong_role_schedule_is_rejected(model, pj_samples):
    s = SETTINGS[4]
    contexts = view_contexts(model, PROMPT, method="persona-judge", preferences=PREFS[2])
    wrong = expected_law(
        model.backend,
        contexts,
        roles="fixed",
        lam=4,
        temperature=s["temperature"],
        top_k=s["top_k"],
        top_p=1.0,
        length=s["length"],
    )
    assert chi_square(pj_samples.counts, wrong, eos_ids={0}).pvalue < POWER


def test_one_views_distribution_is_not_the_law(model, pj_samples):
    """Every token follows *its* judge's p, so the sequence law is a mixture; the first judge alone is rejected."""
    s = SETTINGS[4]
    contexts = view_contexts(model, PROMPT, method="persona-judge", preferences=PREFS[2])
    oracle = SessionOracle(model.backend, contexts)
    try:
        naive = token_law(
            lambda seq: filtered_distribution(
                oracle.logits(1, seq), temperature=s["temperature"], top_k=s["top_k"], top_p=1.0
            ),
            length=s["length"],
            eos_ids={0},
        )
    finally:
        oracle.close()
    assert chi_square(pj_samples.counts, naive, eos_ids={0}).pvalue < POWER


class _Uniforms:
    """A request generator whose per-iteration block of 2 * lambda + 1 uniforms is rewritten by ``bend``.

    The loops draw one block per iteration in one call (see ``core.decoding``): lambda for drafting,
    lambda for acceptance, one for the emitted token. Rewriting that block plants a bug in how the
    uniforms are used without touching the code under test.
    """

    def __init__(self, gen, lam, bend):
        self._gen, self._lam, self._bend = gen, lam, bend

    def random(self, size=None, *a, **k):
        if size == 2 * self._lam + 1:
            return self._bend(self._gen.random(size), self._lam)
        return self._gen.random(size, *a, **k)

    def __getattr__(self, name):
        return getattr(self._gen, name)


def _plant_uniforms(monkeypatch, bend, lam=4):
    real = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda *a, **k: _Uniforms(real(*a, **k), lam, bend))


def _reuse(u, lam):
    """Acceptance uniform = draft uniform (the reviewer's planted bug)."""
    u = u.copy()
    u[lam : 2 * lam] = u[:lam]
    return u


def _accept_in_support(u, lam):
    """Acceptance uniforms of 0: every draft token the judge allows is accepted (min(1, p/q) ignored)."""
    u = u.copy()
    u[lam : 2 * lam] = 0.0
    return u


#: bug -> its plant; both keep the judge's support, so only the probabilities can refute them.
BUGS = {"uniform reuse": _reuse, "accept whenever p > 0": _accept_in_support}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bugs_are_rejected(model, monkeypatch, bug):
    _plant_uniforms(monkeypatch, BUGS[bug])
    res = run(model, "persona-judge", "interleaved", 4, 2)
    assert res.pvalue < POWER, f"{bug}: p = {res.pvalue:.3g}"


def test_the_planted_uniforms_reach_the_loop(model, monkeypatch):
    """Guard for the negative controls: rewriting the block changes what the loop generates."""
    kw = dict(preferences=PREFS[2], lam=4, temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=6, stop=[])
    clean = [model.generate(PROMPT, seed=s, **kw).tokens for s in range(40)]
    _plant_uniforms(monkeypatch, _reuse)
    planted = [model.generate(PROMPT, seed=s, **kw).tokens for s in range(40)]
    assert clean != planted


# ---------------------------------------------------------------------------------------- the checker itself


def test_filtered_distribution_by_hand():
    z = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    assert filtered_distribution(z, temperature=1.0, top_k=0, top_p=1.0) == pytest.approx(
        {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    )
    assert filtered_distribution(z, temperature=1.0, top_k=2, top_p=1.0) == pytest.approx({2: 3 / 7, 3: 4 / 7})
    # top-p 0.5 over the top 3 (renormalized: .444, .333, .222): mass before the 2nd is .444 < .5, keep it
    assert filtered_distribution(z, temperature=1.0, top_k=3, top_p=0.5) == pytest.approx({2: 3 / 7, 3: 4 / 7})
    assert filtered_distribution(z, temperature=1.0, top_k=3, top_p=0.4) == pytest.approx({3: 1.0})
    hot = filtered_distribution(z, temperature=0.5, top_k=0, top_p=1.0)  # p^2 renormalized
    assert hot[3] == pytest.approx(0.16 / 0.30)
    assert filtered_distribution(z, temperature=0.0, top_k=2, top_p=1.0) == {3: 1.0}
    tie = filtered_distribution(np.array([1.0, 2.0, 2.0, 0.0]), temperature=1.0, top_k=1, top_p=1.0)
    assert tie == pytest.approx({1: 0.5, 2: 0.5})  # ties at the k-th value are kept


def test_roles():
    assert [roles_at("alternate", 2, i) for i in range(3)] == [(0, 1), (1, 0), (0, 1)]
    assert [roles_at("alternate", 3, i) for i in range(4)] == [(0, 1), (1, 2), (2, 0), (0, 1)]
    assert [roles_at("fixed", 3, i) for i in range(3)] == [(0, 1), (0, 2), (0, 1)]


def test_the_oracle_reads_the_toy_models_logits(model):
    contexts = view_contexts(model, PROMPT, method="persona-judge", preferences=PREFS[3])
    oracle = SessionOracle(model.backend, contexts)
    rng = np.random.default_rng(0)
    try:
        for _ in range(30):  # random order: prefixes shared, extended, rolled back
            v = int(rng.integers(3))
            seq = tuple(int(t) for t in rng.integers(1, 6, size=int(rng.integers(0, 5))))
            assert np.array_equal(oracle.logits(v, seq), model.backend.logits_after(contexts[v] + list(seq)))
    finally:
        oracle.close()


def test_expected_law_by_hand_on_two_tokens():
    """A window of one on a two-token vocabulary, computed by hand from the rule."""

    class Tok:
        eos_token_ids = frozenset({9})

    class Fixed:
        """Logits depend on the view and the number of committed tokens only."""

        tokenizer = Tok()
        P = {0: [np.log([0.7, 0.3]), np.log([0.5, 0.5])], 1: [np.log([0.2, 0.8]), np.log([0.9, 0.1])]}

        def open(self, n):
            backend = self

            class S:
                def __init__(self):
                    self.ctx = [[] for _ in range(n)]

                def truncate(self, v, length):
                    del self.ctx[v][length:]

                def forward(self, v, toks, n_logits=1):
                    self.ctx[v] += list(toks)
                    return np.array([backend.P[v][len(self.ctx[v]) - 1]])

                def close(self):
                    pass

            return S()

    # contexts of one token each; view 0 drafts first, view 1 judges; lam = 1, two tokens
    law = expected_law(Fixed(), [[5], [5]], roles="alternate", lam=1, temperature=1.0, top_k=0, top_p=1.0, length=2)
    p1, q1 = [0.2, 0.8], [0.7, 0.3]  # judge 1, drafter 0 at the first position
    p2a, p2b = [0.5, 0.5], [0.9, 0.1]  # second position: view 0 judging (after a rejection) / view 1 (bonus)
    want = {}
    for y in (0, 1):
        acc, rej = min(p1[y], q1[y]), max(0.0, p1[y] - q1[y])
        for z in (0, 1):
            want[(y, z)] = acc * p2b[z] + rej * p2a[z]  # accepted: bonus from the same judge; rejected: swap
    assert law == pytest.approx(want)
